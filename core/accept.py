"""Accepting connections, and pacing a listener that cannot accept: one rule for every loop.

Kernel semantics relied on:

* ``accept(2)`` on a non-blocking listener returns ``EAGAIN`` once the accept queue is
  empty.  A loop accepts until then (the seed's rule): one wakeup serves a burst.
* ``EMFILE``/``ENFILE`` (no fd for the new socket), ``ENOBUFS``/``ENOMEM`` (no memory):
  the connection stays in the queue, so the listener stays readable and an immediate
  retry fails the same way - a level-triggered loop would spin at 100% CPU.  The
  listener must be paused (unwatched) and retried later: ``AcceptPacer``.
* ``ECONNABORTED``, ``EPROTO``, ``EPERM`` (a peer that reset while queued, a firewall
  verdict): that one connection is lost, the listener is fine - go on accepting.
* ``accept(2)`` does not inherit ``O_NONBLOCK`` on Linux: callers set it on each socket.

Python loops call ``accept_pending`` and ``AcceptPacer``; the acceptor thread of
``--accept dispatch`` uses the pacer too; the C cores follow the same numbers
(``Limits.accept_backoff``, doubling, capped at ``ACCEPT_BACKOFF_MAX``).
"""

from __future__ import annotations

import errno
import logging
import socket

#: accept(2) errors that mean "out of a resource", not "this connection failed".
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept(2) errors that lose one connection (the peer gave up in the queue...), not the listener.
ACCEPT_ONE_LOST = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
ACCEPT_BACKOFF_MAX = 1.0   # seconds: the longest pause between retries

log = logging.getLogger("parallelnet.worker")


def accept_pending(lsock: socket.socket, extra: dict, who: str
                   ) -> tuple[list[tuple[socket.socket, object]], OSError | None]:
    """Accept until EAGAIN.

    Returns the (socket, peer) pairs accepted and, when accept failed for want of fds or
    memory, that error: the caller must then pause the listener (``AcceptPacer``).  Every
    failure is counted in ``extra["accept_errors"]``.
    """
    accepted = []
    while True:
        try:
            accepted.append(lsock.accept())
        except BlockingIOError:
            return accepted, None
        except InterruptedError:
            continue
        except OSError as exc:
            extra["accept_errors"] += 1
            if exc.errno in ACCEPT_RESOURCE_ERRORS:
                return accepted, exc
            if exc.errno not in ACCEPT_ONE_LOST:
                log.warning("%s: accept failed: %s", who, exc)
                return accepted, None


class AcceptPacer:
    """The back-off of one worker's listeners after a resource error.

    ``failed(exc)`` returns how long to leave the listener unwatched: ``first`` seconds,
    doubling on each failure up to ``ACCEPT_BACKOFF_MAX``; ``succeeded()`` (an accept
    got a connection) starts over.  An *episode* runs from the first failure to the
    next success: it is logged once, not once per retry.  Counts ``accept_backoffs``.
    """

    __slots__ = ("first", "delay", "extra", "who", "in_episode")

    def __init__(self, first: float, extra: dict, who: str) -> None:
        self.first = first
        self.delay = first
        self.extra = extra
        self.who = who
        self.in_episode = False

    def failed(self, exc: OSError) -> float:
        self.extra["accept_backoffs"] += 1
        if not self.in_episode:
            self.in_episode = True
            log.warning("%s: accept failed: %s; pausing the listener, retrying with back-off",
                        self.who, exc)
        delay = self.delay
        self.delay = min(ACCEPT_BACKOFF_MAX, delay * 2)
        return delay

    def succeeded(self) -> None:
        if self.in_episode:
            self.in_episode = False
            self.delay = self.first
