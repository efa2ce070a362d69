"""``--accept dispatch``: one acceptor hands each connection to a worker it chooses.

The seed has no active load balancing: whoever wins the accept race serves the
connection.  Here a single acceptor thread owns the listening sockets (one per address,
all in its one epoll) and picks the worker by a policy, then passes the connected socket,
with the listener id of the address it came in on, over a per-worker channel:

* channel: an ``AF_UNIX``/``SOCK_SEQPACKET`` socketpair per worker; the socket travels
  as ``SCM_RIGHTS`` ancillary data (the kernel installs a new fd in the receiver; the
  acceptor then closes its own).  One mechanism for threads and forked workers alike:
  in thread mode the duplicate-then-close costs two extra syscalls per connection,
  which the accept experiment measures as part of the dispatcher's price.
* the worker watches its end like a listener: readable means "connections waiting";
  it takes them with ``recvmsg`` until ``EAGAIN`` (see ``receive_handoffs``).  A worker
  out of fds cannot receive one: the kernel drops it (``MSG_CTRUNC``), counted by the
  worker as ``handoff_lost``.
* policies: ``round-robin``; ``least-connections`` — fewest connections handed over and
  not yet closed, from the workers' own ``closed`` counters (live in thread mode; in
  process mode from the 0.25 s snapshots, so the estimate lags a little).
* a backend may bring its own channel into its worker (``Backend.handoff_channel``):
  ``uring --uring-handoff msg-ring`` posts the acceptor's fd straight into the worker's
  completion queue with ``IORING_OP_MSG_RING`` (thread mode: one fd table, so the worker
  adopts the very fd and the acceptor lets go of it without closing it).
* several addresses: the listener id travels with each connection (one byte of the
  message, core/handoff.py), so the worker serves it by that address's protocol and
  counts it as that listener's; a channel that cannot carry it (``carries_listener_id``
  false) is refused for a server of more than one address.
* a full channel (the worker is not taking connections) sends the connection to the
  next worker in policy order; when every channel is full the connection is closed and
  counted as ``overflow`` — a defined behaviour, never a blocked acceptor.

The acceptor is an ordinary Python thread (of the server process in both modes); it
competes for the GIL in thread mode, which is part of what the experiment shows.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import Callable

from parallelnet.core.accept import AcceptPacer, accept_pending
from parallelnet.core.cpus import pin_current_thread
# The channel lives in core/handoff.py; re-exported here, where callers first found it.
from parallelnet.core.handoff import (  # noqa: F401
    HANDOFF_BATCH, Handoffs, SocketChannel, make_channels, receive_handoffs, send_handoff,
)

log = logging.getLogger("parallelnet.dispatch")

POLICIES = ("round-robin", "least-connections")


class DispatcherError(RuntimeError):
    """The acceptor thread could not be armed (a startup error of ``serve``)."""


class Dispatcher:
    """The acceptor thread: accept, choose a worker, hand over."""

    def __init__(self, listeners: list[socket.socket], channels: list,
                 closed_counts: Callable[[], list[int]], policy: str = "round-robin",
                 cpu: int | None = None, backoff: float = 0.05) -> None:
        """``listeners[i]`` is the socket of listener id i."""
        if policy not in POLICIES:
            raise ValueError(f"unknown dispatch policy {policy!r}; known: {', '.join(POLICIES)}")
        self.listeners = list(listeners)
        # A plain socket is the acceptor's end of a socketpair; anything else is a
        # channel object (send(fd[, listener_id]), transfers, kind, close()).
        self.channels = [SocketChannel(c) if isinstance(c, socket.socket) else c for c in channels]
        self._with_id = [bool(getattr(c, "carries_listener_id", False)) for c in self.channels]
        if len(self.listeners) > 1 and not all(self._with_id):
            kinds = sorted({c.kind for c, ok in zip(self.channels, self._with_id) if not ok})
            raise ValueError(f"the {'/'.join(kinds)} hand-off cannot tell a worker which "
                             f"address a connection came in on: it serves one address, "
                             f"not {len(self.listeners)}")
        self.closed_counts = closed_counts
        self.policy = policy
        self.cpu = cpu
        self.handed = [0] * len(channels)
        self.accepted = 0
        self.accepted_per_listener = [0] * len(self.listeners)
        self.overflow = 0
        self.spills = 0         # handed to another worker than the policy's first choice
        self.errors = 0         # accept(2) failures
        self.extra = {"accept_errors": 0, "accept_backoffs": 0}
        self.pacer = AcceptPacer(backoff, self.extra, "dispatcher")
        self._next = 0
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._armed = threading.Event()
        #: Why the acceptor thread ended before it was told to stop (None: it did not).
        self.failure: str | None = None
        self._stopping = False

    def start(self, timeout: float = 5.0) -> None:
        """Start the acceptor thread and return once it is armed (pinned, every listener
        in its epoll).  A thread that cannot get there is a startup error naming the
        reason (``DispatcherError``), never a thread that dies after "listening on"."""
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()
        if not self._armed.wait(timeout):
            raise DispatcherError(f"dispatcher did not start: not armed within {timeout:g} s")
        if self.failure is not None:
            self._thread.join(1.0)
            raise DispatcherError(f"dispatcher did not start: {self.failure}")

    def dead(self) -> str | None:
        """Why the acceptor ended while it should be accepting (None: it has not)."""
        return None if self._stopping else self.failure

    def stop(self) -> None:
        """Stop accepting; hand over what the backlog already holds; return when done."""
        self._stopping = True
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5.0)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        if self._thread is None or not self._thread.is_alive():
            for ch in self.channels:  # never under a send still running
                ch.close()

    def snapshot(self) -> dict:
        return {"policy": self.policy, "accepted": self.accepted, "handed": list(self.handed),
                "accepted_per_listener": list(self.accepted_per_listener),
                "overflow": self.overflow, "spills": self.spills, "errors": self.errors,
                "channel": "/".join(sorted({c.kind for c in self.channels}))}

    def _order(self) -> list[int]:
        n = len(self.channels)
        if self.policy == "least-connections":
            closed = self.closed_counts()
            load = [self.handed[i] - closed[i] for i in range(n)]
            return sorted(range(n), key=lambda i: (load[i], (i - self._next) % n))
        start = self._next
        return [(start + k) % n for k in range(n)]

    def _hand_over(self, fd: int, listener_id: int = 0):
        """Give fd to a worker; returns the channel that took it (None: overflow)."""
        order = self._order()
        self._next = (order[0] + 1) % len(self.channels)
        for rank, i in enumerate(order):
            try:
                if self._with_id[i]:
                    self.channels[i].send(fd, listener_id)
                else:
                    self.channels[i].send(fd)
            except BlockingIOError:
                continue
            except OSError as exc:  # the worker's end is gone: try another
                self.errors += 1
                log.warning("dispatch to worker %d failed: %s", i, exc)
                continue
            self.handed[i] += 1
            self.spills += rank > 0
            return self.channels[i]
        self.overflow += 1  # every worker's channel is full: refuse rather than block
        return None

    def _accept_all(self, listener_id: int) -> OSError | None:
        """Accept until EAGAIN from one listener and hand each over; the resource error
        that stopped it, if any."""
        accepted, exhausted = accept_pending(self.listeners[listener_id], self.extra, "dispatcher")
        self.errors = self.extra["accept_errors"]
        for conn, _ in accepted:
            self.accepted += 1
            self.accepted_per_listener[listener_id] += 1
            fd = conn.detach()
            taken = self._hand_over(fd, listener_id)
            if taken is None or not taken.transfers:
                os.close(fd)
        if accepted:
            self.pacer.succeeded()
        return exhausted

    def _run(self) -> None:
        # Every failure is kept in ``failure`` (start() raises it, serve reports it in one
        # line), never left to the thread's default traceback.
        ep = None
        try:
            if self.cpu is not None:
                try:
                    pin_current_thread(self.cpu)
                except OSError as exc:
                    self.failure = f"cannot pin it to CPU {self.cpu}: {exc.strerror or exc}"
                    return
            ep = select.epoll()
            self._loop(ep)
        except BaseException as exc:  # noqa: BLE001 - reported by start() or serve
            self.failure = f"{type(exc).__name__}: {exc}"
            log.debug("dispatcher failed", exc_info=True)
        finally:
            if ep is not None:
                ep.close()
            self._armed.set()   # start() may be waiting: it reads failure

    def _loop(self, ep) -> None:
        ids = {s.fileno(): i for i, s in enumerate(self.listeners)}
        # Out of fds: a listener is unwatched until its back-off ends (level-triggered, it
        # would report the same unacceptable connection at once, forever).
        paused: dict[int, float] = {}      # fd -> when to watch it again
        for fd in ids:
            ep.register(fd, select.EPOLLIN)
        ep.register(self._stop_r, select.EPOLLIN)
        self._armed.set()
        while True:
            timeout = max(0.0, min(paused.values()) - time.monotonic()) if paused else -1
            events = ep.poll(timeout)
            if any(fd == self._stop_r for fd, _ in events):
                break
            now = time.monotonic()
            for fd, when in list(paused.items()):
                if now >= when:
                    del paused[fd]
                    ep.register(fd, select.EPOLLIN)
            for fd, _ in events:
                if fd not in ids or fd in paused:
                    continue
                exhausted = self._accept_all(ids[fd])
                if exhausted is not None:
                    ep.unregister(fd)
                    paused[fd] = time.monotonic() + self.pacer.failed(exhausted)
        for i in range(len(self.listeners)):
            self._accept_all(i)  # the backlog the kernel already completed
