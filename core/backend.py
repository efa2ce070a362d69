"""The worker interface: what the core gives one worker's event loop, and what it asks back.

The core owns everything that is not the event loop (listeners, workers, pinning,
stats, signals); a *backend* runs one worker's loop.  This module holds the types both
sides depend on, so dependencies point one way: ``parallelnet.backends.*`` import
``parallelnet.core``; the core never imports a concrete backend module — it finds them
through the entry-point registry below (``registry``/``get_backend``), at run time.

Kernel facts relied on here:

* ``eventfd(2)``: a counter fd that is readable while non-zero.  ``StopSignal`` writes 1
  to it; a loop that watches it wakes from ``epoll_wait``/``poll``/``select``/io_uring at
  once.  ``write(2)`` on an eventfd is async-signal-safe, so a signal handler may call
  ``set()``.

A backend is a ``Backend`` subclass with a ``name``, a ``kind`` and a ``run()``; how to
write one, step by step, is ``docs/adding-a-backend.md``.
"""

from __future__ import annotations

import abc
import argparse
import os
import socket
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable, ClassVar

from parallelnet.core.protocols import ProtocolSpec, spec_of
from parallelnet.core.stats import WorkerStats

ENTRY_POINT_GROUP = "parallelnet.backends"

#: Accept strategies as a backend sees them (core/listeners.py binds the sockets; a
#: backend lists the layouts it can serve in ``Backend.accept_strategies``).
SHARED = "shared"          # one listening socket in every worker's loop (the seed)
EXCLUSIVE = "exclusive"    # the same, registered with EPOLLEXCLUSIVE
REUSEPORT = "reuseport"    # one SO_REUSEPORT socket per worker
DISPATCH = "dispatch"      # no listener: connections arrive on ctx.handoff (core/handoff.py)
EXCLUSIVE_ROTATE = "exclusive-rotate"  # EXCLUSIVE, the listener re-added every ROTATE_EVERY accepts
ROTATE_EVERY = 16          # nginx re-adds its listener after this many accepts

#: What a backend's ``kind`` may be.  ``readiness``: the loop is told an fd can make
#: progress and makes the call itself, so it stops reading within one read of a limit.
#: ``completion``: the kernel performs the operation and reports it done, so a batch
#: already delivered may overshoot a limit (tests/test_faults.py bounds each kind).
KINDS = ("readiness", "completion")
MODES = ("thread", "process")


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
    """Per-worker resource limits (docs/faults.md; the rules: core/policy.py)."""

    recv_size: int = 65536          # bytes per read
    max_output: int = 1 << 20       # pending output per connection before reads pause
    max_connections: int = 10000    # per worker; beyond it new connections are closed at once
    drain_timeout: float = 2.0      # seconds to flush responses after stop
    idle_timeout: float = 60.0      # close a connection with no bytes in or out for this long (0: never)
    header_timeout: float = 10.0    # close a request still incomplete this long after its first byte (0: never)
    header_min_rate: float = 0.0    # bytes/s: each byte of an incomplete request extends its deadline by 1/rate s (0: off)
    accept_backoff: float = 0.05    # first pause of a listener after EMFILE/ENFILE (doubles, capped at 1 s)

    def timer_tick(self) -> float | None:
        """How often a loop checks connection deadlines: a coarse timer, a quarter of the
        shortest timeout, kept within [10 ms, 1 s]; None when no timeout is enabled."""
        ts = [t for t in (self.idle_timeout, self.header_timeout) if t and t > 0]
        if not ts:
            return None
        return min(1.0, max(0.01, min(ts) / 4))


