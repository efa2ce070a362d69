"""The conformance suite: every registered backend, thread and process mode, echo and http.

A backend is tested the moment it is registered (entry point group
``parallelnet.backends``): the parameters below come from the registry.  Servers run
as real ``parallelnet serve`` processes on 127.0.0.1, port 0.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from conftest import (
    BACKENDS, fds_left_by_a_server_run, read_http_responses, recv_exactly, recv_until_eof,
    require_backend, start_server,
)
from parallelnet.core.client import run_clients

MODES = ("thread", "process")
WORKERS = "2"
MAX_OUTPUT = str(256 * 1024)


def _combos():
    """(backend, mode, accept, extra args) for every registered backend."""
    out = []
    for name, cls in BACKENDS.items():
        modes = [m for m in MODES if m in cls.modes]
        for mode in modes:
            out.append(pytest.param((name, mode, "shared", ()), id=f"{name}-{mode}"))
        for strategy in sorted(cls.accept_strategies - {"shared"}):
            out.append(pytest.param((name, modes[0], strategy, ()), id=f"{name}-{modes[0]}-{strategy}"))
        for variant in cls.conformance_variants:
            variant = list(variant)
            accept = "shared"
            if "--accept" in variant:   # a variant may name its strategy (e.g. a hand-off channel)
                at = variant.index("--accept")
                accept = variant[at + 1]
                del variant[at:at + 2]
            out.append(pytest.param((name, modes[0], accept, tuple(variant)),
                                    id=f"{name}-{modes[0]}-{'-'.join(a.strip('-') for a in variant)}"))
    return out


COMBOS = _combos()


def _serve_args(backend, mode, accept, extra, protocol):
    return ["--backend", backend, "--mode", mode, "--accept", accept, "--workers", WORKERS,
            "--protocol", protocol, "--max-output", MAX_OUTPUT, "--stats-interval", "0.1", *extra]


def _records(srv) -> list[dict]:
    import json

    with open(srv.stats_path) as f:
        return [json.loads(x) for x in f if x.endswith("\n") and x.strip()]


def _until(srv, pred, timeout: float = 10.0) -> dict | None:
    """The first interval record (all workers summed) for which pred holds, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = [r for r in _records(srv) if r["type"] == "interval"]
        if recs and pred(recs[-1]):
            return recs[-1]
        time.sleep(0.05)
    return None


@pytest.fixture(scope="module", params=COMBOS)
def combo(request):
    require_backend(request.param[0])
    return request.param


def _module_server(combo, tmp_path_factory, protocol):
    backend, mode, accept, extra = combo
    srv = start_server(tmp_path_factory.mktemp("srv"), *_serve_args(backend, mode, accept, extra, protocol))
    yield srv
    final = srv.stop()
    crashed = [w for w in final["workers"] if w.get("crashed")]
    assert not crashed, f"workers crashed: {crashed}\n{srv.output}"
    assert final["clean"], srv.output
    assert srv.proc.returncode == 0, srv.output


@pytest.fixture(scope="module")
def echo_server(combo, tmp_path_factory):
    yield from _module_server(combo, tmp_path_factory, "echo")


@pytest.fixture(scope="module")
def http_server(combo, tmp_path_factory):
    yield from _module_server(combo, tmp_path_factory, "http")


