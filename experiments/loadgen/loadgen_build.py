"""cffi builder for the C load generator (API mode, compiled at install time).

``setup.py`` names ``experiments/loadgen/loadgen_build.py:ffibuilder``; setuptools then
compiles ``loadgen.c`` into ``parallelnet.experiments.loadgen._loadgen``.  API mode (not ABI)
because the compiler checks the declarations below against the C source, and because
cffi releases the GIL around every call into it, which is what lets one
``lg_run`` call keep all its pthreads busy while Python threads (a test server, say)
carry on.

Run this file directly to build the extension in place for a quick experiment.
"""

from __future__ import annotations

import os

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))

# Must match the public part of loadgen.c; the compiler verifies it.
CDEF = """
#define LG_NERR ...
#define LG_ECHO ...
#define LG_HTTP ...
#define LG_CLOSED ...
#define LG_OPEN ...
#define LG_CHURN ...
#define LG_E_REFUSED ...
#define LG_E_CONNECT_TIMEOUT ...
#define LG_E_RESET ...
#define LG_E_READ_TIMEOUT ...
#define LG_E_EOF ...
#define LG_E_MISMATCH ...
#define LG_E_HTTP_PARSE ...
#define LG_E_ADDR_NOT_AVAIL ...
#define LG_E_OTHER ...
#define LG_SVC_NONE ...
#define LG_SVC_FIXED ...
#define LG_SVC_EXP ...
#define LG_SVC_BIMODAL ...
#define LG_SVC_LOGNORMAL ...
#define LG_MAX_US ...
#define LG_LIGHT ...
#define LG_HEAVY ...
#define LG_NCLASS ...

struct lg_service {
    int kind;
    double p, a, b;
};

struct lg_target {
    const char *host;
    int port, protocol;
    const char *path;
};

struct lg_config {
    const struct lg_target *targets;
    int ntargets, mode, connections, threads;
    const int *cpus;
    int ncpus, size, depth;
    double rate, duration, warmup, timeout;
    uint64_t max_requests;
    int abort_on_mismatch;
    struct lg_service service, heavy;
    int heavy_conns;
    int requests_per_conn;
    uint64_t seed;
};

struct lg_cresult {
    uint64_t requests, work_us, min_ns, max_ns;
    uint64_t *hist;
};

struct lg_tresult {
    uint64_t requests, bytes_sent, bytes_received;
    uint64_t errors[9];             /* LG_NERR; test_loadgen checks the two agree */
    uint64_t non2xx, connects, min_ns, max_ns;
    uint64_t *hist;
    uint64_t work_us;
};

struct lg_result {
    uint64_t scheduled, backlog;
    double elapsed, cpu_user, cpu_sys;
    double span;
    int aborted;
    struct lg_tresult *targets;
    uint64_t *per_conn;
    char message[256];
    struct lg_cresult classes[2];   /* LG_NCLASS; test_loadgen_service checks they agree */
};

int lg_hist_buckets(void);
uint64_t lg_hist_low(int i);
uint64_t lg_hist_high(int i);
int lg_run(const struct lg_config *cfg, struct lg_result *res);
void lg_sample(const struct lg_service *d, uint64_t seed, int conn, uint32_t *out, int n);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
with open(os.path.join(HERE, "loadgen.c"), encoding="utf-8") as f:
    _source = f.read()
ffibuilder.set_source(
    "parallelnet.experiments.loadgen._loadgen",
    _source,
    extra_compile_args=["-O2"],
    libraries=["pthread", "m"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(HERE, "..", "..", "build", "cffi"), verbose=True)
