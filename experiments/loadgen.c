/*
 * loadgen.c: the C core of parallelnet's load generator.
 *
 * Why C: a Python client spends tens of microseconds of CPU per request, which on a
 * 2-core box steals the very CPU the server under test needs and caps the rate we can
 * offer.  Here one Python call (cffi API mode, GIL released) runs a whole test: N
 * pthreads, each pinned to a CPU, each with its own epoll set and its own share of
 * the connections, so threads share nothing on the hot path but one atomic request
 * budget and a stop flag.
 *
 * Time: CLOCK_MONOTONIC ns.  The run is [t0, ms) warm-up, [ms, me) measured, then a
 * drain of at most `timeout` for requests already in flight.  A request belongs to
 * the measurement iff its start stamp is in [ms, me); the stamp is the actual send
 * time (closed loop), the intended send time (open loop, so a stalled server cannot
 * hide its stall: wrk2's coordinated-omission correction) or the connect start
 * (churn, so the handshake is part of what is measured).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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
    LG_E_MISMATCH, LG_E_HTTP_PARSE, LG_E_OTHER, LG_NERR
};

struct lg_config {
    const char *host;
    int port, protocol, mode, connections, threads;
    const int *cpus;            /* thread i runs on cpus[i % ncpus]; ncpus 0: unpinned */
    int ncpus, size, depth;
    double rate, duration, warmup, timeout;   /* req/s, seconds */
    uint64_t max_requests;      /* measured requests; 0: no cap */
    const char *path;
    int abort_on_mismatch;
};

struct lg_result {
    uint64_t requests, bytes_sent, bytes_received;
    uint64_t errors[8];
    uint64_t non2xx, connects, scheduled, backlog, min_ns, max_ns;
    double elapsed, cpu_user, cpu_sys;
    int aborted;
    uint64_t *hist;             /* caller's array of lg_hist_buckets() counts */
    uint64_t *per_conn;         /* caller's array of `connections` counts */
    char message[256];
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

struct conn {
    struct worker *w;
    int fd, state, lidx, gidx;
    int fails;                  /* consecutive failures: drives reconnect back-off */
    int closing;                /* server said Connection: close: send nothing more */
    uint64_t t_state;           /* connect start, or earliest reconnect time when idle */
    uint64_t t_progress;        /* last sign of life while requests are in flight */
    uint64_t *ring;             /* start stamps of issued requests, capacity depth */
    int rhead, rcount;
    uint64_t pend;              /* bytes issued but not yet written */
    uint64_t sseq, soff;        /* send cursor: message number and offset in it */
    uint64_t rseq, roff;        /* receive cursor (echo) */
    uint64_t sched_k;           /* open loop: index of the next request to send */
    uint64_t completed;         /* measured completions */
    int hstate, hstatus, hclose;
    uint64_t body_left;
    char *hbuf;
    size_t hlen, hcap;
};

struct shared {
    const struct lg_config *cfg;
    struct sockaddr_storage addr;
    socklen_t alen;
    char *req;                  /* the HTTP request, identical for every send */
    size_t reqlen, msglen;
    uint64_t t0, ms, me, deadline, timeout_ns, seed;
    uint64_t budget_used;       /* atomic: measured requests issued so far */
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
    uint64_t *hist;
    uint64_t requests, bytes_sent, bytes_received, non2xx, connects, min_ns, max_ns;
    uint64_t errors[LG_NERR];
    uint64_t scheduled, backlog;
    double interval;            /* open loop: ns between this thread's sends */
    uint64_t tick_k;            /* open loop: next tick of this thread's schedule */
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
    c->rseq = c->sseq;          /* new stream: unanswered messages are forgotten */
    c->closing = 0;
    c->hstate = H_HDR;
    c->hlen = 0;
}

static void conn_fail(struct conn *c, int kind, uint64_t now)
{
    c->w->errors[kind]++;
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
    default: return LG_E_OTHER;
    }
}

/* Queue one request on c.  `start` is its latency origin; the budget is charged only
 * for measured requests so warm-up never eats into max_requests. */
