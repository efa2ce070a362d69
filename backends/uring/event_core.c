/*
 * event_core.c - the per-worker io_uring event core behind `uring` (and `native-uring`).
 *
 * Python (backends/uring/uring.py) runs the protocol; this file runs everything that happens
 * once per completion: reaping CQEs, recycling provided buffers, re-arming multishot
 * recv/accept, send bookkeeping, backpressure, cancellation and close.  One uc_wait()
 * call submits, waits (GIL released by cffi) and returns a batch of *application*
 * events, so Python crosses into C about once per batch plus once per reply.
 *
 * liburing comes from the PyPI wheel `liburing` (2.15 C API exported by its extension
 * module).  We ship no headers: the kernel-ABI structs and constants are our own
 * (kernel_abi.h), struct io_uring is opaque (allocated generously), and every liburing
 * function is resolved with dlsym at uc_init() - linking fails because the wheel's SONAME
 * differs.
 *
 * One translation unit (build.py): uring_api.h (what Python sees), kernel_abi.h, this
 * file, then raw_api.c (uring-py's raw API) and cproto.c (native-uring's C-protocol
 * mode), each of which uses this file's internals.
 *
 * Invariants that make this safe:
 *  - A connection slot is released only when none of its operations is in the kernel
 *    (recv_armed == 0 && sending == 0), so a late CQE never meets a reused slot, and
 *    never a freed buffer: close = cancel, wait for the terminal CQEs, then close(fd).
 *  - Slots released during a batch become reusable only at the next uc_wait(), so an
 *    id means the same connection for the whole batch Python is processing.
 *  - A provided buffer handed to Python (LENT) returns to the ring at the next
 *    uc_wait(), unless Python sent it back (PINNED): then it returns when that send
 *    completes.  The kernel never writes a buffer that is not in the ring.
 *
 * Bounded output (core/policy.py rule held-answers): a protocol that holds answers back at its
 * output budget makes its connection *held* (uc_hold): reading stops as under
 * backpressure (not counted as such: output_holds), and each time the connection's
 * pending output is at or below max_output / 2 the core emits one EV_PULL, on which the
 * protocol produces its next answers (at most its budget, one pull per event: other
 * connections get their turn in between).  A held connection that finishes closes only
 * once nothing is held and everything is sent.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE                 /* accept4 (Python.h defines it too, when cffi includes it first) */
#endif
#include <dlfcn.h>
#include <malloc.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/timerfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include "proto_core.h"         /* echo/http in C: the C-protocol mode (native-uring) */
#include "policy_core.h"        /* core/policy.py's deadlines and numbers, in C */
#include "handoff_recv.h"       /* --accept dispatch: the SCM_RIGHTS receiver of both C cores */
#include "uring_api.h"          /* the constants, structs and functions Python sees */
#include "kernel_abi.h"         /* io_uring's ABI, liburing resolved at uc_init */

static int uc_nop(int x) { return x + 1; }  /* for measuring the bare cost of one cffi call */

/* ---- the core ------------------------------------------------------------------ */
/* OP_MSG is never submitted by this ring: the acceptor's IORING_OP_MSG_RING posts it. */
enum { OP_ACCEPT = 1, OP_RECV, OP_SEND, OP_STOP, OP_CANCEL, OP_HANDOFF, OP_MSG, OP_SENDZC };
enum { B_RING = 0, B_LENT, B_PINNED, B_FREE, B_SPARE };
/* struct chunk.bid when the chunk is not a provided buffer: malloc'd (freed when sent),
 * or static memory (proto_core.h's body block: never freed). */
#define CHUNK_HEAP (-1)
#define CHUNK_STATIC (-2)
#define UD(op, id) (((uint64_t)(uint32_t)(id) << 8) | (op))
#define BGID 1
#define IDLE_TRIM_MS 100            /* no connection for this long: give pool pages back */
#define TRIM_EVERY_MS 100           /* a drained backlog's malloc_trim, at most this often */
#define ACCEPT_BURST 16             /* SOCK_NONEMPTY: accepted synchronously at most, per CQE */
#define SEND_IOV_MAX 16             /* queued chunks gathered into one SENDMSG */
#define PIN_MAX 8                   /* provided buffers one connection may hold in its queue */
#define RING_SLACK 16               /* buffers in the ring beyond two per open connection */

/* A gathered send: its msghdr and iovec live apart from the connection table (which a
 * new connection may move with realloc) until the SQE is submitted - the kernel copies
 * both then (IORING_FEAT_SUBMIT_STABLE); the chunks they point to stay until the CQE. */
struct sendvec { struct msghdr msg; struct iovec iov[SEND_IOV_MAX]; };

/* zc_refs: SEND_ZC notifications still due for sends from this chunk (the kernel may
 * read its memory until then); a chunk done with (sent, or its connection gone) while
 * zc_refs > 0 is detached from its connection and freed by the last notification. */
struct chunk { struct chunk *next; char *base; uint32_t len, off; int32_t bid;
               uint32_t zc_refs; uint8_t detached, kept; };

/* One SEND_ZC in flight: its result CQE and its notification both carry
 * UD(OP_SENDZC, hold index), so the notification finds the memory even after the
 * connection's slot was released and reused. */
struct zc_hold { struct chunk *h; int conn; int next_free; };

struct conn {
    int fd;
    uint8_t used, reading, paused, recv_armed, recv_cancel, sending, closing, dead,
            eof, starved, drain_read, error, fixed;
    uint8_t was_paused;             /* in a backpressure episode since its queue last emptied */
    uint8_t held, pull_due;         /* rule held-answers: answers held; an EV_PULL is on its way */
    uint8_t backlogged;             /* output queued behind the send in flight (window_nr) */
    uint64_t drain_left;            /* rule drain: bytes it may still read at stop (DRAIN_BYTES) */
    int64_t replied_ns;             /* when its output last drained (0: not since its last request) */
    uint8_t lid;                    /* listener id: which address (and protocol) it came in on */
    uint64_t send_ud;               /* user_data of the send in flight (cancel) */
    struct sendvec *sv;             /* the gathered send's msghdr and iovec (allocated on first use) */
    uint8_t pinned;                 /* provided buffers in its queue (at most PIN_MAX) */
    uint64_t pending;               /* bytes queued or in flight */
    struct pol_conn pol;            /* last progress (data in, send done), the request's deadline */
    struct chunk *head, *tail;
};
static void drain_start(struct conn *k);   /* rule drain (below drain_reads) */

/* paused: out of fds at accept; re-armed at resume_ms (the wait is bounded by it). */
struct listener { int fd; uint8_t armed, cancel, paused; int64_t resume_ms; };

struct uc_core {
    char ring[1024] __attribute__((aligned(64)));  /* struct io_uring, opaque */
    struct uc_config cfg;
    struct uc_stats st;
    unsigned flags_in_effect, features;
    struct io_uring_buf_ring *br;
    int br_mask, br_pending;        /* buffers added since the last advance */
    unsigned ring_free;             /* buffers the kernel may pick */
    int *spare; unsigned nspare;    /* ours to give, kept out of the ring: a stack (see ring_want) */
    unsigned ring_want, ring_grown; /* buffers to keep in the ring; its growth after ENOBUFS */
    char *pool; size_t pool_size;
    uint8_t *bstate;
    int *lent; int nlent;
    struct conn *conns; int nconn_slots, nconns;
    int *freelist, nfree; int *deferred, ndeferred;
    struct listener lis[MAX_LISTENERS];
    int stop_armed, stop_seen, draining, shutting, inflight, any_starved, handoff_armed;
    int32_t *ev; int nev, evcap, evret;
    int64_t now_ms;                 /* CLOCK_MONOTONIC, read once per uc_wait (vDSO, no syscall) */
    uint64_t freed_copies;          /* bytes of copied output freed since the last malloc_trim */
    int pool_dirty;                 /* the kernel (or a drain read) wrote the pool since the last trim */
    int64_t idle_since_ms;          /* when nconns last became 0; -1: connections open */
    unsigned backoff_ms;
    int accept_failing;             /* in an accept back-off episode (logged once) */
    int handoff_losing;             /* in a MSG_CTRUNC episode (logged once) */
    int inject_err;                 /* fault injection (tests): every submit fails with it */
    int fail;                       /* errno: the ring is unusable (failed submit, lost CQEs) */
    int rearm_cursor;               /* ENOBUFS re-arm resumes here: no id is starved for good */
    int trim_due;                   /* a backpressure backlog drained: give its heap back */
    int64_t last_trim_ms;           /* malloc_trim at most every TRIM_EVERY_MS */
    int handoff_closed;             /* the acceptor closed its end of the channel */
    struct zc_hold *holds; int nholds, free_hold;
    double rate;                    /* completions per ns, time-weighted moving average */
    int64_t rate_t0; unsigned rate_cqes;
    double data_rate;               /* receives that carried data, per ns, likewise */
    unsigned rate_data;
    double util; int64_t cpu_t0;    /* share of a CPU this thread used, same average */
    /* the window's inputs (window_nr) */
    int64_t now_ns;                 /* CLOCK_MONOTONIC of this batch */
    int nbacklogged;                /* connections with output queued behind a send in flight */
    uint64_t arrivals, quick;       /* requests after a reply, and those within half the budget */
    double closed;                  /* share of quick ones, time-weighted moving average */
    struct proto proto;             /* C-protocol mode: response table and scratch */
    int alloc_logged;               /* an allocation failure was logged (once per worker) */
    struct pstate *ps; int ps_cap;  /* C-protocol mode: per connection id */
    int64_t next_tick_ms;
    uint64_t zc_outstanding;        /* SEND_ZC notifications due */
};
#define RING(c) ((struct io_uring *)(c)->ring)

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t mono_ms(void) { return mono_ns() / 1000000; }

static int64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);   /* a syscall: once per period only */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}


