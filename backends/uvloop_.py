"""``uvloop``: the asyncio backend with uvloop's loop (libuv, Cython) in each worker thread.

Everything but the loop factory is ``asyncio_.AsyncioBackend`` (read its docstring): the
same accept over ``add_reader`` (libuv's own listener cannot survive fd exhaustion: on
EMFILE it accepts and closes the whole backlog, ``uv__emfile_trick``, and uvloop then
closes the server for good), the same Protocol over the same sans-I/O objects, the same
policy, stop and drain.  What differs with uvloop:

* **Reads of ``limits.recv_size``.**  uvloop's ``data_received`` path reads up to
  256 000 bytes at once, so a slow reader could queue ``max_output`` + 250 KB before
  reading pauses; the connection is a ``BufferedProtocol`` instead whose buffer is
  ``recv_size`` bytes (copied out per read, as uvloop itself does for
  ``data_received``): backpressure holds within one ``recv_size`` read, as readiness.py.
* libuv holds 6 fds per process (an io_uring ring, two signal pipes, an eventfd) that
  the other backends do not.
* uvloop is a pip dependency of the project; the probe reports its version, or why it
  cannot be imported.
"""

from __future__ import annotations

import asyncio

from parallelnet.backends.asyncio_ import AsyncioBackend


class UvloopBackend(AsyncioBackend):
    name = "uvloop"
    loop_package = "uvloop"
    description = "uvloop (libuv) event loop per worker thread, asyncio Protocol"
    read_into = True

    def new_loop(self) -> asyncio.AbstractEventLoop:
        import uvloop

        return uvloop.new_event_loop()
