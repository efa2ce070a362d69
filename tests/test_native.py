"""``native`` (C loop) and ``asyncio``/``uvloop`` specifics beyond the conformance suite.

The conformance suite already runs all three (thread, process, reuseport; exclusive for
native).  Here: the C HTTP implementation answers byte for byte what the Python
``HttpProtocol`` answers (Date aside), counters are live while the C loop runs (without
it ever returning to Python: an idle server makes no wakeups), the accept race is
counted (and the kernel fact behind its lost races under EPOLLEXCLUSIVE), other protocols
run in Python through callbacks, and the asyncio backend's listener accounting.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import threading
import time

import pytest

from conftest import recv_exactly, recv_until_eof, require_backend, start_server
from parallelnet.core.client import run_clients
from parallelnet.core.protocols import HttpProtocol
from parallelnet.core.protocols.base import Protocol, answer_all

DATE = re.compile(rb"Date: [^\r]*\r\n")

H = b"Host: t\r\n"
CASES = [
    b"GET / HTTP/1.1\r\n" + H + b"\r\n",
    b"HEAD / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /plaintext?x=1 HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /nope HTTP/1.1\r\n" + H + b"\r\n",
    b"HEAD /nope HTTP/1.1\r\n" + H + b"\r\n",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\nHost: t\n\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Connection: Keep-Alive, close\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"\r\n" * 1 + b"GET / HTTP/1.1\r\n" + H + b"\r\n",
    b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabcGET / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 3, 4\r\n\r\nabc",
    b"GET / HTTP/1.1\r\n" + H + b"Content-Length: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 99999999\r\n\r\n",
    b"HEAD / HTTP/1.1\r\n" + H + b"Content-Length: 99999999\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n",
    b"GET http://example.com/plaintext?q HTTP/1.1\r\n" + H + b"\r\n",
    b"GET http://example.com HTTP/1.1\r\n" + H + b"\r\n",
    b"GET http://example.com/#frag HTTP/1.1\r\n" + H + b"\r\n",
    b"GET * HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : t\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b" folded\r\n\r\n",
    b"GET / HTTP/2.0\r\n" + H + b"\r\n",
    b"get / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"X: \x01\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H,  # incomplete: nothing
    b"GET /bytes/0 HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /bytes/1000 HTTP/1.1\r\n" + H + b"\r\n",
    b"HEAD /bytes/77 HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /bytes/0042?q HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /bytes/16777217 HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /bytes/123456789 HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /bytes/-1 HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /bytes/ HTTP/1.1\r\n" + H + b"\r\n",
    b"GET http://x/bytes/9 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /work/5 HTTP/1.1\r\n" + H + b"\r\n",
    b"HEAD /work/10 HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /work/0 HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /work/00000007?x HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /work/123456789 HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /work/ HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /work/1x HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /work HTTP/1.1\r\n" + H + b"\r\n",
    b"GET http://x/work/3 HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 18446744073709551616\r\n\r\nGET /x HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 1844674407370955161605\r\n\r\n12345GET /x HTTP/1.1\r\n" + H + b"\r\n",
]


def _python_answer(req: bytes) -> bytes:
    p = HttpProtocol()
    out = answer_all(p, req)[0]
    if not p.closing:
        out += p.eof()
    return out


@pytest.fixture(scope="module", params=["native", "native-uring"])
def native_http(tmp_path_factory, request):
    """The two C HTTP servers (epoll and io_uring), one shared proto_core.h."""
    require_backend(request.param)
    srv = start_server(tmp_path_factory.mktemp("nat"), "--backend", request.param, "--workers", "1",
                       "--protocol", "http")
    yield srv
    assert srv.stop()["clean"]


@pytest.mark.parametrize("req", CASES, ids=range(len(CASES)))
def test_c_http_matches_python_http(native_http, req):
    with native_http.connect(timeout=10) as s:
        s.sendall(req)
        s.shutdown(socket.SHUT_WR)
        got = recv_until_eof(s)
    assert DATE.sub(b"", got) == DATE.sub(b"", _python_answer(req))


@pytest.mark.parametrize("step", [1, 7])
def test_c_http_split_at_every_byte(native_http, step):
    req = (b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n\r\nbody"
           b"HEAD /plaintext HTTP/1.1\r\n" + H + b"\r\n")
    with native_http.connect(timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(req), step):
            s.sendall(req[i:i + step])
            time.sleep(0.001)
        s.shutdown(socket.SHUT_WR)
        got = recv_until_eof(s)
    assert DATE.sub(b"", got) == DATE.sub(b"", _python_answer(req))


@pytest.mark.parametrize("backend", ["native", "native-uring", "epoll"])
def test_bytes_route_keepalive_pipelined_byte_exact(backend, tmp_path):
    """GET /bytes/N from the C HTTP code (native, native-uring) and the Python protocol
    (epoll): keep-alive, pipelined, sizes across buffer and chunk boundaries, byte-exact."""
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--workers", "1", "--protocol", "http")
    sizes = [0, 1, 64, 16383, 16384, 100_000, 1 << 20, 4 << 20]
    reqs = b"".join(b"GET /bytes/%d HTTP/1.1\r\n" % n + H + b"\r\n" for n in sizes)
    expected = b"".join(_python_answer_keep(b"GET /bytes/%d HTTP/1.1\r\n" % n + H + b"\r\n")
                        for n in sizes)
    with srv.connect(timeout=20) as s:
        for _ in range(2):   # keep-alive: the same connection twice
            s.sendall(reqs)
            got = recv_exactly(s, len(expected))
            assert DATE.sub(b"", got) == DATE.sub(b"", expected)
    final = srv.stop()
    assert final["totals"]["requests"] == 2 * len(sizes) and final["clean"]


def _python_answer_keep(req: bytes) -> bytes:
    return answer_all(HttpProtocol(), req)[0]


def _interval_records(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip() and json.loads(x)["type"] == "interval"]


def test_native_counters_are_live_and_races_counted(tmp_path):
    require_backend("native")
    srv = start_server(tmp_path, "--backend", "native", "--workers", "2", "--stats-interval", "0.1")
    res = run_clients(*srv.address, connections=20, mode="short", max_requests=200, duration=20)
    assert res.errors == {} and res.requests == 200
    time.sleep(0.3)  # the C loop never returns to Python: snapshots read its counters
    recs = _interval_records(srv.stats_path)
    assert recs and recs[-1]["totals"]["requests"] == 200
    final = srv.stop()
    w = final["workers"]
    assert sum(x["accepted"] for x in w) == res.connects
    assert sum(x["listen_wakeups"] for x in w) >= 1
    assert all(x["cpu_ns"] > 0 for x in w)
    assert all(x["lost_races"] <= x["listen_wakeups"] for x in w)
    assert "slices" not in w[0]["extra"]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_native_idle_server_makes_no_wakeups(tmp_path, mode):
    """No slices, and no timer once no connection is open (the policy's tick runs only
    while something can time out): an idle C loop blocks in epoll_wait, yet the interval
    records (snapshots from other threads) show its counters live, and a stop wakes it
    at once."""
    require_backend("native")
    srv = start_server(tmp_path, "--backend", "native", "--workers", "1", "--mode", mode,
                       "--stats-interval", "0.1")
    with srv.connect() as s:
        s.sendall(b"abc")
        assert recv_exactly(s, 3) == b"abc"
    # Idle from the record that shows the connection closed and a later one with the same
    # wakeups (the close's own wake-ups may land after the record that counted it: a
    # loaded machine delays them, bounded here), then nothing for 0.6 s.
    deadline, first = time.monotonic() + 5, None
    while time.monotonic() < deadline:
        time.sleep(0.25)
        w = _interval_records(srv.stats_path)[-1]["workers"][0]
        if first is not None and w["closed"] == 1 and w["wakeups"] == first["wakeups"]:
            break
        first = w
    assert first["requests"] == 1 and first["closed"] == 1 and first["open"] == 0, first
    time.sleep(0.6)
    last = _interval_records(srv.stats_path)[-1]["workers"][0]
    assert last["wakeups"] == first["wakeups"], (first["wakeups"], last["wakeups"])
    t0 = time.monotonic()
    final = srv.stop()
    assert time.monotonic() - t0 < 3 and final["clean"]
    assert final["workers"][0]["wakeups"] == last["wakeups"] + 1   # the stop eventfd


class LineProtocol(Protocol):
    """A Python protocol that can hold an incomplete request: one request per line."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        super().__init__()
        self.buf = b""

    def feed(self, data):
        self.buf += bytes(data)
        n = self.buf.count(b"\n")
        self.buf = self.buf[self.buf.rfind(b"\n") + 1:]
        return b"ok\n" * n, n

    @property
    def partial(self) -> bool:
        return bool(self.buf)