static void emit(uc_core *c, int kind, int id, int a, int b)
{
    if (c->nev + 1 > c->evcap) {    /* grows rarely; Python re-reads the pointer each batch */
        int cap = c->evcap * 2;
        int32_t *n = realloc(c->ev, (size_t)cap * 4 * sizeof(int32_t));
        if (!n) { if (!c->fail) c->fail = ENOMEM; return; }   /* the worker fails with it */
        c->ev = n; c->evcap = cap;
    }
    int32_t *e = c->ev + 4 * c->nev++;
    e[0] = kind; e[1] = id; e[2] = a; e[3] = b;
}

/* An SQE, flushing the SQ to the kernel first if it is full (counted as an entry).
 * NULL if the flush failed: the core is then failed (c->fail), every later call reports
 * that errno and the worker stops with it - never abort(), which in thread mode would
 * take every worker of the server down with this one. */
static struct io_uring_sqe *sqe_get(uc_core *c)
{
    if (c->fail) return NULL;
    struct io_uring_sqe *s = p_io_uring_get_sqe(RING(c));
    if (!s) {
        int r = c->inject_err ? -c->inject_err : p_io_uring_submit(RING(c));
        c->st.entries++;
        if (r > 0) c->st.sqes += r;
        s = p_io_uring_get_sqe(RING(c));
        while (!s && (c->flags_in_effect & IORING_SETUP_SQPOLL)) {  /* the SQ thread has not */
            p_io_uring_sqring_wait(RING(c));                         /* consumed them yet */
            s = p_io_uring_get_sqe(RING(c));
        }
        if (!s) { c->fail = r < 0 ? -r : EBUSY; return NULL; }
    }
    c->inflight++;
    return s;
}

/* Which buffers the kernel gets.  The buffer ring is a FIFO: the kernel takes the
 * oldest entry, so with every buffer in the ring each one was reused only after all the
 * others (320 x 64 KiB = 20 MiB per worker cycled through the caches): a 64 KiB echo's
 * receive then wrote, and its send read, memory that had long left them.  The ring holds
 * only what the open connections can use before the next wait (ring_want: two per
 * connection and some slack, more after the ring ran dry), and the rest waits in a stack
 * of spare buffers, the most recently used on top: the same few buffers come round again
 * while they are still warm, and the pool's resident memory follows the buffers in use
 * (measured side by side with --uring-ring fifo: 0.95x [0.90-1.01] the CPU at a 64 KiB
 * echo, docs/uring.md "A warm ring").  Every buffer is still there to be had: an ENOBUFS
 * doubles the growth (ring_grown, kept until the worker is idle) and the ring is topped
 * up from the stack at every wait. */
static void ring_add(uc_core *c, int bid)
{
    c->bstate[bid] = B_RING;
    p_io_uring_buf_ring_add(c->br, c->pool + (size_t)bid * c->cfg.bufsize, c->cfg.bufsize,
                            (unsigned short)bid, c->br_mask, c->br_pending++);
    c->ring_free++;
}

static void buf_recycle(uc_core *c, int bid)
{
    if ((unsigned)bid >= c->cfg.nbufs) { c->bstate[bid] = B_FREE; return; }  /* scratch */
    if (c->ring_free < c->ring_want) { ring_add(c, bid); return; }
    c->bstate[bid] = B_SPARE;
    c->spare[c->nspare++] = bid;
}

/* The ring's size for the connections open now (see ring_add), and the top-up. */
static void ring_refill(uc_core *c)
{
    /* uring-py's connections are Python's, not counted here: every buffer in the ring
     * (and with --uring-ring fifo, the behaviour before the warm stack, for comparison). */
    unsigned want = c->cfg.raw || c->cfg.fifo_ring ? c->cfg.nbufs : 2 * (unsigned)c->nconns + RING_SLACK;
    if (want < c->ring_grown) want = c->ring_grown;
    if (want > c->cfg.nbufs) want = c->cfg.nbufs;
    c->ring_want = want;
    c->st.ring_target = want;
    while (c->ring_free < want && c->nspare) ring_add(c, c->spare[--c->nspare]);
}

static void arm_recv(uc_core *c, int id)
{
    struct conn *k = &c->conns[id];
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return;
    p_io_uring_prep_recv_multishot(s, k->fd, NULL, 0, 0);
    s->flags |= IOSQE_BUFFER_SELECT;
    if (k->fixed) { s->fd = id; s->flags |= IOSQE_FIXED_FILE; }
    s->buf_group = BGID;
    s->user_data = UD(OP_RECV, id);
    k->recv_armed = 1; k->starved = 0;
    c->st.recv_arms++;
}

static void cancel_op(uc_core *c, uint64_t target)
{
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return;
    p_io_uring_prep_cancel64(s, target, 0);
    s->user_data = UD(OP_CANCEL, 0);
}

static void arm_accept(uc_core *c, int i)
{
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return;
    if (c->cfg.multishot_accept) p_io_uring_prep_multishot_accept(s, c->lis[i].fd, NULL, NULL, SOCK_CLOEXEC);
    else p_io_uring_prep_accept(s, c->lis[i].fd, NULL, NULL, SOCK_CLOEXEC);
    s->user_data = UD(OP_ACCEPT, i);
    c->lis[i].armed = 1;
}

static int hold_new(uc_core *c, struct chunk *h, int id)
{
    if (c->free_hold < 0) {
        int n = c->nholds ? 2 * c->nholds : 64;
        struct zc_hold *z = realloc(c->holds, (size_t)n * sizeof *z);
        if (!z) return -1;
        for (int i = n - 1; i >= c->nholds; i--) { z[i].h = NULL; z[i].next_free = c->free_hold; c->free_hold = i; }
        c->holds = z; c->nholds = n;
    }
    int i = c->free_hold;
    c->free_hold = c->holds[i].next_free;
    c->holds[i].h = h; c->holds[i].conn = id;
    return i;
}

/* A chunk the connection is done with: freed (or its provided buffer recycled) unless
 * a SEND_ZC notification is still due for it; then the last notification does it. */
static void chunk_done(uc_core *c, struct chunk *h)
{
    if (h->zc_refs) { h->detached = 1; h->next = NULL; return; }
    if (h->bid >= 0) buf_recycle(c, h->bid);
    else if (h->bid == CHUNK_HEAP) { free(h->base); c->freed_copies += h->len; }
    free(h);
}

/* The notification of hold i (or a result that announced none): the kernel no longer
 * reads that memory. */
static void hold_release(uc_core *c, int i)
{
    struct chunk *h = c->holds[i].h;
    c->holds[i].h = NULL; c->holds[i].next_free = c->free_hold; c->free_hold = i;
    c->zc_outstanding--;
    if (!--h->zc_refs && h->detached) chunk_done(c, h);
}

/* Whether a connection has output queued behind its send in flight (another chunk, or
 * the rest of a partial send): the window then does not hold the completion that lets
 * the next chunk go, which would cost one window per chunk of a large reply. */
static void backlog_update(uc_core *c, struct conn *k)
{
    uint8_t b = k->head && (k->head->next || k->head->off);
    if (b != k->backlogged) { k->backlogged = b; c->nbacklogged += b ? 1 : -1; }
}

/* One send for what the connection has queued: the head chunk alone with SEND (or SEND_ZC
 * past the threshold), or up to SEND_IOV_MAX queued chunks gathered into one SENDMSG, so
 * a reply made of several chunks (a large echo arrives in several provided buffers) costs
 * one ring round trip instead of one per chunk.  on_send_result walks the chunks the
 * result covers. */
static void submit_send(uc_core *c, int id)
{
    struct conn *k = &c->conns[id];
    struct chunk *h = k->head;
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return;
    uint32_t len = h->len - h->off;
    uint64_t ud = UD(OP_SEND, id);
    int hi = c->cfg.zc_threshold && len >= c->cfg.zc_threshold ? hold_new(c, h, id) : -1;
    if (hi < 0 && h->next && (k->sv || (k->sv = malloc(sizeof *k->sv)))) {
        struct sendvec *v = k->sv;
        int n = 0;
        for (struct chunk *x = h; x && n < SEND_IOV_MAX; x = x->next, n++) {
            v->iov[n].iov_base = x->base + x->off;
            v->iov[n].iov_len = x->len - x->off;
        }
        memset(&v->msg, 0, sizeof v->msg);
        v->msg.msg_iov = v->iov;
        v->msg.msg_iovlen = (size_t)n;
        p_io_uring_prep_sendmsg(s, k->fd, &v->msg, MSG_NOSIGNAL);
        c->st.gathered_sends++;
    } else if (hi >= 0) {
        /* SEND_ZC: the result CQE ends the send (accounting, next chunk, close may go
         * ahead); the notification, which a peer that stops reading may hold back for
         * good, only gives the memory back (hold_release). */
        p_io_uring_prep_send_zc(s, k->fd, h->base + h->off, len, MSG_NOSIGNAL, 0);
        ud = UD(OP_SENDZC, hi);
        h->zc_refs++;
        c->st.sendzc_ops++;
        if (++c->zc_outstanding > c->st.sendzc_held_max) c->st.sendzc_held_max = c->zc_outstanding;
    } else p_io_uring_prep_send(s, k->fd, h->base + h->off, len, MSG_NOSIGNAL);
    if (k->fixed) { s->fd = id; s->flags |= IOSQE_FIXED_FILE; }
    s->user_data = ud;
    k->send_ud = ud;
    k->sending = 1;
}

/* Release the slot once the kernel holds nothing of this connection. */
static void maybe_release(uc_core *c, int id)
{
    struct conn *k = &c->conns[id];
    if (!k->dead || k->recv_armed || k->sending || !k->used) return;
    if (k->fixed) { int none = -1; p_io_uring_register_files_update(RING(c), id, &none, 1); }
    close(k->fd);
    for (struct chunk *h = k->head, *n; h; h = n) { n = h->next; chunk_done(c, h); }
    k->head = k->tail = NULL;
    k->pinned = 0;
    free(k->sv);
    k->sv = NULL;
    backlog_update(c, k);
    if (k->was_paused) c->trim_due = 1;
    k->used = 0;
    c->nconns--;
    emit(c, EV_CLOSED, id, k->error, 0);
    c->deferred[c->ndeferred++] = id;   /* reusable from the next batch on */
}

