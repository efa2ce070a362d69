"""``uring``: io_uring through the C event core, the protocol in Python.

The loop of one backend over a ``Ring`` (backends/uring/ring.py, whose docstring is the
design the three io_uring backends share: accept, receive, send, backpressure, close,
batching, the window, stop and drain).  Per batch of application events from
``uc_wait`` it feeds the protocols, hands their output back to the core, and tells the
core what only the protocol knows (a request left incomplete, answers held back).
"""

from __future__ import annotations

import logging
import os
import time

from parallelnet.backends.uring.calls import core_calls
from parallelnet.backends.uring.ring import IoUringBackend, Ring, UringOptions
from parallelnet.core.policy import ConnectionPolicy, tracks_requests

log = logging.getLogger("parallelnet.worker")


class UringBackend(IoUringBackend):
    name = "uring"
    description = "io_uring, C event core (multishot recv, buffer ring, batched submit/wait)"
    conformance_variants = [["--uring-accept", "multishot"],
                            ["--uring-buffers", "4", "--uring-buffer-size", "512"],
                            ["--uring-fixed-files", "--uring-zc-threshold", "4096"],
                            ["--accept", "dispatch", "--uring-handoff", "msg-ring"],
                            ["--uring-calls", "direct"]]

    def run(self) -> None:
        ctx = self.ctx
        opts = UringOptions.of(ctx.options)
        self.ring = ring = Ring(ctx, opts, self.name)
        # What Python tells the core: queued per batch (one GIL release per wait) or direct.
        self.calls = core_calls(opts.calls, ring.ffi, ring.lib, ring.core)
        self.protos: dict[int, object] = {}
        self.stopping = False
        # Rules eof and handler-failure (the protocol's EOF, a handler failure); the others are the core's.
        self.policy = ConnectionPolicy(ctx.limits, ctx.stats, ring.who)
        self._process = self._batch_processor()
        ctx.stats.refresh = ring.refresh
        try:
            ring.lib.uc_start(ring.core)
            ring.lib.uc_submit(ring.core)
            ctx.stats.mark_ready()
            self._serve()
            self._drain()
        finally:
            self._close_all()

    def _serve(self) -> None:
        ring = self.ring
        wait, events = self.calls.wait, self.calls.events
        process = self._process
        # Per iteration only the wait and the batch: the C core bounds the wait by the
        # timer tick while connections are open and runs the deadlines there; the
        # counters are copied by the snapshot thread (WorkerStats.refresh); stop arrives
        # as EV_STOP (the eventfd's poll on the ring).
        while not self.stopping:
            n = wait(-1)
            if n > 0:
                process(events(n))
            elif n < 0:
                raise ring.error(n)

    def _batch_processor(self):
        """The hot path, built once: one batch of events through the protocol.  A
        closure over everything it touches, so a batch costs no attribute lookups."""
        backend, ring, calls = self, self.ring, self.calls
        lib = ring.lib
        EV_DATA, EV_OPEN, EV_CLOSED, EV_EOF = lib.EV_DATA, lib.EV_OPEN, lib.EV_CLOSED, lib.EV_EOF
        EV_DRAINED, EV_STOP, EV_TICK, EV_PULL = lib.EV_DRAINED, lib.EV_STOP, lib.EV_TICK, lib.EV_PULL
        EV_SEND_FAILED = lib.EV_SEND_FAILED
        send_buf, send_out, send_static = calls.send_buf, calls.send_out, calls.send_static
        finish, close, hold, pulled, progress = (calls.finish, calls.close, calls.hold, calls.pulled,
                                                 calls.progress)
        protos = self.protos
        pool = ring.pool
        bsize = ring.bufsize
        stats = self.ctx.stats
        factories = [p.factory for p in self.ctx.protocols]   # by listener id
        policy = self.policy
        track = any(tracks_requests(f()) for f in factories)
        incomplete: set[int] = set()   # ids whose request the core is timing (rule request-deadline)
        send_failed = self._send_failed

        def process(ev: list) -> None:
            requests = bytes_in = 0
            for i in range(0, len(ev), 4):
                kind = ev[i]
                cid = ev[i + 1]
                if kind == EV_DATA:
                    proto = protos[cid]
                    if proto.closing:
                        continue
                    length = ev[i + 3]
                    off = ev[i + 2] * bsize
                    data = pool[off:off + length]
                    bytes_in += length
                    try:
                        out, k = proto.feed(data)
                    except Exception:  # noqa: BLE001 - a handler bug closes one connection only
                        data.release()
                        policy.handler_failed(proto, cid)
                        close(cid, 1)
                        continue
                    requests += k
                    if track:
                        partial = proto.partial
                        if partial or cid in incomplete:   # never for whole requests
                            progress(cid, partial, k, length)
                            (incomplete.add if partial else incomplete.discard)(cid)
                    if out is data:
                        rc = send_buf(cid, ev[i + 2], 0, length)
                    elif out:
                        rc = send_out(cid, out)
                    else:
                        rc = 0
                    # The buffer returns to the kernel at the next wait: a protocol that
                    # kept this view would read memory being rewritten.  Released, any
                    # later use raises (a handler error on that connection) instead.
                    try:
                        data.release()
                    except BufferError:   # it holds an export of the view: the same breach
                        policy.handler_failed(proto, cid)
                        close(cid, 1)
                        continue
                    if rc < 0:
                        send_failed(cid, rc)
                    elif proto.closing:
                        finish(cid)
                    elif proto.more:   # rule held-answers: answers held; the core sends EV_PULL
                        hold(cid, 1)
                elif kind == EV_PULL:   # rule held-answers: the connection's output is low again
                    proto = protos[cid]
                    try:
                        out, k = proto.pull()
                    except Exception:  # noqa: BLE001 - a handler bug closes one connection only
                        policy.handler_failed(proto, cid)
                        close(cid, 1)
                        continue
                    requests += k
                    if not out:
                        rc = 0
                    elif proto.is_static(out):   # a view of an immortal block: no copy
                        rc = send_static(cid, out)
                    else:
                        rc = send_out(cid, out)
                    if rc < 0:
                        send_failed(cid, rc)
                        continue
                    pulled(cid, proto.more)
                    if proto.closing:
                        finish(cid)
                elif kind == EV_OPEN:   # ev[i + 3]: the listener id it came in on
                    protos[cid] = factories[ev[i + 3]]()
                    stats.open += 1
                elif kind == EV_CLOSED:
                    del protos[cid]
                    incomplete.discard(cid)
                    stats.open -= 1
                    stats.closed += 1
                    if ev[i + 2]:
                        stats.errors += 1
                elif kind == EV_EOF:
                    out = policy.eof(protos[cid], cid)
                    if out is None:
                        close(cid, 1)
                        continue
                    if out:
                        rc = send_out(cid, out)
                        if rc < 0:
                            send_failed(cid, rc)
                            continue
                    finish(cid)
                elif kind == EV_DRAINED:   # what the peer sent before stop has been answered
                    finish(cid)
                elif kind == EV_TICK:      # the core has swept the deadlines
                    if backend.ctx.stop.is_set():   # belt and braces: EV_STOP is the signal
                        backend.stopping = True
                elif kind == EV_STOP:
                    backend.stopping = True
                elif kind == EV_SEND_FAILED:   # a queued send: the core has closed it
                    backend._log_send_failed(cid, ev[i + 2])
            stats.requests += requests
            stats.bytes_in += bytes_in

        return process

    def _send_failed(self, cid: int, rc: int) -> None:
        """The core refused a response (-ENOMEM, -EMSGSIZE for >= 4 GiB, a failed ring):
        that connection ends with an error rather than carrying on with a hole in its
        output."""
        self._log_send_failed(cid, -rc)
        self.calls.close(cid, 1)

    def _log_send_failed(self, cid: int, err: int) -> None:
        log.warning("%s: cannot send on connection id %d: %s; closing it",
                    self.ring.who, cid, os.strerror(err))

    def _drain(self) -> None:
        ring = self.ring
        lib, core = ring.lib, ring.core
        self.calls.flush()   # the last batch's actions, before the drain changes the rules
        lib.uc_drain_begin(core)
        # One look without waiting: connections the dispatcher posted (msg-ring) before it
        # stopped are still task work of ours; they become CQEs, then connections to drain.
        n = self.calls.wait(0)
        if n > 0:
            self._process(self.calls.events(n))
        elif n < 0:
            raise ring.error(n)
        deadline = time.monotonic() + self.ctx.limits.drain_timeout
        self._pump(lambda: lib.uc_nconns(core) > 0, deadline)

    def _pump(self, busy, deadline: float) -> None:
        calls = self.calls
        while busy():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            n = calls.wait(max(1, int(remaining * 1000)))
            if n < 0:
                break   # the ring failed: nothing more will complete (uc_free leaks what it must)
            if n:
                self._process(calls.events(n))

    def _close_all(self) -> None:
        ring = self.ring
        lib, core = ring.lib, ring.core
        try:
            self.calls.flush()
            lib.uc_shutdown(core)
            # Wait (bounded) until the kernel holds no operation of ours: only then may
            # the buffer pool be freed.  Closes are reported as usual.
            self._pump(lambda: lib.uc_inflight(core) > 0 or lib.uc_nconns(core) > 0,
                       time.monotonic() + 2.0)
            # Closes released synchronously by uc_shutdown are reported by the next
            # wait even when nothing is left in flight: collect them.
            n = self.calls.wait(0)
            if n > 0:
                self._process(self.calls.events(n))
        finally:
            ring.free()
