"""A small stream transport over any asyncio loop's reactor (``add_reader``/``add_writer``).

For an event loop whose own TCP transports cannot serve (rloop 0.5.0: ``close()`` and
``abort()`` never close the socket, so no FIN reaches the peer and the fd leaks), the
loop is still a fine reactor: this transport reads and writes the non-blocking socket
itself from the loop's readiness callbacks and speaks the ``asyncio.Protocol`` side of
the contract the asyncio backend uses (``connection_made``, ``data_received``,
``eof_received``, ``pause_writing``/``resume_writing`` at the write-buffer marks,
``connection_lost``).  It owns the socket and closes it.

Kernel semantics relied on: a readable socket whose ``recv`` returns ``b""`` has received
the peer's FIN (half-close: we may still send); ``send`` on a non-blocking socket takes
what fits in the send buffer and raises ``BlockingIOError`` when none fits; ``close``
after the output is flushed sends our FIN; ``SO_LINGER`` is left alone, so ``abort`` is a
plain close (a reset only if unread input remains, as the kernel decides).
"""

from __future__ import annotations

import asyncio
import socket


class ReactorTransport(asyncio.Transport):
    """One connection: a non-blocking socket driven by the loop's reader/writer callbacks."""

    def __init__(self, loop, sock: socket.socket, protocol, recv_size: int = 65536) -> None:
        super().__init__()
        self._loop, self._sock, self._protocol = loop, sock, protocol
        self._fd = sock.fileno()
        self._recv_size = recv_size
        self._out = bytearray()
        self._high, self._low = 64 * 1024, 16 * 1024
        self._reading = True
        self._writing_paused = False     # the protocol was told pause_writing()
        self._closing = False            # close(): flush, then close
        self._closed = False
        self._eof = False
        self._peer = None
        try:
            self._peer = sock.getpeername()
        except OSError:
            pass
        protocol.connection_made(self)
        if not self._closing and not self._closed:
            loop.add_reader(self._fd, self._on_readable)

    # -- reading ------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(self._recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        if not data:
            self._eof = True
            self._loop.remove_reader(self._fd)
            if not self._protocol.eof_received():
                self.close()
            return
        self._protocol.data_received(data)

    def pause_reading(self) -> None:
        if self._reading and not self._closed:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closed and not self._closing and not self._eof:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def is_reading(self) -> bool:
        return self._reading and not self._closed

    # -- writing ------------------------------------------------------------------------

    def write(self, data) -> None:
        if self._closed or self._closing or not data:
            return
        if not self._out:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._force_close(exc)
                return
            if sent == len(data):
                return
            self._out += memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._on_writable)
        else:
            self._out += data
        self._check_high()

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        del self._out[:sent]
        if self._out:
            self._check_low()
            return
        self._loop.remove_writer(self._fd)
        self._check_low()
        if self._closing:
            self._finish(None)

    def _check_high(self) -> None:
        if not self._writing_paused and len(self._out) > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _check_low(self) -> None:
        if self._writing_paused and len(self._out) <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        """As asyncio's transports: new marks apply at once (pause or resume now)."""
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low
        self._check_high()
        self._check_low()

    def get_write_buffer_limits(self):
        return self._low, self._high

    def can_write_eof(self) -> bool:
        return False

    # -- closing ------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def close(self) -> None:
        """Stop reading; close once the output is flushed (at once if there is none)."""
        if self._closing or self._closed:
            return
        self._closing = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        if not self._out:
            self._loop.call_soon(self._finish, None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc) -> None:
        if self._closed:
            return
        self._out.clear()
        self._finish(exc)

    def _finish(self, exc) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._sock.close()
        self._protocol.connection_lost(exc)

    def get_extra_info(self, name, default=None):
        if name == "socket":
            return self._sock
        if name == "peername":
            return self._peer
        if name == "sockname":
            try:
                return self._sock.getsockname()
            except OSError:
                return default
        return default

    def get_protocol(self):
        return self._protocol

    def set_protocol(self, protocol) -> None:
        self._protocol = protocol
