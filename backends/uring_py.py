"""``uring-py``: the same io_uring design as ``uring``, every completion handled in Python.

It shares the extension (ring setup, provided buffer ring, SQE preparation) but uses
only its raw calls: Python reaps each CQE, decodes its user_data, recycles buffers,
re-arms recv and accept, tracks sends and closes.  It exists to measure what moving
those per-completion mechanics into C (``uring``) buys; semantics are the same as
``uring``'s (see its docstring), written as plainly as possible rather than fast:

* one send in flight per connection, the rest queued in a bytearray (the received
  buffer is sent without a copy when nothing is queued; otherwise it is copied and
  recycled at once);
* close = cancel the connection's operations, wait for their final CQEs, close;
* drain = cancel accepts and take the backlog synchronously, cancel each recv, then
  read what the peer already sent with MSG_DONTWAIT, answer, flush, close;
* ``--accept dispatch``: a poll on ``ctx.handoff``, re-armed after each completion; the
  fds are taken with ``core.dispatch.receive_handoffs`` until EAGAIN and adopted like
  accepted sockets; with ``--uring-handoff msg-ring`` each fd arrives as a CQE of its
  own (see ``uring``'s docstring).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time

from parallelnet.backends.base import ACCEPT_BACKOFF_MAX
from parallelnet.backends.uring import UringBackend, sqpoll_cpu_ns
from parallelnet.core.dispatch import HANDOFF_BATCH, receive_handoffs

log = logging.getLogger("parallelnet.worker")

ACCEPT, RECV, SEND, STOP, CANCEL, HANDOFF = 1, 2, 3, 4, 5, 6
MSG = 7   # posted by the dispatcher's IORING_OP_MSG_RING (--uring-handoff msg-ring): res = fd
F_BUFFER, F_MORE, BUF_SHIFT = 1, 2, 16
BATCH = 1024
#: accept errors that lose one connection, not the listener: re-armed at once.  Any other
#: error (EMFILE..., or EINVAL/EBADF/ENOTSOCK: the listener is unusable) would fail again
#: at once, so the listener pauses for a back-off instead of spinning through the ring.
ACCEPT_ONE_LOST = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR,
                             errno.EAGAIN})


class Conn:
    __slots__ = ("cid", "sock", "fd", "proto", "out", "inflight", "off", "bid", "recv_armed",
                 "recv_cancel", "reading", "paused", "closing", "dead", "eof", "starved", "error",
                 "last")

    def __init__(self, cid, sock, proto):
        self.cid, self.sock, self.fd, self.proto = cid, sock, sock.fileno(), proto
        self.out = bytearray()      # queued output (not yet handed to the kernel)
        self.inflight = None        # the object (or pool pointer) the kernel is sending from
        self.off = self.bid = 0
        self.recv_armed = self.recv_cancel = self.paused = False
        self.closing = self.dead = self.eof = self.starved = self.error = False
        self.reading = True
        self.last = time.monotonic()  # last progress (data in, send done): timeouts


class UringPyBackend(UringBackend):
    name = "uring-py"
    description = "io_uring, every completion handled in Python (to measure the C core)"
    conformance_variants = []

    def run(self) -> None:
        self._open(raw=True)
        ffi, lib, core = self.ffi, self.lib, self.core
        self.ud = ffi.new("uint64_t[]", BATCH)
        self.res = ffi.new("int32_t[]", BATCH)
        self.fl = ffi.new("uint32_t[]", BATCH)
        self.base = lib.uc_pool(core)
        self.nbufs = self.ctx.option("uring_buffers", 1024)
        self.conns: dict[int, Conn] = {}
        self.next_cid = 1
        self.starved: dict[Conn, None] = {}   # ordered: re-armed first come, first served
        self.draining = self.stopping = self.shutting = False
        self.steps = 0
        self.lis = {i: s for i, s in enumerate(self.ctx.listeners)}
        self.accept_armed = set()
        self.extra = {"enobufs": 0, "zc_sends": 0, "copied_sends": 0, "partial_sends": 0,
                      "accept_errors": 0, "accept_backoffs": 0, "idle_timeouts": 0,
                      "header_timeouts": 0, "max_pending": 0, "handoffs": 0,
                      "handoff_lost": 0, "handoff_wakeups": 0, "msg_handoffs": 0,
                      "accept_eagain": 0}
        self.lent = 0                 # provided buffers held by sends (the reserve's measure)
        self.sock_kind = None         # (family, type, proto) of adopted sockets, see _adopt
        self.ctx.stats.extra.update(self.extra)
        self.paused_lis: dict[int, float] = {}   # listener index -> resume time (EMFILE back-off)
        self.backoff = self.ctx.limits.accept_backoff
        self.now = time.monotonic()
        self.next_sweep = self.now + (self.tick or 0.0)
        lib.uc_raw_poll(core, self.ctx.stop.fileno(), STOP)
        for i in self.lis:
            self._arm_accept(i)
        self.handoff = self.ctx.handoff
        self.handoff_armed = False
        self.handoff_closed = False
        if self.handoff is not None:
            self._arm_handoff()
        lib.uc_submit(core)
        self.ctx.stats.mark_ready()
        try:
            while not self.stopping:
                self._step(-1)
            self._drain()
        finally:
            self._shutdown()

    # -- one iteration: wait, then every CQE in Python ----------------------------------

    def _step(self, timeout_ms: int) -> None:
        ffi, lib = self.ffi, self.lib
        if self.starved:   # ENOBUFS: re-arm once buffers are back, no more than there are
            budget = self.nbufs - self.lent
            for c in list(self.starved):   # insertion order: the longest waiting first
                if c.dead or not c.reading or c.recv_armed:
                    del self.starved[c]
                elif budget > 0:
                    budget -= 1
                    del self.starved[c]
                    self._arm_recv(c)
        if not self.draining:
            if self.tick and self.conns:
                left = max(1, int((self.next_sweep - self.now) * 1000) + 1)
                timeout_ms = left if timeout_ms < 0 else min(timeout_ms, left)
            for i, when in list(self.paused_lis.items()):
                left = int((when - self.now) * 1000) + 1
                if left <= 0:
                    del self.paused_lis[i]
                    if i not in self.accept_armed:
                        self._arm_accept(i)
                else:
                    timeout_ms = left if timeout_ms < 0 else min(timeout_ms, left)
        n = lib.uc_raw_wait(self.core, timeout_ms, self.ud, self.res, self.fl, BATCH)
        if n < 0:
            self._ring_failed(n)
        self.now = now = time.monotonic()
        self.ctx.stats.wakeups += 1
        if n:
            for ud, res, fl in zip(ffi.unpack(self.ud, n), ffi.unpack(self.res, n),
                                   ffi.unpack(self.fl, n)):
                op, cid = ud & 0xFF, ud >> 8
                if op == RECV:
                    c = self.conns[cid]
                    c.last = now
                    self._on_recv(c, res, fl)
                elif op == SEND:
                    c = self.conns[cid]
                    c.last = now
                    self._on_send(c, res)
                elif op == ACCEPT:
                    self._on_accept(cid, res, fl)
                elif op == HANDOFF:
                    self._on_handoff(res)
                elif op == MSG:
                    self.extra["handoffs"] += 1
                    self.extra["msg_handoffs"] += 1
                    if self.shutting:
                        os.close(res)
                    else:
                        self._open_conn(self._adopt(res))
                elif op == STOP and res != -errno.ECANCELED:
                    self.stopping = True
        if self.ctx.stop.is_set():
            self.stopping = True
        if self.tick and now >= self.next_sweep and not self.draining:
            self.next_sweep = now + self.tick
            self._sweep(now)
            self._sync()
        self.steps += 1
        if not self.steps & 63:
            self._sync()

    def _sync(self) -> None:
        cs, extra = self.cstats, self.ctx.stats.extra
        for k in ("entries", "sqes", "cqes", "cq_overflows", "blocking_waits", "empty_waits"):
            extra[k] = getattr(cs, k)
        extra.update(self.extra)
        extra["cqes_per_entry"] = round(cs.cqes / (cs.entries or 1), 3)
        extra["sqes_per_entry"] = round(cs.sqes / (cs.entries or 1), 3)
        if self.sqpoll_stat:
            extra["sqpoll_cpu_ns"] = sqpoll_cpu_ns(self.sqpoll_stat)

    def _sweep(self, now: float) -> None:
        idle, hdr = self.idle, self.hdr
        for c in list(self.conns.values()):
            if c.dead or c.closing:
                continue
            age = now - c.last
            if idle and age >= idle:
                self.extra["idle_timeouts"] += 1
                self._kill(c, False)
            elif hdr and age >= hdr and c.proto.partial:
                self.extra["header_timeouts"] += 1
                self._kill(c, False)

    # -- accept -------------------------------------------------------------------------

    def _arm_accept(self, i: int) -> None:
        self.lib.uc_raw_accept(self.core, self.lis[i].fileno(), (i << 8) | ACCEPT, self.multishot)
        self.accept_armed.add(i)

    def _arm_handoff(self) -> None:
        self.lib.uc_raw_poll(self.core, self.handoff.fileno(), HANDOFF)
        self.handoff_armed = True

    def _on_handoff(self, res: int) -> None:
        self.handoff_armed = False
        self.extra["handoff_wakeups"] += res != -errno.ECANCELED
        if self.shutting:
            return
        self._take_handoffs()   # while draining: the drain's last look, not a wakeup
        if not self.draining and not self.handoff_closed:
            self._arm_handoff()

    def _take_handoffs(self) -> None:
        while True:
            batch = receive_handoffs(self.handoff)
            self.extra["handoffs"] += len(batch.fds)
            if batch.lost and not self.extra["handoff_lost"]:
                log.warning("worker %d (%s): out of fds, connections handed over were lost "
                            "(handoff_lost)", self.ctx.index, self.name)
            self.extra["handoff_lost"] += batch.lost
            for fd in batch.fds:
                self._open_conn(self._adopt(fd))
            if batch.closed:
                self.handoff_closed = True  # the acceptor is gone: do not re-arm the poll
                return
            if len(batch.fds) + batch.lost < HANDOFF_BATCH:
                return

    def _on_accept(self, i: int, res: int, fl: int) -> None:
        stats = self.ctx.stats
        stats.listen_wakeups += res != -errno.ECANCELED  # our own cancel at stop is no wakeup
        if res >= 0 and self.shutting:
            os.close(res)
        elif res >= 0:
            lsock = self.lis[i]
            self._open_conn(socket.socket(lsock.family, lsock.type, lsock.proto, fileno=res))
            self.backoff = self.ctx.limits.accept_backoff
        elif res == -errno.EAGAIN:
            self.extra["accept_eagain"] += 1   # not produced by 6.x kernels: see uring.py
        elif res != -errno.ECANCELED:
            self.extra["accept_errors"] += 1
            if -res not in ACCEPT_ONE_LOST and i not in self.paused_lis:
                # Re-arming now would fail now (out of fds, or the listener unusable):
                # pause, retry after a back-off.
                if self.backoff == self.ctx.limits.accept_backoff:
                    log.warning("worker %d (%s): accept failed: %s; pausing the listener",
                                self.ctx.index, self.name, os.strerror(-res))
                self.extra["accept_backoffs"] += 1
                self.paused_lis[i] = time.monotonic() + self.backoff
                self.backoff = min(ACCEPT_BACKOFF_MAX, self.backoff * 2)
                if fl & F_MORE:
                    self.lib.uc_raw_cancel(self.core, (i << 8) | ACCEPT, CANCEL)
        if not fl & F_MORE:
            self.accept_armed.discard(i)
            if not self.draining and i not in self.paused_lis:
                self._arm_accept(i)
            elif not self.shutting:
                self._accept_backlog(self.lis[i])

    def _adopt(self, fd: int) -> socket.socket:
        """A socket object for a handed-over fd.  ``socket.socket(fileno=fd)`` alone asks
        the kernel for its family, type and protocol (three syscalls); every handed-over
        socket comes from the same listener, so they are asked once per worker."""
        if self.sock_kind is None:
            probe = socket.socket(fileno=fd)
            self.sock_kind = (probe.family, probe.type, probe.proto)
            return probe
        return socket.socket(*self.sock_kind, fileno=fd)

    def _ring_failed(self, rc: int) -> None:
        raise OSError(-rc, f"worker {self.ctx.index} ({self.name}): io_uring failed: "
                           f"{os.strerror(-rc)}")

    def _accept_backlog(self, lsock) -> None:
        while True:
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(True)  # like ring-accepted sockets; reads use MSG_DONTWAIT
            self._open_conn(sock)

    def _open_conn(self, sock) -> None:
        stats = self.ctx.stats
        stats.accepted += 1  # as every backend counts it: taken, whether kept or refused
        if len(self.conns) >= self.ctx.limits.max_connections:
            stats.refused += 1
            sock.close()
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        cid = self.next_cid
        self.next_cid += 1  # never reused: a late CQE can only name its own connection
        c = self.conns[cid] = Conn(cid, sock, self.ctx.protocol_factory())
        stats.open += 1
        if self.draining:
            self._read_remaining(c)
        else:
            self._arm_recv(c)

    # -- receive --------------------------------------------------------------------------

    def _arm_recv(self, c: Conn) -> None:
        self.lib.uc_raw_recv(self.core, c.fd, (c.cid << 8) | RECV)
        c.recv_armed = True

    def _on_recv(self, c: Conn, res: int, fl: int) -> None:
        lib = self.lib
        if fl & F_BUFFER:
            bid = fl >> BUF_SHIFT
            if res > 0 and not c.dead and not c.closing:
                self._feed(c, bid, res)
            else:
                lib.uc_raw_recycle(self.core, bid)
        if fl & F_MORE:
            return
        c.recv_armed = c.recv_cancel = False
        if c.dead:
            self._release(c)
        elif res == 0:
            c.eof = c.reading = False
            self._on_eof(c)
        elif res == -errno.ENOBUFS:
            self.extra["enobufs"] += 1
            if self.draining:
                self._read_remaining(c)
            else:
                self.starved[c] = None
        elif res < 0 and res != -errno.ECANCELED:
            self._kill(c, True)
        elif self.draining and not c.closing:
            if c.paused:
                self._finish(c)
            else:
                self._read_remaining(c)
        elif c.reading and not c.closing:
            self._arm_recv(c)

    def _feed(self, c: Conn, bid: int, n: int) -> None:
        stats = self.ctx.stats
        off = bid * self.bufsize
        data = self.pool[off:off + n]
        stats.bytes_in += n
        try:
            out, k = c.proto.feed(data)
        except Exception:  # noqa: BLE001
            data.release()
            stats.handler_errors += 1
            log.exception("worker %d (%s): protocol %s failed on connection id %d fd %d; "
                          "closing that connection only", self.ctx.index, self.name,
                          type(c.proto).__name__, c.cid, c.fd)
            self.lib.uc_raw_recycle(self.core, bid)
            self._kill(c, True)
            return
        stats.requests += k
        # The provided buffer itself is sent (no copy) only while nothing is queued before
        # it and the ring keeps a quarter in reserve: a slow reader's stuck send pins one
        # buffer at most, and slow readers together never take the ring's last quarter.
        if (out is data and c.inflight is None and not c.out and bid < self.nbufs
                and self.lent + 1 <= self.nbufs - self.nbufs // 4):
            self.extra["zc_sends"] += 1
            self.lent += 1
            self._submit(c, self.base + off, n, bid)  # the provided buffer itself
        else:
            if out:
                self._queue(c, out)  # copies, then the buffer can go back
            self.lib.uc_raw_recycle(self.core, bid)
        # A protocol that kept its view would read a buffer the kernel is rewriting:
        # released, any later use raises (a handler error on that connection).
        try:
            data.release()
        except BufferError:
            stats.handler_errors += 1
            log.error("worker %d (%s): protocol %s kept the buffer it was fed; closing "
                      "connection id %d", self.ctx.index, self.name, type(c.proto).__name__,
                      c.cid)
            self._kill(c, True)
            return
        if c.proto.closing:
            self._finish(c)

    def _read_remaining(self, c: Conn) -> None:
        """Drain: what the peer sent before stop, read synchronously (bounded)."""
        stats = self.ctx.stats
        for _ in range(64):
            if c.dead or c.closing:
                return
            try:
                data = c.sock.recv(self.bufsize, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._kill(c, True)
                return
            if not data:
                self._on_eof(c)
                return
            stats.bytes_in += len(data)
            try:
                out, k = c.proto.feed(data)
            except Exception:  # noqa: BLE001
                stats.handler_errors += 1
                log.exception("worker %d (%s): protocol %s failed on connection id %d; "
                              "closing that connection only", self.ctx.index, self.name,
                              type(c.proto).__name__, c.cid)
                self._kill(c, True)
                return
            stats.requests += k
            if out:
                self._queue(c, out)
        self._finish(c)

    def _on_eof(self, c: Conn) -> None:
        try:
            out = c.proto.eof()
        except Exception:  # noqa: BLE001
            self.ctx.stats.handler_errors += 1
            log.exception("worker %d (%s): protocol %s failed at EOF on connection id %d; "
                          "closing that connection only", self.ctx.index, self.name,
                          type(c.proto).__name__, c.cid)
            self._kill(c, True)
            return
        if out:
            self._queue(c, out)
        self._finish(c)

    # -- send -------------------------------------------------------------------------------

    def _queue(self, c: Conn, out) -> None:
        if c.dead:
            return
        self.extra["copied_sends"] += 1
        c.out += out
        pending = len(c.out) + (c.inflight[1] - c.off if c.inflight is not None else 0)
        if pending > self.extra["max_pending"]:
            self.extra["max_pending"] = pending
        if c.inflight is None:
            self._send_queued(c)
        if c.reading and len(c.out) > self.ctx.limits.max_output:
            c.reading, c.paused = False, True   # backpressure: stop the multishot recv
            self.ctx.stats.backpressure += 1
            self._cancel_recv(c)

    def _send_queued(self, c: Conn) -> None:
        data = bytes(c.out)
        c.out.clear()
        self._submit(c, data, len(data), -1)

    def _submit(self, c: Conn, buf, n: int, bid: int) -> None:
        c.inflight, c.off, c.bid = (buf, n), 0, bid
        self.lib.uc_raw_send(self.core, c.fd, buf, n, (c.cid << 8) | SEND)

    def _on_send(self, c: Conn, res: int) -> None:
        buf, n = c.inflight
        if c.dead or res <= 0:
            self._recycle_inflight(c)
            if c.dead:
                self._release(c)
            else:
                self._kill(c, res != -errno.ECANCELED)
            return
        self.ctx.stats.bytes_out += res
        c.off += res
        if c.off < n:   # partial: the rest, from where it stopped
            self.extra["partial_sends"] += 1
            rest = n - c.off
            ptr = (self.ffi.from_buffer(buf) if c.bid < 0 else buf) + c.off  # buf stays pinned
            self.lib.uc_raw_send(self.core, c.fd, ptr, rest, (c.cid << 8) | SEND)
            return
        self._recycle_inflight(c)
        if c.out:
            self._send_queued(c)
        elif c.closing:
            self._kill(c, False)
            return
        if c.paused and not c.closing and len(c.out) <= self.ctx.limits.max_output // 2:
            c.paused, c.reading = False, True
            if not self.draining and not c.recv_armed:
                self._arm_recv(c)

    def _recycle_inflight(self, c: Conn) -> None:
        if c.bid >= 0:
            self.lent -= 1
            self.lib.uc_raw_recycle(self.core, c.bid)
        c.inflight, c.bid = None, -1

    # -- close and drain -------------------------------------------------------------------

    def _cancel_recv(self, c: Conn) -> None:
        if c.recv_armed and not c.recv_cancel:
            self.lib.uc_raw_cancel(self.core, (c.cid << 8) | RECV, CANCEL)
            c.recv_cancel = True

    def _finish(self, c: Conn) -> None:
        if c.dead:
            return
        c.closing, c.reading = True, False
        self._cancel_recv(c)
        if c.inflight is None and not c.out:
            self._kill(c, False)

    def _kill(self, c: Conn, error: bool) -> None:
        if c.dead:
            return
        c.dead, c.reading, c.error = True, False, error
        self._cancel_recv(c)
        if c.inflight is not None:
            self.lib.uc_raw_cancel(self.core, (c.cid << 8) | SEND, CANCEL)
        self._release(c)

    def _release(self, c: Conn) -> None:
        if c.recv_armed or c.inflight is not None or c.cid not in self.conns:
            return  # the kernel still holds an operation: wait for its final CQE
        del self.conns[c.cid]
        c.sock.close()
        stats = self.ctx.stats
        stats.open -= 1
        stats.closed += 1
        stats.errors += c.error

    def _drain(self) -> None:
        self.draining = True
        lib = self.lib
        for i in list(self.accept_armed):
            lib.uc_raw_cancel(self.core, (i << 8) | ACCEPT, CANCEL)
        for i in list(self.paused_lis):   # paused (out of fds): take the backlog now
            self._accept_backlog(self.lis[i])
        self.paused_lis.clear()
        if self.handoff_armed:   # its final CQE takes what is waiting
            lib.uc_raw_cancel(self.core, HANDOFF, CANCEL)
        elif self.handoff is not None:
            self._take_handoffs()
        for c in list(self.conns.values()):
            if c.dead or c.closing:
                continue
            if c.recv_armed:
                self._cancel_recv(c)
            elif c.paused:
                self._finish(c)
            else:
                self._read_remaining(c)
        self._step(0)   # msg-ring: what the dispatcher posted before it stopped becomes CQEs now
        deadline = time.monotonic() + self.ctx.limits.drain_timeout
        while (self.conns or self.accept_armed or self.handoff_armed) and time.monotonic() < deadline:
            self._step(max(1, int((deadline - time.monotonic()) * 1000)))

    def _shutdown(self) -> None:
        self.draining = self.shutting = True
        lib = self.lib
        for i in list(self.accept_armed):
            lib.uc_raw_cancel(self.core, (i << 8) | ACCEPT, CANCEL)
        lib.uc_raw_cancel(self.core, STOP, CANCEL)
        if self.handoff_armed:
            lib.uc_raw_cancel(self.core, HANDOFF, CANCEL)
        for c in list(self.conns.values()):
            self._kill(c, False)
        deadline = time.monotonic() + 2.0
        try:
            while lib.uc_inflight(self.core) > 0 and time.monotonic() < deadline:
                self._step(max(1, int((deadline - time.monotonic()) * 1000)))
        except OSError:
            pass   # the ring failed (the error is already on its way up): free what we can
        self._sync()
        self._refresh_switches()
        self.ctx.stats.refresh = None
        self.pool.release()
        if lib.uc_free(self.core):
            log.warning("worker %d: io_uring operations still in flight at exit; "
                        "buffer pool leaked rather than freed", self.ctx.index)