/* Stop everything on this connection; the slot goes when the kernel lets go. */
static void conn_kill(uc_core *c, int id, int error)
{
    struct conn *k = &c->conns[id];
    if (!k->used || k->dead) return;
    k->dead = 1; k->reading = 0; k->error = (uint8_t)error; k->drain_read = 0;
    if (k->recv_armed && !k->recv_cancel) { cancel_op(c, UD(OP_RECV, id)); k->recv_cancel = 1; }
    if (k->sending) cancel_op(c, k->send_ud);
    maybe_release(c, id);
}

static void conn_open(uc_core *c, int fd, int lid)
{
    c->st.accepted++;               /* taken, whether kept or refused (as every backend counts) */
    c->st.l_accepted[lid]++;
    if (c->nconns >= (int)c->cfg.max_conns) { close(fd); c->st.refused++; return; }
    if (!c->nfree) {                /* grow the table; ids stay valid */
        int n = c->nconn_slots * 2;
        struct conn *nc = realloc(c->conns, n * sizeof *nc);
        if (nc) { memset(nc + c->nconn_slots, 0, (n - c->nconn_slots) * sizeof *nc); c->conns = nc; }
        int *nf = nc ? realloc(c->freelist, n * sizeof(int)) : NULL;
        if (nf) c->freelist = nf;
        int *nd = nf ? realloc(c->deferred, n * sizeof(int)) : NULL;
        if (!nd) { close(fd); c->st.refused++; return; }   /* out of memory: as over the limit */
        c->deferred = nd;
        for (int i = n - 1; i >= c->nconn_slots; i--) c->freelist[c->nfree++] = i;
        c->nconn_slots = n;
    }
    int id = c->freelist[--c->nfree];
    struct conn *k = &c->conns[id];
    c->idle_since_ms = -1;
    memset(k, 0, sizeof *k);
    k->fd = fd; k->used = 1; k->reading = 1; k->pol.last_ms = c->now_ms; k->lid = (uint8_t)lid;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  /* fails harmlessly on AF_UNIX */
    /* Registered file: recv/send then name the table slot (no fget/fput per op); the
     * plain fd stays for the synchronous drain reads and close(2).  One extra syscall
     * at open and one at close: worth it only for long-lived connections. */
    if ((unsigned)id < c->cfg.fixed_files && p_io_uring_register_files_update(RING(c), id, &fd, 1) == 1) {
        k->fixed = 1; c->st.fixed_files++;
    }
    c->nconns++;
    emit(c, EV_OPEN, id, fd, lid);  /* Python picks the protocol by lid */
    if (c->shutting) conn_kill(c, id, 0);
    else if (c->draining) drain_start(k);   /* read what it sent before stop, then finish */
    else arm_recv(c, id);
}

/* Drain: accept what the kernel already completed, synchronously (the listener is O_NONBLOCK). */
static void accept_backlog(uc_core *c, int i)
{
    for (;;) {
        int fd = accept4(c->lis[i].fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) { if (errno == EINTR || errno == ECONNABORTED) continue; break; }
        conn_open(c, fd, c->cfg.listener_ids[i]);
    }
}

/* A listener id that came with a hand-off: valid, or -1 (a dispatcher bug; the
 * connection is then closed and counted lost rather than served by a wrong protocol). */
static int handoff_lid(uc_core *c, int lid)
{
    return lid >= 0 && lid < (c->cfg.nids > 0 ? c->cfg.nids : 1) ? lid : -1;
}

/* --accept dispatch: the core's acceptor thread passes connected sockets over an
 * AF_UNIX SOCK_SEQPACKET channel as SCM_RIGHTS (core/dispatch.py).  A single-shot poll
 * on the channel, re-armed after each completion, wakes the ring; then every waiting
 * fd is taken with recvmsg until EAGAIN (handoff_recv.h: one message per fd). */
static void arm_handoff(uc_core *c)
{
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return;
    p_io_uring_prep_poll_add(s, c->cfg.handoff_fd, POLLIN);
    s->user_data = UD(OP_HANDOFF, 0);
    c->handoff_armed = 1;
}

static void handoff_adopt(void *core, int fd, int lid) { conn_open(core, fd, lid); }

static void handoff_episode(void *core)
{
    uc_core *c = core;
    if (c->cfg.user) uc_py_handoff_lost(c->cfg.user, EMFILE);
}

/* Every waiting fd (backends/handoff_recv.h: counted in handoffs, or lost; a loss logged
 * once per episode).  EOF - the acceptor closed its end: its poll would fire (HUP) at once
 * each time it is re-armed, so it is not. */
static void handoff_take(uc_core *c)
{
    int nids = c->cfg.nids > 0 ? c->cfg.nids : 1;
    if (handoff_recv(c->cfg.handoff_fd, nids, &c->handoff_losing, &c->st.handoffs,
                     &c->st.handoff_lost, handoff_adopt, handoff_episode, c) == HANDOFF_EOF)
        c->handoff_closed = 1;
}

static void on_recv_terminal(uc_core *c, int id)
{
    struct conn *k = &c->conns[id];
    k->recv_armed = 0; k->recv_cancel = 0;
    if (k->dead) { maybe_release(c, id); return; }
    if (k->closing || k->eof) return;
    if (c->draining) {
        if (k->paused) emit(c, EV_DRAINED, id, 0, 0);
        else drain_start(k);
        return;
    }
    if (k->reading && !k->starved) arm_recv(c, id);
}

/* Rule held-answers: a held connection whose pending output is at or below the low mark gets one
 * EV_PULL (until the protocol has answered it with uc_hold). */
static void pull_check(uc_core *c, int id)
{
    struct conn *k = &c->conns[id];
    if (k->held && !k->pull_due && !k->dead && k->pending <= c->cfg.max_output / 2) {
        k->pull_due = 1;
        emit(c, EV_PULL, id, 0, 0);
    }
}

/* A send's result: account it, send the rest or the next chunk, resume or close. */
static void on_send_result(uc_core *c, int id, int res)
{
    struct conn *k = &c->conns[id];
    k->sending = 0;
    if (k->dead) { maybe_release(c, id); return; }
    if (res <= 0) { conn_kill(c, id, res != -ECANCELED); return; }
    k->pol.last_ms = c->now_ms;
    c->st.bytes_out += res; k->pending -= res;
    uint32_t left = (uint32_t)res;
    while (left) {   /* a gathered send may cover several chunks, the last one partly */
        struct chunk *h = k->head;
        uint32_t take = h->len - h->off < left ? h->len - h->off : left;
        h->off += take;
        left -= take;
        if (h->off < h->len) break;
        k->head = h->next; if (!k->head) k->tail = NULL;
        if (h->bid >= 0 && k->pinned) k->pinned--;
        chunk_done(c, h);
    }
    backlog_update(c, k);
    if (k->head && k->head->off) c->st.partial_sends++;
    if (k->head) submit_send(c, id);
    else {
        k->replied_ns = c->now_ns | 1;   /* its answer is out: the next request is a reply to it */
        /* A backpressure backlog has drained: its copies' heap goes back to the OS at
         * the next wait (not in steady state, where a trim is only a latency blip). */
        if (k->was_paused) { k->was_paused = 0; c->trim_due = 1; }
        if (k->closing && !k->held) { conn_kill(c, id, 0); return; }
    }
    if (k->held) pull_check(c, id);
    else if (k->paused && !k->closing && k->pending <= c->cfg.max_output / 2) {  /* low-water: resume */
        k->paused = 0; k->reading = 1;
        if (!c->draining && !k->recv_armed) arm_recv(c, id);
    }
}

