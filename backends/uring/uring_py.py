"""``uring-py``: the same io_uring design as ``uring``, every completion handled in Python.

It holds a ``Ring`` (backends/uring/ring.py: ring setup, provided buffer ring, SQE
preparation) and uses only its raw calls: Python reaps each CQE, decodes its user_data,
recycles buffers, re-arms recv and accept, tracks sends and closes.  It exists to
measure what moving those per-completion mechanics into C (``uring``) buys, so it is
composed with the ring rather than derived from ``uring``'s loop, and its semantics are
``uring``'s (see that docstring), written as plainly as possible rather than fast:

* one send in flight per connection, the rest queued in a bytearray (the received
  buffer is sent without a copy when nothing is queued and a quarter of the ring stays
  free; otherwise it is copied and recycled at once);
* close = cancel the connection's operations, wait for their final CQEs, close;
* drain = cancel accepts and take the backlog synchronously, cancel each recv, then
  read what the peer already sent with MSG_DONTWAIT, answer, flush, close;
* ``--accept dispatch``: a poll on ``ctx.handoff``, re-armed after each completion; the
  fds are taken by core/handoff.py's ``HandoffReceiver`` (until EAGAIN, counted, a loss
  logged once per episode) and adopted like accepted sockets; with ``--uring-handoff
  msg-ring`` each fd arrives as a CQE of its own (see ``uring``'s docstring).

The rules are the Python loops' own objects, called as readiness.py calls them:
core/policy.py's ``ConnectionPolicy`` (feed progress for the request deadline,
backpressure marks over the output not yet taken by the kernel - queued plus the rest of
the send in flight -, finish, EOF, handler failure, the idle and request deadlines at
the coarse tick), core/accept.py's ``AcceptPacer`` (an accept completion that failed for
any reason but a lost connection pauses that listener, not re-armed, for the pacer's
back-off: re-arming at once would fail at once, a spin through the ring) and
core/stats.py's counter schema, to which only this backend's own counters are added.

Several addresses: one accept armed per listener, with no limit of its own
(``max_listeners`` None: the C core holds no listener for it); each connection is served
by ``ctx.protocols[listener id]`` and counted in ``stats.per_listener`` - the id of the
accepting listener, the hand-off's byte (``HandoffReceiver``) or, with msg-ring, the
tag of its CQE.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from parallelnet.backends.uring.ring import IoUringBackend, Ring, UringOptions
from parallelnet.core.accept import ACCEPT_ONE_LOST, AcceptPacer, accept_pending
from parallelnet.core.handoff import HandoffReceiver, adopt
from parallelnet.core.policy import (
    CLOSE, DRAIN_READS, RESUME, ConnectionPolicy, ConnState, tracks_requests,
)

ACCEPT, RECV, SEND, STOP, CANCEL, HANDOFF = 1, 2, 3, 4, 5, 6
MSG = 7   # posted by the dispatcher's IORING_OP_MSG_RING (--uring-handoff msg-ring): res = fd
F_BUFFER, F_MORE, BUF_SHIFT = 1, 2, 16
BATCH = 1024
#: An accept completion with one of these lost that connection only: re-armed at once.
ACCEPT_LOST_ONE = ACCEPT_ONE_LOST | {errno.EINTR}
#: This backend's own counters, beside core/stats.py's EXTRA_COUNTERS.
OWN_EXTRA = ("enobufs", "zc_sends", "copied_sends", "partial_sends", "handoff_wakeups",
             "msg_handoffs", "accept_eagain")


class Conn(ConnState):
    __slots__ = ("cid", "sock", "fd", "proto", "out", "inflight", "off", "bid", "recv_armed",
                 "recv_cancel", "dead", "error")

    def __init__(self, cid, sock, proto, now: float):
        self.cid, self.sock, self.fd, self.proto = cid, sock, sock.fileno(), proto
        self.out = bytearray()      # queued output (not yet handed to the kernel)
        self.inflight = None        # (object or pool pointer, length) the kernel is sending from
        self.off, self.bid = 0, -1
        self.recv_armed = self.recv_cancel = self.dead = self.error = False
        self.init_state(now)

    def pending(self) -> int:
        """Output the kernel has not taken: queued, plus the rest of the send in flight."""
        return len(self.out) + (self.inflight[1] - self.off if self.inflight is not None else 0)


class UringPyBackend(IoUringBackend):
    name = "uring-py"
    description = "io_uring, every completion handled in Python (to measure the C core)"
    max_listeners = None

    def run(self) -> None:
        ctx = self.ctx
        opts = UringOptions.of(ctx.options)
        self.ring = ring = Ring(ctx, opts, self.name, raw=True)
        self.ffi, self.lib, self.core, self.who = ring.ffi, ring.lib, ring.core, ring.who
        self.ud = self.ffi.new("uint64_t[]", BATCH)
        self.res = self.ffi.new("int32_t[]", BATCH)
        self.fl = self.ffi.new("uint32_t[]", BATCH)
        self.base = self.lib.uc_pool(self.core)
        self.nbufs = opts.buffers
        self.conns: dict[int, Conn] = {}
        self.next_cid = 1
        self.starved: dict[Conn, None] = {}   # ordered: re-armed first come, first served
        self.draining = self.stopping = self.shutting = False
        self.lis = dict(enumerate(ctx.listeners))
        self.accept_armed = set()
        self.extra = extra = ctx.stats.extra
        extra.update(dict.fromkeys(OWN_EXTRA, 0))
        self.lent = 0                 # provided buffers held by sends (the reserve's measure)
        self.now = time.monotonic()
        self.policy = ConnectionPolicy(ctx.limits, ctx.stats, self.who, self.now)
        self.factories = [p.factory for p in ctx.protocols]   # by listener id
        self.per_listener = ctx.stats.per_listener
        self.track = any(tracks_requests(f()) for f in self.factories)
        self.pacer = AcceptPacer(ctx.limits.accept_backoff, extra, self.who)
        self.paused_lis: dict[int, float] = {}   # listener index -> resume time (back-off)
        self.receiver = (HandoffReceiver(ctx.handoff, extra, self.who)
                         if ctx.handoff is not None else None)
        self.handoff_armed = self.handoff_closed = False
        self.kinds: dict = {}   # listener id -> socket kind of msg-ring hand-offs (adopt)
        ctx.stats.refresh = self._refresh
        self.lib.uc_raw_poll(self.core, ctx.stop.fileno(), STOP)
        for i in self.lis:
            self._arm_accept(i)
        if self.receiver is not None:
            self._arm_handoff()
        self.lib.uc_submit(self.core)
        ctx.stats.mark_ready()
        try:
            while not self.stopping:
                self._step(-1)
            self._drain()
        finally:
            self._shutdown()

    def _refresh(self) -> None:
        """WorkerStats.refresh (the snapshot's thread): the ring's own C counters."""
        self.ring.sync_ring()
        self.ring.refresh_switches()

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
            policy = self.policy
            if policy.tick and self.conns:   # the coarse timer, only while something can time out
                left = max(1, int((policy.next_sweep - self.now) * 1000) + 1)
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
            raise self.ring.error(n)
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
                elif op == MSG:   # cid: the listener id the dispatcher tagged it with
                    self.extra["handoffs"] += 1
                    self.extra["msg_handoffs"] += 1
                    if self.shutting or cid >= len(self.factories):
                        os.close(res)
                    else:
                        self._open_conn(adopt(res, cid, self.kinds), cid)
                elif op == STOP and res != -errno.ECANCELED:
                    self.stopping = True
        if self.ctx.stop.is_set():
            self.stopping = True
        if not self.draining and self.policy.due(now):
            expired = self.policy.expired
            for c in list(self.conns.values()):
                if not c.dead and expired(c, now):
                    self._kill(c, False)

    # -- accept -------------------------------------------------------------------------

    def _arm_accept(self, i: int) -> None:
        self.lib.uc_raw_accept(self.core, self.lis[i].fileno(), (i << 8) | ACCEPT,
                               self.ring.multishot)
        self.accept_armed.add(i)

    def _arm_handoff(self) -> None:
        self.lib.uc_raw_poll(self.core, self.ctx.handoff.fileno(), HANDOFF)
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
        pairs, closed = self.receiver.take()
        for sock, lid in pairs:
            self._open_conn(sock, lid)
        if closed:
            self.handoff_closed = True  # the acceptor is gone: do not re-arm the poll

    def _on_accept(self, i: int, res: int, fl: int) -> None:
        lid = self.ctx.listener_ids[i]
        woke = res != -errno.ECANCELED   # our own cancel at stop is no wakeup
        self.ctx.stats.listen_wakeups += woke
        self.per_listener[lid].listen_wakeups += woke
        if res >= 0 and self.shutting:
            os.close(res)
        elif res >= 0:
            lsock = self.lis[i]   # the listener's kind: no probing syscalls for the new socket
            self._open_conn(socket.socket(lsock.family, lsock.type, lsock.proto, fileno=res), lid)
            self.pacer.succeeded()
        elif res == -errno.EAGAIN:
            self.extra["accept_eagain"] += 1   # not produced by 6.x kernels: see ring.py
        elif res != -errno.ECANCELED:
            self.extra["accept_errors"] += 1
            if -res not in ACCEPT_LOST_ONE and i not in self.paused_lis:
                # Re-arming now would fail now (out of fds, or the listener unusable).
                delay = self.pacer.failed(OSError(-res, os.strerror(-res)))
                self.paused_lis[i] = time.monotonic() + delay
                if fl & F_MORE:
                    self.lib.uc_raw_cancel(self.core, (i << 8) | ACCEPT, CANCEL)
        if not fl & F_MORE:
            self.accept_armed.discard(i)
            if not self.draining and i not in self.paused_lis:
                self._arm_accept(i)
            elif not self.shutting:
                self._accept_backlog(i)

    def _accept_backlog(self, i: int) -> None:
        accepted, _ = accept_pending(self.lis[i], self.extra, self.who)
        for sock, _peer in accepted:
            sock.setblocking(True)  # like ring-accepted sockets; reads use MSG_DONTWAIT
            self._open_conn(sock, self.ctx.listener_ids[i])

    def _open_conn(self, sock, lid: int) -> None:
        stats = self.ctx.stats
        stats.accepted += 1  # as every backend counts it: taken, whether kept or refused
        self.per_listener[lid].accepted += 1
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
        c = self.conns[cid] = Conn(cid, sock, self.factories[lid](), self.now)
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
        if fl & F_BUFFER:
            bid = fl >> BUF_SHIFT
            if res > 0 and not c.dead and not c.closing:
                self._on_data(c, bid, res)
            else:
                self.lib.uc_raw_recycle(self.core, bid)
        if fl & F_MORE:
            return
        c.recv_armed = c.recv_cancel = False
        if c.dead:
            self._release(c)
        elif res == 0:
            if not c.closing:
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
            if c.reading:
                self._read_remaining(c)
            else:
                self._finish(c)   # paused: it finishes with what it has (rule drain)
        elif c.reading and not c.closing:
            self._arm_recv(c)

    def _feed(self, c: Conn, data):
        """Rules feed, handler-failure and request-deadline: the protocol's output for ``data``, or None if it failed
        (then the connection is being closed)."""
        stats = self.ctx.stats
        stats.bytes_in += len(data)
        proto = c.proto
        try:
            out, k = proto.feed(data)
        except Exception:  # noqa: BLE001 - a handler bug closes one connection only
            self.policy.handler_failed(proto, _where(c))
            self._kill(c, True)
            return None
        stats.requests += k
        if self.track and (c.req_start or proto.partial):
            self.policy.progress(c, proto, k, len(data), self.now)
        return out

    def _on_data(self, c: Conn, bid: int, n: int) -> None:
        off = bid * self.ring.bufsize
        data = self.ring.pool[off:off + n]
        out = self._feed(c, data)
        if out is None:
            data.release()
            self.lib.uc_raw_recycle(self.core, bid)
            return
        # The provided buffer itself is sent (no copy) only while nothing is queued before
        # it and the ring keeps a quarter in reserve: a slow reader's stuck send pins one
        # buffer at most, and slow readers together never take the ring's last quarter.
        if (out is data and c.inflight is None and not c.out and bid < self.nbufs
                and self.lent + 1 <= self.nbufs - self.nbufs // 4):
            self.extra["zc_sends"] += 1
            self.lent += 1
            self._submit(c, self.base + off, n, bid)  # the provided buffer itself
            self._queued(c)
        else:
            if out:
                self._queue(c, out)  # copies, then the buffer can go back
            self.lib.uc_raw_recycle(self.core, bid)
        # A protocol that kept its view would read a buffer the kernel is rewriting:
        # released, any later use raises (a handler error on that connection).
        try:
            data.release()
        except BufferError:   # it holds an export of the view: the same breach
            self.policy.handler_failed(c.proto, _where(c))
            self._kill(c, True)
            return
        if c.proto.closing:
            self._finish(c)
        elif c.proto.more and not c.dead:
            self._hold(c)

    def _hold(self, c: Conn) -> None:
        """Rule held-answers: the protocol holds answers: stop the multishot recv, pull."""
        if self.policy.hold(c):
            self._cancel_recv(c)
        self._pull(c)

    def _pull(self, c: Conn) -> None:
        """Rule held-answers: pull held answers while the output not yet taken is at or below the
        low mark (at most max_output bytes per call; the next send completion goes on)."""
        policy, proto = self.policy, c.proto
        produced = 0
        while proto.more and c.pending() <= policy.low and produced <= policy.high:
            try:
                out, k = proto.pull()
            except Exception:  # noqa: BLE001 - a handler bug closes one connection only
                self.policy.handler_failed(proto, _where(c))
                self._kill(c, True)
                return
            self.ctx.stats.requests += k
            if out:
                produced += len(out)
                self._queue(c, out)
            if c.dead:
                return
        if proto.more:
            return   # a send is in flight (each pull queued output): its completion pulls on
        action = policy.released(c, c.pending())
        if proto.closing and not c.closing:
            self._finish(c)
        elif action == CLOSE:
            self._kill(c, False)
        elif action == RESUME and not self.draining and not c.recv_armed:
            self._arm_recv(c)

    def _read_remaining(self, c: Conn) -> None:
        """Drain: what the peer sent before stop, read synchronously (rule drain's bound)."""
        for _ in range(DRAIN_READS):
            if c.dead or c.closing:
                return
            if not c.reading:
                break   # paused by what it was answered: it finishes with that
            try:
                data = c.sock.recv(self.ring.bufsize, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._kill(c, True)
                return
            if not data:
                self._on_eof(c)
                return
            out = self._feed(c, data)
            if out is None:
                return
            if out:
                self._queue(c, out)
        self._finish(c)

    def _on_eof(self, c: Conn) -> None:
        out = self.policy.eof(c.proto, _where(c))
        if out is None:
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
        if c.inflight is None:
            self._send_queued(c)
        self._queued(c)

    def _queued(self, c: Conn) -> None:
        """Rule backpressure: past the high mark, stop the multishot recv (it would keep completing)."""
        if self.policy.queued(c, c.pending()):
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
            ptr = (self.ffi.from_buffer(buf) if c.bid < 0 else buf) + c.off  # buf stays pinned
            self.lib.uc_raw_send(self.core, c.fd, ptr, n - c.off, (c.cid << 8) | SEND)
            return
        self._recycle_inflight(c)
        if c.out:
            self._send_queued(c)
        if c.held:
            if c.pending() <= self.policy.low:
                self._pull(c)
            return
        action = self.policy.sent(c, c.pending())
        if action == CLOSE:
            self._kill(c, False)
        elif action == RESUME and not self.draining and not c.recv_armed:
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
        """Rule finish: read nothing more, close once the output is flushed."""
        if c.dead:
            return
        self._cancel_recv(c)
        if self.policy.finish(c, c.pending()) == CLOSE:
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
            self._accept_backlog(i)
        self.paused_lis.clear()
        if self.handoff_armed:   # its final CQE takes what is waiting
            lib.uc_raw_cancel(self.core, HANDOFF, CANCEL)
        elif self.receiver is not None and not self.handoff_closed:
            self._take_handoffs()
        for c in list(self.conns.values()):
            if c.dead or c.closing:
                continue
            if c.recv_armed:
                self._cancel_recv(c)
            elif not c.reading:
                self._finish(c)   # paused
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
        self.ring.free()


def _where(c: Conn) -> str:
    return f"id {c.cid} fd {c.fd}"
