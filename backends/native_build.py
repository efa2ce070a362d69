"""cffi builder for the ``native`` backend's C event loop (API mode, compiled at install).

``setup.py`` names ``backends/native_build.py:ffibuilder``; setuptools compiles
``native_core.c`` into ``parallelnet.backends._native``.  API mode: the compiler checks
these declarations against the source, and cffi releases the GIL around every call,
so ``nc_serve`` runs the whole event loop without holding it; the ``extern "Python"``
callbacks (protocols not written in C, rare events) take it back when called.

Run this file directly to build the extension in place for a quick experiment.
"""

from __future__ import annotations

import os

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
#define NC_MAX_LISTENERS ...
#define NC_ECHO ...
#define NC_HTTP ...
#define NC_PY ...

struct pol_limits { int64_t idle_ms, header_ms, tick_ms; double min_rate; };
struct nc_stats {
    uint64_t requests, bytes_in, bytes_out, wakeups, listen_wakeups, accepted, lost_races,
             closed, refused, errors, backpressure, open, accept_errors, accept_backoffs,
             max_pending, handoffs, handoff_lost, idle_timeouts, header_timeouts,
             output_holds, alloc_failures;
    uint64_t l_accepted[...], l_listen_wakeups[...], l_lost_races[...];
};
struct nc_config {
    int stop_fd, nlisteners, exclusive, nids;
    int listeners[...];
    int listener_ids[...];
    int protocols[...];
    int handoff_fd;
    unsigned recv_size, max_conns, message_size, max_header_bytes, accept_backoff_ms;
    uint64_t max_output, max_body_bytes;
    struct pol_limits limits;
    void *user;
};
struct nc_out { const char *p; size_t len; int closing, partial, more; };
typedef struct nc_core nc_core;

extern "Python" int nc_py_feed(void *, int, int, const char *, size_t, struct nc_out *);
extern "Python" int nc_py_eof(void *, int, int, struct nc_out *);
extern "Python" int nc_py_pull(void *, int, int, struct nc_out *);
extern "Python" void nc_py_alloc_failed(void *, int);
extern "Python" void nc_py_close(void *, int);
extern "Python" void nc_py_accept_failed(void *, int);
extern "Python" void nc_py_handoff_lost(void *, int);

nc_core *nc_new(const struct nc_config *cfg, struct nc_stats *st, int *err);
int nc_serve(nc_core *c);
void nc_drain(nc_core *c, int timeout_ms);
void nc_free(nc_core *c);
int nc_gettid(void);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
with open(os.path.join(HERE, "native_core.c")) as _f:
    ffibuilder.set_source("parallelnet.backends._native", _f.read(), include_dirs=[HERE],
                          depends=[os.path.join(HERE, h) for h in ("proto_core.h", "policy_core.h", "handoff_recv.h")],
                          extra_compile_args=["-O2", "-std=gnu11", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
