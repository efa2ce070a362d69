/*
 * loadgen.c: the C core of parallelnet's load generator.
 *
 * Why C: a Python client spends tens of microseconds of CPU per request, which on a
 * 2-core box steals the very CPU the server under test needs and caps the rate we can
 * offer.  Here one Python call (cffi API mode, GIL released) runs a whole test: N
 * pthreads, each pinned to a CPU, each with its own epoll set and its own share of
 * the connections, so threads share nothing on the hot path but one atomic request
 * budget and a stop flag.  Connections are spread over the targets round robin
 * (connection i -> target i % ntargets); each thread keeps its figures per target.
 *
 * Time: CLOCK_MONOTONIC ns.  The run is [t0, ms) warm-up, [ms, me) measured, then a
 * drain of at most `timeout` for requests already in flight.  A request belongs to
 * the measurement iff its start stamp is in [ms, me); the stamp is the actual send
 * time (closed loop), the intended send time (open loop, so a stalled server cannot
 * hide its stall: wrk2's coordinated-omission correction), the connect start (churn,
 * so the handshake is part of what is measured) or the connect's intended time (churn
 * at a rate: connects on a fixed schedule, at most `connections` in flight).
 *
 * Kernel semantics relied on:
 * - Non-blocking connect() returns EINPROGRESS (on loopback too) and the socket turns
 *   writable when the handshake is over; SO_ERROR then says whether it worked
 *   (ECONNREFUSED for an RST, ETIMEDOUT after the SYN retries).  Errors known at once
 *   come back from connect() itself.  Connect completion means the server's kernel
 *   queued the connection, not that the server accepted it: a stopped server's listen
 *   backlog still fills, so its stall shows as reads that never end, then as SYNs that
 *   go unanswered.
 * - Edge-triggered epoll: every event source is drained until EAGAIN (or a short
 *   read, see conn_readable), since an edge is reported once.  close() removes the fd
 *   from the epoll set (we never dup it, so no other reference keeps it there).
 * - Churn and the local port range: the side that closes first keeps the 4-tuple in
 *   TIME_WAIT for 60 s, and each connect to one server needs a local port whose
 *   4-tuple is not in use.  With net.ipv4.ip_local_port_range at its default
 *   (32768-60999, ~28k ports) that caps churn to one destination near 470 conn/s
 *   unless net.ipv4.tcp_tw_reuse lets connect() reuse a TIME_WAIT port (1: always,
 *   2, the default: loopback only).  When no port is left, connect() fails with
 *   EADDRNOTAVAIL: counted as its own error kind, never folded into "other".
 * - getrusage(RUSAGE_THREAD) gives each thread's own user/sys time, so the client's
 *   CPU excludes any other thread in the process (a Python test server, say).
 *
 * Service times (HTTP): with a distribution configured, each request asks the server
 * for `GET /work/US`, US drawn per request on the connection that sends it.  Each
 * connection has its own PRNG seeded from (seed, global connection index): the draws
 * of connection i are the same in every run with that seed, whatever the thread count
 * or the order events arrive in, and no draw touches shared state.  The request bytes
 * go into a per-connection buffer sized at setup, so the hot path never allocates.
 *
 * Reentrancy: nothing here is static and mutable; every run's state hangs off its own
 * `struct shared`, so two lg_run calls (from two Python threads) can run at once.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---- public API (mirrored by the cdef in loadgen_build.py) ---------------------- */

enum { LG_ECHO = 0, LG_HTTP = 1 };
enum { LG_CLOSED = 0, LG_OPEN = 1, LG_CHURN = 2 };
enum {
    LG_E_REFUSED, LG_E_CONNECT_TIMEOUT, LG_E_RESET, LG_E_READ_TIMEOUT, LG_E_EOF,
    LG_E_MISMATCH, LG_E_HTTP_PARSE, LG_E_ADDR_NOT_AVAIL, LG_E_OTHER, LG_NERR
};

struct lg_target {
    const char *host;           /* name or numeric address, IPv6 literals without brackets */
    int port, protocol;
    const char *path;           /* HTTP only */
};

/* Service-time distributions (microseconds, drawn per request). */
enum { LG_SVC_NONE, LG_SVC_FIXED, LG_SVC_EXP, LG_SVC_BIMODAL, LG_SVC_LOGNORMAL };
#define LG_MAX_US 99999999      /* the server's route takes at most 8 digits */
enum { LG_LIGHT, LG_HEAVY, LG_NCLASS };

/* Parameters as the draw uses them (loadgen.py turns the user's spec into these):
 * fixed: a; exp: mean a; bimodal: a with probability p, else b; lognormal: exp(N(a, b)),
 * a = mu and b = sigma of the underlying normal. */
struct lg_service {
    int kind;
    double p, a, b;
};

struct lg_config {
    const struct lg_target *targets;   /* connection (or churn connect) i -> targets[i % n] */
    int ntargets, mode, connections, threads;
    const int *cpus;            /* thread i runs on cpus[i % ncpus]; ncpus 0: unpinned */
    int ncpus, size, depth;
    double rate, duration, warmup, timeout;   /* req/s (conn/s in churn), seconds */
    uint64_t max_requests;      /* measured requests; 0: no cap */
    int abort_on_mismatch;
    /* HTTP service times.  Connections (churn at a rate: slots) 0..heavy_conns-1 draw
     * from `heavy`, the others from `service`; LG_SVC_NONE sends the target's path. */
    struct lg_service service, heavy;
    int heavy_conns;
    int requests_per_conn;      /* churn: requests per connection; 0 means 1 */
    uint64_t seed;              /* of the service-time draws */
};

/* One class of connections' figures (light: the `service` ones, heavy: the others). */
struct lg_cresult {
    uint64_t requests, work_us, min_ns, max_ns;
    uint64_t *hist;             /* caller's array of lg_hist_buckets() counts */
};

/* One target's figures; the caller sums them for the total. */
struct lg_tresult {
    uint64_t requests, bytes_sent, bytes_received;
    uint64_t errors[LG_NERR];
    uint64_t non2xx, connects, min_ns, max_ns;
    uint64_t *hist;             /* caller's array of lg_hist_buckets() counts */
    uint64_t work_us;           /* service time drawn for the measured requests */
};

struct lg_result {
    uint64_t scheduled, backlog;
    double elapsed, cpu_user, cpu_sys;
    double span;                /* s of schedule measured: the window, or up to the moment
                                 * max_requests ran out if that came first */
    int aborted;
    struct lg_tresult *targets; /* caller's array of ntargets */
    uint64_t *per_conn;         /* caller's array of `connections` counts */
    char message[256];
    struct lg_cresult classes[LG_NCLASS];   /* filled when service times are on */
};

/* ---- latency histogram -----------------------------------------------------------
 * Log-linear like HdrHistogram: values below 256 ns are exact; above, each power of
 * two is cut into 128 equal buckets, so a bucket is at most 1/128 (0.78%) of its
 * lower bound wide and its midpoint is within 0.4% of anything in it.  Top bucket
 * group is 2^39 ns (~9 min): everything slower is clamped there.  Index arithmetic
 * is a clz and a shift, cheap enough to record every request. */
#define SUB_BITS 7
#define SUB 128
#define MAX_MSB 39
#define HIST_BUCKETS ((MAX_MSB - SUB_BITS) * SUB + 2 * SUB)   /* 4352 */

static inline int hist_index(uint64_t v)
{
    if (v < 2 * SUB)
        return (int)v;
    int msb = 63 - __builtin_clzll(v);
    if (msb > MAX_MSB)
        return HIST_BUCKETS - 1;
    int shift = msb - SUB_BITS;
    return shift * SUB + (int)(v >> shift);
}

int lg_hist_buckets(void) { return HIST_BUCKETS; }

uint64_t lg_hist_low(int i)
{
    if (i < 2 * SUB)
        return (uint64_t)i;
    int shift = i / SUB - 1;
    return (uint64_t)(i % SUB + SUB) << shift;
}

uint64_t lg_hist_high(int i)
{
    if (i < 2 * SUB)
        return (uint64_t)i;
    return lg_hist_low(i) + ((uint64_t)1 << (i / SUB - 1)) - 1;
}

