"""A small, honest Python client: many non-blocking connections in one thread.

Used by the demo (``make run``) and by tests.  It is not a load generator for
measurements — that is the C one in ``parallelnet.experiments`` — but it checks
every byte it gets back and reports every error, and every loop in it is bounded
by a request count and a deadline.

Modes:
* ``keepalive``: each connection sends a request, waits for the whole reply, repeats.
* ``short``: connect, one request, whole reply, close, reconnect (accept-heavy).
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from dataclasses import dataclass, field

HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: parallelnet\r\n\r\n"


@dataclass
class ClientResult:
    requests: int = 0
    connects: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0


def _payload(seq: int, size: int) -> bytes:
    """A deterministic payload that differs per request, so a misrouted echo shows."""
    stem = f"{seq:016x}".encode()
    return (stem * (size // len(stem) + 1))[:size]


class _Conn:
    __slots__ = ("sock", "expect", "got", "sent_at", "out", "connected")


def run_clients(host: str, port: int, *, connections: int = 16, mode: str = "keepalive",
                protocol: str = "echo", size: int = 64, duration: float = 2.0,
                max_requests: int = 0, timeout: float = 5.0) -> ClientResult:
    """Drive a server; stops at ``duration`` seconds or ``max_requests``, whichever first."""
    if mode not in ("keepalive", "short"):
        raise ValueError(f"mode must be keepalive or short, not {mode!r}")
    if protocol not in ("echo", "http"):
        raise ValueError(f"protocol must be echo or http, not {protocol!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sel = selectors.DefaultSelector()
    res = ClientResult()
    seq = 0
    start = time.monotonic()
    deadline = start + duration
    hard_deadline = deadline + timeout
    http_reply_tail = b"Hello, World!"

    def budget_left() -> bool:
        return (not max_requests or seq < max_requests) and time.monotonic() < deadline

    def open_conn() -> _Conn | None:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            res.error("connect:" + errno.errorcode.get(err, str(err)))
            s.close()
            return None
        c = _Conn()
        c.sock, c.connected, c.out, c.got, c.expect = s, False, b"", b"", b""
        c.sent_at = 0.0
        sel.register(s, selectors.EVENT_WRITE, c)
        return c

    def next_request(c: _Conn) -> None:
        nonlocal seq
        seq += 1
        if protocol == "echo":
            c.out = _payload(seq, size)
            c.expect = c.out
        else:
            c.out = HTTP_REQUEST
            c.expect = b""
        c.got = b""
        c.sent_at = time.monotonic()
        sel.modify(c.sock, selectors.EVENT_WRITE, c)

    def finish(c: _Conn) -> None:
        sel.unregister(c.sock)
        c.sock.close()

    def complete(c: _Conn) -> bool:
        if protocol == "echo":
            return len(c.got) >= len(c.expect)
        head_end = c.got.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        head = c.got[:head_end].lower()
        i = head.find(b"content-length:")
        length = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
        return len(c.got) >= head_end + 4 + length

    live = 0
    for _ in range(connections):
        if budget_left() and open_conn() is not None:
            live += 1
    while live and time.monotonic() < hard_deadline:
        for key, ev in sel.select(timeout=0.2):
            c: _Conn = key.data
            try:
                if ev & selectors.EVENT_WRITE:
                    if not c.connected:
                        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, errno.errorcode.get(err, str(err)))
                        c.connected = True
                        res.connects += 1
                        if not budget_left():
                            finish(c)
                            live -= 1
                            continue
                        next_request(c)
                    sent = c.sock.send(c.out)
                    c.out = c.out[sent:]
                    if not c.out:
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
                chunk = c.sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError(errno.ECONNRESET, "EOF before the whole reply")
                c.got += chunk
                if not complete(c):
                    continue
                if protocol == "echo" and c.got != c.expect:
                    res.error("mismatch")
                elif protocol == "http" and (not c.got.startswith(b"HTTP/1.1 200")
                                             or not c.got.endswith(http_reply_tail)):
                    res.error("http_status")
                else:
                    res.requests += 1
                    res.latencies.append(time.monotonic() - c.sent_at)
                if mode == "short" or not budget_left():
                    finish(c)
                    live -= 1
                    if mode == "short" and budget_left() and open_conn() is not None:
                        live += 1
                else:
                    next_request(c)
            except (ConnectionError, OSError) as exc:
                res.error(errno.errorcode.get(exc.errno, type(exc).__name__)
                          if exc.errno else type(exc).__name__)
                finish(c)
                live -= 1
                if budget_left() and open_conn() is not None:
                    live += 1
    for key in list(sel.get_map().values()):
        res.error("timeout")
        key.fileobj.close()
    sel.close()
    res.elapsed = time.monotonic() - start
    return res


def read_http_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes, bytes]]:
    """Read up to ``count`` responses framed by Content-Length: (status, head, body) each.

    Stops early at EOF and returns what arrived; the caller decides whether fewer is an error.
    """
    buf = b""
    out: list[tuple[int, bytes, bytes]] = []
    while len(out) < count:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            continue
        head = buf[:end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(buf) < end + 4 + length:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            buf += chunk
        out.append((int(head.split(b" ", 2)[1]), head, buf[end + 4:end + 4 + length]))
        buf = buf[end + 4 + length:]
    return out
