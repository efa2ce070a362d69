/*
 * proto_core.h - echo and HTTP/1.1 plaintext in C, shared by the two C cores that answer
 * requests without Python: native_core.c (epoll) and uring/cproto.c's C-protocol mode
 * (`native-uring`).  One copy of the protocol code, included by both cffi sources.
 *
 * HTTP here is the behaviour of core/protocols/http.py for everything a benchmark or
 * the conformance suite sends (tests/test_native.py compares the two byte for byte):
 * GET/HEAD of "/" and "/plaintext" answer "Hello, World!", "GET /bytes/N" answers N
 * bytes (N = 1 to 8 digits, at most BYTES_MAX = 16 MiB; the body is BYTES_PATTERN
 * repeated; any other N is a 404, like an unknown path), "GET /work/US" burns US
 * microseconds (1 to 8 digits) of the worker thread's CPU time (CLOCK_THREAD_CPUTIME_ID)
 * and answers as "GET /", errors 400/404/405/413/414/
 * 431/501 as the Python protocol.  State is per connection (struct pstate) and per
 * worker (struct proto: the response table, rebuilt once a second for its Date line,
 * and the scratch buffer answers are built in).
 *
 * Bounded output (core/policy.py rule held-answers, core/protocols/base.py): one feed or pull
 * answers at most about `budget` bytes (at least one answer or one body piece) and keeps
 * the rest of its input (`pstate.held`: `in` then holds unparsed input); a /bytes body
 * larger than INLINE_MAX, or than what is left of the budget, is streamed by
 * proto_http_pull in pieces of at most min(budget, PIECE_MAX) bytes pointing into one
 * shared, read-only block (no copy, no allocation).  A core pulls while its connection's
 * pending output is at or below half of max_output, and reads nothing from it meanwhile,
 * so a few bytes of requests can never make it allocate more than about max_output.
 * Allocation failure anywhere in an answer makes feed/pull return PROTO_ENOMEM: the core
 * closes that connection, sending nothing of the answers built in that call.
 *
 * Self-contained: no _GNU_SOURCE needed (find_bytes instead of memmem).
 */
#ifndef PROTO_CORE_H
#define PROTO_CORE_H
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BYTES_MAX (16 * 1024 * 1024)
#define PIECE_MAX (1 << 20)         /* largest streamed body piece (core/protocols/http.py) */
#define INLINE_MAX (256 * 1024)     /* a body up to this size is copied into its answer */
#define SCRATCH_KEEP (256 * 1024)   /* a scratch buffer grown past this is freed after use */
#define PROTO_ENOMEM (-1)
static const char BYTES_PATTERN[65] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/";

/* The first occurrence of needle[0..m) in hay[0..n), or NULL (memmem's contract, m >= 1). */
static const char *find_bytes(const char *hay, size_t n, const char *needle, size_t m)
{
    const char *end = hay + n;
    while ((size_t)(end - hay) >= m) {
        const char *q = memchr(hay, needle[0], (size_t)(end - hay) - m + 1);
        if (!q) return NULL;
        if (!memcmp(q, needle, m)) return q;
        hay = q + 1;
    }
    return NULL;
}

/* Every /bytes body is BYTES_PATTERN repeated, so any piece of any body is a slice of
 * this one block: filled once per process, read-only afterwards, shared by all workers. */
static char body_block[PIECE_MAX + 64];
static pthread_once_t body_block_once = PTHREAD_ONCE_INIT;
static void body_block_fill(void)
{
    for (size_t i = 0; i < sizeof body_block; i++) body_block[i] = BYTES_PATTERN[i % 64];
}
static const char *body_piece(uint64_t offset) { return body_block + offset % 64; }
static int proto_is_body_piece(const char *p) { return p >= body_block && p < body_block + sizeof body_block; }

/* ---- growable byte buffer with a consumed prefix ---------------------------- */
struct buf { char *p; size_t head, len, cap; };  /* data is p[head .. head+len) */