/* ---- internals ------------------------------------------------------------------ */

#define SCRATCH (64 * 1024)
#define HDR_MAX (64 * 1024)
#define SWEEP_NS 5000000ull          /* timeouts and reconnect back-off granularity */
#define MAX_BACKOFF_NS 100000000ull
#define NEVENTS 256

enum { C_IDLE, C_CONNECTING, C_OPEN };
enum { H_HDR, H_BODY, H_UNTIL_CLOSE, H_CHUNK_SIZE, H_CHUNK_DATA, H_CHUNK_CRLF, H_TRAILER };

struct worker;

/* A target as the threads use it: resolved once, its HTTP request built once. */
struct tgt {
    int index, protocol;
    struct sockaddr_storage addr;
    socklen_t alen;
    char *req;                  /* the HTTP request, identical for every send */
    size_t msglen;              /* bytes of one request: echo size or HTTP request */
    char *wsuf;                 /* service times: what follows "GET /work/US" */
    size_t wsuflen;
};

#define WORK_PREFIX "GET /work/"
#define WORK_PREFIX_LEN (sizeof WORK_PREFIX - 1)

struct conn {
    struct worker *w;
    const struct tgt *t;        /* where this connection goes (churn-at-rate: this connect) */
    int fd, state, lidx, gidx;
    int fails;                  /* consecutive failures: drives reconnect back-off */
    int closing;                /* server said Connection: close: send nothing more */
    uint64_t t_state;           /* connect start, or earliest reconnect time when idle */
    uint64_t t_sched;           /* churn at a rate: this connect's intended start */
    uint64_t t_progress;        /* last sign of life while requests are in flight */
    uint64_t *ring;             /* start stamps of issued requests, capacity depth */
    int rhead, rcount;
    uint64_t pend;              /* bytes issued but not yet written */
    uint64_t sseq, soff;        /* send cursor: message number and offset in it */
    uint64_t rseq, roff;        /* receive cursor (echo) */
    uint64_t sched_k;           /* open loop: index of the next request to send */
    uint64_t completed;         /* measured completions */
    /* Service times (svc NULL: the target's fixed request, and none of this is used). */
    const struct lg_service *svc;
    int cls;                    /* LG_LIGHT or LG_HEAVY */
    uint64_t rng[4];            /* xoshiro256** state, this connection's own */
    uint32_t *wring;            /* drawn US of each request in `ring` (with classes) */
    char *obuf;                 /* svc: requests built, bytes [ooff, olen) unsent */
    size_t olen, ooff;
    /* Churn: requests issued on this connection so far, and the stamp (connect start,
     * or its scheduled time at a rate) that decides whether they are all measured. */
    int nreq;
    uint64_t t_member;
    int hstate, hstatus, hclose;
    uint64_t body_left;
    char *hbuf;
    size_t hlen, hcap;
};

struct shared {
    const struct lg_config *cfg;
    struct tgt *tg;
    int ntg;
    int churn_rate;             /* churn with rate > 0: connects on a fixed schedule */
    int rpc;                    /* churn: requests per connection */
    int classes;                /* service times on: keep per-class figures */
    size_t wmax;                /* longest "GET /work/US ..." request over the targets */
    uint64_t t0, ms, me, deadline, timeout_ns, seed;
    uint64_t budget_used;       /* atomic: measured requests issued so far */
    uint64_t t_spent;           /* atomic: when the first request over budget was due */
    int stop;                   /* atomic: abort everything (echo mismatch) */
    pthread_barrier_t bar;
    pthread_mutex_t lock;       /* guards gate and message */
    pthread_cond_t gate_cv;
    int gate;                   /* set once every thread exists (or creation failed) */
    char message[256];
};

struct worker {
    struct shared *sh;
    pthread_t tid;
    int index, cpu, ep, n, no_more, draining;
    struct conn *conns;
    uint64_t inflight;          /* ring entries over all connections */
    struct lg_tresult *ts;      /* this thread's figures per target (hist its own) */
    uint64_t scheduled, backlog;
    double interval;            /* open loop, churn at a rate: ns between this thread's ticks */
    uint64_t tick_k;            /* open loop, churn at a rate: next tick of the schedule */
    /* Churn at a rate: free slots, a FIFO so that slots take turns and the first
     * heavy_conns slots carry their share of the connects even at a low rate. */
    struct conn **idle;
    int ihead, nidle;
    struct lg_cresult cs[LG_NCLASS];    /* with classes: this thread's per-class figures */
    uint64_t t_end;
    struct rusage ru0, ru1;
    int ru_started;
    char *sbuf, *rbuf;
    char err[160];
};

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void set_message(struct shared *sh, const char *text)
{
    pthread_mutex_lock(&sh->lock);
    if (!sh->message[0])
        snprintf(sh->message, sizeof sh->message, "%s", text);
    pthread_mutex_unlock(&sh->lock);
}

/* ---- echo payload ----------------------------------------------------------------
 * Every message gets its own 64-bit key (connection, message number, run seed), so a
 * server that replays an old buffer, mixes up connections or drops a byte shows up
 * as a mismatch; byte i is key byte (i % 8) xor (i / 8), generated 8 bytes at a time
 * so checking a 64 KiB echo costs little more than a memcmp. */
