"""HttpProtocol: exact bytes for every rule, pipelining and chunking invariance; no sockets."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallelnet.core.protocols import http as http_mod
from parallelnet.core.protocols.base import answer_all
from parallelnet.core.protocols.http import HttpProtocol

FROZEN = 1_700_000_000.25  # Tue, 14 Nov 2023 22:13:20 GMT
DATE = b"Tue, 14 Nov 2023 22:13:20 GMT"


@pytest.fixture(autouse=True, scope="module")
def frozen_clock():
    """Every test in this module sees one fixed second unless it moves the clock."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(http_mod, "_time", lambda: FROZEN)
        yield


def response(status: bytes, body: bytes, *, conn: bytes | None = None, head: bool = False,
             extra: bytes = b"", date: bytes = DATE) -> bytes:
    """The expected bytes of one answer, restated from the spec."""
    out = (b"HTTP/1.1 " + status + b"\r\nServer: parallelnet\r\n" + extra
           + b"Content-Type: text/plain\r\nContent-Length: " + str(len(body)).encode()
           + b"\r\nDate: " + date + b"\r\n")
    if conn is not None:
        out += b"Connection: " + conn + b"\r\n"
    return out + b"\r\n" + (b"" if head else body)


HELLO = b"Hello, World!"
OK = (b"HTTP/1.1 200 OK\r\n"
      b"Server: parallelnet\r\n"
      b"Content-Type: text/plain\r\n"
      b"Content-Length: 13\r\n"
      b"Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
      b"\r\n"
      b"Hello, World!")
assert OK == response(b"200 OK", HELLO)
OK_HEAD = response(b"200 OK", HELLO, head=True)
OK_CLOSE = response(b"200 OK", HELLO, conn=b"close")
OK_KA10 = response(b"200 OK", HELLO, conn=b"keep-alive")
NOT_FOUND = response(b"404 Not Found", b"Not Found")
NOT_ALLOWED = response(b"405 Method Not Allowed", b"Method Not Allowed",
                       extra=b"Allow: GET, HEAD\r\n")
BAD = response(b"400 Bad Request", b"Bad Request", conn=b"close")
TOO_LARGE = response(b"413 Content Too Large", b"Content Too Large", conn=b"close")
URI_TOO_LONG = response(b"414 URI Too Long", b"URI Too Long", conn=b"close")
HDR_TOO_LARGE = response(b"431 Request Header Fields Too Large",
                         b"Request Header Fields Too Large", conn=b"close")
NOT_IMPL = response(b"501 Not Implemented", b"Not Implemented", conn=b"close")

WRK = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


