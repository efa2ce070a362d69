/*
 * native_core.c - the seed's design in C: one worker's whole event loop.
 *
 * The worker thread (a Python thread started and pinned by the core) calls
 * nc_serve() with the GIL released (cffi API mode releases it around every call):
 * its own epoll instance, the listening socket(s) it was given, accept until EAGAIN,
 * non-blocking reads and writes, echo or HTTP/1.1 plaintext, backpressure, half-close.
 * It stays there until the stop eventfd fires: Python reads the counters straight
 * from struct nc_stats (WorkerStats.refresh) and the core takes signals in another
 * thread, so nothing needs the loop to come back.  Since it runs in the Python worker
 * thread itself, the thread id the core recorded with bind_current_thread() is the
 * thread that does the work: /proc CPU accounting holds.
 *
 * Protocols other than echo and http run in Python through extern "Python" callbacks
 * (NC_PY: one GIL acquisition per received chunk); a protocol that raises closes that
 * connection only (logged and counted on the Python side, `errors` here).
 *
 * Semantics mirror backends/readiness.py (level-triggered):
 *  - listener readable: accept4() until EAGAIN; a wakeup that got nothing is a lost
 *    race.  With EXCLUSIVE the listener is added with EPOLLEXCLUSIVE.
 *  - connection readable: one recv() per wakeup, protocol, send at once; what the
 *    kernel does not take is queued in order, EPOLLOUT is armed.  Past max_output
 *    pending bytes reading pauses (backpressure) until the queue drains below half.
 *  - bounded output (core/policy.py rule held-answers): a protocol answers at most max_output / 2
 *    per call and holds the rest (pstate_more, or the Python protocol's `more`); the
 *    connection is then *held*: not read (EPOLLIN off, output_holds), and pulled
 *    (proto_http_pull / nc_py_pull) while its queue is at or below max_output / 2, at
 *    most max_output bytes per event, EPOLLOUT continuing it.  Body pieces are sent
 *    straight from proto_core.h's shared block.  An answer that cannot be allocated
 *    closes its connection (alloc_failures, logged once per worker); nothing of that
 *    call's answers is sent.
 *  - recv() == 0: the peer half-closed; flush what is queued, then close.
 *  - accept4() failing with EMFILE/ENFILE/ENOBUFS/ENOMEM: the listener is unwatched
 *    (EPOLL_CTL_DEL) and re-added after a back-off (accept_backoff_ms, doubling to 1 s,
 *    reset by a successful accept); the wait's timeout is the next re-add, so a
 *    server out of fds does not spin.  Counted in accept_errors / accept_backoffs.
 *  - timeouts (core/policy.py rules idle-timeout, request-deadline and coarse-timer, arithmetic in policy_core.h): each event
 *    stamps its connection with the clock read once per wakeup; a feed that leaves an
 *    HTTP request incomplete starts (or extends) its deadline, one that completes it
 *    clears it; while a connection is open the wait's timeout is the next coarse tick,
 *    and each tick closes the connections idle too long (idle_timeouts) or whose request
 *    is past its deadline (header_timeouts).  No connection open: no timer at all.
 *  - drain (nc_drain): accept the listen backlog once (not a listen wakeup, not a
 *    race), read what each connection's kernel buffer already holds (bounded) and
 *    answer it, flush within the drain timeout, close everything.  Listening sockets are never closed here.
 *  - --accept dispatch (handoff_fd >= 0): no listener; the core's acceptor passes each
 *    connected socket over an AF_UNIX SOCK_SEQPACKET channel as SCM_RIGHTS (one fd per
 *    message).  The channel is watched like a listener; readable: recvmsg until EAGAIN,
 *    each fd counted in accepted and handoffs and adopted (max_conns applies: refused).
 *    Not a listen wakeup, never a lost race.  Out of fds (EMFILE/ENFILE), the kernel
 *    cannot install the passed fd: recvmsg still consumes the message and reports
 *    MSG_CTRUNC, and that connection is LOST (its only reference is dropped, the peer
 *    sees a reset/close).  Counted in handoff_lost, logged once per episode.  At drain
 *    the channel is taken once more (the drain's last look), then unwatched.
 *  - several addresses: each connection keeps its listener id (the accepting listener's,
 *    or the hand-off message's one byte) and is answered by protocols[id] (echo/http in
 *    C, or Python through the callbacks, which receive the id); accepted, listen wakeups
 *    and lost races are counted per listener id too (l_* arrays, adding up to the totals).
 *
 * Counters live in struct nc_stats, written only by this thread; other threads read
 * them (aligned 64-bit words: a read never sees a torn value).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#define NC_MAXEVENTS 1024

#include "policy_core.h"
#include "handoff_recv.h"   /* --accept dispatch: the SCM_RIGHTS receiver of both C cores */

