"""cffi builder for the io_uring event core (API mode, compiled at install time).

``setup.py`` names ``backends/uring_build.py:ffibuilder``; setuptools compiles
``uring_core.c`` into ``parallelnet.backends._uring``.  No liburing header or library
is needed to build: the C declares its own kernel-ABI structs and resolves liburing's
functions with dlsym at run time from the PyPI wheel's ``liburing/liburing.so``
(uring_core.c's opening comment).  API mode, not ABI: each call costs about 2.5x less, the compiler
checks these declarations against the source, and cffi releases the GIL around every
call, so ``uc_wait`` blocks in the kernel without holding it.

Run this file directly to build the extension in place for a quick experiment.
"""

from __future__ import annotations

import os

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
#define EV_OPEN ...
#define EV_DATA ...
#define EV_EOF ...
#define EV_CLOSED ...
#define EV_STOP ...
#define EV_DRAINED ...
#define EV_TICK ...
#define EV_PULL ...
#define MAX_LISTENERS ...
#define UC_PY ...
#define UC_ECHO ...
#define UC_HTTP ...
#define IORING_SETUP_SQPOLL ...
#define IORING_SETUP_SUBMIT_ALL ...
#define IORING_SETUP_COOP_TASKRUN ...
#define IORING_SETUP_TASKRUN_FLAG ...
#define IORING_SETUP_SINGLE_ISSUER ...
#define IORING_SETUP_DEFER_TASKRUN ...
#define IORING_SETUP_CQSIZE ...
#define IORING_CQE_F_BUFFER ...
#define IORING_CQE_F_MORE ...
#define IORING_CQE_BUFFER_SHIFT ...

struct pol_limits { int64_t idle_ms, header_ms, tick_ms; double min_rate; };
struct uc_stats {
    uint64_t entries, sqes, cqes, waits, enobufs, cq_overflows, cq_dropped, bytes_in, bytes_out,
             accept_cqes, accepted, accept_eagain, accept_errors, refused, backpressure,
             zc_sends, copied_sends, recv_arms, partial_sends, accept_backoffs, max_pending,
             handoffs, handoff_lost, handoff_wakeups, fixed_files, sendzc_ops, sendzc_notifs,
             idle_trims, msg_handoffs, malloc_trims, sendzc_held_max, blocking_waits, empty_waits,
             last_accept_error, failed, windowed_waits, window_us, arrival_per_s, accept_bursts,
             ring_fd_registered, util_pct, window_nr, closed_pct, requests, opened, closed, errors, idle_timeouts, header_timeouts,
             output_holds, alloc_failures, gathered_sends;
    uint64_t l_accepted[...], l_accept_cqes[...];
};
struct uc_config {
    unsigned entries, nbufs, bufsize, max_conns, setup_flags;
    uint64_t max_output;
    int stop_fd, multishot_accept, nlisteners, raw;
    int listeners[...];
    int listener_ids[...];
    int nids;
    unsigned cq_entries;
    unsigned accept_backoff_ms;
    int handoff_fd;
    unsigned fixed_files, sqpoll_idle_ms, zc_threshold;
    unsigned latency_budget_us;
    struct pol_limits limits;
    int cproto;
    int lproto[...];
    unsigned message_size, max_header_bytes;
    uint64_t max_body_bytes;
    void *user;
};
typedef struct uc_core uc_core;

extern "Python" void uc_py_accept_paused(void *, int);
extern "Python" void uc_py_handoff_lost(void *, int);
extern "Python" void uc_py_alloc_failed(void *, int);

const char *uc_init(const char *path);
int uc_lib_version(void);
int uc_nop(int x);
uc_core *uc_new(const struct uc_config *cfg, int *err);
void uc_start(uc_core *c);
int uc_submit(uc_core *c);
int uc_wait(uc_core *c, int timeout_ms);
int uc_send_copy(uc_core *c, int id, const char *p, size_t len);
int uc_send_buf(uc_core *c, int id, int bid, unsigned off, unsigned len);
int uc_send_static(uc_core *c, int id, const char *p, size_t len);
void uc_finish(uc_core *c, int id);
void uc_hold(uc_core *c, int id, int more);
void uc_pulled(uc_core *c, int id, int more);
void uc_close(uc_core *c, int id, int error);
void uc_drain_begin(uc_core *c);
void uc_shutdown(uc_core *c);
int uc_free(uc_core *c);
int32_t *uc_events(uc_core *c);
char *uc_pool(uc_core *c);
size_t uc_pool_size(uc_core *c);
struct uc_stats *uc_stats(uc_core *c);
unsigned uc_setup_flags(uc_core *c);
unsigned uc_features(uc_core *c);
int uc_nconns(uc_core *c);
int uc_inflight(uc_core *c);
int uc_check_opcodes(uc_core *c);
int uc_window_check(uc_core *c);
int uc_opcode_supported(uc_core *c, int op);
void uc_fail_submits(uc_core *c, int err);
int uc_serve(uc_core *c);
int uc_drain(uc_core *c, int timeout_ms);
void uc_close_all(uc_core *c, int timeout_ms);
void uc_progress(uc_core *c, int id, int partial, unsigned completed, unsigned nbytes);

int uc_ring_fd(uc_core *c);
typedef struct uc_sender uc_sender;
uc_sender *uc_sender_new(int *err);
int uc_sender_send(uc_sender *s, int target_fd, int fd, int lid);
void uc_sender_free(uc_sender *s);

int uc_raw_accept(uc_core *c, int fd, uint64_t ud, int multishot);
int uc_raw_recv(uc_core *c, int fd, uint64_t ud);
int uc_raw_send(uc_core *c, int fd, const char *p, size_t len, uint64_t ud);
int uc_raw_cancel(uc_core *c, uint64_t target, uint64_t ud);
int uc_raw_poll(uc_core *c, int fd, uint64_t ud);
void uc_raw_recycle(uc_core *c, int bid);
int uc_raw_wait(uc_core *c, int timeout_ms, uint64_t *ud, int32_t *res, uint32_t *fl, int max);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
SHARED = os.path.dirname(HERE)   # backends/: proto_core.h, policy_core.h
with open(os.path.join(HERE, "event_core.c")) as _f:
    ffibuilder.set_source("parallelnet.backends.uring._uring", _f.read(), include_dirs=[HERE, SHARED],
                          depends=[os.path.join(SHARED, h) for h in ("proto_core.h", "policy_core.h")],
                          libraries=["dl"], extra_compile_args=["-O2", "-std=gnu11"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
