"""--accept dispatch: the hand-off channel, the policies, overflow, end to end."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import BACKENDS, recv_exactly, recv_until_eof, require_backend, start_server
from parallelnet.core.client import run_clients
from parallelnet.core.dispatch import Dispatcher, make_channels, receive_handoffs, send_handoff


def test_a_connection_survives_the_handoff(tcp_pair):
    client, server = tcp_pair
    [(acceptor_end, worker_end)] = make_channels(1)
    with acceptor_end, worker_end:
        send_handoff(acceptor_end, server)
        server.close()  # the acceptor's copy goes; the worker's stays open
        (fd,) = receive_handoffs(worker_end).fds
        assert receive_handoffs(worker_end) == ([], 0, False, [])
    with socket.socket(fileno=fd) as moved:
        client.sendall(b"ping")
        assert moved.recv(4) == b"ping"
        moved.sendall(b"pong")
        assert client.recv(4) == b"pong"


def _dispatcher(n, policy, closed):
    channels = make_channels(n)
    d = Dispatcher([socket.socket()], [a for a, _ in channels], lambda: closed, policy)
    return d, channels


def test_round_robin_and_least_connections_orders():
    d, chans = _dispatcher(3, "round-robin", [0, 0, 0])
    assert d._order() == [0, 1, 2]
    d._next = 2
    assert d._order() == [2, 0, 1]
    d, chans2 = _dispatcher(3, "least-connections", [5, 0, 1])
    d.handed = [6, 4, 1]  # open now: 1, 4, 0
    assert d._order() == [2, 0, 1]
    for a, b in chans + chans2:
        a.close()
        b.close()


def test_full_channels_spill_then_overflow_without_blocking(tcp_pair):
    _, server = tcp_pair
    d, chans = _dispatcher(2, "round-robin", [0, 0])
    for _ in range(100_000):  # fill worker 0's channel (nobody receives)
        try:
            send_handoff(chans[0][0], server)
        except BlockingIOError:
            break
    else:
        pytest.fail("the channel never filled")
    d._next = 0
    d._hand_over(server.fileno())
    assert (d.handed, d.spills, d.overflow) == ([0, 1], 1, 0)  # worker 0 full: spilled to 1
    while True:
        try:
            send_handoff(chans[1][0], server)
        except BlockingIOError:
            break
    d._hand_over(server.fileno())
    assert d.overflow == 1  # everyone full: refused, not blocked
    for fd in (receive_handoffs(chans[0][1], limit=10**6).fds
               + receive_handoffs(chans[1][1], limit=10**6).fds):
        socket.socket(fileno=fd).close()
    for a, b in chans:
        a.close()
        b.close()
    d.listeners[0].close()


def test_a_closed_acceptor_end_reads_as_closed():
    [(acceptor_end, worker_end)] = make_channels(1)
    acceptor_end.close()
    with worker_end:
        assert receive_handoffs(worker_end) == ([], 0, True, [])


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_dispatch_round_robin_end_to_end(tmp_path, mode):
    srv = start_server(tmp_path, "--accept", "dispatch", "--mode", mode, "--workers", "2")
    res = run_clients(srv.host, srv.port, connections=4, mode="short", max_requests=41,
                      duration=20)
    final = srv.stop()
    assert res.errors == {} and res.requests == 41
    accepted = [w["accepted"] for w in final["workers"]]
    disp = final["dispatcher"]
    assert disp["accepted"] == sum(accepted) == res.connects
    assert disp["handed"] == accepted
    assert abs(accepted[0] - accepted[1]) <= 1  # round-robin, nothing full
    assert all(w["lost_races"] == 0 and w["listen_wakeups"] == 0 for w in final["workers"])
    assert "dispatcher (round-robin, scm)" in srv.output


def test_backends_without_a_handoff_channel_refuse_dispatch_clearly(monkeypatch):
    # A tiny backend registered nowhere (every real one may gain dispatch): the core must
    # refuse the strategy it does not declare, before any worker starts, saying why.
    from parallelnet.core.backend import REUSEPORT, SHARED, Backend, BackendError
    from parallelnet.core import server as server_mod

    class NoHandoff(Backend):
        name = "no-handoff"
        accept_strategies = frozenset({SHARED, REUSEPORT})

        def run(self) -> None:  # pragma: no cover - never started
            raise AssertionError("a refused configuration must not start a worker")

    monkeypatch.setattr(server_mod, "get_backend", lambda name: NoHandoff)
    with pytest.raises(BackendError, match="does not support --accept dispatch"):
        server_mod.Server(server_mod.ServerConfig(backend="no-handoff", accept="dispatch"))


# -- --accept dispatch: connections handed over on the worker's channel ---------------

# Every registered backend that serves the dispatch layout: tested the moment it declares it.
DISPATCH_BACKENDS = [name for name, cls in BACKENDS.items() if "dispatch" in cls.accept_strategies]
# Channels a backend brings itself (thread mode only): io_uring's IORING_OP_MSG_RING.
MSG_RING = ("--uring-handoff", "msg-ring")
OWN_CHANNELS = [pytest.param((b, MSG_RING), id=f"{b}-msg-ring") for b in ("uring", "uring-py")]
# (backend, extra args): the socketpair channel for all, plus the backends' own.
CHANNELS = [pytest.param((b, ()), id=b) for b in DISPATCH_BACKENDS] + OWN_CHANNELS


@pytest.mark.parametrize("case", [pytest.param((b, (), m), id=f"{b}-{m}")
                                  for b in DISPATCH_BACKENDS for m in ("thread", "process")]
                         + [pytest.param((b, MSG_RING, "thread"), id=f"{b}-msg-ring")
                            for b in ("uring", "uring-py")])
def test_dispatch_counts_handoffs_not_races(case, tmp_path):
    backend, extra, mode = case
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--mode", mode, "--workers", "2",
                       "--accept", "dispatch", *extra)
    res = run_clients(*srv.address, connections=8, mode="short", max_requests=60, duration=20)
    assert res.errors == {} and res.requests == 60
    final = srv.stop()
    assert final["clean"], srv.output
    workers = final["workers"]
    disp = final["dispatcher"]
    assert sum(w["accepted"] for w in workers) == res.connects == disp["accepted"]
    assert [w["accepted"] for w in workers] == disp["handed"]
    assert disp["channel"] == ("msg-ring" if extra else "scm")
    for w in workers:
        assert w["extra"]["handoffs"] == w["accepted"]
        assert w["extra"]["handoff_lost"] == 0
        assert w["lost_races"] == 0 and w["listen_wakeups"] == 0
        if extra:   # every connection came as a completion of its own: no poll fired
            assert w["extra"]["msg_handoffs"] == w["accepted"] > 0
            assert w["extra"]["handoff_wakeups"] == 0


@pytest.mark.parametrize("case", CHANNELS)
def test_dispatch_refuses_over_max_connections(case, tmp_path):
    backend, extra = case
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--workers", "1", "--accept", "dispatch",
                       "--max-connections", "2", *extra)
    socks = [srv.connect() for _ in range(2)]
    for s in socks:
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
    extra = srv.connect()
    assert recv_until_eof(extra) == b""
    extra.close()
    for s in socks:
        s.close()
    final = srv.stop()
    w = final["workers"][0]
    assert w["refused"] == 1 and w["accepted"] == 3 and w["extra"]["handoffs"] == 3


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


@pytest.mark.parametrize("backend", DISPATCH_BACKENDS)
def test_dispatch_out_of_fds_loses_the_connection_counted(backend, tmp_path):
    """Process mode: the acceptor (parent) has fds, the worker (child) has none left.
    recvmsg consumes the message with MSG_CTRUNC: that connection is lost, counted,
    and the worker goes on serving once fds are free again."""
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--mode", "process", "--workers", "1",
                       "--accept", "dispatch", "--stats-interval", "0.1")
    try:
        deadline = time.monotonic() + 5
        while not (kids := _children(srv.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (child,) = kids
        headroom = 12
        limit = len(os.listdir(f"/proc/{child}/fd")) + headroom
        resource.prlimit(child, resource.RLIMIT_NOFILE, (limit, limit))
        socks = [srv.connect(timeout=2) for _ in range(2 * headroom)]
        served, lost = [], []
        for s in socks:
            try:
                s.sendall(b"ping")
                got = s.recv(4)
            except (ConnectionError, TimeoutError, OSError):
                got = b""
            (served if got == b"ping" else lost).append(s)
        assert served and lost, (len(served), len(lost))
        for s in socks:
            s.close()
        time.sleep(0.3)
        with srv.connect() as again:   # fds free again: served
            again.sendall(b"pong")
            assert recv_exactly(again, 4) == b"pong"
    finally:
        final = srv.stop()
    w = final["workers"][0]
    assert final["clean"], srv.output
    assert w["extra"]["handoff_lost"] >= len(lost) - 1 >= 1, (w, len(lost))
    assert w["extra"]["handoffs"] + w["extra"]["handoff_lost"] == final["dispatcher"]["accepted"]
    assert "handoff_lost" in srv.output


@pytest.mark.parametrize("case", CHANNELS)
def test_dispatch_drain_answers_what_was_handed_over(case, tmp_path):
    backend, extra = case
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--workers", "2", "--accept", "dispatch",
                       *extra)
    socks = [srv.connect() for _ in range(20)]
    for i, s in enumerate(socks):
        s.sendall(b"req-%02d" % i)
    srv.proc.send_signal(signal.SIGTERM)   # at once: some may still be in flight
    for i, s in enumerate(socks):
        assert recv_until_eof(s) == b"req-%02d" % i
        s.close()
    srv.proc.wait(20)   # drained and exited: stop() must not send a second SIGTERM
    final = srv.stop()
    assert final["clean"], srv.output
    assert sum(w["extra"]["handoffs"] for w in final["workers"]) == 20
    assert all(w["lost_races"] == 0 for w in final["workers"])


@pytest.mark.parametrize("args, why", [
    (("--mode", "process", "--accept", "dispatch"), "needs --accept dispatch in thread mode"),
    (("--accept", "shared"), "needs --accept dispatch in thread mode"),
])
def test_msg_ring_handoff_refuses_what_it_cannot_serve(args, why):
    require_backend("uring")
    out = subprocess.run([sys.executable, "-m", "parallelnet.core.cli", "serve", "--backend", "uring",
                          "--port", "0", *MSG_RING, *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and why in out.stderr, out.stderr


def test_msg_ring_handoff_survives_a_connection_storm(tmp_path):
    """Many connections at once through IORING_OP_MSG_RING into DEFER_TASKRUN rings:
    every one answered, none lost, fds back to where they were."""
    require_backend("uring")
    srv = start_server(tmp_path, "--backend", "uring", "--workers", "2", "--accept", "dispatch",
                       "--dispatch-policy", "least-connections", *MSG_RING)
    try:
        # One short round first: the dispatcher's sender rings (one fd each) open on first use.
        warm = run_clients(*srv.address, connections=2, mode="short", max_requests=4, duration=10)
        assert warm.requests == 4
        time.sleep(0.2)
        fds_before = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        res = run_clients(*srv.address, connections=64, mode="short", max_requests=2000, duration=30)
        assert res.errors == {} and res.requests == 2000
        deadline = time.monotonic() + 5
        while len(os.listdir(f"/proc/{srv.proc.pid}/fd")) > fds_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir(f"/proc/{srv.proc.pid}/fd")) <= fds_before
    finally:
        final = srv.stop()
    disp = final["dispatcher"]
    assert disp["overflow"] == 0 and disp["errors"] == 0
    assert sum(w["extra"]["msg_handoffs"] for w in final["workers"]) == disp["accepted"]
