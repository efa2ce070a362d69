"""``uvloop``: the asyncio backend with uvloop's loop (libuv, Cython) in each worker thread.

Everything but the loop factory and the accept is ``asyncio_.AsyncioBackend`` (read its
docstring): the same Protocol over the same sans-I/O objects, the same write-buffer
limits, half-close, stop and drain.  What differs with uvloop:

* **Accept is ours, not libuv's.**  libuv's listener cannot survive fd exhaustion:
  on EMFILE/ENFILE it closes a reserved fd and accepts-and-closes every pending
  connection (``uv__emfile_trick``: the backlog is dropped, not served later), and if
  that fails it reports the error to uvloop, whose listen callback then closes the
  server for good (``__uv_streamserver_on_listen`` -> ``_fatal_error``).  So each
  worker watches the listening socket with ``loop.add_reader`` and runs readiness.py's
  accept: until ``EAGAIN``, lost races counted, EMFILE/ENFILE/ENOBUFS/ENOMEM pause the
  listener (``remove_reader``) for ``limits.accept_backoff``, doubling to 1 s, counted in
  ``extra.accept_errors``/``accept_backoffs``; each socket becomes a uvloop transport
  through ``connect_accepted_socket`` (a task per connection: the price of surviving
  EMFILE, paid on connection-heavy loads only).  ``listen_wakeups`` and ``lost_races``
  are therefore exact here too.
* **Reads of ``limits.recv_size``.**  uvloop's ``data_received`` path reads up to
  256 000 bytes at once, so a slow reader could queue ``max_output`` + 250 KB before
  reading pauses; the connection is a ``BufferedProtocol`` instead whose buffer is
  ``recv_size`` bytes (copied out per read, as uvloop itself does for
  ``data_received``): backpressure holds within one ``recv_size`` read, as readiness.py.
* ``--accept dispatch`` is AsyncioBackend's (``add_reader`` on ``ctx.handoff``, fds
  taken with ``recvmsg`` until ``EAGAIN``, adopted through ``connect_accepted_socket``):
  inherited unchanged, including the lost-connection accounting under ``MSG_CTRUNC``.
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
    own_accept = True
    read_into = True

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
