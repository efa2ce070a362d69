/*
 * policy_core.h - the connection policy's numbers and deadline arithmetic, once in C.
 *
 * The rules are written in core/policy.py (its docstring, numbered) and core/accept.py;
 * the Python loops call those modules.  The two C cores that run whole loops without
 * Python - native_core.c (epoll) and uring/event_core.c (io_uring: `uring`, `native-uring`) -
 * include this header instead, so the arithmetic exists once per language:
 *
 *  - rule idle-timeout, idle timeout: no bytes in or out for idle_ms;
 *  - rule request-deadline, the request deadline: req_start_ms is set only by a feed that leaves a
 *    request incomplete (a new request starts there if that feed completed others or
 *    none was pending), cleared by a feed that completes it; the deadline is
 *    start + header_ms + req_bytes / min_rate, and a finishing connection is not cut;
 *  - rule coarse-timer, the coarse timer: tick_ms is Limits.timer_tick(), computed in Python and
 *    passed in; the core bounds its wait by the next tick only while a connection is
 *    open, and checks every connection when it is due;
 *  - rule drain, the drain: DRAIN_READS reads per connection at most (a core whose reads
 *    are smaller than Limits.recv_size's 64 KiB default reads DRAIN_BYTES instead);
 *  - core/accept.py: the listener's back-off doubles from Limits.accept_backoff up to
 *    ACCEPT_BACKOFF_MAX_MS, and which accept(2) errors lose one connection only.
 *
 * Time is CLOCK_MONOTONIC in milliseconds, read by the caller once per wait (vDSO).
 */
#ifndef POLICY_CORE_H
#define POLICY_CORE_H
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#define DRAIN_READS 64               /* core/policy.py DRAIN_READS */
/* The drain's bound in bytes: DRAIN_READS reads of Limits.recv_size's default, so a core
 * with small buffers (io_uring's --uring-buffer-size 512) drains as much as the others. */
#define DRAIN_BYTES ((uint64_t)DRAIN_READS * 65536)
#define ACCEPT_BACKOFF_MAX_MS 1000   /* core/accept.py ACCEPT_BACKOFF_MAX (1 s) */

/* One worker's deadlines (0: off), from core/backend.py Limits. */
struct pol_limits {
    int64_t idle_ms, header_ms, tick_ms;
    double min_rate;                 /* bytes/s (header_min_rate); 0: off */
};

/* The rules' state of one connection (core/policy.py ConnState: last, req_start, req_bytes). */
struct pol_conn { int64_t last_ms, req_start_ms; uint64_t req_bytes; };

enum { POL_LIVE = 0, POL_IDLE, POL_HEADER };

/* Rule request-deadline, after a feed that left a request incomplete (partial) or completed the one
 * that was (req_start_ms set); ConnectionPolicy.progress. */
static inline void pol_progress(struct pol_conn *p, int partial, uint64_t completed,
                                uint64_t nbytes, int64_t now_ms)
{
    if (!partial) p->req_start_ms = 0;
    else if (completed || !p->req_start_ms) { p->req_start_ms = now_ms; p->req_bytes = completed ? 0 : nbytes; }
    else p->req_bytes += nbytes;
}

/* Rules idle-timeout and request-deadline at a tick: POL_IDLE, POL_HEADER (past that deadline) or POL_LIVE;
 * ConnectionPolicy.expired (the caller counts). */
static inline int pol_expired(const struct pol_limits *l, const struct pol_conn *p, int closing,
                              int64_t now_ms)
{
    if (l->idle_ms && now_ms - p->last_ms >= l->idle_ms) return POL_IDLE;
    if (p->req_start_ms && l->header_ms && !closing) {
        double deadline = (double)(p->req_start_ms + l->header_ms);
        if (l->min_rate > 0) deadline += (double)p->req_bytes * 1000.0 / l->min_rate;
        if ((double)now_ms >= deadline) return POL_HEADER;
    }
    return POL_LIVE;
}

/* Rule coarse-timer: whether the tick has come (and arm the next one); ConnectionPolicy.due. */
static inline int pol_due(int64_t *next_ms, int64_t tick_ms, int64_t now_ms)
{
    if (!tick_ms || now_ms < *next_ms) return 0;
    *next_ms = now_ms + tick_ms;
    return 1;
}

/* core/accept.py AcceptPacer: the pause after the next failure. */
static inline unsigned pol_backoff_next(unsigned ms)
{
    return ms * 2 > ACCEPT_BACKOFF_MAX_MS ? ACCEPT_BACKOFF_MAX_MS : ms * 2;
}

/* core/accept.py ACCEPT_ONE_LOST (EINTR: retried): an accept(2) error that loses that
 * one connection (a peer that reset while queued, a firewall verdict), not the listener. */
static inline int pol_accept_one_lost(int err)
{
    return err == ECONNABORTED || err == EPROTO || err == EPERM || err == EINTR;
}

/* core/accept.py ACCEPT_RESOURCE_ERRORS: out of fds or memory; the connection stays
 * queued, so an immediate retry fails the same way. */
static inline int pol_accept_resource(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

#endif
