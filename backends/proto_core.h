/*
 * proto_core.h - echo and HTTP/1.1 plaintext in C, shared by the two C cores that answer
 * requests without Python: native_core.c (epoll) and uring_core.c's C-protocol mode
 * (`native-uring`).  One copy of the protocol code, included by both cffi sources.
 *
 * HTTP here is the behaviour of core/protocols/http.py for everything a benchmark or
 * the conformance suite sends (tests/test_native.py compares the two byte for byte):
 * GET/HEAD of "/" and "/plaintext" answer "Hello, World!", "GET /bytes/N" answers N
 * bytes (N = 1 to 8 digits, at most BYTES_MAX = 16 MiB; the body is BYTES_PATTERN
 * repeated; any other N is a 404, like an unknown path), errors 400/404/405/413/414/
 * 431/501 as the Python protocol.  State is per connection (struct pstate) and per
 * worker (struct proto: the response table, rebuilt once a second for its Date line,
 * and the scratch buffer answers are built in).
 */
#ifndef PROTO_CORE_H
#define PROTO_CORE_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BYTES_MAX (16 * 1024 * 1024)
static const char BYTES_PATTERN[65] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/";

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
 * proto_answer, with idx's connection mode). */
struct parsed { int idx; uint64_t clen; int close, head; int64_t nbytes; };

static struct parsed perr(int spec, int head)
{
    struct parsed r = {RIDX(spec, head, C_CLOSE), 0, 1, head, -1};
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

/* Parse one header section (no final CRLFCRLF, no leading CRLF). */
static struct parsed http_parse(const char *b, size_t n)
{
    const char *le = memmem(b, n, "\r\n", 2);
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
            const char *eol = memmem(q, (size_t)(bend - q), "\r\n", 2);
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
        for (size_t i = 0; i < len0n; i++) {
            if (len0[i] < '0' || len0[i] > '9') return perr(S400, head);
            if (clen < (1ULL << 62)) clen = clen * 10 + (uint64_t)(len0[i] - '0');
            if (clen > (1ULL << 62)) clen = 1ULL << 62;
        }
    }
    int conn = has_close ? C_CLOSE : http11 ? C_KEEP : has_keep ? C_KEEP10 : C_CLOSE;
    int spec;
    int64_t nbytes = -1;
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
        nbytes = found ? -1 : bytes_route(path, plen);
        spec = found || nbytes >= 0 ? S200 : S404;
    }
    struct parsed r = {RIDX(spec, head, conn), clen, conn == C_CLOSE, head, nbytes};
    return r;
}


/* ---- per worker and per connection state --------------------------------------- */
struct proto {
    struct resp_table table;
    struct buf scratch;             /* the answers to one received chunk */
    unsigned message_size, max_header_bytes;
    uint64_t max_body_bytes;
};

struct pstate {
    int pclosing;                   /* the protocol is done: answer, then close */
    uint64_t partial;               /* echo: bytes of the message in progress */
    struct buf in;                  /* http: start of a partial header section */
    uint64_t skip;                  /* http: body bytes still to discard */
    struct parsed pending;          /* http: answered once the body is discarded */
};

static void proto_init(struct proto *p, unsigned message_size, unsigned max_header_bytes,
                       uint64_t max_body_bytes)
{
    memset(p, 0, sizeof *p);
    p->message_size = message_size;
    p->max_header_bytes = max_header_bytes ? max_header_bytes : 8192;
    p->max_body_bytes = max_body_bytes;
    build_table(&p->table, time(NULL));
}

static void proto_free(struct proto *p) { buf_free(&p->scratch); }
static void pstate_free(struct pstate *k) { buf_free(&k->in); }

/* An incomplete request is held (the header timeout's question). */
static int pstate_partial(const struct pstate *k) { return k->in.len > 0 || k->skip > 0; }

/* Append the answer to a parsed request: a table entry, or GET/HEAD /bytes/N. */
static void proto_answer(struct proto *p, const struct parsed *r)
{
    struct resp_table *t = &p->table;
    if (r->nbytes < 0) { buf_append(&p->scratch, t->resp[r->idx], t->rlen[r->idx]); return; }
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 200 OK\r\nServer: parallelnet\r\nContent-Type: application/octet-stream\r\n"
                     "Content-Length: %lld\r\n%s%s\r\n", (long long)r->nbytes, t->date, conn_line[r->idx % 3]);
    buf_append(&p->scratch, head, (size_t)n);
    if (r->head) return;
    static char block[4096];        /* BYTES_PATTERN repeated: the body in 4 KiB copies */
    if (!block[0]) for (size_t i = 0; i < sizeof block; i++) block[i] = BYTES_PATTERN[i % 64];
    for (int64_t left = r->nbytes; left > 0; left -= (int64_t)sizeof block)
        buf_append(&p->scratch, block, left < (int64_t)sizeof block ? (size_t)left : sizeof block);
}

/* Echo: the requests this chunk completed (the bytes go back as they are). */
static uint64_t proto_echo_count(struct proto *p, struct pstate *k, size_t len)
{
    unsigned ms = p->message_size;
    if (!ms) return 1;
    k->partial += len;
    uint64_t n = k->partial / ms;
    k->partial %= ms;
    return n;
}

/* The HTTP protocol over one received chunk; answers are appended to p->scratch.
 * Returns the number of responses produced. */
static uint64_t proto_http_feed(struct proto *p, struct pstate *k, const char *data, size_t dlen)
{
    struct buf *sc = &p->scratch;
    uint64_t n = 0;
    time_t now = time(NULL);
    if (now != p->table.sec) build_table(&p->table, now);
    struct resp_table *t = &p->table;
    size_t lim = p->max_header_bytes;

    if (k->pclosing) return 0;
    if (k->skip) {
        if (dlen < k->skip) { k->skip -= dlen; return 0; }
        data += k->skip;
        dlen -= k->skip;
        k->skip = 0;
        proto_answer(p, &k->pending);
        n++;
        if (k->pending.close) { k->pclosing = 1; return n; }
    }
    int from_in = 0;
    if (k->in.len) {
        if (buf_append(&k->in, data, dlen) < 0) { k->pclosing = 1; return n; }
        data = k->in.p + k->in.head;
        dlen = k->in.len;
        from_in = 1;
    }
    size_t pos = 0;
    while (pos < dlen) {
        if (dlen - pos >= 2 && data[pos] == '\r' && data[pos + 1] == '\n') { pos += 2; continue; }
        const char *e = memmem(data + pos, dlen - pos, "\r\n\r\n", 4);
        size_t end = e ? (size_t)(e - data) : 0;
        if (e && end + 4 - pos <= lim) {
            struct parsed r = http_parse(data + pos, end - pos);
            pos = end + 4;
            if (r.clen) {
                if (r.clen > p->max_body_bytes) {
                    int i = RIDX(S413, r.head, C_CLOSE);
                    buf_append(sc, t->resp[i], t->rlen[i]);
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
            proto_answer(p, &r);
            n++;
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
            buf_append(sc, t->resp[err], t->rlen[err]);
            n++;
            k->pclosing = 1;
            pos = dlen;
            break;
        }
        break;  /* keep data[pos:] for later */
    }
    if (k->pclosing) {
        buf_free(&k->in);
    } else if (from_in) {
        buf_consume(&k->in, pos);
    } else if (pos < dlen) {
        buf_append(&k->in, data + pos, dlen - pos);
    }
    return n;
}

#endif
