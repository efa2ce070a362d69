"""``Server.start`` returns (and ``serve`` prints "listening on") only once every worker's
loop is armed: a worker that starts late would lose the first accept races, or miss a
short measurement, for a reason that has nothing to do with the design under test.

Exercised with small epoll subclasses that start slowly, die while starting, or never
say they are ready; the registered backends go through the same wait in every
conformance test (thread and process mode), and their snapshots say ``ready``.
"""

from __future__ import annotations

import socket
import time

import pytest

from conftest import BACKENDS, recv_exactly, require_backend
from parallelnet.core.backend import BackendError
from parallelnet.backends.epoll import EpollBackend
from parallelnet.core import server as server_mod

SLOW = 0.6


class SlowSecondWorker(EpollBackend):
    name = "slow-start"
    loops: dict = {}   # worker index -> its epoll object (the test reads their fdinfo)

    def _setup(self) -> None:
        if self.ctx.index == 1:
            time.sleep(SLOW)   # a worker that takes long to build its loop
        super()._setup()
        SlowSecondWorker.loops[self.ctx.index] = self._ep


def watched_fds(ep) -> set[int]:
    """The fds an epoll instance watches (``tfd:`` lines of its /proc fdinfo)."""
    with open(f"/proc/self/fdinfo/{ep.fileno()}") as f:
        return {int(line.split()[1]) for line in f if line.startswith("tfd:")}


class DiesWhileStarting(EpollBackend):
    name = "dies-starting"

    def _setup(self) -> None:
        if self.ctx.index == 1:
            raise OSError(12, "cannot allocate the loop")
        super()._setup()


class NeverReady(EpollBackend):
    name = "never-ready"

    def run(self) -> None:   # serves nothing, never calls ctx.stats.mark_ready()
        while not self.ctx.stop.is_set():
            time.sleep(0.01)


def _server(monkeypatch, cls, workers=2):
    monkeypatch.setattr(server_mod, "get_backend", lambda name: cls)
    return server_mod.Server(server_mod.ServerConfig(backend=cls.name, workers=workers))


def test_start_waits_for_a_slow_worker_then_both_race(monkeypatch):
    srv = _server(monkeypatch, SlowSecondWorker)
    t0 = time.monotonic()
    host, port = srv.start()
    try:
        took = time.monotonic() - t0
        assert took >= SLOW * 0.9, f"start returned after {took:.2f} s, before worker 1 was up"
        assert all(s["ready"] for s in srv.snapshots())
        # Both loops are armed when start returns: each worker's epoll watches the
        # listener.  (Which worker wins each race is the kernel's business: on an idle
        # machine one may win every one, so the burst below checks service, not the split.)
        listener = srv.listeners.sockets[0].fileno()
        for index in (0, 1):
            assert listener in watched_fds(SlowSecondWorker.loops[index]), index
        socks = []
        for i in range(32):
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(b"x")
            assert recv_exactly(s, 1) == b"x"
            socks.append(s)
        for s in socks:
            s.close()
    finally:
        assert srv.stop()
    accepted = [s["accepted"] for s in srv.snapshots()]
    assert sum(accepted) == 32, accepted


def test_a_worker_that_dies_while_starting_fails_start_at_once(monkeypatch):
    srv = _server(monkeypatch, DiesWhileStarting)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"worker 1 did not start: OSError.*cannot allocate"):
        srv.start()
    assert time.monotonic() - t0 < server_mod.READY_TIMEOUT / 2  # not a wait for the timeout
    assert not srv.workers.alive(), "the healthy worker was left running"


def test_a_backend_that_never_says_ready_is_named(monkeypatch):
    monkeypatch.setattr(server_mod, "READY_TIMEOUT", 0.5)
    srv = _server(monkeypatch, NeverReady, workers=1)
    with pytest.raises(BackendError, match=r"worker 0 did not start: .*mark_ready"):
        srv.start()
    assert not srv.workers.alive()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_backend_reports_ready_when_start_returns(backend):
    require_backend(backend)
    srv = server_mod.Server(server_mod.ServerConfig(backend=backend, workers=2))
    srv.start()
    try:
        assert [s["ready"] for s in srv.snapshots()] == [True, True]
    finally:
        assert srv.stop()
