"""Property-based fuzzing of the HTTP parser (kept apart from its unit tests, as h11 does).

Random bytes and mutated valid requests, fed in random chunkings: ``feed`` must never
raise, and everything it returns must be a sequence of well-formed HTTP/1.1 responses
(status line, headers, a body of exactly Content-Length bytes), one per counted
request; after an error status the protocol is closing.  Bounded: a few hundred
examples per property, no deadline flakiness.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parallelnet.core.protocols.http import HttpProtocol

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]+")

VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /plaintext HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
]   # (no HEAD: its answer has a Content-Length but no body, which needs the request to frame)
TOKENS = [b"\r\n", b"\n", b"\r", b":", b" ", b"\x00", b"\xff", b"Content-Length: ",
          b"Transfer-Encoding: chunked\r\n", b"-1", b"99999999999999999999", b"HTTP/1.1",
          b"GET", b"\r\n\r\n", b"Host: x\r\n", b"a" * 9000]


def parse_responses(out: bytes) -> list[int]:
    """Split ``out`` into responses; assert each is well formed; return the statuses."""
    statuses = []
    pos = 0
    while pos < len(out):
        end = out.find(b"\r\n\r\n", pos)
        assert end > 0, f"truncated response head: {out[pos:pos + 80]!r}"
        lines = out[pos:end].split(b"\r\n")
        m = STATUS.fullmatch(lines[0])
        assert m, f"bad status line {lines[0]!r}"
        length = None
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            assert sep and name and name == name.strip(), f"bad header line {line!r}"
            if name.lower() == b"content-length":
                length = int(value)
        assert length is not None, "response without Content-Length"
        body_end = end + 4 + length
        assert body_end <= len(out), "body shorter than Content-Length"
        statuses.append(int(m.group(1)))
        pos = body_end
    return statuses


def run(data: bytes, cuts: list[int]) -> None:
    proto = HttpProtocol()
    out, counted = b"", 0
    points = sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]
    prev = 0
    for p in points:
        if proto.closing:
            break
        chunk = data[prev:p]
        prev = p
        if not chunk:
            continue
        got, n = proto.feed(memoryview(chunk) if len(chunk) % 2 else chunk)  # both input types
        out += bytes(got)
        counted += n
    statuses = parse_responses(out)
    assert len(statuses) == counted
    if any(s >= 400 and s not in (404, 405) for s in statuses):
        assert proto.closing and statuses[-1] >= 400, statuses
    tail = proto.eof()
    assert tail == b"" and proto.closing


@SETTINGS
@given(st.binary(max_size=2048), st.lists(st.integers(min_value=0, max_value=4096), max_size=8))
def test_random_bytes_never_raise(data, cuts):
    run(data, cuts)


@st.composite
def mutated(draw):
    reqs = draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=4))
    data = bytearray(b"".join(reqs))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "token", "dup"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "token":
            data[i:i] = draw(st.sampled_from(TOKENS))
        elif op == "dup" and data:
            data[i:i] = data[i:i + draw(st.integers(1, 32))]
    return bytes(data)


@SETTINGS
@given(mutated(), st.lists(st.integers(min_value=0, max_value=20000), max_size=8))
def test_mutated_requests_get_well_formed_answers_or_close(data, cuts):
    run(data, cuts)


@SETTINGS
@given(st.lists(st.sampled_from(VALID[:2]), min_size=1, max_size=6),
       st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_valid_pipelines_answered_in_full_whatever_the_chunking(reqs, cuts):
    proto = HttpProtocol()
    data = b"".join(reqs)
    out, counted = b"", 0
    prev = 0
    for p in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
        if data[prev:p]:
            got, n = proto.feed(data[prev:p])
            out += bytes(got)
            counted += n
        prev = p
    assert parse_responses(out) == [200] * len(reqs) and counted == len(reqs)
