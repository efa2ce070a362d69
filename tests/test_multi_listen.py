"""Two listening addresses in one server, for every registered backend (the registry's
parameters, like the conformance suite): one echo, one HTTP, on 127.0.0.1 and ::1 (where
::1 exists), in every mode and strategy the backend declares, driven in one run by the
load generator and by short connections; the counters must add up per listener.  A backend that declares one
address (``max_listeners`` 1) must refuse two with an error naming it.  Then the limits
(``--max-connections``, the timeouts, the drain) across both addresses.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import (
    BACKENDS, ipv6_loopback, read_http_responses, recv_exactly, recv_until_eof,
    require_backend, run_cli_serve_error, start_server,
)
from parallelnet.core.client import run_clients
from parallelnet.core.listeners import STRATEGIES, layout_of
from parallelnet.experiments.loadgen import LoadSpec, Target, run

V6 = ipv6_loopback()
SECOND = "[::1]" if V6 else "127.0.0.1"     # IPv4 + IPv6 where the machine has ::1
GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
TWO = ("--listen", "127.0.0.1:0,protocol=echo", "--listen", f"{SECOND}:0,protocol=http")


def _cases():
    out = []
    for name, cls in BACKENDS.items():
        if cls.max_listeners == 1:
            out.append(pytest.param((name, None, None, ()), id=f"{name}-refuses"))
            continue
        modes = sorted(cls.modes)
        for mode in modes:
            for strategy in STRATEGIES:
                if layout_of(strategy) not in cls.accept_strategies:
                    continue
                fast = mode == "thread" and strategy == "shared"
                out.append(pytest.param((name, mode, strategy, ()), id=f"{name}-{mode}-{strategy}",
                                        marks=() if fast else pytest.mark.slow))
        for variant in cls.conformance_variants:
            if "--accept" not in variant:
                out.append(pytest.param((name, modes[0], "shared", tuple(variant)),
                                        id=f"{name}-{modes[0]}-{'-'.join(a.strip('-') for a in variant)}",
                                        marks=pytest.mark.slow))
    return out


@pytest.mark.parametrize("case", _cases())
def test_two_listeners_one_echo_one_http(case, tmp_path):
    backend, mode, strategy, extra = case
    if mode is None:
        err = run_cli_serve_error("--backend", backend, *TWO)
        assert f"backend {backend!r} serves at most 1 listening address (its max_listeners)" in err
        assert "2 were given with --listen" in err
        return
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--mode", mode, "--accept", strategy,
                       "--workers", "2", "--message-size", "64", *TWO, *extra)
    assert [h for h, _ in srv.addresses] == ["127.0.0.1", "::1" if V6 else "127.0.0.1"]
    # One run of the load generator over both (connection slot i uses target i mod 2; each
    # slot keeps its one connection), then short connections to each, counted exactly.
    res = run(LoadSpec(targets=[Target(*srv.addresses[0], "echo"), Target(*srv.addresses[1], "http")],
                       connections=6, size=64, max_requests=300, warmup=0, duration=20))
    short = [run_clients(*srv.addresses[lid], connections=4, mode="short", protocol=protocol,
                         max_requests=n, duration=20)
             for lid, (protocol, n) in enumerate([("echo", 24), ("http", 16)])]
    final = srv.stop()
    assert res.ok, (res.message, res.errors)
    echo, http = res.targets
    assert echo.requests > 0 and http.requests > 0 and http.non2xx == 0
    assert [echo.connects, http.connects] == [3, 3]
    assert all(s.errors == {} for s in short) and [s.requests for s in short] == [24, 16]
    assert final["clean"], srv.output
    assert final["totals"]["requests"] == res.requests + 24 + 16
    expected = [3 + short[0].connects, 3 + short[1].connects]
    per = final["totals"]["per_listener"]
    assert [p["accepted"] for p in per] == expected, (per, srv.output)
    for w in final["workers"]:
        mine = w["per_listener"]
        assert len(mine) == 2
        assert sum(x["accepted"] for x in mine) == w["accepted"]
        assert sum(x["listen_wakeups"] for x in mine) == w["listen_wakeups"]
        if w["lost_races"] is not None:
            assert sum(x["lost_races"] for x in mine) == w["lost_races"]
            assert all(x["lost_races"] <= x["listen_wakeups"] for x in mine)
        if strategy in ("reuseport", "reuseport-cpu", "dispatch"):
            assert all(not x["lost_races"] for x in mine), mine
        if strategy == "dispatch":
            assert all(x["listen_wakeups"] == 0 for x in mine)
    if strategy == "dispatch":
        assert final["dispatcher"]["accepted_per_listener"] == expected
    labels = final["listeners"]
    assert labels[0].endswith("(echo)") and labels[1].endswith("(http)")
    assert f"listener 1 {labels[1]}: accepted " in srv.output    # the final table's lines


SEVERAL = [name for name, cls in BACKENDS.items() if cls.max_listeners != 1]


@pytest.mark.parametrize("backend", SEVERAL)
def test_limits_and_timeouts_hold_across_both_listeners(backend, tmp_path):
    """--max-connections counts the worker's connections on every address; the idle timeout
    and the request deadline close connections of either listener (the counters say
    which rule closed which)."""
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--workers", "1", *TWO,
                       "--max-connections", "3", "--idle-timeout", "2", "--header-timeout", "0.5",
                       "--stats-interval", "0.05")
    echo = srv.connect(listener=0, timeout=10)
    echo.sendall(b"ping")
    assert recv_exactly(echo, 4) == b"ping"
    http = srv.connect(listener=1, timeout=10)
    http.sendall(GET)
    assert read_http_responses(http, 1)[0][0] == 200
    slow = srv.connect(listener=1, timeout=10)
    slow.sendall(b"GET / HTTP/1.1\r\n")              # incomplete: the deadline cuts it
    assert _until(srv, lambda totals: totals["open"] == 3), "the third connection was not taken"
    over = srv.connect(listener=0, timeout=10)       # a fourth, on the other address: refused
    assert recv_until_eof(over) == b""
    assert recv_until_eof(slow) == b""
    assert recv_until_eof(echo) == b"" and recv_until_eof(http) == b""   # idle, both
    for s in (echo, http, slow, over):
        s.close()
    final = srv.stop()
    (w,) = final["workers"]
    assert w["refused"] == 1
    assert w["extra"]["header_timeouts"] == 1 and w["extra"]["idle_timeouts"] == 2, w["extra"]
    assert [p["accepted"] for p in w["per_listener"]] == [2, 2]
    assert final["clean"] and w["open"] == 0


def _payload(size: int, seed: int) -> bytes:
    return bytes((i * 131 + seed) & 0xFF for i in range(size))


@pytest.mark.parametrize("backend", SEVERAL)
def test_the_drain_answers_every_request_on_both_listeners(backend, tmp_path):
    """Stopped with answers in flight on both addresses: every request received on
    either one is answered before the connection closes."""
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--workers", "2", "--message-size", "64",
                       "--max-output", str(256 * 1024), "--stats-interval", "0.1", *TWO)
    per_conn, conns = 1500, []
    for i in range(6):
        listener = i % 2
        s = socket.socket(socket.AF_INET6 if ":" in srv.addresses[listener][0] else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)   # before connect
        s.settimeout(20)
        s.connect(srv.addresses[listener])
        s.sendall(GET * per_conn if listener else _payload(64 * per_conn, i))
        conns.append((s, listener))
    assert _until(srv, lambda totals: totals["requests"] > 0), "the server answered nothing"
    final = srv.stop()
    for i, (s, listener) in enumerate(conns):
        with s:
            if listener:
                assert [r[0] for r in read_http_responses(s, per_conn)] == [200] * per_conn
                assert recv_until_eof(s) == b""
            else:
                assert recv_until_eof(s) == _payload(64 * per_conn, i)
    assert final["totals"]["requests"] == 6 * per_conn
    assert [p["accepted"] for p in final["totals"]["per_listener"]] == [3, 3]
    assert final["clean"] and final["totals"]["open"] == 0


def _until(srv, pred, timeout: float = 10.0) -> bool:
    """Whether the totals of an interval record satisfy ``pred`` within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(srv.stats_path) as f:
            recs = [json.loads(x) for x in f if x.endswith("\n") and x.strip()]
        recs = [r for r in recs if r["type"] == "interval"]
        if recs and pred(recs[-1]["totals"]):
            return True
        time.sleep(0.05)
    return False