def get(target=b"/", *headers: bytes, method=b"GET", version=b"HTTP/1.1", host=True) -> bytes:
    lines = [method + b" " + target + b" " + version]
    if host:
        lines.append(b"Host: example.com")
    lines.extend(headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def feed_all(proto: HttpProtocol, chunks) -> tuple[bytes, int]:
    """Feed chunks like a backend: stop once the protocol is closing."""
    out = b""
    n = 0
    for chunk in chunks:
        if proto.closing:
            break
        o, k = proto.feed(chunk)
        out += bytes(o)
        n += k
    return out, n


def one(data: bytes, **kw) -> tuple[bytes, int, bool]:
    p = HttpProtocol(**kw)
    out, n = p.feed(data)
    return bytes(out), n, p.closing


def split_at(data: bytes, cuts) -> list[bytes]:
    cuts = sorted(set(cuts))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


# ---------------------------------------------------------------- basics


@pytest.mark.parametrize("target", [b"/", b"/plaintext", b"/plaintext?x=1", b"/?a=b",
                                    b"http://example.com/plaintext", b"HTTP://h:80",
                                    b"https://example.com/?q"])
def test_get_hello(target):
    assert one(get(target)) == (OK, 1, False)


def test_wrk_request_exact_bytes():
    p = HttpProtocol()
    for _ in range(3):  # also exercises the memoised parse
        assert p.feed(WRK) == (OK, 1)
    assert not p.closing


def test_head_has_headers_and_no_body():
    assert one(get(method=b"HEAD")) == (OK_HEAD, 1, False)
    assert OK_HEAD.endswith(b"Content-Length: 13\r\nDate: " + DATE + b"\r\n\r\n")


def test_memoryview_and_bytearray_input():
    p = HttpProtocol()
    assert p.feed(memoryview(bytearray(WRK))) == (OK, 1)
    assert p.feed(bytearray(WRK)) == (OK, 1)
    # resume paths (partial header, body skip) with memoryviews too
    assert p.feed(memoryview(WRK[:10])) == (b"", 0)
    assert p.feed(memoryview(WRK[10:])) == (OK, 1)
    post = get(b"/", b"Content-Length: 4", method=b"POST") + b"abcd"
    assert p.feed(memoryview(post[:-2])) == (b"", 0)
    out, n = p.feed(memoryview(post[-2:] + WRK))
    assert (bytes(out), n) == (NOT_ALLOWED + OK, 2)


def test_protocol_uses_slots():
    assert not hasattr(HttpProtocol(), "__dict__")


def test_constructor_validation():
    with pytest.raises(ValueError):
        HttpProtocol(max_header_bytes=0)
    with pytest.raises(ValueError):
        HttpProtocol(max_body_bytes=-1)


# ---------------------------------------------------------------- Date


def test_date_is_imf_fixdate():
    p = HttpProtocol()
    out, _ = p.feed(WRK)
    m = re.search(rb"\r\nDate: ([^\r]*)\r\n", out)
    assert m.group(1) == DATE
    assert re.fullmatch(rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul"
                        rb"|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT", m.group(1))


def test_date_recomputed_at_most_once_per_second(monkeypatch):
    now = [1_700_000_000.0]
    calls = []
    real = http_mod.formatdate

    def counting(t, usegmt):
        calls.append(t)
        return real(t, usegmt=usegmt)

    monkeypatch.setattr(http_mod, "_time", lambda: now[0])
    monkeypatch.setattr(http_mod, "formatdate", counting)
    p = HttpProtocol()
    for i in range(50):
        now[0] = 1_700_000_000.0 + i / 50  # all within one second
        assert p.feed(WRK)[0] == OK
    assert len(calls) <= 1
    now[0] = 1_700_000_001.5
    out, _ = p.feed(WRK)
    assert out == response(b"200 OK", HELLO, date=b"Tue, 14 Nov 2023 22:13:21 GMT")
    assert len(calls) <= 2
    # another connection in the same second reuses the same table
    assert HttpProtocol().feed(WRK)[0] == out
    assert len(calls) <= 2


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize(
    "request_bytes, expected, closing",
    [
        (get(), OK, False),
        (get(b"/", b"Connection: close"), OK_CLOSE, True),
        (get(b"/", b"Connection: CLOSE"), OK_CLOSE, True),
        (get(b"/", b"Connection: keep-alive, Close"), OK_CLOSE, True),
        (get(b"/", b"Connection: foo", b"Connection:  close "), OK_CLOSE, True),
        (get(b"/", b"Connection: keep-alive"), OK, False),
        (get(b"/", b"Connection: upgrade"), OK, False),
        (get(b"/", b"Connection: closed"), OK, False),  # a different token
        (get(version=b"HTTP/1.0", host=False), OK_CLOSE, True),
        (get(b"/", b"Connection: Keep-Alive", version=b"HTTP/1.0", host=False), OK_KA10, False),
        (get(b"/", b"Connection: te, keep-alive", version=b"HTTP/1.0"), OK_KA10, False),
        (get(b"/", b"Connection: keep-alive, close", version=b"HTTP/1.0"), OK_CLOSE, True),
        (get(b"/", b"Connection: keep-alives", version=b"HTTP/1.0"), OK_CLOSE, True),
        (get(method=b"HEAD", version=b"HTTP/1.0"), response(b"200 OK", HELLO, conn=b"close",
                                                            head=True), True),
    ],
)
def test_connection_persistence(request_bytes, expected, closing):
    assert one(request_bytes) == (expected, 1, closing)


def test_close_ignores_everything_after():
    p = HttpProtocol()
    out, n = p.feed(get() + get(b"/", b"Connection: close") + get() + b"garbage\n\n")
    assert (out, n) == (OK + OK_CLOSE, 2)
    assert p.closing
    assert p.feed(WRK) == (b"", 0)


# ---------------------------------------------------------------- pipelining


def test_pipelined_requests_answered_in_order():
    stream = (get() + get(b"/missing") + get(method=b"HEAD") + get(b"/plaintext")
              + get(method=b"DELETE"))
    assert one(stream) == (OK + NOT_FOUND + OK_HEAD + OK + NOT_ALLOWED, 5, False)


def test_wrk_pipeline_of_16():
    assert one(WRK * 16) == (OK * 16, 16, False)


def test_pipeline_with_partial_tail_then_rest():
    p = HttpProtocol()
    assert p.feed(WRK * 2 + WRK[:7]) == (OK * 2, 2)
    assert p.feed(WRK[7:30]) == (b"", 0)
    assert p.feed(WRK[30:] + WRK) == (OK * 2, 2)


FIXED_STREAM = (
    get()
    + get(b"/nope", b"Connection: keep-alive")
    + get(b"/", b"Content-Length: 12", method=b"POST") + b"a\r\n\r\nGET / H"  # 12-byte body
    + b"\r\n"  # an empty line before a request is ignored
    + get(method=b"HEAD")
    + get(b"/", b"Content-Length: 3") + b"xyz"
    + get(b"/plaintext", b"Connection: keep-alive", version=b"HTTP/1.0", host=False)
    + get(b"/", b"Transfer-Encoding: chunked")
    + WRK  # after the 501: ignored
)
FIXED_EXPECTED = OK + NOT_FOUND + NOT_ALLOWED + OK_HEAD + OK + OK_KA10 + NOT_IMPL


def test_fixed_stream_whole():
    p = HttpProtocol()
    assert feed_all(p, [FIXED_STREAM]) == (FIXED_EXPECTED, 7)
    assert p.closing


def test_fixed_stream_every_single_split_position():
    for i in range(len(FIXED_STREAM) + 1):
        p = HttpProtocol()
        got = feed_all(p, [FIXED_STREAM[:i], FIXED_STREAM[i:]])
        assert got == (FIXED_EXPECTED, 7), i


def test_fixed_stream_every_pair_of_split_positions_nearby():
    for i in range(0, len(FIXED_STREAM), 3):
        for j in range(i, min(i + 40, len(FIXED_STREAM))):
            got = feed_all(HttpProtocol(), split_at(FIXED_STREAM, [i, j]))
            assert got == (FIXED_EXPECTED, 7), (i, j)


def test_fixed_stream_byte_by_byte():
    chunks = [FIXED_STREAM[i:i + 1] for i in range(len(FIXED_STREAM))]
    assert feed_all(HttpProtocol(), chunks) == (FIXED_EXPECTED, 7)
    mvs = [memoryview(c) for c in chunks]
    assert feed_all(HttpProtocol(), mvs) == (FIXED_EXPECTED, 7)


# The pieces a generated stream is made of, with their expected answers.
KEEP_PIECES = [
    (WRK, OK),
    (get(b"/plaintext"), OK),
    (get(method=b"HEAD"), OK_HEAD),
    (get(b"/nope"), NOT_FOUND),
    (get(b"/x", method=b"HEAD"), response(b"404 Not Found", b"Not Found", head=True)),
    (get(b"/", b"Content-Length: 12", method=b"POST") + b"GET / HTTP/1", NOT_ALLOWED),
    (get(b"/", b"Content-Length: 0", method=b"PUT"), NOT_ALLOWED),
    (get(b"/", b"Content-Length: 4") + b"\r\n\r\n", OK),
    (get(b"/", b"Connection: keep-alive", version=b"HTTP/1.0", host=False), OK_KA10),
    (b"\r\n", b""),
]
FINAL_PIECES = [
    (b"", b""),
    (get(b"/", b"Connection: close"), OK_CLOSE),
    (get(version=b"HTTP/1.0"), OK_CLOSE),
    (b"GET / HTTP/1.1\n\n", BAD),
    (b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", BAD),
    (get(b"/", b"Bad header"), BAD),
    (get(host=False), BAD),
    (get(b"/", b"Content-Length: 5", b"Content-Length: 6"), BAD),
    (get(b"/", b"Transfer-Encoding: chunked"), NOT_IMPL),
    (get(b"/", b"Content-Length: 2000000", method=b"POST"), TOO_LARGE),
    (b"GET /" + b"a" * 9000, URI_TOO_LONG),
    (get(b"/", b"X: " + b"a" * 9000), HDR_TOO_LARGE),
    (get(b"/", b"Content-Length: 10") + b"abc", b""),  # eof mid-body: no answer
    (b"GET / HTTP/1.1\r\nHost", b""),  # incomplete: no answer
]


@st.composite
def pipelined_streams(draw):
    keep = draw(st.lists(st.sampled_from(KEEP_PIECES), min_size=1, max_size=8))
    final = draw(st.sampled_from(FINAL_PIECES))
    pieces = [*keep, final]
    stream = b"".join(p for p, _ in pieces)
    expected = b"".join(e for _, e in pieces)
    count = sum(1 for _, e in pieces if e)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    return stream, expected, count, split_at(stream, cuts)


@settings(max_examples=200, deadline=None)
@given(pipelined_streams(), st.booleans())
def test_pipelined_stream_split_anywhere_equals_whole(case, as_memoryview):
    stream, expected, count, chunks = case
    whole = feed_all(HttpProtocol(), [stream])
    assert whole == (expected, count)
    if as_memoryview:
        chunks = [memoryview(bytearray(c)) for c in chunks]
    p = HttpProtocol()
    assert feed_all(p, chunks) == whole
    assert p.eof() == b""
    assert p.closing


FUZZ_TOKENS = [b"GET", b"HEAD", b"POST", b" ", b"/", b"/x", b"HTTP/1.1", b"HTTP/1.0",
               b"\r\n", b"\r\n", b"\r\n\r\n", b"\n", b"\r", b"Host: a", b"Host:",
               b"Content-Length: 3", b"Connection: close", b"Transfer-Encoding: x", b"abc",
               b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b" x", b":", b"\t"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(FUZZ_TOKENS), max_size=40).map(b"".join),
    st.lists(st.integers(0, 400), max_size=10),
    st.sampled_from([24, 40, 64, 8192]),
)
def test_any_byte_stream_split_anywhere_equals_whole(stream, cuts, max_header_bytes):
    """Even for junk, the answers never depend on how the stream was chunked."""
    whole = feed_all(HttpProtocol(max_header_bytes=max_header_bytes), [stream])
    chunks = split_at(stream, [c for c in cuts if c <= len(stream)])
    assert feed_all(HttpProtocol(max_header_bytes=max_header_bytes), chunks) == whole
    singles = [stream[i:i + 1] for i in range(len(stream))]
    assert feed_all(HttpProtocol(max_header_bytes=max_header_bytes), singles) == whole


# ---------------------------------------------------------------- 400: request line


@pytest.mark.parametrize(
    "line",
    [
        b"GET /  HTTP/1.1",  # two spaces
        b"GET  / HTTP/1.1",
        b" GET / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b"GET/ HTTP/1.1",
        b"GET /",
        b"GET",
        b"G@T / HTTP/1.1",  # '@' is not a tchar
        b"GE(T / HTTP/1.1",
        b"GET\t/ HTTP/1.1",
        b"GET / HTTP/2.0",
        b"GET / HTTP/1.2",
        b"GET / HTTP/0.9",
        b"GET / http/1.1",
        b"GET / HTTP/1.1x",
        b"GET / HTTP/11",
        b"GET /\x7f HTTP/1.1",
        b"GET /\xff HTTP/1.1",
        b"GET /a\rb HTTP/1.1",
        b"GET / HTTP/1.1\r",
    ],
)
def test_malformed_request_line_is_400(line):
    p = HttpProtocol()
    assert p.feed(line + b"\r\nHost: a\r\n\r\n" + WRK) == (BAD, 1)
    assert p.closing
    assert p.feed(WRK) == (b"", 0)


@pytest.mark.parametrize("target", [b"example.com:80", b"*", b"x/y"])
def test_get_with_non_origin_non_absolute_target_is_400(target):
    assert one(get(target)) == (BAD, 1, True)


def test_unusual_target_for_other_methods_is_405():
    assert one(get(b"*", method=b"OPTIONS")) == (NOT_ALLOWED, 1, False)
    assert one(get(b"example.com:443", method=b"CONNECT")) == (NOT_ALLOWED, 1, False)


# ---------------------------------------------------------------- 400: header lines


@pytest.mark.parametrize(
    "header_lines",
    [
        b"Host: a\r\nNoColonHere",
        b"Host: a\r\nX-A : b",  # whitespace before the colon
        b"Host: a\r\nX-A\t: b",
        b"Host: a\r\n: b",  # empty field name
        b"Host: a\r\nX(A): b",  # invalid name character
        b"Host: a\r\nX-\xe9: b",
        b"Host: a\r\nX-A: b\r\n c",  # obs-fold
        b"Host: a\r\nX-A: b\r\n\tc",
        b" Host: a",  # obs-fold as first line
        b"Host: a\r\nX-A: b\nX-B: c",  # bare LF
        b"Host: a\r\nX-A: b\rX-B: c",  # bare CR
        b"Host: a\r\nX-A: b\x00c",  # NUL / control character in value
        b"Host: a\r\nX-A: b\x1bc",
        b"Host: a\r\nX-A: b\x7fc",
    ],
)
def test_malformed_header_line_is_400(header_lines):
    assert one(b"GET / HTTP/1.1\r\n" + header_lines + b"\r\n\r\n" + WRK) == (BAD, 1, True)


def test_valid_header_edge_cases_accepted():
    assert one(get(b"/", b"X-Empty:", b"X-Ows: \t v a l \t", b"X-Obs: caf\xe9",
                   b"!#$%&'*+-.^_`|~09azAZ: ok")) == (OK, 1, False)


@pytest.mark.parametrize("data", [b"\n", b"\n\n", b"GET / HTTP/1.1\n",
                                  b"GET / HTTP/1.1\r\nHost: a\n",
                                  b"GET / HTTP/1.1\r\nHost: a\r\n\n", b"\r\n\n"])
def test_bare_lf_detected_in_incomplete_buffer(data):
    assert one(data) == (BAD, 1, True)


def test_bare_lf_detected_when_buffered_across_feeds():
    p = HttpProtocol()
    assert p.feed(b"GET / HTTP/1.1") == (b"", 0)
    assert p.feed(b"\nHost") == (BAD, 1)
    assert p.closing


def test_incomplete_without_problem_waits():
    for part in (b"G", b"GET / HTTP/1.1", b"GET / HTTP/1.1\r", b"GET / HTTP/1.1\r\nHost: a\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\n\r"):
        p = HttpProtocol()
        assert p.feed(part) == (b"", 0)
        assert not p.closing


def test_leading_empty_lines_ignored():
    assert one(b"\r\n\r\n\r\n" + WRK) == (OK, 1, False)
    p = HttpProtocol()
    assert p.feed(b"\r") == (b"", 0)
    assert p.feed(b"\n\r\n") == (b"", 0)
    assert p.feed(WRK) == (OK, 1)


# ---------------------------------------------------------------- Host


@pytest.mark.parametrize(
    "request_bytes, expected",
    [
        (get(host=False), BAD),
        (get(b"/", b"X-A: b", host=False), BAD),
        (get(b"/", b"Host: other"), BAD),  # two Host fields
        (get(b"/", b"Host: other", version=b"HTTP/1.0"), BAD),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", BAD),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", BAD),
        (b"GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n", BAD),
        (get(method=b"HEAD", host=False), response(b"400 Bad Request", b"Bad Request",
                                                   conn=b"close", head=True)),
        (b"GET / HTTP/1.1\r\nhOsT: a\r\n\r\n", OK),
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", OK),  # empty Host is allowed
        (b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", OK),
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", OK),
        (get(version=b"HTTP/1.0", host=False), OK_CLOSE),
    ],
)
def test_host_rules(request_bytes, expected):
    assert one(request_bytes)[:2] == (expected, 1)


# ---------------------------------------------------------------- Content-Length / TE


@pytest.mark.parametrize("value", [b"abc", b"-1", b"+5", b"1 2", b"", b"0x10", b"5,",
                                   b"1.0", b"\xd9\xa3", b"5, 6"])
def test_invalid_content_length_is_400(value):
    assert one(get(b"/", b"Content-Length: " + value) + b"x" * 10) == (BAD, 1, True)


def test_conflicting_duplicate_content_length_is_400():
    data = get(b"/", b"Content-Length: 3", b"Content-Length: 4") + b"abcd"
    assert one(data) == (BAD, 1, True)


@pytest.mark.parametrize("headers", [(b"Content-Length: 3", b"Content-Length: 3"),
                                     (b"Content-Length: 3, 3",),
                                     (b"Content-Length: 003",),
                                     (b"content-length:3 ",)])
def test_identical_content_lengths_accepted_and_body_skipped(headers):
    assert one(get(b"/", *headers) + b"abc" + WRK) == (OK + OK, 2, False)


@pytest.mark.parametrize("value", [b"chunked", b"identity", b"gzip, chunked", b""])
def test_transfer_encoding_is_501(value):
    assert one(get(b"/", b"Transfer-Encoding: " + value) + WRK) == (NOT_IMPL, 1, True)


def test_transfer_encoding_with_content_length_is_501():
    data = get(b"/", b"Content-Length: 3", b"Transfer-Encoding: chunked", method=b"POST")
    assert one(data + b"0\r\n\r\n") == (NOT_IMPL, 1, True)


def test_transfer_encoding_on_head_answers_without_body():
    expected = response(b"501 Not Implemented", b"Not Implemented", conn=b"close", head=True)
    assert one(get(b"/", b"Transfer-Encoding: chunked", method=b"HEAD")) == (expected, 1, True)


def test_body_larger_than_limit_is_413():
    p = HttpProtocol(max_body_bytes=100)
    assert p.feed(get(b"/", b"Content-Length: 101", method=b"POST") + b"a" * 101) == (TOO_LARGE, 1)
    assert p.closing
    assert one(get(b"/", b"Content-Length: 99999999999999999999999999999999999")
               ) == (TOO_LARGE, 1, True)
    # exactly at the limit is fine
    assert one(get(b"/", b"Content-Length: 100", method=b"POST") + b"a" * 100,
               max_body_bytes=100) == (NOT_ALLOWED, 1, False)


def test_zero_content_length():
    assert one(get(b"/", b"Content-Length: 0") + WRK) == (OK + OK, 2, False)


# ---------------------------------------------------------------- 405 / 404


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS",
                                    b"get", b"Head", b"BREW"])
