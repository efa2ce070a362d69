"""poll(2) through ``select.poll``: no fd-number limit, O(n) per call in the watched set.

Level-triggered only; the kernel rescans every registered fd on each call, which
is the cost the experiments show growing with the connection count.
"""

from __future__ import annotations

import select

from parallelnet.core.backend import Availability
from parallelnet.backends.readiness import ReadinessLoop


class PollBackend(ReadinessLoop):
    name = "poll"
    description = "select.poll (level-triggered, O(n) per wait)"

    EV_READ = select.POLLIN
    EV_WRITE = select.POLLOUT
    EV_ERROR = select.POLLERR | select.POLLHUP | select.POLLNVAL

    @classmethod
    def probe(cls) -> Availability:
        if not hasattr(select, "poll"):
            return Availability(False, "select.poll is missing on this platform")
        return Availability(True)

    def _setup(self) -> None:
        self._p = select.poll()

    def _register(self, fd: int, events: int, exclusive: bool = False) -> None:
        self._p.register(fd, events)

    def _modify(self, fd: int, events: int) -> None:
        self._p.modify(fd, events)

    def _unregister(self, fd: int) -> None:
        self._p.unregister(fd)

    def _poll(self, timeout: float | None):
        return self._p.poll(None if timeout is None else max(0, int(timeout * 1000)))