def _payload(size: int, seed: int = 0) -> bytes:
    block = bytes((i * 131 + seed) & 0xFF for i in range(65536 + 7))
    return (block * (size // len(block) + 1))[:size]


def _echo_roundtrip(srv, payload: bytes) -> bytes:
    with srv.connect(timeout=20) as s:
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        got = recv_exactly(s, len(payload))
        sender.join(20)
    return got


# -- echo -------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 64, 4096, 65536, 1 << 20, 4 << 20])
def test_echo_is_byte_exact(echo_server, size):
    payload = _payload(size, seed=size & 0xFF)
    assert _echo_roundtrip(echo_server, payload) == payload


def test_two_hundred_concurrent_connections(echo_server):
    res = run_clients(*echo_server.address, connections=200, mode="keepalive", size=128,
                      max_requests=2000, duration=30)
    assert res.errors == {}
    assert res.requests == 2000
    assert res.connects == 200


def test_slow_reader_gets_everything_and_others_are_served(echo_server):
    """A client that stops reading: the server pauses reading from it (backpressure,
    counted), the bytes arrive intact once it reads, and others are unaffected."""
    payload = _payload(8 << 20, seed=7)
    before = sum(w["backpressure"] for w in (_records(echo_server) or [{"workers": []}])[-1]["workers"])
    with echo_server.connect(timeout=30) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sender = threading.Thread(target=slow.sendall, args=(payload,), daemon=True)
        sender.start()
        # Not reading: the server's output to it passes --max-output and it pauses.
        paused = _until(echo_server, lambda r: sum(w["backpressure"] for w in r["workers"]) > before)
        assert paused is not None, "the server never paused reading from a client that does not read"
        other = run_clients(*echo_server.address, connections=4, max_requests=200, duration=10)
        assert other.errors == {} and other.requests == 200
        got = recv_exactly(slow, len(payload))
        sender.join(10)
    assert got == payload


def test_reset_mid_request_does_not_disturb_others(echo_server):
    with echo_server.connect() as good:
        good.sendall(b"before")
        assert recv_exactly(good, 6) == b"before"
        bad = echo_server.connect()
        bad.sendall(_payload(1 << 20))  # the server is busy echoing this ...
        bad.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        bad.close()  # ... when the client resets
        for i in range(50):
            msg = f"after-{i}".encode()
            good.sendall(msg)
            assert recv_exactly(good, len(msg)) == msg


def test_half_close_still_gets_the_echo(echo_server):
    payload = _payload(300_000, seed=3)
    with echo_server.connect() as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == payload


# -- http --------------------------------------------------------------------------

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def test_http_pipelined_sixteen_deep(http_server):
    with http_server.connect() as s:
        s.sendall(GET * 16)
        responses = read_http_responses(s, 16)
    assert [r[0] for r in responses] == [200] * 16
    assert all(r[2] == b"Hello, World!" for r in responses)


def test_http_thousand_keepalive_requests_on_one_connection(http_server):
    with http_server.connect() as s:
        for _ in range(1000):
            s.sendall(GET)
            (status, _, body), = read_http_responses(s, 1)
            assert status == 200 and body == b"Hello, World!"


def test_http_malformed_gets_400_and_close(http_server):
    with http_server.connect() as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        data = recv_until_eof(s)
    assert data.startswith(b"HTTP/1.1 400 ")


def test_http_reset_mid_request_does_not_disturb_others(http_server):
    with http_server.connect() as good:
        good.sendall(GET)
        assert read_http_responses(good, 1)[0][0] == 200
        bad = http_server.connect()
        bad.sendall(b"GET / HTTP/1.1\r\nHo")
        bad.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        bad.close()
        for _ in range(20):
            good.sendall(GET)
            assert read_http_responses(good, 1)[0][0] == 200


def test_http_many_clients(http_server):
    res = run_clients(*http_server.address, connections=32, protocol="http",
                      max_requests=1000, duration=20)
    assert res.errors == {} and res.requests == 1000


# -- stop and stats (fresh servers: exact counts) -------------------------------------

@pytest.mark.parametrize("protocol", ["echo", "http"])
def test_stop_under_load_answers_every_request_received(request, combo, tmp_path, protocol):
    backend, mode, accept, extra = combo
    args = _serve_args(backend, mode, accept, extra, protocol)
    if protocol == "echo":
        args += ["--message-size", "64"]
    # The drain's bound in time is not what is tested here, and the slowest variant (512-byte
    # io_uring buffers) beside five other test workers on 2 CPUs once needed more than the
    # default 2 s: its connections were abandoned (reset) with answers unsent.
    args += ["--drain-timeout", "30"]
    srv = start_server(tmp_path, *args)
    per_conn, conns = 1500, []    # ~200 KB of answers per connection: under --max-output
    for i in range(8):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)   # before connect
        s.settimeout(20)
        s.connect(srv.address)
        if protocol == "http":
            s.sendall(GET * per_conn)
        else:
            s.sendall(_payload(64 * per_conn, seed=i))
        conns.append(s)
    # In flight at the stop: the server is answering (a record shows requests), and the
    # answers (>= 96 KB per connection) cannot all have reached clients that read nothing
    # and whose receive buffers hold 16 KB: the rest sits in the server, still to send.
    assert _until(srv, lambda r: r["totals"]["requests"] > 0), "the server answered nothing"
    answer_bytes = per_conn * 64    # an echo chunk; an http 200 with its headers is > 100 B
    assert answer_bytes > 4 * 16 * 1024
    final = srv.stop()
    for i, s in enumerate(conns):
        with s:
            if protocol == "http":
                responses = read_http_responses(s, per_conn)
                assert [r[0] for r in responses] == [200] * per_conn
                assert recv_until_eof(s) == b""
            else:
                assert recv_until_eof(s) == _payload(64 * per_conn, seed=i)
    assert final["totals"]["requests"] == 8 * per_conn
    assert final["clean"]
    assert final["totals"]["open"] == 0


@pytest.mark.parametrize("protocol", ["echo", "http"])
def test_stats_invariants_and_pinning(combo, tmp_path, protocol):
    backend, mode, accept, extra = combo
    args = _serve_args(backend, mode, accept, extra, protocol)
    if protocol == "echo":
        args += ["--message-size", "64"]
    srv = start_server(tmp_path, *args)

    short = run_clients(*srv.address, connections=8, mode="short", protocol=protocol,
                        max_requests=40, duration=20)
    long = run_clients(*srv.address, connections=2, mode="keepalive", protocol=protocol,
                       max_requests=100, duration=20)
    assert short.errors == {} and long.errors == {}
    assert short.requests == 40 and long.requests == 100

    # While it runs: each worker thread is pinned, seen from /proc/PID/task/TID.
    snaps = _wait_for_interval_record(srv)
    for w in snaps:
        status = open(f"/proc/{w['pid']}/task/{w['tid']}/status").read()
        allowed = [ln.split(":")[1].strip() for ln in status.splitlines()
                   if ln.startswith("Cpus_allowed_list")][0]
        assert allowed == str(w["cpu"])
        stat = open(f"/proc/{w['pid']}/task/{w['tid']}/stat").read()
        assert int(stat[stat.rindex(")") + 2:].split()[36]) == w["cpu"]

    final = srv.stop()
    workers = final["workers"]
    connections = short.connects + long.connects
    assert connections >= 42
    assert sum(w["accepted"] for w in workers) == connections
    assert final["totals"]["requests"] == 140
    assert sum(w["closed"] for w in workers) == connections
    assert all(w["open"] == 0 for w in workers)
    for w in workers:
        assert w["affinity"] == [w["cpu"]]
        assert w["last_cpu"] == w["cpu"]
        # The extras a window takes as levels are declared by the backend and exist.
        assert "max_pending" in w["extra_levels"]
        assert set(w["extra_levels"]) <= set(w["extra"]), set(w["extra_levels"]) - set(w["extra"])
        # Served 140 requests: the worker's thread CPU clock moved (exact, ns), and the
        # tick-sampled user/sys split cannot exceed what the clock says (+ one tick each).
        assert w["cpu_ns"] > 0
        assert w["user_s"] + w["sys_s"] <= w["cpu_ns"] / 1e9 + 0.03
    pids = {w["pid"] for w in workers}
    tids = {w["tid"] for w in workers}
    assert len(tids) == len(workers)
    assert len(pids) == (1 if mode == "thread" else len(workers))
    assert f"accepted: total {connections}," in srv.output


def _wait_for_interval_record(srv, timeout=10.0):
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(srv.stats_path) as f:
            recs = [json.loads(x) for x in f if x.strip()]
        recs = [r for r in recs if r["type"] == "interval"]
        if recs and all(w["tid"] for w in recs[-1]["workers"]):
            return recs[-1]["workers"]
        time.sleep(0.1)
    raise AssertionError("no interval stats record with every worker's tid")


# -- descriptors: a stopped server leaves none behind ----------------------------------

#: Leaks of a library a backend cannot close for it: the check still runs, as a strict
#: expected failure (it XPASSes, and fails, the day the library is fixed).
KNOWN_FD_LEAKS = {
    "rloop": "rloop 0.5.0 never closes its reactor: a closed (and collected) loop keeps its "
             "epoll fd and eventfd open, two descriptors per worker",
}


def _leak_params():
    out = []
    for name, cls in BACKENDS.items():
        for accept in ("shared", "dispatch"):
            if accept in cls.accept_strategies:
                marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_FD_LEAKS[name])]
                         if name in KNOWN_FD_LEAKS else [])
                out.append(pytest.param(name, accept, id=f"{name}-{accept}", marks=marks))
    return out


@pytest.mark.parametrize("backend, accept", _leak_params())
def test_a_stopped_server_leaves_no_descriptor_open(backend, accept):
    """Workers in this very process (thread mode): after a run, /proc/self/fd has nothing
    it did not have before - every multiplexer, eventfd, hand-off end and connection of
    the run closed by the backend itself (``_teardown``), not left to the collector."""
    from parallelnet.core import cli

    require_backend(backend)
    args = cli.build_parser().parse_args(["serve", "--backend", backend, "--port", "0",
                                          "--workers", WORKERS, "--accept", accept])
    assert fds_left_by_a_server_run(cli.config_from_args(args)) == {}