static int issue(struct conn *c, uint64_t start, uint64_t now)
{
    struct worker *w = c->w;
    struct shared *sh = w->sh;
    if (!may_send(w, now) || c->closing || c->state != C_OPEN || start >= sh->me)
        return 0;
    if (start >= sh->ms && sh->cfg->max_requests) {
        if (__atomic_fetch_add(&sh->budget_used, 1, __ATOMIC_RELAXED) >= sh->cfg->max_requests) {
            w->no_more = 1;
            return 0;
        }
    }
    int depth = sh->cfg->depth;
    c->ring[(c->rhead + c->rcount) % depth] = start;
    if (c->rcount++ == 0)
        c->t_progress = now;
    w->inflight++;
    c->pend += sh->msglen;
    return 1;
}

/* Open loop.  Thread t ticks at t0 + (t/T + k) * interval; conn j of its n owns ticks
 * j, j+n, j+2n...  Every time on the schedule comes from this one function, so the
 * tick that wakes a connection and the connection's own notion of "due" agree to the
 * nanosecond (two roundings could leave a request waiting a whole extra period). */
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
 * sends its one request in connected() and never refills). */
static void refill(struct conn *c, uint64_t now)
{
    const struct lg_config *cfg = c->w->sh->cfg;
    if (cfg->mode == LG_CLOSED)
        while (c->rcount < cfg->depth && issue(c, now, now))
            ;
    else if (cfg->mode == LG_OPEN)
        open_send_due(c, now);
}

