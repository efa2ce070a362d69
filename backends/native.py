"""``native``: the seed's exact design in C, one worker's whole loop with the GIL released.

The core starts each worker as a Python thread (or forked process) and pins it, as for
every backend.  That thread then calls into ``native_core.c`` (cffi API mode, which
releases the GIL around the call) and stays there: its own epoll instance, the
listening socket(s) of ``ctx.listeners`` in it (with ``EPOLLEXCLUSIVE`` for
``--accept exclusive``; ``reuseport`` gives each worker its own socket), accept until
``EAGAIN`` with lost races counted, one ``recv`` per level-triggered wakeup, echo or
HTTP/1.1 plaintext implemented in C (backends/proto_core.h, shared with
``native-uring``: the behaviour of ``core/protocols/http.py`` for what a benchmark or the
conformance suite sends, ``GET /bytes/N`` included), backpressure at
``limits.max_output``, half-close honoured, and at stop the drain of readiness.py.
No Python runs per request for those two: only the protocol *name* and its options are
taken from ``ctx.protocol_factory``.  Any other protocol (a plugin, the fault suite's
``crashy``) runs in Python: the C loop calls back (cffi ``extern "Python"``, the GIL
taken per received chunk) into ``feed``/``eof`` of one protocol object per connection,
and a handler that raises closes that connection only (logged, ``handler_errors``).

No time slices.  ``nc_serve`` blocks in ``epoll_wait`` until the stop eventfd fires (an
idle server makes no wakeups; the wait times out only while a listener waits out an
EMFILE back-off, or at the policy's coarse tick while a connection is open).  The counters live in ``struct nc_stats``, written only by the C
loop; ``WorkerStats.refresh`` copies them into ``ctx.stats`` whenever a snapshot is
taken, from any thread, so monitoring never interrupts the loop.  Signals are taken by
the process's main thread (in process mode the worker runs in a thread of the forked
child, see ``core.server._child_main``), which sets the stop eventfd.

The connection policy (core/policy.py) is the C loop's, with the
arithmetic of backends/policy_core.h: backpressure marks, finish-after-flush, the idle
timeout and the request deadline (total, from a request's first byte, extended by
``--header-min-rate``), checked at ``Limits.timer_tick()`` while a connection is open
(``extra.idle_timeouts`` / ``extra.header_timeouts``).  For a protocol in Python the
callback reports whether a request is left incomplete (``proto.partial``); EOF and a
handler failure go through ``ConnectionPolicy`` like every Python loop's.

Faults: ``accept4`` failing with EMFILE/ENFILE/ENOBUFS/ENOMEM pauses the listener
(``EPOLL_CTL_DEL``) for ``limits.accept_backoff``, doubling to 1 s, as readiness.py
does; counted in ``extra.accept_errors`` / ``extra.accept_backoffs``, logged once per
episode (a callback, backends/ccore.py).  ``extra.max_pending`` is the high-water mark
of queued output.

``--accept dispatch``: the worker has no listener; ``ctx.handoff`` (the worker's end of
its AF_UNIX SOCK_SEQPACKET channel from core/dispatch.py) is in the epoll set like a
listener.  Readable: the C loop takes every waiting fd with ``recvmsg``/``SCM_RIGHTS``
until ``EAGAIN`` and adopts each (``accepted`` and ``extra.handoffs``; over
``limits.max_connections`` it is closed at once and counted ``refused``).  A hand-off is
neither a listen wakeup nor a lost race.  Out of fds (EMFILE/ENFILE) the kernel cannot
install the passed descriptor: ``recvmsg`` consumes the message anyway and reports
``MSG_CTRUNC`` - **that connection is lost** (closed by the kernel, never served);
counted in ``extra.handoff_lost`` and logged once per episode.  At drain the channel is
taken once more (the backlog the acceptor handed over before stop: no wakeup, no race).

Several addresses (``--listen``, up to ``NC_MAX_LISTENERS``): every listener of the
worker is in its one epoll set; each connection keeps its listener id (the accepting
listener's, or the hand-off message's byte) and is answered by that address's protocol
(``struct nc_config.protocols[id]``: echo/HTTP in C, anything else through the
callbacks, which are given the id to build ``ctx.protocols[id]``'s object).  Accepts,
listen wakeups and lost races are counted per listener id too (``l_*`` arrays of
``struct nc_stats``), copied into ``stats.per_listener`` with the rest.

Thread CPU: the C loop runs in the worker thread itself, so the tid recorded by
``WorkerStats.bind_current_thread`` is the thread doing the work; ``nc_gettid`` is
checked against it at start-up.
"""

from __future__ import annotations

