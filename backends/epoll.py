"""epoll(7) through ``select.epoll``: level-triggered by default, ``--epoll-edge`` for EPOLLET.

One epoll instance per worker.  The shared listening socket is in every worker's
interest list; with ``--accept exclusive`` it is added with ``EPOLLEXCLUSIVE``
(Linux >= 4.5), which the kernel only accepts at ``EPOLL_CTL_ADD`` time and never
with ``EPOLL_CTL_MOD`` — the loop registers listeners once and never modifies them.
"""

from __future__ import annotations

import argparse
import select
import time

from parallelnet.core.backend import (
    DISPATCH, EXCLUSIVE, EXCLUSIVE_ROTATE, REUSEPORT, SHARED, Availability,
)
from parallelnet.backends.readiness import ReadinessLoop


class EpollBackend(ReadinessLoop):
    name = "epoll"
    description = "select.epoll, level-triggered (or edge with --epoll-edge)"
    accept_strategies = frozenset({SHARED, EXCLUSIVE, EXCLUSIVE_ROTATE, REUSEPORT, DISPATCH})
    conformance_variants = (("--epoll-edge",),)

    EV_READ = select.EPOLLIN
    EV_WRITE = select.EPOLLOUT
    EV_ERROR = select.EPOLLERR | select.EPOLLHUP

    @classmethod
    def probe(cls) -> Availability:
        if not hasattr(select, "epoll"):
            return Availability(False, "select.epoll is missing (not Linux?)")
        try:
            select.epoll().close()
        except OSError as exc:
            return Availability(False, f"epoll_create1 failed: {exc}")
        return Availability(True)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--epoll-edge", action="store_true",
                            help="epoll: edge-triggered (EPOLLET) connections, read/write until EAGAIN")
        parser.add_argument("--epoll-latency-budget-us", type=int, default=0, metavar="US",
                            help="epoll: io_uring's batching-window policy (backends/window.py): "
                                 "while the arrival rate fills it, gather a wait's events for up "
                                 "to US microseconds (default 0: off)")

    def _make_window(self):
        budget = int(self.ctx.option("epoll_latency_budget_us", 0) or 0)
        if budget < 0:
            raise ValueError(f"--epoll-latency-budget-us must be >= 0, got {budget}")
        if not budget:
            return None
        from parallelnet.backends.window import LatencyWindow

        self.ctx.stats.extra.update(windowed_waits=0, window_nr=0)
        self.ctx.stats.declare_levels("window_nr")   # the last batch asked for, not a count
        return LatencyWindow(budget)

    def _setup(self) -> None:
        self.edge_triggered = bool(self.ctx.option("epoll_edge", False))
        self._flag = select.EPOLLET if self.edge_triggered else 0
        self._ep = select.epoll()
        # Enough slots for a busy wakeup; more events simply wait for the next call.
        self._maxevents = 1024

    def _register(self, fd: int, events: int, exclusive: bool = False) -> None:
        flags = select.EPOLLEXCLUSIVE if exclusive else self._flag
        self._ep.register(fd, events | flags)

    def _modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events | self._flag)

    def _unregister(self, fd: int) -> None:
        self._ep.unregister(fd)

    def _poll(self, timeout: float | None):
        window = self._window
        if window is None:
            return self._ep.poll(-1 if timeout is None else timeout, self._maxevents)
        t0 = time.monotonic()
        events = self._ep.poll(-1 if timeout is None else timeout, self._maxevents)
        now = time.monotonic()
        nr = window.batch(len(self._conns), self._queued)
        if nr and len(events) < nr and now - t0 < window.budget:
            # The rest of the window: what arrives meanwhile is gathered by one more wait
            # that does not block (backends/window.py).
            time.sleep(window.budget - (now - t0))
            more = self._ep.poll(0, self._maxevents)
            if more:
                merged = dict(events)
                for fd, mask in more:
                    merged[fd] = merged.get(fd, 0) | mask
                events = list(merged.items())
            extra = self.ctx.stats.extra
            extra["windowed_waits"] += 1
            extra["window_nr"] = nr
            now = time.monotonic()
        window.update(now, len(events))
        return events

    def _teardown(self) -> None:
        self._ep.close()