def test_other_methods_are_405_and_keep_alive(method):
    p = HttpProtocol()
    assert p.feed(get(b"/", method=method) + WRK) == (NOT_ALLOWED + OK, 2)
    assert not p.closing
    assert NOT_ALLOWED.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nAllow: GET, HEAD\r\n" in NOT_ALLOWED


def test_405_body_skipped_across_many_feeds():
    p = HttpProtocol()
    body = b"GET / HTTP/1.1\r\n\r\n" * 50  # looks like requests, but is a body
    head = get(b"/", b"Content-Length: %d" % len(body), method=b"POST")
    assert p.feed(head + body[:10]) == (b"", 0)
    for i in range(10, len(body) - 5, 100):
        assert p.feed(body[i:min(i + 100, len(body) - 5)]) == (b"", 0)
    assert p.feed(body[-5:] + WRK[:20]) == (NOT_ALLOWED, 1)
    assert p.feed(WRK[20:]) == (OK, 1)
    assert not p.closing


def test_405_with_body_and_connection_close():
    data = get(b"/", b"Content-Length: 3", b"Connection: close", method=b"POST")
    p = HttpProtocol()
    assert p.feed(data + b"ab") == (b"", 0)
    assert p.feed(b"c" + WRK) == (response(b"405 Method Not Allowed", b"Method Not Allowed",
                                          extra=b"Allow: GET, HEAD\r\n", conn=b"close"), 1)
    assert p.closing