static inline uint64_t msg_key(const struct shared *sh, int conn, uint64_t seq)
{
    uint64_t z = sh->seed ^ ((uint64_t)conn << 40) ^ seq;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void pattern(uint64_t key, uint64_t off, char *dst, size_t len)
{
    while (len && (off & 7)) {
        *dst++ = (char)((uint8_t)(key >> ((off & 7) * 8)) ^ (uint8_t)(off >> 3));
        off++, len--;
    }
    while (len >= 8) {
        uint64_t word = key ^ (0x0101010101010101ull * (uint8_t)(off >> 3));
        memcpy(dst, &word, 8);
        dst += 8, off += 8, len -= 8;
    }
    while (len) {
        *dst++ = (char)((uint8_t)(key >> ((off & 7) * 8)) ^ (uint8_t)(off >> 3));
        off++, len--;
    }
}

/* ---- service times ----------------------------------------------------------------
 * xoshiro256** (Blackman & Vigna): four words of state, a few shifts per draw, good
 * enough for sampling; its state is filled by splitmix64, which turns any seed (even
 * 0, or seeds differing in one bit) into well-mixed, distinct streams. */
static inline uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_seed(uint64_t s[4], uint64_t seed, uint64_t stream)
{
    uint64_t x = seed ^ (stream * 0xd1b54a32d192ed03ull);
    for (int i = 0; i < 4; i++)
        s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t rng_next(uint64_t s[4])
{
    uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

/* Uniform in [0, 1): the top 53 bits, exactly representable. */
static inline double rng_unit(uint64_t s[4]) { return (double)(rng_next(s) >> 11) * 0x1.0p-53; }

/* One service time in whole microseconds: rounded to nearest, capped at LG_MAX_US. */
static uint32_t draw_us(const struct lg_service *d, uint64_t s[4])
{
    double x;
    switch (d->kind) {
    case LG_SVC_FIXED:
        x = d->a;
        break;
    case LG_SVC_EXP:                    /* inversion; 1 - u is in (0, 1], log1p(-u) finite */
        x = -d->a * log1p(-rng_unit(s));
        break;
    case LG_SVC_BIMODAL:
        x = rng_unit(s) < d->p ? d->a : d->b;
        break;
    case LG_SVC_LOGNORMAL: {            /* Box-Muller; one of the pair is enough here */
        double u = 1.0 - rng_unit(s), v = rng_unit(s);
        x = exp(d->a + d->b * sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
        break;
    }
    default:
        x = 0;
    }
    if (!(x < LG_MAX_US))               /* (NaN too) */
        return LG_MAX_US;
    return x > 0 ? (uint32_t)(x + 0.5) : 0;
}

/* The first n draws connection `conn` makes in a run with this seed (for tests and
 * for looking at a distribution without a server). */
void lg_sample(const struct lg_service *d, uint64_t seed, int conn, uint32_t *out, int n)
{
    uint64_t s[4];
    rng_seed(s, seed, (uint64_t)conn);
    for (int i = 0; i < n; i++)
        out[i] = draw_us(d, s);
}

/* Write "GET /work/US HTTP/1.1..." for target t at dst; returns its length. */
static size_t put_work_request(const struct tgt *t, uint32_t us, char *dst)
{
    char digits[10];
    int nd = 0;
    do {
        digits[nd++] = (char)('0' + us % 10);
        us /= 10;
    } while (us);
    memcpy(dst, WORK_PREFIX, WORK_PREFIX_LEN);
    char *p = dst + WORK_PREFIX_LEN;
    while (nd)
        *p++ = digits[--nd];
    memcpy(p, t->wsuf, t->wsuflen);
    return (size_t)(p - dst) + t->wsuflen;
}

/* ---- connection lifecycle ------------------------------------------------------- */

static void conn_start(struct conn *c, uint64_t now);
static int conn_flush(struct conn *c, uint64_t now);

/* May this connection (re)connect or send?  Not after the measured window, not once
 * the request budget is spent, not after an abort. */
static inline int may_send(struct worker *w, uint64_t now)
{
    return now < w->sh->me && !w->no_more && !__atomic_load_n(&w->sh->stop, __ATOMIC_RELAXED);
}

static void conn_close(struct conn *c)
{
    struct worker *w = c->w;
    if (c->fd >= 0)
        close(c->fd);           /* also drops it from the epoll set */
    c->fd = -1;
    c->state = C_IDLE;
    w->inflight -= (uint64_t)c->rcount;
    c->rcount = c->rhead = 0;
    c->pend = c->soff = c->roff = 0;
    c->olen = c->ooff = 0;
    c->nreq = 0;
    c->rseq = c->sseq;          /* new stream: unanswered messages are forgotten */
    c->closing = 0;
    c->hstate = H_HDR;
    c->hlen = 0;
}

/* Churn at a rate: the slot is free for the next scheduled connect.  Slots are
 * never retried on their own: every connect is one scheduled attempt, counted as
 * completed or as one error, so a failing server cannot make us offer more than the
 * schedule does. */
static void slot_release(struct conn *c)
{
    struct worker *w = c->w;
    conn_close(c);
    w->idle[(w->ihead + w->nidle++) % w->n] = c;
}

/* A connection finished its business (answered, or closed by the server between
 * requests): keep the load going on this slot. */
static void conn_recycle(struct conn *c, uint64_t now)
{
    if (c->w->sh->churn_rate) {
        slot_release(c);
        return;
    }
    conn_close(c);
    if (may_send(c->w, now))
        conn_start(c, now);
}

static void conn_fail(struct conn *c, int kind, uint64_t now)
{
    c->w->ts[c->t->index].errors[kind]++;
    if (c->w->sh->churn_rate) {
        slot_release(c);
        return;
    }
    conn_close(c);
    c->fails++;
    /* Back off exponentially so a dead or hostile server costs us almost no CPU,
     * but retry the first failure at once: one reset is usually just one reset. */
    uint64_t backoff = c->fails <= 1 ? 0 : 1000000ull << (c->fails < 9 ? c->fails - 2 : 7);
    if (backoff > MAX_BACKOFF_NS)
        backoff = MAX_BACKOFF_NS;
    c->t_state = now + backoff;
    if (!backoff && may_send(c->w, now))
        conn_start(c, now);
}

static int errno_kind(int e)
{
    switch (e) {
    case ECONNREFUSED: return LG_E_REFUSED;
    case ETIMEDOUT: return LG_E_CONNECT_TIMEOUT;
    case ECONNRESET: case EPIPE: case ECONNABORTED: return LG_E_RESET;
    /* connect() found no free local port for this destination: the ephemeral range
     * (net.ipv4.ip_local_port_range) is used up, mostly by our own TIME_WAITs. */
    case EADDRNOTAVAIL: return LG_E_ADDR_NOT_AVAIL;
    default: return LG_E_OTHER;
    }
}

/* Take n measured requests from the max_requests budget; 0 when they are not all
 * left (churn at a rate takes a connection's requests_per_conn at once, so the budget
 * ends on a whole connection).  The moment the first one over budget was wanted ends
 * the schedule's measured span. */
static int charge(struct worker *w, uint64_t n, uint64_t now)
{
    struct shared *sh = w->sh;
    uint64_t max = sh->cfg->max_requests;
    uint64_t used = __atomic_fetch_add(&sh->budget_used, n, __ATOMIC_RELAXED);
    if (used + n <= max)
        return 1;
    if (used <= max)                    /* exactly one caller's [used, used+n) holds max */
        __atomic_store_n(&sh->t_spent, now, __ATOMIC_RELAXED);
    w->no_more = 1;
    return 0;
}

/* Queue one request on c.  `start` is its latency origin.  Whether it is measured is
 * decided by its stamp: `start`, except in churn, where the connection's own stamp
 * (t_member) decides for all its requests, so a connection is measured whole.  The
 * budget is charged only for measured requests so warm-up never eats into
 * max_requests (churn at a rate charged it when the connect went out; `no_more` then
 * stops new connects, not the requests of those already paid for).  A request whose
 * stamp is inside the window still goes out after the window closed where dropping it
 * would cut a measured unit short: a connect scheduled in the window (churn at a rate:
 * dropping it would hide a slow handshake) and a churn connection's 2nd..Mth request. */
static int issue(struct conn *c, uint64_t start, uint64_t now)
{
    struct worker *w = c->w;
    struct shared *sh = w->sh;
    int churn = sh->cfg->mode == LG_CHURN;
    uint64_t stamp = churn ? c->t_member : start;
    int late_ok = sh->churn_rate || (churn && c->nreq > 0);
    if ((w->no_more && !sh->churn_rate) || __atomic_load_n(&sh->stop, __ATOMIC_RELAXED) ||
        c->closing || c->state != C_OPEN || stamp >= sh->me || (now >= sh->me && !late_ok))
        return 0;
    int depth = sh->cfg->depth;
    /* The request buffer holds `depth` requests.  Unsent bytes belong to requests in
     * the ring, so there is room unless a server answered requests it had not read
     * in full; then hold off until the bytes are out. */
    if (c->svc && c->pend + sh->wmax > (uint64_t)depth * sh->wmax)
        return 0;
    if (stamp >= sh->ms && sh->cfg->max_requests && !sh->churn_rate && !charge(w, 1, now))
        return 0;
    int slot = (c->rhead + c->rcount) % depth;
    c->ring[slot] = start;
    if (c->rcount++ == 0)
        c->t_progress = now;
    w->inflight++;
    c->nreq++;
    if (c->svc) {
        /* Build this request's bytes now; the buffer holds `depth` of the longest, so
         * sliding the unsent rest to the front always makes room. */
        uint32_t us = draw_us(c->svc, c->rng);
        if (c->olen + sh->wmax > (size_t)depth * sh->wmax) {
            memmove(c->obuf, c->obuf + c->ooff, c->olen - c->ooff);
            c->olen -= c->ooff;
            c->ooff = 0;
        }
        size_t len = put_work_request(c->t, us, c->obuf + c->olen);
        c->olen += len;
        c->pend += len;
        c->wring[slot] = us;
    } else {
        c->pend += c->t->msglen;
        if (c->wring)
            c->wring[slot] = 0;         /* a light connection without a distribution */
    }
    return 1;
}

/* Open loop.  Thread t ticks at t0 + (t/T + k) * interval; conn j of its n owns ticks
 * j, j+n, j+2n...  (Churn at a rate: tick k is a connect, on whichever slot is free.)
 * Every time on the schedule comes from this one function, so the tick that wakes a
 * connection and the connection's own notion of "due" agree to the nanosecond (two
 * roundings could leave a request waiting a whole extra period). */
static inline uint64_t tick_time(const struct worker *w, uint64_t k)
{
    return w->sh->t0 + (uint64_t)(((double)w->index / (double)w->sh->cfg->threads + (double)k)
                                  * w->interval);
}

static inline uint64_t intended(struct conn *c, uint64_t m)
{
    return tick_time(c->w, m * (uint64_t)c->w->n + (uint64_t)c->lidx);
}

/* Number of ticks strictly before t. */
static uint64_t ticks_before(const struct worker *w, uint64_t t)
{
    if (t <= tick_time(w, 0))
        return 0;
    double est = (double)(t - w->sh->t0) / w->interval - (double)w->index / (double)w->sh->cfg->threads;
    uint64_t k = est > 1 ? (uint64_t)est - 1 : 0;
    while (k > 0 && tick_time(w, k - 1) >= t)
        k--;
    while (tick_time(w, k) < t)
        k++;
    return k;
}

static void open_send_due(struct conn *c, uint64_t now)
{
    while (c->rcount < c->w->sh->cfg->depth) {
        uint64_t t = intended(c, c->sched_k);
        if (t > now || !issue(c, t, now))
            break;
        c->sched_k++;
    }
}

/* Keep a connection busy after it became usable or a response completed (churn
 * sends its first request in connected(), then one after each answer until it has
 * sent requests_per_conn; its latency counts from that send). */
static void refill(struct conn *c, uint64_t now)
{
    const struct lg_config *cfg = c->w->sh->cfg;
    if (cfg->mode == LG_CLOSED)
        while (c->rcount < cfg->depth && issue(c, now, now))
            ;
    else if (cfg->mode == LG_OPEN)
        open_send_due(c, now);
    else if (c->nreq > 0 && c->nreq < c->w->sh->rpc && c->rcount == 0)
        issue(c, now, now);
}

static void connected(struct conn *c, uint64_t now)
{
    struct worker *w = c->w;
    struct shared *sh = w->sh;
    c->state = C_OPEN;
    /* Churn at a rate counts a connect by its scheduled time, like its latency. */
    uint64_t when = sh->churn_rate ? c->t_sched : now;
    if (when >= sh->ms && when < sh->me)
        w->ts[c->t->index].connects++;
    if (sh->cfg->mode == LG_CHURN) {
        /* the first request's latency includes the handshake (and, at a rate, any
         * wait for a free slot); the same stamp says whether the connection counts */
        c->t_member = sh->churn_rate ? c->t_sched : c->t_state;
        if (!issue(c, c->t_member, now)) {
            if (sh->churn_rate)
                slot_release(c);
            else
                conn_close(c);             /* window over or budget spent */
            return;
        }
    } else {
        refill(c, now);
    }
    conn_flush(c, now);
}

static void conn_start(struct conn *c, uint64_t now)
{
    struct worker *w = c->w;
    int fd = socket(c->t->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        conn_fail(c, LG_E_OTHER, now);     /* EMFILE and friends: back off, retry */
        return;
    }
    int one = 1;    /* small requests must leave now, not after Nagle's 40 ms */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->t_state = now;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c };
    epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev);
    /* Non-blocking connect: EINPROGRESS, then EPOLLOUT with SO_ERROR telling how the
     * handshake went.  Errors known at once (EADDRNOTAVAIL, ENETUNREACH) come here. */
    if (connect(fd, (struct sockaddr *)&c->t->addr, c->t->alen) == 0) {
        connected(c, now);
    } else if (errno == EINPROGRESS) {
        c->state = C_CONNECTING;
    } else {
        int e = errno;
        conn_fail(c, errno_kind(e), now);
    }
}

/* Write what is pending.  Returns -1 if the connection failed (and is closed). */
static int conn_flush(struct conn *c, uint64_t now)
{
    struct worker *w = c->w;
    struct shared *sh = w->sh;
    while (c->pend) {
        size_t n = 0, cap = c->pend < SCRATCH ? (size_t)c->pend : SCRATCH;
        const char *buf = w->sbuf;
        if (c->svc) {
            buf = c->obuf + c->ooff;    /* built by issue(), one request at a time */
            n = (size_t)c->pend;
        }
        uint64_t seq = c->sseq, off = c->soff;
        /* Generate the bytes instead of buffering them per connection: memory stays
         * flat with many connections and big messages, and the cursor is all state. */
        while (n < cap) {
            size_t take = c->t->msglen - off;
            if (take > cap - n)
                take = cap - n;
            if (c->t->protocol == LG_ECHO)
                pattern(msg_key(sh, c->gidx, seq), off, w->sbuf + n, take);
            else
                memcpy(w->sbuf + n, c->t->req + off, take);
            n += take, off += take;
            if (off == c->t->msglen)
                off = 0, seq++;
        }
        ssize_t r = send(c->fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;             /* edge-triggered EPOLLOUT will call us back */
            conn_fail(c, errno_kind(errno), now);
            return -1;
        }
        c->pend -= (uint64_t)r;
        if (c->svc) {
            c->ooff += (size_t)r;
            if (!c->pend)
                c->olen = c->ooff = 0;
        } else {
            c->soff += (uint64_t)r;
            c->sseq += c->soff / c->t->msglen;
            c->soff %= c->t->msglen;
        }
        if (now >= sh->ms)
            w->ts[c->t->index].bytes_sent += (uint64_t)r;
        if ((size_t)r < n)
            return 0;                 /* socket buffer full */
    }
    return 0;
}

static void complete(struct conn *c, int ok2xx, uint64_t now)
{
    struct worker *w = c->w;
    struct shared *sh = w->sh;
    uint64_t start = c->ring[c->rhead];
    uint32_t us = c->wring ? c->wring[c->rhead] : 0;
    uint64_t stamp = sh->cfg->mode == LG_CHURN ? c->t_member : start;   /* as in issue() */
    c->rhead = (c->rhead + 1) % sh->cfg->depth;
    c->rcount--;
    w->inflight--;
    c->fails = 0;
    c->t_progress = now;
    if (stamp >= sh->ms && stamp < sh->me) {
        struct lg_tresult *ts = &w->ts[c->t->index];
        uint64_t lat = now > start ? now - start : 0;
        int b = hist_index(lat);
        ts->hist[b]++;
        if (lat > ts->max_ns) ts->max_ns = lat;
        if (lat < ts->min_ns) ts->min_ns = lat;
        ts->requests++;
        c->completed++;
        if (!ok2xx)
            ts->non2xx++;
        if (sh->classes) {
            struct lg_cresult *cs = &w->cs[c->cls];
            ts->work_us += us;
            cs->hist[b]++;
            if (lat > cs->max_ns) cs->max_ns = lat;
            if (lat < cs->min_ns) cs->min_ns = lat;
            cs->requests++;
            cs->work_us += us;
        }
    }
}

/* ---- echo receive --------------------------------------------------------------- */

static int echo_input(struct conn *c, const char *data, size_t n, uint64_t now)
{
    struct worker *w = c->w;
    struct shared *sh = w->sh;
    size_t pos = 0;
    while (pos < n) {
        if (c->rcount == 0) {
            /* bytes nobody asked for: as wrong as a flipped byte */
            set_message(sh, "echo mismatch: server sent bytes that were never sent to it");
            goto mismatch;
        }
        size_t take = c->t->msglen - c->roff;
        if (take > n - pos)
            take = n - pos;
        uint64_t key = msg_key(sh, c->gidx, c->rseq);
        pattern(key, c->roff, w->sbuf, take);     /* sbuf is idle while we read */
        if (memcmp(w->sbuf, data + pos, take) != 0) {
            size_t i = 0;
            while (w->sbuf[i] == data[pos + i])
                i++;
            char text[256];
            snprintf(text, sizeof text,
                     "echo mismatch: connection %d, message %llu, byte %llu of %zu: "
                     "expected 0x%02x, got 0x%02x", c->gidx, (unsigned long long)c->rseq,
                     (unsigned long long)(c->roff + i), c->t->msglen,
                     (uint8_t)w->sbuf[i], (uint8_t)data[pos + i]);
            set_message(sh, text);
            goto mismatch;
        }
        pos += take;
        c->roff += take;
        if (c->roff == c->t->msglen) {
            c->roff = 0;
            c->rseq++;
            complete(c, 1, now);
            refill(c, now);
        }
    }
    return 0;
mismatch:
    if (sh->cfg->abort_on_mismatch)
        __atomic_store_n(&sh->stop, 1, __ATOMIC_RELAXED);
    conn_fail(c, LG_E_MISMATCH, now);
    return -1;
}

/* ---- HTTP receive ---------------------------------------------------------------- */

static int hbuf_append(struct conn *c, const char *p, size_t n)
{
    if (c->hlen + n > HDR_MAX)
        return -1;
    if (c->hlen + n > c->hcap) {
        size_t cap = c->hcap ? c->hcap : 1024;
        while (cap < c->hlen + n)
            cap *= 2;
        char *b = realloc(c->hbuf, cap);
        if (!b)
            return -1;
        c->hbuf = b, c->hcap = cap;
    }
    memcpy(c->hbuf + c->hlen, p, n);
    c->hlen += n;
    return 0;
}

/* Take bytes up to and including '\n' into hbuf: 1 line complete, 0 need more, -1 bad. */
static int take_line(struct conn *c, const char *data, size_t n, size_t *pos)
{
    const char *nl = memchr(data + *pos, '\n', n - *pos);
    size_t take = nl ? (size_t)(nl - (data + *pos)) + 1 : n - *pos;
    if (hbuf_append(c, data + *pos, take) < 0)
        return -1;
    *pos += take;
    return nl != NULL;
}

static int has_token(const char *v, size_t len, const char *tok)
{
    size_t tl = strlen(tok);
    for (size_t i = 0; i + tl <= len; i++)
        if (strncasecmp(v + i, tok, tl) == 0)
            return 1;
    return 0;
}

/* Parse a complete response head in hbuf.  Sets hstatus, hclose, the next state and
 * body_left.  Returns -1 if it is not HTTP/1.x as we know it. */
static int parse_head(struct conn *c, const char *h, size_t hl)
{
    const char *end = h + hl;
    if (hl < 14 || memcmp(h, "HTTP/1.", 7) != 0 || h[8] != ' ')
        return -1;
    for (int i = 9; i < 12; i++)
        if (h[i] < '0' || h[i] > '9')
            return -1;
    if (h[12] != ' ' && h[12] != '\r')
        return -1;
    int status = (h[9] - '0') * 100 + (h[10] - '0') * 10 + (h[11] - '0');
    int64_t clen = -1;
    int chunked = 0;
    c->hclose = 0;
    const char *line = memchr(h, '\n', hl);
    for (line = line + 1; line < end;) {
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        if (!eol || eol == line || eol[-1] != '\r')
            return -1;
        if (eol - line == 1)
            break;                      /* the empty line */
        const char *colon = memchr(line, ':', (size_t)(eol - line));
        if (!colon || colon == line)
            return -1;
        size_t nlen = (size_t)(colon - line);
        const char *v = colon + 1, *vend = eol - 1;
        while (v < vend && (*v == ' ' || *v == '\t')) v++;
        while (vend > v && (vend[-1] == ' ' || vend[-1] == '\t')) vend--;
        if (nlen == 14 && strncasecmp(line, "content-length", 14) == 0) {
            if (v == vend || vend - v > 18)
                return -1;
            int64_t x = 0;
            for (const char *p = v; p < vend; p++) {
                if (*p < '0' || *p > '9')
                    return -1;
                x = x * 10 + (*p - '0');
            }
            if (clen >= 0 && clen != x)
                return -1;              /* conflicting lengths: smuggling-shaped */
            clen = x;
        } else if (nlen == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) {
            chunked |= has_token(v, (size_t)(vend - v), "chunked");
        } else if (nlen == 10 && strncasecmp(line, "connection", 10) == 0) {
            c->hclose |= has_token(v, (size_t)(vend - v), "close");
        }
        line = eol + 1;
    }
    c->hstatus = status;
    if (status / 100 == 1 || status == 204 || status == 304) {
        c->hstate = H_BODY, c->body_left = 0;
    } else if (chunked) {
        c->hstate = H_CHUNK_SIZE;
    } else if (clen >= 0) {
        c->hstate = H_BODY, c->body_left = (uint64_t)clen;
    } else {
        c->hstate = H_UNTIL_CLOSE;      /* HTTP/1.0 style: the body ends with the stream */
    }
    return 0;
}

static void http_done(struct conn *c, uint64_t now)
{
    c->hstate = H_HDR;
    c->hlen = 0;
    if (c->hstatus / 100 == 1 && c->hstatus != 101)
        return;                         /* interim response: the real one follows */
    if (c->hclose)
        c->closing = 1;
    complete(c, c->hstatus / 100 == 2, now);
    refill(c, now);
}

static int http_input(struct conn *c, const char *data, size_t n, uint64_t now)
{
    size_t pos = 0;
    while (pos < n) {
        int r;
        switch (c->hstate) {
        case H_HDR: {
            if (c->rcount == 0)
                goto bad;               /* a response nobody asked for */
            /* Parse in place when the whole head is in this read (the common case,
             * and the only cheap one with pipelining); buffer only a head split
             * across reads.  `end`: offset in data just past the blank line. */
            size_t end = 0, avail = n - pos;
            if (c->hlen) {
                char seam[6];
                size_t tail = c->hlen < 3 ? c->hlen : 3, head = avail < 3 ? avail : 3;
                memcpy(seam, c->hbuf + c->hlen - tail, tail);
                memcpy(seam + tail, data + pos, head);
                const char *t = memmem(seam, tail + head, "\r\n\r\n", 4);
                if (t)
                    end = pos + (size_t)(t - seam) + 4 - tail;
            }
            if (!end) {
                const char *t = memmem(data + pos, avail, "\r\n\r\n", 4);
                if (t)
                    end = (size_t)(t - data) + 4;
            }
            if (!end) {
                if (hbuf_append(c, data + pos, avail) < 0)
                    goto bad;           /* head too large */
                pos = n;
                break;
            }
            int bad_head;
            if (c->hlen) {
                if (hbuf_append(c, data + pos, end - pos) < 0)
                    goto bad;
                bad_head = parse_head(c, c->hbuf, c->hlen) < 0;
            } else {
                bad_head = parse_head(c, data + pos, end - pos) < 0;
            }
            if (bad_head)
                goto bad;
            pos = end;
            c->hlen = 0;
            if (c->hstate == H_BODY && c->body_left == 0)
                http_done(c, now);
            break;
        }
        case H_BODY: {
            uint64_t take = n - pos < c->body_left ? n - pos : c->body_left;
            pos += take;
            c->body_left -= take;
            if (!c->body_left)
                http_done(c, now);
            break;
        }
        case H_UNTIL_CLOSE:
            pos = n;
            break;
        case H_CHUNK_SIZE:
            if ((r = take_line(c, data, n, &pos)) < 0)
                goto bad;
            if (r) {
                uint64_t sz = 0;
                size_t i = 0, digits = 0;
                for (; i < c->hlen; i++, digits++) {
                    char ch = c->hbuf[i];
                    int d = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
                          : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
                    if (d < 0)
                        break;
                    if (digits >= 15)
                        goto bad;
                    sz = sz * 16 + (uint64_t)d;
                }
                if (!digits || (c->hbuf[i] != ';' && c->hbuf[i] != '\r'))
                    goto bad;
                c->hlen = 0;
                c->body_left = sz;
                c->hstate = sz ? H_CHUNK_DATA : H_TRAILER;
            }
            break;
        case H_CHUNK_DATA: {
            uint64_t take = n - pos < c->body_left ? n - pos : c->body_left;
            pos += take;
            c->body_left -= take;
            if (!c->body_left)
                c->hstate = H_CHUNK_CRLF;
            break;
        }
        case H_CHUNK_CRLF:
            if ((r = take_line(c, data, n, &pos)) < 0)
                goto bad;
            if (r) {
                if (c->hlen != 2 || c->hbuf[0] != '\r')
                    goto bad;
                c->hlen = 0;
                c->hstate = H_CHUNK_SIZE;
            }
            break;
        case H_TRAILER:
            if ((r = take_line(c, data, n, &pos)) < 0)
                goto bad;
            if (r) {
                int empty = c->hlen == 2 && c->hbuf[0] == '\r';
                c->hlen = 0;
                if (empty)
                    http_done(c, now);
            }
            break;
        }
    }
    return 0;
bad:
    conn_fail(c, LG_E_HTTP_PARSE, now);
    return -1;
}

/* ---- event handling ------------------------------------------------------------- */

static void conn_readable(struct conn *c, uint32_t events, uint64_t now)
{
    struct worker *w = c->w;
    struct shared *sh = w->sh;
    for (;;) {
        ssize_t r = recv(c->fd, w->rbuf, SCRATCH, 0);
        if (r > 0) {
            if (now >= sh->ms)
                w->ts[c->t->index].bytes_received += (uint64_t)r;
            c->t_progress = now;
            int rc = c->t->protocol == LG_ECHO ? echo_input(c, w->rbuf, (size_t)r, now)
                                               : http_input(c, w->rbuf, (size_t)r, now);
            if (rc < 0)
                return;
            if ((sh->cfg->mode == LG_CHURN || c->closing) && c->rcount == 0) {
                /* churn: one request per connection, then the next connect;
                 * Connection: close from the server: reconnect quietly */
                conn_recycle(c, now);
                return;
            }
            /* A short read means the socket is drained and the next arrival is a new
             * edge, which saves the EAGAIN read per wakeup a drain loop costs.  Not
             * so for a FIN or error reported in this same event: it will not be
             * signalled again, so read on until recv says so. */
            if (r < SCRATCH && !(events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
                break;
        } else if (r == 0) {
            if (c->hstate == H_UNTIL_CLOSE && c->rcount > 0) {
                c->closing = 1;
                http_done(c, now);
            }
            if (c->rcount > 0)
                conn_fail(c, LG_E_EOF, now);
            else
                conn_recycle(c, now);
            return;
        } else {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            conn_fail(c, errno_kind(errno), now);
            return;
        }
    }
    conn_flush(c, now);
}

static void conn_event(struct conn *c, uint32_t events, uint64_t now)
{
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err) {
            conn_fail(c, errno_kind(err), now);
            return;
        }
        if (!(events & (EPOLLOUT | EPOLLIN | EPOLLERR | EPOLLHUP)))
            return;
        connected(c, now);
        if (c->state != C_OPEN)
            return;
    }
    if (c->state != C_OPEN)
        return;                         /* stale event for a connection we dropped */
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
        conn_readable(c, events, now);
        return;                         /* it flushed too */
    }
    if (events & EPOLLOUT)
        conn_flush(c, now);
}

/* Every SWEEP_NS: connect and read timeouts, and reconnects whose back-off is over. */
static void sweep(struct worker *w, uint64_t now)
{
    uint64_t to = w->sh->timeout_ns;
    for (int i = 0; i < w->n; i++) {
        struct conn *c = &w->conns[i];
        if (c->state == C_IDLE) {
            /* (a free churn slot waits for its tick, not for a back-off) */
            if (!w->sh->churn_rate && now >= c->t_state && may_send(w, now))
                conn_start(c, now);
        } else if (c->state == C_CONNECTING) {
            if (now - c->t_state > to)
                conn_fail(c, LG_E_CONNECT_TIMEOUT, now);
        } else if (c->rcount > 0 && now - c->t_progress > to) {
            conn_fail(c, LG_E_READ_TIMEOUT, now);
        }
    }
}

static void open_ticks(struct worker *w, uint64_t now)
{
    uint64_t due = ticks_before(w, now + 1);
    if (due <= w->tick_k)
        return;
    /* Far behind?  Each connection sends all its due requests in one go, so one
     * visit per connection is enough. */
    uint64_t k = due - w->tick_k > (uint64_t)w->n ? due - (uint64_t)w->n : w->tick_k;
    for (; k < due; k++) {
        struct conn *c = &w->conns[k % (uint64_t)w->n];
        if (c->state == C_OPEN) {
            open_send_due(c, now);
            conn_flush(c, now);
        }
    }
    w->tick_k = due;
}

/* Churn at a rate: start every connect that is due, as far as free slots allow.  A
 * due connect that finds no free slot stays due (tick_k does not move past it) and
 * goes out late, as soon as a slot frees; its latency still counts from its tick, so
 * a server that stops accepting shows in the tail instead of slowing the schedule.
 * Thread t's k-th connect goes to target (t + k) % ntargets: round robin. */
static void churn_ticks(struct worker *w, uint64_t now)
{
    struct shared *sh = w->sh;
    uint64_t due = ticks_before(w, now + 1);
    while (w->tick_k < due && w->nidle > 0 && may_send(w, now)) {
        uint64_t t = tick_time(w, w->tick_k);
        if (t >= sh->ms && sh->cfg->max_requests && !charge(w, (uint64_t)sh->rpc, now))
            break;
        struct conn *c = w->idle[w->ihead];
        w->ihead = (w->ihead + 1) % w->n;
        w->nidle--;
        c->t = &sh->tg[(w->tick_k + (uint64_t)w->index) % (uint64_t)sh->ntg];
        c->t_sched = t;
        w->tick_k++;
        conn_start(c, now);             /* a connect that fails at once frees the slot */
    }
}

/* When the measured window closes: what was scheduled in it and never sent.  The
 * open loop's ticks belong to connections (each has its own cursor); churn's ticks
 * go out in order, so the one cursor tick_k says what is still waiting. */
static void account(struct worker *w)
{
    struct shared *sh = w->sh;
    uint64_t kme = ticks_before(w, sh->me), kms = ticks_before(w, sh->ms);
    w->scheduled = kme - kms;
    if (w->no_more)
        return;                         /* the budget ended the schedule on purpose */
    if (sh->churn_rate) {
        uint64_t from = w->tick_k > kms ? w->tick_k : kms;
        w->backlog = kme > from ? kme - from : 0;
        return;
    }
    for (int j = 0; j < w->n; j++) {
        uint64_t due = kme > (uint64_t)j ? (kme - (uint64_t)j + (uint64_t)w->n - 1) / (uint64_t)w->n : 0;
        if (due > w->conns[j].sched_k)
            w->backlog += due - w->conns[j].sched_k;
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct shared *sh = w->sh;
    const struct lg_config *cfg = sh->cfg;

    pthread_mutex_lock(&sh->lock);
    while (!sh->gate)
        pthread_cond_wait(&sh->gate_cv, &sh->lock);
    pthread_mutex_unlock(&sh->lock);
    if (w->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(w->cpu, &set);
        if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0)
            snprintf(w->err, sizeof w->err, "cannot pin thread %d to CPU %d", w->index, w->cpu);
    }
    /* The open-loop schedule wants sub-100 us wakeups; the default 50 us slack of
     * an ordinary thread would blur them. */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    w->ep = epoll_create1(EPOLL_CLOEXEC);
    if (w->ep < 0 && !w->err[0])
        snprintf(w->err, sizeof w->err, "epoll_create1: %s", strerror(errno));

    /* Everybody ready, then one thread stamps t0 for all: a common clock origin keeps
     * the threads' open-loop schedules interleaved rather than bunched. */
    if (pthread_barrier_wait(&sh->bar) == PTHREAD_BARRIER_SERIAL_THREAD) {
        sh->t0 = now_ns();
        sh->ms = sh->t0 + (uint64_t)(cfg->warmup * 1e9);
        sh->me = sh->ms + (uint64_t)(cfg->duration * 1e9);
        sh->deadline = sh->me + sh->timeout_ns;
    }
    pthread_barrier_wait(&sh->bar);
    if (w->err[0] || w->ep < 0)
        __atomic_store_n(&sh->stop, 1, __ATOMIC_RELAXED);

    uint64_t now = now_ns();
    for (int i = 0; i < w->n && !sh->churn_rate && may_send(w, now); i++)
        conn_start(&w->conns[i], now);
    uint64_t next_sweep = now + SWEEP_NS;
    struct epoll_event evs[NEVENTS];

    for (;;) {
        now = now_ns();
        if (!w->ru_started && now >= sh->ms) {
            getrusage(RUSAGE_THREAD, &w->ru0);
            w->ru_started = 1;
        }
        if (__atomic_load_n(&sh->stop, __ATOMIC_RELAXED))
            break;
        if (!w->draining && (now >= sh->me || w->no_more)) {
            w->draining = 1;            /* nothing new from here on; wait for answers */
            if (cfg->rate > 0)
                account(w);
        }
        /* At a rate a slot is busy from its connect on, so wait for those too. */
        if (w->draining && (sh->churn_rate ? w->nidle == w->n : w->inflight == 0))
            break;
        if (now >= sh->deadline) {
            for (int i = 0; i < w->n; i++) {
                struct conn *c = &w->conns[i];
                if (c->rcount > 0)
                    w->ts[c->t->index].errors[LG_E_READ_TIMEOUT]++;
                else if (sh->churn_rate && c->state == C_CONNECTING)
                    w->ts[c->t->index].errors[LG_E_CONNECT_TIMEOUT]++;
            }
            break;
        }
        if (cfg->mode == LG_OPEN && !w->draining)
            open_ticks(w, now);
        if (sh->churn_rate && !w->draining)
            churn_ticks(w, now);
        if (now >= next_sweep) {
            sweep(w, now);
            next_sweep = now + SWEEP_NS;
        }

        uint64_t wake = next_sweep;
        if (!w->draining && (cfg->mode == LG_OPEN || (sh->churn_rate && w->nidle > 0))) {
            uint64_t t = tick_time(w, w->tick_k);   /* (no free slot: an answer wakes us) */
            if (t < wake) wake = t;
        }
        if (!w->ru_started && sh->ms < wake) wake = sh->ms;
        if (!w->draining && sh->me < wake) wake = sh->me;
        if (sh->deadline < wake) wake = sh->deadline;
        uint64_t wait = wake > now ? wake - now : 0;
        struct timespec ts = { .tv_sec = (time_t)(wait / 1000000000ull),
                               .tv_nsec = (long)(wait % 1000000000ull) };
        int nev = epoll_pwait2(w->ep, evs, NEVENTS, &ts, NULL);
        for (int i = 0; i < nev; i++)
            conn_event(evs[i].data.ptr, evs[i].events, now_ns());
    }

    w->t_end = now_ns();
    getrusage(RUSAGE_THREAD, &w->ru1);
    if (!w->ru_started)
        w->ru0 = w->ru1;
    if (cfg->rate > 0 && !w->draining)
        account(w);
    for (int i = 0; i < w->n; i++)
        if (w->conns[i].fd >= 0)
            close(w->conns[i].fd);
    if (w->ep >= 0)
        close(w->ep);
    return NULL;
}

static double tv_s(struct timeval a, struct timeval b)
{
    return (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_usec - a.tv_usec) * 1e-6;
}

/* Resolve a target and build its request.  0, or -1 with the reason in `msg`. */
static int tgt_init(struct tgt *t, const struct lg_target *spec, int index, size_t size,
                    char *msg, size_t msgcap)
{
    char port[16];
    snprintf(port, sizeof port, "%d", spec->port);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *ai;
    int gai = getaddrinfo(spec->host, port, &hints, &ai);
    if (gai != 0) {
        snprintf(msg, msgcap, "cannot resolve %s: %s", spec->host, gai_strerror(gai));
        return -1;
    }
    memcpy(&t->addr, ai->ai_addr, ai->ai_addrlen);
    t->alen = ai->ai_addrlen;
    freeaddrinfo(ai);
    t->index = index;
    t->protocol = spec->protocol;
    if (spec->protocol != LG_HTTP) {
        t->msglen = size;
        return 0;
    }
    /* Host header: an IPv6 literal needs its brackets back. */
    int v6 = strchr(spec->host, ':') != NULL;
    size_t cap = strlen(spec->path) + strlen(spec->host) + 64;
    t->req = malloc(cap);
    if (!t->req) {
        snprintf(msg, msgcap, "out of memory");
        return -1;
    }
    t->msglen = (size_t)snprintf(t->req, cap, "GET %s HTTP/1.1\r\nHost: %s%s%s:%d\r\n\r\n",
                                 spec->path, v6 ? "[" : "", spec->host, v6 ? "]" : "",
                                 spec->port);
    /* The same request with the path cut out: "GET /work/" US + this. */
    const char *rest = t->req + 4 + strlen(spec->path);
    t->wsuflen = t->msglen - (size_t)(rest - t->req);
    t->wsuf = malloc(t->wsuflen);
    if (!t->wsuf) {
        snprintf(msg, msgcap, "out of memory");
        return -1;
    }
    memcpy(t->wsuf, rest, t->wsuflen);
    return 0;
}

int lg_run(const struct lg_config *cfg, struct lg_result *res)
{
    struct shared sh;
    memset(&sh, 0, sizeof sh);
    sh.cfg = cfg;
    res->message[0] = 0;
    if (cfg->connections < 1 || cfg->threads < 1 || cfg->threads > cfg->connections ||
        cfg->ntargets < 1 || cfg->depth < 1 || cfg->size < 1 || !(cfg->duration > 0) ||
        !(cfg->timeout > 0) || !(cfg->rate >= 0) ||
        (cfg->mode == LG_OPEN && !(cfg->rate > 0)) || (cfg->mode == LG_CLOSED && cfg->rate > 0) ||
        cfg->heavy_conns < 0 || cfg->heavy_conns > cfg->connections ||
        (cfg->heavy_conns > 0 && cfg->heavy.kind == LG_SVC_NONE) || cfg->requests_per_conn < 0 ||
        (cfg->requests_per_conn > 1 && cfg->mode != LG_CHURN)) {
        snprintf(res->message, sizeof res->message, "invalid configuration");
        return -1;
    }
    int classes = cfg->service.kind != LG_SVC_NONE || cfg->heavy_conns > 0;
    for (int i = 0; classes && i < cfg->ntargets; i++)
        if (cfg->targets[i].protocol != LG_HTTP) {
            snprintf(res->message, sizeof res->message, "service times need HTTP targets");
            return -1;
        }
    for (int k = 0; classes && k < LG_NCLASS; k++)
        if (!res->classes[k].hist) {
            snprintf(res->message, sizeof res->message, "no histogram for the class figures");
            return -1;
        }
    sh.churn_rate = cfg->mode == LG_CHURN && cfg->rate > 0;
    sh.rpc = cfg->requests_per_conn > 1 ? cfg->requests_per_conn : 1;
    sh.classes = classes;
    sh.ntg = cfg->ntargets;
    sh.tg = calloc((size_t)sh.ntg, sizeof *sh.tg);
    if (!sh.tg) {
        snprintf(res->message, sizeof res->message, "out of memory");
        return -1;
    }
    for (int i = 0; i < sh.ntg; i++)
        if (tgt_init(&sh.tg[i], &cfg->targets[i], i, (size_t)cfg->size,
                     res->message, sizeof res->message) < 0) {
            for (int j = 0; j <= i; j++)
                free(sh.tg[j].req), free(sh.tg[j].wsuf);
            free(sh.tg);
            return -1;
        } else if (sh.tg[i].wsuflen + WORK_PREFIX_LEN + 8 > sh.wmax) {
            sh.wmax = sh.tg[i].wsuflen + WORK_PREFIX_LEN + 8;
        }
    sh.timeout_ns = (uint64_t)(cfg->timeout * 1e9);
    sh.seed = now_ns() * 0x9e3779b97f4a7c15ull;
    pthread_mutex_init(&sh.lock, NULL);
    pthread_cond_init(&sh.gate_cv, NULL);

    int T = cfg->threads, C = cfg->connections, NT = sh.ntg;
    struct worker *ws = calloc((size_t)T, sizeof *ws);
    struct conn *conns = calloc((size_t)C, sizeof *conns);
    uint64_t *rings = calloc((size_t)C * (size_t)cfg->depth, sizeof *rings);
    int rc = 0, started = 0;
    if (!ws || !conns || !rings) {
        snprintf(res->message, sizeof res->message, "out of memory");
        rc = -1;
        goto out;
    }
    /* Per-connection period C / rate; thread t's n_t connections take turns, so the
     * thread ticks every C / (rate * n_t) and all threads together tick at `rate`.
     * Churn at a rate uses the same schedule, one connect per tick. */
    for (int t = 0; t < T; t++) {
        struct worker *w = &ws[t];
        int lo = (int)((int64_t)C * t / T), hi = (int)((int64_t)C * (t + 1) / T);
        w->sh = &sh;
        w->index = t;
        w->cpu = cfg->ncpus > 0 ? cfg->cpus[t % cfg->ncpus] : -1;
        w->ep = -1;
        w->n = hi - lo;
        w->conns = conns + lo;
        if (cfg->rate > 0)
            w->interval = 1e9 * (double)C / (cfg->rate * (double)w->n);
        w->ts = calloc((size_t)NT, sizeof *w->ts);
        w->idle = calloc((size_t)w->n, sizeof *w->idle);
        w->sbuf = malloc(SCRATCH);
        w->rbuf = malloc(SCRATCH);
        if (!w->ts || !w->idle || !w->sbuf || !w->rbuf) {
            snprintf(res->message, sizeof res->message, "out of memory");
            rc = -1;
            goto out;
        }
        for (int k = 0; classes && k < LG_NCLASS; k++) {
            w->cs[k].min_ns = UINT64_MAX;
            w->cs[k].hist = calloc(HIST_BUCKETS, sizeof *w->cs[k].hist);
            if (!w->cs[k].hist) {
                snprintf(res->message, sizeof res->message, "out of memory");
                rc = -1;
                goto out;
            }
        }
        for (int k = 0; k < NT; k++) {
            w->ts[k].min_ns = UINT64_MAX;
            w->ts[k].hist = calloc(HIST_BUCKETS, sizeof *w->ts[k].hist);
            if (!w->ts[k].hist) {
                snprintf(res->message, sizeof res->message, "out of memory");
                rc = -1;
                goto out;
            }
        }
        for (int j = 0; j < w->n; j++) {
            struct conn *c = &w->conns[j];
            c->w = w;
            c->t = &sh.tg[(lo + j) % NT];       /* round robin over the targets */
            c->fd = -1;
            c->lidx = j;
            c->gidx = lo + j;
            c->ring = rings + (size_t)(lo + j) * (size_t)cfg->depth;
            if (sh.churn_rate)
                w->idle[w->nidle++] = c;        /* slot 0 first */
            if (!classes)
                continue;
            c->cls = c->gidx < cfg->heavy_conns ? LG_HEAVY : LG_LIGHT;
            const struct lg_service *d = c->cls == LG_HEAVY ? &cfg->heavy : &cfg->service;
            c->svc = d->kind != LG_SVC_NONE ? d : NULL;
            c->wring = calloc((size_t)cfg->depth, sizeof *c->wring);
            c->obuf = c->svc ? malloc((size_t)cfg->depth * sh.wmax) : NULL;
            if (!c->wring || (c->svc && !c->obuf)) {
                snprintf(res->message, sizeof res->message, "out of memory");
                rc = -1;
                goto out;
            }
            rng_seed(c->rng, cfg->seed, (uint64_t)c->gidx);
        }
    }
    /* Threads wait at a gate until all exist, so a failed pthread_create can size
     * the barrier to the threads that did start and stop them cleanly. */
    pthread_mutex_lock(&sh.lock);
    for (; started < T; started++)
        if (pthread_create(&ws[started].tid, NULL, worker_main, &ws[started]) != 0)
            break;
    if (started < T) {
        snprintf(sh.message, sizeof sh.message, "pthread_create failed after %d threads", started);
        sh.stop = 1;
        rc = -1;
    }
    if (started)
        pthread_barrier_init(&sh.bar, NULL, (unsigned)started);
    sh.gate = 1;
    pthread_cond_broadcast(&sh.gate_cv);
    pthread_mutex_unlock(&sh.lock);
    for (int t = 0; t < started; t++)
        pthread_join(ws[t].tid, NULL);

    res->scheduled = res->backlog = 0;
    res->cpu_user = res->cpu_sys = 0;
    for (int k = 0; classes && k < LG_NCLASS; k++) {
        struct lg_cresult *r = &res->classes[k];
        r->requests = r->work_us = r->max_ns = 0;
        r->min_ns = UINT64_MAX;
        memset(r->hist, 0, HIST_BUCKETS * sizeof *r->hist);
    }
    for (int k = 0; k < NT; k++) {
        struct lg_tresult *r = &res->targets[k];
        r->requests = r->bytes_sent = r->bytes_received = r->non2xx = r->connects = 0;
        r->work_us = 0;
        r->max_ns = 0;
        r->min_ns = UINT64_MAX;
        memset(r->errors, 0, sizeof r->errors);
        memset(r->hist, 0, HIST_BUCKETS * sizeof *r->hist);
    }
    uint64_t t_last = sh.ms;
    for (int t = 0; t < T; t++) {
        struct worker *w = &ws[t];
        if (w->err[0] && !res->message[0]) {
            snprintf(res->message, sizeof res->message, "%s", w->err);
            rc = -1;
        }
        for (int k = 0; k < NT; k++) {
            struct lg_tresult *r = &res->targets[k], *x = &w->ts[k];
            r->requests += x->requests;
            r->bytes_sent += x->bytes_sent;
            r->bytes_received += x->bytes_received;
            r->non2xx += x->non2xx;
            r->connects += x->connects;
            r->work_us += x->work_us;
            for (int e = 0; e < LG_NERR; e++)
                r->errors[e] += x->errors[e];
            for (int b = 0; b < HIST_BUCKETS; b++)
                r->hist[b] += x->hist[b];
            if (x->max_ns > r->max_ns) r->max_ns = x->max_ns;
            if (x->min_ns < r->min_ns) r->min_ns = x->min_ns;
        }
        for (int k = 0; classes && k < LG_NCLASS; k++) {
            struct lg_cresult *r = &res->classes[k], *x = &w->cs[k];
            r->requests += x->requests;
            r->work_us += x->work_us;
            for (int b = 0; b < HIST_BUCKETS; b++)
                r->hist[b] += x->hist[b];
            if (x->max_ns > r->max_ns) r->max_ns = x->max_ns;
            if (x->min_ns < r->min_ns) r->min_ns = x->min_ns;
        }
        res->scheduled += w->scheduled;
        res->backlog += w->backlog;
        res->cpu_user += tv_s(w->ru0.ru_utime, w->ru1.ru_utime);
        res->cpu_sys += tv_s(w->ru0.ru_stime, w->ru1.ru_stime);
        if (w->t_end > t_last) t_last = w->t_end;
        for (int j = 0; j < w->n; j++)
            res->per_conn[w->conns[j].gidx] = w->conns[j].completed;
    }
    for (int k = 0; k < NT; k++)
        if (res->targets[k].min_ns == UINT64_MAX)
            res->targets[k].min_ns = 0;
    for (int k = 0; classes && k < LG_NCLASS; k++)
        if (res->classes[k].min_ns == UINT64_MAX)
            res->classes[k].min_ns = 0;
    res->elapsed = sh.ms ? (double)(t_last - sh.ms) * 1e-9 : 0.0;
    uint64_t spent = __atomic_load_n(&sh.t_spent, __ATOMIC_RELAXED);
    res->span = (double)((spent && spent < sh.me ? spent : sh.me) - sh.ms) * 1e-9;
    res->aborted = __atomic_load_n(&sh.stop, __ATOMIC_RELAXED);
    if (sh.message[0] && !res->message[0])
        snprintf(res->message, sizeof res->message, "%s", sh.message);

out:
    if (ws)
        for (int t = 0; t < T; t++) {
            if (ws[t].ts)
                for (int k = 0; k < NT; k++)
                    free(ws[t].ts[k].hist);
            free(ws[t].ts);
            free(ws[t].idle);
            free(ws[t].sbuf);
            free(ws[t].rbuf);
            for (int k = 0; k < LG_NCLASS; k++)
                free(ws[t].cs[k].hist);
        }
    if (conns)
        for (int i = 0; i < C; i++)
            free(conns[i].hbuf), free(conns[i].wring), free(conns[i].obuf);
    free(ws);
    free(conns);
    free(rings);
    for (int k = 0; k < NT; k++)
        free(sh.tg[k].req), free(sh.tg[k].wsuf);
    free(sh.tg);
    if (started)
        pthread_barrier_destroy(&sh.bar);
    pthread_cond_destroy(&sh.gate_cv);
    pthread_mutex_destroy(&sh.lock);
    return rc;
}
