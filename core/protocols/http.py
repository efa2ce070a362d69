"""HTTP/1.1 plaintext (TechEmpower style) as a sans-I/O protocol.

``GET /`` and ``GET /plaintext`` answer ``200 OK`` with the 13-byte body
``Hello, World!`` and the headers ``Server``, ``Content-Type: text/plain``,
``Content-Length: 13`` and ``Date`` (IMF-fixdate, rebuilt at most once per second).
``HEAD`` gets the same headers and no body.  Responses are always ``HTTP/1.1``.

``GET /bytes/N`` (for payload-size experiments) answers ``200 OK`` with
``Content-Type: application/octet-stream`` and a body of exactly N bytes, the 64-byte
``BYTES_PATTERN`` repeated (so order is checkable byte for byte).  N is 1 to 8 ASCII
digits with a value of at most ``BYTES_MAX`` (16 MiB); anything else under ``/bytes/``
(no digits, a sign, more digits, a larger value) is ``404 Not Found`` like any unknown
path: there is no such resource.  ``HEAD`` gets the headers (Content-Length N) only.

``GET /work/US`` (for server-bound experiments) burns US microseconds of the worker
thread's own CPU time (``CLOCK_THREAD_CPUTIME_ID``: a preempted worker still owes its
work; time spent waiting for the CPU or, in Python, for the GIL is not work) and then
answers exactly as ``GET /``.  US is 1 to 8 ASCII digits (``/work/0`` is ``GET /``);
anything else under ``/work/`` is 404.  ``HEAD`` does the work too and gets the headers.
The Python protocol spins in Python, holding the GIL (the honest cost of a Python
handler); the C protocol (backends/proto_core.h) spins in C.  Pipelined work requests in
one read are done one after the other, as any event loop would: a worker is busy with its
own connections.

Rules of RFC 9112 (and RFC 9110 where it defines the semantics) applied here:

* Message framing (9112 §2.1-2.2): every line of the header section ends in CRLF and the
  section ends with an empty line.  A bare LF anywhere in the header section is
  rejected (400), and is detected as soon as it arrives, even while the section is still
  incomplete, so a client sending ``\\n\\n`` is answered instead of left waiting.  A
  bare CR is rejected too (400).  Empty lines (CRLF) before a request line are ignored
  (§2.2 "SHOULD ignore at least one empty line").
* Request line (§3): exactly ``method SP request-target SP HTTP-version``: method is a
  token (case-sensitive), the target is non-empty visible ASCII, the version is
  ``HTTP/1.0`` or ``HTTP/1.1`` (anything else, including other versions, is 400).
  GET and HEAD accept the origin form and the absolute form (§3.2.1-3.2.2); any other
  target form for them is 400.  The query string is ignored for routing.
* Header fields (§5): ``field-name ":" OWS field-value OWS`` with a token field name;
  no whitespace between name and colon (§5.1: 400), no obs-fold continuation lines
  (§5.2: 400), no control characters in values.
* Host (§3.2): an HTTP/1.1 request without exactly one valid Host field is 400; more
  than one Host field is 400 for any version.
* Body framing (§6): any Transfer-Encoding is answered 501 (not implemented), which
  also settles a Transfer-Encoding + Content-Length conflict (§6.1).  Content-Length
  must be 1*DIGIT; several values (repeated fields or a comma list) are accepted only
  when all identical, else 400 (§6.3).  A body announced by Content-Length is read
  and discarded (also on GET/HEAD), even across many chunks, so pipelining survives.
* Persistence (§9.3): HTTP/1.1 keeps the connection unless the Connection field holds
  the ``close`` token (comma-separated, case-insensitive tokens); HTTP/1.0 closes unless
  it holds ``keep-alive``, which is then echoed.  A ``close`` answer carries
  ``Connection: close`` and sets ``closing``.
* Pipelining (§9.3.2): several requests in one chunk are answered in order in one
  output; a request split at any byte is handled identically; ``n`` counts the
  responses produced by the chunk.

Limits and error answers (all errors carry a short text body, ``Connection: close``,
then ``closing`` is set and any later bytes are ignored; for HEAD requests the body is
omitted when the method could be parsed):

* ``max_header_bytes`` (default 8192) bounds the header section (request line, header
  lines and the final empty line).  Exceeding it, complete or still arriving: 431;
  414 when no CRLF has been seen within the limit (the request line alone is too long).
* ``max_body_bytes`` (default 1 MiB): a larger Content-Length is 413 (not read).
* Other methods than GET/HEAD: 405 with ``Allow: GET, HEAD``; unknown path: 404; both
  keep the connection.

``eof()`` with a partially received request answers nothing.

Speed: the common case (an empty buffer receiving whole requests) parses straight from
the received ``bytes`` and copies nothing but the small header-block slice.  Parsed
header blocks are memoised in a small bounded module-level table (results depend only
on the bytes, never on the limits, which are checked outside it), so a benchmark
client repeating one request costs a dict lookup per request.  Responses are
precomputed whole, Date line included, once per second.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate

from .base import Protocol

__all__ = ["HttpProtocol"]

_time = time.time  # module-level clock: tests may monkeypatch it

# ---------------------------------------------------------------- response table

# (status line, extra header lines, body); index = spec number below.
_SPECS = (
    (b"200 OK", b"", b"Hello, World!"),
    (b"404 Not Found", b"", b"Not Found"),
    (b"405 Method Not Allowed", b"Allow: GET, HEAD\r\n", b"Method Not Allowed"),
    (b"400 Bad Request", b"", b"Bad Request"),
    (b"413 Content Too Large", b"", b"Content Too Large"),
    (b"414 URI Too Long", b"", b"URI Too Long"),
    (b"431 Request Header Fields Too Large", b"", b"Request Header Fields Too Large"),
    (b"501 Not Implemented", b"", b"Not Implemented"),
)
_S200, _S404, _S405, _S400, _S413, _S414, _S431, _S501 = range(len(_SPECS))

# Connection modes: HTTP/1.1 keep-alive (no header), close, HTTP/1.0 keep-alive.
_KEEP, _CLOSE, _KEEP10 = 0, 1, 2
_CONN_LINES = (b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n")


def _idx(spec: int, head: int, conn: int) -> int:
    return (spec * 2 + head) * 3 + conn


_FIRST_ERROR = _idx(_S400, 0, 0)  # table indexes from here on are error answers


def _error(spec: int, head: int = 0) -> tuple[int, int, bool, int, int, int]:
    """A parse result for an error answer (always closes)."""
    return (_idx(spec, head, _CLOSE), 0, True, head, -1, 0)


_R400 = _error(_S400)
_E400 = _R400[0]
_E414 = _idx(_S414, 0, _CLOSE)
_E431 = _idx(_S431, 0, _CLOSE)
_E413 = (_idx(_S413, 0, _CLOSE), _idx(_S413, 1, _CLOSE))


def _build_table(date_line: bytes) -> list[bytes]:
    table = []
    for status, extra, body in _SPECS:
        head = (
            b"HTTP/1.1 " + status + b"\r\nServer: parallelnet\r\n" + extra
            + b"Content-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + date_line
        )
        for with_body in (body, b""):
            for conn in _CONN_LINES:
                table.append(head + conn + b"\r\n" + with_body)
    return table


_TABLE_SEC = -1
_TABLE: list[bytes] = []
_DATE_LINE = b""


def _refresh(now: int) -> list[bytes]:
    """Rebuild every response for the wall-clock second ``now``."""
    global _TABLE, _TABLE_SEC, _DATE_LINE
    _DATE_LINE = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    table = _build_table(_DATE_LINE)
    _TABLE = table  # table first: a racing reader at worst sees a 1 s old Date
    _TABLE_SEC = now
    return table


# ---------------------------------------------------------------- parsing

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(_TCHAR + rb"+ [\x21-\x7e]+ HTTP/1\.[01]")
# Header lines joined by CRLF: token, colon, then SP/HTAB/VCHAR/obs-text only.
# Character classes are disjoint at every step, so matching is linear.
_FIELD = _TCHAR + rb"+:[\t\x20-\x7e\x80-\xff]*"
_HEADER_LINES = re.compile(rb"(?:" + _FIELD + rb"\r\n)*" + _FIELD)
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*([^?#]*)(?:\?[^#]*)?")
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.vV\-_~!$&'()*+,;=]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?"
)
_ROUTES = frozenset((b"/", b"/plaintext"))
_BYTES_ROUTE = re.compile(rb"/bytes/([0-9]{1,8})")
_WORK_ROUTE = re.compile(rb"/work/([0-9]{1,8})")
BYTES_MAX = 16 * 1024 * 1024
BYTES_PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/"
_OWS = b" \t"

_CACHE: dict[bytes, tuple[int, int, bool, int, int, int]] = {}
_CACHE_MAX_ENTRIES = 256
_CACHE_MAX_KEY = 512


# ---------------------------------------------------------------- /bytes/N bodies

#: A body piece produced by one call is at most this long: a view of ``_BLOCK``.
PIECE_MAX = 1 << 20
#: A body up to this size (and within the call's budget) is copied into its answer;
#: a larger one is streamed as views of ``_BLOCK`` by ``pull`` (no copy, no allocation).
#: Copying 256 KiB costs a few µs; streaming costs a hold and a pull (on io_uring a
#: cancelled and re-armed receive), so only bodies past this are streamed.
INLINE_MAX = 256 * 1024
#: The default ``output_budget`` (half the default ``--max-output``).
OUTPUT_BUDGET = 512 * 1024
_BLOCK = memoryview(b"")   # BYTES_PATTERN repeated to PIECE_MAX + 64 bytes, built at first use


def _body_piece(offset: int, size: int) -> memoryview:
    """Bytes ``[offset, offset + size)`` of any /bytes body (``size <= PIECE_MAX``): the
    body is BYTES_PATTERN repeated, so every piece is a slice of one shared block."""
    global _BLOCK
    block = _BLOCK
    if not block:   # two threads may both build it: equal bytes, either copy is right
        block = _BLOCK = memoryview(BYTES_PATTERN * (PIECE_MAX // len(BYTES_PATTERN) + 1))
    start = offset % len(BYTES_PATTERN)
    return block[start:start + size]


def _bytes_head(nbytes: int, idx: int) -> bytes:
    """The status line and headers of the answer to GET/HEAD /bytes/N (``idx``: the 200
    entry, for its connection mode)."""
    return (b"HTTP/1.1 200 OK\r\nServer: parallelnet\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: " + str(nbytes).encode() + b"\r\n" + _DATE_LINE + _CONN_LINES[idx % 3]
            + b"\r\n")


def _spin(us: int, clock=time.thread_time_ns) -> None:
    """GET /work/US: burn ``us`` microseconds of this thread's CPU time."""
    end = clock() + us * 1000
    while clock() < end:
        pass