#include "native_api.h"     /* the constants, structs and functions Python sees, and the callbacks */

#include "proto_core.h"

/* ---- connections ------------------------------------------------------------- */
struct conn {
    int fd, reading, closing, held;   /* held: answers wait for a pull (rule held-answers) */
    int lid, proto;            /* listener id it came in on; cfg.protocols[lid] */
    uint32_t events;
    struct buf out;
    struct pstate ps;          /* protocol state (proto_core.h) */
    struct pol_conn pol;       /* deadlines (policy_core.h) */
};

struct nc_core {
    struct nc_config cfg;
    struct nc_stats *st;
    int ep, stopped, draining;
    struct conn **conns;
    size_t nconn_slots;
    uint64_t nconns;
    char *rbuf;
    struct proto proto;        /* echo/http in C (proto_core.h): response table, scratch */
    int64_t paused_until[NC_MAX_LISTENERS];  /* listener back-off: 0 = watched */
    int npaused;
    unsigned backoff_ms;
    int handoff_watched, handoff_losing;   /* channel in epoll; in a MSG_CTRUNC episode */
    int64_t now_ms, next_tick_ms;          /* the clock of this wakeup; the next sweep */
    int alloc_logged;                      /* an allocation failure was logged (once) */
};

#define TAG_CONN 0ULL
#define TAG_LISTEN 1ULL
#define TAG_STOP 2ULL
#define TAG_HANDOFF 3ULL
#define MK(tag, v) (((tag) << 32) | (uint32_t)(v))

static int ep_set(nc_core *c, struct conn *k, uint32_t events)
{
    if (k->events == events || k->fd < 0) return 0;
    struct epoll_event ev = {.events = events, .data.u64 = MK(TAG_CONN, k->fd)};
    k->events = events;
    return epoll_ctl(c->ep, EPOLL_CTL_MOD, k->fd, &ev);
}

static void conn_close(nc_core *c, struct conn *k, int error)
{
    if (k->fd < 0) return;
    epoll_ctl(c->ep, EPOLL_CTL_DEL, k->fd, NULL);
    if (k->proto == NC_PY) nc_py_close(c->cfg.user, k->fd);
    close(k->fd);
    c->conns[k->fd] = NULL;
    k->fd = -1;
    buf_free(&k->out);
    pstate_free(&k->ps);
    free(k);
    c->nconns--;
    c->st->open = c->nconns;
    c->st->closed++;
    if (error) c->st->errors++;
}

/* Read nothing more; close as soon as pending output is flushed and no answer is held.
 * May free k. */
static void conn_finish(nc_core *c, struct conn *k)
{
    k->closing = 1;
    k->reading = 0;
    if (k->out.len || k->held) ep_set(c, k, EPOLLOUT);
    else conn_close(c, k, 0);
}

/* An answer could not be allocated: that connection ends (its answers of this call are
 * not sent), counted, logged once per worker.  Frees k. */
static void conn_alloc_failed(nc_core *c, struct conn *k)
{
    c->st->alloc_failures++;
    if (!c->alloc_logged) {
        c->alloc_logged = 1;
        nc_py_alloc_failed(c->cfg.user, ENOMEM);
    }
    conn_close(c, k, 1);
}

