"""The hand-off channel of ``--accept dispatch``: the acceptor's end and the worker's end.

Kernel semantics relied on:

* an ``AF_UNIX``/``SOCK_SEQPACKET`` socketpair per worker keeps message boundaries:
  one message = one connection, its fd travelling as ``SCM_RIGHTS`` ancillary data
  and its one byte of data the *listener id* (which address it came in on: the worker
  serves it by that address's protocol).  The kernel installs a new fd in the receiver
  (the sender then closes its own).  The C cores read the byte in C the same way.
* the worker's end is readable while messages wait; ``recvmsg`` takes one at a time
  until ``EAGAIN``.
* out of fds (``EMFILE``/``ENFILE``), the kernel cannot install the passed fd:
  ``recvmsg`` consumes the message anyway and sets ``MSG_CTRUNC`` - that connection is
  lost (the kernel closes it).  Counted as ``handoff_lost``.
* the acceptor closing its end makes the worker's end readable with a zero-length
  message (EOF): a level-triggered loop must stop watching it, or it would spin.

``HandoffReceiver`` is the worker side every Python loop uses; the C cores follow the
same counting and logging rule.
"""

from __future__ import annotations

import array
import logging
import socket
from typing import NamedTuple

HANDOFF_BATCH = 64  # connections taken per recvmsg round
_FD_SIZE = array.array("i").itemsize
_HANDOFF_SPACE = socket.CMSG_SPACE(_FD_SIZE)

log = logging.getLogger("parallelnet.worker")


def make_channels(n: int) -> list[tuple[socket.socket, socket.socket]]:
    """(acceptor end, worker end) per worker, both non-blocking."""
    pairs = []
    for _ in range(n):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        b.setblocking(False)
        pairs.append((a, b))
    return pairs


class SocketChannel:
    """The acceptor's end of one worker's socketpair: every backend's channel.

    ``send(fd, listener_id)`` passes a duplicate (``SCM_RIGHTS``) and the listener id
    (one byte); raises BlockingIOError when the channel is full, OSError when the
    worker's end is gone.  ``transfers`` is False: the acceptor still owns its fd
    afterwards and closes it.  ``carries_listener_id``: a channel without it takes
    ``send(fd)`` only, and can serve a server of one address only.
    """

    kind = "scm"
    transfers = False
    carries_listener_id = True

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, fd: int, listener_id: int = 0) -> None:
        self.sock.sendmsg([bytes((listener_id,))],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])

    def close(self) -> None:
        pass  # the server owns the socketpair


def send_handoff(channel: socket.socket, conn: socket.socket, listener_id: int = 0) -> None:
    """Pass one connected socket; raises BlockingIOError when the channel is full."""
    SocketChannel(channel).send(conn.fileno(), listener_id)


class Handoffs(NamedTuple):
    fds: list[int]     # new connections, now ours
    lost: int          # messages whose fd the kernel could not install (MSG_CTRUNC)
    closed: bool       # the acceptor closed its end: stop watching the channel
    ids: list[int]     # parallel to fds: the listener id each came in on


def receive_handoffs(channel: socket.socket, limit: int = HANDOFF_BATCH) -> Handoffs:
    """Take up to ``limit`` waiting connections without blocking."""
    fds: list[int] = []
    ids: list[int] = []
    lost = 0
    for _ in range(limit):
        try:
            data, ancdata, flags, _ = channel.recvmsg(1, _HANDOFF_SPACE, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            break
        got = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                new = array.array("i", payload[:usable])
                fds.extend(new)
                ids.extend([data[0] if data else 0] * len(new))
                got += len(new)
        if flags & socket.MSG_CTRUNC:
            lost += not got
            continue
        if not data and not got:
            return Handoffs(fds, lost, True, ids)
    return Handoffs(fds, lost, False, ids)


def adopt(fd: int, lid: int, kinds: dict) -> socket.socket:
    """A socket object for a connection handed over (by SCM_RIGHTS or MSG_RING) for
    listener ``lid``.  ``socket.socket(fileno=fd)`` asks the kernel what the fd is (two
    getsockopt and two getsockname calls, every connection); a listener's connections are
    all of one kind, so it asks once per listener id and remembers (``kinds``)."""
    kind = kinds.get(lid)
    if kind is None:
        sock = socket.socket(fileno=fd)
        kinds[lid] = (sock.family, sock.type, sock.proto)
        return sock
    return socket.socket(*kind, fileno=fd)


class HandoffReceiver:
    """A worker's side of its channel: take every waiting connection, count, log once.

    ``take()`` returns ``(pairs, closed)``: the connections waiting now (``recvmsg``
    until ``EAGAIN``) as ``(socket, listener_id)`` pairs, and whether the acceptor has
    closed its end (stop watching).
    Counts ``extra["handoffs"]`` and ``extra["handoff_lost"]``.  The rule for the log:
    a loss starts an *episode*, logged once; a connection received whole ends it.
    """

    __slots__ = ("channel", "extra", "who", "losing", "kinds")

    def __init__(self, channel: socket.socket, extra: dict, who: str) -> None:
        self.channel = channel
        self.extra = extra
        self.who = who
        self.losing = False
        self.kinds: dict = {}   # listener id -> (family, type, proto) of its connections

    def take(self) -> tuple[list[tuple[socket.socket, int]], bool]:
        extra = self.extra
        socks: list[tuple[socket.socket, int]] = []
        while True:
            fds, lost, closed, ids = receive_handoffs(self.channel)
            socks.extend((adopt(fd, lid, self.kinds), lid) for fd, lid in zip(fds, ids))
            if lost:
                extra["handoff_lost"] += lost
                if not self.losing:
                    self.losing = True
                    log.warning("%s: out of fds, a connection handed over was lost (MSG_CTRUNC); "
                                "counted in handoff_lost", self.who)
            elif fds:
                self.losing = False
            if closed or len(fds) + lost < HANDOFF_BATCH:
                break
        extra["handoffs"] += len(socks)
        return socks, closed
