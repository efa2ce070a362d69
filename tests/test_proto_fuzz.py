"""The C protocol (backends/proto_core.h) under a sanitized fuzz harness, and against the
Python one (core/protocols/http.py) byte for byte.  No sockets, no servers.

tests/fuzz/proto_fuzz.c is built once per module with AddressSanitizer and
UndefinedBehaviorSanitizer (any report is fatal) and run three ways:

* its own mutation fuzzer over tests/fuzz/corpus, a fixed run count and seed (so every
  run does the same work), checking split invariance, bounded output, state invariants
  and leaks (tests/fuzz/README.md lists them);
* an allocation-failure sweep: every malloc of every seed fails in turn, and each must
  come back as PROTO_ENOMEM with nothing leaked;
* its differential mode: ~2,000 deterministic cases (corpus mutations and structured
  requests, random output budgets and limits, the same chunkings on both sides) whose
  answers, response counts and closing/partial flags must equal HttpProtocol's.

The Date line is the same on both sides: the harness replaces the header's time() with
a fixed second and this module freezes the Python clock to it.
"""

from __future__ import annotations

import os
import pathlib
import random
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest

from parallelnet.core.protocols import http as http_mod
from parallelnet.core.protocols.echo import EchoProtocol
from parallelnet.core.protocols.http import HttpProtocol

ROOT = pathlib.Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tests" / "fuzz"
CORPUS = FUZZ / "corpus"
SOURCE = FUZZ / "proto_fuzz.c"
PARAMS = 6          # parameter bytes in front of every corpus file (proto_fuzz.c)
FIXED_NOW = 1_700_000_000   # proto_fuzz.c's FIXED_NOW: Tue, 14 Nov 2023 22:13:20 GMT
SLACK = 512         # one answer's header past the budget
CFLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-pthread"]

# Measured on the 2-core development machine: about 6 s (with the sanitizers).
FUZZ_RUNS = 60000
FUZZ_SEED = 20240611
DIFF_CASES = 2000
DIFF_SEED = 1234
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:quarantine_size_mb=64",
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


