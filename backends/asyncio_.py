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
  task.  uvloop's libuv accepts in C until ``EAGAIN``.
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
  the next.)  uvloop accepts inside libuv: neither is observable, both stay 0.
* ``wakeups``: the loop's waits are internal to asyncio/uvloop: not counted (0).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time

from parallelnet.backends.base import REUSEPORT, SHARED, Availability, Backend

log = logging.getLogger("parallelnet.worker")


class _CountingListener(socket.socket):
    """A dup of the core's listening socket whose ``accept()`` counts lost races."""

    def setup(self, stats) -> "_CountingListener":
        self.stats = stats
        self.won = 0
        return self

    def accept(self):
        try:
            pair = super().accept()
        except BlockingIOError:
            st = self.stats
            st.listen_wakeups += 1
            if not self.won:
                st.lost_races += 1
            self.won = 0
            raise
        self.won += 1
        return pair


class _Connection(asyncio.Protocol):
    """One client connection: transport events in, sans-I/O protocol in the middle."""

    __slots__ = ("worker", "stats", "proto", "transport", "write", "closing", "paused")

    def __init__(self, worker: "AsyncioBackend") -> None:
        self.worker = worker
        self.stats = worker.ctx.stats
        self.proto = worker.ctx.protocol_factory()
        self.transport = None
        self.closing = False
        self.paused = False

    def connection_made(self, transport) -> None:
        w = self.worker
        st = self.stats
        st.accepted += 1
        st.open += 1
        self.transport = transport
        self.write = transport.write
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
        log.exception("worker %d: protocol %s failed; closing the connection",
                      self.worker.ctx.index, type(self.proto).__name__)
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


class AsyncioBackend(Backend):
    name = "asyncio"
    description = "asyncio event loop per worker thread (SelectorEventLoop/epoll), Protocol"
    kind = "readiness"
    accept_strategies = frozenset({SHARED, REUSEPORT})
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

    #: Whether the loop calls our listening socket's accept() (asyncio) or not (uvloop).
    counts_races = True

    def run(self) -> None:
        ctx = self.ctx
        self.max_output = ctx.limits.max_output
        self.conns: set[_Connection] = set()
        self.draining = False
        self.idle = None
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
        factory = self._factory
        backlog = int(ctx.option("backlog", 4096) or 4096)
        servers = []
        for lsock in ctx.listeners:
            dup = _CountingListener(lsock.family, lsock.type, lsock.proto,
                                    fileno=os.dup(lsock.fileno())).setup(ctx.stats)
            servers.append(await loop.create_server(factory, sock=dup, backlog=backlog))
        if not ctx.stop.is_set():
            await stopped
        loop.remove_reader(ctx.stop.fileno())
        await self._drain(servers)

    def _factory(self) -> _Connection:
        return _Connection(self)

    async def _drain(self, servers) -> None:
        ctx = self.ctx
        loop = self.loop
        st = ctx.stats
        self.draining = True
        # The listen backlog: completed by the kernel, requests possibly queued: serve once.
        for lsock in ctx.listeners:
            st.listen_wakeups += 1
            won = 0
            while True:
                try:
                    conn, _ = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    st.extra["accept_errors"] = st.extra.get("accept_errors", 0) + 1
                    if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                        log.warning("worker %d: accept failed: %s", ctx.index, exc)
                    break
                won += 1
                conn.setblocking(False)
                try:
                    await loop.connect_accepted_socket(self._factory, conn)
                except OSError:
                    conn.close()
            if not won:
                st.lost_races += 1
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