/* Send, keeping order with what is queued.  Returns -1 if k was closed (freed). */
static int conn_send(nc_core *c, struct conn *k, const char *p, size_t n)
{
    if (!n) return 0;
    if (!k->out.len) {
        ssize_t s;
        do s = send(k->fd, p, n, MSG_NOSIGNAL); while (s < 0 && errno == EINTR);
        if (s < 0) {
            if (errno != EAGAIN) { conn_close(c, k, 1); return -1; }
            s = 0;
        }
        c->st->bytes_out += (uint64_t)s;
        if ((size_t)s == n) return 0;
        p += s;
        n -= (size_t)s;
    }
    if (buf_append(&k->out, p, n) < 0) { conn_close(c, k, 1); return -1; }
    if (k->out.len > c->st->max_pending) c->st->max_pending = k->out.len;  /* high-water mark */
    if (k->reading && k->out.len > c->cfg.max_output) {
        k->reading = 0;   /* backpressure: stop reading a client that does not read */
        c->st->backpressure++;
    }
    ep_set(c, k, EPOLLOUT | (k->reading ? EPOLLIN : 0));
    return 0;
}

/* Echo one chunk: count messages, send it back.  Returns -1 if k was freed. */
static int echo_feed(nc_core *c, struct conn *k, const char *data, size_t len)
{
    c->st->bytes_in += len;
    c->st->requests += proto_echo_count(&c->proto, &k->ps, len);
    return conn_send(c, k, data, len);
}

static int conn_pull(nc_core *c, struct conn *k);

/* The peer's FIN: a partial request is dropped unanswered (http; echo has nothing), held
 * answers are still produced, then the connection closes once flushed. */
static void conn_eof(nc_core *c, struct conn *k)
{
    if (k->proto == NC_PY) {
        struct nc_out o = {0};
        if (nc_py_eof(c->cfg.user, k->fd, k->lid, &o) < 0) { conn_close(c, k, 1); return; }
        if (conn_send(c, k, o.p, o.len) < 0) return;
        k->held = o.more;
    } else {
        proto_eof(&k->ps);
        k->held = pstate_more(&k->ps);
    }
    conn_finish(c, k);
}

/* After a feed that left answers held: stop reading, pull.  Returns -1 if k was freed. */
static int conn_hold(nc_core *c, struct conn *k)
{
    k->held = 1;
    if (k->reading && !k->closing) { k->reading = 0; c->st->output_holds++; }
    return conn_pull(c, k);
}

/* Rule held-answers: pull held answers while the queue is at or below the low mark, at most
 * max_output bytes per call (EPOLLOUT continues it); once nothing is held, finish or
 * resume reading.  Returns -1 if k was freed. */
static int conn_pull(nc_core *c, struct conn *k)
{
    int fd = k->fd;
    uint64_t low = c->cfg.max_output / 2, produced = 0;
    while (k->held && k->out.len <= low) {
        if (produced > c->cfg.max_output) break;   /* other connections first */
        const char *p;
        size_t len;
        int64_t n;
        if (k->proto == NC_PY) {
            struct nc_out o = {0};
            n = nc_py_pull(c->cfg.user, fd, k->lid, &o);
            if (n < 0) { conn_close(c, k, 1); return -1; }   /* handler bug: this connection */
            p = o.p; len = o.len;
            k->held = o.more;
            if (o.closing) k->ps.pclosing = 1;
        } else {
            n = proto_http_pull(&c->proto, &k->ps, &p, &len);
            if (n < 0) { conn_alloc_failed(c, k); return -1; }
            k->held = pstate_more(&k->ps);
        }
        c->st->requests += (uint64_t)n;
        produced += len;
        if (conn_send(c, k, p, len) < 0) return -1;
        if (k->proto != NC_PY) proto_scratch_done(&c->proto);
    }
    if (k->held) { ep_set(c, k, EPOLLOUT); return 0; }   /* writable: pull again */
    if (k->ps.pclosing && !k->closing) {
        conn_finish(c, k);
        return c->conns[fd] ? 0 : -1;
    }
    if (k->closing) {
        if (!k->out.len) { conn_close(c, k, 0); return -1; }
        ep_set(c, k, EPOLLOUT);
        return 0;
    }
    if (k->out.len <= low) k->reading = 1;   /* resume (rule backpressure's condition) */
    ep_set(c, k, (k->reading ? EPOLLIN : 0) | (k->out.len ? EPOLLOUT : 0));
    return 0;
}

/* One recv; returns 1 if data was handled and the connection may be read again,
 * 0 if EAGAIN or the connection stopped reading, -1 if it is gone. */
