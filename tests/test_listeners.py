"""Several listening addresses, unit by unit (no server process): the --listen syntax and
the "listening on" line, the socket layout of every strategy, the listener id on the
hand-off channel, the per-listener counters, and the refusals."""

from __future__ import annotations

import os
import select
import socket
import threading

import pytest

from conftest import ipv6_loopback
from parallelnet.core import server as server_mod
from parallelnet.core.addresses import (
    ListenSpec, format_listening, parse_address, parse_listen, parse_listening,
)
from parallelnet.core.backend import Backend, BackendError, StopSignal, WorkerContext, check_declarations
from parallelnet.core.dispatch import Dispatcher
from parallelnet.core.handoff import HandoffReceiver, make_channels, receive_handoffs, send_handoff
from parallelnet.core.listeners import MAX_ADDRESSES, SocketBuffers, check_addresses, open_listeners
from parallelnet.core.protocols import make_factory
from parallelnet.core.stats import EXTRA_COUNTERS, WorkerStats, format_table, listener_totals

V6 = ipv6_loopback()


# -- the syntax ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, spec", [
    ("127.0.0.1:8080", ListenSpec("127.0.0.1", 8080)),
    ("127.0.0.1:0,protocol=http", ListenSpec("127.0.0.1", 0, "http")),
    ("[::1]:8081", ListenSpec("::1", 8081)),
    ("[::1]:0, protocol = echo", ListenSpec("::1", 0, "echo")),
    ("localhost:9", ListenSpec("localhost", 9)),
])
def test_listen_syntax(text, spec):
    assert parse_listen(text) == spec


@pytest.mark.parametrize("text, why", [
    ("::1:8080", "HOST:PORT or \\[IPv6\\]:PORT"),     # an unbracketed IPv6 literal is ambiguous
    ("127.0.0.1", "HOST:PORT"),
    ("127.0.0.1:99999", "0..65535"),
    ("127.0.0.1:80,proto=http", "only option is protocol"),
    ("127.0.0.1:80,protocol=", "only option is protocol"),
    ("127.0.0.1:80,protocol=http,protocol=echo", "twice"),
])
def test_listen_syntax_errors_say_what_is_wrong(text, why):
    with pytest.raises(ValueError, match=why):
        parse_listen(text)


def test_the_listening_line_round_trips_every_address_in_order():
    addresses = [("127.0.0.1", 4000), ("::1", 4001), ("localhost", 4002)]
    line = format_listening(addresses)
    assert line == "listening on 127.0.0.1:4000 [::1]:4001 localhost:4002"
    assert parse_listening(line + "\n") == addresses
    assert parse_listening("backend epoll, 2 thread workers") is None
    # One address: the line its readers have always parsed (last token = HOST:PORT).
    assert format_listening([("127.0.0.1", 4000)]).split()[-1] == "127.0.0.1:4000"
    assert parse_address("[::1]:7") == ("::1", 7)


# -- the layouts --------------------------------------------------------------------------

def _two_addresses():
    return [("127.0.0.1", 0), ("::1" if V6 else "127.0.0.1", 0)]


@pytest.mark.parametrize("strategy", ["shared", "exclusive", "exclusive-rotate"])
def test_shared_layouts_put_every_address_in_every_worker(strategy):
    ls = open_listeners(strategy, _two_addresses(), workers=3)
    try:
        assert [len(g) for g in ls.groups] == [1, 1]
        for w in range(3):
            socks, ids = ls.for_worker(w)
            assert socks == [ls.groups[0][0], ls.groups[1][0]] and ids == [0, 1]
        assert [s.getsockname()[1] for s in ls.sockets] == [p for _, p in ls.addresses]
        assert all(p for _, p in ls.addresses)          # port 0 became a real one
        assert (ls.host, ls.port) == ls.addresses[0]
    finally:
        ls.close()


def test_reuseport_opens_one_socket_per_worker_per_address():
    ls = open_listeners("reuseport", _two_addresses(), workers=3)
    try:
        assert [len(g) for g in ls.groups] == [3, 3]
        for lid, group in enumerate(ls.groups):
            assert {s.getsockname()[1] for s in group} == {ls.addresses[lid][1]}
        socks, ids = ls.for_worker(1)
        assert socks == [ls.groups[0][1], ls.groups[1][1]] and ids == [0, 1]
    finally:
        ls.close()