static void connected(struct conn *c, uint64_t now)
{
    struct worker *w = c->w;
    c->state = C_OPEN;
    if (now >= w->sh->ms && now < w->sh->me)
        w->connects++;
    if (w->sh->cfg->mode == LG_CHURN) {
        if (!issue(c, c->t_state, now)) {  /* latency includes the handshake */
            conn_close(c);                 /* window over or budget spent */
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
    struct shared *sh = w->sh;
    int fd = socket(sh->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
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
    if (connect(fd, (struct sockaddr *)&sh->addr, sh->alen) == 0) {
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
        uint64_t seq = c->sseq, off = c->soff;
        /* Generate the bytes instead of buffering them per connection: memory stays
         * flat with many connections and big messages, and the cursor is all state. */
        while (n < cap) {
            size_t take = sh->msglen - off;
            if (take > cap - n)
                take = cap - n;
            if (sh->cfg->protocol == LG_ECHO)
                pattern(msg_key(sh, c->gidx, seq), off, w->sbuf + n, take);
            else
                memcpy(w->sbuf + n, sh->req + off, take);
            n += take, off += take;
            if (off == sh->msglen)
                off = 0, seq++;
        }
        ssize_t r = send(c->fd, w->sbuf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;             /* edge-triggered EPOLLOUT will call us back */
            conn_fail(c, errno_kind(errno), now);
            return -1;
        }
        c->pend -= (uint64_t)r;
        c->soff += (uint64_t)r;
        c->sseq += c->soff / sh->msglen;
        c->soff %= sh->msglen;
        if (now >= sh->ms)
            w->bytes_sent += (uint64_t)r;
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
    c->rhead = (c->rhead + 1) % sh->cfg->depth;
    c->rcount--;
    w->inflight--;
    c->fails = 0;
    c->t_progress = now;
    if (start >= sh->ms && start < sh->me) {
        uint64_t lat = now > start ? now - start : 0;
        w->hist[hist_index(lat)]++;
        if (lat > w->max_ns) w->max_ns = lat;
        if (lat < w->min_ns) w->min_ns = lat;
        w->requests++;
        c->completed++;
        if (!ok2xx)
            w->non2xx++;
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
        size_t take = sh->msglen - c->roff;
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
                     (unsigned long long)(c->roff + i), sh->msglen,
                     (uint8_t)w->sbuf[i], (uint8_t)data[pos + i]);
            set_message(sh, text);
            goto mismatch;
        }
        pos += take;
        c->roff += take;
        if (c->roff == sh->msglen) {
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
                w->bytes_received += (uint64_t)r;
            c->t_progress = now;
            int rc = sh->cfg->protocol == LG_ECHO ? echo_input(c, w->rbuf, (size_t)r, now)
                                                  : http_input(c, w->rbuf, (size_t)r, now);
            if (rc < 0)
                return;
            if (sh->cfg->mode == LG_CHURN && c->rcount == 0) {
                conn_close(c);          /* one request per connection, then a new one */
                c->fails = 0;
                if (may_send(w, now))
                    conn_start(c, now);
                return;
            }
            if (c->closing && c->rcount == 0) {
                conn_close(c);          /* server asked to close; reconnect quietly */
                if (may_send(w, now))
                    conn_start(c, now);
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
            if (c->rcount > 0) {
                conn_fail(c, LG_E_EOF, now);
            } else {
                conn_close(c);
                if (may_send(w, now))
                    conn_start(c, now);
            }
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
            if (now >= c->t_state && may_send(w, now))
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

/* When the measured window closes: what was scheduled in it and never sent. */
static void open_account(struct worker *w)
{
    struct shared *sh = w->sh;
    uint64_t kme = ticks_before(w, sh->me), kms = ticks_before(w, sh->ms);
    w->scheduled = kme - kms;
    if (w->no_more)
        return;                         /* the budget ended the schedule on purpose */
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
    for (int i = 0; i < w->n && may_send(w, now); i++)
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
            if (cfg->mode == LG_OPEN)
                open_account(w);
        }
        if (w->draining && w->inflight == 0)
            break;
        if (now >= sh->deadline) {
            for (int i = 0; i < w->n; i++)
                if (w->conns[i].rcount > 0)
                    w->errors[LG_E_READ_TIMEOUT]++;
            break;
        }
        if (cfg->mode == LG_OPEN && !w->draining)
            open_ticks(w, now);
        if (now >= next_sweep) {
            sweep(w, now);
            next_sweep = now + SWEEP_NS;
        }

        uint64_t wake = next_sweep;
        if (cfg->mode == LG_OPEN && !w->draining) {
            uint64_t t = tick_time(w, w->tick_k);
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
    if (cfg->mode == LG_OPEN && !w->draining)
        open_account(w);
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

int lg_run(const struct lg_config *cfg, struct lg_result *res)
{
    struct shared sh;
    memset(&sh, 0, sizeof sh);
    sh.cfg = cfg;
    res->message[0] = 0;
    if (cfg->connections < 1 || cfg->threads < 1 || cfg->threads > cfg->connections ||
        cfg->depth < 1 || cfg->size < 1 || !(cfg->duration > 0) || !(cfg->timeout > 0) ||
        (cfg->mode == LG_OPEN && !(cfg->rate > 0))) {
        snprintf(res->message, sizeof res->message, "invalid configuration");
        return -1;
    }

    char port[16];
    snprintf(port, sizeof port, "%d", cfg->port);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *ai;
    int gai = getaddrinfo(cfg->host, port, &hints, &ai);
    if (gai != 0) {
        snprintf(res->message, sizeof res->message, "cannot resolve %s: %s", cfg->host, gai_strerror(gai));
        return -1;
    }
    memcpy(&sh.addr, ai->ai_addr, ai->ai_addrlen);
    sh.alen = ai->ai_addrlen;
    freeaddrinfo(ai);

    if (cfg->protocol == LG_HTTP) {
        /* Host header: an IPv6 literal needs its brackets back. */
        int v6 = strchr(cfg->host, ':') != NULL;
        size_t cap = strlen(cfg->path) + strlen(cfg->host) + 64;
        sh.req = malloc(cap);
        if (!sh.req) {
            snprintf(res->message, sizeof res->message, "out of memory");
            return -1;
        }
        sh.reqlen = (size_t)snprintf(sh.req, cap, "GET %s HTTP/1.1\r\nHost: %s%s%s:%d\r\n\r\n",
                                     cfg->path, v6 ? "[" : "", cfg->host, v6 ? "]" : "", cfg->port);
        sh.msglen = sh.reqlen;
    } else {
        sh.msglen = (size_t)cfg->size;
    }
    sh.timeout_ns = (uint64_t)(cfg->timeout * 1e9);
    sh.seed = now_ns() * 0x9e3779b97f4a7c15ull;
    pthread_mutex_init(&sh.lock, NULL);
    pthread_cond_init(&sh.gate_cv, NULL);

    int T = cfg->threads, C = cfg->connections;
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
     * thread ticks every C / (rate * n_t) and all threads together tick at `rate`. */
    for (int t = 0; t < T; t++) {
        struct worker *w = &ws[t];
        int lo = (int)((int64_t)C * t / T), hi = (int)((int64_t)C * (t + 1) / T);
        w->sh = &sh;
        w->index = t;
        w->cpu = cfg->ncpus > 0 ? cfg->cpus[t % cfg->ncpus] : -1;
        w->ep = -1;
        w->n = hi - lo;
        w->conns = conns + lo;
        w->min_ns = UINT64_MAX;
        if (cfg->mode == LG_OPEN)
            w->interval = 1e9 * (double)C / (cfg->rate * (double)w->n);
        w->hist = calloc(HIST_BUCKETS, sizeof *w->hist);
        w->sbuf = malloc(SCRATCH);
        w->rbuf = malloc(SCRATCH);
        if (!w->hist || !w->sbuf || !w->rbuf) {
            snprintf(res->message, sizeof res->message, "out of memory");
            rc = -1;
            goto out;
        }
        for (int j = 0; j < w->n; j++) {
            struct conn *c = &w->conns[j];
            c->w = w;
            c->fd = -1;
            c->lidx = j;
            c->gidx = lo + j;
            c->ring = rings + (size_t)(lo + j) * (size_t)cfg->depth;
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

    memset(res->errors, 0, sizeof res->errors);
    res->requests = res->bytes_sent = res->bytes_received = 0;
    res->non2xx = res->connects = res->scheduled = res->backlog = res->max_ns = 0;
    res->min_ns = UINT64_MAX;
    res->cpu_user = res->cpu_sys = 0;
    memset(res->hist, 0, HIST_BUCKETS * sizeof *res->hist);
    uint64_t t_last = sh.ms;
    for (int t = 0; t < T; t++) {
        struct worker *w = &ws[t];
        if (w->err[0] && !res->message[0]) {
            snprintf(res->message, sizeof res->message, "%s", w->err);
            rc = -1;
        }
        res->requests += w->requests;
        res->bytes_sent += w->bytes_sent;
        res->bytes_received += w->bytes_received;
        res->non2xx += w->non2xx;
        res->connects += w->connects;
        res->scheduled += w->scheduled;
        res->backlog += w->backlog;
        for (int k = 0; k < LG_NERR; k++)
            res->errors[k] += w->errors[k];
        for (int k = 0; k < HIST_BUCKETS; k++)
            res->hist[k] += w->hist[k];
        if (w->max_ns > res->max_ns) res->max_ns = w->max_ns;
        if (w->min_ns < res->min_ns) res->min_ns = w->min_ns;
        res->cpu_user += tv_s(w->ru0.ru_utime, w->ru1.ru_utime);
        res->cpu_sys += tv_s(w->ru0.ru_stime, w->ru1.ru_stime);
        if (w->t_end > t_last) t_last = w->t_end;
        for (int j = 0; j < w->n; j++)
            res->per_conn[w->conns[j].gidx] = w->conns[j].completed;
    }
    if (res->min_ns == UINT64_MAX)
        res->min_ns = 0;
    res->elapsed = sh.ms ? (double)(t_last - sh.ms) * 1e-9 : 0.0;
    res->aborted = __atomic_load_n(&sh.stop, __ATOMIC_RELAXED);
    if (sh.message[0] && !res->message[0])
        snprintf(res->message, sizeof res->message, "%s", sh.message);

out:
    if (ws)
        for (int t = 0; t < T; t++) {
            free(ws[t].hist);
            free(ws[t].sbuf);
            free(ws[t].rbuf);
        }
    if (conns)
        for (int i = 0; i < C; i++)
            free(conns[i].hbuf);
    free(ws);
    free(conns);
    free(rings);
    free(sh.req);
    if (started)
        pthread_barrier_destroy(&sh.bar);
    pthread_cond_destroy(&sh.gate_cv);
    pthread_mutex_destroy(&sh.lock);
    return rc;
}
