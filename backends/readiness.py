"""One readiness loop for select, poll and epoll.

Readiness multiplexing (select(2), poll(2), epoll(7)) tells a thread that a file
descriptor *can* make progress; the thread then makes the non-blocking call itself.
Everything after "fd X is ready" is the same for every such mechanism, so it lives
here once: the accept race, reads, protocol calls, writes, backpressure, close and
the drain at stop.  A subclass supplies five primitives (``_setup``, ``_register``,
``_modify``, ``_unregister``, ``_poll``) and three event-bit constants, the way
``selectors.PollSelector`` is three constants over a shared base.

Kernel semantics this loop relies on:

* A listening socket is readable while its accept queue is non-empty.  When it is
  in several threads' interest sets (the seed's shared socket), one new connection
  can wake several of them; all call ``accept(2)`` and all but one get ``EAGAIN``
  (a *lost race*, counted).  A winner accepts until ``EAGAIN`` (the seed's rule).
  Every listening socket of the worker (one per address, ``ctx.listeners``) is in the
  one interest set; each is accepted from on its own report, its connections served by
  its address's protocol (``ctx.protocols[listener id]``) and counted per listener id.
  With ``EPOLLEXCLUSIVE`` (epoll only, since Linux 4.5) the kernel wakes one or more
  — usually one — of the exclusive waiters instead of all.
* ``accept(2)`` does not inherit ``O_NONBLOCK`` on Linux: every accepted socket is
  made non-blocking explicitly.
* Level-triggered readiness repeats while data is pending, so one ``recv`` per
  wakeup is enough and keeps one busy client from starving the others.
  Edge-triggered epoll (``EPOLLET``) reports transitions only, so with it the loop
  reads until ``EAGAIN``.  ``EPOLL_CTL_MOD`` re-evaluates readiness, which is what
  makes resuming a paused (backpressured) edge-triggered connection safe.
* ``recv`` returning ``b""`` is the peer's FIN: the peer may still read, so output
  already produced is flushed before closing (half-close is honoured).
* ``EPOLLERR``/``EPOLLHUP`` (``POLLERR``/``POLLHUP``) are reported whether asked for
  or not; they are routed to whichever of read/write is active so that the failing
  call surfaces the error and the connection is closed (no spinning on a dead fd).

Faults and limits: the rules are core/policy.py's (backpressure marks, finish-after-flush,
handler failure, idle timeout, request deadline), core/accept.py's (accept until EAGAIN,
the back-off of a listener out of fds: unregistered, re-registered when its pause ends)
and core/handoff.py's (the dispatch channel).  This loop calls them at the thresholds
only: whole requests in and output the kernel takes at once never reach them.

The timer is coarse: the wait's timeout is the next deadline check, one
``time.monotonic()`` (vDSO, no syscall) per wakeup stamps every connection that had an
event, and a sweep at most once per tick closes connections past their deadline.  No
timer syscalls; with no connection open the wait blocks.

A subclass must set the three event-bit constants ``EV_READ``, ``EV_WRITE``, ``EV_ERROR``
to its multiplexer's own bits (``EV_ERROR`` may be 0 where errors show as readable): a
concrete subclass that does not is refused when the class is created, since a wrong
write mask parks a connection silently.
"""

from __future__ import annotations

import abc
import logging
import socket
import time
from typing import ClassVar

from parallelnet.core.accept import AcceptPacer, accept_pending
from parallelnet.core.backend import (
    DISPATCH, EXCLUSIVE, EXCLUSIVE_ROTATE, REUSEPORT, ROTATE_EVERY, SHARED, Backend,
)
from parallelnet.core.handoff import HandoffReceiver
from parallelnet.core.policy import (
    CLOSE, DRAIN_READS, RESUME, ConnectionPolicy, ConnState, tracks_requests,
)

log = logging.getLogger("parallelnet.worker")

_TCP_NODELAY = socket.TCP_NODELAY
_IPPROTO_TCP = socket.IPPROTO_TCP
_PRIMITIVES = ("_setup", "_register", "_modify", "_unregister", "_poll")
_MASKS = ("EV_READ", "EV_WRITE", "EV_ERROR")


class RegistrationRefused(OSError):
    """The multiplexer cannot watch this fd (e.g. select's FD_SETSIZE)."""


