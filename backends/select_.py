"""select(2) through ``select.select``: the oldest multiplexer, bounded by FD_SETSIZE.

glibc's ``fd_set`` is a fixed bitmap of FD_SETSIZE (1024) bits: an fd numbered
1024 or above cannot be watched at all (writing its bit would overrun the set), and
CPython's ``select.select`` raises ``ValueError`` for it.  This backend refuses such
a connection at registration time — it is closed and counted as ``refused`` — so the
worker keeps serving the others instead of failing on its next wait.
"""

from __future__ import annotations

import select

from parallelnet.core.backend import Availability
from parallelnet.backends.readiness import ReadinessLoop, RegistrationRefused

FD_SETSIZE = 1024  # glibc's constant; not exposed by Python


class SelectBackend(ReadinessLoop):
    name = "select"
    description = f"select.select (level-triggered, fds < FD_SETSIZE={FD_SETSIZE})"

    EV_READ = 1
    EV_WRITE = 4
    EV_ERROR = 0  # select reports errors as readable/writable

    @classmethod
    def probe(cls) -> Availability:
        return Availability(True, detail=f"FD_SETSIZE={FD_SETSIZE}")

    def _setup(self) -> None:
        self._readers: set[int] = set()
        self._writers: set[int] = set()

    def _register(self, fd: int, events: int, exclusive: bool = False) -> None:
        if fd >= FD_SETSIZE:
            raise RegistrationRefused(f"fd {fd} >= FD_SETSIZE ({FD_SETSIZE}); select cannot watch it")
        self._modify(fd, events)

    def _modify(self, fd: int, events: int) -> None:
        if events & self.EV_READ:
            self._readers.add(fd)
        else:
            self._readers.discard(fd)
        if events & self.EV_WRITE:
            self._writers.add(fd)
        else:
            self._writers.discard(fd)

    def _unregister(self, fd: int) -> None:
        self._readers.discard(fd)
        self._writers.discard(fd)

    def _poll(self, timeout: float | None):
        r, w, _ = select.select(self._readers, self._writers, (), timeout)
        if not w:
            return [(fd, 1) for fd in r]
        ready: dict[int, int] = {fd: 1 for fd in r}
        for fd in w:
            ready[fd] = ready.get(fd, 0) | 4
        return list(ready.items())