def test_body_on_get_is_skipped():
    p = HttpProtocol()
    assert p.feed(get(b"/", b"Content-Length: 5") + b"ab") == (b"", 0)
    assert p.feed(b"cde") == (OK, 1)
    assert p.feed(WRK) == (OK, 1)


@pytest.mark.parametrize("target", [b"/nope", b"/plaintext/", b"/Plaintext", b"//",
                                    b"/plaintext%20", b"http://example.com/x"])
def test_unknown_path_is_404_and_keep_alive(target):
    assert one(get(target) + WRK) == (NOT_FOUND + OK, 2, False)


def test_head_unknown_path():
    assert one(get(b"/nope", method=b"HEAD")) == (
        response(b"404 Not Found", b"Not Found", head=True), 1, False)


# ---------------------------------------------------------------- size limits


def test_header_section_limit_boundary():
    req = get(b"/", b"X: " + b"a" * 100)
    limit = len(req)
    assert one(req, max_header_bytes=limit) == (OK, 1, False)
    assert one(req, max_header_bytes=limit - 1) == (HDR_TOO_LARGE, 1, True)


def test_incomplete_header_section_over_limit_is_431():
    p = HttpProtocol(max_header_bytes=64)
    assert p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ") == (b"", 0)
    assert p.feed(b"b" * 30) == (b"", 0)  # 57 bytes so far
    assert p.feed(b"b" * 8) == (HDR_TOO_LARGE, 1)  # 65 > 64, still incomplete
    assert p.closing