static int buf_append(struct buf *b, const char *src, size_t n)
{
    if (b->head + b->len + n > b->cap) {
        if (b->head && b->len + n <= b->cap) {
            memmove(b->p, b->p + b->head, b->len);
        } else {
            size_t cap = b->cap ? b->cap : 4096;
            while (cap < b->len + n) cap *= 2;
            char *q = malloc(cap);
            if (!q) return -1;
            if (b->len) memcpy(q, b->p + b->head, b->len);
            free(b->p);
            b->p = q;
            b->cap = cap;
        }
        b->head = 0;
    }
    memcpy(b->p + b->head + b->len, src, n);
    b->len += n;
    return 0;
}

static void buf_consume(struct buf *b, size_t n)
{
    b->head += n;
    b->len -= n;
    if (!b->len) b->head = 0;
}

static void buf_free(struct buf *b) { free(b->p); memset(b, 0, sizeof *b); }

/* ---- HTTP/1.1 plaintext (the behaviour of core/protocols/http.py) ----------- */
enum { S200, S404, S405, S400, S413, S414, S431, S501, NSPEC };
enum { C_KEEP, C_CLOSE, C_KEEP10 };
static const char *const spec_status[NSPEC] = {
    "200 OK", "404 Not Found", "405 Method Not Allowed", "400 Bad Request",
    "413 Content Too Large", "414 URI Too Long", "431 Request Header Fields Too Large",
    "501 Not Implemented"};
static const char *const spec_body[NSPEC] = {
    "Hello, World!", "Not Found", "Method Not Allowed", "Bad Request", "Content Too Large",
    "URI Too Long", "Request Header Fields Too Large", "Not Implemented"};
static const char *const conn_line[3] = {"", "Connection: close\r\n", "Connection: keep-alive\r\n"};

#define RIDX(spec, head, conn) (((spec) * 2 + (head)) * 3 + (conn))
#define NRESP (NSPEC * 6)

struct resp_table { time_t sec; char *resp[NRESP]; size_t rlen[NRESP]; char store[NRESP * 256];
                    char date[64]; };

static void build_table(struct resp_table *t, time_t now)
{
    static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                         "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    struct tm tm;
    char date[64];
    gmtime_r(&now, &tm);
    snprintf(date, sizeof date, "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
             days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900,
             tm.tm_hour, tm.tm_min, tm.tm_sec);
    char *p = t->store;
    for (int s = 0; s < NSPEC; s++)
        for (int h = 0; h < 2; h++)
            for (int c = 0; c < 3; c++) {
                int i = RIDX(s, h, c);
                int n = snprintf(p, 256,
                                 "HTTP/1.1 %s\r\nServer: parallelnet\r\n%s"
                                 "Content-Type: text/plain\r\nContent-Length: %zu\r\n%s%s\r\n%s",
                                 spec_status[s], s == S405 ? "Allow: GET, HEAD\r\n" : "",
                                 strlen(spec_body[s]), date, conn_line[c], h ? "" : spec_body[s]);
                t->resp[i] = p;
                t->rlen[i] = (size_t)n;
                p += 256;
            }
    memcpy(t->date, date, sizeof date);
    t->sec = now;
}

static int is_tchar(unsigned char c)
{
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return 1;
    return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static int lower_eq(const char *p, size_t n, const char *lit)
{
    size_t m = strlen(lit);
    if (n != m) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c >= 'A' && c <= 'Z') c += 32;
        if (c != lit[i]) return 0;
    }
    return 1;
}

static void trim_ows(const char **p, size_t *n)
{
    while (*n && (**p == ' ' || **p == '\t')) { (*p)++; (*n)--; }
    while (*n && ((*p)[*n - 1] == ' ' || (*p)[*n - 1] == '\t')) (*n)--;
}

/* The next element of a comma-separated field value (OWS trimmed, empty ones
 * included, as the Python protocol splits them); 0 once the value is used up. */
