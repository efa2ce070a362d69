"""``native-uring``: the seed's design in C over io_uring, the counterpart of ``native``.

The 2x2 this completes (docs/uring.md): readiness (epoll) or completion (io_uring), with
the protocol in Python or in C -

=============  =========  ================
               Python     C
=============  =========  ================
epoll          ``epoll``  ``native``
io_uring       ``uring``  ``native-uring``
=============  =========  ================

so that what io_uring buys and what C buys can be told apart.

It is ``uring``'s event core (backends/uring_core.c: single-shot accept re-armed on the
shared socket, multishot recv into a provided buffer ring, sends, backpressure, close,
drain, the batching window of ``--uring-latency-budget-us``) in its C-protocol mode: each
batch of events is answered in C by backends/proto_core.h, the echo and HTTP code that
``native`` runs too (one copy), and the whole loop - ``uc_serve``, then ``uc_drain`` and
``uc_close_all`` - runs in C with the GIL released: the worker thread calls it once.  Echo
sends the received provided buffer itself; HTTP answers are copied from a scratch buffer.
Timeouts: the core's timer tick (EV_TICK) sweeps idle connections, and those holding a
partial HTTP request past the header timeout, in C.

Counters live in the core's ``struct uc_stats`` (written only by the loop); snapshots copy
them from any thread (``WorkerStats.refresh``), as ``native`` does.  ``lost_races`` is not
observable (n/a) on a shared socket, as for ``uring``.

A protocol with no C implementation (a plugin, the fault suite's ``crashy``) runs in
Python exactly as under ``uring`` (this backend then *is* ``uring``), so every protocol
works and the fault suite applies unchanged.
"""

from __future__ import annotations

import logging

from parallelnet.backends.native import protocol_of
from parallelnet.backends.uring import UringBackend

log = logging.getLogger("parallelnet.worker")


class NativeUringBackend(UringBackend):
    name = "native-uring"
    description = "the seed's design in C over io_uring: uring's core, echo/http in C, GIL released"
    conformance_variants = [["--uring-buffers", "4", "--uring-buffer-size", "512"],
                            ["--uring-latency-budget-us", "0"]]

    def run(self) -> None:
        proto, opts = protocol_of(self.ctx.protocol_factory)
        if proto == "python":
            super().run()   # no C implementation of this protocol: uring's Python loop
            return
        self._cproto = (proto, opts)
        self._open()
        lib, core, ctx = self.lib, self.core, self.ctx
        stats = ctx.stats
        stats.refresh = self._refresh
        try:
            lib.uc_start(core)
            lib.uc_submit(core)
            stats.mark_ready()
            rc = lib.uc_serve(core)   # the whole loop, GIL released, until stop
            if rc < 0:
                self._ring_failed(rc)
            rc = lib.uc_drain(core, max(0, int(ctx.limits.drain_timeout * 1000)))
            if rc < 0:
                self._ring_failed(rc)
        finally:
            lib.uc_close_all(core, 2000)
            self._sync_stats()
            self._refresh_switches()
            stats.refresh = None
            self.pool.release()
            leaked = lib.uc_free(core)
            self.core = None
            if leaked:
                log.warning("worker %d: io_uring operations still in flight at exit; "
                            "buffer pool leaked rather than freed", ctx.index)

    def _core_options(self, lib) -> dict:
        """The C-protocol mode's settings for new_core (see UringBackend._open)."""
        if not getattr(self, "_cproto", None):
            return {}
        proto, opts = self._cproto
        lim = self.ctx.limits
        return {"cproto": lib.UC_HTTP if proto == "http" else lib.UC_ECHO,
                "message_size": opts.get("message_size", 0),
                "max_header_bytes": opts.get("max_header_bytes", 8192),
                "max_body_bytes": opts.get("max_body_bytes", 1 << 20),
                "idle_ms": int(lim.idle_timeout * 1000) if lim.idle_timeout and lim.idle_timeout > 0 else 0,
                "header_ms": int(lim.header_timeout * 1000)
                if lim.header_timeout and lim.header_timeout > 0 else 0}

    def _sync_stats(self) -> None:
        super()._sync_stats()
        if getattr(self, "_cproto", None):
            cs, st = self.cstats, self.ctx.stats
            st.requests = cs.requests
            st.bytes_in = cs.bytes_in
            st.open = cs.opened - cs.closed
            st.closed = cs.closed
            st.errors = cs.errors
            st.extra["idle_timeouts"] = cs.idle_timeouts
            st.extra["header_timeouts"] = cs.header_timeouts