static int conn_read_once(nc_core *c, struct conn *k)
{
    ssize_t r;
    do r = recv(k->fd, c->rbuf, c->cfg.recv_size, 0); while (r < 0 && errno == EINTR);
    if (r < 0) {
        if (errno == EAGAIN) return 0;
        conn_close(c, k, 1);
        return -1;
    }
    if (r == 0) {
        int fd = k->fd;
        conn_eof(c, k);
        return c->conns[fd] ? 0 : -1;
    }
    int fd = k->fd;
    if (k->proto == NC_ECHO) {
        if (echo_feed(c, k, c->rbuf, (size_t)r) < 0) return -1;
    } else if (k->proto == NC_PY) {
        struct nc_out o = {0};
        c->st->bytes_in += (uint64_t)r;
        int n = nc_py_feed(c->cfg.user, fd, k->lid, c->rbuf, (size_t)r, &o);
        if (n < 0) { conn_close(c, k, 1); return -1; }  /* handler bug: this connection only */
        c->st->requests += (uint64_t)n;
        if (o.partial || k->pol.req_start_ms)
            pol_progress(&k->pol, o.partial, (uint64_t)n, (uint64_t)r, c->now_ms);
        if (conn_send(c, k, o.p, o.len) < 0) return -1;
        if (o.closing && !k->closing) {
            k->ps.pclosing = 1;
            conn_finish(c, k);
            if (!c->conns[fd]) return -1;
        } else if (o.more && conn_hold(c, k) < 0) return -1;
    } else {
        c->st->bytes_in += (uint64_t)r;
        int64_t n = proto_http_feed(&c->proto, &k->ps, c->rbuf, (size_t)r);
        if (n < 0) { conn_alloc_failed(c, k); return -1; }
        c->st->requests += (uint64_t)n;
        if (pstate_partial(&k->ps) || k->pol.req_start_ms)   /* rule request-deadline: only around a partial one */
            pol_progress(&k->pol, pstate_partial(&k->ps), (uint64_t)n, (uint64_t)r, c->now_ms);
        if (conn_send(c, k, c->proto.scratch.p, c->proto.scratch.len) < 0) return -1;
        proto_scratch_done(&c->proto);
        if (k->ps.pclosing && !k->closing) {
            conn_finish(c, k);
            if (!c->conns[fd]) return -1;
        } else if (pstate_more(&k->ps) && conn_hold(c, k) < 0) return -1;
    }
    return k->reading ? 1 : 0;
}

static void conn_writable(nc_core *c, struct conn *k)
{
    struct buf *o = &k->out;
    if (o->len) {
        ssize_t s;
        do s = send(k->fd, o->p + o->head, o->len, MSG_NOSIGNAL); while (s < 0 && errno == EINTR);
        if (s < 0) {
            if (errno != EAGAIN) { conn_close(c, k, 1); return; }
            s = 0;
        }
        c->st->bytes_out += (uint64_t)s;
        buf_consume(o, (size_t)s);
    }
    if (k->held) {   /* rule held-answers: pull the next answers once the queue is low */
        if (o->len <= c->cfg.max_output / 2) conn_pull(c, k);
        return;
    }
    if (o->len) {
        if (!k->reading && !k->closing && o->len <= c->cfg.max_output / 2) {
            k->reading = 1;   /* below the low-water mark: resume */
            ep_set(c, k, EPOLLIN | EPOLLOUT);
        }
        return;
    }
    if (k->closing) { conn_close(c, k, 0); return; }
    if (o->cap > (1u << 16)) buf_free(o);  /* do not keep a big idle buffer */
    k->reading = 1;
    ep_set(c, k, EPOLLIN);
}

