"""Write the seed corpus of proto_fuzz.c into tests/fuzz/corpus/ (the files are committed;
rerun this only to change them: ``python tests/fuzz/make_corpus.py``).

Every file is one fuzz input: six parameter bytes, then what a client sends.  The
parameter bytes index proto_fuzz.c's tables: budget (BUDGETS), max_header_bytes
(MAX_HEADER), max_body_bytes (MAX_BODY), split seed, flags (bits 0-2: echo message size,
MSIZE; bit 7: inject a malloc failure), failing malloc index.
"""

from __future__ import annotations

import pathlib

CORPUS = pathlib.Path(__file__).with_name("corpus")

# Indexes into proto_fuzz.c's tables (keep in step with it).
B1, B64, B135, B150, B300, B4K, B16600, B64K, B4M = 0, 2, 3, 5, 6, 8, 10, 11, 15
H1, H16, H40, H64, H256, H8K = 0, 2, 4, 5, 6, 7
MB0, MB5, MB100, MB64K, MB1M = 0, 2, 3, 5, 6


def params(budget=B64K, header=H8K, body=MB1M, seed=0, flags=0, fail=0) -> bytes:
    return bytes((budget, header, body, seed, flags, fail))


def req(target=b"/", *headers: bytes, method=b"GET", version=b"HTTP/1.1", host=b"x") -> bytes:
    lines = [method + b" " + target + b" " + version]
    if host is not None:
        lines.append(b"Host: " + host)
    lines.extend(headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


SEEDS: dict[str, bytes] = {
    # valid requests and routes
    "get-root": params() + req(),
    "get-plaintext": params(seed=1) + req(b"/plaintext?x=1"),
    "head-root": params(seed=2) + req(method=b"HEAD"),
    "http10": params(seed=3) + req(version=b"HTTP/1.0", host=None),
    "http10-keepalive": params(seed=4) + req(b"/", b"Connection: keep-alive", version=b"HTTP/1.0")
    + req(version=b"HTTP/1.0", host=None),
    "connection-tokens": params(seed=5) + req(b"/", b"Connection: foo, CLOSE ,bar") + req(),
    "connection-keep-close": params(seed=6) + req(b"/", b"Connection: keep-alive, close"),
    "absolute-form": params(seed=7) + req(b"http://example.com:80/plaintext?q")
    + req(b"HTTPS://h") + req(b"http://h/bytes/5"),
    "absolute-form-bad": params(seed=8) + req(b"http://h/#frag"),
    "host-ipv6": params(seed=9) + req(host=b"[::1]:8080") + req(host=b"[]"),
    "host-bad": params(seed=10) + req(host=b"a b") + req(),
    "two-hosts": params(seed=11) + b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "no-host-11": params(seed=12) + req(host=None),
    "unknown-path": params(seed=13) + req(b"/nope") + req(),
    "post": params(seed=14) + req(method=b"POST") + req(),
    # pipelines and the output budget
    "pipeline-8": params(B300, seed=15) + req() * 8,
    "pipeline-budget-1": params(B1, seed=16) + req() * 3 + req(method=b"HEAD") + req(b"/x"),
    "pipeline-budget-135": params(B135, seed=17) + req() * 4,
    "leading-crlf": params(seed=18) + b"\r\n\r\n" + req() + b"\r\n" + req(),
    # /bytes/N
    "bytes-small": params(seed=19) + req(b"/bytes/65") + req(b"/bytes/1"),
    "bytes-inline-edge": params(B16600, seed=20) + req(b"/bytes/16384") + req(b"/bytes/16385"),
    "bytes-streamed-pipeline": params(B4K, seed=21) + req(b"/bytes/70000") + req() + req(b"/bytes/3"),
    "bytes-max": params(B4M, seed=22) + req(b"/bytes/16777216"),
    "bytes-over-max": params(seed=23) + req(b"/bytes/16777217") + req(b"/bytes/000000001")
    + req(b"/bytes/123456789") + req(b"/bytes/"),
    "bytes-head": params(B64, seed=24) + req(b"/bytes/100000", method=b"HEAD") + req(),
    "bytes-close": params(B150, seed=25) + req(b"/bytes/5000", b"Connection: close") + req(),
    "bytes-budget-1": params(B1, seed=26) + req(b"/bytes/300") + req(),
    # bodies (Content-Length) and their limits
    "body-5": params(seed=27) + b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    + req(),
    "body-get-split": params(MB100, seed=28)
    + b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789" + req(),
    "body-too-large": params(body=MB5, seed=29)
    + b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n123456" + req(),
    "body-no-limit": params(body=MB0, seed=30)
    + b"HEAD / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
    "body-close-pipelined": params(seed=58)
    + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello" + req(),
    "body-bytes-pipelined": params(B300, seed=59)
    + b"GET /bytes/700 HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc"
    + req(b"/bytes/2") + req(method=b"HEAD"),
    "clen-2-64": params(seed=31) + b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\n",
    "clen-huge-then-get": params(seed=32)
    + b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1844674407370955161605\r\n\r\nhello"
    + b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n",
    "clen-2-62": params(body=7, seed=33)
    + b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 4611686018427387904\r\n\r\n",
    "clen-list": params(seed=34) + b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n"
    b"Content-Length: 3\r\n\r\nabc" + b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\n",
    "clen-bad": params(seed=35) + b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "clen-zeros": params(seed=36) + b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0000\r\n\r\n" + req(),
    "chunked": params(seed=37) + b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # malformed framing
    "bare-lf": params(seed=38) + b"GET / HTTP/1.1\nHost: x\n\n",
    "bare-lf-after": params(seed=39) + req() + b"\n",
    "bare-cr": params(seed=40) + b"GET / HTTP/1.1\r\nHost: x\rY: z\r\n\r\n",
    "obs-fold": params(seed=41) + b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    "space-before-colon": params(seed=42) + b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "bad-version": params(seed=43) + req(version=b"HTTP/2.0") + req(),
    "bad-request-line": params(seed=44) + b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
    "ctl-in-value": params(seed=45) + b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
    "obs-text-value": params(seed=46) + b"GET / HTTP/1.1\r\nHost: x\r\nX: \x80\xff\r\n\r\n" + req(),
    # header size limits
    "long-target-414": params(header=H64, seed=47) + b"GET /" + b"a" * 80 + b" HTTP/1.1\r\n\r\n",
    "long-header-431": params(header=H64, seed=48) + b"GET / HTTP/1.1\r\nX: " + b"b" * 80 + b"\r\n\r\n",
    "header-limit-edge": params(header=H40, seed=49) + req(b"/", host=b"abcdefghijklmnopq")
    + req(b"/", host=b"abcdefghijklmnopqr"),
    "header-limit-1": params(header=H1, seed=50) + b"\r\n" + req(),
    "header-limit-16": params(header=H16, seed=51) + b"GET / HTTP/1.0\r\n\r\n",
    "partial-at-eof": params(seed=52) + req() + b"GET / HTTP/1.1\r\nHo",
    # echo message sizes (the HTTP schedules run on the same bytes)
    "echo-3": params(seed=53, flags=3) + b"abcdefghij",
    "echo-16": params(seed=54, flags=5) + b"0123456789abcdef" * 3 + b"xyz",
    # malloc failure injection (bit 7 of flags), at the 0th and 2nd allocation
    "alloc-fail-0": params(B135, seed=55, flags=0x80, fail=0) + req() * 3 + b"GET /",
    "alloc-fail-2": params(B1, seed=56, flags=0x80, fail=2) + req(b"/bytes/20000") + req() * 40,
    "alloc-fail-growth": params(B64K, seed=57, flags=0x80, fail=3) + req() * 120,
}


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.iterdir():
        old.unlink()
    for name, data in SEEDS.items():
        (CORPUS / name).write_bytes(data)
    print(f"wrote {len(SEEDS)} seeds to {CORPUS}")


if __name__ == "__main__":
    main()
