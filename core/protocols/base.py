"""The sans-I/O protocol interface: bytes in, bytes out, no sockets inside.

A backend creates one protocol object per connection and calls ``feed`` with every
chunk it receives, in order.  The object never touches a socket, a clock or a thread:
it only turns received bytes into bytes to send, so the same object runs under
select, epoll, io_uring, asyncio or a test with no network at all (the h11 idea).

Contract, for every backend:

* ``out, n = proto.feed(data)``: ``data`` is bytes-like (``bytes`` or a
  ``memoryview`` the backend owns until its send completes). ``out`` is bytes-like and
  must be sent in full, in order, before any later output; it may be ``data`` itself
  (echo hands the received buffer straight back so a completion backend can send it
  without a copy). ``n`` is the number of requests this chunk completed (for stats).
* ``proto.closing``: once true, the backend sends what ``feed`` returned and then
  closes the connection; it feeds nothing more.
* ``proto.partial``: true while the protocol holds an incomplete request (read only by
  the backends' coarse header-timeout sweep, never on the hot path).
* ``proto.eof()``: the peer half-closed its sending side; returns final bytes to send
  (usually ``b""``), after which the backend closes once its output is flushed.
"""

from __future__ import annotations

import abc


class Protocol(abc.ABC):
    """Per-connection protocol state machine."""

    __slots__ = ("closing",)

    def __init__(self) -> None:
        self.closing = False

    @abc.abstractmethod
    def feed(self, data) -> tuple[bytes, int]:
        """Consume received bytes; return (bytes to send, requests completed)."""

    @property
    def partial(self) -> bool:
        """True while an incomplete request is buffered (for the header timeout)."""
        return False

    def eof(self) -> bytes:
        """The peer will send nothing more; return any final bytes to send."""
        self.closing = True
        return b""