static void on_cqe(uc_core *c, struct io_uring_cqe *q)
{
    int op = q->user_data & 0xff, id = (int)(q->user_data >> 8), res = q->res;
    int more = q->flags & IORING_CQE_F_MORE;
    if (!more && op != OP_MSG) c->inflight--;
    switch (op) {
    case OP_RECV: {
        struct conn *k = &c->conns[id];
        if (q->flags & IORING_CQE_F_BUFFER) {
            int bid = q->flags >> IORING_CQE_BUFFER_SHIFT;
            c->ring_free--; c->pool_dirty = 1;
            if (res > 0 && !k->dead && !k->closing) {
                k->pol.last_ms = c->now_ms;
                c->rate_data++;
                if (k->replied_ns) {   /* a request after our answer: how soon (window_nr) */
                    c->arrivals++;
                    c->quick += c->now_ns - k->replied_ns <= (int64_t)c->cfg.latency_budget_us * 500;
                    k->replied_ns = 0;
                }
                c->bstate[bid] = B_LENT; c->lent[c->nlent++] = bid;
                c->st.bytes_in += res;
                emit(c, EV_DATA, id, bid, res);
            } else buf_recycle(c, bid);  /* data after close/finish: fed to nobody */
        }
        if (!more) {
            if (res == 0 && !k->dead) { k->eof = 1; k->reading = 0; if (!k->closing) emit(c, EV_EOF, id, 0, 0); }
            else if (res == -ENOBUFS) {   /* the ring ran dry: keep more in it from now on */
                c->st.enobufs++; k->starved = 1; c->any_starved = 1;
                unsigned g = 2 * (c->ring_want > c->ring_grown ? c->ring_want : c->ring_grown);
                c->ring_grown = g < c->cfg.nbufs ? g : c->cfg.nbufs;
            }
            else if (res < 0 && res != -ECANCELED && !k->dead) {   /* reset, ...: close */
                k->recv_armed = 0; k->recv_cancel = 0; conn_kill(c, id, 1); break;
            }
            on_recv_terminal(c, id);
        }
        break;
    }
    case OP_SEND:
        on_send_result(c, id, res);
        break;
    case OP_SENDZC:                 /* id is the hold; see submit_send */
        if (q->flags & IORING_CQE_F_NOTIF) { c->st.sendzc_notifs++; hold_release(c, id); break; }
        {
            int conn = c->holds[id].conn;
            if (!more) hold_release(c, id);   /* failed before sending: no notification follows */
            on_send_result(c, conn, res);
        }
        break;
    case OP_ACCEPT: {
        struct listener *l = &c->lis[id];
        int lid = c->cfg.listener_ids[id];
        if (res != -ECANCELED) { c->st.accept_cqes++; c->st.l_accept_cqes[lid]++; }  /* our own cancel at stop is no wakeup */
        if (res >= 0) {
            conn_open(c, res, lid); c->backoff_ms = c->cfg.accept_backoff_ms; c->accept_failing = 0;
            /* More connections wait in the backlog (a burst): take some now, as the
             * seed's readiness loop accepts until EAGAIN, instead of one ring round trip
             * each.  Bounded, so one worker does not take a whole burst from the others. */
            if ((q->flags & IORING_CQE_F_SOCK_NONEMPTY) && !c->draining) {
                c->st.accept_bursts++;
                for (int b = 0; b < ACCEPT_BURST; b++) {
                    int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
                    if (fd < 0) { if (errno == EINTR || errno == ECONNABORTED) continue; break; }
                    c->st.burst_accepted++;   /* accepted, but no wake-up: accepted - accept_cqes */
                    conn_open(c, fd, lid);
                }
            }
        }
        else if (res == -EAGAIN) c->st.accept_eagain++;     /* not produced by 6.x: see ring.py */
        else if (res != -ECANCELED) {
            c->st.accept_errors++; c->st.last_accept_error = -res;
            if (!pol_accept_one_lost(-res)) {
                /* Out of a resource (EMFILE...), or the listener itself is unusable
                 * (EINVAL: not listening, EBADF, ENOTSOCK): re-arming at once would fail
                 * at once, a spin through the ring.  Pause this listener; uc_wait re-arms
                 * it after a back-off.  The others lose one connection only. */
                if (!l->paused) {
                    l->paused = 1; c->st.accept_backoffs++;
                    l->resume_ms = c->now_ms + c->backoff_ms;
                    c->backoff_ms = pol_backoff_next(c->backoff_ms);
                    if (!c->accept_failing && c->cfg.user) uc_py_accept_paused(c->cfg.user, -res);
                    c->accept_failing = 1;
                }
                if (more && !l->cancel) { cancel_op(c, UD(OP_ACCEPT, id)); l->cancel = 1; }
            }
        }
        if (!more) {
            l->armed = 0; l->cancel = 0;
            if (c->draining && !c->shutting) accept_backlog(c, id);
            else if (!c->draining && !l->paused) arm_accept(c, id);
        }
        break;
    }
    case OP_HANDOFF:
        c->handoff_armed = 0;
        if (res != -ECANCELED) c->st.handoff_wakeups++;   /* our own cancel at stop is none */
        if (c->shutting) break;
        handoff_take(c);            /* while draining: the drain's last look, not a wakeup */
        if (!c->draining && !c->handoff_closed) arm_handoff(c);
        break;
    case OP_MSG:                    /* --uring-handoff msg-ring: res is the fd handed over, id its listener id */
        if (handoff_lid(c, id) < 0) { close(res); c->st.handoff_lost++; break; }
        c->st.handoffs++; c->st.msg_handoffs++;
        conn_open(c, res, id);      /* draining: read what it sent; shutting: closed at once */
        break;
    case OP_STOP:
        c->stop_armed = 0;
        if (res != -ECANCELED) { c->stop_seen = 1; emit(c, EV_STOP, 0, 0, 0); }
        break;
    default: break;  /* OP_CANCEL: its own result does not matter, the target's CQE does */
    }
}

/* The pool is allocated lazily, and the ring is FIFO: left alone, each buffer's first page
 * would be faulted in by the first receive into it, so every request took a minor fault
 * until the ring had gone round once (320 requests with the defaults; a low-rate run over
 * a short warm-up counted them per request).  A receive of a request writes at the start
 * of its buffer, so writing each buffer's first page here, when nothing is in the kernel
 * (setup, or the idle trim), moves those faults out of the request path for the price of
 * one page per buffer of resident memory (1.5 MiB with the defaults). */
static void pool_touch_heads(uc_core *c)
{
    for (size_t off = 0; off < c->pool_size; off += c->cfg.bufsize)
        ((volatile char *)c->pool)[off] = 0;
}

static uc_core *uc_new(const struct uc_config *cfg, int *err)
{
    *err = 0;
    if (!uc_ready) { *err = ENOENT; return NULL; }
    uc_core *c = aligned_alloc(64, sizeof *c);
    if (!c) { *err = ENOMEM; return NULL; }
    memset(c, 0, sizeof *c);
    c->cfg = *cfg;
    if (c->cfg.nlisteners > MAX_LISTENERS) c->cfg.nlisteners = MAX_LISTENERS;
    if (c->cfg.nids > MAX_LISTENERS || c->cfg.nids < 1) c->cfg.nids = c->cfg.nids < 1 ? 1 : MAX_LISTENERS;
    for (int i = 0; i < MAX_LISTENERS; i++)   /* ids index the per-listener arrays */
        if (c->cfg.listener_ids[i] < 0 || c->cfg.listener_ids[i] >= c->cfg.nids) c->cfg.listener_ids[i] = 0;
    if (!c->cfg.accept_backoff_ms) c->cfg.accept_backoff_ms = 50;
    c->backoff_ms = c->cfg.accept_backoff_ms;
    c->now_ms = mono_ms();
    c->idle_since_ms = -1;
    c->free_hold = -1;
    /* Strongest first: one issuer thread + task work deferred to our own wait is the
     * cheapest (no IPIs, completions run when we ask); COOP avoids interrupting us;
     * plain works everywhere.  cfg.setup_flags != 0 forces one set (for experiments). */
    static const unsigned tries[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL,
        IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG | IORING_SETUP_SUBMIT_ALL,
        0 };
    /* SQPOLL: a kernel thread (iou-sqp-<tid>, a task of this process: its CPU must be
     * counted with ours, see ring.py) polls the SQ; DEFER_TASKRUN is not allowed with it. */
    static const unsigned sqpoll_tries[] = {
        IORING_SETUP_SQPOLL | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_SUBMIT_ALL,
        IORING_SETUP_SQPOLL | IORING_SETUP_SUBMIT_ALL,
        IORING_SETUP_SQPOLL };
    int r = -EINVAL;
    for (unsigned i = 0; i < 3; i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        p.flags = (cfg->setup_flags ? cfg->setup_flags : cfg->sqpoll_idle_ms ? sqpoll_tries[i] : tries[i])
                  | IORING_SETUP_CQSIZE;
        if (cfg->sqpoll_idle_ms) { p.flags |= IORING_SETUP_SQPOLL; p.sq_thread_idle = cfg->sqpoll_idle_ms; }
        p.cq_entries = cfg->cq_entries ? cfg->cq_entries : cfg->entries * 8;  /* roomy CQ: overflow is the slow path */
        r = p_io_uring_queue_init_params(cfg->entries, RING(c), &p);
        if (r == 0) { c->flags_in_effect = p.flags; c->features = p.features; break; }
        if (r != -EINVAL || cfg->setup_flags) break;
    }
    if (r < 0) { *err = -r; free(c); return NULL; }
    /* The ring's fd registered with this thread (the worker's: uc_new runs in it): each
     * io_uring_enter then skips the fd-table lookup and reference (fget/fput). */
    if (p_io_uring_register_ring_fd(RING(c)) == 1) c->st.ring_fd_registered = 1;
    c->rate_t0 = mono_ns();
    c->cpu_t0 = thread_cpu_ns();
    c->next_tick_ms = c->now_ms + c->cfg.limits.tick_ms;
    if (c->cfg.cproto) proto_init(&c->proto, cfg->message_size, cfg->max_header_bytes, cfg->max_body_bytes,
                                  cfg->max_output);
    c->evcap = 1024; c->ev = malloc(c->evcap * 4 * sizeof(int32_t));
    c->nconn_slots = 256;
    c->conns = calloc(c->nconn_slots, sizeof *c->conns);
    c->freelist = malloc(c->nconn_slots * sizeof(int)); c->deferred = malloc(c->nconn_slots * sizeof(int));
    for (int i = c->nconn_slots - 1; i >= 0; i--) c->freelist[c->nfree++] = i;
    /* Buffers: nbufs in the provided ring + DRAIN_READS scratch ones for synchronous
     * reads during drain, all in one pool so Python addresses them alike (bid * size). */
    unsigned total = cfg->nbufs + DRAIN_READS;
    c->pool_size = (size_t)total * cfg->bufsize;
    c->pool = aligned_alloc(4096, c->pool_size);
    c->bstate = calloc(total, 1);
    c->lent = malloc(total * sizeof(int));
    c->spare = malloc(total * sizeof(int));
    if (!c->ev || !c->conns || !c->freelist || !c->deferred || !c->pool || !c->bstate || !c->lent || !c->spare) { *err = ENOMEM; goto fail; }
    c->br = p_io_uring_setup_buf_ring(RING(c), cfg->nbufs, BGID, 0, &r);
    if (!c->br) { *err = -r; goto fail; }
    if (cfg->fixed_files && (r = p_io_uring_register_files_sparse(RING(c), cfg->fixed_files)) < 0) {
        p_io_uring_free_buf_ring(RING(c), c->br, cfg->nbufs, BGID);
        *err = -r; goto fail;
    }
    c->br_mask = p_io_uring_buf_ring_mask(cfg->nbufs);
    pool_touch_heads(c);
    for (unsigned b = total; b-- > 0; ) buf_recycle(c, (int)b);   /* all stacked, bid 0 on top */
    ring_refill(c);                                                /* then the ring filled */
    for (int i = 0; i < c->cfg.nlisteners; i++) c->lis[i].fd = cfg->listeners[i];
    return c;
fail:
    p_io_uring_queue_exit(RING(c));
    free(c->ev); free(c->conns); free(c->freelist); free(c->deferred); free(c->pool); free(c->bstate); free(c->lent); free(c->spare);
    free(c);
    return NULL;
}