@pytest.mark.parametrize("backend", ["native", "native-uring"])
def test_c_core_times_a_python_protocols_incomplete_request(backend):
    """The C cores keep the request deadline for a protocol written in Python too: the
    protocol says whether a feed left a request incomplete (native: the callback's
    ``partial``; native-uring runs it in uring's loop, which tells the core), and the core
    cuts a trickle at its deadline (core/policy.py rule request-deadline) while whole lines go on."""
    require_backend(backend)
    from test_uring_defects import InProcess

    from parallelnet.core.backend import Limits

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    limits = Limits(header_timeout=0.4, idle_timeout=30)   # tick: 0.1 s
    with InProcess(backend, listeners=[lsock], protocol=LineProtocol, limits=limits) as w:
        with socket.create_connection(lsock.getsockname()) as whole, \
                socket.create_connection(lsock.getsockname()) as slow:
            slow.settimeout(0.05)
            t0 = time.monotonic()
            closed_after = None
            while time.monotonic() - t0 < 3 and closed_after is None:
                whole.sendall(b"line\n")                 # whole requests: never cut
                assert recv_exactly(whole, 3) == b"ok\n"
                try:
                    slow.sendall(b"x")                   # progress, never a whole line
                    if slow.recv(16) == b"":
                        closed_after = time.monotonic() - t0
                except socket.timeout:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed_after = time.monotonic() - t0
            assert closed_after is not None, "a trickling request was never closed"
            assert 0.35 <= closed_after <= 0.4 + 0.1 + 0.75, closed_after
            whole.sendall(b"still\n")
            assert recv_exactly(whole, 3) == b"ok\n"
        w.stop()
        assert w.error is None, w.error
        assert w.ctx.stats.extra["header_timeouts"] == 1, w.ctx.stats.extra
    lsock.close()