def _parse(block: bytes) -> tuple[int, int, bool, int, int, int]:
    """Parse one header section (without its final CRLFCRLF, no leading CRLF).

    Returns ``(table index, content length, close after answering, is HEAD, N, US)``,
    N >= 0 for GET/HEAD /bytes/N (answered by ``_start_bytes``), else -1; US > 0 for
    GET/HEAD /work/US (the CPU time to burn before the table answer), else 0.  The
    result depends only on ``block`` (limits are checked by the caller), so it can be
    memoised.  Syntax errors come first, so any bare LF/CR yields the plain 400.
    """
    le = block.find(b"\r\n")
    if le < 0:
        line, fields = block, b""
    else:
        line, fields = block[:le], block[le + 2:]
        if _HEADER_LINES.fullmatch(fields) is None:
            return _R400
    if _REQUEST_LINE.fullmatch(line) is None:
        return _R400
    method, target, version = line.split(b" ")
    head = 1 if method == b"HEAD" else 0
    http11 = version == b"HTTP/1.1"

    hosts = 0
    host = b""
    lengths: list[bytes] = []
    tokens: set[bytes] = set()
    chunked = False
    if fields:
        for field in fields.split(b"\r\n"):
            name, _, value = field.partition(b":")
            name = name.lower()
            if name == b"host":
                hosts += 1
                host = value.strip(_OWS)
            elif name == b"connection":
                tokens.update(t.strip(_OWS).lower() for t in value.split(b","))
            elif name == b"content-length":
                lengths.extend(value.split(b","))
            elif name == b"transfer-encoding":
                chunked = True

    if hosts > 1 or (http11 and hosts == 0) or _HOST.fullmatch(host) is None:
        return _error(_S400, head)
    if chunked:
        return _error(_S501, head)
    clen = 0
    if lengths:
        values = {v.strip(_OWS) for v in lengths}
        if len(values) != 1:
            return _error(_S400, head)
        digits = values.pop()
        if not digits.isdigit():  # bytes.isdigit: ASCII digits only, False if empty
            return _error(_S400, head)
        digits = digits.lstrip(b"0")
        # Saturated at 2^62 ("too large for any limit"), exactly as the C parser does; a
        # huge value needs no exact int (and could hit int's digit limit).
        clen = 0 if not digits else min(int(digits), 1 << 62) if len(digits) <= 19 else 1 << 62

    if b"close" in tokens:
        conn = _CLOSE
    elif http11:
        conn = _KEEP
    else:
        conn = _KEEP10 if b"keep-alive" in tokens else _CLOSE

    nbytes = -1
    work = 0
    if method != b"GET" and not head:
        spec = _S405
    else:
        if target[0] == 0x2F:  # "/": origin form
            path = target.partition(b"?")[0]
        else:
            m = _ABSOLUTE_FORM.fullmatch(target)
            if m is None:
                return _error(_S400, head)
            path = m.group(1) or b"/"
        if path in _ROUTES:
            spec = _S200
        elif path.startswith(b"/work/"):
            m = _WORK_ROUTE.fullmatch(path)
            spec = _S200 if m is not None else _S404
            work = int(m.group(1)) if m is not None else 0
        else:
            m = _BYTES_ROUTE.fullmatch(path)
            if m is not None and int(m.group(1)) <= BYTES_MAX:
                nbytes = int(m.group(1))
            spec = _S200 if nbytes >= 0 else _S404
    return (_idx(spec, head, conn), clen, conn == _CLOSE, head, nbytes, work)