static void add_connection(nc_core *c, int fd, int lid)
{
    struct nc_stats *st = c->st;
    if (c->nconns >= c->cfg.max_conns) { st->refused++; close(fd); return; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if ((size_t)fd >= c->nconn_slots) {
        size_t n = c->nconn_slots ? c->nconn_slots : 1024;
        while (n <= (size_t)fd) n *= 2;
        struct conn **q = realloc(c->conns, n * sizeof *q);
        if (!q) { st->refused++; close(fd); return; }
        memset(q + c->nconn_slots, 0, (n - c->nconn_slots) * sizeof *q);
        c->conns = q;
        c->nconn_slots = n;
    }
    struct conn *k = calloc(1, sizeof *k);
    if (!k) { st->refused++; close(fd); return; }
    k->fd = fd;
    k->lid = lid;
    k->proto = c->cfg.protocols[lid];
    k->reading = 1;
    k->events = EPOLLIN;
    k->pol.last_ms = c->now_ms;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = MK(TAG_CONN, fd)};
    if (epoll_ctl(c->ep, EPOLL_CTL_ADD, fd, &ev) < 0) { free(k); st->refused++; close(fd); return; }
    c->conns[fd] = k;
    c->nconns++;
    st->open = c->nconns;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Out of fds (or memory): stop watching listener i for a back-off, so the
 * level-triggered loop does not spin on a socket it cannot accept from.  The pending
 * connections wait in the kernel's backlog. */
static void pause_listener(nc_core *c, int i, int err)
{
    c->st->accept_backoffs++;
    if (c->backoff_ms == c->cfg.accept_backoff_ms)   /* a new episode: log it once */
        nc_py_accept_failed(c->cfg.user, err);
    if (c->paused_until[i]) return;
    epoll_ctl(c->ep, EPOLL_CTL_DEL, c->cfg.listeners[i], NULL);
    c->paused_until[i] = now_ms() + c->backoff_ms;
    c->npaused++;
    c->backoff_ms = pol_backoff_next(c->backoff_ms);
}

static int listener_add(nc_core *c, int i)
{
    struct epoll_event lev = {.events = EPOLLIN | (c->cfg.exclusive ? EPOLLEXCLUSIVE : 0),
                              .data.u64 = MK(TAG_LISTEN, i)};
    return epoll_ctl(c->ep, EPOLL_CTL_ADD, c->cfg.listeners[i], &lev);
}

/* Re-watch the listeners whose back-off is over; returns ms until the next one is due
 * (-1: none paused). */
static int resume_listeners(nc_core *c)
{
    int64_t now = now_ms(), next = -1;
    for (int i = 0; i < c->cfg.nlisteners; i++) {
        if (!c->paused_until[i]) continue;
        if (now >= c->paused_until[i]) {
            c->paused_until[i] = 0;
            c->npaused--;
            listener_add(c, i);
        } else if (next < 0 || c->paused_until[i] - now < next) {
            next = c->paused_until[i] - now;
        }
    }
    return (int)next;
}

/* Accept until EAGAIN (the seed's rule).  `wakeup`: this is a listen wakeup (counted,
 * and one that got nothing is a lost race); the drain's last look is not. */
static int do_accept(nc_core *c, int i, int wakeup)
{
    struct nc_stats *st = c->st;
    int lfd = c->cfg.listeners[i], lid = c->cfg.listener_ids[i];
    int won = 0;
    if (wakeup) { st->listen_wakeups++; st->l_listen_wakeups[lid]++; }
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            if (e == EINTR) continue;
            if (e == EAGAIN || e == EWOULDBLOCK) break;
            st->accept_errors++;
            if (pol_accept_resource(e)) {
                pause_listener(c, i, e);
                break;
            }
            if (pol_accept_one_lost(e)) continue;  /* that one only */
            break;
        }
        won++;
        add_connection(c, fd, lid);
    }
    if (won) c->backoff_ms = c->cfg.accept_backoff_ms;
    st->accepted += (uint64_t)won;
    st->l_accepted[lid] += (uint64_t)won;
    if (!won && wakeup) { st->lost_races++; st->l_lost_races[lid]++; }
    return won;
}

static void handoff_adopt(void *core, int fd, int lid)
{
    nc_core *c = core;
    /* The acceptor's socket was not made non-blocking (accept4 here sets SOCK_NONBLOCK;
     * Python's accept does not): a blocking send would stall the whole loop on one slow
     * reader. */
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK)) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    c->st->accepted++;
    c->st->l_accepted[lid]++;
    add_connection(c, fd, lid);   /* over max_conns: closed, counted refused */
}

static void handoff_episode(void *core) { nc_py_handoff_lost(((nc_core *)core)->cfg.user, EMFILE); }

/* --accept dispatch: take every connection waiting on the hand-off channel
 * (backends/handoff_recv.h).  Called on readiness and once more by the drain; neither
 * counts a listen wakeup or a lost race.  EOF - the acceptor closed its end: stop watching
 * (no spin). */
