"""How the ``uring`` backend's Python tells its C core what to do: one call per batch.

Every call through cffi releases the GIL and takes it back (cffi's generated wrapper does
so for any C function).  Uncontended that costs about 47 ns (``uc_nop``), but with several
thread workers in one process each release lets another thread run Python, and the
caller then waits for the GIL again: a hand-off per call.  Per request the loop tells the
core one to three things (send this, finish, hold), so the calls multiplied the hand-offs
by the requests.

``BatchedCalls`` (``--uring-calls batched``, the default) queues them while a batch is
processed and passes the queue with the next wait (``uc_wait_acts``: the actions, then
the wait, then the events' address, one GIL release per batch).  The core applies the
actions in order before anything else happens in that wait, so every rule holds as if
the calls had been made one by one: a received buffer sent back (``send_buf``) is still
lent to Python then and gets pinned, a close emitted by an action reports its
EV_CLOSED in the coming batch.  What cannot wait in the queue goes directly, after the
queue is flushed (``uc_apply``) so that order is kept: a send of static memory (a view of
an immortal block, passed by address) and a copied output above ``QUEUE_MAX`` bytes (the
join would copy it once more). A queued send that fails is reported by the core as
EV_SEND_FAILED and its connection closed there: the caller only logs it.

``DirectCalls`` (``--uring-calls direct``) makes each call at once, as before, for a
side-by-side measurement; ``extra.py_calls`` counts the calls either way.
"""

from __future__ import annotations

from functools import partial

#: Output larger than this is sent by a direct call (after a flush) rather than queued:
#: queued bytes are joined into one buffer per batch, a copy that small answers do not
#: notice and large ones would.
QUEUE_MAX = 16 * 1024


class DirectCalls:
    """One cffi call per action (the earlier behaviour)."""

    def __init__(self, ffi, lib, core) -> None:
        from_buffer = ffi.from_buffer
        copy = lib.uc_send_copy
        self.send_buf = partial(lib.uc_send_buf, core)           # (cid, bid, off, len)
        self.send_out = lambda cid, out: copy(core, cid, out if type(out) is bytes
                                              else from_buffer(out), len(out))
        static = lib.uc_send_static
        self.send_static = lambda cid, out: static(core, cid, from_buffer(out), len(out))
        self.finish = partial(lib.uc_finish, core)
        self.hold = partial(lib.uc_hold, core)
        self.pulled = partial(lib.uc_pulled, core)
        self.close = partial(lib.uc_close, core)
        self.progress = partial(lib.uc_progress, core)
        self._wait, self._events, self._unpack, self._core = lib.uc_wait, lib.uc_events, ffi.unpack, core

    def flush(self) -> None:
        pass

    def wait(self, timeout_ms: int) -> int:
        return self._wait(self._core, timeout_ms)

    def events(self, n: int) -> list:
        return self._unpack(self._events(self._core), 4 * n)


class BatchedCalls:
    """Actions queued per batch, passed with the next wait (module docstring)."""

    def __init__(self, ffi, lib, core) -> None:
        words = lib.UC_ACT_WORDS
        assert words == 5, "the tuples below are UC_ACT_WORDS long"
        acts: list[int] = []
        outs: list = []
        size = [0]   # bytes queued in outs
        extend = acts.extend
        A_BUF, A_COPY, A_FINISH = lib.UC_ACT_SEND_BUF, lib.UC_ACT_SEND_COPY, lib.UC_ACT_FINISH
        A_HOLD, A_PULLED, A_CLOSE, A_PROGRESS = (lib.UC_ACT_HOLD, lib.UC_ACT_PULLED,
                                                 lib.UC_ACT_CLOSE, lib.UC_ACT_PROGRESS)
        apply_, NULL = lib.uc_apply, ffi.NULL
        direct = DirectCalls(ffi, lib, core)

        def clear() -> None:
            acts.clear()
            outs.clear()
            size[0] = 0

        def flush() -> None:
            if acts:
                apply_(core, acts, len(acts) // words, b"".join(outs), size[0])
                clear()

        def send_buf(cid, bid, off, length):
            extend((A_BUF, cid, bid, off, length))
            return 0

        def send_out(cid, out):
            n = len(out)
            if n > QUEUE_MAX:
                flush()
                return direct.send_out(cid, out)
            # bytes are immutable: referenced until the join; anything else (a bytearray the
            # protocol may reuse) is copied now, as the direct call's memcpy would have.
            outs.append(out if type(out) is bytes else bytes(out))
            extend((A_COPY, cid, size[0], n, 0))
            size[0] += n
            return 0

        def send_static(cid, out):
            flush()
            return direct.send_static(cid, out)

        self.send_buf, self.send_out, self.send_static, self.flush = send_buf, send_out, send_static, flush
        self.finish = lambda cid: extend((A_FINISH, cid, 0, 0, 0))
        self.hold = lambda cid, more: extend((A_HOLD, cid, more, 0, 0))
        self.pulled = lambda cid, more: extend((A_PULLED, cid, more, 0, 0))
        self.close = lambda cid, error: extend((A_CLOSE, cid, error, 0, 0))
        self.progress = lambda cid, partial_, k, n: extend((A_PROGRESS, cid, partial_, k, n))

        wait_acts, unpack = lib.uc_wait_acts, ffi.unpack
        evp = ffi.new("int32_t *[1]")

        def wait(timeout_ms: int) -> int:
            if acts:
                n = wait_acts(core, timeout_ms, acts, len(acts) // words, b"".join(outs), size[0], evp)
                clear()
                return n
            return wait_acts(core, timeout_ms, NULL, 0, NULL, 0, evp)

        self.wait = wait
        self.events = lambda n: unpack(evp[0], 4 * n)


def core_calls(mode: str, ffi, lib, core):
    """The calls of ``--uring-calls MODE``."""
    return (DirectCalls if mode == "direct" else BatchedCalls)(ffi, lib, core)
