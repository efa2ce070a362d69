"""cffi builder for the ``native`` backend's C event loop (API mode, compiled at install).

``setup.py`` names ``backends/native_build.py:ffibuilder``; setuptools compiles
``native_core.c`` into ``parallelnet.backends._native``.  API mode: the compiler checks
these declarations against the source, and cffi releases the GIL around every call,
so ``nc_serve`` runs a whole time slice of the event loop without holding it.

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

struct nc_stats {
    uint64_t requests, bytes_in, bytes_out, wakeups, listen_wakeups, accepted, lost_races,
             closed, refused, errors, backpressure, open, accept_errors, slices;
};
struct nc_config {
    int stop_fd, nlisteners, exclusive, protocol;
    int listeners[...];
    unsigned recv_size, max_conns, message_size, max_header_bytes;
    uint64_t max_output, max_body_bytes;
};
typedef struct nc_core nc_core;

nc_core *nc_new(const struct nc_config *cfg, struct nc_stats *st, int *err);
int nc_serve(nc_core *c, int slice_ms);
void nc_drain(nc_core *c, int timeout_ms);
void nc_free(nc_core *c);
int nc_gettid(void);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
with open(os.path.join(HERE, "native_core.c")) as _f:
    ffibuilder.set_source("parallelnet.backends._native", _f.read(),
                          extra_compile_args=["-O2", "-std=gnu11", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
