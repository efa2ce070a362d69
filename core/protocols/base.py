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
  (usually ``b""``), after which the backend closes once its output is flushed - unless
  ``proto.more`` is still true: then the held answers come first (by ``pull``), and
  the protocol sets ``closing`` once they are out.

**Bounded output** (what one read may make a server produce).  A few bytes of input can
ask for any amount of output (``GET /bytes/16777216`` is 39 bytes), so a protocol never
answers without limit: one ``feed`` or ``pull`` call produces about
``output_budget`` bytes at most (at least one answer or one body piece, so it always
progresses).  What it has not answered yet it keeps:

* ``proto.more``: true while the protocol holds answers it can produce without new
  input (requests kept back once the budget was spent, the rest of a streamed body).
  While it is true the backend reads nothing more from that connection (as under
  backpressure) and, once its pending output is at or below its low-water mark
  (``max_output // 2``), calls ``pull``; ``closing`` and ``more`` are never both true.
* ``out, n = proto.pull()``: the next answers, exactly like ``feed``'s result.
* A ``feed`` while ``more`` is true (a completion backend may already hold data it
  received before it stopped reading) queues that data behind the held input and
  returns what ``pull`` would.

The server sets ``output_budget`` to half of ``--max-output``, so with the backends'
rule a connection's pending output stays at or below ``max_output`` plus one answer's
header (docs/faults.md).  A protocol whose answers are bounded by its input (echo)
needs none of this: the defaults (``more`` false, ``pull`` empty) apply.
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

    @property
    def more(self) -> bool:
        """True while answers are held that ``pull`` will produce (bounded output)."""
        return False

    def pull(self):
        """The next held answers, as ``(bytes to send, requests completed)``."""
        return b"", 0

    def is_static(self, out) -> bool:
        """Whether ``out`` (a feed/pull result) is immutable memory that outlives every
        connection (a shared block), so a completion backend may send it without keeping
        or copying it; False unless the protocol knows."""
        return False

    def eof(self) -> bytes:
        """The peer will send nothing more; return any final bytes to send."""
        self.closing = True
        return b""


def answer_all(proto: Protocol, data) -> tuple[bytes, int]:
    """``feed`` then ``pull`` until nothing is held: every answer to ``data`` at once.

    For tests and tools only: a server must not do this (it is what the budget
    prevents); it sends each part before pulling the next.
    """
    out, n = proto.feed(data)
    parts = [bytes(out)]
    while proto.more:
        more, k = proto.pull()
        parts.append(bytes(more))
        n += k
    return b"".join(parts), n