static void handoff_take(nc_core *c)
{
    if (handoff_recv(c->cfg.handoff_fd, c->cfg.nids, &c->handoff_losing, &c->st->handoffs,
                     &c->st->handoff_lost, handoff_adopt, handoff_episode, c) == HANDOFF_EOF) {
        if (c->handoff_watched) epoll_ctl(c->ep, EPOLL_CTL_DEL, c->cfg.handoff_fd, NULL);
        c->handoff_watched = 0;
    }
}

/* ---- public API --------------------------------------------------------------- */
static nc_core *nc_new(const struct nc_config *cfg, struct nc_stats *st, int *err)
{
    nc_core *c = calloc(1, sizeof *c);
    if (!c) { *err = ENOMEM; return NULL; }
    c->cfg = *cfg;
    if (c->cfg.nlisteners > NC_MAX_LISTENERS) c->cfg.nlisteners = NC_MAX_LISTENERS;
    if (c->cfg.nids < 1 || c->cfg.nids > NC_MAX_LISTENERS) c->cfg.nids = c->cfg.nids < 1 ? 1 : NC_MAX_LISTENERS;
    for (int i = 0; i < NC_MAX_LISTENERS; i++)   /* ids index the per-listener arrays */
        if (c->cfg.listener_ids[i] < 0 || c->cfg.listener_ids[i] >= c->cfg.nids) c->cfg.listener_ids[i] = 0;
    if (!c->cfg.recv_size) c->cfg.recv_size = 65536;
    if (!c->cfg.max_header_bytes) c->cfg.max_header_bytes = 8192;
    c->st = st;
    c->rbuf = malloc(c->cfg.recv_size);
    c->ep = epoll_create1(EPOLL_CLOEXEC);
    if (c->ep < 0 || !c->rbuf) {
        *err = c->ep < 0 ? errno : ENOMEM;
        if (c->ep >= 0) close(c->ep);
        free(c->rbuf);
        free(c);
        return NULL;
    }
    if (!c->cfg.accept_backoff_ms) c->cfg.accept_backoff_ms = 1;
    c->backoff_ms = c->cfg.accept_backoff_ms;
    c->now_ms = now_ms();
    c->next_tick_ms = c->now_ms + c->cfg.limits.tick_ms;
    proto_init(&c->proto, c->cfg.message_size, c->cfg.max_header_bytes, c->cfg.max_body_bytes,
               c->cfg.max_output);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = MK(TAG_STOP, 0)};
    if (cfg->stop_fd >= 0 && epoll_ctl(c->ep, EPOLL_CTL_ADD, cfg->stop_fd, &ev) < 0) goto fail;
    for (int i = 0; i < cfg->nlisteners; i++)
        if (listener_add(c, i) < 0) goto fail;
    if (cfg->handoff_fd >= 0) {
        struct epoll_event hev = {.events = EPOLLIN, .data.u64 = MK(TAG_HANDOFF, 0)};
        if (epoll_ctl(c->ep, EPOLL_CTL_ADD, cfg->handoff_fd, &hev) < 0) goto fail;
        c->handoff_watched = 1;
    }
    return c;
fail:
    *err = errno;
    close(c->ep);
    free(c->rbuf);
    free(c);
    return NULL;
}

static void dispatch(nc_core *c, struct epoll_event *evs, int n)
{
    for (int i = 0; i < n; i++) {
        uint64_t tag = evs[i].data.u64 >> 32;
        uint32_t v = (uint32_t)evs[i].data.u64;
        uint32_t mask = evs[i].events;
        if (tag == TAG_LISTEN) {
            if (!c->draining && v < (uint32_t)c->cfg.nlisteners && !c->paused_until[v])
                do_accept(c, (int)v, 1);
            continue;
        }
        if (tag == TAG_STOP) { c->stopped = 1; continue; }
        if (tag == TAG_HANDOFF) {
            if (!c->draining && c->handoff_watched) handoff_take(c);
            continue;
        }
        if (v >= c->nconn_slots) continue;
        struct conn *k = c->conns[v];
        if (!k) continue;   /* closed earlier in this batch */
        k->pol.last_ms = c->now_ms;
        if (mask & EPOLLOUT || (mask & (EPOLLERR | EPOLLHUP) && !k->reading)) {
            conn_writable(c, k);
            if (c->conns[v] != k) continue;
        }
        if (mask & (EPOLLIN | EPOLLERR | EPOLLHUP) && k->reading && !c->draining)
            conn_read_once(c, k);
    }
}

