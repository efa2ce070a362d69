"""``rloop``: the asyncio backend with rloop's event loop (Rust) in each worker thread.

Added by following docs/adding-a-backend.md only: one module, one entry point, one
dependency.  Everything but the loop is ``asyncio_.AsyncioBackend`` (read its docstring):
the same accept over ``add_reader`` (core/accept.py), the same Protocol over the same
sans-I/O objects, the same connection policy, stop and drain.

What rloop 0.5.0 lacks, found by running the suites, and how this module adapts:

* ``loop.connect_accepted_socket`` raises ``NotImplementedError``.  The documented
  alternative for an already-connected socket, ``loop.create_connection(factory,
  sock=sock)``, is implemented (rloop detaches the socket and builds its TCP transport on
  the fd) - but its transports cannot close (below).
* ``loop.create_server(sock=...)`` takes ownership of the socket (``sock.detach()``): the
  core's shared listener would be closed with the server.  Not used: accept is ours.

What cannot be used, and what this module does instead:

* **rloop's TCP transports never close their socket** (0.4.1 and 0.5.0, with
  ``create_server`` as with ``create_connection(sock=)``): ``close()``/``abort()`` call the
  protocol's ``connection_lost``, but the fd stays open - the peer never sees FIN (a
  half-closed echo, an HTTP ``Connection: close``, a 400 answer all leave the client
  waiting) and one fd leaks per connection.  rloop closes the fd only when its Rust
  ``TCPTransport`` is freed, and the loop keeps references to it after
  ``connection_lost``; closing the fd behind its back could close a reused fd number
  later.  So the connections here use ``backends/reactor_transport.py``: the same
  ``asyncio.Protocol`` contract, with the socket read and written by Python from rloop's
  reactor (``add_reader``/``add_writer``, which work).  What this backend measures is
  therefore **rloop's event loop** (its reactor, timers and callbacks) under the
  asyncio backend's protocol; not rloop's Rust transports.  tests/test_rloop.py keeps
  the transport defect as a strict expected failure, so the day rloop fixes it the suite
  says so and ``transport_for`` can go back to ``create_connection(sock=)``.
* **rloop closes its signal self-socket twice** at the end of every ``run_forever``:
  ``_ssock_stop`` hands both fds of the socketpair to the Rust side, which closes them,
  then drops the Python ``socket`` objects, whose finaliser closes the same numbers
  again.  In a process with other threads (every worker is one) the second close can
  hit a file another thread has just opened under that number: seen here as a worker's
  ``/proc`` read failing with EBADF at shutdown (strace: ``close(8) = 0`` twice).
  ``_Loop`` detaches the Python objects once Rust has closed the fds;
  tests/test_rloop.py checks it.
* **Empty listen wakeups.**  With ``--accept reuseport`` no worker can lose an accept
  race (each has its own socket), yet rloop's reactor calls a listener's reader now and then
  with nothing to accept: 0-3 of ~150 wakeups per worker for 300 short connections in
  thread mode, and (rarer) with one loop per process too (1 in 27 accepts in a CI run,
  ``--mode process`` with two listeners).  Such a wakeup is not a lost race, and a shared
  socket's count would mix the two: rloop's ``lost_races`` is reported as not observable
  (None), as for io_uring.
"""

from __future__ import annotations

import asyncio
import socket

from parallelnet.backends.asyncio_ import AsyncioBackend
from parallelnet.backends.reactor_transport import ReactorTransport


def _loop_class():
    import rloop

    class _Loop(rloop.RLoop):
        """rloop's loop, its self-socket closed once (see the module docstring)."""

        def _ssock_stop(self):
            socks = (self._ssock_r, self._ssock_w)
            super()._ssock_stop()        # the Rust side closes both fds ...
            for sock in socks:
                if sock is not None:
                    sock.detach()        # ... so the Python objects must not close them again

    return _Loop


class RloopBackend(AsyncioBackend):
    name = "rloop"
    loop_package = "rloop"
    description = ("rloop (Rust) event loop per worker thread: its reactor drives the asyncio "
                   "Protocol through a Python socket transport (rloop's own cannot close)")

    def new_loop(self) -> asyncio.AbstractEventLoop:
        return _loop_class()()

    def empty_wakeups_are_races(self) -> bool:
        return False     # its reactor wakes a reader for nothing now and then (module docstring)

    async def transport_for(self, sock: socket.socket, lid: int = 0):
        return ReactorTransport(self.loop, sock, self._factory(lid), self.ctx.limits.recv_size)
