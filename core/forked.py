"""Process mode: forked workers sharing the listening sockets, and the handshake with them.

nginx's model: the listening sockets are bound first, then workers are ``fork()``-ed,
so every child holds the same kernel socket.  The handshake:

1. SIGTERM/SIGINT are blocked across each fork, so a signal that arrives before a child
   has installed its own handler stays pending for it instead of running the parent's.
2. The child installs its handlers, asks the kernel for SIGTERM when its parent dies
   (``prctl(PR_SET_PDEATHSIG)``), starts its loop in a thread and, from its main thread
   (Python runs handlers only there), writes one JSON snapshot line to a pipe: at once
   when its loop is armed, then every ``REPORT_INTERVAL`` and at exit.
3. The parent forks worker i+1 only once worker i's pipe says ``ready`` (the order of
   the listener's wait queue: core/workers.py); a collector thread then reads every
   pipe until EOF.

Kernel facts relied on:

* ``fork(2)`` copies only the calling thread, so it happens before this process starts
  any thread (a lock held by another thread would stay held forever in the child).
* threads inherit the signal mask: the child's loop thread starts with SIGTERM/SIGINT
  blocked, so the kernel delivers them to the child's main thread, whose wait they
  interrupt at once - even while the loop sits in C code with the GIL released.
* ``PR_SET_PDEATHSIG`` fires when the parent exits for any reason, SIGKILL included; a
  parent that died before the request took effect is caught by comparing ``getppid()``.
* a write to a pipe whose reader is gone fails with ``EPIPE``: the child then drains and
  stops rather than dying mid-drain.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import selectors
import signal
import sys
import threading
import time

from parallelnet.core.backend import StopSignal
from parallelnet.core.cpus import pin_current_thread
from parallelnet.core.workers import Workers, serve_worker

log = logging.getLogger("parallelnet.server")

REPORT_INTERVAL = 0.25  # seconds between a forked worker's snapshots to the parent
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def set_parent_death_signal(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG, sig): Linux signals this process when its parent exits."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))


class ProcessWorkers(Workers):
    """Forked workers; their counters arrive as snapshots through one pipe each."""

    def __init__(self, backend_cls, stats, context, channels: list) -> None:
        super().__init__(backend_cls, stats, context)
        self._channels = channels               # (acceptor end, worker end) per worker
        self._children: dict[int, int] = {}     # pid -> worker index
        self._snaps: dict[int, dict] = {}       # worker index -> latest snapshot
        self._dead: dict[int, str] = {}
        self._collector: threading.Thread | None = None

    # -- parent side --------------------------------------------------------------------

    def start(self, deadline: float) -> None:
        if threading.active_count() > 1:
            raise RuntimeError("process mode must fork before any other thread starts")
        pipes: dict[int, bytes] = {}   # read end -> bytes read past the last whole line
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for i in range(len(self.stats)):
                r = self._fork(i, list(pipes), old_mask)
                pipes[r] = self._read_until_ready(r, i, deadline)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for _, worker_end in self._channels:
            worker_end.close()  # the children hold theirs
        self._collector = threading.Thread(target=self._collect, args=(pipes,),
                                           name="stats-collector", daemon=True)
        self._collector.start()

    def _fork(self, index: int, earlier_pipes: list[int], old_mask) -> int:
        r, w = os.pipe()
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: never returns
            code = 0
            try:
                os.close(r)
                for pr in earlier_pipes:
                    os.close(pr)
                for j, (acceptor_end, worker_end) in enumerate(self._channels):
                    acceptor_end.close()  # so a dead acceptor reads as EOF, not silence
                    if j != index:
                        worker_end.close()
                self._child_main(index, w, old_mask, parent)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        self._children[pid] = index
        return r

    def _take_lines(self, buf: bytes, chunk: bytes) -> bytes:
        *lines, rest = (buf + chunk).split(b"\n")
        for line in lines:
            snap = json.loads(line)
            self._snaps[snap["index"]] = snap
        return rest

    def _read_until_ready(self, r: int, index: int, deadline: float) -> bytes:
        """Before the next fork: read worker ``index``'s snapshots until one says ready,
        it exits, or ``deadline``.  Returns what was read past the last whole line."""
        buf = b""
        while time.monotonic() < deadline and not (self._snaps.get(index) or {}).get("ready"):
            if not select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break   # it died: the collector will see the EOF too
            buf = self._take_lines(buf, chunk)
        return buf

    def _collect(self, pipes: dict[int, bytes]) -> None:
        sel = selectors.DefaultSelector()
        for fd in pipes:
            sel.register(fd, selectors.EVENT_READ)
        while pipes:
            for key, _ in sel.select():
                fd = key.fd
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    os.close(fd)
                    del pipes[fd]
                    continue
                pipes[fd] = self._take_lines(pipes[fd], chunk)
        sel.close()

    def _states(self, count: int) -> list[dict]:
        return [self._snaps.get(i) or {} for i in range(count)]

    def dead(self) -> dict[int, str]:
        if self.stopping:
            return dict(self._dead)
        for pid, i in list(self._children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                del self._children[pid]
                self._dead[i] = ((self._snaps.get(i) or {}).get("crashed")
                                 or f"worker process exited (status {status})")
        return dict(self._dead)

    def snapshots(self) -> list[dict]:
        return [self._snaps.get(s.index) or s.snapshot() for s in self.stats]

    def request_stop(self) -> None:
        self.stopping = True
        for pid in self._children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def join(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
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
        return not self._children

    def kill(self) -> None:
        for pid in list(self._children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self._children.pop(pid, None)

    # -- child side ---------------------------------------------------------------------

    def _child_main(self, index: int, wfd: int, old_mask, parent: int) -> None:
        """A forked worker: the loop runs in a thread; the main thread takes the signals
        and reports stats to the parent."""
        stop = StopSignal()
        for sig in _STOP_SIGNALS:
            signal.signal(sig, lambda *_: stop.set())
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:
            stop.set()
        ctx = self.context(index, stop)
        if ctx.cpu is not None:
            pin_current_thread(ctx.cpu)  # the reporting main thread stays on the worker's CPU
        worker = threading.Thread(target=serve_worker, args=(self.backend_cls, ctx),
                                  name=f"worker-{index}")
        worker.start()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        out = os.fdopen(wfd, "w", buffering=1)
        told_ready = False
        while worker.is_alive():
            # The parent waits for "ready" before the next fork: tell it at once.
            worker.join(REPORT_INTERVAL if told_ready else 0.002)
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