def test_reuseport_cpu_steers_each_address_group_to_the_arrival_cpu():
    """One cBPF program per group: a client on CPU c lands on the socket of the worker
    pinned to c, whichever address it connects to (on loopback the SYN is processed on
    the connecting thread's CPU)."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    ls = open_listeners("reuseport-cpu", [("127.0.0.1", 0), ("127.0.0.1", 0)],
                        workers=len(cpus), cpus=cpus)
    landed = {}

    def connect_from(cpu):
        os.sched_setaffinity(0, {cpu})       # this thread only
        for lid, address in enumerate(ls.addresses):
            c = socket.create_connection(address, timeout=5)
            ready = select.select([s for s in ls.groups[lid]], [], [], 5)[0]
            landed[(cpu, lid)] = [ls.groups[lid].index(s) for s in ready]
            for s in ready:
                s.accept()[0].close()
            c.close()

    try:
        for cpu in cpus:
            t = threading.Thread(target=connect_from, args=(cpu,))
            t.start()
            t.join(10)
        assert landed == {(cpu, lid): [w] for w, cpu in enumerate(cpus) for lid in (0, 1)}
    finally:
        ls.close()


def test_dispatch_leaves_workers_no_listener_and_the_acceptor_all():
    ls = open_listeners("dispatch", _two_addresses(), workers=2)
    try:
        assert ls.for_worker(0) == ([], [])
        assert ls.for_acceptor() == [ls.groups[0][0], ls.groups[1][0]]
    finally:
        ls.close()


@pytest.mark.skipif(not V6, reason="no IPv6 loopback here")
def test_an_ipv6_listener_is_v6_only():
    ls = open_listeners("shared", [("::1", 0)], workers=1)
    try:
        assert ls.sockets[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        ls.close()


def test_a_duplicate_or_too_many_addresses_are_refused_before_binding():
    with pytest.raises(ValueError, match="listed twice"):
        check_addresses([("127.0.0.1", 8080), ("127.0.0.1", 8080)])
    check_addresses([("127.0.0.1", 0), ("127.0.0.1", 0)])   # two free ports: two addresses
    with pytest.raises(ValueError, match=f"at most {MAX_ADDRESSES}"):
        check_addresses([("127.0.0.1", 0)] * (MAX_ADDRESSES + 1))
    # reuseport would silently join the first group: refused by name instead.
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match="listed twice"):
        open_listeners("reuseport", [("127.0.0.1", port)] * 2, workers=2)


@pytest.mark.parametrize("strategy", ["shared", "reuseport"])
def test_socket_buffers_set_on_the_listener_are_inherited_by_accepted_connections(strategy):
    """--sndbuf/--rcvbuf rely on accept(2) cloning the listener: the accepted socket has
    the listener's fixed sizes (the kernel doubles what was asked) with no syscall of ours."""
    asked = SocketBuffers(sndbuf=16384, rcvbuf=24576)
    ls = open_listeners(strategy, [("127.0.0.1", 0)], workers=2, buffers=asked)
    default = socket.socket()
    try:
        with socket.create_connection((ls.host, ls.port)):
            # reuseport: the kernel picks one of the group's sockets
            ready, _, _ = select.select(ls.sockets, [], [], 5)
            assert ready, "no listener got the connection"
            conn, _ = ready[0].accept()
            with conn:
                got = (conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                       conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        assert got == (2 * 16384, 2 * 24576)
        assert got[0] != default.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    finally:
        default.close()
        ls.close()


def test_socket_buffer_sizes_must_be_positive():
    with pytest.raises(ValueError, match="--sndbuf must be a positive number of bytes"):
        SocketBuffers(sndbuf=0)
    with pytest.raises(ValueError, match="--rcvbuf must be a positive number of bytes"):
        SocketBuffers(rcvbuf=-1)


# -- the hand-off carries the listener id -------------------------------------------------

def test_the_listener_id_travels_with_the_connection(tcp_pair):
    _, server = tcp_pair
    [(acceptor_end, worker_end)] = make_channels(1)
    with acceptor_end, worker_end:
        send_handoff(acceptor_end, server, 0)
        send_handoff(acceptor_end, server, 255)
        got = receive_handoffs(worker_end)
        assert got.ids == [0, 255] and len(got.fds) == 2 and not got.closed
        for fd in got.fds:
            os.close(fd)
        send_handoff(acceptor_end, server, 7)
        extra = dict.fromkeys(EXTRA_COUNTERS, 0)
        pairs, closed = HandoffReceiver(worker_end, extra, "test").take()
        assert [lid for _, lid in pairs] == [7] and not closed and extra["handoffs"] == 1
        for sock, _ in pairs:
            sock.close()


def test_a_channel_that_cannot_carry_the_id_serves_one_address_only():
    class FdOnly:
        kind = "fd-only"
        transfers = False

        def send(self, fd):  # pragma: no cover - never reached
            raise AssertionError

        def close(self):
            pass

    listeners = [socket.socket(), socket.socket()]
    try:
        with pytest.raises(ValueError, match="fd-only hand-off .* serves one address, not 2"):
            Dispatcher(listeners, [FdOnly()], lambda: [0])
        Dispatcher(listeners[:1], [FdOnly()], lambda: [0])   # one address: fine
    finally:
        for s in listeners:
            s.close()


# -- what a worker is given ---------------------------------------------------------------

def test_worker_context_defaults_to_one_address_and_one_protocol():
    stop = StopSignal()
    try:
        a, b = socket.socket(), socket.socket()
        ctx = WorkerContext(index=0, cpu=None, listeners=[a, b], accept="shared",
                            protocol_factory=make_factory("echo", message_size=64),
                            stats=WorkerStats(0, None), stop=stop)
        assert ctx.listener_ids == [0, 0]
        (proto,) = ctx.protocols
        assert (proto.name, proto.options) == ("echo", {"message_size": 64})
        with pytest.raises(ValueError, match="parallel"):
            WorkerContext(index=0, cpu=None, listeners=[a], accept="shared",
                          protocol_factory=proto.factory, stats=WorkerStats(0, None),
                          stop=stop, listener_ids=[0, 1])
        a.close()
        b.close()
    finally:
        stop.close()


def test_a_server_gives_each_listener_its_protocol(monkeypatch):
    cfg = server_mod.ServerConfig(backend="epoll", workers=1, protocol_options={"message_size": 8},
                                  listen=[ListenSpec("127.0.0.1", 0),
                                          ListenSpec("127.0.0.1", 0, "http"),
                                          ListenSpec("127.0.0.1", 0, "echo")])
    srv = server_mod.Server(cfg)
    assert [p.name for p in srv.protocols] == ["echo", "http", "echo"]
    assert srv.protocols[0] is srv.protocols[2]                # one spec per protocol
    assert srv.protocols[0].options == {"message_size": 8}
    # http takes no message_size; every protocol gets half of --max-output as its budget
    assert srv.protocols[1].options == {"output_budget": 512 * 1024}
    assert srv.protocol_factory is srv.protocols[0].factory


def test_more_addresses_than_the_backend_serves_are_refused_naming_it(monkeypatch):
    class OneAddress(Backend):
        name = "one-address"
        kind = "readiness"

        def run(self) -> None:  # pragma: no cover - never started
            raise AssertionError("a refused configuration must not start a worker")

    assert OneAddress.max_listeners == 1          # the default: not declared, one address
    monkeypatch.setattr(server_mod, "get_backend", lambda name: OneAddress)
    two = [ListenSpec("127.0.0.1", 0), ListenSpec("127.0.0.1", 0)]
    with pytest.raises(BackendError, match="'one-address' serves at most 1 listening address "
                                           r"\(its max_listeners\); 2 were given"):
        server_mod.Server(server_mod.ServerConfig(backend="one-address", listen=two))
    with pytest.raises(ValueError, match="non-loopback"):
        server_mod.Server(server_mod.ServerConfig(
            backend="x", listen=[ListenSpec("127.0.0.1", 0), ListenSpec("0.0.0.0", 0)]))


def test_max_listeners_must_be_none_or_positive():
    class Zero(Backend):
        name = "zero"
        kind = "readiness"
        max_listeners = 0

        def run(self) -> None:  # pragma: no cover
            pass

    assert "max_listeners" in check_declarations(Zero)


# -- per-listener counters ----------------------------------------------------------------

def test_per_listener_counters_in_the_snapshot_and_totals():
    st = WorkerStats(0, None, listeners=2)
    st.per_listener[0].accepted = 3
    st.per_listener[1].accepted = 2
    st.per_listener[1].lost_races = 1
    st.per_listener[1].listen_wakeups = 4
    snap = st.snapshot()
    assert snap["per_listener"] == [
        {"accepted": 3, "lost_races": 0, "listen_wakeups": 0},
        {"accepted": 2, "lost_races": 1, "listen_wakeups": 4}]
    other = WorkerStats(1, None, listeners=2)
    other.per_listener[0].accepted = 1
    other.per_listener[0].lost_races = None          # not observable by its backend
    totals = listener_totals([snap, other.snapshot()])
    assert totals == [{"accepted": 4, "lost_races": None, "listen_wakeups": 0},
                      {"accepted": 2, "lost_races": 1, "listen_wakeups": 4}]
    text = format_table([snap, other.snapshot()], listeners=["127.0.0.1:1 (echo)", "[::1]:2 (http)"])
    lines = [ln for ln in text.splitlines() if ln.startswith("listener ")]
    assert lines[0].startswith("listener 0 127.0.0.1:1 (echo): accepted 3/1 (total 4), lost 0/n/a")
    assert lines[1].startswith("listener 1 [::1]:2 (http): accepted 2/0 (total 2), lost 1/0")
    assert "listener " not in format_table([snap], listeners=["127.0.0.1:1 (echo)"])


def test_a_one_address_backend_reports_its_totals_as_its_listener():
    st = WorkerStats(0, None)
    st.per_listener_from_totals = True
    st.accepted, st.lost_races, st.listen_wakeups = 5, None, 6
    assert st.snapshot()["per_listener"] == [{"accepted": 5, "lost_races": None,
                                              "listen_wakeups": 6}]
