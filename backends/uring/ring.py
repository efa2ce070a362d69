"""The ring plumbing of the io_uring family: one worker's ring, shared by three backends.

``Ring`` (the C event core, its options, its counters), ``UringOptions`` (every
``--uring-*`` flag), ``load``/``new_core``/the probe, the msg-ring hand-off and
``IoUringBackend`` (what the three declare) live here; each backend's loop is its own
module: ``uring.py`` (the protocol in Python over the C core's events), ``uring_py.py``
(every completion in Python, the core's raw API) and ``native_uring.py`` (the C-protocol
mode: the whole loop in C).  The C side is split the same way (backends/uring/*.c).

The design, as the ``uring`` backend runs it (io_uring through a small C event core:
completions reaped in C, the protocol in Python):

A completion backend owns its loop (core/backend.py): it submits operations, the kernel
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
  more synchronously (``extra["accept_bursts"]``; the connections so taken are
  ``extra["burst_accepted"]``, so ``accepted == listen_wakeups + burst_accepted``: the
  part of the race that can be seen).  ``--uring-accept multishot``
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
* **Several addresses** (``--listen``, up to ``MAX_LISTENERS``): one accept armed per
  listener; each connection keeps its listener id (the accepting listener's, the
  hand-off's byte, or the msg-ring CQE's tag), reported with ``EV_OPEN``, and is served
  by ``ctx.protocols[id]``; the core counts accepts and accept completions per id
  (``stats.per_listener``, copied at snapshot time like the totals).
* **Receive**: multishot recv with a provided buffer ring.  ``-ENOBUFS`` ends the
  multishot; the connection is re-armed as soon as buffers return (after the batch
  holding them is processed, or a send that pinned one completes); nothing is dropped,
  the data waits in the socket.  Counted in ``extra["enobufs"]``.
* **Send**: one send in flight per connection, further output queued in order; the
  next send takes everything queued (up to 16 chunks gathered into one ``SENDMSG``:
  ``extra["gathered_sends"]``), so a reply that arrived in several provided buffers costs
  one round trip, and the rest of a partial send goes with it.  When the protocol hands
  back the very buffer it was given (echo), the provided buffer itself is sent and
  recycled only when that send completes (no copy) - unless the connection already holds
  8 of them in its queue or the ring runs short (a quarter kept free), where it is copied,
  so a slow reader cannot hold the ring's buffers.
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
  ``DEFAULT_LATENCY_BUDGET_US``): a wait gathers the completions the measured rate predicts
  within the budget (at most two per open connection) with
  ``io_uring_submit_and_wait_min_timeout``, returning when the batch is full or the budget
  has passed - except while a connection's output waits behind a send in flight, while
  clients wait for our answers (a closed loop, seen from how soon requests follow answers)
  or while the worker is busy.  The policy and its measured CPU-vs-latency curve:
  event_core.c (``window_nr``) and docs/uring.md.
* **Stop**: a poll on ``ctx.stop``'s eventfd is armed on the ring, so a stopped worker
  wakes at once.  Drain then mirrors readiness.py: accepts are cancelled and the listen
  backlog taken once (synchronously), each connection's recv is cancelled and what its
  peer already sent is read synchronously and answered, output is flushed within
  ``limits.drain_timeout``, everything is closed.
* **Accept out of fds** (EMFILE/ENFILE/ENOBUFS/ENOMEM): the accept is not re-armed
  (it would fail at once, a spin through the ring); the listener is paused for a
  back-off (``limits.accept_backoff`` doubling to 1 s, reset by a successful accept:
  core/accept.py's numbers, backends/policy_core.h in C) and the wait is bounded by its
  resume time.  ``extra["accept_errors"]``/``["accept_backoffs"]``; an episode is logged
  once, at its start (a callback from C, backends/ccore.py), as is a hand-off loss.
* **The connection policy** (core/policy.py): rules feed, backpressure, eof, finish and drain are
  the C core's own (feed order, backpressure marks, half-close, finish, the drain's
  ``DRAIN_READS``); Python applies rule handler-failure and rule eof's protocol call
  through ``ConnectionPolicy``.  Rules idle-timeout, request-deadline and coarse-timer run in C too (backends/policy_core.h): each
  connection is stamped on progress (data in, send completed) with a clock read once
  per wait, the wait is bounded by the coarse tick while connections are open, and each
  tick closes what is idle too long or past its request deadline.  The deadline needs
  the protocol's view: after a feed that leaves a request incomplete, or completes the
  one that was, Python tells the core (``uc_progress``: one call, never on the common
  path of whole requests), which starts, extends or clears it.
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
import dataclasses
import errno
import importlib.util
import logging
import os
import resource
import threading
import time

from parallelnet.core.backend import (
    DISPATCH, REUSEPORT, SHARED, Availability, Backend, BackendError,
)
from parallelnet.backends.ccore import fill_limits, install_notes
from parallelnet.core import procfs
from parallelnet.core.stats import NOT_OBSERVABLE

log = logging.getLogger("parallelnet.worker")

WHEEL = "liburing==2026.3.30"
SETUP_FLAG_NAMES = (
    (1 << 1, "SQPOLL"), (1 << 3, "CQSIZE"), (1 << 7, "SUBMIT_ALL"), (1 << 8, "COOP_TASKRUN"),
    (1 << 9, "TASKRUN_FLAG"), (1 << 12, "SINGLE_ISSUER"), (1 << 13, "DEFER_TASKRUN"),
    (1 << 16, "NO_SQARRAY"),
)
#: --uring-latency-budget-us default, chosen from the measured CPU-vs-latency curve
#: (docs/uring.md, "The batching window").
DEFAULT_LATENCY_BUDGET_US = 200
#: uring_api.h's MAX_LISTENERS: listening addresses one ring serves (``max_listeners``).
MAX_LISTENERS = 8


@dataclasses.dataclass(frozen=True)
class UringOptions:
    """Every ``--uring-*`` option, read once from the parsed arguments: the one place
    their defaults live (``add_arguments`` takes them from here)."""

    accept: str = "single"          # --uring-accept: single-shot or multishot on a shared socket
    # 256 x 64 KiB: the pool of 1024 x 16 KiB (16 MiB per worker) in buffers as large as a
    # readiness loop's reads, so a 64 KiB message is one completion and one feed, not four
    # (docs/uring.md, "Large payloads").
    buffers: int = 256              # provided buffers per worker (power of two)
    buffer_size: int = 65536        # bytes per provided buffer (capped by Limits.recv_size)
    entries: int = 1024             # SQ entries
    cq_entries: int = 0             # 0: 8 x entries
    setup: str = "auto"             # ring setup flags by name (see _setup_flags)
    fixed_files: bool = False
    sqpoll: int = 0                 # SQPOLL idle ms, 0: off
    zc_threshold: int = 0           # SEND_ZC from this many bytes, 0: never
    latency_budget_us: int = DEFAULT_LATENCY_BUDGET_US
    ring: str = "warm"              # provided ring: warm (a few buffers, the rest stacked) or fifo (all)
    calls: str = "batched"          # uring: queue the batch's calls to the core (one per wait) or direct
    handoff: str = "scm"            # --accept dispatch channel: scm or msg-ring

    @classmethod
    def of(cls, options: argparse.Namespace) -> UringOptions:
        """From ``serve``'s arguments (``uring_<field>``); absent or None: the default."""
        given = {f.name: getattr(options, "uring_" + f.name, None) for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in given.items() if v is not None})

    def bufsize(self, limits) -> int:
        return max(64, min(self.buffer_size, limits.recv_size))


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