def test_request_line_alone_over_limit_is_414():
    p = HttpProtocol(max_header_bytes=64)
    assert p.feed(b"GET /" + b"a" * 59) == (b"", 0)  # exactly 64: wait
    assert p.feed(b"a") == (URI_TOO_LONG, 1)
    assert p.closing


def test_default_limits():
    assert one(b"GET /" + b"a" * 8200) == (URI_TOO_LONG, 1, True)
    assert one(get(b"/", b"X: " + b"a" * 8200)) == (HDR_TOO_LARGE, 1, True)
    assert one(get(b"/", b"X: " + b"a" * 8000)) == (OK, 1, False)


def test_complete_request_with_long_request_line_is_414_like_its_prefix():
    data = get(b"/" + b"a" * 100)
    assert one(data, max_header_bytes=64) == (URI_TOO_LONG, 1, True)
    assert one(data[:70], max_header_bytes=64) == (URI_TOO_LONG, 1, True)


def test_slow_header_trickle_is_bounded():
    p = HttpProtocol(max_header_bytes=8192)
    p.feed(b"GET / HTTP/1.1\r\nX: ")
    for _ in range(8192):
        out, n = p.feed(b"a")
        if n:
            break
    assert (out, n) == (HDR_TOO_LARGE, 1)


# ---------------------------------------------------------------- eof