static int next_element(const char **t, const char *vend, const char **tok, size_t *tn)
{
    if (*t > vend) return 0;
    const char *comma = memchr(*t, ',', (size_t)(vend - *t));
    if (!comma) comma = vend;
    *tok = *t;
    *tn = (size_t)(comma - *t);
    trim_ows(tok, tn);
    *t = comma + 1;
    return 1;
}

static int valid_host(const char *p, size_t n)
{
    size_t i = 0;
    if (n && p[0] == '[') {
        i = 1;
        size_t start = i;
        while (i < n && p[i] != ']') {
            unsigned char c = p[i];
            if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') ||
                  (c && strchr(":.vV-_~!$&'()*+,;=", c))))
                return 0;
            i++;
        }
        if (i == n || i == start) return 0;
        i++;
    } else {
        while (i < n && p[i] != ':') {
            unsigned char c = p[i];
            if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                  (c && strchr("-._~!$&'()*+,;=%", c))))
                return 0;
            i++;
        }
    }
    if (i == n) return 1;
    if (p[i] != ':') return 0;
    for (i++; i < n; i++)
        if (p[i] < '0' || p[i] > '9') return 0;
    return 1;
}

/* idx: the table answer; nbytes >= 0: GET/HEAD /bytes/N instead (built by
 * proto_answer, with idx's connection mode); work_us > 0: GET/HEAD /work/US (burn that
 * much thread CPU time, then the table answer). */
struct parsed { int idx; uint64_t clen; int close, head; int64_t nbytes, work_us; };

static struct parsed perr(int spec, int head)
{
    struct parsed r = {RIDX(spec, head, C_CLOSE), 0, 1, head, -1, 0};
    return r;
}

/* "/bytes/N": N is 1 to 8 ASCII digits with a value of at most BYTES_MAX; -1 if path is
 * not such a route (then it is a 404 like any unknown path). */
static int64_t bytes_route(const char *path, size_t plen)
{
    if (plen < 8 || plen > 15 || memcmp(path, "/bytes/", 7)) return -1;
    int64_t v = 0;
    for (size_t i = 7; i < plen; i++) {
        if (path[i] < '0' || path[i] > '9') return -1;
        v = v * 10 + (path[i] - '0');
    }
    return v <= BYTES_MAX ? v : -1;
}

/* "/work/US": US is 1 to 8 ASCII digits; -1 if path is not such a route (a 404). */
static int64_t work_route(const char *path, size_t plen)
{
    if (plen < 7 || plen > 14 || memcmp(path, "/work/", 6)) return -1;
    int64_t v = 0;
    for (size_t i = 6; i < plen; i++) {
        if (path[i] < '0' || path[i] > '9') return -1;
        v = v * 10 + (path[i] - '0');
    }
    return v;
}

/* GET /work/US: burn us microseconds of this thread's CPU time (a preempted worker
 * still owes its work). */
static void spin_us(int64_t us)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    int64_t end = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec + us * 1000;
    do clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    while ((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec < end);
}

/* Parse one header section (no final CRLFCRLF, no leading CRLF). */
static struct parsed http_parse(const char *b, size_t n)
{
    const char *le = find_bytes(b, n, "\r\n", 2);
    size_t llen = le ? (size_t)(le - b) : n;
    /* header lines: token ":" [\t\x20-\x7e\x80-\xff]*, joined by CRLF */
    if (le) {
        const char *p = le + 2, *end = b + n;
        for (;;) {
            const char *q = p;
            while (q < end && is_tchar((unsigned char)*q)) q++;
            if (q == p || q == end || *q != ':') return perr(S400, 0);
            q++;
            while (q < end) {
                unsigned char c = *q;
                if (c == '\t' || (c >= 0x20 && c != 0x7f)) q++;
                else break;
            }
            if (q == end) break;
            if (end - q < 2 || q[0] != '\r' || q[1] != '\n') return perr(S400, 0);
            p = q + 2;
        }
    }
    /* request line: token SP [\x21-\x7e]+ SP HTTP/1.[01] */
    const char *p = b, *end = b + llen;
    const char *m = p;
    while (p < end && is_tchar((unsigned char)*p)) p++;
    size_t mlen = (size_t)(p - m);
    if (!mlen || p == end || *p != ' ') return perr(S400, 0);
    const char *tgt = ++p;
    while (p < end && *p >= 0x21 && *p <= 0x7e) p++;
    size_t tlen = (size_t)(p - tgt);
    if (!tlen || p == end || *p != ' ') return perr(S400, 0);
    p++;
    if (end - p != 8 || memcmp(p, "HTTP/1.", 7) || (p[7] != '0' && p[7] != '1')) return perr(S400, 0);
    int http11 = p[7] == '1';
    int head = mlen == 4 && !memcmp(m, "HEAD", 4);
    int get = mlen == 3 && !memcmp(m, "GET", 3);