# ---------------------------------------------------------------- protocol


class HttpProtocol(Protocol):
    """HTTP/1.1 plaintext server side of one connection (see the module docstring).

    Output is bounded per call (core/protocols/base.py, "Bounded output"): answers stop
    once ``output_budget`` bytes are produced and the rest of the input is held
    (``_held``: ``_buf`` then holds unparsed input, not a partial header section); a
    /bytes body larger than ``INLINE_MAX`` or than what is left of the budget is streamed
    by ``pull`` in pieces of at most ``min(output_budget, PIECE_MAX)`` bytes.
    """

    __slots__ = ("max_header_bytes", "max_body_bytes", "output_budget", "_hlim", "_buf",
                 "_held", "_skip", "_pending", "_body", "_body_sent", "_body_close", "_eof")

    def __init__(self, max_header_bytes: int = 8192, max_body_bytes: int = 1 << 20,
                 output_budget: int = OUTPUT_BUDGET) -> None:
        super().__init__()
        if max_header_bytes < 1:
            raise ValueError(f"max_header_bytes must be >= 1, got {max_header_bytes}")
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {max_body_bytes}")
        if output_budget < 1:
            raise ValueError(f"output_budget must be >= 1, got {output_budget}")
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.output_budget = output_budget
        # A complete block data[pos:end] fits when end + 4 - pos <= max_header_bytes.
        self._hlim = max_header_bytes - 4
        self._buf = bytearray()  # a partial header section, or (_held) unparsed input
        self._held = False       # _buf holds input kept back by the output budget
        self._skip = 0           # body bytes still to discard
        self._pending = None     # parse result answered once the body is discarded
        self._body = 0           # bytes of a /bytes body still to produce (pull)
        self._body_sent = 0      # bytes of it produced so far (the pattern's phase)
        self._body_close = False  # that answer closes the connection once complete
        self._eof = False        # the peer half-closed while answers were held

    def feed(self, data):
        if self._buf or self._skip or self.closing or self._body:
            return self._feed_slow(data)
        if type(data) is not bytes:
            data = bytes(data)
        out: list = []
        n = self._answer_from(data, out, 0, self.output_budget)
        if len(out) == 1:
            return out[0], n
        return b"".join(out), n

    @property
    def more(self) -> bool:
        return self._held or self._body > 0

    def pull(self):
        out: list = []
        room = self.output_budget
        if self._body:
            size = min(self._body, room, PIECE_MAX)
            piece = _body_piece(self._body_sent, size)
            self._body -= size
            self._body_sent += size
            if self._body:
                return piece, 0
            if self._body_close:   # Connection: close - nothing after this answer
                self._stop()
                return piece, 0
            if not self._held or size >= room:
                self._done_if_eof()
                return piece, 0
            out.append(piece)
            room -= size
        n = 0
        if self._held:
            data = bytes(self._buf)
            self._buf.clear()
            self._held = False
            n = self._answer_from(data, out, 0, room)
        self._done_if_eof()
        if len(out) == 1:
            return out[0], n
        return b"".join(out), n

    def _answer_from(self, data: bytes, out: list, n: int, room: int) -> int:
        """Answer the requests in ``data`` (``_buf`` empty) into ``out`` until ``room``
        bytes are spent; keep what is left (held input, a partial request, a body to
        skip or to stream).  Returns ``n`` plus the answers produced."""
        now = int(_time())
        table = _TABLE if now == _TABLE_SEC else _refresh(now)
        cache_get = _CACHE.get
        hlim = self._hlim
        dlen = len(data)
        pos = 0
        while pos < dlen:
            if room <= 0:   # the budget is spent: the rest waits for pull()
                self._hold(data, pos)
                break
            end = data.find(b"\r\n\r\n", pos)
            if end >= 0 and end - pos <= hlim:
                block = data[pos:end]
                r = cache_get(block)
                if r is None:
                    if data.startswith(b"\r\n", pos):  # empty line before a request
                        pos += 2
                        continue
                    r = _parse(block)
                    if r[0] < _FIRST_ERROR and len(block) <= _CACHE_MAX_KEY:
                        if len(_CACHE) >= _CACHE_MAX_ENTRIES:
                            _CACHE.clear()
                        _CACHE[block] = r
                idx, clen, close, head, nbytes, work = r
                pos = end + 4
                if clen:
                    if clen > self.max_body_bytes:
                        out.append(table[_E413[head]])
                        n += 1
                        self.closing = True
                        break
                    if dlen - pos < clen:  # body continues in later chunks
                        self._skip = clen - (dlen - pos)
                        self._pending = r
                        break
                    pos += clen
                n += 1
                if work:
                    _spin(work)
                if nbytes < 0:
                    answer = table[idx]
                    out.append(answer)
                    room -= len(answer)
                else:
                    room = self._start_bytes(nbytes, idx, close, out, room)
                    if self._body:   # streamed by pull(): the rest of the input waits
                        if pos < dlen:
                            self._hold(data, pos)
                        break
                if close:
                    self.closing = True
                    break
                continue
            # Incomplete header section, or one over the limit.
            if data.startswith(b"\r\n", pos):
                pos += 2
                continue
            err = self._partial_error(data, pos)
            if err is None:
                self._buf += memoryview(data)[pos:] if pos else data
            else:
                out.append(table[err])
                n += 1
                self.closing = True
            break
        return n

    def _start_bytes(self, nbytes: int, idx: int, close: bool, out: list, room: int) -> int:
        """Answer GET/HEAD /bytes/N: headers and a small body at once; a large body is
        left to ``pull`` (``_body``).  Returns the room left."""
        head = _bytes_head(nbytes, idx)
        body = 0 if idx // 3 % 2 else nbytes   # HEAD: headers only
        if body <= INLINE_MAX and body <= room - len(head):
            answer = head + _body_piece(0, body) if body else head
            out.append(answer)
            return room - len(answer)
        out.append(head)
        self._body, self._body_sent, self._body_close = body, 0, close
        return room - len(head)

    def _hold(self, data: bytes, pos: int) -> None:
        self._buf += memoryview(data)[pos:]
        self._held = True

    def is_static(self, out) -> bool:
        """Whether ``out`` (a result of feed/pull) is a view of the shared /bytes block,
        which lives as long as the module and never changes: a completion backend may
        send it without a copy."""
        return type(out) is memoryview and out.obj is _BLOCK.obj

    def _stop(self) -> None:
        """Closing: nothing held or buffered is answered any more."""
        self.closing = True
        self._buf.clear()
        self._held = False
        self._skip = 0
        self._pending = None
        self._body = 0

    def _done_if_eof(self) -> None:
        if self._eof and not self.more:
            self._stop()

    def _partial_error(self, data: bytes, pos: int):
        """Error index for the header section starting at ``pos`` that is incomplete or
        too large, or None to wait for more bytes.

        Looks only at the first ``max_header_bytes + 1`` bytes, so the answer is the
        same whatever the chunking: the earliest problem in the byte stream wins.
        """
        limit = self.max_header_bytes
        window = data[pos:pos + limit + 1]
        if window.count(b"\n") != window.count(b"\r\n"):
            return _E400  # bare LF
        if len(data) - pos > limit:
            return _E414 if window.find(b"\r\n") < 0 else _E431
        return None

    def _feed_slow(self, data):
        """Everything but whole requests into an empty state: answers still held, a
        body to discard, a partial header section, or closed."""
        if self.closing:
            return b"", 0
        if self._held or self._body:   # earlier input is still being answered: queue behind it
            self._buf += data
            self._held = True
            return self.pull()
        out: list = []
        n = 0
        room = self.output_budget
        skip = self._skip
        if skip:
            size = len(data)
            if size < skip:
                self._skip = skip - size
                return b"", 0
            self._skip = 0
            r, self._pending = self._pending, None
            now = int(_time())
            table = _TABLE if now == _TABLE_SEC else _refresh(now)
            n = 1
            if r[5]:
                _spin(r[5])
            if r[4] < 0:
                out.append(table[r[0]])
                room -= len(out[0])
            else:
                room = self._start_bytes(r[4], r[0], r[2], out, room)
            if self._body:
                if size > skip:
                    self._hold(bytes(data), skip)
            elif r[2]:
                self.closing = True
            elif size > skip:
                n = self._answer_from(bytes(data[skip:]), out, n, room)
        else:
            buf = self._buf
            old = len(buf)
            buf += data
            # Without a new LF nothing can complete and no bare LF appeared: just wait,
            # unless the size limit is now exceeded.
            if buf.find(b"\n", old) < 0 and len(buf) <= self.max_header_bytes:
                return b"", 0
            data = bytes(buf)
            buf.clear()
            n = self._answer_from(data, out, n, room)
        if len(out) == 1:
            return out[0], n
        return b"".join(out), n

    @property
    def partial(self) -> bool:
        """An incomplete header section or an unread body is being received (the
        header timeout); held input is not: the server is not reading it."""
        return (bool(self._buf) and not self._held) or bool(self._skip)

    def eof(self) -> bytes:
        """Peer finished sending: a partial request is dropped unanswered; answers
        still held are produced first (``closing`` is set once they are)."""
        if self.more:
            self._eof = True
            return b""
        self._stop()
        return b""