def test_eof_with_partial_request_answers_nothing():
    p = HttpProtocol()
    assert p.feed(WRK + WRK[:12]) == (OK, 1)
    assert p.eof() == b""
    assert p.closing


def test_eof_mid_body_answers_nothing():
    p = HttpProtocol()
    assert p.feed(get(b"/", b"Content-Length: 9", method=b"POST") + b"abc") == (b"", 0)
    assert p.eof() == b""
    assert p.closing


def test_eof_when_idle():
    p = HttpProtocol()
    assert p.feed(WRK) == (OK, 1)
    assert p.eof() == b""
    assert p.closing


def test_empty_feed_is_harmless():
    p = HttpProtocol()
    assert p.feed(b"") == (b"", 0)
    assert p.feed(WRK[:5]) == (b"", 0)
    assert p.feed(b"") == (b"", 0)
    assert p.feed(WRK[5:]) == (OK, 1)


def test_parse_cache_gives_same_answers_cold_and_warm():
    http_mod._CACHE.clear()
    cold = feed_all(HttpProtocol(), [FIXED_STREAM])
    warm = feed_all(HttpProtocol(), [FIXED_STREAM])
    assert cold == warm == (FIXED_EXPECTED, 7)
    assert len(http_mod._CACHE) <= http_mod._CACHE_MAX_ENTRIES


