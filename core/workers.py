"""Workers behind one small interface: started in order, watched, stopped - threads or processes.

``Server`` asks a ``Workers`` object for five things: start them (each armed before the
next), tell which are ready or dead, snapshot their counters, stop them, and (thread
mode) hand over a live backend.  ``ThreadWorkers`` is here; ``ProcessWorkers`` and its
fork handshake are core/forked.py, which builds on this module (never the reverse);
core/server.py picks one of them by ``--mode``.

Why in order: the order in which loops register a shared listener is the order of the
socket's wait queue, and with EPOLLEXCLUSIVE (or io_uring's accept, which waits the same
way) the head is offered every new connection first.  Left to a start-up race, the accept
split of identical runs fell into two regimes; started in order, worker 0 is always the
head (docs/server.md).

Kernel facts relied on:

* ``sched_setaffinity(0, ...)`` pins the calling *thread* (Linux takes a tid; 0 = me), so
  each worker pins itself from inside its own thread (core/cpus.py).
* a thread's CPU clock and ``/proc/PID/task/TID/stat`` are readable from any thread of
  the process, so thread-mode snapshots are taken directly (core/stats.py).
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from typing import Callable

from parallelnet.core.backend import Backend, StopSignal, WorkerContext
from parallelnet.core.cpus import pin_current_thread
from parallelnet.core.stats import WorkerStats

log = logging.getLogger("parallelnet.server")

ContextFactory = Callable[[int, StopSignal], WorkerContext]


def serve_worker(backend_cls: type[Backend], ctx: WorkerContext,
                 keep: Callable[[int, Backend], None] | None = None) -> None:
    """Body of one worker, in its own thread: pin, record, run the loop, record the end.
    A crash is kept in ``stats.crashed`` (and logged), never raised."""
    stats = ctx.stats
    try:
        if ctx.cpu is not None:
            pin_current_thread(ctx.cpu)
        stats.bind_current_thread()
        backend = backend_cls(ctx)
        if keep is not None:
            keep(ctx.index, backend)
        backend.run()
    except BaseException as exc:  # noqa: BLE001 - reported in stats and the log
        stats.crashed = f"{type(exc).__name__}: {exc}"
        log.exception("worker %d crashed", ctx.index)
    finally:
        stats.record_exit()


class Workers(abc.ABC):
    """The workers of one server."""

    def __init__(self, backend_cls: type[Backend], stats: list[WorkerStats],
                 context: ContextFactory) -> None:
        self.backend_cls = backend_cls
        self.stats = stats
        self.context = context
        self.stopping = False

    @abc.abstractmethod
    def start(self, deadline: float) -> None:
        """Start every worker, each once the previous one is armed (or ``deadline``)."""

    @abc.abstractmethod
    def _states(self, count: int) -> list[dict]:
        """``{"ready": bool, "crashed": str}`` of the first ``count`` workers."""

    @abc.abstractmethod
    def dead(self) -> dict[int, str]:
        """Workers that ended before a stop was requested: index -> why."""

    @abc.abstractmethod
    def snapshots(self) -> list[dict]:
        """Every worker's counters now (``WorkerStats.snapshot`` records)."""

    @abc.abstractmethod
    def request_stop(self) -> None:
        """Ask every worker to stop accepting and drain (idempotent)."""

    @abc.abstractmethod
    def join(self, timeout: float | None) -> bool:
        """Wait for every worker to end; True if all did within ``timeout``."""

    def kill(self) -> None:
        """Force every worker to end now (processes: SIGKILL by PID)."""

    def close(self) -> None:
        """Release what the workers' stop signals hold."""

    def backend(self, index: int) -> Backend | None:
        """The live backend of a worker, where it lives in this process (thread mode)."""
        return None

    def closed_counts(self) -> list[int]:
        """Connections each worker has closed (for least-connections dispatch)."""
        return [snap.get("closed", 0) for snap in self.snapshots()]

    def wait_ready(self, timeout: float, count: int | None = None) -> dict[int, str]:
        """Wait until the first ``count`` (default: all) workers' loops are armed
        (``WorkerStats.mark_ready``).  Returns the ones that never got there (index ->
        why): they died first, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        count = len(self.stats) if count is None else count
        late = (f"its loop was not armed within {timeout:g} s "
                "(a backend calls ctx.stats.mark_ready() once it is)")
        while True:
            dead = self.dead()
            missing = {i: dead.get(i) or state.get("crashed") or late
                       for i, state in enumerate(self._states(count)) if not state.get("ready")}
            if not missing:
                return {}
            if time.monotonic() >= deadline or any(i in dead for i in missing):
                return missing
            time.sleep(0.002)


class ThreadWorkers(Workers):
    """Workers as threads of this process; their ``WorkerStats`` are read directly."""

    def __init__(self, backend_cls, stats, context) -> None:
        super().__init__(backend_cls, stats, context)
        self._stops: list[StopSignal] = []
        self._threads: list[threading.Thread] = []
        self._backends: dict[int, Backend] = {}
        self._dead: dict[int, str] = {}

    def start(self, deadline: float) -> None:
        for i in range(len(self.stats)):
            stop = StopSignal()
            self._stops.append(stop)
            t = threading.Thread(target=serve_worker,
                                 args=(self.backend_cls, self.context(i, stop), self._keep),
                                 name=f"worker-{i}", daemon=True)
            self._threads.append(t)
            t.start()
            self.wait_ready(max(0.0, deadline - time.monotonic()), count=i + 1)

    def _keep(self, index: int, backend: Backend) -> None:
        self._backends[index] = backend

    def backend(self, index: int) -> Backend | None:
        return self._backends.get(index)

    def _states(self, count: int) -> list[dict]:
        return [{"ready": bool(s.ready), "crashed": s.crashed} for s in self.stats[:count]]

    def dead(self) -> dict[int, str]:
        if not self.stopping:
            for i, t in enumerate(self._threads):
                if not t.is_alive() and i not in self._dead:
                    self._dead[i] = self.stats[i].crashed or "worker thread exited"
        return dict(self._dead)

    def snapshots(self) -> list[dict]:
        return [s.snapshot() for s in self.stats]

    def closed_counts(self) -> list[int]:
        return [s.closed for s in self.stats]   # live, without a whole snapshot

    def request_stop(self) -> None:
        self.stopping = True
        for stop in self._stops:
            stop.set()

    def join(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.alive()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        for stop in self._stops:
            stop.close()

