/*
 * native_api.h - what Python sees of the native core (native_core.c): its constants, the
 * structs it shares with Python (struct nc_stats, struct nc_config, struct nc_out), the
 * extern "Python" callbacks and every function the cffi extension exposes.  The one
 * declaration: native_core.c includes this header, and native_build.py feeds the text
 * between the cdef markers to ffi.cdef (cdef_build.py: the callbacks' "static" turned into
 * extern "Python"; nothing else is rewritten), so the compiler checks each prototype
 * against its definition and cffi reads the very same struct layouts.  Keep that part
 * cdef-parsable: integer #defines, enums, structs, typedefs and prototypes only
 * (comments are fine).
 */
#ifndef NATIVE_API_H
#define NATIVE_API_H
#include <stddef.h>
#include <stdint.h>
#include "policy_core.h"            /* struct pol_limits (native_build.py takes its cdef from there) */

/* ---- cdef begin ---- */
#define NC_MAX_LISTENERS 8
/* Who answers a connection (nc_config.protocols): echo/HTTP in C, or Python. */
#define NC_ECHO 0
#define NC_HTTP 1
#define NC_PY 2

struct nc_stats {
    uint64_t requests, bytes_in, bytes_out, wakeups, listen_wakeups, accepted, lost_races,
             closed, refused, errors, backpressure, open, accept_errors, accept_backoffs,
             max_pending, handoffs, handoff_lost, idle_timeouts, header_timeouts,
             output_holds, alloc_failures;
    /* by listener id: one more increment beside each total's */
    uint64_t l_accepted[NC_MAX_LISTENERS], l_listen_wakeups[NC_MAX_LISTENERS],
             l_lost_races[NC_MAX_LISTENERS];
};

struct nc_config {
    int stop_fd, nlisteners, exclusive, nids;   /* nids: listener ids in use (a hand-off naming another is refused) */
    int listeners[NC_MAX_LISTENERS];
    int listener_ids[NC_MAX_LISTENERS];   /* parallel to listeners */
    int protocols[NC_MAX_LISTENERS];      /* NC_ECHO/NC_HTTP/NC_PY by listener id */
    int handoff_fd;   /* --accept dispatch: the worker's end of its hand-off channel; -1: none */
    unsigned recv_size, max_conns, message_size, max_header_bytes, accept_backoff_ms;
    uint64_t max_output, max_body_bytes;
    struct pol_limits limits;   /* idle/request deadlines and the timer tick (0: off) */
    void *user;   /* the Python backend (a cffi handle), passed to the callbacks */
};

/* What a Python protocol's feed/pull/eof hands back: bytes to send (owned by Python
 * until the next callback), whether the protocol is closing, whether it holds an
 * incomplete request (rule request-deadline; only asked for protocols that can), and whether it holds
 * answers for a pull (rule held-answers). */
struct nc_out { const char *p; size_t len; int closing, partial, more; };

typedef struct nc_core nc_core;

/* extern "Python" callbacks (native.py), defined by cffi after the C source; each takes
 * the GIL.  Used for protocols not implemented in C (NC_PY) and for rare events only. */
static int nc_py_feed(void *user, int fd, int lid, const char *data, size_t len, struct nc_out *out);
static int nc_py_eof(void *user, int fd, int lid, struct nc_out *out);
static int nc_py_pull(void *user, int fd, int lid, struct nc_out *out);
static void nc_py_alloc_failed(void *user, int err);
static void nc_py_close(void *user, int fd);
static void nc_py_accept_failed(void *user, int err);
static void nc_py_handoff_lost(void *user, int err);

/* native_core.c: one worker's loop; nc_serve and nc_drain run it with the GIL released */
static nc_core *nc_new(const struct nc_config *cfg, struct nc_stats *st, int *err);
static int nc_serve(nc_core *c);
static void nc_drain(nc_core *c, int timeout_ms);
static void nc_free(nc_core *c);
static int nc_gettid(void);
/* ---- cdef end ---- */

#endif