# -- GET /bytes/N: a response of a chosen size (payload-size experiments) ------------------

def bytes_response(n: int, *, head: bool = False, conn: bytes | None = None) -> bytes:
    """Restated from the docstring: the 64-byte pattern repeated, N bytes."""
    pattern = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/"
    out = (b"HTTP/1.1 200 OK\r\nServer: parallelnet\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Length: " + str(n).encode() + b"\r\nDate: " + DATE + b"\r\n")
    if conn is not None:
        out += b"Connection: " + conn + b"\r\n"
    body = (pattern * (n // 64 + 1))[:n]
    return out + b"\r\n" + (b"" if head else body)


def bytes_get(path: bytes, method: bytes = b"GET", extra: bytes = b"") -> bytes:
    return method + b" " + path + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n"


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, 65536, 16 * 1024 * 1024])
def test_bytes_route_answers_exactly_n_bytes(n):
    out, k = answer_all(HttpProtocol(), bytes_get(b"/bytes/" + str(n).encode()))
    assert k == 1 and out == bytes_response(n)


@pytest.mark.parametrize("path", [b"/bytes/16777217", b"/bytes/", b"/bytes/abc", b"/bytes/-1",
                                  b"/bytes/+5", b"/bytes/123456789", b"/bytes/1x", b"/bytes",
                                  b"/bytes/5/"])
def test_bytes_route_out_of_range_or_malformed_is_404(path):
    p = HttpProtocol()
    out, k = p.feed(bytes_get(path))
    assert k == 1 and out == response(b"404 Not Found", b"Not Found") and not p.closing


def test_bytes_route_head_query_and_leading_zeros():
    p = HttpProtocol()
    out, _ = p.feed(bytes_get(b"/bytes/10", b"HEAD"))
    assert out == bytes_response(10, head=True)
    assert p.feed(bytes_get(b"/bytes/0007?x=1"))[0] == bytes_response(7)


def test_bytes_route_keepalive_pipelined_and_close():
    stream = (bytes_get(b"/bytes/100") + bytes_get(b"/") + bytes_get(b"/bytes/3", extra=b"Connection: close\r\n")
              + bytes_get(b"/bytes/5"))
    p = HttpProtocol()
    out, k = p.feed(stream)
    assert k == 3 and p.closing
    assert out == bytes_response(100) + OK + bytes_response(3, conn=b"close")
    # Split at every byte: the same answers.
    p, got = HttpProtocol(), b""
    for i in range(len(stream)):
        got += bytes(p.feed(stream[i:i + 1])[0])
    assert got == out


# -- bounded output: what one read may make the protocol produce (issue: 2.5 KB -> 2 GB) ---

BIG = b"/bytes/16777216"
HEADER_MAX = 256   # an answer's status line and headers are shorter than this


def pull_all(p: HttpProtocol, first) -> tuple[bytes, list[int]]:
    """Everything a backend would send, pulling as it must; the size of each call's output."""
    parts, sizes = [bytes(first)], [len(first)]
    while p.more:
        assert not p.closing, "closing and more are never both true"
        out, _ = p.pull()
        parts.append(bytes(out))
        sizes.append(len(out))
    return b"".join(parts), sizes


@pytest.mark.parametrize("budget", [1, 1000, 65536, 1 << 19])
def test_pipelined_huge_answers_are_produced_within_the_budget(budget):
    stream = bytes_get(BIG) * 64          # 2,496 bytes asking for 1 GiB
    p = HttpProtocol(output_budget=budget)
    out, n = p.feed(stream)
    assert n == 1 and len(out) < HEADER_MAX and p.more and not p.partial
    sizes = [len(out)]
    got = 0
    while p.more and got < 40 << 20 and len(sizes) < 500:   # enough: the bound holds call after call
        piece, k = p.pull()
        sizes.append(len(piece))
        n += k
        got += len(piece)
    assert max(sizes) <= budget + HEADER_MAX and p.more


def test_pipelined_huge_answers_are_complete_and_in_order():
    stream = bytes_get(b"/bytes/3000000") * 3 + bytes_get(b"/") + bytes_get(b"/bytes/70000")
    p = HttpProtocol(output_budget=100_000)
    first, n = p.feed(stream)
    whole, sizes = pull_all(p, first)
    assert whole == bytes_response(3000000) * 3 + OK + bytes_response(70000)
    assert max(sizes) <= 100_000 + HEADER_MAX and not p.more


