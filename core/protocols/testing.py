"""Protocols that exist only for the fault suite (``PARALLELNET_TEST_PROTOCOLS=1``).

``crashy``: echo, except that a chunk containing ``CRASH`` raises inside ``feed`` and
``eof`` raises after the peer sent ``CRASH-EOF``: a handler bug.  The backend must
close that one connection, log it once with the connection's context, and keep
serving every other connection.
"""

from __future__ import annotations

from .base import Protocol


class HandlerBug(RuntimeError):
    """What the crashy protocol raises."""


class CrashyProtocol(Protocol):
    __slots__ = ("_armed_eof",)

    def __init__(self) -> None:
        super().__init__()
        self._armed_eof = False

    def feed(self, data):
        raw = bytes(data)
        if b"CRASH-EOF" in raw:
            self._armed_eof = True
        elif b"CRASH" in raw:
            raise HandlerBug("crashy protocol: injected handler bug in feed")
        return raw, 1

    def eof(self) -> bytes:
        if self._armed_eof:
            raise HandlerBug("crashy protocol: injected handler bug in eof")
        return super().eof()


TEST_PROTOCOLS = {"crashy": CrashyProtocol}