static void uc_start(uc_core *c)
{
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return;                 /* failed: the first uc_wait reports it */
    p_io_uring_prep_poll_add(s, c->cfg.stop_fd, POLLIN);   /* the stop eventfd wakes our wait */
    s->user_data = UD(OP_STOP, 0);
    c->stop_armed = 1;
    for (int i = 0; i < c->cfg.nlisteners; i++) arm_accept(c, i);
    if (c->cfg.handoff_fd >= 0) arm_handoff(c);
}

/* Rule drain for one connection: read what it sent before stop, DRAIN_BYTES at most. */
static void drain_start(struct conn *k)
{
    k->drain_read = 1;
    k->drain_left = DRAIN_BYTES;
}

/* Synchronous reads during drain (what the peer sent before stop). */
static int drain_reads(uc_core *c)
{
    for (int id = 0; id < c->nconn_slots; id++) {
        struct conn *k = &c->conns[id];
        if (!k->used || !k->drain_read) continue;
        if (k->dead || k->closing) { k->drain_read = 0; continue; }
        while (k->drain_left > 0) {  /* bounded in bytes, across batches (DRAIN_BYTES) */
            int bid = -1;
            for (unsigned b = c->cfg.nbufs; b < c->cfg.nbufs + DRAIN_READS; b++)
                if (c->bstate[b] == B_FREE) { bid = (int)b; break; }
            if (bid < 0) return 1;  /* Python holds them all: continue next batch */
            size_t want = k->drain_left < c->cfg.bufsize ? (size_t)k->drain_left : c->cfg.bufsize;
            ssize_t r = recv(k->fd, c->pool + (size_t)bid * c->cfg.bufsize, want, MSG_DONTWAIT);
            c->pool_dirty = 1;
            if (r > 0) {
                k->drain_left -= (uint64_t)r;
                c->bstate[bid] = B_LENT; c->lent[c->nlent++] = bid; c->st.bytes_in += r;
                emit(c, EV_DATA, id, bid, (int)r);
                continue;
            }
            k->drain_read = 0;
            if (r == 0) { k->eof = 1; emit(c, EV_EOF, id, 0, 0); }
            else if (errno == EAGAIN || errno == EWOULDBLOCK) emit(c, EV_DRAINED, id, 0, 0);
            else conn_kill(c, id, 1);
            break;
        }
        if (k->drain_read) { k->drain_read = 0; emit(c, EV_DRAINED, id, 0, 0); }  /* read enough */
    }
    return 0;
}

/* The provided-buffer pool is a FIFO ring: the kernel hands out every buffer in turn,
 * and one large read dirties all of a buffer's pages, so under varied traffic the
 * pool's RSS climbs to its full size (nbufs x bufsize per worker) and, being one
 * allocation that is never freed, stays there.  With no connection left no recv is
 * in the kernel (a slot is released only after its last CQE) and Python holds no
 * buffer (lent ones were recycled at the top of uc_wait), so nothing can read or
 * write the pool: its pages go back to the OS (they come back zero-filled on the
 * next write), and glibc's free heap with them. */
static void pool_trim(uc_core *c)
{
    size_t len = c->pool_size & ~(size_t)(sysconf(_SC_PAGESIZE) - 1);  /* pool is page-aligned */
    if (len) madvise(c->pool, len, MADV_DONTNEED);
    pool_touch_heads(c);
    malloc_trim(0);
    c->freed_copies = 0;
    c->pool_dirty = 0;
    c->ring_grown = 0;              /* idle: the next burst sizes the ring afresh */
    c->st.idle_trims++;
}

/* Rules idle-timeout and request-deadline at a tick (policy_core.h): close the connections idle too long or
 * whose request is past its deadline; a closed one is reported by EV_CLOSED as usual. */
static void sweep(uc_core *c)
{
    for (int id = 0; id < c->nconn_slots; id++) {
        struct conn *k = &c->conns[id];
        if (!k->used || k->dead) continue;
        int why = pol_expired(&c->cfg.limits, &k->pol, k->closing, c->now_ms);
        if (why == POL_LIVE) continue;
        if (why == POL_IDLE) c->st.idle_timeouts++;
        else c->st.header_timeouts++;
        conn_kill(c, id, 0);
    }
}

/* ---- the batching window (--uring-latency-budget-us) --------------------------------
 * Below saturation completions arrive one at a time, and a wait that returns at the
 * first one costs a sleep and a wake-up per completion (about a third of all server
 * CPU at 40k req/s, C servers included).  io_uring can wait for a batch with a bound on
 * the delay: io_uring_submit_and_wait_min_timeout(wait_nr = N, min_wait = B us) returns
 * as soon as N completions are posted, or, B us after the wait began, as soon as at least
 * one is (kernel >= 6.12, IORING_FEAT_MIN_TIMEOUT; one that expires with nothing posted
 * returns at the next completion, so the first request after an idle gap is not held).
 * With DEFER_TASKRUN the completions in between are queued as task work without waking
 * the thread, so one wake-up serves the batch; each completion waits at most B us more.
 *
 * The policy decides on requests, from what it measures:
 *  - A window only where at least two arrivals (receives that carry data) are expected
 *    within B: fewer have nothing to share a wake-up with.  (Counted in completions, as
 *    before, one request per window passed, since each brings two or more: its receive
 *    and our answer's send; the window then held a request for its own send's
 *    completion, +316 us of p99 at 16 KiB for 6% of CPU.)
 *  - N is the number of completions the measured rate predicts within B (a time-weighted
 *    moving average, RATE_TAU_NS), at most WINDOW_NR_MAX, and at most two per open
 *    connection: a connection brings at most one request, and our answer's send, per
 *    round trip, so a window never waits for arrivals only our answers could cause.
 *    A full batch ends the wait at once, so the timer does not run (and overshoot) when
 *    arrivals fill it.
 *  - No window while a connection has output queued behind its send in flight
 *    (nbacklogged): a large reply goes out chunk after chunk, each send completion
 *    releasing the next, and holding them would cost one window per chunk.
 *  - No window when clients wait for our answers (a closed loop): a request that arrives
 *    within half the budget after our answer to the same connection left is a client
 *    answering us; when such requests are at least CLOSED_MAX of those that follow an
 *    answer (moving average), holding them only slows the clients down.  This replaces
 *    a periodic A/B check of the throughput, which cost about half of all kernel entries
 *    and looked at nothing but throughput.
 *  - No window while the worker is busy (its thread used UTIL_MAX of a CPU or more over
 *    the last period): its batches are large anyway. */
#define WINDOW_NR_MAX 64
#define RATE_PERIOD_NS 1000000
#define RATE_TAU_NS 4000000
#define UTIL_MAX 0.6
#define CLOSED_MAX 0.5

static void rate_update(uc_core *c, int64_t now_ns, unsigned cqes)
{
    c->now_ns = now_ns;
    c->rate_cqes += cqes;
    int64_t dt = now_ns - c->rate_t0;
    if (dt < RATE_PERIOD_NS) return;
    int64_t cpu = thread_cpu_ns();
    double a = (double)dt / (double)(dt + RATE_TAU_NS);
    c->rate += a * ((double)c->rate_cqes / (double)dt - c->rate);
    c->data_rate += a * ((double)c->rate_data / (double)dt - c->data_rate);
    c->util += a * ((double)(cpu - c->cpu_t0) / (double)dt - c->util);
    if (c->arrivals) c->closed += a * ((double)c->quick / (double)c->arrivals - c->closed);
    c->rate_t0 = now_ns; c->rate_cqes = 0; c->rate_data = 0; c->cpu_t0 = cpu;
    c->arrivals = c->quick = 0;
    c->st.arrival_per_s = (uint64_t)(c->rate * 1e9);
    c->st.data_per_s = (uint64_t)(c->data_rate * 1e9);
    c->st.util_pct = (uint64_t)(c->util * 100);
    c->st.closed_pct = (uint64_t)(c->closed * 100);
}

/* The batch a windowed wait asks for (0: no window), by the policy above. */
static unsigned window_nr(uc_core *c)
{
    unsigned b = c->cfg.latency_budget_us;
    /* Not in raw mode (uring-py): the connections, their queues and their answers are
     * Python's there, so the policy's inputs are not known here. */
    if (!b || c->cfg.raw || c->draining || !(c->features & IORING_FEAT_MIN_TIMEOUT)) return 0;
    if (c->nbacklogged || c->util >= UTIL_MAX || c->closed >= CLOSED_MAX) return 0;
    if (c->data_rate * 1000.0 * b < 2.0) return 0;   /* fewer than two arrivals to share a wake-up */
    double expect = c->rate * 1000.0 * b;
    unsigned nr = expect >= WINDOW_NR_MAX ? WINDOW_NR_MAX : (unsigned)expect;
    unsigned cap = 2u * (unsigned)c->nconns;
    if (nr > cap) nr = cap;
    return nr >= 2 ? nr : 0;
}

/* The one kernel entry per loop iteration: submit what is queued and, unless timeout_ms
 * is 0, wait for at least one completion (timeout_ms < 0: no limit).  Counted. */