import functools
import os

from parallelnet.core.backend import (
    DISPATCH, EXCLUSIVE, REUSEPORT, SHARED, Availability, Backend, BackendError,
)
from parallelnet.backends.ccore import fill_limits, install_notes
from parallelnet.core.policy import ConnectionPolicy, tracks_requests

#: struct nc_stats fields copied into WorkerStats (COUNTERS) and its extra (all of them in
#: core/stats.py's EXTRA_COUNTERS: every worker starts with them at 0).
COUNTERS = ("requests", "bytes_in", "bytes_out", "wakeups", "listen_wakeups", "accepted",
            "lost_races", "closed", "refused", "errors", "backpressure")
EXTRA = ("accept_errors", "accept_backoffs", "max_pending", "handoffs", "handoff_lost",
         "idle_timeouts", "header_timeouts", "output_holds", "alloc_failures")

_loaded = None


def load():
    global _loaded
    if _loaded is None:
        try:
            from parallelnet.backends._native import ffi, lib
        except ImportError as exc:
            raise BackendError(f"extension parallelnet.backends._native not built ({exc}); "
                               "reinstall the project so setup.py's cffi_modules compiles it"
                               ) from None
        _install_callbacks(ffi)
        _loaded = ffi, lib
    return _loaded


def _install_callbacks(ffi) -> None:
    """The extern "Python" functions the C loop calls (each with the GIL taken by cffi).
    ``user`` is the worker's handle: ``ffi.from_handle`` gives its NativeBackend."""

    @ffi.def_extern(error=-1)
    def nc_py_feed(user, fd, lid, data, n, out):
        return ffi.from_handle(user)._py_feed(fd, lid, ffi.buffer(data, n)[:], out)

    @ffi.def_extern(error=-1)
    def nc_py_eof(user, fd, lid, out):
        return ffi.from_handle(user)._py_eof(fd, lid, out)

    @ffi.def_extern(error=-1)
    def nc_py_pull(user, fd, lid, out):
        return ffi.from_handle(user)._py_pull(fd, out)

    @ffi.def_extern()
    def nc_py_close(user, fd):
        ffi.from_handle(user)._protos.pop(fd, None)

    install_notes(ffi, "nc_py_accept_failed", "nc_py_handoff_lost", "nc_py_alloc_failed")


def protocol_of(factory) -> tuple[str, dict]:
    """The protocol name and options behind a factory from ``make_factory``: ``echo`` and
    ``http`` run in C; anything else is ``python`` (the factory's objects, via callbacks)."""
    from parallelnet.core.protocols import EchoProtocol, HttpProtocol

    func = factory.func if isinstance(factory, functools.partial) else factory
    kwargs = dict(factory.keywords) if isinstance(factory, functools.partial) else {}
    if func is EchoProtocol:
        return "echo", kwargs
    if func is HttpProtocol:
        return "http", kwargs
    return "python", {}


