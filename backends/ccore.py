"""What the two C cores share on the Python side: their policy limits and their notes.

``native_core.c`` (epoll) and ``uring/event_core.c`` (io_uring: ``uring``, ``native-uring``)
enforce core/policy.py's deadlines themselves, with the arithmetic of
backends/policy_core.h; this module fills that header's ``struct pol_limits`` from
``Limits`` (one conversion for both), and turns the cores' rare callbacks into the log
lines of core/accept.py's and core/handoff.py's rule: an *episode* (a listener paused
for want of fds, hand-offs the kernel could not install) is logged once, at its start.

Kernel semantics relied on: none here (the cores' docstrings hold them).  The timer tick
is ``Limits.timer_tick()``, so the C cores check deadlines exactly as often as the
Python loops do.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("parallelnet.worker")


def _ms(seconds: float | None) -> int:
    return max(1, round(seconds * 1000)) if seconds and seconds > 0 else 0


def fill_limits(dst, limits) -> None:
    """Set a ``struct pol_limits`` (cffi) from ``Limits``: 0 = off, as in the Python rules."""
    dst.idle_ms = _ms(limits.idle_timeout)
    dst.header_ms = _ms(limits.header_timeout)
    dst.tick_ms = _ms(limits.timer_tick())
    dst.min_rate = limits.header_min_rate if limits.header_min_rate > 0 else 0.0


def install_notes(ffi, accept_paused: str, handoff_lost: str, alloc_failed: str) -> None:
    """Define a core's three ``extern "Python"`` notes (named as its cdef names them).
    ``user`` is a handle to an object with a ``who`` ("worker 0 (native)")."""

    @ffi.def_extern(name=alloc_failed)
    def _alloc_failed(user, err):
        log.error("%s: an answer could not be allocated (%s): closing that connection "
                  "(counted in alloc_failures; logged once per worker)",
                  ffi.from_handle(user).who, os.strerror(err))

    @ffi.def_extern(name=accept_paused)
    def _accept_paused(user, err):
        log.warning("%s: accept failed: %s; pausing the listener, retrying with back-off",
                    ffi.from_handle(user).who, os.strerror(err))

    @ffi.def_extern(name=handoff_lost)
    def _handoff_lost(user, err):
        log.warning("%s: a handed-over connection was lost: the fd could not be installed "
                    "(MSG_CTRUNC, %s); counted in handoff_lost", ffi.from_handle(user).who,
                    os.strerror(err))