    int hosts = 0, chunked = 0, has_close = 0, has_keep = 0, nlen = 0, badlen = 0;
    const char *host = "";
    size_t hostlen = 0;
    const char *len0 = NULL;
    size_t len0n = 0;
    if (le) {
        const char *q = le + 2, *bend = b + n;
        while (q < bend) {
            const char *eol = find_bytes(q, (size_t)(bend - q), "\r\n", 2);
            if (!eol) eol = bend;
            const char *colon = memchr(q, ':', (size_t)(eol - q));
            size_t nl = (size_t)(colon - q);
            const char *v = colon + 1;
            size_t vn = (size_t)(eol - v);
            if (lower_eq(q, nl, "host")) {
                hosts++;
                trim_ows(&v, &vn);
                host = v;
                hostlen = vn;
            } else if (lower_eq(q, nl, "connection")) {
                const char *t = v, *tok;
                size_t tn;
                while (next_element(&t, v + vn, &tok, &tn)) {
                    if (lower_eq(tok, tn, "close")) has_close = 1;
                    else if (lower_eq(tok, tn, "keep-alive")) has_keep = 1;
                }
            } else if (lower_eq(q, nl, "content-length")) {
                const char *t = v, *tok;
                size_t tn;
                while (next_element(&t, v + vn, &tok, &tn)) {
                    if (!nlen) { len0 = tok; len0n = tn; }
                    else if (tn != len0n || memcmp(tok, len0, tn)) badlen = 1;
                    nlen++;
                }
            } else if (lower_eq(q, nl, "transfer-encoding")) {
                chunked = 1;
            }
            q = eol + 2;
        }
    }
    if (hosts > 1 || (http11 && !hosts) || !valid_host(host, hostlen)) return perr(S400, head);
    if (chunked) return perr(S501, head);
    uint64_t clen = 0;
    if (nlen) {
        if (badlen || !len0n) return perr(S400, head);
        /* Saturates at 2^62 ("too large", as the Python protocol's 1 << 62) before the
         * multiplication could wrap: 2^62 is far above any body limit, so every length
         * past it gets the same verdict (413) as its exact value would. */
        const uint64_t sat = 1ULL << 62;
        for (size_t i = 0; i < len0n; i++) {
            if (len0[i] < '0' || len0[i] > '9') return perr(S400, head);
            uint64_t d = (uint64_t)(len0[i] - '0');
            clen = clen > (sat - d) / 10 ? sat : clen * 10 + d;
        }
    }
    int conn = has_close ? C_CLOSE : http11 ? C_KEEP : has_keep ? C_KEEP10 : C_CLOSE;
    int spec;
    int64_t nbytes = -1, work = 0;
    if (!get && !head) {
        spec = S405;
    } else {
        const char *path;
        size_t plen;
        if (tgt[0] == '/') {
            path = tgt;
            const char *qm = memchr(tgt, '?', tlen);
            plen = qm ? (size_t)(qm - tgt) : tlen;
        } else {
            /* absolute form: scheme "://" authority path [? query], no '#' anywhere */
            const char *t = tgt, *tend = tgt + tlen;
            if (memchr(tgt, '#', tlen)) return perr(S400, head);
            if (!((*t >= 'a' && *t <= 'z') || (*t >= 'A' && *t <= 'Z'))) return perr(S400, head);
            t++;
            while (t < tend && ((*t >= 'a' && *t <= 'z') || (*t >= 'A' && *t <= 'Z') ||
                                (*t >= '0' && *t <= '9') || *t == '+' || *t == '.' || *t == '-'))
                t++;
            if (tend - t < 3 || memcmp(t, "://", 3)) return perr(S400, head);
            t += 3;
            while (t < tend && *t != '/' && *t != '?') t++;
            path = t;
            while (t < tend && *t != '?') t++;
            plen = (size_t)(t - path);
            if (!plen) { path = "/"; plen = 1; }
        }
        int found = (plen == 1 && path[0] == '/') || (plen == 10 && !memcmp(path, "/plaintext", 10));
        if (!found && plen >= 6 && !memcmp(path, "/work/", 6)) {
            work = work_route(path, plen);
            found = work >= 0;
            if (work < 0) work = 0;
        } else if (!found) {
            nbytes = bytes_route(path, plen);
        }
        spec = found || nbytes >= 0 ? S200 : S404;
    }
    struct parsed r = {RIDX(spec, head, conn), clen, conn == C_CLOSE, head, nbytes, work};
    return r;
}