/* Rules idle-timeout and request-deadline at a tick: close what is past its idle or request deadline. */
static void sweep(nc_core *c)
{
    for (size_t fd = 0; fd < c->nconn_slots; fd++) {
        struct conn *k = c->conns[fd];
        if (!k) continue;
        int why = pol_expired(&c->cfg.limits, &k->pol, k->closing, c->now_ms);
        if (why == POL_LIVE) continue;
        if (why == POL_IDLE) c->st->idle_timeouts++;
        else c->st->header_timeouts++;
        conn_close(c, k, 0);
    }
}

/* Serve until the stop eventfd fires.  Returns 0 when stopped, -errno on a fatal epoll
 * error.  The wait blocks indefinitely unless a listener waits out an accept back-off
 * or a connection is open while a timeout is set (then it wakes at the next tick): an
 * idle server makes no wakeups.  Signals are not this thread's business (the core
 * takes them in the main thread and sets the stop eventfd); EINTR just waits again. */
static int nc_serve(nc_core *c)
{
    struct epoll_event evs[NC_MAXEVENTS];
    int64_t tick = c->cfg.limits.tick_ms;
    int timeout = -1;
    while (!c->stopped) {
        int n = epoll_wait(c->ep, evs, NC_MAXEVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        c->st->wakeups++;
        if (tick) c->now_ms = now_ms();
        dispatch(c, evs, n);
        if (tick && pol_due(&c->next_tick_ms, tick, c->now_ms)) sweep(c);
        timeout = c->npaused ? resume_listeners(c) : -1;
        if (tick && c->nconns) {
            int left = (int)(c->next_tick_ms - c->now_ms);
            if (left < 1) left = 1;
            if (timeout < 0 || left < timeout) timeout = left;
        }
    }
    return 0;
}

/* Stop accepting; answer what was received; flush within timeout_ms; close all. */
static void nc_drain(nc_core *c, int timeout_ms)
{
    struct epoll_event evs[NC_MAXEVENTS];
    if (c->cfg.stop_fd >= 0) epoll_ctl(c->ep, EPOLL_CTL_DEL, c->cfg.stop_fd, NULL);
    for (int i = 0; i < c->cfg.nlisteners; i++) {
        if (c->paused_until[i]) continue;   /* out of fds at stop: already unwatched */
        do_accept(c, i, 0);   /* the backlog, once: not a wakeup, not a race */
        epoll_ctl(c->ep, EPOLL_CTL_DEL, c->cfg.listeners[i], NULL);
    }
    if (c->handoff_watched) {   /* what the acceptor handed over before stop, once */
        handoff_take(c);
        if (c->handoff_watched) epoll_ctl(c->ep, EPOLL_CTL_DEL, c->cfg.handoff_fd, NULL);
        c->handoff_watched = 0;
    }
    memset(c->paused_until, 0, sizeof c->paused_until);
    c->npaused = 0;
    c->draining = 1;
    for (size_t fd = 0; fd < c->nconn_slots; fd++) {
        struct conn *k = c->conns[fd];
        if (!k) continue;
        for (int r = 0; r < DRAIN_READS && k->reading; r++)
            if (conn_read_once(c, k) <= 0) break;
        if ((k = c->conns[fd]) != NULL && !k->closing) conn_finish(c, k);
    }
    int64_t deadline = now_ms() + timeout_ms;
    while (c->nconns) {
        int64_t left = deadline - now_ms();
        if (left <= 0) break;
        int n = epoll_wait(c->ep, evs, NC_MAXEVENTS, (int)left);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        c->st->wakeups += n > 0;
        dispatch(c, evs, n);
    }
    for (size_t fd = 0; fd < c->nconn_slots; fd++)
        if (c->conns[fd]) conn_close(c, c->conns[fd], 0);
}

static void nc_free(nc_core *c)
{
    if (!c) return;
    for (size_t fd = 0; fd < c->nconn_slots; fd++)
        if (c->conns[fd]) conn_close(c, c->conns[fd], 0);
    close(c->ep);
    free(c->conns);
    free(c->rbuf);
    proto_free(&c->proto);
    free(c);
}

static int nc_gettid(void) { return (int)syscall(SYS_gettid); }
