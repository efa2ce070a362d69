"""``asyncio``: each worker thread runs its own asyncio event loop over the shared socket.

What a user would write, as asyncio's documentation allows, with the project's rules:

* **One loop per worker**, created in the worker's own (pinned) thread:
  ``asyncio.new_event_loop()`` - on Linux a ``SelectorEventLoop`` over ``epoll``.
  ``uvloop_.py`` and ``rloop_.py`` swap only this factory (``new_loop``).
* **Several addresses**: every listening socket of the worker (``ctx.listeners``, one per
  address) gets its own ``add_reader``; a connection is served by its address's protocol
  (``ctx.protocols[listener id]``) and counted per listener id (``stats.per_listener``).
* **Accept** is this class's, over the loop's public ``add_reader``: readable listener ->
  core/accept.py's rule (accept until ``EAGAIN``; a wakeup that got nothing is a lost
  race; EMFILE/ENFILE/ENOBUFS/ENOMEM pause the listener with ``remove_reader`` for the
  ``AcceptPacer``'s back-off, doubling from ``limits.accept_backoff`` to 1 s, logged once
  per episode).  Each socket becomes a transport through ``connect_accepted_socket`` (a
  task per connection, as asyncio's own accept path creates one).  Not ``create_server``:
  asyncio's own accept retries after a fixed 1 s and counts nothing, libuv's drops the
  whole backlog on EMFILE and uvloop then closes the server for good
  (``uv__emfile_trick``, ``__uv_streamserver_on_listen``).  The listening sockets are
  the core's, never closed here.  There is no ``EPOLLEXCLUSIVE``: ``add_reader``
  registers the socket plainly.
* **Dispatch** (``--accept dispatch``): ``add_reader`` on ``ctx.handoff``; readable ->
  core/handoff.py's ``HandoffReceiver`` (``recvmsg`` until ``EAGAIN``, ``handoffs`` and
  ``handoff_lost`` counted, a loss logged once per episode), each socket adopted as above.
* **Protocol**: an ``asyncio.Protocol`` (``data_received`` gets a fresh ``bytes`` per read)
  that drives the same sans-I/O protocol objects as every backend, by core/policy.py's
  rules.  Not a ``BufferedProtocol`` by default: echo hands the received object straight
  back to ``transport.write``, and when the kernel does not take all of it the transport
  keeps a reference - a recycled ``get_buffer`` area would be overwritten under it.  A
  loop whose reads ignore ``recv_size`` (uvloop: 256 000 bytes) reads through
  ``_ReadIntoConnection`` instead, copying each chunk out.
* **Backpressure**: the transport's own marks, set to the policy's
  (``set_write_buffer_limits(high=max_output, low=max_output // 2)``): ``pause_writing``
  and ``resume_writing`` ask the policy and pause/resume reading.
* **Half-close**: ``eof_received`` sends ``proto.eof()``'s bytes, closes the transport
  (``close()`` flushes buffered output first) and returns True.
* **Timeouts**: one ``call_later`` per tick while a connection is open (the policy's
  coarse timer).  A connection notes activity with one store per read (``active``); the
  sweep turns that, or a change of its transport's buffered output, into ``last``, so
  idle time is measured from the tick after the last bytes (never early, at most one
  tick late).  The request deadline's start is exact: ``time.monotonic()`` is read only
  when a feed leaves a request incomplete.
* **Max connections**: one over ``limits.max_connections`` is aborted in
  ``connection_made`` (counted ``accepted`` and ``refused``, never ``open``).
* **Stop**: ``add_reader(ctx.stop.fileno())`` (the eventfd) wakes the loop.  Drain: the
  listen backlog and the hand-off channel are taken once more, each connection's reading
  is paused and what its kernel buffer already holds is read directly from the fd
  (bounded) and answered; connections close once flushed; after
  ``limits.drain_timeout`` the rest are aborted.

Counters, and what cannot be observed:

* exact: ``accepted``, ``listen_wakeups``, ``lost_races`` (this class accepts), ``open``,
  ``closed``, ``errors``, ``requests``, ``bytes_in``, ``backpressure``.
* ``bytes_out``: bytes handed to ``transport.write``; output still buffered when a
  connection is aborted (a reset, the drain deadline) is counted though never sent.
* ``extra.max_pending``: the high-water mark of a transport's write buffer, read after
  each write.
* ``wakeups``: the loop's waits are internal to the event loop: not counted (0).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import time

from parallelnet.core.accept import AcceptPacer, accept_pending
from parallelnet.core.backend import DISPATCH, REUSEPORT, SHARED, Availability, Backend
from parallelnet.core.handoff import HandoffReceiver
from parallelnet.core.policy import (
    DRAIN_READS, RESUME, ConnectionPolicy, ConnState, tracks_requests,
)
from parallelnet.core.stats import NOT_OBSERVABLE


class _ConnectionBase(ConnState):
    """One client connection: transport events in, sans-I/O protocol in the middle."""

    __slots__ = ("worker", "stats", "proto", "transport", "write", "refused", "pending",
                 "active", "seen_pending", "listener")

    def __init__(self, worker: "AsyncioBackend", lid: int = 0) -> None:
        self.worker = worker
        self.stats = worker.ctx.stats
        self.listener = self.stats.per_listener[lid]   # where this connection came in
        self.proto = worker.factories[lid]()
        self.transport = None
        self.refused = False
        self.active = False          # bytes arrived since the last tick
        self.seen_pending = 0        # buffered output at the last tick
        self.init_state(time.monotonic())

    def connection_made(self, transport) -> None:
        w = self.worker
        st = self.stats
        st.accepted += 1
        self.listener.accepted += 1
        self.transport = transport
        if len(w.conns) >= w.max_connections:
            # Over the per-worker limit: closed at once, never served (as readiness.py).
            self.refused = self.closing = True
            st.refused += 1
            transport.abort()
            return
        st.open += 1
        self.write = transport.write
        self.pending = transport.get_write_buffer_size
        if hasattr(transport, "max_size"):
            transport.max_size = w.recv_size   # asyncio reads 256 KiB by default
        transport.set_write_buffer_limits(high=w.policy.high, low=w.policy.low)
        w.conns.add(self)
        w.arm_timer()
        if w.draining:  # accepted by the loop after stop: answer what it sent, then close
            w.loop.call_soon(self.drain_read)

    def data_received(self, data) -> None:
        if self.closing:
            return
        self.active = True
        st = self.stats
        st.bytes_in += len(data)
        proto = self.proto
        try:
            out, n = proto.feed(data)
        except Exception:  # noqa: BLE001 - a handler bug closes one connection only
            self._handler_failed()
            return
        st.requests += n
        w = self.worker
        if w.track and (self.req_start or proto.partial):
            w.policy.progress(self, proto, n, len(data), time.monotonic())
        if out:
            st.bytes_out += len(out)
            self.write(out)
            pending = self.pending()
            if pending > w.policy.peak:
                w.policy.queued(self, pending)
        if proto.closing:
            self.finish()
        elif proto.more:
            self.hold()

    # -- rule held-answers: held answers ----------------------------------------------------------

    def hold(self) -> None:
        """The protocol holds answers: stop reading, and have the transport call
        ``resume_writing`` as soon as its buffer is at the low mark (high = low while
        held), where they are pulled."""
        policy = self.worker.policy
        if policy.hold(self):
            self.transport.pause_reading()
        self.transport.set_write_buffer_limits(high=policy.low, low=policy.low)
        self.pull_held()

    def pull_held(self) -> None:
        """Pull and write held answers while the buffer is at or below the low mark;
        at most ``max_output`` bytes per call, then the loop's other work goes first."""
        if self.transport is None or not self.held:
            return
        w = self.worker
        policy = w.policy
        proto = self.proto
        st = self.stats
        produced = 0
        while proto.more and self.pending() <= policy.low:
            if produced > policy.high:
                w.loop.call_soon(self.pull_held)
                return
            try:
                out, n = proto.pull()
            except Exception:  # noqa: BLE001 - a handler bug closes one connection only
                self._handler_failed()
                return
            st.requests += n
            if out:
                produced += len(out)
                st.bytes_out += len(out)
                self.write(out)
                if self.transport is None:
                    return
        pending = self.pending()
        if pending > policy.peak:
            policy.queued(self, pending)
        if proto.more:
            return   # above the low mark: resume_writing pulls again
        self.transport.set_write_buffer_limits(high=policy.high, low=policy.low)
        action = policy.released(self, pending)
        if proto.closing or self.closing:
            self.finish()
        elif action == RESUME:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        if not self.closing:
            out = self.worker.policy.eof(self.proto, self._where())
            if out is None:
                self._abort(error=True)
                return True
            if out:
                self.stats.bytes_out += len(out)
                self.write(out)
            self.finish()
        return True  # keep the transport: close() above flushes, then closes

    def finish(self) -> None:
        """Read nothing more; close once pending output is flushed (transport.close) and
        no answer is held (rule held-answers: ``pull_held`` finishes then)."""
        self.worker.policy.finish(self, 1)
        if not self.held:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.worker.policy.pause(self):
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.held:
            self.pull_held()
        elif self.worker.policy.resume(self):
            self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        # Drop our references to the transport: a loop whose transport owns the socket
        # (rloop closes the fd when its transport is freed) must not be kept from it by
        # the protocol <-> transport cycle.
        self.transport = self.write = self.pending = None
        if self.refused:
            return
        st = self.stats
        st.open -= 1
        st.closed += 1
        if exc is not None:
            st.errors += 1
        w = self.worker
        w.conns.discard(self)
        if w.draining and not w.conns and w.idle is not None and not w.idle.done():
            w.idle.set_result(None)

    def _where(self) -> str:
        return str(self.transport.get_extra_info("peername")) if self.transport else "(closed)"

    def _handler_failed(self) -> None:
        self.worker.policy.handler_failed(self.proto, self._where())
        self._abort(error=True)

    def _abort(self, error: bool = False) -> None:
        self.closing = True
        self.reading = False
        if error:
            self.stats.errors += 1
        self.transport.abort()

    def drain_read(self) -> None:
        """At stop: answer what the kernel already holds for us (bounded), then finish."""
        if self.closing or self.transport is None or self.transport.is_closing():
            return
        if not self.reading:  # backpressured: what it sent is not read (policy rule drain)
            self.finish()
            return
        tr = self.transport
        tr.pause_reading()
        sock = tr.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        size = self.worker.recv_size
        for _ in range(DRAIN_READS if fd >= 0 else 0):
            if self.closing or not self.reading:
                break
            try:
                data = os.read(fd, size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._abort()
                return
            if not data:
                self.eof_received()
                return
            self.data_received(data)
        if not self.closing:
            self.finish()


class _Connection(_ConnectionBase, asyncio.Protocol):
    """The plain ``asyncio.Protocol``: ``data_received`` gets a fresh ``bytes`` per read."""

    __slots__ = ()


class _ReadIntoConnection(_ConnectionBase, asyncio.BufferedProtocol):
    """For a loop whose reads ignore ``limits.recv_size`` (uvloop reads 256 000 bytes):
    the loop reads into the worker's ``recv_size`` buffer, so backpressure stops
    reading within one ``recv_size`` read of ``max_output``, as in readiness.py.  The
    chunk is copied out at once (as ``data_received`` would get it): echo hands it to
    ``transport.write``, which may keep it.  (uvloop takes the buffered path only for a
    protocol that is not an ``asyncio.Protocol``: hence the shared plain base.)"""

    __slots__ = ()

    def get_buffer(self, sizehint):
        return self.worker.rbuf

    def buffer_updated(self, nbytes) -> None:
        self.data_received(self.worker.rbuf[:nbytes].tobytes())


class AsyncioBackend(Backend):
    name = "asyncio"
    description = "asyncio event loop per worker thread (SelectorEventLoop/epoll), Protocol"
    kind = "readiness"
    accept_strategies = frozenset({SHARED, REUSEPORT, DISPATCH})
    max_listeners = None
    #: Whether to read through ``get_buffer`` (``_ReadIntoConnection``) to bound reads.
    read_into = False
    #: The PyPI package of a third-party loop (None: the standard library's).
    loop_package: str | None = None

    @classmethod
    def probe(cls) -> Availability:
        if cls.loop_package is None:
            return Availability(True, detail="loop asyncio.SelectorEventLoop")
        try:
            module = importlib.import_module(cls.loop_package)
        except ImportError as exc:
            return Availability(False, f"{cls.loop_package} not importable ({exc}); "
                                       f"pip install {cls.loop_package}")
        return Availability(True, detail=f"{cls.loop_package} {module.__version__}")

    def new_loop(self) -> asyncio.AbstractEventLoop:
        """The one thing the other asyncio loops change."""
        return asyncio.new_event_loop()

    def run(self) -> None:
        ctx = self.ctx
        lim = ctx.limits
        self.who = who = f"worker {ctx.index} ({self.name})"
        self.max_connections = lim.max_connections
        self.recv_size = lim.recv_size
        self.policy = ConnectionPolicy(lim, ctx.stats, who, time.monotonic())
        self.factories = [p.factory for p in ctx.protocols]   # by listener id
        self.track = any(tracks_requests(p.factory()) for p in ctx.protocols)
        self.conns: set[_ConnectionBase] = set()
        self.draining = False
        self.idle = None
        self.timer = None                 # the tick's handle while connections are open
        self.rbuf = memoryview(bytearray(self.recv_size))
        self._conn_cls = _ReadIntoConnection if self.read_into else _Connection
        self.pacer = AcceptPacer(lim.accept_backoff, ctx.stats.extra, who)
        self.paused: dict[int, asyncio.TimerHandle] = {}   # listener fd -> its re-add
        self.receiver = (HandoffReceiver(ctx.handoff, ctx.stats.extra, who)
                         if ctx.handoff is not None else None)
        self.loop = loop = self.new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        finally:
            try:
                for c in list(self.conns):
                    if c.transport is not None:
                        c.transport.abort()
                loop.run_until_complete(asyncio.sleep(0))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def _main(self) -> None:
        ctx = self.ctx
        loop = self.loop
        stopped = loop.create_future()

        def on_stop() -> None:
            if not stopped.done():
                stopped.set_result(None)

        loop.add_reader(ctx.stop.fileno(), on_stop)
        for lsock, lid in zip(ctx.listeners, ctx.listener_ids):
            loop.add_reader(lsock.fileno(), self._on_listen, lsock, lid)
        if ctx.handoff is not None:
            loop.add_reader(ctx.handoff.fileno(), self._on_handoff)
        # asyncio's selector registers each reader at once; uvloop's (libuv) on its next
        # poll, which is the very next thing this loop does.
        ctx.stats.mark_ready()
        if not ctx.stop.is_set():
            await stopped
        loop.remove_reader(ctx.stop.fileno())
        await self._drain()

    def _factory(self, lid: int = 0) -> _ConnectionBase:
        return self._conn_cls(self, lid)

    # -- the policy's timer ------------------------------------------------------------

    def arm_timer(self) -> None:
        if self.timer is None and self.policy.tick is not None:
            self.timer = self.loop.call_later(self.policy.tick, self._tick)

    def _tick(self) -> None:
        self.timer = None
        now = time.monotonic()
        expired = self.policy.expired
        for c in list(self.conns):
            if c.closing:
                continue
            pending = c.pending()
            if c.active or pending != c.seen_pending:
                c.active = False
                c.seen_pending = pending
                c.last = now
            if expired(c, now):
                c._abort()
        if self.conns:
            self.arm_timer()

    # -- accept: core/accept.py's rule over the loop's add_reader ------------------------

    def _on_listen(self, lsock: socket.socket, lid: int) -> None:
        st = self.ctx.stats
        mine = st.per_listener[lid]
        st.listen_wakeups += 1
        mine.listen_wakeups += 1
        accepted, exhausted = accept_pending(lsock, st.extra, self.who)
        for conn, _ in accepted:
            self._adopt(conn, lid)
        if exhausted is not None:
            self._pause_listener(lsock, lid, exhausted)
        if accepted:
            self.pacer.succeeded()
        elif not self.empty_wakeups_are_races():
            st.lost_races = mine.lost_races = NOT_OBSERVABLE
        elif st.lost_races is not NOT_OBSERVABLE:
            st.lost_races += 1
            mine.lost_races += 1

    def empty_wakeups_are_races(self) -> bool:
        """Whether a listen wakeup that accepts nothing can only mean another worker took
        the connection first.  True for a loop that reports readiness only when the
        socket is ready; a loop that may wake for nothing says False, and this worker's
        ``lost_races`` becomes not observable (None) rather than wrong."""
        return True

    def _pause_listener(self, lsock: socket.socket, lid: int, exc: OSError) -> None:
        fd = lsock.fileno()
        delay = self.pacer.failed(exc)
        if fd in self.paused:
            return
        self.loop.remove_reader(fd)
        self.paused[fd] = self.loop.call_later(delay, self._resume_listener, lsock, lid)

    def _resume_listener(self, lsock: socket.socket, lid: int) -> None:
        if self.paused.pop(lsock.fileno(), None) is not None and not self.draining:
            self.loop.add_reader(lsock.fileno(), self._on_listen, lsock, lid)

    def _adopt(self, conn: socket.socket, lid: int) -> None:
        conn.setblocking(False)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.loop.create_task(self._connect(conn, lid))

    async def _connect(self, conn: socket.socket, lid: int) -> None:
        try:
            await self.transport_for(conn, lid)
        except OSError:
            conn.close()

    async def transport_for(self, sock: socket.socket, lid: int = 0):
        """Wrap an accepted socket in the loop's transport (the loops differ here), its
        connection served by listener ``lid``'s protocol."""
        return await self.loop.connect_accepted_socket(lambda: self._factory(lid), sock)

    def _on_handoff(self) -> None:
        pairs, closed = self.receiver.take()
        if closed:   # the acceptor is gone: an EOF channel would stay readable forever
            self.loop.remove_reader(self.ctx.handoff.fileno())
        for sock, lid in pairs:
            self._adopt(sock, lid)   # accepted/refused are counted in connection_made

    # -- stop ---------------------------------------------------------------------------

    async def _drain(self) -> None:
        ctx = self.ctx
        loop = self.loop
        self.draining = True
        for lsock in ctx.listeners:
            if lsock.fileno() not in self.paused:
                loop.remove_reader(lsock.fileno())
        # The listen backlog and the channel: completed or handed over before stop, with
        # requests possibly queued: served once.  Not a listen wakeup and not a race.
        late = []
        for lsock, lid in zip(ctx.listeners, ctx.listener_ids):
            if lsock.fileno() not in self.paused:   # out of fds at stop: not retried
                late += [(conn, lid) for conn, _ in
                         accept_pending(lsock, ctx.stats.extra, self.who)[0]]
        if ctx.handoff is not None:
            loop.remove_reader(ctx.handoff.fileno())
            late += self.receiver.take()[0]
        for conn, lid in late:
            conn.setblocking(False)
            await self._connect(conn, lid)
        for handle in self.paused.values():
            handle.cancel()
        self.paused.clear()
        for c in list(self.conns):
            c.drain_read()
        deadline = time.monotonic() + ctx.limits.drain_timeout
        # Connections adopted just before stop get their transport in a task: let those
        # run, then wait for every connection to flush and close.
        await asyncio.sleep(0)
        while self.conns:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.idle = loop.create_future()
            try:
                await asyncio.wait_for(self.idle, remaining)
            except asyncio.TimeoutError:
                break
        if self.timer is not None:
            self.timer.cancel()
        for c in list(self.conns):
            c._abort()
        await asyncio.sleep(0)
