"""--accept dispatch: the hand-off channel, the policies, overflow, end to end."""

from __future__ import annotations

import socket

import pytest

from conftest import start_server
from parallelnet.core.client import run_clients
from parallelnet.core.dispatch import Dispatcher, make_channels, receive_handoffs, send_handoff


@pytest.fixture
def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        client = socket.create_connection(lst.getsockname())
        server, _ = lst.accept()
    yield client, server
    client.close()
    server.close()


def test_a_connection_survives_the_handoff(tcp_pair):
    client, server = tcp_pair
    [(acceptor_end, worker_end)] = make_channels(1)
    with acceptor_end, worker_end:
        send_handoff(acceptor_end, server)
        server.close()  # the acceptor's copy goes; the worker's stays open
        (fd,) = receive_handoffs(worker_end)
        assert receive_handoffs(worker_end) == []
    with socket.socket(fileno=fd) as moved:
        client.sendall(b"ping")
        assert moved.recv(4) == b"ping"
        moved.sendall(b"pong")
        assert client.recv(4) == b"pong"


def _dispatcher(n, policy, closed):
    channels = make_channels(n)
    d = Dispatcher(socket.socket(), [a for a, _ in channels], lambda: closed, policy)
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
    d._hand_over(server)
    assert (d.handed, d.spills, d.overflow) == ([0, 1], 1, 0)  # worker 0 full: spilled to 1
    while True:
        try:
            send_handoff(chans[1][0], server)
        except BlockingIOError:
            break
    d._hand_over(server)
    assert d.overflow == 1  # everyone full: refused, not blocked
    for fd in receive_handoffs(chans[0][1], limit=10**6) + receive_handoffs(chans[1][1], limit=10**6):
        socket.socket(fileno=fd).close()
    for a, b in chans:
        a.close()
        b.close()


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
    assert "dispatcher (round-robin)" in srv.output


def test_backends_without_a_handoff_channel_refuse_dispatch_clearly(monkeypatch):
    # A tiny backend registered nowhere (every real one may gain dispatch): the core must
    # refuse the strategy it does not declare, before any worker starts, saying why.
    from parallelnet.backends.base import REUSEPORT, SHARED, Backend, BackendError
    from parallelnet.core import server as server_mod

    class NoHandoff(Backend):
        name = "no-handoff"
        accept_strategies = frozenset({SHARED, REUSEPORT})

        def run(self) -> None:  # pragma: no cover - never started
            raise AssertionError("a refused configuration must not start a worker")

    monkeypatch.setattr(server_mod, "get_backend", lambda name: NoHandoff)
    with pytest.raises(BackendError, match="does not support --accept dispatch"):
        server_mod.Server(server_mod.ServerConfig(backend="no-handoff", accept="dispatch"))
