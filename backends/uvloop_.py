"""``uvloop``: the asyncio backend with uvloop's loop (libuv, Cython) in each worker thread.

Everything but the loop factory is ``asyncio_.AsyncioBackend`` (read its docstring):
the same Protocol over the same sans-I/O objects, the same write-buffer limits,
half-close, stop and drain.  What differs with uvloop:

* libuv accepts in C until ``EAGAIN`` and never calls the Python socket's ``accept()``:
  ``lost_races`` and ``listen_wakeups`` are not observable and stay 0 (``accepted`` is
  exact, counted in ``connection_made``).
* ``create_server(sock=...)`` adopts the fd and detaches the Python socket when the
  server closes: hence the dup of the core's listening socket (asyncio_.py).
* uvloop is a pip dependency of the project; the probe reports its version, or why it
  cannot be imported.
"""

from __future__ import annotations

import asyncio

from parallelnet.backends.asyncio_ import AsyncioBackend
from parallelnet.backends.base import Availability


class UvloopBackend(AsyncioBackend):
    name = "uvloop"
    description = "uvloop (libuv) event loop per worker thread, asyncio Protocol"
    counts_races = False

    @classmethod
    def probe(cls) -> Availability:
        try:
            import uvloop
        except ImportError as exc:
            return Availability(False, f"uvloop not importable ({exc}); pip install uvloop")
        return Availability(True, detail=f"uvloop {uvloop.__version__}")

    @classmethod
    def _loop_name(cls) -> str:
        return "uvloop.Loop"

    def new_loop(self) -> asyncio.AbstractEventLoop:
        import uvloop

        return uvloop.new_event_loop()