/* ---- per worker and per connection state --------------------------------------- */
struct proto {
    struct resp_table table;
    struct buf scratch;             /* the answers of one feed or pull call */
    unsigned message_size, max_header_bytes;
    uint64_t max_body_bytes;
    size_t budget;                  /* output per call (max_output / 2), at least 1 */
};

struct pstate {
    int pclosing;                   /* the protocol is done: answer, then close */
    uint64_t partial;               /* echo: bytes of the message in progress */
    struct buf in;                  /* http: a partial header section, or (held) unparsed input */
    int held;                       /* http: `in` holds input kept back by the budget */
    int eof;                        /* http: the peer half-closed while answers were held */
    uint64_t skip;                  /* http: body bytes still to discard */
    struct parsed pending;          /* http: answered once the body is discarded */
    uint64_t body_left, body_sent;  /* http: a /bytes body being streamed by pull */
    int body_close;                 /* http: that answer closes the connection */
};

static void proto_init(struct proto *p, unsigned message_size, unsigned max_header_bytes,
                       uint64_t max_body_bytes, uint64_t max_output)
{
    memset(p, 0, sizeof *p);
    p->message_size = message_size;
    p->max_header_bytes = max_header_bytes ? max_header_bytes : 8192;
    p->max_body_bytes = max_body_bytes;
    p->budget = max_output / 2 ? (size_t)(max_output / 2) : 1;
    pthread_once(&body_block_once, body_block_fill);
    build_table(&p->table, time(NULL));
}

static void proto_free(struct proto *p) { buf_free(&p->scratch); }
static void pstate_free(struct pstate *k) { buf_free(&k->in); }

/* After a call's output is sent (or copied): a scratch buffer that grew large for it
 * (thousands of pipelined answers) goes back, so an idle worker holds no big buffer. */
static void proto_scratch_done(struct proto *p)
{
    if (p->scratch.cap > SCRATCH_KEEP) buf_free(&p->scratch);
}

/* An incomplete request is being received (the header timeout's question); held input
 * is not: the core is not reading it. */
static int pstate_partial(const struct pstate *k) { return (k->in.len > 0 && !k->held) || k->skip > 0; }

/* Answers are held for proto_http_pull (rule held-answers: the core stops reading meanwhile). */
static int pstate_more(const struct pstate *k) { return !k->pclosing && (k->held || k->body_left > 0); }

/* Closing: nothing held or buffered is answered any more. */
static void pstate_stop(struct pstate *k)
{
    k->pclosing = 1;
    k->held = 0;
    k->skip = 0;
    k->body_left = 0;
    buf_free(&k->in);
}

/* The peer's FIN: a partial request is dropped unanswered; held answers come first. */
static void proto_eof(struct pstate *k)
{
    if (pstate_more(k)) k->eof = 1;
    else pstate_stop(k);
}

