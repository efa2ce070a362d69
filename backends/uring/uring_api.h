/*
 * uring_api.h - what Python sees of the io_uring core: its constants, the structs it
 * shares with Python (struct uc_stats, struct uc_config) and every function the cffi
 * extension exposes.  The one declaration: event_core.c includes this header, and
 * build.py feeds the text between the cdef markers to ffi.cdef (the extern "Python"
 * callbacks' "static" turned into extern "Python"; nothing else is rewritten), so the
 * compiler checks each prototype against its definition and cffi reads the very same
 * struct layouts.  Keep that part cdef-parsable: integer #defines, enums, structs,
 * typedefs and prototypes only (comments are fine).
 */
#ifndef URING_API_H
#define URING_API_H
#include <stddef.h>
#include <stdint.h>
#include "policy_core.h"            /* struct pol_limits (build.py takes its cdef from there) */

/* ---- cdef begin ---- */
#define MAX_LISTENERS 8

/* Application events uc_wait reports, 4 int32 each: kind, connection id, a, b. */
enum { EV_OPEN = 1, EV_DATA, EV_EOF, EV_CLOSED, EV_STOP, EV_DRAINED, EV_TICK, EV_PULL,
       EV_SEND_FAILED };            /* a queued send failed: a = errno; its connection is closed */
/* What Python queues while processing a batch (uc_apply, uc_wait_acts): UC_ACT_WORDS int32
 * each, op, connection id, then the arguments of the direct call it stands for:
 * SEND_BUF bid off len (uc_send_buf), SEND_COPY data_off len - (uc_send_copy, the bytes at
 * data_off of the data passed along), FINISH, HOLD more, PULLED more, CLOSE error,
 * PROGRESS partial completed nbytes. */
#define UC_ACT_WORDS 5
enum { UC_ACT_SEND_BUF = 1, UC_ACT_SEND_COPY, UC_ACT_FINISH, UC_ACT_HOLD, UC_ACT_PULLED,
       UC_ACT_CLOSE, UC_ACT_PROGRESS };
/* Who answers a connection: Python (UC_PY), or proto_core.h's echo/HTTP (native-uring). */
enum { UC_PY = 0, UC_ECHO, UC_HTTP };

struct uc_stats {
    uint64_t entries, sqes, cqes, waits, enobufs, cq_overflows, cq_dropped, bytes_in, bytes_out,
             accept_cqes, accepted, accept_eagain, accept_errors, refused, backpressure,
             zc_sends, copied_sends, recv_arms, partial_sends, accept_backoffs, max_pending,
             handoffs, handoff_lost, handoff_wakeups, fixed_files, sendzc_ops, sendzc_notifs,
             idle_trims, msg_handoffs, malloc_trims, sendzc_held_max, blocking_waits, empty_waits,
             last_accept_error, failed, windowed_waits, window_us, arrival_per_s, accept_bursts,
             ring_fd_registered, util_pct, window_nr, closed_pct,
             /* the C-protocol mode's own (Python keeps these itself otherwise): */
             requests, opened, closed, errors, idle_timeouts, header_timeouts,
             /* rule held-answers and allocation failures (both modes): */
             output_holds, alloc_failures, gathered_sends,
             /* buffers kept in the provided ring (the rest wait warm in a stack): */
             ring_target, burst_accepted,
             /* calls Python made into the core (each releases and re-takes the GIL), and
              * the actions it queued instead of calls (uc_wait_acts): */
             py_calls, actions,
             /* receives that carried data per second (the window's arrivals, window_nr): */
             data_per_s,
             /* answers whose memory was handed to the send instead of copied (native-uring): */
             taken_sends;
    /* Per listener id (the address a connection came in on): small arrays, one increment
     * beside the total's, so they add up to accepted and accept_cqes. */
    uint64_t l_accepted[MAX_LISTENERS], l_accept_cqes[MAX_LISTENERS];
};