_notes_installed = False


def load():
    """(ffi, lib) with liburing resolved; raises BackendError with the precise reason."""
    global _notes_installed
    path = liburing_path()
    if path is None:
        raise BackendError(f"the PyPI wheel {WHEEL} is not installed (pip install '{WHEEL}')")
    try:
        from parallelnet.backends.uring._uring import ffi, lib
    except ImportError as exc:
        raise BackendError(f"extension parallelnet.backends.uring._uring not built ({exc}); "
                           "reinstall the project so setup.py's cffi_modules compiles it") from None
    err = lib.uc_init(path.encode())
    if err != ffi.NULL:
        raise BackendError(f"liburing from the wheel unusable: {ffi.string(err).decode()}")
    if not _notes_installed:
        install_notes(ffi, "uc_py_accept_paused", "uc_py_handoff_lost", "uc_py_alloc_failed")
        _notes_installed = True
    return ffi, lib


def new_core(ffi, lib, limits, opts: UringOptions = UringOptions(), *, listeners=(),
             listener_ids=(), nids: int = 1, stop_fd: int = -1, handoff_fd: int = -1, raw: bool = False,
             multishot: bool = False, setup_flags: int | None = None, cproto: dict | None = None,
             user=None):
    """One event core (event_core.c) configured from ``limits`` and ``opts``.

    ``raw``: uring-py's mode (Python reaps every CQE; no accept, no timer in C).
    ``cproto``: native-uring's C-protocol settings (``struct uc_config`` fields).
    ``user``: the cffi handle the core's callbacks receive (None: no callbacks).
    ``listener_ids``: parallel to ``listeners`` (default all 0); ``nids``: how many
    listener ids the server has (a hand-off naming another is refused by the core).
    """
    fds = [s.fileno() for s in listeners]
    if len(fds) > lib.MAX_LISTENERS:
        raise BackendError(f"at most {lib.MAX_LISTENERS} listening sockets per worker")
    nbufs = opts.buffers
    if nbufs & (nbufs - 1) or not 1 <= nbufs <= 32768:
        raise BackendError("--uring-buffers must be a power of two in 1..32768")
    cfg = ffi.new("struct uc_config *")
    cfg.entries = opts.entries
    cfg.nbufs = nbufs
    cfg.bufsize = opts.bufsize(limits)
    cfg.max_conns = limits.max_connections
    cfg.max_output = limits.max_output
    cfg.setup_flags = _setup_flags(lib, opts.setup) if setup_flags is None else setup_flags
    cfg.stop_fd = stop_fd
    cfg.multishot_accept = int(multishot)
    cfg.raw = int(raw)
    cfg.cq_entries = opts.cq_entries
    cfg.accept_backoff_ms = max(1, int(limits.accept_backoff * 1000))
    cfg.nlisteners = len(fds)
    if opts.fixed_files:   # one table slot per connection id, within the fd limit
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cfg.fixed_files = max(1, min(limits.max_connections, soft if soft > 0 else 1024, 1 << 16))
    cfg.sqpoll_idle_ms = max(0, opts.sqpoll)
    cfg.zc_threshold = max(0, opts.zc_threshold)
    # The window only where a min_timeout wait behaves (the probe checked this kernel).
    cfg.latency_budget_us = max(0, opts.latency_budget_us) if window_usable() else 0
    cfg.fifo_ring = int(opts.ring == "fifo")
    if not raw:   # uring-py keeps the policy's timer in Python
        fill_limits(cfg.limits, limits)
    for k, v in (cproto or {}).items():
        setattr(cfg, k, v)
    cfg.handoff_fd = handoff_fd
    cfg.user = user if user is not None else ffi.NULL
    for i, fd in enumerate(fds):
        cfg.listeners[i] = fd
    for i, lid in enumerate(listener_ids):
        cfg.listener_ids[i] = lid
    if nids > lib.MAX_LISTENERS:
        raise BackendError(f"at most {lib.MAX_LISTENERS} listening addresses per worker")
    cfg.nids = nids
    err = ffi.new("int *")
    core = lib.uc_new(cfg, err)
    if core == ffi.NULL:
        raise BackendError(f"io_uring setup failed: {os.strerror(err[0])} (errno {err[0]}); "
                           f"entries={opts.entries} cq_entries={opts.cq_entries or 8 * opts.entries} "
                           f"buffers={nbufs}x{cfg.bufsize}")
    return core