class StopSignal:
    """A flag plus an eventfd, so that a worker blocked in its wait wakes at once.

    Loops watch ``fileno()``; any thread (or a signal handler in a forked worker) calls
    ``set()``.
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
    """Everything one worker's loop needs from the core.

    A server listens on one or more addresses; the *listener id* of an address is its
    position in ``--listen``.  ``listeners`` are the sockets this worker watches (all of
    them, in its one loop); ``listener_ids[i]`` is the id of the address
    ``listeners[i]`` serves (under reuseport each worker has its own socket per
    address).  ``protocols[id]`` is what that address serves; a connection accepted
    from, or handed over for, listener id L is served by ``protocols[L].factory()``.
    ``protocol_factory`` is ``protocols[0].factory`` (the one-address shorthand).
    """

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
    #: Parallel to ``listeners``: the listener id of each (default: all 0, one address,
    #: as before there were several).
    listener_ids: list[int] = field(default_factory=list)
    #: Indexed by listener id (default: one, ``protocol_factory``'s).
    protocols: list[ProtocolSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.listener_ids:
            self.listener_ids = [0] * len(self.listeners)
        if not self.protocols:
            self.protocols = [spec_of(self.protocol_factory)]
        if len(self.listener_ids) != len(self.listeners):
            raise ValueError("WorkerContext: listener_ids must be parallel to listeners")
        if any(not 0 <= lid < len(self.protocols) for lid in self.listener_ids):
            raise ValueError("WorkerContext: a listener id without a protocol")

    def option(self, name: str, default=None):
        return getattr(self.options, name, default)


class BackendError(RuntimeError):
    """A backend cannot run with the requested configuration."""


class Backend(abc.ABC):
    """One worker's event loop.  Subclass, set ``name`` and ``kind``, implement ``run``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: ``readiness`` or ``completion`` (see KINDS).  Required: the registry refuses a
    #: backend that does not say, since the suite's bounds depend on it.
    kind: ClassVar[str] = ""
    #: Accept strategies this backend serves; the core refuses others with a clear error.
    accept_strategies: ClassVar[frozenset[str]] = frozenset({SHARED, REUSEPORT})
    #: Whether workers may be threads of one process / forked processes.
    modes: ClassVar[frozenset[str]] = frozenset(MODES)
    #: How many listening addresses (``--listen``) one worker's loop can serve at once:
    #: None = any number.  A backend that does not declare it serves one; the core
    #: refuses more with an error naming the backend.  One that serves several counts
    #: ``stats.per_listener[id]`` itself and serves each connection by
    #: ``ctx.protocols[id]``; with one, its worker totals are that listener's figures.
    max_listeners: ClassVar[int | None] = 1
    #: Limits this backend cannot enforce: ``Limits`` field name -> why.  Declared, never
    #: silently ignored: an explicit flag for one (``--idle-timeout 5``) is refused at
    #: startup with the reason; left at its default it is disabled with a warning.
    unsupported_limits: ClassVar[dict[str, str]] = {}
    #: Extra ``serve`` arguments the conformance suite runs this backend with, one
    #: configuration per entry (a backend-specific mode: ``("--epoll-edge",)``).  An entry
    #: may name its own strategy: ``("--accept", "dispatch", "--x-handoff", "y")``.
    conformance_variants: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    @classmethod
    def probe(cls) -> Availability:
        """Cheap, honest check that this backend can run here."""
        return Availability(True)

    @classmethod
    def unsupported(cls, limit: str) -> str | None:
        """Why this backend does not enforce ``limit`` (a ``Limits`` field), or None."""
        return cls.unsupported_limits.get(limit)

    @classmethod
    def preflight(cls, limits: Limits, options: argparse.Namespace) -> None:
        """Check, in the parent before any worker starts, that this configuration can run;
        raise BackendError with the precise reason (e.g. a ring that cannot be created)."""

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
        the object the dispatcher hands connections through (``send(fd)``,
        ``transfers``, ``kind``, ``close()``; see core/handoff.py's ``SocketChannel``)."""
        return None

    @abc.abstractmethod
    def run(self) -> None:
        """Serve until ``ctx.stop`` is set, drain, close every connection, return."""


def check_declarations(cls) -> str | None:
    """What is wrong with a registered class's declarations, or None."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        return f"{cls!r} is not a parallelnet Backend subclass"
    if cls.kind not in KINDS:
        return f"{cls.__name__}.kind is {cls.kind!r}; declare one of {', '.join(KINDS)}"
    if not cls.modes or not set(cls.modes) <= set(MODES):
        return f"{cls.__name__}.modes {sorted(cls.modes)!r}: expected a subset of {MODES}"
    limit = cls.max_listeners
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        return f"{cls.__name__}.max_listeners is {limit!r}; declare None (any) or an int >= 1"
    for variant in cls.conformance_variants:
        if isinstance(variant, str) or not all(isinstance(a, str) for a in variant):
            return f"{cls.__name__}.conformance_variants: each entry is a tuple of strings"
    return None


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load(ep) -> type[Backend]:
    """The class an entry point names, or a stand-in whose probe says why it cannot be."""
    try:
        cls = ep.load()
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        return _unloadable(ep.name, f"cannot import {ep.value}: {exc!r}")
    wrong = check_declarations(cls)
    return _unloadable(ep.name, f"{ep.value}: {wrong}") if wrong else cls


def backend_names() -> list[str]:
    """The names registered under the entry-point group, sorted, without importing any
    backend module (``serve --backend X`` imports X's module only)."""
    return sorted(_entry_points())


def registry() -> dict[str, type[Backend]]:
    """Every backend registered under the entry-point group, by name (each module imported).

    A backend whose module fails to import, or whose declarations are incomplete, is
    still listed, as a stand-in whose probe reports why: a broken plugin must not hide
    the others, and must not pass unnoticed either.
    """
    return {name: _load(ep) for name, ep in sorted(_entry_points().items())}


def get_backend(name: str) -> type[Backend]:
    """One backend by name, importing its module alone (a broken one: as in ``registry``)."""
    eps = _entry_points()
    if name not in eps:
        raise BackendError(f"unknown backend {name!r}; registered: {', '.join(sorted(eps))}")
    return _load(eps[name])


def _unloadable(name: str, reason: str) -> type[Backend]:
    class Unloadable(Backend):
        description = "(failed to load)"
        kind = "readiness"

        @classmethod
        def probe(cls) -> Availability:
            return Availability(False, reason)

        def run(self) -> None:
            raise BackendError(reason)

    Unloadable.name = name
    return Unloadable