struct uc_config {
    unsigned entries, nbufs, bufsize, max_conns, setup_flags;
    uint64_t max_output;
    int stop_fd, multishot_accept, nlisteners, raw;
    int listeners[MAX_LISTENERS];
    int listener_ids[MAX_LISTENERS];    /* parallel to listeners: each one's listener id */
    int nids;                           /* listener ids in use (0: 1); a hand-off naming another is refused */
    unsigned cq_entries;            /* 0: 8 x entries */
    unsigned accept_backoff_ms;     /* first pause after EMFILE/ENFILE/ENOBUFS/ENOMEM on accept */
    int handoff_fd;                 /* --accept dispatch: AF_UNIX channel carrying SCM_RIGHTS; -1: none */
    /* Options measured in docs/uring.md (all off by default): */
    unsigned fixed_files;           /* >0: a sparse registered-file table of this size; conn id = index */
    unsigned sqpoll_idle_ms;        /* >0: IORING_SETUP_SQPOLL, the kernel thread idles after this */
    unsigned zc_threshold;          /* >0: sends of at least this many bytes use IORING_OP_SEND_ZC */
    unsigned latency_budget_us;     /* the batching window's bound (0: off), see window_us() */
    int fifo_ring;                  /* every provided buffer in the ring (no warm stack), see ring_add() */
    /* Idle and request deadlines, the timer tick (core/policy.py rules idle-timeout, request-deadline, coarse-timer; 0: off): swept
     * here at each tick, in both modes.  An EV_TICK is reported at each tick too. */
    struct pol_limits limits;
    /* C-protocol mode (native-uring): 0 = events go to Python; else each connection is
     * answered by lproto[its listener id] (UC_ECHO/UC_HTTP), and uc_serve/uc_drain/
     * uc_close_all run the whole loop in C (cproto.c). */
    int cproto;
    int lproto[MAX_LISTENERS];      /* C-protocol mode: UC_ECHO/UC_HTTP per listener id */
    unsigned message_size, max_header_bytes;
    uint64_t max_body_bytes;
    void *user;                     /* the Python backend (a cffi handle) for the callbacks */
};

typedef struct uc_core uc_core;
typedef struct uc_sender uc_sender;

/* extern "Python" callbacks (ring.py), defined by cffi after the C source; each takes
 * the GIL.  Rare events only: the start of an episode, logged once (core/accept.py's and
 * core/handoff.py's rule).  Not called when cfg.user is NULL (the probe's ring). */
static void uc_py_accept_paused(void *user, int err);
static void uc_py_handoff_lost(void *user, int err);
static void uc_py_alloc_failed(void *user, int err);

/* kernel_abi.h: liburing from the wheel (NULL or why not), its version; one bare call */
static const char *uc_init(const char *path);
static int uc_lib_version(void);
static int uc_nop(int x);

/* event_core.c: one worker's core, what Python calls around and inside a batch */
static uc_core *uc_new(const struct uc_config *cfg, int *err);
static void uc_start(uc_core *c);
static int uc_submit(uc_core *c);
static int uc_wait(uc_core *c, int timeout_ms);
static void uc_apply(uc_core *c, const int32_t *acts, int n, const char *data, size_t ndata);
static int uc_wait_acts(uc_core *c, int timeout_ms, const int32_t *acts, int n, const char *data,
                        size_t ndata, int32_t **events);
static int uc_send_copy(uc_core *c, int id, const char *p, size_t len);
static int uc_send_buf(uc_core *c, int id, int bid, unsigned off, unsigned len);
static int uc_send_static(uc_core *c, int id, const char *p, size_t len);
static void uc_finish(uc_core *c, int id);
static void uc_hold(uc_core *c, int id, int more);
static void uc_pulled(uc_core *c, int id, int more);
static void uc_close(uc_core *c, int id, int error);
static void uc_drain_begin(uc_core *c);
static void uc_shutdown(uc_core *c);
static int uc_free(uc_core *c);
static void uc_progress(uc_core *c, int id, int partial, unsigned completed, unsigned nbytes);
static int32_t *uc_events(uc_core *c);
static char *uc_pool(uc_core *c);
static size_t uc_pool_size(uc_core *c);
static struct uc_stats *uc_stats(uc_core *c);
static unsigned uc_setup_flags(uc_core *c);
static unsigned uc_features(uc_core *c);
static int uc_nconns(uc_core *c);
static int uc_inflight(uc_core *c);
static void uc_fail_submits(uc_core *c, int err);
/* the probe's checks */
static int uc_check_opcodes(uc_core *c);
static int uc_window_check(uc_core *c);
static int uc_opcode_supported(uc_core *c, int op);
/* --uring-handoff msg-ring: the worker's ring fd, the dispatcher's sender */
static int uc_ring_fd(uc_core *c);
static uc_sender *uc_sender_new(int *err);
static int uc_sender_send(uc_sender *s, int target_fd, int fd, int lid);
static void uc_sender_free(uc_sender *s);

/* raw_api.c: uring-py's, Python handles every completion */
static int uc_raw_accept(uc_core *c, int fd, uint64_t ud, int multishot);
static int uc_raw_recv(uc_core *c, int fd, uint64_t ud);
static int uc_raw_send(uc_core *c, int fd, const char *p, size_t len, uint64_t ud);
static int uc_raw_cancel(uc_core *c, uint64_t target, uint64_t ud);
static int uc_raw_poll(uc_core *c, int fd, uint64_t ud);
static void uc_raw_recycle(uc_core *c, int bid);
static int uc_raw_wait(uc_core *c, int timeout_ms, uint64_t *ud, int32_t *res, uint32_t *fl, int max);

/* cproto.c: native-uring's C-protocol mode, the whole loop in C */
static int uc_serve(uc_core *c);
static int uc_drain(uc_core *c, int timeout_ms);
static void uc_close_all(uc_core *c, int timeout_ms);
/* ---- cdef end ---- */

#endif
