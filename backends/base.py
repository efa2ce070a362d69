"""The backend interface: one worker's event loop, swappable.

The core (``parallelnet.core.server``) owns everything that is not the event loop:
binding the listening sockets, starting workers (threads or forked processes),
pinning each to its CPU, stats collection, signals.  A backend gets a
``WorkerContext`` and runs one worker's loop in the calling thread: it registers
its sources of connections with the kernel, calls ``ctx.stats.mark_ready()`` (the
server says "listening on" only once every worker has), and serves until
``ctx.stop`` is set, then drains (finishes responses to requests already received,
within ``ctx.limits.drain_timeout``) and closes its connections.  It never closes
the listening sockets: the core owns them.

Two families:

* readiness backends (select, poll, epoll) subclass ``ReadinessLoop``
  (readiness.py), which implements the accept race, reads, protocol calls, writes,
  backpressure and close once; a subclass supplies only register / modify /
  unregister / poll.
* completion backends (io_uring) own their loop: they submit operations and reap
  completions, with buffers pinned until the kernel is done with them.  They, and
  any backend that owns its loop, call ``ctx.stats.mark_ready()`` themselves.

Adding a backend
----------------
One module and one entry point.  In your own package::

    # mypkg/kqueue_backend.py  (or anything)
    from parallelnet.backends.base import Availability
    from parallelnet.backends.readiness import ReadinessLoop

    class MyPollBackend(ReadinessLoop):
        name = "mypoll"
        description = "select.poll, but mine"

        @classmethod
        def probe(cls):
            return Availability(True, "")

        def _setup(self):            # create the poll object
            ...
        def _register(self, fd, events): ...
        def _modify(self, fd, events): ...
        def _unregister(self, fd): ...
        def _poll(self, timeout):    # -> list of (fd, backend-native event mask)
            ...

and in its ``pyproject.toml``::

    [project.entry-points."parallelnet.backends"]
    mypoll = "mypkg.kqueue_backend:MyPollBackend"

After ``pip install``, ``parallelnet backends`` lists it, ``parallelnet serve
--backend mypoll`` runs it, and the conformance suite (tests/test_conformance.py)
tests it, since it parametrises over every registered backend.
"""

from __future__ import annotations

import abc
import argparse
import errno
import logging
import os
import socket
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable, ClassVar

from parallelnet.core.stats import WorkerStats

ENTRY_POINT_GROUP = "parallelnet.backends"

