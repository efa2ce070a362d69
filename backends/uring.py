"""io_uring through a small C event core: completions reaped in C, the protocol in Python.

A completion backend owns its loop (backends/base.py): it submits operations, the kernel
completes them, and every buffer the kernel may still write stays pinned until the
completion that releases it has been seen.  Per worker:

* **One ring, never shared**, created in the worker's own thread.  Setup flags are
  probed strongest first: ``SINGLE_ISSUER|DEFER_TASKRUN`` (task work runs only when we
  enter the kernel to wait: no interrupts, completions in batches), then
  ``COOP_TASKRUN|TASKRUN_FLAG``, then none.  The choice is in ``stats.extra
  ["setup_flags"]`` and in ``parallelnet backends``.
* **Accept.**  On the shared listening socket (the default) every worker keeps one
  *single-shot* accept armed and re-arms it after each completion.  Inside the kernel
  an accept that finds the queue empty arms a poll on the listening socket with
  ``EPOLLEXCLUSIVE`` and retries when woken, so one new connection wakes one waiting
  ring, and a ring whose retry finds the queue already emptied by another simply stays
  armed: the race is *invisible* to us.  ``lost_races`` is therefore ``None`` (not
  observable; ``n/a`` in the table) on a shared socket, 0 where there is no race
  (reuseport, dispatch); ``listen_wakeups`` counts accept completions, and an accept
  completion flagged ``IORING_CQE_F_SOCK_NONEMPTY`` (more in the backlog) takes up to 16
  more synchronously (``extra["accept_bursts"]``).  ``--uring-accept multishot``
  arms one multishot accept instead: on a shared socket the first ring armed keeps the
  head of the wait queue and gets (nearly) every connection (measured in
  tests/test_uring.py).  With ``--accept reuseport`` each worker's own socket gets a
  multishot accept (no race there to spread anything).
* **Dispatch** (``--accept dispatch``): the worker has no listener; the core's acceptor
  thread (core/dispatch.py) passes each connected socket over an AF_UNIX SOCK_SEQPACKET
  channel as ``SCM_RIGHTS``.  The ring keeps a single-shot poll on ``ctx.handoff``,
  re-armed after each completion; the C core then takes every waiting fd with
  ``recvmsg`` until EAGAIN and adopts each as a connection (``stats.accepted``,
  ``extra["handoffs"]``; ``extra["handoff_wakeups"]`` counts the polls that fired).  At
  drain the poll is cancelled and its final completion takes what is waiting once more
  (the drain's last look: no wakeup, no lost race).  That channel is one mechanism for
  every backend and both modes.  ``--uring-handoff msg-ring`` (thread mode) is the
  io_uring-native alternative issue 5 asked to measure: the dispatcher submits
  ``IORING_OP_MSG_RING`` (``IORING_MSG_DATA``) on a small ring of its own, and the fd
  number arrives in the worker's CQ as a completion (``extra["msg_handoffs"]``) - no
  poll, no recvmsg, no duplicate fd; the worker adopts the acceptor's fd (one fd table).
  ``IORING_MSG_SEND_FD`` would also serve forked workers, but it installs a *direct*
  descriptor, which the synchronous drain reads and close(2) here cannot use.  At drain
  the worker takes one look without waiting, so a connection posted just before the
  dispatcher stopped is answered like any other.
* **Receive**: multishot recv with a provided buffer ring.  ``-ENOBUFS`` ends the
  multishot; the connection is re-armed as soon as buffers return (after the batch
  holding them is processed, or a send that pinned one completes); nothing is dropped,
  the data waits in the socket.  Counted in ``extra["enobufs"]``.
* **Send**: one send in flight per connection, further output queued in order;
  partial sends are resubmitted for the rest.  When the protocol hands back the very
  buffer it was given (echo), the provided buffer itself is sent and recycled only when
  that send completes (no copy) - unless output is already queued or the ring runs
  short, where it is copied so that a slow reader cannot hold the ring's buffers.
* **Backpressure**: past ``limits.max_output`` pending bytes the connection's
  multishot recv is cancelled (it would otherwise keep completing), and re-armed once
  output drains below half of it.
* **Half-close**: a recv of 0 calls ``proto.eof()``, flushes, closes.
* **Close**: cancel the connection's operations, wait for their final completions,
  then close(2) and recycle its buffers: no buffer is reused while the kernel may
  still write it.
* **Batching**: one ``io_uring_enter`` per loop iteration submits everything the
  previous batch produced and waits (the ring fd is registered with the worker thread:
  no fd lookup per enter); cffi releases the GIL around it.  The C core returns a batch
  of application events (open, data, eof, closed, stop, drained, tick).  Per iteration
  Python pays the wait and the batch only: the timer tick is an event, counters are
  copied by the snapshot thread (``WorkerStats.refresh``), and the batch processor is a
  closure built once.
* **Batching window** (``--uring-latency-budget-us``, default
  ``DEFAULT_LATENCY_BUDGET_US``): while the measured arrival rate predicts at least 4
  completions within the budget and the worker uses under 60% of a CPU, a wait holds
  completions for up to the budget (from the wait's start) so that one wake-up serves
  a batch; otherwise it returns at the first completion.  The policy and
  its measured CPU-vs-latency curve: uring_core.c and docs/uring.md.
* **Stop**: a poll on ``ctx.stop``'s eventfd is armed on the ring, so a stopped worker
  wakes at once.  Drain then mirrors readiness.py: accepts are cancelled and the listen
  backlog taken once (synchronously), each connection's recv is cancelled and what its
  peer already sent is read synchronously and answered, output is flushed within
  ``limits.drain_timeout``, everything is closed.
* **Accept out of fds** (EMFILE/ENFILE/ENOBUFS/ENOMEM): the accept is not re-armed
  (it would fail at once, a spin through the ring); the listener is paused for a
  back-off (``limits.accept_backoff`` doubling to 1 s, reset by a successful accept) and
  the wait is bounded by its resume time.  ``extra["accept_errors"]``/``["accept_backoffs"]``.
* **Idle / header timeouts**: the C core stamps each connection on progress (data in,
  send completed) with a clock read once per wait; it bounds the wait by the coarse
  timer tick while connections are open and emits ``EV_TICK`` when it is due; a sweep
  per tick (``uc_idle``: one call) lists the connections past the shortest timeout;
  Python closes those idle too long or whose protocol holds a partial request
  (``proto.partial``).
* **A failed ring** (a submit that cannot flush the SQ, CQEs the kernel dropped): every
  core call then returns ``-errno`` and the worker raises ``OSError`` - never an
  ``abort()`` of the whole process.
* **CQ overflow**: the CQ is 8x the SQ (``--uring-cq-entries`` to shrink it for tests); ``io_uring_cq_has_overflow`` after a reap is
  counted in ``extra["cq_overflows"]`` (the kernel keeps overflowed CQEs and flushes
  them at the next enter), ``-EBADR`` from an enter (CQEs lost) in ``cq_dropped``.
* **Measured options, off by default** (docs/uring.md has the numbers; none won at 64 B
  echo): ``--uring-fixed-files`` (registered fds after accept, IOSQE_FIXED_FILE),
  ``--uring-sqpoll IDLE_MS`` (its kernel thread ``iou-sqp-<tid>`` is a task of this
  process that ``cpu_ns`` does not cover: reported as ``extra["sqpoll_cpu_ns"]`` and
  added to server CPU by bench_uring), ``--uring-zc-threshold BYTES`` (SEND_ZC: the
  result CQE ends the send, only the memory waits for the notification CQE,
  ``sendzc_notifs``).
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import resource
import threading
import time

from parallelnet.backends.base import (
    DISPATCH, REUSEPORT, SHARED, Availability, Backend, BackendError,
)
from parallelnet.core.stats import NOT_OBSERVABLE

log = logging.getLogger("parallelnet.worker")

WHEEL = "liburing==2026.3.30"
SETUP_FLAG_NAMES = (
    (1 << 1, "SQPOLL"), (1 << 3, "CQSIZE"), (1 << 7, "SUBMIT_ALL"), (1 << 8, "COOP_TASKRUN"),
    (1 << 9, "TASKRUN_FLAG"), (1 << 12, "SINGLE_ISSUER"), (1 << 13, "DEFER_TASKRUN"),
    (1 << 16, "NO_SQARRAY"),
)
EXTRA_STATS = ("entries", "sqes", "cqes", "enobufs", "cq_overflows", "cq_dropped",
               "zc_sends", "copied_sends", "partial_sends", "recv_arms", "accept_errors",
               "accept_backoffs", "max_pending", "handoffs", "handoff_lost", "handoff_wakeups",
               "fixed_files", "sendzc_ops", "sendzc_notifs", "idle_trims", "msg_handoffs",
               "malloc_trims", "sendzc_held_max", "blocking_waits", "empty_waits",
               "windowed_waits", "window_us", "arrival_per_s", "accept_bursts",
               "ring_fd_registered", "util_pct", "window_bans")
SWEEP_MAX = 4096   # connections closed per timer sweep at most (the rest: next tick)
#: --uring-latency-budget-us default, chosen from the measured CPU-vs-latency curve
#: (docs/uring.md, "The batching window").
DEFAULT_LATENCY_BUDGET_US = 200


def flag_names(flags: int) -> str:
    names = [n for bit, n in SETUP_FLAG_NAMES if flags & bit]
    rest = flags & ~sum(bit for bit, _ in SETUP_FLAG_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "none"


def liburing_path() -> str | None:
    """The wheel's shared library, located without importing the package (its Python
    API crashes on CPUs without AVX-512)."""
    spec = importlib.util.find_spec("liburing")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "liburing.so")
    return path if os.path.exists(path) else None


def load():
    """(ffi, lib) with liburing resolved; raises BackendError with the precise reason."""
    path = liburing_path()
    if path is None:
        raise BackendError(f"the PyPI wheel {WHEEL} is not installed (pip install '{WHEEL}')")
    try:
        from parallelnet.backends._uring import ffi, lib
    except ImportError as exc:
        raise BackendError(f"extension parallelnet.backends._uring not built ({exc}); "
                           "reinstall the project so setup.py's cffi_modules compiles it") from None
    err = lib.uc_init(path.encode())
    if err != ffi.NULL:
        raise BackendError(f"liburing from the wheel unusable: {ffi.string(err).decode()}")
    return ffi, lib


def new_core(ffi, lib, ctx, *, raw: bool = False, multishot_accept: bool = False,
             nbufs: int = 1024, bufsize: int = 16384, entries: int = 1024, setup_flags: int = 0,
             cq_entries: int = 0, fixed_files: bool = False, sqpoll_idle_ms: int = 0,
             zc_threshold: int = 0, latency_budget_us: int = 0, tick_ms: int = 0,
             **cproto):
    listeners = [s.fileno() for s in ctx.listeners]
    if len(listeners) > lib.MAX_LISTENERS:
        raise BackendError(f"at most {lib.MAX_LISTENERS} listening sockets per worker")
    if nbufs & (nbufs - 1) or not 1 <= nbufs <= 32768:
        raise BackendError("--uring-buffers must be a power of two in 1..32768")
    cfg = ffi.new("struct uc_config *")
    cfg.entries = entries
    cfg.nbufs = nbufs
    cfg.bufsize = bufsize
    cfg.max_conns = ctx.limits.max_connections
    cfg.max_output = ctx.limits.max_output
    cfg.setup_flags = setup_flags
    cfg.stop_fd = ctx.stop.fileno()
    cfg.multishot_accept = int(multishot_accept)
    cfg.raw = int(raw)
    cfg.cq_entries = cq_entries
    cfg.accept_backoff_ms = max(1, int(ctx.limits.accept_backoff * 1000))
    cfg.nlisteners = len(listeners)
    if fixed_files:   # one table slot per connection id, within the fd limit
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cfg.fixed_files = max(1, min(ctx.limits.max_connections, soft if soft > 0 else 1024, 1 << 16))
    cfg.sqpoll_idle_ms = max(0, sqpoll_idle_ms)
    cfg.zc_threshold = max(0, zc_threshold)
    cfg.latency_budget_us = max(0, latency_budget_us)
    cfg.tick_ms = max(0, tick_ms)
    for k, v in cproto.items():   # native-uring's C-protocol mode (cproto, its limits)
        setattr(cfg, k, v)
    handoff = getattr(ctx, "handoff", None)
    cfg.handoff_fd = handoff.fileno() if handoff is not None else -1
    for i, fd in enumerate(listeners):
        cfg.listeners[i] = fd
    err = ffi.new("int *")
    core = lib.uc_new(cfg, err)
    if core == ffi.NULL:
        raise BackendError(f"io_uring setup failed: {os.strerror(err[0])} (errno {err[0]}); "
                           f"entries={entries} cq_entries={cq_entries or 8 * entries} "
                           f"buffers={nbufs}x{bufsize}")
    return core


def voluntary_switches(status_path: str) -> int | None:
    """``voluntary_ctxt_switches`` of one thread (/proc/PID/task/TID/status): each time it
    went to sleep, in a wait that returned or one the kernel resumed without returning."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _sqpoll_thread_stat() -> str | None:
    """/proc path of this thread's SQPOLL kernel thread (``iou-sqp-<our tid>``: a task of
    this process that ``cpu_ns``, our own thread's clock, does not include)."""
    want = f"iou-sqp-{threading.get_native_id()}"
    for _ in range(100):   # the thread names itself once it first runs: allow it a moment
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    if f.read().strip() == want:
                        return f"/proc/self/task/{tid}/schedstat"
            except OSError:
                continue
        time.sleep(0.005)
    log.warning("SQPOLL thread %s not found: its CPU cannot be reported", want)
    return None