class Connection(ConnState):
    """One client connection of one worker.  Only that worker touches it."""

    __slots__ = ("sock", "fd", "proto", "out", "events", "peer", "replied")

    def __init__(self, sock: socket.socket, proto, peer, now: float = 0.0) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.proto = proto
        self.out = bytearray()    # output the kernel has not taken yet
        self.events = 0           # interest currently registered
        self.peer = peer
        self.replied = 0.0        # when its output last drained (the window's closed-loop test)
        self.init_state(now)


class _Source:
    """A source of new connections the loop watches: a listening socket (its listener id
    and per-listener counters) or the hand-off channel (``lid`` -1)."""

    __slots__ = ("sock", "lid", "counters", "since_rotate")

    def __init__(self, sock: socket.socket, lid: int, counters) -> None:
        self.sock = sock
        self.lid = lid
        self.counters = counters        # ListenerStats of this worker for lid
        self.since_rotate = 0           # exclusive-rotate: accepts since the last re-add


class ReadinessLoop(Backend):
    """The shared loop.  Subclasses supply the multiplexer primitives and event bits."""

    kind: ClassVar[str] = "readiness"
    accept_strategies = frozenset({SHARED, REUSEPORT, DISPATCH})
    max_listeners: ClassVar[int | None] = None

    #: Backend-native event bits: every concrete subclass sets all three.
    EV_READ: ClassVar[int]
    EV_WRITE: ClassVar[int]
    EV_ERROR: ClassVar[int]

    #: Edge-triggered subclasses (or instances) read and write until EAGAIN.
    edge_triggered = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if any(getattr(getattr(cls, p), "__isabstractmethod__", False) for p in _PRIMITIVES):
            return  # still a template: its concrete subclasses are checked
        missing = [m for m in _MASKS if not isinstance(getattr(cls, m, None), int)]
        if missing:
            raise TypeError(f"{cls.__qualname__}: a readiness backend must set {', '.join(missing)} "
                            "to its multiplexer's own event bits (docs/adding-a-backend.md)")
        if not cls.EV_READ or not cls.EV_WRITE or cls.EV_READ & cls.EV_WRITE \
                or (cls.EV_READ | cls.EV_WRITE) & cls.EV_ERROR:
            raise TypeError(f"{cls.__qualname__}: EV_READ and EV_WRITE must be distinct non-zero "
                            "bits and EV_ERROR disjoint from both (0 if errors show as readable)")

    # -- the primitives a subclass supplies ---------------------------------

    @abc.abstractmethod
    def _setup(self) -> None:
        """Create the multiplexer object."""

    @abc.abstractmethod
    def _register(self, fd: int, events: int, exclusive: bool = False) -> None:
        """Start watching fd; raise RegistrationRefused if it cannot be watched.
        ``exclusive``: a shared listener under --accept exclusive (EPOLLEXCLUSIVE)."""

    @abc.abstractmethod
    def _modify(self, fd: int, events: int) -> None:
        """Change the interest set of a watched fd."""

    @abc.abstractmethod
    def _unregister(self, fd: int) -> None:
        """Stop watching fd (it is still open)."""

    @abc.abstractmethod
    def _poll(self, timeout: float | None) -> list[tuple[int, int]]:
        """Wait; return (fd, native event mask) pairs.  None = wait until something happens."""

    def _teardown(self) -> None:
        """Release the multiplexer object."""

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        ctx = self.ctx
        lim = ctx.limits
        self._who = who = f"worker {ctx.index} ({self.name})"
        self._conns: dict[int, Connection] = {}
        # Sources of new connections: listening sockets, or (dispatch) the hand-off channel,
        # which the loop watches and drains exactly like a listener.
        self._handoff = ctx.handoff
        self._receiver = (HandoffReceiver(ctx.handoff, ctx.stats.extra, who)
                          if ctx.handoff is not None else None)
        sources = [_Source(s, lid, ctx.stats.per_listener[lid])
                   for s, lid in zip(ctx.listeners, ctx.listener_ids)]
        if ctx.handoff is not None:
            sources.append(_Source(ctx.handoff, -1, None))
        self._listeners = {src.sock.fileno(): src for src in sources}
        self._factories = [p.factory for p in ctx.protocols]   # by listener id
        self._recv_size = lim.recv_size
        self._logged_refusal = False
        self._now = time.monotonic()
        self._policy = ConnectionPolicy(lim, ctx.stats, who, self._now)
        self._track = any(tracks_requests(p.factory()) for p in ctx.protocols)
        self._paused: dict[int, float] = {}     # listener fd -> when to re-register it
        # A batching window (a subclass's option, backends/window.py): None is off, and
        # then nothing on the hot path looks at it but one attribute test.
        self._window = self._make_window()
        self._queued = 0                        # connections with output queued
        self._pacer = AcceptPacer(lim.accept_backoff, ctx.stats.extra, who)
        self._exclusive = ctx.accept in (EXCLUSIVE, EXCLUSIVE_ROTATE)
        # exclusive-rotate: re-adding the listener moves this worker's waiter to the tail
        # of the socket's wait queue, where EPOLLEXCLUSIVE wakes the head first.  Each
        # listener has its own queue, so each is rotated after its own 16 accepts.
        self._rotate_every = ROTATE_EVERY if ctx.accept == EXCLUSIVE_ROTATE else 0
        self._setup()
        try:
            self._register(ctx.stop.fileno(), self.EV_READ)
            for fd in self._listeners:
                self._register(fd, self.EV_READ, self._exclusive)
            ctx.stats.mark_ready()
            self._serve()
            self._drain()
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._teardown()

    def _make_window(self):
        """A ``backends.window.LatencyWindow``, or None (the default: no window)."""
        return None

    def _serve(self) -> None:
        # Locals, not attribute look-ups: this is the hot path of every readiness backend.
        poll = self._poll
        conns = self._conns
        listeners = self._listeners
        stats = self.ctx.stats
        stop = self.ctx.stop
        on_read = self._on_readable
        on_write = self._on_writable
        accept = self._accept
        READ = self.EV_READ | self.EV_ERROR
        WRITE = self.EV_WRITE
        ERROR = self.EV_ERROR
        monotonic = time.monotonic
        policy = self._policy
        timed = policy.tick is not None
        timers = self._timers
        paused = self._paused
        while not stop.is_set():
            # The coarse timer: wake for the next deadline check only while something
            # can time out (open connections) or a listener waits out its back-off.
            if paused or (timed and conns):
                wake = policy.next_sweep if timed and conns else float("inf")
                if paused:
                    wake = min(wake, min(paused.values()))
                timeout = max(0.001, wake - self._now + 0.001)
            else:
                timeout = None
            events = poll(timeout)
            self._now = now = monotonic()
            stats.wakeups += 1
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is None:
                    src = listeners.get(fd)
                    if src is not None:
                        accept(src)
                    continue  # the stop eventfd: the loop condition sees it
                conn.last = now
                if mask & WRITE or (mask & ERROR and not conn.reading):
                    on_write(conn)
                if mask & READ and conn.reading:
                    on_read(conn)
            if paused or now >= policy.next_sweep:
                timers(now)

    # -- timers: listener back-off, idle and request deadlines --------------------

    def _timers(self, now: float) -> None:
        paused = self._paused
        for fd, when in list(paused.items()):
            if now >= when:
                del paused[fd]
                try:
                    self._register(fd, self.EV_READ, self._exclusive)
                except (OSError, ValueError, KeyError):
                    pass  # already registered (cannot happen) or closed at stop
        policy = self._policy
        if policy.due(now):
            expired = policy.expired
            for conn in list(self._conns.values()):
                if expired(conn, now):
                    self._close(conn)

    def _pause_listener(self, lsock: socket.socket, exc: OSError) -> None:
        """Out of fds (or memory): stop watching the listener for a back-off, so a
        level-triggered loop does not spin on a socket it cannot accept from."""
        fd = lsock.fileno()
        delay = self._pacer.failed(exc)
        if fd in self._paused:
            return
        try:
            self._unregister(fd)
        except (OSError, KeyError, ValueError):
            pass
        self._paused[fd] = time.monotonic() + delay

    # -- accept -----------------------------------------------------------------

    def _accept(self, src: _Source, wakeup: bool = True) -> int:
        """Accept until EAGAIN (the seed's rule); count a wakeup that got nothing as a lost race.

        ``wakeup=False``: the drain's last look at the backlog, which is not a race.
        """
        if src.counters is None:
            return self._take_handoffs()
        stats = self.ctx.stats
        mine = src.counters
        stats.listen_wakeups += wakeup
        mine.listen_wakeups += wakeup
        accepted, exhausted = accept_pending(src.sock, stats.extra, self._who)
        lid = src.lid
        for sock, peer in accepted:
            self._add_connection(sock, peer, lid)
        if exhausted is not None:
            self._pause_listener(src.sock, exhausted)
        won = len(accepted)
        if won:
            self._pacer.succeeded()
            if self._rotate_every and wakeup:
                src.since_rotate += won
                if src.since_rotate >= self._rotate_every:
                    self._rotate(src)
        stats.accepted += won
        mine.accepted += won
        if not won and wakeup:
            stats.lost_races += 1
            mine.lost_races += 1
        return won

    def _rotate(self, src: _Source) -> None:
        fd = src.sock.fileno()
        if fd in self._paused:
            return
        src.since_rotate = 0
        self._unregister(fd)
        self._register(fd, self.EV_READ, True)
        self.ctx.stats.extra["rotations"] += 1

    def _take_handoffs(self) -> int:
        """Connections the dispatcher passed us (SCM_RIGHTS), until the channel is empty."""
        pairs, closed = self._receiver.take()
        per_listener = self.ctx.stats.per_listener
        for sock, lid in pairs:
            self._add_connection(sock, None, lid)
            per_listener[lid].accepted += 1
        if closed:  # the acceptor is gone: stop watching, or EOF would spin us
            fd = self._handoff.fileno()
            self._listeners.pop(fd, None)
            self._unregister(fd)
        self.ctx.stats.accepted += len(pairs)
        return len(pairs)

    def _add_connection(self, sock: socket.socket, peer, lid: int = 0) -> None:
        stats = self.ctx.stats
        if len(self._conns) >= self.ctx.limits.max_connections:
            stats.refused += 1
            sock.close()
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a test's AF_UNIX socket): nothing to tune
        conn = Connection(sock, self._factories[lid](), peer, self._now)
        try:
            self._register(conn.fd, self.EV_READ)
        except RegistrationRefused as exc:
            stats.refused += 1
            if not self._logged_refusal:
                self._logged_refusal = True
                log.warning("%s: refusing connection: %s", self._who, exc)
            sock.close()
            return
        conn.events = self.EV_READ
        self._conns[conn.fd] = conn
        stats.open += 1

    # -- reading ------------------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        if self._window is not None and conn.replied:
            self._window.arrival(self._now - conn.replied)
            conn.replied = 0.0
        recv = conn.sock.recv
        size = self._recv_size
        while True:
            try:
                data = recv(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn, error=True)
                return
            if not data:
                self._on_eof(conn)
                return
            self._feed(conn, data)
            if not (self.edge_triggered and conn.reading):
                return

    def _feed(self, conn: Connection, data) -> None:
        stats = self.ctx.stats
        stats.bytes_in += len(data)
        proto = conn.proto
        try:
            out, n = proto.feed(data)
        except Exception:  # noqa: BLE001 - a handler bug closes one connection only
            self._handler_failed(conn)
            return
        stats.requests += n
        if self._track and (conn.req_start or proto.partial):
            self._policy.progress(conn, proto, n, len(data), self._now)
        if out:
            self._send(conn, out)
        if proto.closing and not conn.closing:
            self._finish(conn)
        elif proto.more and conn.fd >= 0:
            self._policy.hold(conn)
            self._pull(conn)

    def _pull(self, conn: Connection) -> None:
        """Rule held-answers: held answers, pulled while pending output is at or below the low
        mark; at most ``max_output`` bytes per call, then the next writable event goes on
        (other connections get their turn)."""
        proto = conn.proto
        policy = self._policy
        stats = self.ctx.stats
        produced = 0
        while proto.more and len(conn.out) <= policy.low:
            if produced > policy.high:
                self._set_events(conn, self.EV_WRITE)   # writable again: continue
                return
            try:
                out, n = proto.pull()
            except Exception:  # noqa: BLE001 - a handler bug closes one connection only
                self._handler_failed(conn)
                return
            stats.requests += n
            produced += len(out)
            if out:
                self._send(conn, out)
                if conn.fd < 0:
                    return
        if proto.more:
            return   # pending > low: the writable event pulls again once it drains
        action = policy.released(conn, len(conn.out))
        if proto.closing and not conn.closing:
            self._finish(conn)
        elif action == CLOSE:
            self._close(conn)
        elif action == RESUME or not conn.out:
            self._set_events(conn, (self.EV_READ if conn.reading else 0)
                             | (self.EV_WRITE if conn.out else 0))

    def _on_eof(self, conn: Connection) -> None:
        out = self._policy.eof(conn.proto, _where(conn))
        if out is None:
            self._close(conn, error=True)
            return
        if out:
            self._send(conn, out)
        self._finish(conn)

    def _handler_failed(self, conn: Connection) -> None:
        self._policy.handler_failed(conn.proto, _where(conn))
        self._close(conn, error=True)

    def _finish(self, conn: Connection) -> None:
        """Read nothing more; close as soon as pending output is flushed."""
        if conn.fd < 0:
            return
        if self._policy.finish(conn, len(conn.out)) == CLOSE:
            self._close(conn)
        else:
            self._set_events(conn, self.EV_WRITE)

    # -- writing ------------------------------------------------------------------

    def _send(self, conn: Connection, out) -> None:
        if conn.fd < 0:
            return
        if conn.out:
            # Earlier output is still queued: keep order, never send around it.
            conn.out += out
        else:
            try:
                sent = conn.sock.send(out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn, error=True)
                return
            self.ctx.stats.bytes_out += sent
            if sent == len(out):
                if self._window is not None:
                    conn.replied = self._now
                return
            conn.out += memoryview(out)[sent:]
            self._queued += 1
        self._policy.queued(conn, len(conn.out))
        self._set_events(conn, self.EV_WRITE | (self.EV_READ if conn.reading else 0))

    def _on_writable(self, conn: Connection) -> None:
        out = conn.out
        send = conn.sock.send
        had = bool(out)
        while out:
            try:
                sent = send(out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn, error=True)
                return
            self.ctx.stats.bytes_out += sent
            del out[:sent]  # O(1) at the front of a bytearray in CPython
            if not self.edge_triggered:
                break
        if had and not out:
            self._queued -= 1
            if self._window is not None:
                conn.replied = self._now
        if conn.held:
            if len(out) <= self._policy.low:
                self._pull(conn)   # rule held-answers: sends, resumes or closes as it must
            return
        action = self._policy.sent(conn, len(out))
        if action == CLOSE:
            self._close(conn)
        elif not out:
            self._set_events(conn, self.EV_READ if conn.reading else 0)
        elif action == RESUME:
            self._set_events(conn, self.EV_READ | self.EV_WRITE)

    def _set_events(self, conn: Connection, events: int) -> None:
        if conn.events != events and conn.fd >= 0:
            self._modify(conn.fd, events)
            conn.events = events

    # -- closing and drain ---------------------------------------------------------

    def _close(self, conn: Connection, error: bool = False) -> None:
        if conn.fd < 0:
            return
        stats = self.ctx.stats
        try:
            self._unregister(conn.fd)
        except (OSError, KeyError, ValueError):
            pass
        del self._conns[conn.fd]
        conn.fd = -1
        conn.reading = False
        if conn.out:
            self._queued -= 1
            conn.out.clear()
        conn.sock.close()
        stats.open -= 1
        stats.closed += 1
        if error:
            stats.errors += 1

    def _drain(self) -> None:
        """Stop accepting; answer every request already received; close within the drain time.

        Connections still in the listen backlog were completed by the kernel and
        their requests may already be queued: they are accepted once more and served.
        """
        # The stop eventfd stays readable: left registered, every wait below would
        # return at once and the drain would spin instead of waiting for writability.
        self._unregister(self.ctx.stop.fileno())
        for fd, src in list(self._listeners.items()):
            if fd not in self._paused:
                self._accept(src, wakeup=False)
            try:
                self._unregister(fd)
            except (OSError, KeyError, ValueError):
                pass  # paused (out of fds) at stop: already unregistered
        self._paused.clear()
        for conn in list(self._conns.values()):
            if conn.reading:
                self._read_remaining(conn)
            self._finish(conn)
        deadline = time.monotonic() + self.ctx.limits.drain_timeout
        while self._conns:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, mask in self._poll(remaining):
                conn = self._conns.get(fd)
                if conn is not None:
                    self._on_writable(conn)
        for conn in list(self._conns.values()):
            self._close(conn)

    def _read_remaining(self, conn: Connection) -> None:
        """Read what the kernel already holds (bounded: rule drain), so those requests get
        answers.  The drain's bounded twin of ``_on_readable``, kept apart so the
        per-event path carries no read counter."""
        recv = conn.sock.recv
        for _ in range(DRAIN_READS):
            if not conn.reading:
                return
            try:
                data = recv(self._recv_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn, error=True)
                return
            if not data:
                self._on_eof(conn)
                return
            self._feed(conn, data)


def _where(conn: Connection) -> str:
    return f"fd {conn.fd} from {conn.peer}"