#: Accept strategies the core knows.  A backend lists the ones it can serve.
SHARED = "shared"          # one listening socket in every worker's loop (the seed)
EXCLUSIVE = "exclusive"    # the same, registered with EPOLLEXCLUSIVE
REUSEPORT = "reuseport"    # one SO_REUSEPORT socket per worker
DISPATCH = "dispatch"      # no listener: connections arrive on ctx.handoff (core/dispatch.py)
EXCLUSIVE_ROTATE = "exclusive-rotate"  # EXCLUSIVE, the listener re-added every ROTATE_EVERY accepts
ROTATE_EVERY = 16          # nginx re-adds its listener after this many accepts


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, precisely why."""

    ok: bool
    reason: str = ""
    detail: str = ""   # extra facts worth showing even when ok (flags, versions)

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class Limits:
    """Per-worker resource limits (see the README's 'Limits' section)."""

    recv_size: int = 65536          # bytes per read
    max_output: int = 1 << 20       # pending output per connection before reads pause
    max_connections: int = 10000    # per worker; beyond it new connections are closed at once
    drain_timeout: float = 2.0      # seconds to flush responses after stop
    idle_timeout: float = 60.0      # close a connection with no bytes in or out for this long (0: never)
    header_timeout: float = 10.0    # close one holding an incomplete request this long without progress (0: never)
    accept_backoff: float = 0.05    # first pause of a listener after EMFILE/ENFILE (doubles, capped at 1 s)

    def timer_tick(self) -> float | None:
        """How often a loop checks connection deadlines: a coarse timer, a quarter of the
        shortest timeout, kept within [10 ms, 1 s]; None when no timeout is enabled."""
        ts = [t for t in (self.idle_timeout, self.header_timeout) if t and t > 0]
        if not ts:
            return None
        return min(1.0, max(0.01, min(ts) / 4))


#: errno values of accept(2) that mean "out of a resource", not "this connection failed":
#: retrying at once would fail again, so the listener is paused and retried after a back-off.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_MAX = 1.0
#: accept(2) errors that lose one connection (the peer gave up in the queue...), not the listener.
_ACCEPT_ONE_LOST = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

_accept_log = logging.getLogger("parallelnet.worker")


def accept_pending(lsock: socket.socket, extra: dict, who: str
                   ) -> tuple[list[tuple[socket.socket, object]], OSError | None]:
    """Accept until EAGAIN (the seed's rule), for loops that accept themselves.

    Returns the (socket, peer) pairs accepted and, when accept failed for want of fds or
    memory, that error: the caller must pause the listener, since retrying at once would
    fail at once (a level-triggered loop would spin).  Every failure is counted in
    ``extra["accept_errors"]``.
    """
    accepted = []
    while True:
        try:
            accepted.append(lsock.accept())
        except BlockingIOError:
            return accepted, None
        except InterruptedError:
            continue
        except OSError as exc:
            extra["accept_errors"] += 1
            if exc.errno in ACCEPT_RESOURCE_ERRORS:
                return accepted, exc
            if exc.errno not in _ACCEPT_ONE_LOST:
                _accept_log.warning("%s: accept failed: %s", who, exc)
                return accepted, None


class StopSignal:
    """A flag plus an eventfd, so that a worker blocked in its wait wakes at once.

    Readiness loops register ``fileno()``; any thread (or a signal handler in a
    forked worker) calls ``set()``.  Writing to an eventfd is async-signal-safe.
    """

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            try:
                os.eventfd_write(self._fd, 1)
            except OSError:
                pass

    def is_set(self) -> bool:
        return self._set

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class WorkerContext:
    """Everything one worker's loop needs from the core."""

    index: int
    cpu: int | None
    listeners: list[socket.socket]
    accept: str
    protocol_factory: Callable[[], object]
    stats: WorkerStats
    stop: StopSignal
    limits: Limits = field(default_factory=Limits)
    options: argparse.Namespace = field(default_factory=argparse.Namespace)
    #: With --accept dispatch: the worker's end of its hand-off channel (SCM_RIGHTS).
    handoff: socket.socket | None = None

    def option(self, name: str, default=None):
        return getattr(self.options, name, default)


class Backend(abc.ABC):
    """One worker's event loop.  Subclass, set ``name``, implement ``run``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Accept strategies this backend serves; the core refuses others with a clear error.
    accept_strategies: ClassVar[frozenset[str]] = frozenset({SHARED, REUSEPORT})
    #: Whether workers may be threads of one process / forked processes.
    modes: ClassVar[frozenset[str]] = frozenset({"thread", "process"})
    #: Limits this backend cannot enforce: ``Limits`` field name -> why.  Declared, never
    #: silently ignored: an explicit flag for one (``--idle-timeout 5``) is refused at
    #: startup with the reason; left at its default it is disabled with a warning.
    #: Keys: idle_timeout, header_timeout, max_connections, max_output
    #: (docs/faults.md; tests/test_faults.py checks both outcomes for every backend).
    unsupported_limits: ClassVar[dict[str, str]] = {}

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    @classmethod
    def probe(cls) -> Availability:
        """Cheap, honest check that this backend can run here."""
        return Availability(True)

    @classmethod
    def preflight(cls, limits: Limits, options: argparse.Namespace) -> None:
        """Check, in the parent before any worker starts, that this configuration can run;
        raise BackendError with the precise reason (e.g. a ring that cannot be created).
        A failure here is a clear startup error rather than a worker that dies later."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add backend-specific options to ``parallelnet serve`` (names prefixed by backend)."""

    @classmethod
    def own_handoff(cls, options: argparse.Namespace) -> str | None:
        """The name of this backend's own ``--accept dispatch`` channel if ``options``
        select one (e.g. uring's ``msg-ring``), else None: the socketpair every backend
        waits on.  An own channel targets the worker inside this process, so the core
        allows it only with ``--accept dispatch`` in thread mode."""
        return None

    def handoff_channel(self):
        """Called by the core once this worker is ready, when ``own_handoff`` named one:
        the object the dispatcher hands connections through (see core/dispatch.py's
        ``SocketChannel`` for the interface: ``send(fd)``, ``transfers``, ``kind``,
        ``close()``)."""
        return None

    @abc.abstractmethod
    def run(self) -> None:
        """Serve until ``ctx.stop`` is set, drain, close every connection, return."""


class BackendError(RuntimeError):
    """A backend cannot run with the requested configuration."""


def registry() -> dict[str, type[Backend]]:
    """Every backend registered under the entry-point group, by name.

    A backend whose module fails to import is still listed, as a stand-in whose
    probe reports the import error: a broken plugin must not hide the others.
    """
    found: dict[str, type[Backend]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            cls = _unloadable(ep.name, f"cannot import {ep.value}: {exc!r}")
        found[ep.name] = cls
    return dict(sorted(found.items()))


def get_backend(name: str) -> type[Backend]:
    backends = registry()
    try:
        return backends[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; registered: {', '.join(backends)}") from None


def _unloadable(name: str, reason: str) -> type[Backend]:
    class Unloadable(Backend):
        description = "(failed to load)"

        @classmethod
        def probe(cls) -> Availability:
            return Availability(False, reason)

        def run(self) -> None:
            raise BackendError(reason)

    Unloadable.name = name
    return Unloadable