@pytest.fixture(autouse=True, scope="module")
def frozen_clock():
    """The second proto_fuzz.c gives the C header, so both Date lines are equal."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(http_mod, "_time", lambda: FIXED_NOW + 0.25)
        yield


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> pathlib.Path:
    """proto_fuzz built with the sanitizers (a compile error fails: the header changed)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found on PATH: the sanitized C fuzz harness "
                    "tests/fuzz/proto_fuzz.c cannot be built")
    exe = tmp_path_factory.mktemp("proto_fuzz") / "proto_fuzz"
    res = subprocess.run([gcc, *CFLAGS, "-I", str(ROOT / "backends"), str(SOURCE), "-o", str(exe)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"building {SOURCE} failed:\n{res.stderr}"
    return exe


def run_harness(exe: pathlib.Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run proto_fuzz (in its own directory, where a failing input is written)."""
    return subprocess.run([str(exe), *args], capture_output=True, cwd=exe.parent, timeout=timeout,
                          env={**os.environ, **SANITIZER_ENV})


def assert_clean(res: subprocess.CompletedProcess, exe: pathlib.Path) -> str:
    """Exit 0 and no sanitizer report; on failure show the report and the failing input."""
    out = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    crash = exe.parent / "proto_fuzz-crash.bin"
    detail = f"\nfailing input: {crash.read_bytes()!r}" if crash.exists() else ""
    assert res.returncode == 0, f"proto_fuzz exited {res.returncode}:\n{out[-8000:]}{detail}"
    for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "invariant violated"):
        assert marker not in out, f"{marker!r} in proto_fuzz's output:\n{out[-8000:]}{detail}"
    return out


# ---------------------------------------------------------------- the C harness alone


def test_corpus_is_small_and_parameterised():
    files = sorted(CORPUS.iterdir())
    assert len(files) >= 30
    for f in files:
        data = f.read_bytes()
        assert PARAMS < len(data) <= 4096, f.name


def test_mutation_fuzzer_finds_nothing(harness):
    res = run_harness(harness, f"-runs={FUZZ_RUNS}", f"-seed={FUZZ_SEED}", str(CORPUS))
    out = assert_clean(res, harness)
    assert f"{FUZZ_RUNS} execs after" in out, out


def test_allocation_failures_come_back_as_enomem_without_leaks(harness):
    res = run_harness(harness, "-alloc_fail=64", str(CORPUS))
    out = assert_clean(res, harness)
    m = re.search(rb"(\d+) PROTO_ENOMEM returns", res.stdout)
    assert m and int(m.group(1)) > 0, out   # the sweep did make allocations fail


# ---------------------------------------------------------------- C against Python


@dataclass
class Case:
    data: bytes
    chunks: list[int]
    budget: int = 1 << 19
    max_header: int = 8192
    max_body: int = 1 << 20
    lazy: bool = False          # pull once between chunks: feeds arrive while answers are held
    echo: int | None = None     # a message size: an echo case
    why: str = field(default="", compare=False)

    def encode(self) -> bytes:
        assert sum(self.chunks) == len(self.data) and all(self.chunks)
        head = struct.pack("<BBIIIIII", 1 if self.echo is not None else 0, 2 if self.lazy else 0,
                           self.budget, self.max_header, self.max_body, self.echo or 0,
                           len(self.chunks), len(self.data))
        return head + struct.pack(f"<{len(self.chunks)}I", *self.chunks) + self.data


class Outcome(NamedTuple):
    out: bytes
    n: int
    n_before_eof: int
    closing0: bool    # after the answers to all input, before EOF
    partial0: bool
    closing1: bool    # after EOF and the last pull
    truncated: bool
    before_eof: int   # output bytes before EOF (echo: the partial message's bytes)


RESULT = struct.Struct("<qqBBBBII")


def run_c(exe: pathlib.Path, cases: list[Case], tmp_path) -> list[Outcome]:
    path = tmp_path / "cases.bin"
    path.write_bytes(b"".join(c.encode() for c in cases))
    res = run_harness(exe, "-diff", str(path))
    assert_clean(res, exe)
    raw, pos, out = res.stdout, 0, []
    for _ in cases:
        n, nb, c0, p0, c1, trunc, before, size = RESULT.unpack_from(raw, pos)
        pos += RESULT.size
        out.append(Outcome(raw[pos:pos + size], n, nb, bool(c0), bool(p0), bool(c1), bool(trunc),
                           before))
        pos += size
    assert pos == len(raw)
    return out


def run_python(case: Case) -> Outcome:
    """The schedule proto_fuzz.c's run_http follows, on HttpProtocol."""
    if case.echo is not None:
        echo = EchoProtocol(case.echo)
        n, pos = 0, 0
        for size in case.chunks:
            n += echo.feed(case.data[pos:pos + size])[1]
            pos += size
        part = len(case.data) % case.echo if case.echo else 0
        return Outcome(b"", n, n, False, False, False, False, part)
    proto = HttpProtocol(max_header_bytes=case.max_header, max_body_bytes=case.max_body,
                         output_budget=case.budget)
    parts: list[bytes] = []
    n = 0

    def take(out, k: int) -> None:
        nonlocal n
        out = bytes(out)
        assert len(out) <= case.budget + SLACK, "Python answered past its budget"
        assert not (proto.closing and proto.more), "Python: closing and more both true"
        parts.append(out)
        n += k

    def drain(once: bool) -> None:
        while proto.more:
            out, k = proto.pull()
            take(out, k)
            assert out or k or not proto.more, "Python: a pull without progress"
            if once:
                break

    pos = 0
    for size in case.chunks:
        if proto.closing:
            break
        take(*proto.feed(case.data[pos:pos + size]))
        pos += size
        drain(case.lazy)
    drain(False)
    closing0, partial0, n0, before = proto.closing, proto.partial, n, sum(map(len, parts))
    assert proto.eof() == b""
    drain(False)
    assert proto.closing
    return Outcome(b"".join(parts), n, n0, closing0, partial0, proto.closing, False, before)


def describe(case: Case, c: Outcome, py: Outcome) -> str:
    """A mismatch, precisely: the case, where the outputs part, both outcomes."""
    at = next((i for i, (a, b) in enumerate(zip(c.out, py.out)) if a != b),
              min(len(c.out), len(py.out)))
    lo = max(0, at - 200)
    return (f"C and Python differ ({case.why}):\n"
            f"  input={case.data!r}\n  chunks={case.chunks} lazy={case.lazy} budget={case.budget} "
            f"max_header_bytes={case.max_header} max_body_bytes={case.max_body} echo={case.echo}\n"
            f"  C:      n={c.n} n_before_eof={c.n_before_eof} closing={c.closing0}/{c.closing1} "
            f"partial={c.partial0} bytes={len(c.out)} before_eof={c.before_eof}\n"
            f"  Python: n={py.n} n_before_eof={py.n_before_eof} closing={py.closing0}/{py.closing1} "
            f"partial={py.partial0} bytes={len(py.out)} before_eof={py.before_eof}\n"
            f"  outputs part at byte {at}:\n  C:      {c.out[lo:at + 200]!r}\n"
            f"  Python: {py.out[lo:at + 200]!r}")


def compare(exe, cases: list[Case], tmp_path) -> list[Outcome]:
    c_out = run_c(exe, cases, tmp_path)
    bad = []
    for case, c in zip(cases, c_out):
        py = run_python(case)
        assert not c.truncated, f"case too large for the comparison ({case.why})"
        if c != py:
            bad.append(describe(case, c, py))
    assert not bad, f"{len(bad)} of {len(cases)} cases differ; the first:\n" + "\n\n".join(bad[:3])
    return c_out


# ---- deterministic case generation

GOOD_METHODS = [b"GET"] * 4 + [b"HEAD"]
BAD_METHODS = [b"POST", b"PUT", b"get", b"G(T", b""]
GOOD_TARGETS = [b"/", b"/plaintext", b"/plaintext?a=b", b"/?", b"/bytes/1", b"/bytes/63",
                b"/bytes/64", b"/bytes/65", b"/bytes/999", b"/bytes/5?x=1", b"http://h/plaintext",
                b"http://h", b"HTTP://h:80?x", b"https://h/bytes/7", b"a+b.c-d://h"]
BAD_TARGETS = [b"/nope", b"/bytes/", b"/bytes/0", b"/bytes/0001", b"/bytes/-1", b"/bytes/1x",
               b"/bytes/123456789", b"/bytes/16777217", b"http://h/#x", b"http:/h", b"1http://h/",
               b"*", b"h/x", b"/a#b", b""]
BIG_TARGETS = [b"/bytes/16384", b"/bytes/16385", b"/bytes/70000", b"/bytes/1048577"]
GOOD_VERSIONS = [b"HTTP/1.1"] * 3 + [b"HTTP/1.0"]
BAD_VERSIONS = [b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "]
GOOD_HOSTS = [[b"Host: x"], [b"Host: 127.0.0.1:8080"], [b"Host: [::1]:80"], [b"host:  x \t"],
              [b"HOST: %41"], [b"Host:"]]
BAD_HOSTS = [[], [b"Host: x", b"Host: y"], [b"Host: a b"], [b"Host: [zz]"], [b"Host: x:8a"],
             [b"Host: []"]]
CONNECTION = [b"Connection: close", b"Connection: keep-alive", b"connection: Keep-Alive, foo",
              b"Connection: ,close,", b"Connection: closed", b"Connection:", b"Connection: CLOSE"]
LENGTHS = [b"0", b"5", b"005", b"5, 5", b" 5 ", b"5,6", b"-5", b"+5", b"", b"5,",
           b"18446744073709551616", b"1844674407370955161605", b"4611686018427387904",
           b"999999999999999999", b"1000000000000000000", b"0x5"]
JUNK = [b"X-A: b", b"X: \x80\xff", b"X : y", b" folded", b"X: a\x01", b"X:\tv\t", b"Bad Header",
        b"X: a\rb", b"Transfer-Encoding: chunked", b"transfer-encoding: gzip", b": v", b"X-\xff: v"]
TOKENS = [b"\r\n", b"\r\n\r\n", b"\n", b"\r", b" ", b":", b"Content-Length: ", b"18446744073709551616",
          b"/bytes/16777216", b"HEAD ", b"Connection: close", b"Transfer-Encoding: chunked",
          b"Host: x", b"\x00", b"\xff", b"0"]


def structured(r: random.Random) -> bytes:
    """A pipeline of generated requests, each part broken with the case's error rate
    (so some pipelines run long and some stop at their first request)."""
    bad = r.choice((0.0, 0.02, 0.05, 0.2))

    def pick(good, broken):
        return r.choice(broken if r.random() < bad else good)

    out = b"\r\n" * r.choice((0, 0, 0, 1, 2))
    for _ in range(r.choice((1, 2, 3, 4, 6, 10))):
        target = r.choice(BIG_TARGETS) if r.random() < 0.03 else pick(GOOD_TARGETS, BAD_TARGETS)
        sp = b"  " if r.random() < bad / 4 else b" "
        lines = [pick(GOOD_METHODS, BAD_METHODS) + sp + target + b" " + pick(GOOD_VERSIONS, BAD_VERSIONS)]
        lines += pick(GOOD_HOSTS, BAD_HOSTS)
        if r.random() < 0.2:
            lines.append(r.choice(CONNECTION))
        body = b""
        if r.random() < 0.2:
            value = r.choice(LENGTHS) if r.random() < 0.4 else str(r.randrange(12)).encode()
            lines.append(b"Content-Length: " + value)
            if value.strip().isdigit() and int(value) < 50:
                slip = r.choice((-1, 1)) if r.random() < bad else 0   # a body too short or long
                body = bytes(r.randrange(256) for _ in range(int(value) + slip))
        if r.random() < bad:
            lines.append(r.choice(JUNK))
        if r.random() < 0.1:
            lines.append(b"X-Long: " + b"v" * r.choice((10, 30, 100, 300)))
        if r.random() < 0.2:   # header order (Host after the others, say)
            headers = lines[1:]
            r.shuffle(headers)
            lines[1:] = headers
        eol = r.choice((b"\n", b"\r")) if r.random() < bad / 4 else b"\r\n"
        out += eol.join(lines) + eol + eol + body
    tail = r.random()
    if tail < 0.1:
        out += b"GET / HTTP/1.1\r\nHost: x\r\n"[: r.randrange(1, 26)]   # partial at EOF
    elif tail < 0.13:
        out += b"\n"
    return out


def mutate(r: random.Random, data: bytes, other: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(r.randrange(1, 6)):
        op = r.randrange(6)
        at = r.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(at, len(b) - 1)] ^= 1 << r.randrange(8)
        elif op == 1:
            b[at:at] = bytes([r.randrange(256)])
        elif op == 2:
            del b[at:at + r.randrange(1, 16)]
        elif op == 3 and b:
            start = r.randrange(len(b))
            b[at:at] = b[start:start + r.randrange(1, 64)]
        elif op == 4:
            b[at:at] = r.choice(TOKENS)
        elif op == 5 and other:
            b[at:] = other[r.randrange(len(other)):]
    return bytes(b[:4000])


_BYTES_N = re.compile(rb"/bytes/([0-9]{1,8})(?![0-9])")


def chunkings(r: random.Random, size: int) -> list[int]:
    mode = r.random()
    if size == 0:
        return []
    if mode < 0.3:
        return [size]
    if mode < 0.45 and size <= 600:
        return [1] * size
    chunks, left = [], size
    while left:
        c = min(left, r.choice((1, 2, 3)) if r.random() < 0.3 else r.randrange(1, max(2, size // 2)))
        chunks.append(c)
        left -= c
    return chunks


def make_case(r: random.Random, data: bytes, why: str) -> Case | None:
    """Random limits and chunking for data; None when its answers could be huge (a
    /bytes body at a tiny budget is a pull per byte in Python)."""
    bound = sum(int(m) for m in _BYTES_N.findall(data) if int(m) <= 16 * 1024 * 1024)
    if bound > 3_000_000:
        return None
    budget = max(int(10 ** r.uniform(0, 5)), bound // 500 + 1)
    return Case(data, chunkings(r, len(data)), budget=min(budget, 1 << 22),
                max_header=8192 if r.random() < 0.6 else r.choice((1, 4, 16, 27, 40, 64, 100, 256)),
                max_body=r.choice((0, 1, 5, 100, 1 << 20, 1 << 20)), lazy=r.random() < 0.3, why=why)


def generated_cases(count: int, seed: int) -> list[Case]:
    r = random.Random(seed)
    seeds = [f.read_bytes()[PARAMS:] for f in sorted(CORPUS.iterdir())]
    cases: list[Case] = []
    while len(cases) < count:
        kind = r.random()
        if kind < 0.05:
            data = structured(r)
            cases.append(Case(data, chunkings(r, len(data)), echo=r.choice((0, 1, 3, 16, 100)),
                              why=f"echo case {len(cases)}"))
            continue
        if kind < 0.4:
            data, why = mutate(r, r.choice(seeds), r.choice(seeds)), "corpus mutation"
        else:
            data, why = structured(r), "structured"
        case = make_case(r, data, f"{why}, case {len(cases)}")
        if case is not None:
            cases.append(case)
    return cases


def test_generated_cases_are_deterministic():
    assert generated_cases(50, DIFF_SEED) == generated_cases(50, DIFF_SEED)


def test_c_answers_like_python(harness, tmp_path):
    cases = generated_cases(DIFF_CASES, DIFF_SEED)
    outs = compare(harness, cases, tmp_path)
    # the cases reach the interesting places, on both sides
    joined = b"".join(o.out for o in outs)
    for status in (b"200", b"400", b"404", b"405", b"413", b"414", b"431", b"501"):
        assert b"HTTP/1.1 " + status in joined, status
    assert sum(o.closing0 for o in outs) > 100 and sum(o.partial0 for o in outs) > 10


# ---- the Content-Length overflow cases, spelled out

TOO_LARGE = (b"HTTP/1.1 413 Content Too Large\r\nServer: parallelnet\r\nContent-Type: text/plain\r\n"
             b"Content-Length: 17\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\nConnection: close\r\n"
             b"\r\nContent Too Large")
OVERFLOW_2_64 = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\n"
OVERFLOW_LONG = (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1844674407370955161605\r\n\r\nhello"
                 b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize("data", [OVERFLOW_2_64, OVERFLOW_LONG], ids=["2**64", "2**64*100+5"])
def test_overflowing_content_length_is_one_413_then_closing(harness, tmp_path, data):
    """A Content-Length past 2**64 must not wrap to a small value (2**64 -> 0 would
    read no body; ...605 -> 5 would skip "hello" and answer GET /x)."""
    r = random.Random(7)
    cases = [Case(data, chunks) for chunks in
             ([len(data)], [1] * len(data), chunkings(r, len(data)), chunkings(r, len(data)))]
    cases += [Case(data, [len(data)], budget=1), Case(data, [len(data)], lazy=True, budget=1)]
    for out in compare(harness, cases, tmp_path):
        assert out.out == TOO_LARGE and out.n == 1 and out.closing0, out
