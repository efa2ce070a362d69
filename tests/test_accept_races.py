"""What each accept strategy promises, checked in every mode a backend declares for it.

* ``shared``: several workers watch one socket; a burst wakes more than one, all but the
  first find the queue empty: the lost race is counted (``lost_races > 0``).
* ``reuseport``/``reuseport-cpu``: one socket per worker - nobody else takes from its
  queue, so no race is ever lost.
* ``dispatch``: workers never touch a listener: no listen wakeup, no race; every
  connection arrives as a hand-off.
* ``exclusive-rotate``: the listener is re-added every 16 accepts (``rotations``).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import BACKENDS, require_backend, start_server
from parallelnet.core.client import run_clients
from parallelnet.core.listeners import STRATEGIES, layout_of


def _cases():
    out = []
    for name, cls in BACKENDS.items():
        for strategy in STRATEGIES:
            if layout_of(strategy) not in cls.accept_strategies:
                continue
            for mode in sorted(cls.modes):
                out.append(pytest.param((name, strategy, mode), id=f"{name}-{strategy}-{mode}"))
    return out


def _lost(w) -> int:
    return w["lost_races"] or 0   # None: not observable by this backend (io_uring)


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases())
def test_strategy_invariants_in_every_mode(case, tmp_path):
    backend, strategy, mode = case
    require_backend(backend)
    args = ["--backend", backend, "--accept", strategy, "--mode", mode, "--workers", "2"]
    srv = start_server(tmp_path, *args)
    res = run_clients(*srv.address, connections=4, mode="short", max_requests=60, duration=20)
    final = srv.stop()
    assert res.errors == {} and res.requests == 60
    workers = final["workers"]
    assert sum(w["accepted"] for w in workers) == res.connects
    if strategy in ("reuseport", "reuseport-cpu", "dispatch"):
        assert all(_lost(w) == 0 for w in workers), workers
    if strategy == "dispatch":
        assert all(w["listen_wakeups"] == 0 for w in workers)
        assert [w["extra"]["handoffs"] for w in workers] == [w["accepted"] for w in workers]
    if strategy == "exclusive-rotate":
        # 60 connections over 2 workers: one of them accepted >= 16, so it re-added.
        assert sum(w["extra"]["rotations"] for w in workers) >= 1, workers
    assert final["clean"]


# Backends whose empty listen wakeups are lost races (rloop's reactor also wakes for nothing,
# so it reports lost_races as not observable: backends/rloop_.py).
RACERS = [pytest.param(name, id=name) for name, cls in BACKENDS.items()
          if cls.kind == "readiness" and "shared" in cls.accept_strategies
          and getattr(cls, "empty_wakeups_are_races", lambda self: True)(None)]


@pytest.mark.parametrize("backend", RACERS)
def test_a_burst_on_a_shared_socket_counts_lost_races(backend, tmp_path):
    """Four workers on one socket, bursts of connections: some wakeups find the queue
    already emptied by another worker, and each such wakeup is counted."""
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--accept", "shared", "--workers", "4")
    try:
        for _ in range(20):                      # bounded: 20 bursts of 48 connections
            socks = []
            barrier = threading.Barrier(4)

            def burst():
                barrier.wait(5)
                for _ in range(12):
                    socks.append(socket.create_connection(srv.address, timeout=5))

            threads = [threading.Thread(target=burst) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            time.sleep(0.05)
            for s in socks:
                s.close()
    finally:
        final = srv.stop()
    lost = sum(w["lost_races"] for w in final["workers"])
    accepted = sum(w["accepted"] for w in final["workers"])
    assert accepted == 20 * 48
    assert lost > 0, final["workers"]
    assert lost <= sum(w["listen_wakeups"] for w in final["workers"])
