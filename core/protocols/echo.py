"""Echo: send back exactly what was received, without copying it.

``feed`` returns the very object it was given (``bytes`` or the backend's
``memoryview``), so a completion-based backend can hand the receive buffer straight to
its send.  The request count is only for statistics:

* ``message_size == 0``: every non-empty chunk counts as one message;
* ``message_size > 0``: a running byte count tells how many fixed-size messages this
  chunk completed (messages may straddle chunks, or several may share one chunk).
"""

from __future__ import annotations

from .base import Protocol

__all__ = ["EchoProtocol"]


class EchoProtocol(Protocol):
    """Zero-copy echo; ``message_size`` (bytes, 0 = one message per chunk) for stats."""

    __slots__ = ("message_size", "_partial")

    def __init__(self, message_size: int = 0) -> None:
        super().__init__()
        if message_size < 0:
            raise ValueError(f"message_size must be >= 0, got {message_size}")
        self.message_size = message_size
        self._partial = 0  # bytes received of the message currently in progress

    def feed(self, data):
        size = self.message_size
        if not size:
            return data, 1 if len(data) else 0
        n, self._partial = divmod(self._partial + len(data), size)
        return data, n
