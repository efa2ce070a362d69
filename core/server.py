"""The server: listeners, pinned workers (threads or forked processes), the dispatcher, stop.

The seed's design: N workers, each pinned to one CPU, each running its own event
loop (a backend instance) over its own connections; all of them watch the same
listening sockets - one or more addresses (``ServerConfig.listen``), every one in
every loop - and race to accept.  Each address may serve its own protocol.  This module puts the parts together: it checks
the configuration against what the backend declares, binds the listeners
(core/listeners.py), starts the workers through one interface (core/workers.py: threads;
core/forked.py: forked processes and their handshake), starts the acceptor of
``--accept dispatch`` (core/dispatch.py) once every worker is armed, and stops them.

It never imports a backend module: the backend class comes from the registry
(core/backend.py), by name.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field

from parallelnet.core.backend import (
    MODES, Backend, BackendError, Limits, StopSignal, WorkerContext, get_backend,
)
from parallelnet.core.cpus import allowed_cpus, assign_cpus, format_cpu_list
from parallelnet.core.dispatch import Dispatcher, DispatcherError
from parallelnet.core.handoff import make_channels
from parallelnet.core.addresses import ListenSpec, format_address
from parallelnet.core.listeners import (
    ListenerSet, SocketBuffers, check_addresses, is_loopback, layout_of, open_listeners,
)
from parallelnet.core.protocols import ProtocolSpec, make_spec
from parallelnet.core.stats import WorkerStats
from parallelnet.core.forked import ProcessWorkers
from parallelnet.core.workers import ThreadWorkers, Workers

log = logging.getLogger("parallelnet.server")

READY_TIMEOUT = 15.0     # seconds start() waits for every worker's loop to be armed


@dataclass
class ServerConfig:
    backend: str = "epoll"
    workers: int | None = None
    cpus: list[int] | None = None
    pin: bool = True
    protocol: str = "echo"
    protocol_options: dict = field(default_factory=dict)
    accept: str = "shared"
    mode: str = "thread"
    host: str = "127.0.0.1"
    port: int = 0
    allow_remote: bool = False
    backlog: int = 4096
    buffers: SocketBuffers = field(default_factory=SocketBuffers)
    limits: Limits = field(default_factory=Limits)
    options: argparse.Namespace = field(default_factory=argparse.Namespace)
    dispatch_policy: str = "round-robin"
    dispatch_cpu: int | None = None
    #: Addresses to listen on, in order (listener id = position); None: host/port with
    #: ``protocol``.  A spec without a protocol serves ``protocol``; ``protocol_options``
    #: apply to every listener of the protocol that takes them.
    listen: list[ListenSpec] | None = None
    #: ``--reuseport-join``: a reuseport group may join another listener's group on its
    #: fixed port (a rolling restart); by default such a port is refused (core/listeners.py).
    reuseport_join: bool = False

    def listen_specs(self) -> list[ListenSpec]:
        return list(self.listen) if self.listen else [ListenSpec(self.host, self.port)]


@dataclass
class DrainReport:
    """How the stop went.  ``abandoned``: connections still open (answers unsent) at
    ``--drain-timeout`` after the stop, which the workers then closed; ``killed``: the
    workers did not end within the drain time plus 5 s and were killed."""

    clean: bool = True
    abandoned: int = 0
    killed: bool = False
    seconds: float = 0.0

    def line(self, drain_timeout: float) -> str | None:
        """One line for an unclean drain (None when clean)."""
        if self.killed:
            return (f"drain did not finish: workers still running {self.seconds:.1f} s after "
                    f"the stop were killed")
        if self.abandoned:
            n = self.abandoned
            return (f"drain unclean: {n} connection{'s' if n != 1 else ''} still had answers "
                    f"unsent at --drain-timeout {drain_timeout:g} s; abandoned")
        return None


def _check_resolvable(host: str) -> None:
    """A host name that does not resolve is refused by name, before anything is bound."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve host {host!r}: {exc.strerror}") from None


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.backend_cls: type[Backend] = get_backend(config.backend)
        self.specs = config.listen_specs()
        self._check(config)
        self.cpus = assign_cpus(config.workers, config.cpus)
        self.protocols = self._protocols()
        self.protocol_factory = self.protocols[0].factory
        self.stats = [WorkerStats(i, cpu if config.pin else None, config.backend,
                                  listeners=len(self.specs))
                      for i, cpu in enumerate(self.cpus)]
        for st in self.stats:
            st.per_listener_from_totals = self.backend_cls.max_listeners == 1
        self.listeners: ListenerSet | None = None
        self.workers: Workers | None = None
        self.dispatcher: Dispatcher | None = None
        self._channels: list = []                  # --accept dispatch: (acceptor, worker) ends
        self._started = 0.0
        self.drain: DrainReport | None = None       # set by stop()

    def _check(self, config: ServerConfig) -> None:
        """Refuse, before anything is bound, what this backend cannot serve."""
        cls = self.backend_cls
        if config.mode not in MODES:
            raise ValueError(f"unknown mode {config.mode!r}; known: {', '.join(MODES)}")
        for spec in self.specs:
            _check_resolvable(spec.host)
            if not config.allow_remote and not is_loopback(spec.host):
                raise ValueError(f"refusing to bind non-loopback address {spec.host!r} "
                                 "without --allow-remote")
        if config.dispatch_cpu is not None and config.dispatch_cpu not in allowed_cpus():
            raise ValueError(f"--dispatch-cpu {config.dispatch_cpu} is not in this process's "
                             f"affinity mask ({format_cpu_list(allowed_cpus())})")
        check_addresses([(spec.host, spec.port) for spec in self.specs])
        limit = cls.max_listeners
        if limit is not None and len(self.specs) > limit:
            raise BackendError(
                f"backend {config.backend!r} serves at most {limit} listening "
                f"address{'es' if limit != 1 else ''} (its max_listeners); "
                f"{len(self.specs)} were given with --listen")
        avail = cls.probe()
        if not avail:
            raise BackendError(f"backend {config.backend!r} unavailable: {avail.reason}")
        if layout_of(config.accept) not in cls.accept_strategies:
            raise BackendError(
                f"backend {config.backend!r} does not support --accept {config.accept} "
                f"(it supports: {', '.join(sorted(cls.accept_strategies))})")
        if config.mode not in cls.modes:
            raise BackendError(f"backend {config.backend!r} cannot run in {config.mode} mode")
        # A configuration the backend cannot run (a ring that cannot be created...) is a
        # clear startup error here, not a worker that dies after "listening on".
        cls.preflight(config.limits, config.options)
        own = cls.own_handoff(config.options)
        if own and (config.accept != "dispatch" or config.mode != "thread"):
            raise BackendError(f"backend {config.backend!r}: the {own} hand-off needs "
                               "--accept dispatch in thread mode (it targets the worker's "
                               "ring inside this process)")

    def _protocols(self) -> list[ProtocolSpec]:
        """One spec per listener id; listeners of the same protocol share it."""
        cfg = self.config
        by_name: dict[str, ProtocolSpec] = {}
        out = []
        # Bounded output (core/policy.py rule held-answers): a protocol answers at most half of
        # --max-output per call, so pending output stays within --max-output.
        options = {"output_budget": max(1, cfg.limits.max_output // 2), **cfg.protocol_options}
        for spec in self.specs:
            name = spec.protocol or cfg.protocol
            if name not in by_name:
                by_name[name] = make_spec(name, **options)
            out.append(by_name[name])
        return out

    @property
    def address(self) -> tuple[str, int]:
        """The first bound address (the one-listener shorthand)."""
        assert self.listeners is not None
        return self.listeners.host, self.listeners.port

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every bound address, by listener id."""
        assert self.listeners is not None
        return list(self.listeners.addresses)

    def listener_labels(self) -> list[str]:
        """``ADDRESS (protocol)`` by listener id, for tables and logs."""
        return [f"{format_address(h, p)} ({proto.name})"
                for (h, p), proto in zip(self.addresses, self.protocols)]

    # -- start ----------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        cfg = self.config
        self.listeners = open_listeners(cfg.accept, [(s.host, s.port) for s in self.specs],
                                        len(self.cpus), cfg.backlog,
                                        cpus=[s.cpu for s in self.stats], buffers=cfg.buffers,
                                        join=cfg.reuseport_join)
        if cfg.accept == "dispatch":
            self._channels = make_channels(len(self.cpus))
        self._started = time.monotonic()
        if cfg.mode == "thread":
            self.workers = ThreadWorkers(self.backend_cls, self.stats, self._context)
        else:
            self.workers = ProcessWorkers(self.backend_cls, self.stats, self._context,
                                          self._channels)
        self.workers.start(time.monotonic() + READY_TIMEOUT)
        missing = self.workers.wait_ready(READY_TIMEOUT)
        if missing:
            self.stop()
            raise BackendError("; ".join(f"worker {i} did not start: {why}"
                                         for i, why in sorted(missing.items())))
        if self._channels:
            # After the forks (fork needs a single-threaded parent) and once every worker
            # is ready (a backend's own channel targets its live loop); until then new
            # connections wait in the listen backlog.
            try:
                self.dispatcher = Dispatcher(self.listeners.for_acceptor(), self._dispatch_channels(),
                                             self.workers.closed_counts, cfg.dispatch_policy,
                                             cfg.dispatch_cpu, cfg.limits.accept_backoff)
                self.dispatcher.start()
            except DispatcherError as exc:
                self.stop()
                raise BackendError(str(exc)) from None
            except BaseException:
                self.stop()
                raise
        return self.address

    def _dispatch_channels(self) -> list:
        if self.backend_cls.own_handoff(self.config.options):
            return [self.workers.backend(i).handoff_channel() for i in range(len(self.cpus))]
        return [acceptor_end for acceptor_end, _ in self._channels]

    def wait_ready(self, timeout: float, workers: int | None = None) -> dict[int, str]:
        """Workers whose loop is not armed within ``timeout`` (index -> why); see
        ``Workers.wait_ready``."""
        return self.workers.wait_ready(timeout, workers) if self.workers else {}

    def _context(self, index: int, stop: StopSignal) -> WorkerContext:
        cfg = self.config
        socks, ids = self.listeners.for_worker(index)
        return WorkerContext(
            index=index, cpu=self.stats[index].cpu,
            listeners=socks, listener_ids=ids, accept=layout_of(cfg.accept),
            protocol_factory=self.protocol_factory, protocols=list(self.protocols),
            stats=self.stats[index], stop=stop, limits=cfg.limits, options=cfg.options,
            handoff=self._channels[index][1] if self._channels else None)

    def dead_workers(self) -> dict[int, str]:
        """Workers that ended before a stop was requested (crashed or exited): index -> why."""
        return self.workers.dead() if self.workers else {}

    def failures(self) -> dict[str, str]:
        """Every part that ended before a stop was requested: ``worker N`` or
        ``dispatcher`` -> why.  A server with one is not serving what it said it would."""
        out = {f"worker {i}": why for i, why in sorted(self.dead_workers().items())}
        why = self.dispatcher.dead() if self.dispatcher is not None else None
        if why:
            out["dispatcher"] = why
        return out

    # -- stop -------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop accepting and drain (idempotent)."""
        if self.dispatcher is not None and not (self.workers and self.workers.stopping):
            self.dispatcher.stop()  # first: it hands over the backlog, the workers then drain
        if self.workers is not None:
            self.workers.request_stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every worker to finish; True if all did within ``timeout``."""
        return self.workers.join(timeout) if self.workers else True

    def kill(self) -> None:
        """Force: SIGKILL every worker process we started (by PID)."""
        if self.workers is not None:
            self.workers.kill()

    def close(self) -> None:
        if self.listeners is not None:
            self.listeners.close()
        if self.workers is not None:
            self.workers.close()
        for pair in self._channels:
            for end in pair:
                end.close()

    def stop(self, timeout: float | None = None) -> bool:
        """request_stop + join (bounded by the drain time plus a margin) + close.

        True if every worker ended in time (False: they were killed).  ``self.drain``
        tells whether the drain was clean (``DrainReport``)."""
        self.request_stop()
        drain = self.config.limits.drain_timeout
        if timeout is None:
            timeout = drain + 5.0
        t0 = time.monotonic()
        # Shortly before the drain deadline: who is still busy, with how many connections.
        # A worker that ends before the deadline had nothing left to send; one still
        # running past it with connections open abandons them there (core/policy.py rule drain).
        check = t0 + max(0.0, drain - min(0.1, drain / 3))
        ok = self.join(max(0.0, min(check, t0 + timeout) - time.monotonic()))
        late_open = 0
        if not ok:
            late_open = sum(s.get("open") or 0 for s in self.snapshots())
            ok = self.join(max(0.0, t0 + timeout - time.monotonic()))
        took = time.monotonic() - t0
        if not ok:
            self.kill()
        self.close()
        abandoned = late_open if took >= drain else 0
        self.drain = DrainReport(clean=ok and not abandoned, abandoned=abandoned,
                                 killed=not ok, seconds=took)
        return ok

    # -- stats ------------------------------------------------------------------

    def snapshots(self) -> list[dict]:
        if self.workers is None:
            return [s.snapshot() for s in self.stats]
        return self.workers.snapshots()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started if self._started else 0.0
