"""The per-connection rules, once, with no I/O: what a loop does when data, sends, EOF or time arrive.

Every backend serves connections by the same rules; a Python loop (readiness.py,
asyncio_.py) asks ``ConnectionPolicy`` at the thresholds and performs what it answers
with its own I/O calls.  The common path - whole requests in, output taken by the
kernel at once - never calls it: a loop reaches the policy only when a request is
incomplete, output queues past a mark, the peer ends, a handler fails or the timer
ticks.  The C cores (uring_core.c, native_core.c) follow the same rules, written here:

1. **Feed.** Received bytes go to the protocol in order (``out, n = proto.feed(data)``);
   ``bytes_in`` += len, ``requests`` += n; ``out`` is sent before any later output.
   ``proto.closing`` after a feed: *finish* (rule 4).
2. **Backpressure.** After output is queued, with ``pending`` bytes not yet taken by the
   kernel: the high-water mark of ``pending`` is ``extra.max_pending``; if the connection
   is reading and not finishing and ``pending > max_output``, reading *pauses*
   (``backpressure`` += 1, once per pause).  After bytes are sent: a paused connection
   that is not finishing *resumes* reading once ``pending <= max_output // 2``.
3. **EOF.** The peer's FIN: ``out = proto.eof()``, sent, then *finish*: the peer may still
   read (half-close), so output already produced is flushed first.
4. **Finish.** Read nothing more; close as soon as ``pending == 0`` (at once if it is).
5. **Handler failure.** An exception from ``feed``/``eof`` closes that connection only,
   with ``errors`` += 1 and ``handler_errors`` += 1, logged at ERROR with the worker,
   backend, protocol and connection (one log record per failure).
6. **Idle timeout** (``Limits.idle_timeout`` = S, 0 = off): a connection with no bytes in
   or out for S seconds is closed (``extra.idle_timeouts``).
7. **Request deadline** (``Limits.header_timeout`` = T, 0 = off; nginx's
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
8. **The timer** is coarse: ``Limits.timer_tick()`` (a quarter of the shortest timeout,
   10 ms .. 1 s).  A loop's wait wakes at the next tick only while a connection is
   open; each tick checks every connection (rules 6 and 7), so a connection is closed
   between its deadline and one tick later.  No timer per connection.
9. **Drain** (after stop): at most ``DRAIN_READS`` reads of what the kernel already
   holds per connection are fed, then *finish*; whatever is unsent after
   ``Limits.drain_timeout`` is abandoned.  A paused (backpressured) connection is not
   read: it *finishes* with what it has (held answers included: rule 10).
10. **Held answers** (bounded output; core/protocols/base.py).  A protocol answers at
   most about its ``output_budget`` (``max_output // 2``, set by the server) per call
   and holds the rest (``proto.more``).  After a feed or pull that leaves answers held,
   the connection is *held*: reading pauses (``extra.output_holds`` += 1 when it was
   reading; not counted as backpressure).  While held and ``pending <= max_output //
   2``, the loop calls ``out, n = proto.pull()`` and sends ``out`` as rule 1 does a
   feed's, at most ``max_output`` bytes per event, then yields to other connections and
   continues when the socket is writable again.  Once nothing is held, reading resumes
   under rule 2's condition.  *Finish* waits for held answers too: close once
   ``pending == 0`` and nothing is held.  So one connection's pending output stays at
   or below ``max_output`` plus one answer's header, whatever its input asks for.

Per-connection state the rules need lives on the connection (``ConnState`` slots), so
the policy is one object per worker with no table of its own.
"""

from __future__ import annotations

import logging

from parallelnet.core.protocols.base import Protocol

log = logging.getLogger("parallelnet.worker")

DRAIN_READS = 64   # rule 9: reads per connection at stop, at most

# What a loop must do after ``sent``/``finish``.
KEEP, RESUME, CLOSE, FLUSH = range(4)


class ConnState:
    """The rules' state of one connection (a base for a loop's connection class)."""

    __slots__ = ("reading", "closing", "held", "last", "req_start", "req_bytes")

    def init_state(self, now: float) -> None:
        self.reading = True      # False while paused (rule 2), held (10) or finishing (4)
        self.closing = False     # finishing: close once output is flushed
        self.held = False        # the protocol holds answers for pull() (rule 10)
        self.last = now          # monotonic time of the last bytes in or out (rule 6)
        self.req_start = 0.0     # first byte of the incomplete request, 0: none (rule 7)
        self.req_bytes = 0       # its bytes received since then


def tracks_requests(proto) -> bool:
    """Whether this protocol can hold an incomplete request (overrides ``partial``):
    if not (echo), a loop skips rule 7's bookkeeping entirely."""
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

    # -- rule 7: requests in progress -------------------------------------------------

    def progress(self, conn: ConnState, proto, completed: int, nbytes: int, now: float) -> None:
        """After a feed, when a request was or is incomplete."""
        if not proto.partial:
            conn.req_start = 0.0
        elif completed or not conn.req_start:
            conn.req_start = now
            conn.req_bytes = 0 if completed else nbytes
        else:
            conn.req_bytes += nbytes

    # -- rule 2: backpressure ----------------------------------------------------------

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

    # -- rule 10: held answers ----------------------------------------------------------

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

    # -- rules 3, 4, 5: the end of a connection ------------------------------------------

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

    # -- rules 6, 7, 8: the timer ---------------------------------------------------------

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