def sqpoll_cpu_ns(path: str) -> int:
    """CPU time (ns) the SQPOLL thread has run: schedstat's first field."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


_probe_cache: Availability | None = None


def probe_uring() -> Availability:
    """Why io_uring cannot be used here, as precisely as we can tell (cached)."""
    global _probe_cache
    if _probe_cache is not None:
        return _probe_cache
    _probe_cache = _probe()
    return _probe_cache


def _probe() -> Availability:
    try:
        ffi, lib = load()
    except BackendError as exc:
        return Availability(False, str(exc))
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            disabled = int(f.read().strip() or 0)
    except (OSError, ValueError):
        disabled = 0
    if disabled == 2:
        return Availability(False, "io_uring disabled by sysctl kernel.io_uring_disabled=2")
    cfg = ffi.new("struct uc_config *", dict(entries=8, nbufs=8, bufsize=4096, max_conns=1,
                                             max_output=1, stop_fd=-1, handoff_fd=-1))
    err = ffi.new("int *")
    core = lib.uc_new(cfg, err)
    if core == ffi.NULL:
        code = err[0]
        if code == errno.ENOSYS:
            return Availability(False, "kernel lacks io_uring (io_uring_setup: ENOSYS)")
        if code == errno.EPERM:
            why = ("kernel.io_uring_disabled=1 and this process is not in io_uring_group"
                   if disabled == 1 else "blocked by seccomp or an LSM (io_uring_setup: EPERM)")
            return Availability(False, why)
        if code == errno.EINVAL:
            return Availability(False, "kernel too old for provided buffer rings (EINVAL)")
        return Availability(False, f"io_uring setup failed: {os.strerror(code)}")
    try:
        missing = lib.uc_check_opcodes(core)
        flags = lib.uc_setup_flags(core)
        features = lib.uc_features(core)
    finally:
        lib.uc_free(core)
    if missing:
        return Availability(False, f"kernel io_uring lacks opcode {missing}")
    if not features & (1 << 8):
        return Availability(False, "kernel io_uring lacks IORING_FEAT_EXT_ARG (needs >= 5.11)")
    rel = os.uname().release.split(".")
    try:
        if (int(rel[0]), int(rel[1].split("-")[0])) < (6, 0):
            return Availability(False, f"kernel {os.uname().release} lacks multishot recv (needs >= 6.0)")
    except (ValueError, IndexError):
        pass
    ver = lib.uc_lib_version()
    return Availability(True, detail=f"liburing {ver // 100}.{ver % 100}, flags {flag_names(flags)}")


def _setup_flags(lib, name: str) -> int:
    # SUBMIT_ALL in every named set, as in auto's: without it one SQE that fails at
    # submission leaves the rest of the batch in the SQ.
    all_ = lib.IORING_SETUP_SUBMIT_ALL
    return {"auto": 0, "plain": all_,
            "coop": lib.IORING_SETUP_COOP_TASKRUN | lib.IORING_SETUP_TASKRUN_FLAG | all_,
            "defer": lib.IORING_SETUP_SINGLE_ISSUER | lib.IORING_SETUP_DEFER_TASKRUN | all_,
            }[name]


IORING_OP_MSG_RING = 40


def _check_msg_ring(ffi, lib, core) -> None:
    """--uring-handoff msg-ring needs the opcode and a ring fd we can name."""
    if lib.uc_opcode_supported(core, IORING_OP_MSG_RING) != 1:
        raise BackendError("--uring-handoff msg-ring: this kernel's io_uring lacks "
                           "IORING_OP_MSG_RING (Linux 5.18+)")
    if lib.uc_ring_fd(core) < 0:
        raise BackendError("--uring-handoff msg-ring: cannot find the ring's fd in liburing's "
                           "struct io_uring (layout differs from liburing 2.15's)")
    err = ffi.new("int *")
    sender = lib.uc_sender_new(err)
    if sender == ffi.NULL:
        raise BackendError(f"--uring-handoff msg-ring: sender ring: {os.strerror(err[0])}")
    lib.uc_sender_free(sender)


class RingHandoff:
    """The dispatcher's channel into one worker's ring (``--uring-handoff msg-ring``).

    ``send(fd)`` submits ``IORING_OP_MSG_RING`` on a small ring of the dispatcher's own
    (created on first use, in the dispatcher's thread) and waits for its completion: the
    worker's CQ then holds a CQE carrying fd, which the worker adopts as it is
    (``transfers``: the acceptor must not close it).  See uring_core.c.
    """

    kind = "msg-ring"
    transfers = True

    def __init__(self, ffi, lib, target_fd: int) -> None:
        if target_fd < 0:
            raise BackendError("--uring-handoff msg-ring: the worker's ring fd is unknown")
        self.ffi, self.lib, self.target = ffi, lib, target_fd
        self._sender = None

    def send(self, fd: int) -> None:
        if self._sender is None:
            err = self.ffi.new("int *")
            sender = self.lib.uc_sender_new(err)
            if sender == self.ffi.NULL:
                raise OSError(err[0], f"msg-ring sender: {os.strerror(err[0])}")
            self._sender = sender
        r = self.lib.uc_sender_send(self._sender, self.target, fd)
        if r in (-errno.EAGAIN, -errno.EBUSY, -errno.EOVERFLOW):
            raise BlockingIOError(-r, os.strerror(-r))  # the target cannot take it now
        if r < 0:
            raise OSError(-r, f"IORING_OP_MSG_RING: {os.strerror(-r)}")

    def close(self) -> None:
        if self._sender is not None:
            self.lib.uc_sender_free(self._sender)
            self._sender = None


class UringBackend(Backend):
    name = "uring"
    description = "io_uring, C event core (multishot recv, buffer ring, batched submit/wait)"
    kind = "completion"
    accept_strategies = frozenset({SHARED, REUSEPORT, DISPATCH})
    conformance_variants = [["--uring-accept", "multishot"],
                            ["--uring-buffers", "4", "--uring-buffer-size", "512"],
                            ["--uring-fixed-files", "--uring-zc-threshold", "4096"],
                            ["--accept", "dispatch", "--uring-handoff", "msg-ring"]]

    @classmethod
    def probe(cls) -> Availability:
        return probe_uring()

    @classmethod
    def preflight(cls, limits, options) -> None:
        """Create (and free) one ring with the requested settings in the parent: a ring
        that cannot be created is a clear startup error, not a dead worker."""
        ffi, lib = load()
        from types import SimpleNamespace

        ctx = SimpleNamespace(listeners=[], limits=limits, stop=SimpleNamespace(fileno=lambda: -1))
        opt = lambda name, default: getattr(options, name, default)  # noqa: E731
        setup = _setup_flags(lib, opt("uring_setup", "auto"))
        core = new_core(ffi, lib, ctx, nbufs=opt("uring_buffers", 1024),
                        bufsize=max(64, min(opt("uring_buffer_size", 16384), limits.recv_size)),
                        entries=opt("uring_entries", 1024), setup_flags=setup,
                        cq_entries=opt("uring_cq_entries", 0) or 0, **cls._options(options))
        try:
            if cls.own_handoff(options):
                _check_msg_ring(ffi, lib, core)
        finally:
            lib.uc_free(core)

    @staticmethod
    def _options(ctx_or_opts) -> dict:
        """The measured performance options (docs/uring.md), as new_core keywords."""
        opt = ctx_or_opts.option if hasattr(ctx_or_opts, "option") else \
            (lambda name, default: getattr(ctx_or_opts, name, default))
        budget = opt("uring_latency_budget_us", DEFAULT_LATENCY_BUDGET_US)
        return {"fixed_files": bool(opt("uring_fixed_files", False)),
                "sqpoll_idle_ms": opt("uring_sqpoll", 0) or 0,
                "zc_threshold": opt("uring_zc_threshold", 0) or 0,
                "latency_budget_us": DEFAULT_LATENCY_BUDGET_US if budget is None else budget}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        if any("--uring-accept" in a.option_strings for a in parser._actions):
            return  # uring and uring-py share these options
        g = parser.add_argument_group("io_uring (uring, uring-py)")
        g.add_argument("--uring-accept", choices=["single", "multishot"], default="single",
                       help="on the shared socket: single-shot accept re-armed per completion "
                            "(spreads connections) or one multishot accept (first ring takes all)")
        g.add_argument("--uring-buffers", type=int, default=1024,
                       help="provided buffers per worker (power of two)")
        g.add_argument("--uring-buffer-size", type=int, default=16384,
                       help="bytes per provided buffer")
        g.add_argument("--uring-entries", type=int, default=1024, help="SQ entries (CQ is 8x)")
        g.add_argument("--uring-cq-entries", type=int, default=0,
                       help="CQ entries (0: 8x the SQ); tiny values force CQ overflow (tests)")
        g.add_argument("--uring-setup", choices=["auto", "defer", "coop", "plain"], default="auto",
                       help="ring setup flags (auto: strongest that works)")
        g.add_argument("--uring-fixed-files", action="store_true",
                       help="uring: register each connection's fd (IOSQE_FIXED_FILE recv/send)")
        g.add_argument("--uring-sqpoll", type=int, default=0, metavar="IDLE_MS",
                       help="SQPOLL kernel thread, idling after IDLE_MS (0: off); its CPU is "
                            "reported in stats extra sqpoll_cpu_ns")
        g.add_argument("--uring-zc-threshold", type=int, default=0, metavar="BYTES",
                       help="uring: sends of at least BYTES use IORING_OP_SEND_ZC (0: never)")
        g.add_argument("--uring-latency-budget-us", type=int, default=DEFAULT_LATENCY_BUDGET_US,
                       metavar="US",
                       help="batching window: while the arrival rate fills it, a wait may hold "
                            "completions up to US microseconds to serve them with one wake-up "
                            f"(0: off; default {DEFAULT_LATENCY_BUDGET_US}, docs/uring.md)")
        g.add_argument("--uring-handoff", choices=["scm", "msg-ring"], default="scm",
                       help="with --accept dispatch (thread mode): scm = SCM_RIGHTS over a "
                            "socketpair, a poll wakes the ring (every backend's channel); "
                            "msg-ring = IORING_OP_MSG_RING posts the fd into the ring's CQ")

    @classmethod
    def own_handoff(cls, options) -> str | None:
        return "msg-ring" if getattr(options, "uring_handoff", "scm") == "msg-ring" else None

    def handoff_channel(self):
        """--uring-handoff msg-ring: the dispatcher posts fds into this worker's ring."""
        return RingHandoff(self.ffi, self.lib, self.ring_fd)

    # -- setup ------------------------------------------------------------------------

    def _open(self, raw: bool = False):
        ctx = self.ctx
        self.ffi, self.lib = ffi, lib = load()
        multishot = ctx.accept == REUSEPORT or ctx.option("uring_accept", "single") == "multishot"
        setup = _setup_flags(lib, ctx.option("uring_setup", "auto"))
        bufsize = max(64, min(ctx.option("uring_buffer_size", 16384), ctx.limits.recv_size))
        self.core = new_core(ffi, lib, ctx, raw=raw, multishot_accept=multishot,
                             nbufs=ctx.option("uring_buffers", 1024), bufsize=bufsize,
                             entries=ctx.option("uring_entries", 1024), setup_flags=setup,
                             cq_entries=ctx.option("uring_cq_entries", 0) or 0,
                             tick_ms=0 if raw else max(1, int((ctx.limits.timer_tick() or 0) * 1000))
                             if ctx.limits.timer_tick() else 0,
                             **self._options(ctx), **self._core_options(lib))
        self.bufsize = bufsize
        self.ring_fd = lib.uc_ring_fd(self.core)   # -1 if it cannot be told (msg-ring refused)
        self.sqpoll_stat = _sqpoll_thread_stat() if self._options(ctx)["sqpoll_idle_ms"] else None
        self.multishot = multishot
        self.pool = memoryview(ffi.buffer(lib.uc_pool(self.core), lib.uc_pool_size(self.core)))
        self.cstats = lib.uc_stats(self.core)
        extra = ctx.stats.extra
        extra["setup_flags"] = flag_names(lib.uc_setup_flags(self.core))
        extra["accept_mode"] = "multishot" if multishot else "single"
        for k in EXTRA_STATS + ("cqes_per_entry", "sqes_per_entry", "idle_timeouts",
                                "header_timeouts", "sqpoll_cpu_ns", "vol_ctx_switches"):
            extra[k] = 0  # every key exists from the start: snapshots iterate this dict
        # An accept that loses the race on a shared socket is retried inside the kernel
        # and never completes: not observable here (docs/uring.md, "What the accept race
        # looks like").  With one socket per worker, or none, there is no race: 0 is true.
        ctx.stats.lost_races = NOT_OBSERVABLE if ctx.accept == SHARED and ctx.listeners else 0
        self._accept_backoffs_seen, self._backing_off = 0, False
        self._status_path = f"/proc/self/task/{threading.get_native_id()}/status"
        ctx.stats.refresh = self._refresh_switches
        lim = ctx.limits
        self.tick = lim.timer_tick()
        self.idle = lim.idle_timeout if lim.idle_timeout and lim.idle_timeout > 0 else 0.0
        self.hdr = lim.header_timeout if lim.header_timeout and lim.header_timeout > 0 else 0.0
        self.sweep_ids = ffi.new("int32_t[]", SWEEP_MAX)
        self.sweep_ages = ffi.new("int32_t[]", SWEEP_MAX)

    def _core_options(self, lib) -> dict:
        """Extra core settings of a subclass (native-uring's C-protocol mode)."""
        return {}

    def _refresh(self) -> None:
        """WorkerStats.refresh: snapshots (another thread) copy the C counters, so the
        loop never pauses for them (aligned 64-bit reads of words only C writes)."""
        self._sync_stats()
        self._refresh_switches()

    def _refresh_switches(self) -> None:
        """WorkerStats.refresh (the snapshot's thread): this worker thread's voluntary
        context switches, read from /proc here so the loop pays nothing for them."""
        switches = voluntary_switches(self._status_path)
        if switches is not None:
            self.ctx.stats.extra["vol_ctx_switches"] = switches

    def _sync_stats(self) -> None:
        """Copy the C core's counters into WorkerStats (single writer: this worker)."""
        cs, st = self.cstats, self.ctx.stats
        st.bytes_out = cs.bytes_out
        st.wakeups = cs.waits
        st.listen_wakeups = cs.accept_cqes
        st.refused = cs.refused
        backing_off = cs.accept_backoffs != self._accept_backoffs_seen
        if backing_off and not self._backing_off:   # logged once per episode
            log.warning("worker %d (%s): accept failed: %s; pausing the listener, retrying "
                        "with back-off", self.ctx.index, self.name,
                        os.strerror(cs.last_accept_error))
        self._backing_off, self._accept_backoffs_seen = backing_off, cs.accept_backoffs
        st.accepted = cs.accepted
        if cs.handoff_lost and not st.extra.get("handoff_lost"):
            log.warning("worker %d (%s): out of fds, connections handed over were lost "
                        "(handoff_lost)", self.ctx.index, self.name)
        st.backpressure = cs.backpressure
        extra = st.extra
        for k in EXTRA_STATS:
            extra[k] = getattr(cs, k)
        entries = cs.entries or 1
        extra["cqes_per_entry"] = round(cs.cqes / entries, 3)
        extra["sqes_per_entry"] = round(cs.sqes / entries, 3)
        if self.sqpoll_stat:
            extra["sqpoll_cpu_ns"] = sqpoll_cpu_ns(self.sqpoll_stat)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        self._open()
        lib = self.lib
        self.protos: dict[int, object] = {}
        self.stopping = False
        self._process = self._batch_processor()
        self.ctx.stats.refresh = self._refresh
        try:
            lib.uc_start(self.core)
            lib.uc_submit(self.core)
            self.ctx.stats.mark_ready()
            self._serve()
            self._drain()
        finally:
            self._close_all()

    def _serve(self) -> None:
        lib, core, ffi = self.lib, self.core, self.ffi
        wait, events, unpack = lib.uc_wait, lib.uc_events, ffi.unpack
        process = self._process
        ring_failed = self._ring_failed
        # Per iteration only the wait and the batch: the C core bounds the wait by the
        # timer tick while connections are open and reports the tick as EV_TICK; the
        # counters are copied by the snapshot thread (WorkerStats.refresh); stop arrives
        # as EV_STOP (the eventfd's poll on the ring).
        while not self.stopping:
            n = wait(core, -1)
            if n > 0:
                process(unpack(events(core), 4 * n))
            elif n < 0:
                ring_failed(n)
        self._sync_stats()

    def _batch_processor(self):
        """The hot path, built once: one batch of events through the protocol.  A
        closure over everything it touches, so a batch costs no attribute lookups."""
        backend, lib, core = self, self.lib, self.core
        EV_DATA, EV_OPEN, EV_CLOSED, EV_EOF = lib.EV_DATA, lib.EV_OPEN, lib.EV_CLOSED, lib.EV_EOF
        EV_DRAINED, EV_STOP, EV_TICK = lib.EV_DRAINED, lib.EV_STOP, lib.EV_TICK
        send_buf, send_copy, finish = lib.uc_send_buf, lib.uc_send_copy, lib.uc_finish
        from_buffer = self.ffi.from_buffer
        protos = self.protos
        pool = self.pool
        bsize = self.bufsize
        stats = self.ctx.stats
        factory = self.ctx.protocol_factory
        handler_failed, send_failed = self._handler_failed, self._send_failed

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
                        handler_failed(cid, proto)
                        continue
                    requests += k
                    if out is data:
                        rc = send_buf(core, cid, ev[i + 2], 0, length)
                    elif out:
                        rc = send_copy(core, cid, out if type(out) is bytes else from_buffer(out),
                                       len(out))
                    else:
                        rc = 0
                    # The buffer returns to the kernel at the next wait: a protocol that
                    # kept this view would read memory being rewritten.  Released, any
                    # later use raises (a handler error on that connection) instead.
                    try:
                        data.release()
                    except BufferError:   # it holds an export of the view: the same breach
                        handler_failed(cid, proto)
                        continue
                    if rc < 0:
                        send_failed(cid, rc)
                    elif proto.closing:
                        finish(core, cid)
                elif kind == EV_OPEN:
                    protos[cid] = factory()
                    stats.open += 1
                elif kind == EV_CLOSED:
                    del protos[cid]
                    stats.open -= 1
                    stats.closed += 1
                    if ev[i + 2]:
                        stats.errors += 1
                elif kind == EV_EOF:
                    proto = protos[cid]
                    try:
                        out = proto.eof()
                    except Exception:  # noqa: BLE001
                        handler_failed(cid, proto)
                        continue
                    if out:
                        rc = send_copy(core, cid, out if type(out) is bytes else from_buffer(out),
                                       len(out))
                        if rc < 0:
                            send_failed(cid, rc)
                            continue
                    finish(core, cid)
                elif kind == EV_DRAINED:   # what the peer sent before stop has been answered
                    finish(core, cid)
                elif kind == EV_TICK:
                    backend._sweep()
                    if backend.ctx.stop.is_set():   # belt and braces: EV_STOP is the signal
                        backend.stopping = True
                elif kind == EV_STOP:
                    backend.stopping = True
            stats.requests += requests
            stats.bytes_in += bytes_in

        return process

    def _send_failed(self, cid: int, rc: int) -> None:
        """The core refused a response (-ENOMEM, -EMSGSIZE for >= 4 GiB, a failed ring):
        that connection ends with an error rather than carrying on with a hole in its
        output."""
        log.warning("worker %d (%s): cannot send on connection id %d: %s; closing it",
                    self.ctx.index, self.name, cid, os.strerror(-rc))
        self.lib.uc_close(self.core, cid, 1)

    def _ring_failed(self, rc: int) -> None:
        """uc_wait < 0: the ring itself failed (a submit that could not flush the SQ,
        CQEs the kernel dropped): this worker stops with that error; the server reports
        it and stops the others (a server missing a worker is not serving)."""
        raise OSError(-rc, f"worker {self.ctx.index} ({self.name}): io_uring failed: "
                           f"{os.strerror(-rc)}")

    def _sweep(self) -> None:
        """Close connections past the idle timeout, or past the header timeout while
        their protocol holds a partial request (one C call lists the candidates)."""
        idle, hdr = self.idle, self.hdr
        if not (idle or hdr):
            return
        limit = min(t for t in (idle, hdr) if t)
        n = self.lib.uc_idle(self.core, int(limit * 1000), self.sweep_ids, self.sweep_ages, SWEEP_MAX)
        if not n:
            return
        extra, protos, close = self.ctx.stats.extra, self.protos, self.lib.uc_close
        for cid, age_ms in zip(self.ffi.unpack(self.sweep_ids, n), self.ffi.unpack(self.sweep_ages, n)):
            age = age_ms / 1000
            proto = protos.get(cid)
            if proto is None:
                continue
            if idle and age >= idle:
                extra["idle_timeouts"] += 1
                close(self.core, cid, 0)
            elif hdr and age >= hdr and proto.partial:
                extra["header_timeouts"] += 1
                close(self.core, cid, 0)

    def _handler_failed(self, cid: int, proto) -> None:
        self.ctx.stats.handler_errors += 1
        log.exception("worker %d (%s): protocol %s failed on connection id %d; "
                      "closing that connection only", self.ctx.index, self.name,
                      type(proto).__name__, cid)
        self.lib.uc_close(self.core, cid, 1)

    def _drain(self) -> None:
        lib, core = self.lib, self.core
        lib.uc_drain_begin(core)
        # One look without waiting: connections the dispatcher posted (msg-ring) before it
        # stopped are still task work of ours; they become CQEs, then connections to drain.
        n = lib.uc_wait(core, 0)
        if n > 0:
            self._process(self.ffi.unpack(lib.uc_events(core), 4 * n))
        elif n < 0:
            self._ring_failed(n)
        deadline = time.monotonic() + self.ctx.limits.drain_timeout
        self._pump(lambda: lib.uc_nconns(core) > 0, deadline)

    def _pump(self, busy, deadline: float) -> None:
        lib, core, ffi = self.lib, self.core, self.ffi
        while busy():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            n = lib.uc_wait(core, max(1, int(remaining * 1000)))
            if n < 0:
                break   # the ring failed: nothing more will complete (uc_free leaks what it must)
            if n:
                self._process(ffi.unpack(lib.uc_events(core), 4 * n))

    def _close_all(self) -> None:
        lib, core, ffi = self.lib, self.core, self.ffi
        try:
            lib.uc_shutdown(core)
            # Wait (bounded) until the kernel holds no operation of ours: only then may
            # the buffer pool be freed.  Closes are reported as usual.
            self._pump(lambda: lib.uc_inflight(core) > 0 or lib.uc_nconns(core) > 0,
                       time.monotonic() + 2.0)
            # Closes released synchronously by uc_shutdown are reported by the next
            # wait even when nothing is left in flight: collect them.
            n = lib.uc_wait(core, 0)
            if n > 0:
                self._process(ffi.unpack(lib.uc_events(core), 4 * n))
            self._sync_stats()
            self._refresh_switches()
            self.ctx.stats.refresh = None   # the thread is about to go: keep the last figures
        finally:
            try:
                self.pool.release()
            except BufferError:
                pass  # only if a protocol kept the view it was fed (against its contract)
            leaked = lib.uc_free(core)
            if leaked:
                log.warning("worker %d: io_uring operations still in flight at exit; "
                            "buffer pool (and %d send chunks a SEND_ZC may still read) "
                            "leaked rather than freed", self.ctx.index, leaked - 1)
            self.core = None