/* Append the answer to a parsed request to the scratch buffer: a table entry, or the
 * headers of GET/HEAD /bytes/N with its body inline when small and within `room`, else
 * streamed by proto_http_pull (k->body_left).  0, or PROTO_ENOMEM. */
static int proto_answer(struct proto *p, struct pstate *k, const struct parsed *r, size_t room)
{
    struct resp_table *t = &p->table;
    if (r->work_us > 0) spin_us(r->work_us);
    if (r->nbytes < 0) return buf_append(&p->scratch, t->resp[r->idx], t->rlen[r->idx]);
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 200 OK\r\nServer: parallelnet\r\nContent-Type: application/octet-stream\r\n"
                     "Content-Length: %lld\r\n%s%s\r\n", (long long)r->nbytes, t->date, conn_line[r->idx % 3]);
    if (buf_append(&p->scratch, head, (size_t)n) < 0) return PROTO_ENOMEM;
    uint64_t body = r->head ? 0 : (uint64_t)r->nbytes;
    if (body <= INLINE_MAX && body + (size_t)n <= room)
        return body ? buf_append(&p->scratch, body_piece(0), (size_t)body) : 0;
    k->body_left = body;
    k->body_sent = 0;
    k->body_close = r->close;
    return 0;
}

/* Echo: the requests this chunk completed (the bytes go back as they are). */
static uint64_t proto_echo_count(struct proto *p, struct pstate *k, size_t len)
{
    unsigned ms = p->message_size;
    if (!ms) return len ? 1 : 0;   /* one message per non-empty chunk, as echo.py counts */
    k->partial += len;
    uint64_t n = k->partial / ms;
    k->partial %= ms;
    return n;
}

/* Parse and answer data[0..dlen) after what `in` holds (a partial header section or held
 * input), into the scratch buffer, until the budget is spent.  Returns the number of
 * answers, or PROTO_ENOMEM. */
static int64_t http_run(struct proto *p, struct pstate *k, const char *data, size_t dlen)
{
    struct buf *sc = &p->scratch;
    int64_t n = 0;
    struct resp_table *t = &p->table;
    size_t lim = p->max_header_bytes, budget = p->budget;

    if (k->skip) {
        if (dlen < k->skip) { k->skip -= dlen; return 0; }
        data += k->skip;
        dlen -= k->skip;
        k->skip = 0;
        if (proto_answer(p, k, &k->pending, budget) < 0) return PROTO_ENOMEM;
        n++;
        if (k->body_left) {   /* streamed: the rest of this chunk waits behind it */
            if (dlen && buf_append(&k->in, data, dlen) < 0) return PROTO_ENOMEM;
            k->held = dlen > 0;
            return n;
        }
        if (k->pending.close) { pstate_stop(k); return n; }
    }
    int from_in = 0;
    if (k->in.len) {
        if (buf_append(&k->in, data, dlen) < 0) return PROTO_ENOMEM;
        data = k->in.p + k->in.head;
        dlen = k->in.len;
        from_in = 1;
    }
    size_t pos = 0;
    int hold = 0;
    while (pos < dlen) {
        if (sc->len >= budget) { hold = 1; break; }   /* the budget is spent: the rest waits */
        if (dlen - pos >= 2 && data[pos] == '\r' && data[pos + 1] == '\n') { pos += 2; continue; }
        const char *e = find_bytes(data + pos, dlen - pos, "\r\n\r\n", 4);
        size_t end = e ? (size_t)(e - data) : 0;
        if (e && end + 4 - pos <= lim) {
            struct parsed r = http_parse(data + pos, end - pos);
            pos = end + 4;
            if (r.clen) {
                if (r.clen > p->max_body_bytes) {
                    int i = RIDX(S413, r.head, C_CLOSE);
                    if (buf_append(sc, t->resp[i], t->rlen[i]) < 0) return PROTO_ENOMEM;
                    n++;
                    k->pclosing = 1;
                    break;
                }
                if (dlen - pos < r.clen) {
                    k->skip = r.clen - (dlen - pos);
                    k->pending = r;
                    pos = dlen;
                    break;
                }
                pos += r.clen;
            }
            if (proto_answer(p, k, &r, budget > sc->len ? budget - sc->len : 0) < 0) return PROTO_ENOMEM;
            n++;
            if (k->body_left) { hold = pos < dlen; break; }
            if (r.close) { k->pclosing = 1; break; }
            continue;
        }
        /* incomplete or over the limit: look only at the first lim + 1 bytes */
        size_t wlen = dlen - pos < lim + 1 ? dlen - pos : lim + 1;
        const char *w = data + pos;
        size_t lf = 0, crlf = 0;
        int have_crlf = 0;
        for (size_t i = 0; i < wlen; i++)
            if (w[i] == '\n') {
                lf++;
                if (i && w[i - 1] == '\r') { crlf++; have_crlf = 1; }
            }
        int err = -1;
        if (lf != crlf) err = RIDX(S400, 0, C_CLOSE);
        else if (dlen - pos > lim) err = RIDX(have_crlf ? S431 : S414, 0, C_CLOSE);
        if (err >= 0) {
            if (buf_append(sc, t->resp[err], t->rlen[err]) < 0) return PROTO_ENOMEM;
            n++;
            k->pclosing = 1;
            pos = dlen;
            break;
        }
        break;  /* keep data[pos:] for later */
    }
    k->held = hold;
    if (k->pclosing) {
        pstate_stop(k);
    } else if (from_in) {
        buf_consume(&k->in, pos);
    } else if (pos < dlen) {
        if (buf_append(&k->in, data + pos, dlen - pos) < 0) return PROTO_ENOMEM;
    }
    return n;
}