def _sqpoll_thread() -> tuple[int, int] | None:
    """(pid, tid) of this thread's SQPOLL kernel thread (``iou-sqp-<our tid>``: a task of
    this process that ``cpu_ns``, our own thread's clock, does not include)."""
    want, pid = f"iou-sqp-{threading.get_native_id()}", os.getpid()
    for _ in range(100):   # the thread names itself once it first runs: allow it a moment
        for tid in procfs.tasks(pid):
            st = procfs.read_stat(pid, tid)
            if st is not None and st.comm == want:
                return pid, tid
        time.sleep(0.005)
    log.warning("SQPOLL thread %s not found: its CPU cannot be reported", want)
    return None


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
        window = lib.uc_window_check(core) if not missing else -1
    finally:
        lib.uc_free(core)
    global WINDOW_CHECK_US
    WINDOW_CHECK_US = window
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
    return Availability(True, detail=f"liburing {ver // 100}.{ver % 100}, flags {flag_names(flags)}, "
                                     f"batching window {window_state()}")


#: The probe's measure of a min_timeout wait (uc_window_check: µs for a completion at 2 ms;
#: < 0: not supported): the batching window is used only where it returns in time.
WINDOW_CHECK_US: int | None = None
WINDOW_CHECK_MAX_US = 50_000