static int submit_and_wait(uc_core *c, int timeout_ms)
{
    int r;
    if (c->inject_err) r = -c->inject_err;
    else if (timeout_ms == 0) r = p_io_uring_submit_and_get_events(RING(c));
    else if ((c->st.window_nr = window_nr(c))) {
        /* The window runs from this wait's start (min_wait), so a completion is held at
         * most B us plus the processing of the batch before it.  The overall timeout is
         * the caller's (the coarse tick), or a second when it has none.  (Earlier kernels
         * went back to waiting for the whole batch when min_wait expired with nothing
         * posted, stalling requests for tens of ms; 6.18 returns at the next completion,
         * as the man page says: tests/test_uring.py checks it on the running kernel.) */
        int64_t ns = timeout_ms > 0 ? (int64_t)timeout_ms * 1000000 : 1000000000;
        struct __kernel_timespec ts = { ns / 1000000000, ns % 1000000000 };
        struct io_uring_cqe *unused;
        c->st.window_us = c->cfg.latency_budget_us;
        r = p_io_uring_submit_and_wait_min_timeout(RING(c), &unused, c->st.window_nr, &ts,
                                                   c->cfg.latency_budget_us, NULL);
        c->st.windowed_waits++;
    }
    else if (timeout_ms < 0) r = p_io_uring_submit_and_wait(RING(c), 1);
    else {
        struct __kernel_timespec ts = { timeout_ms / 1000, (long long)(timeout_ms % 1000) * 1000000 };
        struct io_uring_cqe *unused;
        r = p_io_uring_submit_and_wait_timeout(RING(c), &unused, 1, &ts, NULL);
    }
    c->st.entries++; c->st.waits++;
    if (timeout_ms) { c->st.blocking_waits++; if (r == -ETIME) c->st.empty_waits++; }
    if (r > 0) c->st.sqes += r;
    /* Transient: the timer, a signal, a CQ backlog the next enter flushes.  -EBADR: the
     * kernel dropped CQEs (out of memory), so some operation's final completion is lost
     * and its slot or buffer would be held for good; that, like any other failure of the
     * ring itself, fails the worker rather than serving on with state gone wrong. */
    if (r == -EBADR) { c->st.cq_dropped++; if (!c->fail) c->fail = EBADR; }
    else if (r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN && r != -EBUSY && r != -ENOMEM
             && !c->fail) c->fail = -r;
    if (c->fail) c->st.failed = (uint64_t)c->fail;
    return r;
}

/* Submit what is queued, without waiting: at start, so that the accepts are armed in
 * the kernel (issued; on EAGAIN the kernel has queued its poll on the listener before
 * io_uring_enter returns) before the worker calls itself ready.  With SQPOLL the SQ
 * thread issues them a moment later.  Counted as an entry. */
static int uc_submit(uc_core *c)
{
    int r = p_io_uring_submit(RING(c));
    c->st.entries++;
    if (r > 0) c->st.sqes += r;
    return r;
}

/* One loop iteration: return the previous batch's buffers, submit, wait (GIL released),
 * reap, and leave a batch of application events in c->ev.  timeout_ms < 0: no limit. */
static int wait_batch(uc_core *c, int timeout_ms)
{
    if (c->fail) { c->st.failed = (uint64_t)c->fail; return -c->fail; }
    /* Events emitted while Python ran (closes from uc_finish...) stay for this batch. */
    if (c->evret) {
        memmove(c->ev, c->ev + 4 * c->evret, (size_t)(c->nev - c->evret) * 4 * sizeof(int32_t));
        c->nev -= c->evret; c->evret = 0;
    }
    for (int i = 0; i < c->nlent; i++)
        if (c->bstate[c->lent[i]] == B_LENT) buf_recycle(c, c->lent[i]);
    c->nlent = 0;
    ring_refill(c);
    while (c->ndeferred) c->freelist[c->nfree++] = c->deferred[--c->ndeferred];
    if (c->any_starved && c->ring_free && !c->draining) {  /* ENOBUFS: re-arm once buffers are back */
        unsigned budget = c->ring_free;   /* no more arms than buffers: others wait their turn */
        int n = c->nconn_slots, start = c->rearm_cursor < n ? c->rearm_cursor : 0;
        c->any_starved = 0;
        /* Round robin from where the last scan ran out of budget: a scan from id 0 gave
         * the low ids every returned buffer under sustained pressure. */
        for (int j = 0; j < n; j++) {
            int id = start + j < n ? start + j : start + j - n;
            struct conn *k = &c->conns[id];
            if (!k->used || !k->starved) continue;
            if (k->dead || !k->reading || k->recv_armed) { k->starved = 0; continue; }
            if (!budget) { c->any_starved = 1; c->rearm_cursor = id; break; }
            budget--;
            arm_recv(c, id);
        }
    }
    if (c->br_pending) { p_io_uring_buf_ring_advance(c->br, c->br_pending); c->br_pending = 0; }
    for (int i = 0; i < c->cfg.nlisteners; i++) {   /* accept back-off: re-arm or bound the wait */
        struct listener *l = &c->lis[i];
        if (!l->paused) continue;
        if (c->draining) { l->paused = 0; continue; }
        int64_t left = l->resume_ms - mono_ms();
        if (left <= 0) { l->paused = 0; if (!l->armed) arm_accept(c, i); }
        else if (timeout_ms < 0 || left < timeout_ms) timeout_ms = (int)left;
    }

    /* A slow reader's backlog of copied output, once drained (or its connection gone),
     * is handed back to the OS (glibc keeps freed heap otherwise): RSS returns to its
     * level after the fault.  Only then: in steady state a trim is a tail-latency blip. */
    if (c->trim_due && c->now_ms - c->last_trim_ms >= TRIM_EVERY_MS) {   /* rate-limited */
        c->trim_due = 0;
        if (c->freed_copies > (1u << 20)) {
            c->freed_copies = 0; malloc_trim(0); c->st.malloc_trims++; c->last_trim_ms = c->now_ms;
        }
    }

    /* Idle trim: IDLE_TRIM_MS after the last connection closed (not on every dip to
     * zero under churn), the pool's pages are handed back; the wait is bounded so that
     * an idle worker still gets there. */
    if (c->nconns == 0 && c->pool_dirty && !c->draining && !c->cfg.raw) {
        int64_t now = mono_ms();
        if (c->idle_since_ms < 0) c->idle_since_ms = now;
        int64_t left = c->idle_since_ms + IDLE_TRIM_MS - now;
        if (left <= 0) pool_trim(c);
        else if (timeout_ms < 0 || left < timeout_ms) timeout_ms = (int)left;
    }

    if (c->cfg.limits.tick_ms && c->nconns) {   /* the timer tick bounds the wait while connections are open */
        int64_t left = c->next_tick_ms - c->now_ms;
        if (left < 1) left = 1;
        if (timeout_ms < 0 || left < timeout_ms) timeout_ms = (int)left;
    }
    int busy = c->nev > 0 || p_io_uring_cq_ready(RING(c)) > 0;
    if (c->draining) busy |= drain_reads(c) || c->nev > 0;
    submit_and_wait(c, busy ? 0 : timeout_ms);
    if (c->fail) return -c->fail;
    int64_t now_ns = mono_ns();
    c->now_ns = now_ns;
    c->now_ms = now_ns / 1000000;
    uint64_t cqes0 = c->st.cqes;
    struct io_uring_cqe *cqes[256];
    for (;;) {
        if (c->nev + 2 * 256 > 16 * 1024) break;   /* bound one batch; the rest next call */
        unsigned n = p_io_uring_peek_batch_cqe(RING(c), cqes, 256);
        if (!n) break;
        for (unsigned i = 0; i < n; i++) on_cqe(c, cqes[i]);
        p_io_uring_cq_advance(RING(c), n);
        c->st.cqes += n;
        if (n < 256) break;
    }
    if (p_io_uring_cq_has_overflow(RING(c))) c->st.cq_overflows++;  /* flushed on the next enter */
    /* The coarse timer (rule coarse-timer), after this batch's progress is stamped: the sweep runs
     * here, for Python protocols as for C ones; the drain has its own deadline instead. */
    if (pol_due(&c->next_tick_ms, c->cfg.limits.tick_ms, c->now_ms)) {
        if (!c->draining) sweep(c);
        emit(c, EV_TICK, 0, 0, 0);
    }
    rate_update(c, now_ns, (unsigned)(c->st.cqes - cqes0));
    if (c->fail) { c->st.failed = (uint64_t)c->fail; return -c->fail; }
    c->evret = c->nev;
    return c->nev;
}

/* ---- what Python calls while processing a batch ---------------------------------- */
static int queue_out(uc_core *c, int id, char *base, uint32_t len, int bid)
{
    struct conn *k = &c->conns[id];
    struct chunk *h = malloc(sizeof *h);
    if (!h) return -ENOMEM;
    h->next = NULL; h->base = base; h->len = len; h->off = 0; h->bid = bid;
    h->zc_refs = 0; h->detached = h->kept = 0;
    if (k->tail) k->tail->next = h; else k->head = h;
    k->tail = h;
    backlog_update(c, k);
    k->pending += len;
    if (k->pending > c->st.max_pending) c->st.max_pending = k->pending;
    if (!k->sending) submit_send(c, id);
    if (k->reading && k->pending > c->cfg.max_output) {
        /* Backpressure: stop receiving from a client that does not read.  Multishot recv
         * keeps going until cancelled, so cancel it; re-armed below the low-water mark. */
        k->reading = 0; k->paused = 1; k->was_paused = 1; c->st.backpressure++;
        if (k->recv_armed && !k->recv_cancel) { cancel_op(c, UD(OP_RECV, id)); k->recv_cancel = 1; }
    }
    return 0;
}

/* Whether output of len bytes can be queued on connection id: 1 yes, 0 nothing to do (no
 * such live connection, or nothing to send), < 0 the error to return. */
static int out_check(uc_core *c, int id, size_t len)
{
    if ((unsigned)id >= (unsigned)c->nconn_slots || !c->conns[id].used || c->conns[id].dead || !len) return 0;
    if (c->fail) return -c->fail;
    if (len > UINT32_MAX) return -EMSGSIZE;   /* a chunk's length is 32 bits: never truncate */
    return 1;
}

static int out_copy(uc_core *c, int id, const char *p, size_t len)
{
    int ok = out_check(c, id, len);
    if (ok <= 0) return ok;
    char *m = malloc(len);
    if (!m) return -ENOMEM;
    memcpy(m, p, len);
    int r = queue_out(c, id, m, (uint32_t)len, CHUNK_HEAP);
    if (r < 0) free(m);   /* the chunk could not be queued: its copy goes with it */
    else c->st.copied_sends++;
    return r;
}

/* Queue memory the caller hands over (malloc'd; native-uring's scratch buffer): it is
 * sent as it is and freed once sent, never copied.  Taken in every case: freed here if it
 * cannot be queued. */
static int out_take(uc_core *c, int id, char *m, size_t len)
{
    int r = out_check(c, id, len);
    if (r > 0 && (r = queue_out(c, id, m, (uint32_t)len, CHUNK_HEAP)) == 0) { c->st.taken_sends++; return 0; }
    free(m);
    return r;
}

