"""Slowloris: the request deadline is total, from a request's first byte, for every backend.

``--header-timeout T`` closes a request still incomplete T seconds after its first byte,
however steadily it trickles (nginx's client_header_timeout); ``--header-min-rate R``
lets a request that keeps arriving at R B/s or faster go on (core/policy.py, rule request-deadline).
Parametrised over the registry: a backend is checked the moment it is registered; one
that does not enforce the rule yet gets an explicit outcome (conftest.policy_outcome).
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import BACKENDS, policy_outcome, read_http_responses, require_backend, start_server

HEADER_TIMEOUT = 2.0
TICK = HEADER_TIMEOUT / 4          # Limits.timer_tick(): a quarter of the shortest timeout
SLACK = 0.75                        # a loaded 2-vCPU machine: scheduling, not the rule


pytestmark = pytest.mark.slow   # seconds of trickling per backend


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    require_backend(request.param)
    return request.param


def _extra(srv, key: str) -> int:
    with open(srv.stats_path) as f:
        recs = [json.loads(x) for x in f if x.endswith("\n") and x.strip()]
    return sum(w["extra"].get(key, 0) for w in recs[-1]["workers"]) if recs else 0


def _trickle(sock: socket.socket, line: bytes, every: float, limit: float) -> float | None:
    """Send ``line`` every ``every`` s until the server closes (return when, since the
    first byte) or ``limit`` s pass (None)."""
    t0 = time.monotonic()
    sock.sendall(b"GET / HTTP/1.1\r\n")
    sock.settimeout(every)
    while time.monotonic() - t0 < limit:
        try:
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - t0
        except socket.timeout:
            pass
        except ConnectionResetError:
            return time.monotonic() - t0
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t0
    return None


def test_a_trickling_client_is_closed_at_its_deadline(request, backend, tmp_path):
    policy_outcome(request, backend, "header_timeout")
    srv = start_server(tmp_path, "--backend", backend, "--workers", "1", "--protocol", "http",
                       "--header-timeout", str(HEADER_TIMEOUT), "--idle-timeout", "30",
                       "--stats-interval", "0.1")
    with srv.connect() as s:
        # One header line every 0.5 s: progress all the time, never a whole request.
        closed_after = _trickle(s, b"X-Slow: yes\r\n", 0.5, 8.0)
    assert closed_after is not None, f"{backend}: a trickling request was never closed (8 s)"
    assert HEADER_TIMEOUT - 0.05 <= closed_after <= HEADER_TIMEOUT + TICK + SLACK, closed_after
    with srv.connect() as ok:   # the others are served
        ok.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_http_responses(ok, 1)[0][0] == 200
    time.sleep(0.3)
    assert _extra(srv, "header_timeouts") == 1
    final = srv.stop()
    assert final["clean"]


def test_the_deadline_restarts_with_each_request(request, backend, tmp_path):
    """Keep-alive: whole requests one after another, each started within its deadline,
    keep the connection longer than one deadline: the clock is per request (the older
    per-progress rule passes this too)."""
    policy_outcome(request, backend, "header_timeout")
    srv = start_server(tmp_path, "--backend", backend, "--workers", "1", "--protocol", "http",
                       "--header-timeout", "1", "--idle-timeout", "30")
    with srv.connect() as s:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:
            s.sendall(b"GET / HTTP/1.1\r\n")        # split: an incomplete request for 0.3 s
            time.sleep(0.3)
            s.sendall(b"Host: t\r\n\r\n")
            assert read_http_responses(s, 1)[0][0] == 200
    final = srv.stop()
    assert sum(w["extra"]["header_timeouts"] for w in final["workers"]) == 0


def test_min_rate_lets_a_steady_request_go_on_and_cuts_a_trickle(request, backend, tmp_path):
    policy_outcome(request, backend, "header_timeout", "header_min_rate")
    timeout, rate = 1.0, 200.0
    srv = start_server(tmp_path, "--backend", backend, "--workers", "1", "--protocol", "http",
                       "--header-timeout", str(timeout), "--header-min-rate", str(rate),
                       "--idle-timeout", "30")
    line = b"X-Pad: " + b"p" * 31 + b"\r\n"           # 40 bytes
    with srv.connect() as fast:
        # 400 B/s, twice the minimum, for 2.5 s (2.5 x the deadline): never cut.
        t0 = time.monotonic()
        fast.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        while time.monotonic() - t0 < 2.5:
            time.sleep(0.1)
            fast.sendall(line)
        fast.sendall(b"\r\n")
        assert read_http_responses(fast, 1)[0][0] == 200
    with srv.connect() as slow:
        # 80 B/s: the deadline start + 1 + bytes/200 is reached at 1 / (1 - 80/200) = 1.67 s.
        closed_after = _trickle(slow, line, 0.5, 8.0)
    assert closed_after is not None
    expected = timeout / (1 - 80 / rate)
    assert expected - 0.55 <= closed_after <= expected + timeout / 4 + SLACK, (closed_after, expected)
    final = srv.stop()
    assert sum(w["extra"]["header_timeouts"] for w in final["workers"]) == 1
