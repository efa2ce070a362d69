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

It is ``uring``'s event core (backends/uring/event_core.c: single-shot accept re-armed on the
shared socket, multishot recv into a provided buffer ring, sends, backpressure, close,
drain, the batching window of ``--uring-latency-budget-us``) in its C-protocol mode: each
batch of events is answered in C by backends/proto_core.h, the echo and HTTP code that
``native`` runs too (one copy), and the whole loop - ``uc_serve``, then ``uc_drain`` and
``uc_close_all`` - runs in C with the GIL released: the worker thread calls it once.  Echo
sends the received provided buffer itself; HTTP answers are copied from a scratch buffer.
The connection policy (core/policy.py) is the core's, in C, as for ``uring``: the idle
timeout and the request deadline (from a request's first byte, ``--header-min-rate``
included) are swept at the core's timer tick with backends/policy_core.h's arithmetic,
and a feed that leaves an HTTP request incomplete starts its deadline.

Counters live in the core's ``struct uc_stats`` (written only by the loop); snapshots copy
them from any thread (``WorkerStats.refresh``), as ``native`` does.  ``lost_races`` is not
observable (n/a) on a shared socket, as for ``uring``.

A protocol with no C implementation (a plugin, the fault suite's ``crashy``) runs in
Python exactly as under ``uring`` (this backend then *is* ``uring``), so every protocol
works and the fault suite applies unchanged.

Several addresses (``--listen``, up to ``MAX_LISTENERS``): each connection carries its
listener id (the accepting listener, or the hand-off's), and the core answers it with
that address's C protocol (``struct uc_config.lproto[id]``; the echo options apply to
every echo address).  Addresses whose protocols all lack a C implementation run under
``uring``'s loop as above; a mix of C and Python protocols is refused at startup (the C
loop cannot call into Python).
"""

from __future__ import annotations

from parallelnet.core.backend import BackendError
from parallelnet.backends.native import protocol_of
from parallelnet.backends.uring.ring import Ring, UringOptions, load
from parallelnet.backends.uring.uring import UringBackend


def _mixed(kinds) -> bool:
    kinds = set(kinds)
    return "python" in kinds and len(kinds) > 1


MIXED = ("native-uring cannot serve a protocol with a C implementation (echo, http) and one "
         "without on the same server: its C loop cannot call into Python (use uring or native)")


class NativeUringBackend(UringBackend):
    name = "native-uring"
    description = "the seed's design in C over io_uring: uring's core, echo/http in C, GIL released"
    conformance_variants = [["--uring-buffers", "4", "--uring-buffer-size", "512"],
                            ["--uring-latency-budget-us", "0"]]

    @classmethod
    def preflight(cls, limits, options) -> None:
        """Refuse, before any worker starts, addresses mixing C and Python protocols."""
        specs = getattr(options, "listen", None) or ()
        default = getattr(options, "protocol", None)
        names = [getattr(s, "protocol", None) or default for s in specs]
        if _mixed("python" if n not in ("echo", "http") else n for n in names):
            raise BackendError(MIXED)
        super().preflight(limits, options)

    def run(self) -> None:
        ctx = self.ctx
        kinds = [protocol_of(p.factory) for p in ctx.protocols]   # by listener id
        if all(k == "python" for k, _ in kinds):
            super().run()   # no C implementation of these protocols: uring's Python loop
            return
        if _mixed(k for k, _ in kinds):
            raise BackendError(MIXED)
        self.ring = ring = Ring(ctx, UringOptions.of(ctx.options), self.name,
                                cproto=self._cproto(load()[1], kinds))
        lib, core = ring.lib, ring.core
        ctx.stats.refresh = ring.refresh
        try:
            lib.uc_start(core)
            lib.uc_submit(core)
            ctx.stats.mark_ready()
            rc = lib.uc_serve(core)   # the whole loop, GIL released, until stop
            if rc < 0:
                raise ring.error(rc)
            rc = lib.uc_drain(core, max(0, int(ctx.limits.drain_timeout * 1000)))
            if rc < 0:
                raise ring.error(rc)
        finally:
            lib.uc_close_all(core, 2000)
            ring.free()

    @staticmethod
    def _cproto(lib, kinds: list[tuple[str, dict]]) -> dict:
        """The C-protocol mode's fields of ``struct uc_config``: the protocol per listener
        id, and the options of each (the same protocol takes the same options everywhere:
        the server builds one spec per protocol name)."""
        opts: dict = {}
        for _, o in kinds:
            opts.update(o)
        return {"cproto": 1,
                "lproto": [lib.UC_HTTP if k == "http" else lib.UC_ECHO for k, _ in kinds],
                "message_size": opts.get("message_size", 0),
                "max_header_bytes": opts.get("max_header_bytes", 8192),
                "max_body_bytes": opts.get("max_body_bytes", 1 << 20)}