/* Send a received buffer back as it is (echo): no copy while the ring has buffers to
 * spare and nothing is queued before it; otherwise copy it, so a slow reader can hold
 * at most one provided buffer and cannot starve every other connection of them. */
static int out_buf(uc_core *c, int id, int bid, unsigned off, unsigned len)
{
    int ok = out_check(c, id, len);
    if (ok <= 0) return ok;
    /* A buffer of ours (the ring's or a drain scratch one), within it: anything else is a
     * caller's bug, refused rather than read. */
    if ((unsigned)bid >= c->cfg.nbufs + DRAIN_READS || (size_t)off + len > c->cfg.bufsize) return -EINVAL;
    char *p = c->pool + (size_t)bid * c->cfg.bufsize + off;
    struct conn *k = &c->conns[id];
    /* Copied instead when the buffer is no longer ours to lend, when the connection
     * already holds PIN_MAX of them (a slow reader would otherwise hold the ring), or
     * when the ring runs short of buffers (a quarter kept in reserve). */
    if (c->bstate[bid] != B_LENT || k->pinned >= PIN_MAX || c->ring_free + c->nspare < c->cfg.nbufs / 4)
        return out_copy(c, id, p, len);
    int r = queue_out(c, id, p, len, bid);
    if (r == 0) {   /* pinned only once queued: a failed chunk allocation leaves it LENT */
        c->bstate[bid] = B_PINNED;
        k->pinned++;
        c->st.zc_sends++;
    }
    return r;
}

/* The protocol is done: flush what is queued, then close. */
static void conn_finish(uc_core *c, int id)
{
    if ((unsigned)id >= (unsigned)c->nconn_slots) return;
    struct conn *k = &c->conns[id];
    if (!k->used || k->dead) return;
    k->closing = 1; k->reading = 0; k->drain_read = 0;
    if (k->recv_armed && !k->recv_cancel) { cancel_op(c, UD(OP_RECV, id)); k->recv_cancel = 1; }
    if (!k->head && !k->held) conn_kill(c, id, 0);   /* held: once the last pull is done */
}

/* Rule held-answers, after a feed or an EV_PULL's pull: more = the protocol still holds answers.
 * Holding stops reading (the multishot recv is cancelled) and asks for an EV_PULL
 * whenever the pending output is low; releasing resumes reading (or, finishing, closes
 * once flushed).  uc_hold after a feed, uc_pulled after a pull: only the latter ends
 * the EV_PULL in flight, so one connection never has two. */
static void conn_hold(uc_core *c, int id, int more)
{
    if ((unsigned)id >= (unsigned)c->nconn_slots) return;
    struct conn *k = &c->conns[id];
    if (!k->used || k->dead) return;
    if (more) {
        if (!k->held) {
            k->held = 1;
            if (k->reading) {
                k->reading = 0; k->paused = 1; c->st.output_holds++;
                if (k->recv_armed && !k->recv_cancel) { cancel_op(c, UD(OP_RECV, id)); k->recv_cancel = 1; }
            }
        }
        pull_check(c, id);
        return;
    }
    if (!k->held) return;
    k->held = 0;
    if (k->closing) { if (!k->head) conn_kill(c, id, 0); return; }
    if (k->paused && k->pending <= c->cfg.max_output / 2) {
        k->paused = 0; k->reading = 1;
        if (!c->draining && !k->recv_armed) arm_recv(c, id);
    }
}

static void conn_pulled(uc_core *c, int id, int more)
{
    if ((unsigned)id < (unsigned)c->nconn_slots) c->conns[id].pull_due = 0;
    conn_hold(c, id, more);
}

/* Send static memory (proto_core.h's body block): never copied, never freed. */
static int out_static(uc_core *c, int id, const char *p, size_t len)
{
    int ok = out_check(c, id, len);
    if (ok <= 0) return ok;
    return queue_out(c, id, (char *)p, (uint32_t)len, CHUNK_STATIC);
}

/* An answer could not be allocated: that connection ends, counted, logged once. */
static void uc_alloc_failed(uc_core *c, int id)
{
    c->st.alloc_failures++;
    if (!c->alloc_logged && c->cfg.user) { c->alloc_logged = 1; uc_py_alloc_failed(c->cfg.user, ENOMEM); }
    conn_kill(c, id, 1);
}

static void uc_close(uc_core *c, int id, int error)
{
    if ((unsigned)id < (unsigned)c->nconn_slots) conn_kill(c, id, error);
}

/* Stop: no more accepts through the ring (the backlog is taken synchronously when
 * each accept has been cancelled), and every connection gets its recv cancelled and
 * then read synchronously to the end of what was already sent (EV_DRAINED). */
static void uc_drain_begin(uc_core *c)
{
    c->draining = 1;
    for (int i = 0; i < c->cfg.nlisteners; i++) {
        if (c->lis[i].armed && !c->lis[i].cancel) { cancel_op(c, UD(OP_ACCEPT, i)); c->lis[i].cancel = 1; }
        else if (!c->lis[i].armed) accept_backlog(c, i);
    }
    if (c->stop_armed) { cancel_op(c, UD(OP_STOP, 0)); }
    if (c->handoff_armed) cancel_op(c, UD(OP_HANDOFF, 0));   /* its CQE takes what waits */
    else if (c->cfg.handoff_fd >= 0) handoff_take(c);
    for (int id = 0; id < c->nconn_slots; id++) {
        struct conn *k = &c->conns[id];
        if (!k->used || k->dead || k->closing || k->eof) continue;
        if (k->recv_armed) { if (!k->recv_cancel) { cancel_op(c, UD(OP_RECV, id)); k->recv_cancel = 1; } }
        else if (k->paused) emit(c, EV_DRAINED, id, 0, 0);
        else drain_start(k);
    }
}

/* Past the drain deadline (or at the end): close everything, cancel everything. */
static void uc_shutdown(uc_core *c)
{
    c->draining = 1; c->shutting = 1;
    for (int i = 0; i < c->cfg.nlisteners; i++)
        if (c->lis[i].armed && !c->lis[i].cancel) { cancel_op(c, UD(OP_ACCEPT, i)); c->lis[i].cancel = 1; }
    if (c->stop_armed) { cancel_op(c, UD(OP_STOP, 0)); c->stop_armed = 0; }
    if (c->handoff_armed) { cancel_op(c, UD(OP_HANDOFF, 0)); c->handoff_armed = 0; }
    for (int id = 0; id < c->nconn_slots; id++) conn_kill(c, id, 0);
}

/* Free the ring and memory.  Returns 0, or, if the kernel still held operations, 1 +
 * the number of send chunks kept because a SEND_ZC notification was still due for
 * them: the buffer pool and those chunks are deliberately leaked, since the kernel
 * might still write the one and read the others (a freed chunk could go on the wire). */
static int uc_free(uc_core *c)
{
    int leaked = c->inflight > 0, kept = 0;
    p_io_uring_free_buf_ring(RING(c), c->br, c->cfg.nbufs, BGID);
    p_io_uring_queue_exit(RING(c));
    for (int i = 0; i < c->nholds; i++) {
        struct chunk *h = c->holds[i].h;
        if (h && !h->kept) { h->kept = 1; kept++; }
    }
    for (int id = 0; id < c->nconn_slots; id++) {
        struct conn *k = &c->conns[id];
        for (struct chunk *h = k->head, *n; h; h = n) {
            n = h->next;
            if (h->zc_refs) continue;   /* kept, counted above */
            if (h->bid == CHUNK_HEAP) free(h->base);
            free(h);
        }
        free(k->sv);
        if (k->used) close(k->fd);
    }
    if (!leaked) free(c->pool);
    free(c->holds);
    if (c->cfg.cproto) {
        for (int i = 0; i < c->ps_cap; i++) pstate_free(&c->ps[i]);
        free(c->ps);
        proto_free(&c->proto);
    }
    free(c->ev); free(c->conns); free(c->freelist); free(c->deferred); free(c->bstate); free(c->lent); free(c->spare);
    free(c);
    return leaked ? 1 + kept : 0;
}

/* Rule request-deadline for a protocol in Python: after a feed that left a request incomplete
 * (partial) or completed the one that was.  Python calls it only then, never on the
 * common path (whole requests in). */
static void conn_progress(uc_core *c, int id, int partial, unsigned completed, unsigned nbytes)
{
    if ((unsigned)id >= (unsigned)c->nconn_slots || !c->conns[id].used) return;
    pol_progress(&c->conns[id].pol, partial, completed, nbytes, c->now_ms);
}

/* ---- the entry points Python calls ---------------------------------------------------
 * Each cffi call releases the GIL and takes it back (cffi does so for every call): 47 ns
 * uncontended, but with several thread workers in one process each release lets another
 * thread in and the caller then queues for the GIL again.  So the `uring` backend queues
 * what it has to tell the core while it processes a batch (UC_ACT_*) and passes the
 * queue with its next wait, one call per batch (uc_wait_acts); `--uring-calls direct`
 * makes the calls one by one (each counted in py_calls, to measure the difference). */
static int uc_wait(uc_core *c, int timeout_ms) { c->st.py_calls++; return wait_batch(c, timeout_ms); }
static int uc_send_copy(uc_core *c, int id, const char *p, size_t len) { c->st.py_calls++; return out_copy(c, id, p, len); }
static int uc_send_buf(uc_core *c, int id, int bid, unsigned off, unsigned len) { c->st.py_calls++; return out_buf(c, id, bid, off, len); }
static int uc_send_static(uc_core *c, int id, const char *p, size_t len) { c->st.py_calls++; return out_static(c, id, p, len); }
static void uc_finish(uc_core *c, int id) { c->st.py_calls++; conn_finish(c, id); }
static void uc_hold(uc_core *c, int id, int more) { c->st.py_calls++; conn_hold(c, id, more); }
static void uc_pulled(uc_core *c, int id, int more) { c->st.py_calls++; conn_pulled(c, id, more); }
static void uc_progress(uc_core *c, int id, int partial, unsigned completed, unsigned nbytes)
{
    c->st.py_calls++;
    conn_progress(c, id, partial, completed, nbytes);
}