def test_budget_holds_small_pipelined_answers_too():
    stream = WRK * 1000                   # 1000 answers of about 130 bytes
    p = HttpProtocol(output_budget=4096)
    first, n = p.feed(stream)
    assert len(first) <= 4096 + len(OK) and p.more
    whole, sizes = pull_all(p, first)
    assert whole == OK * 1000 and max(sizes) <= 4096 + len(OK)


def test_feed_while_answers_are_held_queues_behind_them():
    p = HttpProtocol(output_budget=1000)
    first, _ = p.feed(bytes_get(b"/bytes/5000") + bytes_get(b"/"))
    assert p.more
    second, _ = p.feed(bytes_get(b"/bytes/7"))   # a completion backend's late data
    whole, _ = pull_all(p, first + bytes(second))
    assert whole == bytes_response(5000) + OK + bytes_response(7)


def test_eof_while_answers_are_held_answers_them_then_closes():
    p = HttpProtocol(output_budget=1000)
    first, _ = p.feed(bytes_get(b"/bytes/5000") + bytes_get(b"/") + b"GET /partial")
    assert p.eof() == b"" and p.more and not p.closing
    whole, _ = pull_all(p, first)
    assert whole == bytes_response(5000) + OK   # the incomplete request is dropped
    assert p.closing and not p.more


def test_streamed_answer_with_connection_close_closes_after_its_body():
    p = HttpProtocol(output_budget=1000)
    first, _ = p.feed(bytes_get(b"/bytes/5000", extra=b"Connection: close\r\n") + WRK)
    assert not p.closing and p.more
    whole, _ = pull_all(p, first)
    assert whole == bytes_response(5000, conn=b"close") and p.closing


def test_streamed_answer_after_a_discarded_body():
    p = HttpProtocol(output_budget=1000)
    req = b"GET /bytes/4000 HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n"
    out, n = p.feed(req + b"01234")
    assert (out, n) == (b"", 0) and p.partial
    out, n = p.feed(b"56789" + WRK)
    assert n == 1 and p.more
    whole, _ = pull_all(p, out)
    assert whole == bytes_response(4000) + OK


def test_body_pieces_are_views_of_one_shared_block():
    p = HttpProtocol(output_budget=1 << 20)
    p.feed(bytes_get(b"/bytes/3000000"))
    piece, _ = p.pull()
    assert isinstance(piece, memoryview) and len(piece) == 1 << 20
    assert piece.obj is http_mod._BLOCK.obj   # no copy, no allocation per answer


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([b"/", b"/bytes/0", b"/bytes/100", b"/bytes/20000", b"/x",
                                 b"/bytes/70000"]), min_size=1, max_size=8),
       st.integers(1, 50_000), st.lists(st.integers(0, 200_000), max_size=6))
def test_budget_and_splits_never_change_the_bytes(paths, budget, cuts):
    stream = b"".join(bytes_get(x) for x in paths)
    expected, n_expected = answer_all(HttpProtocol(), stream)
    p = HttpProtocol(output_budget=budget)
    got, n = [], 0
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for a, b in zip(bounds, bounds[1:]):
        out, k = p.feed(stream[a:b])
        got.append(bytes(out))
        n += k
        while p.more and len(b"".join(got)) % 3:   # pull some now, some later
            out, k = p.pull()
            got.append(bytes(out))
            n += k
    while p.more:
        out, k = p.pull()
        got.append(bytes(out))
        n += k
    assert b"".join(got) == expected and n == n_expected


# -- GET /work/US: a service time the handler burns in its own thread's CPU time ----------

@pytest.mark.parametrize("target", [b"/work/1", b"/work/00000300", b"/work/0", b"/work/5?q=1",
                                    b"http://h/work/2"])
def test_work_route_answers_as_get_root(target):
    p = HttpProtocol()
    assert p.feed(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n") == (OK, 1)
    assert p.feed(b"HEAD " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n") == (OK_HEAD, 1)


@pytest.mark.parametrize("target", [b"/work/", b"/work/123456789", b"/work/-1", b"/work/1x",
                                    b"/work/1/", b"/workx/1"])
def test_work_route_malformed_is_404(target):
    assert HttpProtocol().feed(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n") == (NOT_FOUND, 1)


def test_work_route_burns_thread_cpu_time():
    """The floor is exact (the spin ends only once the thread clock has advanced by US);
    no upper bound here: this process may be preempted, which costs wall time, not CPU."""
    import time as _t
    p = HttpProtocol()
    t0 = _t.thread_time_ns()
    p.feed(b"GET /work/20000 HTTP/1.1\r\nHost: t\r\n\r\n" * 2)
    assert _t.thread_time_ns() - t0 >= 2 * 20_000_000
