"""The per-connection rules, once, with no I/O: what a loop does when data, sends, EOF or time arrive.

Every backend serves connections by the same rules; a Python loop (readiness.py,
asyncio_.py) asks ``ConnectionPolicy`` at the thresholds and performs what it answers
with its own I/O calls.  The common path - whole requests in, output taken by the
kernel at once - never calls it: a loop reaches the policy only when a request is
incomplete, output queues past a mark, the peer ends, a handler fails or the timer
ticks.  The C cores (backends/uring/event_core.c, backends/native_core.c) follow the same rules, written here.

Each rule has a name, and code, comments and docs everywhere refer to it by that name
("rule held-answers", "rules idle-timeout and request-deadline"), never by a position:

==================  =================================================================
feed                received bytes to the protocol in order, its output sent in order
backpressure        pause reading above ``max_output`` pending, resume at or below half
eof                 the peer's FIN: the protocol's last output, then finish
finish              read nothing more, close once flushed
handler-failure     an exception from protocol code closes that connection only
idle-timeout        no bytes in or out for ``--idle-timeout`` S: closed
request-deadline    a request incomplete T s after its first byte (+ bytes/R): closed
coarse-timer        one tick (a quarter of the shortest timeout) checks every deadline
drain               at stop: bounded reads of what is received, answers flushed or abandoned
held-answers        a protocol's answers beyond its output budget are pulled as output drains
==================  =================================================================

* **feed.** Received bytes go to the protocol in order (``out, n = proto.feed(data)``);
   ``bytes_in`` += len, ``requests`` += n; ``out`` is sent before any later output.
   ``proto.closing`` after a feed: *finish* (below).
* **backpressure.** After output is queued, with ``pending`` bytes not yet taken by the
   kernel: the high-water mark of ``pending`` is ``extra.max_pending``; if the connection
   is reading and not finishing and ``pending > max_output``, reading *pauses*
   (``backpressure`` += 1, once per pause).  After bytes are sent: a paused connection
   that is not finishing *resumes* reading once ``pending <= max_output // 2``.
* **eof.** The peer's FIN: ``out = proto.eof()``, sent, then *finish*: the peer may still
   read (half-close), so output already produced is flushed first.
* **finish.** Read nothing more; close as soon as ``pending == 0`` (at once if it is).
* **handler-failure.** An exception from ``feed``/``eof`` closes that connection only,
   with ``errors`` += 1 and ``handler_errors`` += 1, logged at ERROR with the worker,
   backend, protocol and connection (one log record per failure).
* **idle-timeout** (``Limits.idle_timeout`` = S, 0 = off): a connection with no bytes in
   or out for S seconds is closed (``extra.idle_timeouts``).
* **request-deadline** (``Limits.header_timeout`` = T, 0 = off; nginx's
   ``client_header_timeout``): a request still incomplete (``proto.partial``: header
   section or announced body not all received) T seconds after its first byte is closed
   (``extra.header_timeouts``), however steadily it trickles.  The first byte is taken
   from the feed that left it incomplete: if that feed completed other requests
   (``n > 0``) or none was pending, a new request starts then.  With
   ``Limits.header_min_rate`` = R bytes/s (0 = off; Apache mod_reqtimeout's MinRate),
   each byte of the request received after the feed that started it extends its
   deadline by 1/R s: ``deadline = start + T + bytes / R``, so a request arriving at R
   B/s or faster is never cut, and a trickle is cut by ``start + T / (1 - rate / R)``.
   Bounded by the protocol's own size limits (8 KiB header, 1 MiB body for http).
* **coarse-timer:** the timer is coarse: ``Limits.timer_tick()`` (a quarter of the shortest timeout,
   10 ms .. 1 s).  A loop's wait wakes at the next tick only while a connection is
   open; each tick checks every connection (rules idle-timeout and request-deadline), so a connection is closed
   between its deadline and one tick later.  No timer per connection.
* **drain** (after stop): at most ``DRAIN_READS`` reads of what the kernel already
   holds per connection (a C core with smaller reads: ``DRAIN_READS`` × 64 KiB,
   policy_core.h ``DRAIN_BYTES``) are fed, then *finish*; whatever is unsent after
   ``Limits.drain_timeout`` is abandoned.  A paused (backpressured) connection is not
   read: it *finishes* with what it has (held answers included: rule held-answers).
* **held-answers** (bounded output; core/protocols/base.py).  A protocol answers at
   most about its ``output_budget`` (``max_output // 2``, set by the server) per call
   and holds the rest (``proto.more``).  After a feed or pull that leaves answers held,
   the connection is *held*: reading pauses (``extra.output_holds`` += 1 when it was
   reading; not counted as backpressure).  While held and ``pending <= max_output //
   2``, the loop calls ``out, n = proto.pull()`` and sends ``out`` as rule feed does a
   feed's, at most ``max_output`` bytes per event, then yields to other connections and
   continues when the socket is writable again.  Once nothing is held, reading resumes
   under rule backpressure's condition.  *Finish* waits for held answers too: close once
   ``pending == 0`` and nothing is held.  So one connection's pending output stays at
   or below ``max_output`` plus one answer's header, whatever its input asks for.

Per-connection state the rules need lives on the connection (``ConnState`` slots), so
the policy is one object per worker with no table of its own.
"""

from __future__ import annotations

import logging

from parallelnet.core.protocols.base import Protocol

log = logging.getLogger("parallelnet.worker")

DRAIN_READS = 64   # rule drain: reads per connection at stop, at most

# What a loop must do after ``sent``/``finish``.
KEEP, RESUME, CLOSE, FLUSH = range(4)