def test_native_runs_python_protocols_through_callbacks(tmp_path):
    """A protocol with no C implementation runs in Python, called from the C loop."""
    require_backend("native")
    env = dict(os.environ, PARALLELNET_TEST_PROTOCOLS="1")
    srv = start_server(tmp_path, "--backend", "native", "--workers", "1", "--protocol", "crashy",
                       env=env)
    with srv.connect() as s:
        s.sendall(b"hello")
        assert recv_exactly(s, 5) == b"hello"
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""
    with srv.connect() as bad:
        bad.sendall(b"CRASH")
        assert recv_until_eof(bad) == b""
    final = srv.stop()
    w = final["workers"][0]
    assert (w["requests"], w["handler_errors"], w["errors"], w["open"]) == (1, 1, 1, 0), w
    assert final["clean"]


def _blocked_in_epoll_wait(thread: threading.Thread, timeout: float = 5.0) -> None:
    path = f"/proc/self/task/{thread.native_id}/wchan"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                if "epoll" in f.read():
                    return
        except OSError:   # no /proc wchan: fall back to a generous sleep
            time.sleep(0.3)
            return
        time.sleep(0.01)
    raise AssertionError("the waiter never blocked in epoll_wait")


@pytest.mark.parametrize("head_waiting", [False, True])
def test_epollexclusive_busy_head_still_gets_the_listener(head_waiting):
    """The kernel fact behind native's lost races under --accept exclusive (docs/server.md).

    Two epolls hold one listener with EPOLLEXCLUSIVE; A registered first (head of the
    listener's wait queue).  If A has a thread in epoll_wait, a connection wakes A only.
    If A is busy (no thread waiting in it), ep_poll_callback still puts the listener on
    A's ready list *and* passes the wakeup on to B: one connection, reported by both, so
    whichever accepts second loses the race.  A fast loop (C) returns to epoll_wait within
    microseconds and collides with the worker that was woken; a slower one finds the queue
    already empty, which epoll_wait never reports (nothing is counted).
    """
    if not hasattr(select, "EPOLLEXCLUSIVE"):
        pytest.skip("no EPOLLEXCLUSIVE")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.setblocking(False)
    a, b = select.epoll(), select.epoll()
    for ep in (a, b):
        ep.register(lsock.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
    got: dict[str, list] = {}
    waiters = [threading.Thread(target=lambda: got.__setitem__("b", b.poll(1.0)))]
    if head_waiting:
        waiters.append(threading.Thread(target=lambda: got.__setitem__("a", a.poll(5.0))))
    try:
        for t in waiters:
            t.start()
        for t in waiters:
            _blocked_in_epoll_wait(t)
        client = socket.create_connection(lsock.getsockname())
        for t in waiters:
            t.join()
        listener = [(lsock.fileno(), select.EPOLLIN)]
        if head_waiting:
            assert got == {"a": listener, "b": []}   # one waiter woken, B never sees it
        else:
            assert got == {"b": listener}            # B woken ...
            assert a.poll(0) == listener             # ... and busy A has it ready too
        client.close()
    finally:
        a.close()
        b.close()
        lsock.close()


@pytest.mark.parametrize("backend", ["asyncio", "uvloop"])
def test_asyncio_family_counts(backend, tmp_path):
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--workers", "2")
    res = run_clients(*srv.address, connections=16, mode="short", max_requests=64, duration=20)
    assert res.errors == {} and res.requests == 64
    final = srv.stop()
    w = final["workers"]
    assert sum(x["accepted"] for x in w) == res.connects
    assert sum(x["closed"] for x in w) == res.connects
    if backend == "asyncio":  # asyncio calls our socket's accept(): wakeups are counted
        assert sum(x["listen_wakeups"] for x in w) >= 1


@pytest.mark.parametrize("backend,channel", [("native", "scm"), ("native-uring", "scm"),
                                             ("uring", "scm"), ("uring-py", "scm"),
                                             ("uring", "msg-ring"), ("uring-py", "msg-ring")])
def test_handoff_listener_id_selects_the_protocol(backend, channel):
    """--accept dispatch with two addresses of different protocols: the worker serves each
    handed-over connection by the protocol of the listener id it came with (the byte of
    the SCM_RIGHTS message, or the msg-ring CQE's tag), and counts it as that listener's."""
    require_backend(backend)
    from test_uring_defects import InProcess

    from parallelnet.core.handoff import make_channels, send_handoff
    from parallelnet.core.protocols import make_spec

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    specs = [make_spec("echo"), make_spec("http")]
    ((acceptor, worker_end),) = make_channels(1)
    own = channel == "msg-ring"
    clients = []
    with InProcess(backend, accept="dispatch", handoff=None if own else worker_end,
                   protocols=specs, uring_handoff=channel) as w:
        ring_channel = w.backend.handoff_channel() if own else None
        try:
            for lid in (1, 0, 1):
                client = socket.create_connection(lsock.getsockname(), timeout=10)
                conn, _ = lsock.accept()
                if own:
                    ring_channel.send(conn.detach(), lid)   # transfers: the worker owns it
                else:
                    send_handoff(acceptor, conn, lid)
                    conn.close()
                clients.append((client, lid))
            for client, lid in clients:
                if lid:
                    client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    assert client.recv(64).startswith(b"HTTP/1.1 200 OK\r\n")
                else:
                    client.sendall(b"ping")
                    assert recv_exactly(client, 4) == b"ping"
        finally:
            if ring_channel is not None:
                ring_channel.close()
        w.stop()
        assert w.error is None, w.error
        per = w.ctx.stats.per_listener
        assert [p.accepted for p in per] == [1, 2]
        assert [p.listen_wakeups for p in per] == [0, 0]
        assert sum(p.accepted for p in per) == w.ctx.stats.accepted
    for client, _ in clients:
        client.close()
    for s in (lsock, acceptor, worker_end):
        s.close()


def test_native_serves_a_c_and_a_python_protocol_side_by_side(tmp_path):
    """Two addresses, echo in C and a Python protocol through the callbacks: each
    connection gets its address's protocol, and a handler bug on one closes only it."""
    require_backend("native")
    env = dict(os.environ, PARALLELNET_TEST_PROTOCOLS="1")
    srv = start_server(tmp_path, "--backend", "native", "--workers", "1",
                       "--listen", "127.0.0.1:0,protocol=echo",
                       "--listen", "127.0.0.1:0,protocol=crashy", env=env)
    with srv.connect(listener=0) as c_echo, srv.connect(listener=1) as py, \
            srv.connect(listener=1) as doomed:
        doomed.sendall(b"CRASH")                 # crashy: a handler bug, this one only
        assert recv_until_eof(doomed) == b""
        for s in (c_echo, py):
            s.sendall(b"hello")
            assert recv_exactly(s, 5) == b"hello"
    final = srv.stop()
    (w,) = final["workers"]
    assert [p["accepted"] for p in w["per_listener"]] == [1, 2]
    assert w["handler_errors"] == 1 and final["clean"], srv.output


def test_native_uring_refuses_c_and_python_protocols_together(monkeypatch):
    """Its C loop cannot call into Python: a mix is a startup error, not a dead worker."""
    require_backend("native-uring")
    from conftest import run_cli_serve_error

    monkeypatch.setenv("PARALLELNET_TEST_PROTOCOLS", "1")
    err = run_cli_serve_error("--backend", "native-uring",
                              "--listen", "127.0.0.1:0,protocol=http",
                              "--listen", "127.0.0.1:0,protocol=crashy")
    assert "native-uring cannot serve a protocol with a C implementation" in err


@pytest.mark.parametrize("backend,limit", [("native", 8), ("native-uring", 8), ("uring", 8)])
def test_c_cores_refuse_more_addresses_than_they_hold(backend, limit):
    require_backend(backend)
    from conftest import run_cli_serve_error

    listen = [a for _ in range(limit + 1) for a in ("--listen", "127.0.0.1:0")]
    err = run_cli_serve_error("--backend", backend, *listen)
    assert f"serves at most {limit} listening addresses (its max_listeners)" in err
