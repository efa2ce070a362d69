"""``asyncio``: each worker thread runs its own asyncio event loop over the shared socket.

What a user would write, written as well as asyncio's documentation allows:

* **One loop per worker**, created in the worker's own (pinned) thread:
  ``asyncio.new_event_loop()`` — on Linux a ``SelectorEventLoop`` over ``epoll``.
  ``uvloop_.py`` swaps only this factory.
* **Listening**: ``loop.create_server(factory, sock=dup, backlog=...)`` for each socket of
  ``ctx.listeners``.  The socket handed over is a ``dup`` of the core's: asyncio closes
  the sockets it serves at ``Server.close()`` (uvloop detaches them and lets libuv close
  the fd), and the core's listening socket is shared with the other workers and owned by
  the core.  A dup is another fd for the same open file, so the kernel's accept queue and
  wait queue are the same as with the original: every worker's loop still races for one
  accept queue (``--accept shared``), or has its own (``--accept reuseport``).
  ``create_server`` calls ``listen()`` again; the core's ``--backlog`` is passed so this
  changes nothing.  There is no ``EPOLLEXCLUSIVE``: the loops register the socket plainly.
* **Accept** is the loop's own: asyncio's selector loop calls ``sock.accept()`` up to
  ``backlog`` times per readiness event, until ``BlockingIOError`` (so, with the core's
  backlog of 4096, until ``EAGAIN``: the seed's rule), and creates each transport in a
  task.  On EMFILE/ENFILE/ENOBUFS/ENOMEM asyncio itself unwatches the listener and
  retries after 1 s (``ACCEPT_RETRY_DELAY``): counted in ``extra.accept_errors`` /
  ``extra.accept_backoffs`` by our listening socket, logged once per episode.  uvloop
  accepts in this class instead (``own_accept``; uvloop_.py says why).
* **Dispatch** (``--accept dispatch``): no listener; ``loop.add_reader`` on
  ``ctx.handoff`` (the worker's end of its AF_UNIX SOCK_SEQPACKET channel,
  core/dispatch.py).  Readable: take the waiting fds with ``recvmsg``/``SCM_RIGHTS`` until
  ``EAGAIN`` (``core.dispatch.receive_handoffs``, which also reports
  ``MSG_CTRUNC``) and hand each socket to the loop as the backend's own accept does
  (``connect_accepted_socket``): ``accepted`` (in ``connection_made``) and
  ``extra.handoffs``, never a listen wakeup or a lost race; ``max_connections`` applies
  (refused, counted).  Out of fds (EMFILE/ENFILE) the kernel cannot install the passed
  descriptor: ``recvmsg`` consumes the message anyway and reports ``MSG_CTRUNC`` - **that
  connection is lost** (closed by the kernel, never served); counted in
  ``extra.handoff_lost``, logged once per episode.  At drain the channel is taken once
  more (what the acceptor handed over before stop), then unwatched.
* **Max connections**: one over ``limits.max_connections`` is aborted in
  ``connection_made`` (counted ``accepted`` and ``refused``, never ``open``).
* **Protocol**: an ``asyncio.Protocol`` (``data_received`` gets a fresh ``bytes`` per
  read) that drives the same sans-I/O protocol objects as every backend.  Not a
  ``BufferedProtocol``: echo hands the received object straight back to
  ``transport.write``, and when the kernel does not take all of it the transport keeps
  a reference (uvloop) — a recycled ``get_buffer`` area would be overwritten under it;
  for small messages ``data_received`` is also the cheaper path in both loops.
* **Backpressure**: ``transport.set_write_buffer_limits(high=max_output,
  low=max_output // 2)``; ``pause_writing`` pauses reading (``transport.pause_reading``,
  counted in ``backpressure``) and ``resume_writing`` resumes it: the semantics of
  readiness.py.
* **Half-close**: ``eof_received`` sends ``proto.eof()``'s bytes, closes the transport
  (``close()`` flushes buffered output first) and returns True, so the loop does not
  close it before the flush.
* **Stop**: ``loop.add_reader(ctx.stop.fileno())`` (the eventfd) wakes the loop.  Drain:
  the listen backlog is accepted once (``connect_accepted_socket``), the servers are
  closed, each connection's reading is paused and what its kernel buffer already holds
  is read directly from the fd (bounded) and answered; connections close once flushed;
  after ``limits.drain_timeout`` the rest are aborted.

Counters, and what cannot be observed:

* ``accepted``, ``open``, ``closed``, ``errors`` (``connection_lost`` with an
  exception), ``requests``, ``bytes_in``, ``backpressure``: exact.
* ``bytes_out``: bytes handed to ``transport.write``; output still buffered when a
  connection is aborted (a reset, the drain deadline) is counted though never sent.
* ``lost_races`` / ``listen_wakeups``: asyncio's accept loop calls our listening
  socket's ``accept()``, so a subclass counts them: a listen wakeup ends with
  ``BlockingIOError``; one whose first ``accept()`` got nothing is a lost race.  (A
  wakeup that took ``backlog`` connections without reaching ``EAGAIN`` is merged with
  the next.)  uvloop: counted by our own accept, exactly as readiness.py.  The drain's
  last accept of the backlog is neither (a stop is not an accept race).
* ``extra.max_pending``: the high-water mark of a transport's write buffer, read after
  each write.
* ``wakeups``: the loop's waits are internal to asyncio/uvloop: not counted (0).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time

from parallelnet.backends.base import (
    ACCEPT_BACKOFF_MAX, ACCEPT_RESOURCE_ERRORS, DISPATCH, REUSEPORT, SHARED, Availability,
    Backend, accept_pending,
)
from parallelnet.core.dispatch import HANDOFF_BATCH, receive_handoffs

log = logging.getLogger("parallelnet.worker")

#: What asyncio's accept loop reports (then it unwatches the listener for 1 s).
_ACCEPT_RESOURCE_MSG = "socket.accept() out of system resource"



class _CountingListener(socket.socket):
    """A dup of the core's listening socket whose ``accept()`` counts lost races and
    accept errors (asyncio's own accept loop calls it)."""

    def setup(self, worker: "AsyncioBackend") -> "_CountingListener":
        self.worker = worker
        self.stats = worker.ctx.stats
        self.won = 0
        self.paused = False
        return self

    def _end_wakeup(self) -> None:
        st = self.stats
        st.listen_wakeups += 1
        if not self.won:
            st.lost_races += 1
        self.won = 0

    def _unpause(self) -> None:
        self.paused = False

    def accept(self):
        if self.paused:
            # asyncio's loop (CPython <= 3.12) goes on calling accept() up to ``backlog``
            # times after EMFILE, scheduling a retry each time: end that wakeup here.
            raise BlockingIOError(errno.EAGAIN, "listener paused after an accept error")
        try:
            pair = super().accept()
        except BlockingIOError:
            self._end_wakeup()
            raise
        except OSError as exc:
            self.stats.extra["accept_errors"] += 1
            if exc.errno in ACCEPT_RESOURCE_ERRORS:
                # asyncio unwatches the listener and re-adds it after ACCEPT_RETRY_DELAY.
                self.stats.extra["accept_backoffs"] += 1
                self.worker.accept_failed(exc)
                self.paused = True
                self.worker.loop.call_soon(self._unpause)
            self._end_wakeup()
            raise
        self.won += 1
        self.worker.backing_off = False
        return pair


class _ConnectionBase:
    """One client connection: transport events in, sans-I/O protocol in the middle."""

    __slots__ = ("worker", "stats", "proto", "transport", "write", "closing", "paused",
                 "refused", "pending")

    def __init__(self, worker: "AsyncioBackend") -> None:
        self.worker = worker
        self.stats = worker.ctx.stats
        self.proto = worker.ctx.protocol_factory()
        self.transport = None
        self.closing = False
        self.paused = False
        self.refused = False

    def connection_made(self, transport) -> None:
        w = self.worker
        st = self.stats
        st.accepted += 1
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
        transport.set_write_buffer_limits(high=w.max_output, low=w.max_output // 2)
        w.conns.add(self)
        if w.draining:  # accepted by the loop after stop: answer what it sent, then close
            w.loop.call_soon(self.drain_read)

    def data_received(self, data) -> None:
        if self.closing:
            return
        st = self.stats
        st.bytes_in += len(data)
        proto = self.proto
        try:
            out, n = proto.feed(data)
        except Exception:  # noqa: BLE001 - a handler bug closes one connection only
            self._handler_failed()
            return
        st.requests += n
        if out:
            st.bytes_out += len(out)
            self.write(out)
            pending = self.pending()
            if pending > self.worker.peak:   # high-water mark of queued output
                self.worker.peak = st.extra["max_pending"] = pending
        if proto.closing:
            self.finish()

    def eof_received(self) -> bool:
        if not self.closing:
            try:
                out = self.proto.eof()
            except Exception:  # noqa: BLE001
                self._handler_failed()
                return True
            if out:
                self.stats.bytes_out += len(out)
                self.write(out)
            self.finish()
        return True  # keep the transport: close() above flushes, then closes

    def finish(self) -> None:
        """Read nothing more; close once pending output is flushed."""
        self.closing = True
        self.transport.close()

    def pause_writing(self) -> None:
        # The peer does not read: stop reading from it so our buffered output stays bounded.
        if not self.closing and not self.paused:
            self.paused = True
            self.transport.pause_reading()
            self.stats.backpressure += 1

    def resume_writing(self) -> None:
        if self.paused:
            self.paused = False
            if not self.closing:
                self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
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

    def _handler_failed(self) -> None:
        self.stats.handler_errors += 1
        log.exception("worker %d (%s): protocol %s failed on connection from %s; "
                      "closing that connection only", self.worker.ctx.index, self.worker.name,
                      type(self.proto).__name__, self.transport.get_extra_info("peername"))
        self.closing = True
        self.stats.errors += 1
        self.transport.abort()

    def drain_read(self, max_reads: int = 64) -> None:
        """At stop: answer what the kernel already holds for us (bounded), then finish."""
        if self.closing or self.transport is None or self.transport.is_closing():
            return
        if self.paused:  # backpressured: what it sent is not read, as in readiness.py
            self.finish()
            return
        tr = self.transport
        tr.pause_reading()
        sock = tr.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        size = self.worker.ctx.limits.recv_size
        for _ in range(max_reads if fd >= 0 else 0):
            if self.closing or self.paused:
                break
            try:
                data = os.read(fd, size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closing = True
                tr.abort()
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
    #: Not implemented yet in this backend (issue 4 delivered it before the fault work):
    #: asking for them is refused at startup by the core, never silently ignored.
    unsupported_limits = {
        "idle_timeout": "not implemented in this backend yet",
        "header_timeout": "not implemented in this backend yet",
    }

    @classmethod
    def probe(cls) -> Availability:
        return Availability(True, detail=f"loop {cls._loop_name()}")

    @classmethod
    def _loop_name(cls) -> str:
        return "asyncio.SelectorEventLoop"

    def new_loop(self) -> asyncio.AbstractEventLoop:
        """The one thing uvloop changes."""
        return asyncio.new_event_loop()

    #: Whether the loop's own accept serves the listeners (asyncio: it calls our socket's
    #: accept(), which counts) or this class accepts itself (uvloop: libuv's accept drops
    #: the backlog on EMFILE and uvloop then closes the server, see uvloop_.py).
    own_accept = False
    #: Whether to read through ``get_buffer`` (``_ReadIntoConnection``) to bound reads.
    read_into = False

    def run(self) -> None:
        ctx = self.ctx
        lim = ctx.limits
        self.max_output = lim.max_output
        self.max_connections = lim.max_connections
        self.recv_size = lim.recv_size
        self.conns: set[_Connection] = set()
        self.draining = False
        self.idle = None
        self.peak = 0
        self.rbuf = memoryview(bytearray(self.recv_size))
        self._conn_cls = _ReadIntoConnection if self.read_into else _Connection
        self.backing_off = False         # in an accept-error episode (logged once)
        self.backoff = lim.accept_backoff
        self.paused: dict[int, asyncio.TimerHandle] = {}   # own accept: fd -> its re-add
        self.handoff_losing = False      # in a MSG_CTRUNC episode (logged once)
        for k in ("accept_errors", "accept_backoffs", "max_pending", "handoffs", "handoff_lost"):
            ctx.stats.extra.setdefault(k, 0)   # every key exists from the start
        self.loop = loop = self.new_loop()
        loop.set_exception_handler(self._exception_handler)
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
        factory = self._factory
        backlog = int(ctx.option("backlog", 4096) or 4096)
        servers = []
        for lsock in ctx.listeners:
            if self.own_accept:
                loop.add_reader(lsock.fileno(), self._on_listen, lsock)
                continue
            dup = _CountingListener(lsock.family, lsock.type, lsock.proto,
                                    fileno=os.dup(lsock.fileno())).setup(self)
            servers.append(await loop.create_server(factory, sock=dup, backlog=backlog))
        if ctx.handoff is not None:
            loop.add_reader(ctx.handoff.fileno(), self._on_handoff)
        # asyncio's selector registers each reader at once; uvloop's (libuv) on its next
        # poll, which is the very next thing this loop does.
        ctx.stats.mark_ready()
        if not ctx.stop.is_set():
            await stopped
        loop.remove_reader(ctx.stop.fileno())
        await self._drain(servers)

    def _factory(self) -> _Connection:
        return self._conn_cls(self)

    # -- accept errors ------------------------------------------------------------------

    def accept_failed(self, exc: OSError) -> None:
        """Out of fds (or memory) on accept: log once per episode (a success ends it)."""
        if not self.backing_off:
            self.backing_off = True
            log.warning("worker %d (%s): accept failed: %s; pausing the listener, retrying "
                        "with back-off", self.ctx.index, self.name, exc)

    def _exception_handler(self, loop, context) -> None:
        if context.get("message") == _ACCEPT_RESOURCE_MSG:
            return   # counted and logged (once per episode) by _CountingListener
        loop.default_exception_handler(context)

    # -- own accept (uvloop): readiness.py's accept, over the loop's add_reader -----------

    def _on_listen(self, lsock: socket.socket) -> None:
        """Accept until EAGAIN; a wakeup that got nothing is a lost race; EMFILE & co
        pause the listener with a doubling back-off (readiness.py's semantics)."""
        st = self.ctx.stats
        st.listen_wakeups += 1
        accepted, exhausted = accept_pending(lsock, st.extra, f"worker {self.ctx.index}")
        for conn, _ in accepted:
            self._adopt(conn)
        if exhausted is not None:
            self._pause_listener(lsock, exhausted)
        won = len(accepted)
        if won:
            self.backoff = self.ctx.limits.accept_backoff
            self.backing_off = False
        else:
            st.lost_races += 1

    def _pause_listener(self, lsock: socket.socket, exc: OSError) -> None:
        fd = lsock.fileno()
        self.ctx.stats.extra["accept_backoffs"] += 1
        self.accept_failed(exc)
        if fd in self.paused:
            return
        self.loop.remove_reader(fd)
        self.paused[fd] = self.loop.call_later(self.backoff, self._resume_listener, lsock)
        self.backoff = min(ACCEPT_BACKOFF_MAX, self.backoff * 2)

    def _resume_listener(self, lsock: socket.socket) -> None:
        if self.paused.pop(lsock.fileno(), None) is not None and not self.draining:
            self.loop.add_reader(lsock.fileno(), self._on_listen, lsock)

    def _adopt(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self._factory, conn)
        except OSError:
            conn.close()

    # -- dispatch: connections handed over on ctx.handoff ------------------------------

    def _take_handoffs(self) -> tuple[list[socket.socket], bool]:
        """Every connection waiting on the channel (recvmsg until EAGAIN), counted.
        Returns the sockets and whether the acceptor closed its end."""
        channel = self.ctx.handoff
        extra = self.ctx.stats.extra
        socks: list[socket.socket] = []
        while True:
            fds, lost, closed = receive_handoffs(channel)
            socks.extend(socket.socket(fileno=fd) for fd in fds)
            if lost:
                extra["handoff_lost"] += lost
                if not self.handoff_losing:
                    self.handoff_losing = True
                    log.warning("worker %d (%s): a handed-over connection was lost: the fd "
                                "could not be installed (MSG_CTRUNC, out of fds); counted in "
                                "handoff_lost", self.ctx.index, self.name)
            elif fds:
                self.handoff_losing = False
            if closed or len(fds) + lost < HANDOFF_BATCH:
                break
        extra["handoffs"] += len(socks)
        return socks, closed

    def _on_handoff(self) -> None:
        socks, closed = self._take_handoffs()
        if closed:   # the acceptor is gone: an EOF channel would stay readable forever
            self.loop.remove_reader(self.ctx.handoff.fileno())
        for sock in socks:
            self._adopt(sock)   # accepted/refused are counted in connection_made

    async def _drain(self, servers) -> None:
        ctx = self.ctx
        loop = self.loop
        st = ctx.stats
        self.draining = True
        if self.own_accept:
            for lsock in ctx.listeners:
                if lsock.fileno() not in self.paused:
                    loop.remove_reader(lsock.fileno())
        # The listen backlog: completed by the kernel, requests possibly queued: serve once.
        # Not a listen wakeup and not a race: counted as accepted connections only.
        for lsock in ctx.listeners:
            if lsock.fileno() in self.paused:
                continue   # out of fds at stop: as readiness.py, not retried
            while True:
                try:
                    conn, _ = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    st.extra["accept_errors"] += 1
                    if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                        log.warning("worker %d: accept failed: %s", ctx.index, exc)
                    break
                conn.setblocking(False)
                try:
                    await loop.connect_accepted_socket(self._factory, conn)
                except OSError:
                    conn.close()
        if ctx.handoff is not None:
            # What the acceptor handed over before stop, once: no wakeup, no race.
            loop.remove_reader(ctx.handoff.fileno())
            for conn in self._take_handoffs()[0]:
                conn.setblocking(False)
                try:
                    await loop.connect_accepted_socket(self._factory, conn)
                except OSError:
                    conn.close()
        for handle in self.paused.values():
            handle.cancel()
        self.paused.clear()
        for srv in servers:
            srv.close()
        for c in list(self.conns):
            c.drain_read()
        deadline = time.monotonic() + ctx.limits.drain_timeout
        # Connections the loop accepted just before close() get their transport in a task:
        # let those run, then wait for every connection to flush and close.
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
        for c in list(self.conns):
            c.closing = True
            c.transport.abort()
        await asyncio.sleep(0)