class ConnState:
    """The rules' state of one connection (a base for a loop's connection class)."""

    __slots__ = ("reading", "closing", "held", "last", "req_start", "req_bytes")

    def init_state(self, now: float) -> None:
        self.reading = True      # False while paused (rule backpressure), held (held-answers) or finishing (finish)
        self.closing = False     # finishing: close once output is flushed
        self.held = False        # the protocol holds answers for pull() (rule held-answers)
        self.last = now          # monotonic time of the last bytes in or out (rule idle-timeout)
        self.req_start = 0.0     # first byte of the incomplete request, 0: none (rule request-deadline)
        self.req_bytes = 0       # its bytes received since then


def tracks_requests(proto) -> bool:
    """Whether this protocol can hold an incomplete request (overrides ``partial``):
    if not (echo), a loop skips rule request-deadline's bookkeeping entirely."""
    return getattr(type(proto), "partial", None) is not Protocol.partial


class ConnectionPolicy:
    """One worker's rules (see the module docstring), its counters, its timer."""

    __slots__ = ("stats", "extra", "who", "high", "low", "idle", "header", "min_rate",
                 "tick", "next_sweep", "peak")

    def __init__(self, limits, stats, who: str, now: float = 0.0) -> None:
        self.stats = stats
        self.extra = stats.extra
        self.who = who                       # "worker 0 (epoll)": the log's context
        self.high = limits.max_output
        self.low = limits.max_output // 2
        self.idle = limits.idle_timeout if limits.idle_timeout and limits.idle_timeout > 0 else 0.0
        self.header = (limits.header_timeout
                       if limits.header_timeout and limits.header_timeout > 0 else 0.0)
        self.min_rate = limits.header_min_rate if limits.header_min_rate > 0 else 0.0
        self.tick = limits.timer_tick()      # None: no timeout enabled, no timer
        self.next_sweep = now + self.tick if self.tick else float("inf")
        self.peak = 0

    # -- rule request-deadline: requests in progress -------------------------------------------------

    def progress(self, conn: ConnState, proto, completed: int, nbytes: int, now: float) -> None:
        """After a feed, when a request was or is incomplete."""
        if not proto.partial:
            conn.req_start = 0.0
        elif completed or not conn.req_start:
            conn.req_start = now
            conn.req_bytes = 0 if completed else nbytes
        else:
            conn.req_bytes += nbytes

    # -- rule backpressure: backpressure ----------------------------------------------------------

    def queued(self, conn: ConnState, pending: int) -> bool:
        """Output was queued: True if reading must pause now."""
        if pending > self.peak:
            self.peak = self.extra["max_pending"] = pending
        return pending > self.high and self.pause(conn)

    def pause(self, conn: ConnState) -> bool:
        """Past the high mark: True if reading must pause (it was reading)."""
        if conn.reading and not conn.closing:
            conn.reading = False
            self.stats.backpressure += 1
            return True
        return False

    def resume(self, conn: ConnState) -> bool:
        """Below the low mark: True if reading must resume (never while answers are held)."""
        if not conn.reading and not conn.closing and not conn.held:
            conn.reading = True
            return True
        return False

    def sent(self, conn: ConnState, pending: int) -> int:
        """Bytes were sent, ``pending`` remain: KEEP, RESUME or CLOSE."""
        if not pending and conn.closing and not conn.held:
            return CLOSE
        if pending <= self.low and self.resume(conn):
            return RESUME
        return KEEP

    # -- rule held-answers: held answers ----------------------------------------------------------

    def hold(self, conn: ConnState) -> bool:
        """The protocol holds answers (``proto.more``): True if reading must pause now."""
        conn.held = True
        if conn.reading and not conn.closing:
            conn.reading = False
            self.extra["output_holds"] += 1
            return True
        return False

    def can_pull(self, conn: ConnState, pending: int) -> bool:
        """Whether the loop may pull held answers now."""
        return conn.held and pending <= self.low

    def released(self, conn: ConnState, pending: int) -> int:
        """Nothing is held any more: KEEP, RESUME (reading) or CLOSE (finishing, flushed)."""
        conn.held = False
        return self.sent(conn, pending)

    # -- rules eof, finish and handler-failure: the end of a connection ------------------------------------------

    def finish(self, conn: ConnState, pending: int) -> int:
        """Read nothing more: CLOSE now, or FLUSH (output, held answers) then close."""
        conn.closing = True
        conn.reading = False
        return FLUSH if pending or conn.held else CLOSE

    def eof(self, proto, where) -> bytes | None:
        """The peer's FIN: the protocol's last bytes, or None if it failed (close, error)."""
        try:
            return proto.eof()
        except Exception:  # noqa: BLE001 - a handler bug closes one connection only
            self.handler_failed(proto, where)
            return None

    def handler_failed(self, proto, where) -> None:
        """Count and log a protocol exception (called inside the ``except``)."""
        self.stats.handler_errors += 1
        log.exception("%s: protocol %s failed on connection %s; closing that connection only",
                      self.who, type(proto).__name__, where)

    # -- rules idle-timeout, request-deadline and coarse-timer: the timer ---------------------------------------------------------

    def due(self, now: float) -> bool:
        """Whether the tick has come (and arm the next one)."""
        if now < self.next_sweep:
            return False
        self.next_sweep = now + self.tick
        return True

    def expired(self, conn: ConnState, now: float) -> bool:
        """True (counted) if the connection is past its idle or request deadline."""
        idle = self.idle
        if idle and now - conn.last >= idle:
            self.extra["idle_timeouts"] += 1
            return True
        start = conn.req_start
        if start and self.header and not conn.closing:
            deadline = start + self.header
            if self.min_rate:
                deadline += conn.req_bytes / self.min_rate
            if now >= deadline:
                self.extra["header_timeouts"] += 1
                return True
        return False