/* The HTTP protocol over one received chunk; answers go to p->scratch (reset here).
 * Returns the number of responses produced, or PROTO_ENOMEM.  While answers are held
 * (a completion core may still deliver data it received before it stopped reading),
 * the chunk is queued behind them and the answers come from proto_http_pull. */
static int64_t proto_http_feed(struct proto *p, struct pstate *k, const char *data, size_t dlen)
{
    p->scratch.head = p->scratch.len = 0;
    time_t now = time(NULL);
    if (now != p->table.sec) build_table(&p->table, now);
    if (k->pclosing) return 0;
    if (k->held || k->body_left) {
        if (dlen && buf_append(&k->in, data, dlen) < 0) return PROTO_ENOMEM;
        k->held = k->in.len > 0;
        return 0;
    }
    return http_run(p, k, data, dlen);
}

/* The next held answers (pstate_more): a piece of the body being streamed (pointing into
 * the shared block: send it or copy it before the next call), or the answers to held
 * input in p->scratch.  *out and *len: what to send.  Returns the responses produced, or
 * PROTO_ENOMEM.  Sets pclosing once an answer that closes, or a half-close, is done. */
static int64_t proto_http_pull(struct proto *p, struct pstate *k, const char **out, size_t *len)
{
    p->scratch.head = p->scratch.len = 0;
    *out = p->scratch.p;
    *len = 0;
    if (k->pclosing) return 0;
    if (k->body_left) {
        uint64_t size = k->body_left;
        if (size > p->budget) size = p->budget;
        if (size > PIECE_MAX) size = PIECE_MAX;
        *out = body_piece(k->body_sent);
        *len = (size_t)size;
        k->body_left -= size;
        k->body_sent += size;
        if (!k->body_left && (k->body_close || (k->eof && !k->held))) pstate_stop(k);
        return 0;
    }
    int64_t n = 0;
    if (k->held) {
        time_t now = time(NULL);
        if (now != p->table.sec) build_table(&p->table, now);
        k->held = 0;
        n = http_run(p, k, "", 0);
        if (n < 0) return n;
        *out = p->scratch.p;
        *len = p->scratch.len;
    }
    if (k->eof && !pstate_more(k)) pstate_stop(k);
    return n;
}

#endif