class NativeBackend(Backend):
    name = "native"
    description = "the seed's design in C: epoll loop with the GIL released, echo/http in C"
    kind = "readiness"
    accept_strategies = frozenset({SHARED, EXCLUSIVE, REUSEPORT, DISPATCH})
    max_listeners = 8   # native_core.c's NC_MAX_LISTENERS

    @classmethod
    def probe(cls) -> Availability:
        try:
            load()
        except BackendError as exc:
            return Availability(False, str(exc))
        return Availability(True)

    def run(self) -> None:
        ctx = self.ctx
        ffi, lib = load()
        kinds = [protocol_of(p.factory) for p in ctx.protocols]   # by listener id
        opts: dict = {}
        for _, o in kinds:   # one spec per protocol name: its options are the same everywhere
            opts.update(o)
        listeners = [s.fileno() for s in ctx.listeners]
        if max(len(listeners), len(kinds)) > lib.NC_MAX_LISTENERS:
            raise BackendError(f"at most {lib.NC_MAX_LISTENERS} listening addresses per worker")
        self._ffi = ffi
        self._protos: dict[int, object] = {}   # fd -> protocol object (python protocols)
        self._out = None                        # what C is sending from (kept alive)
        self.who = f"worker {ctx.index} ({self.name})"
        # Python protocols: rules eof and handler-failure here, rule request-deadline's "incomplete?" answered per feed.
        self._policy = ConnectionPolicy(ctx.limits, ctx.stats, self.who)
        self._factories = [p.factory for p in ctx.protocols]
        self._track = any(k == "python" and tracks_requests(p.factory())
                          for (k, _), p in zip(kinds, ctx.protocols))
        self._handle = handle = ffi.new_handle(self)
        cfg = ffi.new("struct nc_config *")
        cfg.stop_fd = ctx.stop.fileno()
        cfg.nlisteners = len(listeners)
        for i, (fd, lid) in enumerate(zip(listeners, ctx.listener_ids)):
            cfg.listeners[i] = fd
            cfg.listener_ids[i] = lid
        cfg.nids = len(kinds)
        codes = {"http": lib.NC_HTTP, "echo": lib.NC_ECHO}
        for lid, (kind, _) in enumerate(kinds):
            cfg.protocols[lid] = codes.get(kind, lib.NC_PY)
        cfg.exclusive = int(ctx.accept == EXCLUSIVE)
        cfg.handoff_fd = ctx.handoff.fileno() if ctx.handoff is not None else -1
        cfg.recv_size = ctx.limits.recv_size
        cfg.max_conns = ctx.limits.max_connections
        cfg.max_output = ctx.limits.max_output
        cfg.message_size = opts.get("message_size", 0)
        cfg.max_header_bytes = opts.get("max_header_bytes", 8192)
        cfg.max_body_bytes = opts.get("max_body_bytes", 1 << 20)
        cfg.accept_backoff_ms = max(1, round(ctx.limits.accept_backoff * 1000))
        fill_limits(cfg.limits, ctx.limits)
        cfg.user = handle
        self.cstats = ffi.new("struct nc_stats *")
        err = ffi.new("int *")
        core = lib.nc_new(cfg, self.cstats, err)
        if core == ffi.NULL:
            raise BackendError(f"native core setup failed: {os.strerror(err[0])}")
        stats = ctx.stats
        if stats.tid and lib.nc_gettid() != stats.tid:
            stats.extra["tid_mismatch"] = lib.nc_gettid()  # never expected: same thread
            stats.declare_levels("tid_mismatch")
        stats.refresh = self._sync   # snapshots, from any thread, read the C counters
        stats.mark_ready()           # nc_new has added the listeners to its epoll
        try:
            rc = lib.nc_serve(core)  # GIL released until the stop eventfd fires
            if rc < 0:
                raise OSError(-rc, f"epoll_wait: {os.strerror(-rc)}")
            lib.nc_drain(core, max(0, int(ctx.limits.drain_timeout * 1000)))
        finally:
            lib.nc_free(core)  # closes whatever is still open (never the listeners)
            self._sync()
            stats.refresh = None   # final figures stay in ctx.stats

    def _sync(self) -> None:
        """Copy the C counters into WorkerStats (``WorkerStats.refresh``: any thread)."""
        cs, st = self.cstats, self.ctx.stats
        for k in COUNTERS:
            setattr(st, k, getattr(cs, k))
        st.open = cs.open
        extra = st.extra
        for k in EXTRA:
            extra[k] = getattr(cs, k)
        for lid, pl in enumerate(st.per_listener):
            pl.accepted = cs.l_accepted[lid]
            pl.listen_wakeups = cs.l_listen_wakeups[lid]
            pl.lost_races = cs.l_lost_races[lid]

    # -- python protocols (callbacks from the C loop, in this worker's thread) ----------

    def _py_feed(self, fd: int, lid: int, data: bytes, out) -> int:
        proto = self._protos.get(fd)
        if proto is None:
            proto = self._protos[fd] = self._factories[lid]()
        try:
            res, n = proto.feed(data)
        except Exception:  # noqa: BLE001 - a handler bug closes one connection only
            self._policy.handler_failed(proto, f"fd {fd}")
            return -1
        self._set_out(out, res, proto)
        if self._track:
            out.partial = int(proto.partial)
        return n

    def _py_pull(self, fd: int, out) -> int:
        """Rule held-answers: the held answers of a Python protocol (the C loop pulls them)."""
        proto = self._protos[fd]
        try:
            res, n = proto.pull()
        except Exception:  # noqa: BLE001 - a handler bug closes one connection only
            self._policy.handler_failed(proto, f"fd {fd}")
            return -1
        self._set_out(out, res, proto)
        return n

    def _py_eof(self, fd: int, lid: int, out) -> int:
        proto = self._protos.get(fd)
        if proto is None:
            proto = self._protos[fd] = self._factories[lid]()
        res = self._policy.eof(proto, f"fd {fd}")
        if res is None:
            return -1
        self._set_out(out, res, proto)
        return 0

    def _set_out(self, out, res, proto) -> None:
        if res:
            # C copies what the kernel does not take before the next callback.
            self._out = buf = self._ffi.from_buffer(res)
            out.p = buf
            out.len = len(buf)
        out.closing = int(proto.closing)
        out.more = int(proto.more)