/* Apply n queued actions of UC_ACT_WORDS int32 each, in order, as the direct calls would
 * have been made; send data are (offset, length) in `data`.  A send that fails ends its
 * connection with an error and is reported as EV_SEND_FAILED (id, errno), where the
 * direct call's caller logged and closed it; later actions of that connection find it
 * dead and do nothing, as direct calls would.  An action outside the protocol (unknown
 * op, data out of bounds: a bug in the caller) fails its connection the same way. */
static void apply_actions(uc_core *c, const int32_t *a, int n, const char *data, size_t ndata)
{
    for (int i = 0; i < n; i++, a += UC_ACT_WORDS) {
        int id = a[1], rc = 0;
        c->st.actions++;
        switch (a[0]) {
        case UC_ACT_SEND_BUF:
            rc = out_buf(c, id, a[2], (unsigned)a[3], (unsigned)a[4]);
            break;
        case UC_ACT_SEND_COPY: {
            uint32_t off = (uint32_t)a[2], len = (uint32_t)a[3];
            rc = (size_t)off + len <= ndata ? out_copy(c, id, data + off, len) : -EINVAL;
            break;
        }
        case UC_ACT_FINISH: conn_finish(c, id); break;
        case UC_ACT_HOLD: conn_hold(c, id, a[2]); break;
        case UC_ACT_PULLED: conn_pulled(c, id, a[2]); break;
        case UC_ACT_CLOSE: if ((unsigned)id < (unsigned)c->nconn_slots) conn_kill(c, id, a[2]); break;
        case UC_ACT_PROGRESS: conn_progress(c, id, a[2], (unsigned)a[3], (unsigned)a[4]); break;
        default: rc = -EINVAL;
        }
        if (rc < 0 && (unsigned)id < (unsigned)c->nconn_slots && c->conns[id].used && !c->conns[id].dead) {
            emit(c, EV_SEND_FAILED, id, -rc, 0);
            conn_kill(c, id, 1);
        }
    }
}

static void uc_apply(uc_core *c, const int32_t *acts, int n, const char *data, size_t ndata)
{
    c->st.py_calls++;
    apply_actions(c, acts, n, data, ndata);
}

/* The batch's actions, then the wait; *events = the events' array (it may move when it
 * grows), so that one call per batch is all Python makes.  An unbounded wait (timeout
 * -1) that brought no application event (only our own sends' completions, say) waits
 * again here instead of returning to Python with nothing to do: the caller would only
 * take the GIL to call again (the stop and the timer tick are events, so nothing it
 * must see is held back). */
static int uc_wait_acts(uc_core *c, int timeout_ms, const int32_t *acts, int n, const char *data,
                        size_t ndata, int32_t **events)
{
    c->st.py_calls++;
    apply_actions(c, acts, n, data, ndata);
    int r;
    do r = wait_batch(c, timeout_ms); while (r == 0 && timeout_ms < 0);
    *events = c->ev;
    return r;
}

/* Fault injection for tests: every submit from now on fails with -err. */
static void uc_fail_submits(uc_core *c, int err) { c->inject_err = err; }

static int32_t *uc_events(uc_core *c) { c->st.py_calls++; return c->ev; }
static char *uc_pool(uc_core *c) { return c->pool; }
static size_t uc_pool_size(uc_core *c) { return c->pool_size; }
static struct uc_stats *uc_stats(uc_core *c) { return &c->st; }
static unsigned uc_setup_flags(uc_core *c) { return c->flags_in_effect; }
static unsigned uc_features(uc_core *c) { return c->features; }
static int uc_nconns(uc_core *c) { return c->nconns; }
static int uc_inflight(uc_core *c) { return c->inflight; }

/* ---- --uring-handoff msg-ring: the acceptor's side ----------------------------------
 * The dispatcher (core/dispatch.py) posts each accepted fd straight into the chosen
 * worker's CQ with IORING_OP_MSG_RING (IORING_MSG_DATA: the target's CQE carries
 * res = len = the fd, user_data = OP_MSG).  No poll to wake the worker, no recvmsg,
 * no SCM_RIGHTS duplicate: the worker adopts the acceptor's very fd, which is only
 * meaningful where both share one fd table - thread mode (the server refuses process
 * mode).  A DEFER_TASKRUN target gets the CQE through its own task work, run at its
 * next wait.  The sender's ring is a small plain one (no SINGLE_ISSUER: created by
 * one thread, used by the dispatcher's); each send waits for its own completion, so
 * the result is known before the acceptor lets go of the fd. */

/* liburing 2.x's struct io_uring, as far as ring_fd (part of its ABI: applications
 * embed the struct).  Checked at use: the fd found must be an io_uring. */
struct lu_sq_mirror { void *k[8]; unsigned sqe_head, sqe_tail; size_t ring_sz; void *ring_ptr;
                      unsigned ring_mask, ring_entries, pad[2]; };
struct lu_cq_mirror { void *k[7]; size_t ring_sz; void *ring_ptr; unsigned ring_mask, ring_entries, pad[2]; };
struct lu_ring_mirror { struct lu_sq_mirror sq; struct lu_cq_mirror cq; unsigned flags; int ring_fd; };

/* The ring's fd, or -1 if what sits where liburing 2.x keeps it is not an io_uring. */
static int uc_ring_fd(uc_core *c)
{
    const struct lu_ring_mirror *m = (const void *)c->ring;
    char path[64], link[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", m->ring_fd);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n <= 0) return -1;
    link[n] = 0;
    return strcmp(link, "anon_inode:[io_uring]") == 0 && m->flags == c->flags_in_effect ? m->ring_fd : -1;
}

struct uc_sender { char ring[1024] __attribute__((aligned(64))); };

static uc_sender *uc_sender_new(int *err)
{
    *err = 0;
    if (!uc_ready) { *err = ENOENT; return NULL; }
    uc_sender *s = aligned_alloc(64, sizeof *s);
    if (!s) { *err = ENOMEM; return NULL; }
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int r = p_io_uring_queue_init_params(8, (struct io_uring *)s->ring, &p);
    if (r < 0) { *err = -r; free(s); return NULL; }
    return s;
}

/* Post fd to the ring target_fd.  0, or -errno (the fd stays the caller's). */
static int uc_sender_send(uc_sender *s, int target_fd, int fd, int lid)
{
    struct io_uring *ring = (struct io_uring *)s->ring;
    struct io_uring_sqe *q = p_io_uring_get_sqe(ring);
    if (!q) return -EBUSY;
    p_io_uring_prep_msg_ring(q, target_fd, (unsigned)fd, UD(OP_MSG, lid), 0);  /* the tag carries the listener id */
    q->user_data = 1;
    int r;
    do r = p_io_uring_submit_and_wait(ring, 1); while (r == -EINTR);
    if (r < 0) return r;
    struct io_uring_cqe *cqe;
    if (p_io_uring_peek_batch_cqe(ring, &cqe, 1) != 1) return -EIO;
    int res = cqe->res;
    p_io_uring_cq_advance(ring, 1);
    return res;
}

static void uc_sender_free(uc_sender *s)
{
    if (!s) return;
    p_io_uring_queue_exit((struct io_uring *)s->ring);
    free(s);
}

/* Does a min_timeout wait behave as documented on this kernel - return at the first
 * completion posted after min_wait expired with nothing posted?  (Some kernels went back
 * to waiting for the whole batch, which the stable fix of 2025 corrected; a window on such
 * a kernel stalls requests until the overall timeout.)  A timerfd fires 2 ms from now; a
 * wait for 8 completions with min_wait 200 us and an overall timeout of 1 s must return at
 * about 2 ms.  Returns the microseconds the wait took, or -errno.  Used by the probe on an
 * idle core: the batching window is used only where this holds. */
static int uc_window_check(uc_core *c)
{
    if (!(c->features & IORING_FEAT_MIN_TIMEOUT)) return -EOPNOTSUPP;
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    if (tfd < 0) return -errno;
    struct itimerspec its = { .it_value = { 0, 2000000 } };
    struct io_uring_sqe *s = sqe_get(c);
    if (!s || timerfd_settime(tfd, 0, &its, NULL) < 0) { close(tfd); return s ? -errno : -c->fail; }
    p_io_uring_prep_poll_add(s, tfd, POLLIN);
    s->user_data = UD(OP_CANCEL, 0);
    int64_t t0 = mono_ns();
    struct __kernel_timespec ts = { 1, 0 };
    struct io_uring_cqe *cqe;
    int r = p_io_uring_submit_and_wait_min_timeout(RING(c), &cqe, 8, &ts, 200, NULL);
    int64_t dt = mono_ns() - t0;
    unsigned n = p_io_uring_peek_batch_cqe(RING(c), &cqe, 1);
    if (n) { p_io_uring_cq_advance(RING(c), n); c->inflight--; }
    close(tfd);
    if (r < 0 && r != -ETIME) return r;
    return (int)(dt / 1000);
}

/* Which opcodes this kernel's io_uring supports (the probe's "needed feature" check):
 * returns 0 if all are, else the first missing opcode number. */
static int uc_check_opcodes(uc_core *c)
{
    static const int need[] = { IORING_OP_ACCEPT, IORING_OP_RECV, IORING_OP_SEND, IORING_OP_ASYNC_CANCEL, IORING_OP_POLL_ADD };
    struct io_uring_probe *p = p_io_uring_get_probe_ring(RING(c));
    if (!p) return -1;
    int missing = 0;
    for (unsigned i = 0; i < sizeof need / sizeof *need && !missing; i++)
        if (!p_io_uring_opcode_supported(p, need[i])) missing = need[i];
    p_io_uring_free_probe(p);
    return missing;
}

/* 1 if this kernel's io_uring supports opcode op, 0 if not, -1 if it cannot be probed. */
static int uc_opcode_supported(uc_core *c, int op)
{
    struct io_uring_probe *p = p_io_uring_get_probe_ring(RING(c));
    if (!p) return -1;
    int ok = p_io_uring_opcode_supported(p, op) ? 1 : 0;
    p_io_uring_free_probe(p);
    return ok;
}
