"""The server: listeners, pinned workers (threads or forked processes), stats, stop.

The seed's design: N workers, each pinned to one CPU, each running its own event
loop (a backend instance) over its own connections; all of them watch the same
listening socket and race to accept.  This module owns the parts that are not the
event loop.

Thread mode: workers are threads of this process.  Each pins itself with
``sched_setaffinity(0, …)`` (per-thread on Linux).  Their ``WorkerStats`` are read
directly.

Process mode (nginx's model): the listening sockets are bound first, then workers
are ``fork()``-ed, so every child holds the same kernel socket.  ``fork`` copies only
the calling thread, so it happens before this process starts any thread.  Each child
sends JSON snapshots of its stats to the parent through a pipe (periodically, and a
final one at exit); SIGTERM/SIGINT in a child set its stop signal, which wakes its
loop through the eventfd.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import selectors
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from parallelnet.backends.base import (
    Backend, BackendError, Limits, StopSignal, WorkerContext, get_backend,
)
from parallelnet.core.cpus import assign_cpus, pin_current_thread
from parallelnet.core.dispatch import Dispatcher, make_channels
from parallelnet.core.listeners import ListenerSet, is_loopback, layout_of, open_listeners
from parallelnet.core.protocols import make_factory
from parallelnet.core.stats import WorkerStats

log = logging.getLogger("parallelnet.server")

MODES = ("thread", "process")
_REPORT_INTERVAL = 0.25  # seconds between a forked worker's snapshots to the parent
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
    limits: Limits = field(default_factory=Limits)
    options: argparse.Namespace = field(default_factory=argparse.Namespace)
    dispatch_policy: str = "round-robin"
    dispatch_cpu: int | None = None


def _set_parent_death_signal(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG, sig): Linux signals this process when its parent exits."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        if config.mode not in MODES:
            raise ValueError(f"unknown mode {config.mode!r}; known: {', '.join(MODES)}")
        if not config.allow_remote and not is_loopback(config.host):
            raise ValueError(f"refusing to bind non-loopback address {config.host!r} "
                             "without --allow-remote")
        self.backend_cls: type[Backend] = get_backend(config.backend)
        avail = self.backend_cls.probe()
        if not avail:
            raise BackendError(f"backend {config.backend!r} unavailable: {avail.reason}")
        if layout_of(config.accept) not in self.backend_cls.accept_strategies:
            raise BackendError(
                f"backend {config.backend!r} does not support --accept {config.accept} "
                f"(it supports: {', '.join(sorted(self.backend_cls.accept_strategies))})")
        if config.mode not in self.backend_cls.modes:
            raise BackendError(f"backend {config.backend!r} cannot run in {config.mode} mode")
        # A configuration the backend cannot run (a ring that cannot be created...) is a
        # clear startup error here, not a worker that dies after "listening on".
        self.backend_cls.preflight(config.limits, config.options)
        own = self.backend_cls.own_handoff(config.options)
        if own and (config.accept != "dispatch" or config.mode != "thread"):
            raise BackendError(f"backend {config.backend!r}: the {own} hand-off needs "
                               "--accept dispatch in thread mode (it targets the worker's "
                               "ring inside this process)")
        self.cpus = assign_cpus(config.workers, config.cpus)
        self.protocol_factory = make_factory(config.protocol, **config.protocol_options)
        self.listeners: ListenerSet | None = None
        self.stats = [WorkerStats(i, cpu if config.pin else None, config.backend)
                      for i, cpu in enumerate(self.cpus)]
        self._stops: list[StopSignal] = []
        self._threads: list[threading.Thread] = []
        self._children: dict[int, int] = {}        # pid -> worker index
        self._child_snaps: dict[int, dict] = {}    # worker index -> latest snapshot
        self._collector: threading.Thread | None = None
        self._started = 0.0
        self._stopped = False
        self._dead: dict[int, str] = {}            # worker index -> why it ended early
        self._channels: list = []                  # --accept dispatch: (acceptor, worker) ends
        self._backends: dict[int, Backend] = {}   # thread mode: worker index -> its backend
        self._pipe_bufs: dict[int, bytes] = {}     # process mode: stats bytes read before the collector
        self.dispatcher: Dispatcher | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self.listeners is not None
        return self.listeners.host, self.listeners.port

    # -- start ----------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        cfg = self.config
        self.listeners = open_listeners(cfg.accept, cfg.host, cfg.port, len(self.cpus), cfg.backlog,
                                        cpus=[s.cpu for s in self.stats])
        if cfg.accept == "dispatch":
            self._channels = make_channels(len(self.cpus))
        self._started = time.monotonic()
        if cfg.mode == "thread":
            self._start_threads()
        else:
            self._start_processes()
        missing = self.wait_ready(READY_TIMEOUT)
        if missing:
            self.stop()
            raise BackendError("; ".join(f"worker {i} did not start: {why}"
                                         for i, why in sorted(missing.items())))
        if self._channels:
            # After the forks (fork needs a single-threaded parent) and once every worker
            # is ready (a backend's own channel targets its live loop); until then new
            # connections wait in the listen backlog.
            channels = [a for a, _ in self._channels]
            if self.backend_cls.own_handoff(cfg.options):
                try:
                    channels = [self._backends[i].handoff_channel() for i in range(len(channels))]
                except BaseException:
                    self.stop()
                    raise
            self.dispatcher = Dispatcher(self.listeners.sockets[0], channels, self._closed_counts,
                                         cfg.dispatch_policy, cfg.dispatch_cpu)
            self.dispatcher.start()
        return self.address

    def wait_ready(self, timeout: float, workers: int | None = None) -> dict[int, str]:
        """Wait until every worker's loop (or the first ``workers``) is armed
        (``WorkerStats.mark_ready``).

        Until then a connection sits in the backlog or goes to whichever workers are
        up: a slow-starting worker would lose the first accept races for a reason
        that has nothing to do with the design under test.  Returns the workers that
        never got there (index -> why): they died first, or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        while True:
            count = len(self.stats) if workers is None else workers
            snaps = ([{"ready": bool(s.ready), "crashed": s.crashed} for s in self.stats[:count]]
                     if self.config.mode == "thread"
                     else [self._child_snaps.get(i) or {} for i in range(count)])
            dead = self.dead_workers()
            late = (f"its loop was not armed within {timeout:g} s "
                    "(a backend calls ctx.stats.mark_ready() once it is)")
            missing = {i: dead.get(i) or snap.get("crashed") or late
                       for i, snap in enumerate(snaps) if not snap.get("ready")}
            if not missing:
                return {}
            if time.monotonic() >= deadline or any(i in dead for i in missing):
                return missing
            time.sleep(0.002)

    def _closed_counts(self) -> list[int]:
        """Connections each worker has closed (for least-connections dispatch)."""
        if self.config.mode == "thread":
            return [s.closed for s in self.stats]
        return [self._child_snaps.get(i, {}).get("closed", 0) for i in range(len(self.stats))]

    def _context(self, index: int, stop: StopSignal) -> WorkerContext:
        cfg = self.config
        return WorkerContext(
            index=index, cpu=self.stats[index].cpu,
            listeners=self.listeners.for_worker(index), accept=layout_of(cfg.accept),
            protocol_factory=self.protocol_factory, stats=self.stats[index],
            stop=stop, limits=cfg.limits, options=cfg.options,
            handoff=self._channels[index][1] if self._channels else None)

    def _run_worker(self, ctx: WorkerContext) -> None:
        """Body of one worker, in its own thread (or forked process)."""
        stats = ctx.stats
        try:
            if ctx.cpu is not None:
                pin_current_thread(ctx.cpu)
            stats.bind_current_thread()
            backend = self._backends[ctx.index] = self.backend_cls(ctx)
            backend.run()
        except BaseException as exc:  # noqa: BLE001 - reported in stats and the log
            stats.crashed = f"{type(exc).__name__}: {exc}"
            log.exception("worker %d crashed", ctx.index)
        finally:
            stats.record_exit()

    # Workers start one after another, each once the previous one is armed.  The order in
    # which loops register a shared listener is the order of its wait queue, and with
    # EPOLLEXCLUSIVE (or io_uring's accept, which waits the same way) the head is offered
    # every new connection first: left to a start-up race, it made the accept split of
    # identical runs fall into two regimes (results/20261126T135400-accept-regimes).
    # Started in order, worker 0 is always the head, and runs are reproducible.

    def _start_threads(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for i in range(len(self.cpus)):
            stop = StopSignal()
            self._stops.append(stop)
            t = threading.Thread(target=self._run_worker, args=(self._context(i, stop),),
                                 name=f"worker-{i}", daemon=True)
            self._threads.append(t)
            t.start()
            self.wait_ready(max(0.0, deadline - time.monotonic()), workers=i + 1)

    def _start_processes(self) -> None:
        if threading.active_count() > 1:
            # fork() would copy this thread alone, leaving locks held by the others.
            raise RuntimeError("process mode must fork before any other thread starts")
        pipes = []
        # Until a child has installed its own handlers, a SIGTERM must stay pending
        # rather than run the parent's handler in the child.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            self._fork_workers(pipes, old_mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self._collector = threading.Thread(target=self._collect, args=(pipes,),
                                           name="stats-collector", daemon=True)
        self._collector.start()

    def _read_until_ready(self, r: int, index: int, deadline: float) -> bytes:
        """Before the next fork: read worker ``index``'s snapshots until one says ready
        (the child sends one at once), it exits, or ``deadline``.  Returns what was read
        past the last whole line, for the collector to go on from."""
        buf = b""
        while time.monotonic() < deadline and not (self._child_snaps.get(index) or {}).get("ready"):
            if not select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break   # it died: the collector will see the EOF too
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                snap = json.loads(line)
                self._child_snaps[snap["index"]] = snap
        return buf

    def _fork_workers(self, pipes: list[int], old_mask) -> None:
        parent = os.getpid()
        deadline = time.monotonic() + READY_TIMEOUT
        for i in range(len(self.cpus)):
            r, w = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # child
                os.close(r)
                for pr in pipes:
                    os.close(pr)
                for j, (acceptor_end, worker_end) in enumerate(self._channels):
                    acceptor_end.close()  # so a dead acceptor reads as EOF, not silence
                    if j != i:
                        worker_end.close()
                code = 0
                try:
                    self._child_main(i, w, old_mask, parent)
                except BaseException:  # noqa: BLE001
                    code = 1
                finally:
                    os._exit(code)
            os.close(w)
            pipes.append(r)
            self._children[pid] = i
            self._pipe_bufs[r] = self._read_until_ready(r, i, deadline)
        for _, worker_end in self._channels:
            worker_end.close()  # the children hold theirs

    def _child_main(self, index: int, wfd: int, old_mask, parent: int) -> None:
        """A forked worker: the loop runs in a thread; the main thread takes the signals
        (Python runs handlers only there) and reports stats to the parent.

        The worker thread starts with SIGTERM/SIGINT blocked (the fork left them blocked
        and threads inherit the mask), so the kernel delivers them to the main thread,
        whose wait they interrupt at once — even while the worker sits in C code with
        the GIL released.
        """
        stop = StopSignal()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        # If the parent dies (even by SIGKILL), the kernel sends us SIGTERM: a worker
        # never lingers as an orphan holding the port.  Checked once more afterwards,
        # for a parent that died before the request took effect.
        _set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:
            stop.set()
        ctx = self._context(index, stop)
        if ctx.cpu is not None:
            pin_current_thread(ctx.cpu)  # the reporting main thread stays on the worker's CPU
        worker = threading.Thread(target=self._run_worker, args=(ctx,), name=f"worker-{index}")
        worker.start()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        out = os.fdopen(wfd, "w", buffering=1)
        told_ready = False
        while worker.is_alive():
            # The parent waits for "ready" before it says it is listening: tell it at once.
            worker.join(_REPORT_INTERVAL if told_ready else 0.002)
            if not told_ready:
                if not ctx.stats.ready and worker.is_alive():
                    continue
                told_ready = True
            if out is None:
                continue
            try:
                out.write(json.dumps(ctx.stats.snapshot()) + "\n")
            except OSError:  # EPIPE: the parent is gone; drain and stop rather than die mid-drain
                out = None
                stop.set()
        if out is not None:
            try:
                out.close()
            except OSError:
                pass

    def _collect(self, pipes: list[int]) -> None:
        sel = selectors.DefaultSelector()
        bufs: dict[int, bytes] = {}
        for fd in pipes:
            sel.register(fd, selectors.EVENT_READ)
            bufs[fd] = self._pipe_bufs.get(fd, b"")
        while bufs:
            for key, _ in sel.select():
                fd = key.fd
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    os.close(fd)
                    del bufs[fd]
                    continue
                data = bufs[fd] + chunk
                *lines, bufs[fd] = data.split(b"\n")
                for line in lines:
                    snap = json.loads(line)
                    self._child_snaps[snap["index"]] = snap
        sel.close()

    def dead_workers(self) -> dict[int, str]:
        """Workers that ended before a stop was requested (crashed or exited): index -> why."""
        if self._stopped:
            return dict(self._dead)
        for i, t in enumerate(self._threads):
            if not t.is_alive() and i not in self._dead:
                self._dead[i] = self.stats[i].crashed or "worker thread exited"
        for pid, i in list(self._children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                del self._children[pid]
                snap = self._child_snaps.get(i) or {}
                self._dead[i] = snap.get("crashed") or f"worker process exited (status {status})"
        return dict(self._dead)

    # -- stop -------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop accepting and drain (idempotent)."""
        if self.dispatcher is not None and not self._stopped:
            self.dispatcher.stop()  # first: it hands over the backlog, the workers then drain
        self._stopped = True
        for stop in self._stops:
            stop.set()
        for pid in self._children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every worker to finish; True if all did within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        while self._children:
            for pid in list(self._children):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    del self._children[pid]
            if self._children:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        if self._collector is not None and not self._children:
            self._collector.join(1.0)
        return not self._children and not any(t.is_alive() for t in self._threads)

    def kill(self) -> None:
        """Force: SIGKILL every worker process we started (by PID)."""
        for pid in list(self._children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self._children.pop(pid, None)

    def close(self) -> None:
        if self.listeners is not None:
            self.listeners.close()
        for stop in self._stops:
            stop.close()
        for pair in self._channels:
            for end in pair:
                end.close()

    def stop(self, timeout: float | None = None) -> bool:
        """request_stop + join (bounded by the drain time plus a margin) + close."""
        self.request_stop()
        if timeout is None:
            timeout = self.config.limits.drain_timeout + 5.0
        ok = self.join(timeout)
        if not ok:
            self.kill()
        self.close()
        return ok

    # -- stats ------------------------------------------------------------------

    def snapshots(self) -> list[dict]:
        if self.config.mode == "thread":
            return [s.snapshot() for s in self.stats]
        out = []
        for s in self.stats:
            snap = self._child_snaps.get(s.index)
            out.append(snap if snap is not None else s.snapshot())
        return out

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started if self._started else 0.0
