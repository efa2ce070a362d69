"""The stop request of ``serve``'s main thread: set by a signal handler, waited for, lock-free.

Python runs a signal handler in the main thread between two of its bytecodes - which
may be inside the very wait for the stop.  ``threading.Event.wait`` holds the Event's
lock on some of those lines, so a handler calling ``Event.set()`` there waits for a
lock its own thread holds, forever (seen: a ``serve`` that never stopped on SIGTERM).
This request takes no lock anywhere.

Kernel semantics relied on:

* ``write(2)`` to a pipe is async-signal-safe; with ``O_NONBLOCK`` a full pipe fails
  with ``EAGAIN`` instead of blocking (it is already readable: nothing is lost).
* ``select(2)`` on the read end returns once it is readable.  A signal interrupts it
  with ``EINTR``; Python runs the handler and retries with the time left (PEP 475), and
  the retry sees the byte the handler wrote.
"""

from __future__ import annotations

import os
import select


class StopRequest:
    """``request()`` (from a signal handler or any thread), ``wait(timeout)``, ``is_set()``."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._requested = False

    def request(self) -> None:
        self._requested = True
        try:
            os.write(self._w, b"x")
        except (BlockingIOError, OSError):
            pass   # full (already readable) or closed at exit: the flag says it all

    def is_set(self) -> bool:
        return self._requested

    def wait(self, timeout: float) -> bool:
        """Until requested or ``timeout`` seconds; whether it was requested."""
        if not self._requested:
            select.select([self._r], [], [], max(0.0, timeout))
        return self._requested

    def close(self) -> None:
        for fd in (self._r, self._w):
            os.close(fd)
        self._r = self._w = -1