def window_usable() -> bool:
    probe_uring()
    return WINDOW_CHECK_US is not None and 0 <= WINDOW_CHECK_US <= WINDOW_CHECK_MAX_US


def window_state() -> str:
    if WINDOW_CHECK_US is None or WINDOW_CHECK_US < 0:
        return "unavailable (no IORING_FEAT_MIN_TIMEOUT: kernel < 6.12)"
    if WINDOW_CHECK_US > WINDOW_CHECK_MAX_US:
        return (f"off: a min_timeout wait for a completion at 2 ms returned after "
                f"{WINDOW_CHECK_US} us on this kernel (it waits for the whole batch)")
    return f"ok (a completion at 2 ms returned a min_timeout wait at {WINDOW_CHECK_US} us)"


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
    (``transfers``: the acceptor must not close it).  See event_core.c.
    """

    kind = "msg-ring"
    transfers = True
    carries_listener_id = True   # in the tag of the CQE it posts (OP_MSG, listener id)

    def __init__(self, ffi, lib, target_fd: int) -> None:
        if target_fd < 0:
            raise BackendError("--uring-handoff msg-ring: the worker's ring fd is unknown")
        self.ffi, self.lib, self.target = ffi, lib, target_fd
        self._sender = None

    def send(self, fd: int, listener_id: int = 0) -> None:
        if self._sender is None:
            err = self.ffi.new("int *")
            sender = self.lib.uc_sender_new(err)
            if sender == self.ffi.NULL:
                raise OSError(err[0], f"msg-ring sender: {os.strerror(err[0])}")
            self._sender = sender
        r = self.lib.uc_sender_send(self._sender, self.target, fd, listener_id)
        if r in (-errno.EAGAIN, -errno.EBUSY, -errno.EOVERFLOW):
            raise BlockingIOError(-r, os.strerror(-r))  # the target cannot take it now
        if r < 0:
            raise OSError(-r, f"IORING_OP_MSG_RING: {os.strerror(-r)}")

    def close(self) -> None:
        if self._sender is not None:
            self.lib.uc_sender_free(self._sender)
            self._sender = None


# -- one worker's ring, as every io_uring backend holds it -------------------------------

#: Counters of the ring itself (submit, wait, reap), measured in C in both modes.
RING_STATS = ("entries", "sqes", "cqes", "cq_overflows", "cq_dropped", "blocking_waits",
              "empty_waits", "windowed_waits", "window_us", "arrival_per_s", "util_pct",
              "window_nr", "closed_pct", "ring_fd_registered")
#: Event-core counters that are WorkerStats fields rather than extras.
TO_COUNTERS = {"waits": "wakeups", "accept_cqes": "listen_wakeups", "accepted": "accepted",
               "refused": "refused", "backpressure": "backpressure", "bytes_out": "bytes_out"}
#: What the C-protocol mode counts that Python counts itself otherwise.
CPROTO_COUNTERS = {"requests": "requests", "bytes_in": "bytes_in", "closed": "closed",
                   "errors": "errors"}
_NOT_EXTRA = {"last_accept_error", "failed", "opened", "l_accepted", "l_accept_cqes",
              *TO_COUNTERS, *CPROTO_COUNTERS}

#: The core's extras that are a level or a running maximum, not a count (the window's
#: budget and inputs, the ring's size, a high-water mark), and the ratios derived here.
LEVEL_EXTRAS = ("sendzc_held_max", "window_us", "window_nr", "arrival_per_s", "data_per_s",
                "util_pct", "closed_pct", "ring_fd_registered", "ring_target",
                "cqes_per_entry", "sqes_per_entry")


class Ring:
    """One worker's io_uring event core (event_core.c) and what Python keeps of it.

    Composition, not inheritance: ``uring``, ``uring-py`` and ``native-uring`` each hold
    one.  It creates the core in the worker's thread, exposes what the loops touch
    (``ffi``, ``lib``, ``core``, the provided-buffer ``pool`` and ``bufsize``), copies the
    C counters into ``WorkerStats`` (``sync``: the event core is their single writer;
    ``sync_ring``: only the ring's own, for uring-py, which counts the rest in Python)
    and frees everything at the end.  ``who`` names the worker in logs and callbacks.
    """

    def __init__(self, ctx, opts: UringOptions, name: str, *, raw: bool = False,
                 cproto: dict | None = None) -> None:
        self.ffi, self.lib = ffi, lib = load()
        self.stats = stats = ctx.stats
        self.who = f"worker {ctx.index} ({name})"
        self.raw, self.cproto = raw, bool(cproto)
        self.multishot = ctx.accept == REUSEPORT or opts.accept == "multishot"
        self.bufsize = opts.bufsize(ctx.limits)
        self._handle = ffi.new_handle(self)   # kept alive as long as the core may call back
        # uring-py (raw) arms its accepts itself: the core holds no listener for it.
        self.core = new_core(ffi, lib, ctx.limits, opts, listeners=() if raw else ctx.listeners,
                             listener_ids=() if raw else ctx.listener_ids,
                             nids=len(ctx.protocols), stop_fd=ctx.stop.fileno(),
                             handoff_fd=ctx.handoff.fileno() if ctx.handoff is not None else -1,
                             raw=raw, multishot=self.multishot, cproto=cproto, user=self._handle)
        self.ring_fd = lib.uc_ring_fd(self.core)   # -1 if it cannot be told (msg-ring refused)
        self.sqpoll_task = _sqpoll_thread() if opts.sqpoll else None
        self.pool = memoryview(ffi.buffer(lib.uc_pool(self.core), lib.uc_pool_size(self.core)))
        self.cstats = lib.uc_stats(self.core)
        self._task = (os.getpid(), threading.get_native_id())   # this worker thread
        fields = [name for name, _ in ffi.typeof("struct uc_stats").fields]
        self._extra_fields = [f for f in fields if f not in _NOT_EXTRA]
        extra = stats.extra
        extra["setup_flags"] = flag_names(lib.uc_setup_flags(self.core))
        extra["accept_mode"] = "multishot" if self.multishot else "single"
        # Derived from the C counters and /proc: present from the start like the others.
        extra.update(cqes_per_entry=0, sqes_per_entry=0, sqpoll_cpu_ns=0, vol_ctx_switches=0)
        # uring-py copies only the ring's own counters (sync_ring), the others all of them.
        kept = {*(RING_STATS if raw else self._extra_fields), "cqes_per_entry", "sqes_per_entry"}
        stats.declare_levels(*(k for k in LEVEL_EXTRAS if k in kept))
        # An accept that loses the race on a shared socket is retried inside the kernel
        # and never completes: not observable here (docs/uring.md, "What the accept race
        # looks like").  With one socket per worker, or none, there is no race: 0 is true.
        stats.lost_races = NOT_OBSERVABLE if ctx.accept == SHARED and ctx.listeners else 0
        for pl in stats.per_listener:
            pl.lost_races = stats.lost_races
        self.sync_ring() if raw else self.sync()

    # -- counters (WorkerStats.refresh calls these from the snapshot's thread) -------------

    def refresh(self) -> None:
        """WorkerStats.refresh for the event core: snapshots (another thread) copy the C
        counters, so the loop never pauses for them (aligned 64-bit reads of words only C
        writes), and this thread's voluntary context switches from /proc."""
        self.sync()
        self.refresh_switches()

    def refresh_switches(self) -> None:
        self.stats.extra["vol_ctx_switches"] = procfs.ctx_switches(*self._task)[0]

    def sync(self) -> None:
        """Copy every counter of the event core into WorkerStats."""
        cs, st = self.cstats, self.stats
        for c_name, name in TO_COUNTERS.items():
            setattr(st, name, getattr(cs, c_name))
        if self.cproto:
            for c_name, name in CPROTO_COUNTERS.items():
                setattr(st, name, getattr(cs, c_name))
            st.open = cs.opened - cs.closed
        for lid, pl in enumerate(st.per_listener):   # the core's small arrays, by listener id
            pl.accepted = cs.l_accepted[lid]
            pl.listen_wakeups = cs.l_accept_cqes[lid]
        extra = st.extra
        for k in self._extra_fields:
            extra[k] = getattr(cs, k)
        self._derived(extra)

    def sync_ring(self) -> None:
        """Copy the ring's own counters (uring-py counts everything else in Python)."""
        cs, extra = self.cstats, self.stats.extra
        for k in RING_STATS:
            extra[k] = getattr(cs, k)
        self._derived(extra)

    def _derived(self, extra: dict) -> None:
        cs = self.cstats
        entries = cs.entries or 1
        extra["cqes_per_entry"] = round(cs.cqes / entries, 3)
        extra["sqes_per_entry"] = round(cs.sqes / entries, 3)
        if self.sqpoll_task:
            extra["sqpoll_cpu_ns"] = procfs.schedstat_ns(*self.sqpoll_task)

    # -- failure and the end -------------------------------------------------------------

    def error(self, rc: int) -> OSError:
        """The ring itself failed (a submit that could not flush the SQ, CQEs the kernel
        dropped): the worker stops with this error; the server reports it and stops the
        others (a server missing a worker is not serving)."""
        return OSError(-rc, f"{self.who}: io_uring failed: {os.strerror(-rc)}")

    def free(self) -> None:
        """The last figures, then the core: the pool is freed only if the kernel holds no
        operation of ours (else leaked, with a warning)."""
        (self.sync_ring if self.raw else self.sync)()
        self.refresh_switches()
        self.stats.refresh = None   # the thread is about to go: keep the last figures
        try:
            self.pool.release()
        except BufferError:
            pass  # only if a protocol kept the view it was fed (against its contract)
        leaked = self.lib.uc_free(self.core)
        self.core = None
        if leaked:
            log.warning("%s: io_uring operations still in flight at exit; buffer pool (and "
                        "%d send chunks a SEND_ZC may still read) leaked rather than freed",
                        self.who, leaked - 1)


# -- the backends ------------------------------------------------------------------------

class IoUringBackend(Backend):
    """What the io_uring backends declare and share - options, probe, preflight, the
    msg-ring channel - but no loop: each backend runs its own over a ``Ring``."""

    kind = "completion"
    accept_strategies = frozenset({SHARED, REUSEPORT, DISPATCH})
    max_listeners = MAX_LISTENERS   # one armed accept per listener per ring
    ring: Ring | None = None

    @classmethod
    def probe(cls) -> Availability:
        return probe_uring()

    @classmethod
    def preflight(cls, limits, options) -> None:
        """Create (and free) one ring with the requested settings in the parent: a ring
        that cannot be created is a clear startup error, not a dead worker."""
        ffi, lib = load()
        core = new_core(ffi, lib, limits, UringOptions.of(options))
        try:
            if cls.own_handoff(options):
                _check_msg_ring(ffi, lib, core)
        finally:
            lib.uc_free(core)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        if any("--uring-accept" in a.option_strings for a in parser._actions):
            return  # the io_uring backends share these options
        d = UringOptions()
        g = parser.add_argument_group("io_uring (uring, uring-py, native-uring)")
        g.add_argument("--uring-accept", choices=["single", "multishot"], default=d.accept,
                       help="on the shared socket: single-shot accept re-armed per completion "
                            "(spreads connections) or one multishot accept (first ring takes all)")
        g.add_argument("--uring-buffers", type=int, default=d.buffers,
                       help="provided buffers per worker (power of two)")
        g.add_argument("--uring-buffer-size", type=int, default=d.buffer_size,
                       help="bytes per provided buffer")
        g.add_argument("--uring-entries", type=int, default=d.entries, help="SQ entries (CQ is 8x)")
        g.add_argument("--uring-cq-entries", type=int, default=d.cq_entries,
                       help="CQ entries (0: 8x the SQ); tiny values force CQ overflow (tests)")
        g.add_argument("--uring-setup", choices=["auto", "defer", "coop", "plain"], default=d.setup,
                       help="ring setup flags (auto: strongest that works)")
        g.add_argument("--uring-fixed-files", action="store_true",
                       help="uring: register each connection's fd (IOSQE_FIXED_FILE recv/send)")
        g.add_argument("--uring-sqpoll", type=int, default=d.sqpoll, metavar="IDLE_MS",
                       help="SQPOLL kernel thread, idling after IDLE_MS (0: off); its CPU is "
                            "reported in stats extra sqpoll_cpu_ns")
        g.add_argument("--uring-zc-threshold", type=int, default=d.zc_threshold, metavar="BYTES",
                       help="uring: sends of at least BYTES use IORING_OP_SEND_ZC (0: never)")
        g.add_argument("--uring-latency-budget-us", type=int, default=d.latency_budget_us,
                       metavar="US",
                       help="batching window: while the arrival rate fills it, a wait may hold "
                            "completions up to US microseconds to serve them with one wake-up "
                            f"(0: off; default {DEFAULT_LATENCY_BUDGET_US}, docs/uring.md)")
        g.add_argument("--uring-ring", choices=["warm", "fifo"], default=d.ring,
                       help="provided-buffer ring: warm = two buffers per open connection and "
                            "some slack in the ring, the rest in a stack reused most recent "
                            "first; fifo = every buffer in the ring, each reused after all the "
                            "others (the earlier behaviour, for comparison; docs/uring.md)")
        g.add_argument("--uring-calls", choices=["batched", "direct"], default=d.calls,
                       help="uring: batched = what Python tells the core while it processes a "
                            "batch (sends, closes, holds) is queued and passed with the next "
                            "wait, one call (one GIL release) per batch; direct = one call each, "
                            "the earlier behaviour, for comparison (docs/uring.md)")
        g.add_argument("--uring-handoff", choices=["scm", "msg-ring"], default=d.handoff,
                       help="with --accept dispatch (thread mode): scm = SCM_RIGHTS over a "
                            "socketpair, a poll wakes the ring (every backend's channel); "
                            "msg-ring = IORING_OP_MSG_RING posts the fd into the ring's CQ")

    @classmethod
    def own_handoff(cls, options) -> str | None:
        return "msg-ring" if UringOptions.of(options).handoff == "msg-ring" else None

    def handoff_channel(self):
        """--uring-handoff msg-ring: the dispatcher posts fds into this worker's ring."""
        ring = self.ring
        return RingHandoff(ring.ffi, ring.lib, ring.ring_fd)
