/*
 * proto_fuzz.c - a fuzz harness for backends/proto_core.h, the C HTTP/1.1 and echo
 * protocol that the native (epoll) and native-uring cores run without Python.
 *
 * One input = PARAMS parameter bytes, then the bytes a client sends:
 *
 *   [0] output budget      BUDGETS[b % 16]     (proto_init gets max_output = 2 * budget)
 *   [1] max_header_bytes   MAX_HEADER[b % 8]
 *   [2] max_body_bytes     MAX_BODY[b % 8]
 *   [3] seed of the pseudo-random split schedule
 *   [4] flags: bits 0-2 echo message size MSIZE[b & 7]; bit 7 injects an allocation failure
 *   [5] with bit 7: the index (b % 8) of the malloc call that fails, in every schedule
 *
 * Each input is fed the ways the cores feed it - whole, split at pseudo-random points,
 * byte by byte, and split while answers are still held (a completion core delivering
 * what it received before it stopped reading) - pulling while pstate_more, then
 * proto_eof and pulling again.  Every chunk sits in a heap buffer of its own size that
 * is freed once fed, so ASan sees a read past it or a pointer kept into it.  The
 * invariants, any violation of which abort()s:
 *
 *   - split invariance: every schedule produces the same bytes as the whole feed (the
 *     clock is fixed, so the Date line is too), the same response count and the same
 *     closing/partial flags before and after EOF;
 *   - bounded output: no feed or pull call returns more than budget + ANSWER_SLACK bytes;
 *     a pull while pstate_more makes progress; output past out_limit is not looked at;
 *   - state: a closing connection holds nothing (no held input, body, skip or buffer);
 *     held input is never empty; after EOF and the last pull the protocol is closing;
 *   - the response count equals the number of status lines in the output;
 *   - memory: PROTO_ENOMEM exactly when an injected malloc failure happened in that call,
 *     the output sent before it is a prefix of the real output, and freeing the state
 *     then leaves no allocation behind (the harness counts them; ASan checks the rest);
 *   - echo: proto_echo_count's total over any split is total / message_size.
 *
 * Builds (see tests/fuzz/README.md):
 *   gcc -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -pthread \
 *       -I backends tests/fuzz/proto_fuzz.c -o proto_fuzz
 *   clang -O1 -g -fsanitize=fuzzer,address,undefined -DUSE_LIBFUZZER -pthread \
 *       -I backends tests/fuzz/proto_fuzz.c -o proto_fuzz
 *
 * Without USE_LIBFUZZER, main() is a small deterministic mutation fuzzer, an
 * allocation-failure sweep (-alloc_fail=N) and a differential mode (-diff FILE) whose
 * output tests/test_proto_fuzz.py compares with core/protocols/http.py.
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* ---- what the header sees: a fixed clock and a malloc that can fail ------------- */

/* Tue, 14 Nov 2023 22:13:20 GMT: the second tests/test_protocol_http.py freezes. */
#define FIXED_NOW ((time_t)1700000000)

static time_t harness_time(time_t *t)
{
    if (t) *t = FIXED_NOW;
    return FIXED_NOW;
}

static long fail_at = -1;   /* index of the header's malloc call that fails; -1: none */
static long alloc_calls;    /* the header's malloc calls since the schedule began */
static long alloc_live;     /* the header's allocations not freed yet */
static int alloc_failed;    /* an injected failure happened since the last call returned */
static unsigned long long enomem_seen;   /* calls that returned PROTO_ENOMEM as they had to */

static void *harness_malloc(size_t n)
{
    if (alloc_calls++ == fail_at) {
        alloc_failed = 1;
        return NULL;
    }
    void *q = malloc(n);
    if (q) alloc_live++;
    return q;
}

static void harness_free(void *q)
{
    if (q) alloc_live--;
    free(q);
}

/* The system headers above are included already (their guards keep proto_core.h's own
 * #includes empty), so these names change only the header's code. */
#define time(t) harness_time(t)
#define malloc(n) harness_malloc(n)
#define free(q) harness_free(q)
#include "proto_core.h"
#undef time
#undef malloc
#undef free

/* ---- invariant checks ----------------------------------------------------------- */

static const uint8_t *cur_input;   /* the input being run, for the failure report */
static size_t cur_size;
static const char *artifact_path;  /* main(): where a failing input is written */

static void save_artifact(void)
{
    if (!artifact_path || !cur_input) return;
    FILE *f = fopen(artifact_path, "wb");
    if (!f) return;
    fwrite(cur_input, 1, cur_size, f);
    fclose(f);
    fprintf(stderr, "proto_fuzz: failing input (%zu bytes) written to %s\n", cur_size, artifact_path);
}

static void violated(const char *what, int line)
{
    fprintf(stderr, "proto_fuzz: invariant violated: %s (proto_fuzz.c:%d)\n", what, line);
    save_artifact();
    abort();
}

#define CHECK(cond) do { if (!(cond)) violated(#cond, __LINE__); } while (0)

/* ---- parameters -------------------------------------------------------------------- */

#define PARAMS 6
#define ANSWER_SLACK 512   /* one answer's header past the budget (a table answer < 256) */
static const uint64_t BUDGETS[16] = {1, 2, 64, 135, 136, 150, 300, 1000, 4096, 16384, 16600,
                                     65536, 100000, 524288, 1048576, 4194304};
static const unsigned MAX_HEADER[8] = {1, 4, 16, 27, 40, 64, 256, 8192};
static const uint64_t MAX_BODY[8] = {0, 1, 5, 100, 4096, 65536, 1 << 20, 1ULL << 40};
static const unsigned MSIZE[8] = {0, 1, 2, 3, 7, 16, 100, 4096};

/* Fuzzing looks at the first OUT_LIMIT bytes of output and CALL_LIMIT calls of a
 * schedule (a /bytes body at budget 1 is one call per byte); -diff at far more. */
static uint64_t out_limit = 1 << 20, call_limit = 20000;

/* ---- one schedule ------------------------------------------------------------------ */

struct result {
    char *out;                   /* the output (its first out_limit bytes at most) */
    size_t len, cap;
    uint64_t total, before_eof;  /* bytes produced in all, and before proto_eof */
    int64_t n, n_before_eof;     /* responses */
    int closing0, partial0;      /* after the last input's answers, before proto_eof */
    int closing1;                /* after proto_eof and the last pull */
    int truncated, enomem;       /* stopped at a limit / at PROTO_ENOMEM */
    uint64_t calls;
    long allocs;                 /* the header's malloc calls */
};

/* Empty r for another run, keeping its buffer (fewer big allocations for ASan to
 * quarantine: the fuzzer's memory stays small). */
static void result_reset(struct result *r)
{
    char *out = r->out;
    size_t cap = r->cap;
    memset(r, 0, sizeof *r);
    r->out = out;
    r->cap = cap;
}

static void keep(struct result *r, const char *out, size_t len)
{
    r->total += len;
    if (len > out_limit - r->len) len = (size_t)(out_limit - r->len);
    if (!len) return;
    if (r->len + len > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + len) cap *= 2;
        r->out = realloc(r->out, cap);
        CHECK(r->out != NULL);
        r->cap = cap;
    }
    memcpy(r->out + r->len, out, len);
    r->len += len;
}

/* One feed or pull call's result: check it and keep its output.  1: stop the schedule
 * (PROTO_ENOMEM, or a limit reached). */
static int take(struct result *r, struct proto *p, const struct pstate *k, int64_t n,
                const char *out, size_t len)
{
    int failed = alloc_failed;
    alloc_failed = 0;
    r->calls++;
    if (failed) {   /* the core closes the connection, sending nothing of this call */
        CHECK(n == PROTO_ENOMEM);
        enomem_seen++;
        r->enomem = 1;
        return 1;
    }
    CHECK(n >= 0);  /* no PROTO_ENOMEM unless an allocation failed */
    CHECK(len <= p->budget + ANSWER_SLACK);
    CHECK(!k->pclosing || (!k->held && !k->body_left && !k->skip && !k->in.len));
    CHECK(!k->held || k->in.len > 0);
    r->n += n;
    keep(r, out, len);
    proto_scratch_done(p);
    if (r->total >= out_limit || r->calls >= call_limit) {
        r->truncated = 1;
        return 1;
    }
    return 0;
}

/* Pull while answers are held (once only, if `once`).  1: stop the schedule. */
static int drain(struct result *r, struct proto *p, struct pstate *k, int once)
{
    while (pstate_more(k)) {
        const char *out;
        size_t len;
        int64_t n = proto_http_pull(p, k, &out, &len);
        /* a pull answers from the scratch buffer or the shared body block, all in it */
        CHECK(len == 0 || out == p->scratch.p + p->scratch.head ||
              (proto_is_body_piece(out) && proto_is_body_piece(out + len - 1)));
        if (take(r, p, k, n, out, len)) return 1;
        CHECK(len > 0 || n > 0 || !pstate_more(k));   /* progress */
        if (once) break;
    }
    return 0;
}

/* Feed data in chunks of the given lengths, as a core would; `lazy`: pull once between
 * chunks, so the next chunk may arrive while answers are held. */
static void run_http(struct proto *p, const uint8_t *data, const size_t *chunk, size_t nchunks,
                     int lazy, struct result *r)
{
    struct pstate k;
    memset(&k, 0, sizeof k);
    result_reset(r);
    alloc_calls = 0;
    alloc_failed = 0;
    size_t pos = 0;
    for (size_t i = 0; i < nchunks; i++) {
        if (k.pclosing) break;   /* the core feeds nothing more */
        /* Each chunk in a buffer of its own size, freed once fed, as a core reuses its
         * receive buffer: ASan sees a read past the chunk, or a pointer kept into it. */
        char *rx = malloc(chunk[i]);
        CHECK(rx != NULL);
        memcpy(rx, data + pos, chunk[i]);
        int64_t n = proto_http_feed(p, &k, rx, chunk[i]);
        free(rx);
        pos += chunk[i];
        if (take(r, p, &k, n, p->scratch.p + p->scratch.head, p->scratch.len)) goto done;
        if (drain(r, p, &k, lazy)) goto done;
    }
    if (drain(r, p, &k, 0)) goto done;
    r->closing0 = k.pclosing;
    r->partial0 = pstate_partial(&k);
    r->before_eof = r->total;
    r->n_before_eof = r->n;
    proto_eof(&k);
    if (drain(r, p, &k, 0)) goto done;
    CHECK(k.pclosing);
    r->closing1 = k.pclosing;
done:
    r->allocs = alloc_calls;
    pstate_free(&k);
    /* all that is left is the worker's scratch buffer */
    CHECK(alloc_live == (p->scratch.p != NULL));
}

/* The number of status lines: a body never holds "HTTP/1.1 " (no space in any). */
static int64_t count_answers(const char *out, size_t len)
{
    int64_t n = 0;
    const char *q = out, *end = out + len;
    while (q && end - q >= 9 && (q = find_bytes(q, (size_t)(end - q), "HTTP/1.1 ", 9))) {
        n++;
        q += 9;
    }
    return n;
}

/* b ran the same input as the whole feed a: the same answers, as far as both went. */
static void check_same(const struct result *a, const struct result *b)
{
    size_t m = a->len < b->len ? a->len : b->len;
    CHECK(m == 0 || !memcmp(a->out, b->out, m));
    if (a->truncated || b->truncated) return;
    CHECK(a->total == b->total && a->len == b->len);
    CHECK(a->n == b->n && a->n_before_eof == b->n_before_eof && a->before_eof == b->before_eof);
    CHECK(a->closing0 == b->closing0 && a->partial0 == b->partial0 && a->closing1 == b->closing1);
}

/* A failed schedule sent a prefix of the real answers; one that never reached the
 * failing allocation sent all of them. */
static void check_prefix(const struct result *ref, const struct result *r)
{
    size_t m = ref->len < r->len ? ref->len : r->len;
    CHECK(m == 0 || !memcmp(ref->out, r->out, m));
    if (!r->enomem && !r->truncated && !ref->truncated) check_same(ref, r);
    if (r->enomem && !ref->truncated) CHECK(r->total <= ref->total);
}

/* ---- schedules ------------------------------------------------------------------------ */

static uint64_t rng_next(uint64_t *s)   /* splitmix64: small, and the same everywhere */
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Pseudo-random chunk lengths covering len bytes: mostly tiny or mid-sized pieces. */
static size_t split_chunks(size_t len, uint64_t seed, size_t *chunk)
{
    size_t n = 0, pos = 0;
    while (pos < len) {
        uint64_t r = rng_next(&seed);
        size_t c = r % 4 == 0 ? 1 + (size_t)(r >> 8) % 3 : 1 + (size_t)(r >> 8) % (len / 3 + 1);
        if (c > len - pos) c = len - pos;
        chunk[n++] = c;
        pos += c;
    }
    return n;
}

static uint64_t echo_total(struct proto *p, const size_t *chunk, size_t nchunks, uint64_t *partial)
{
    struct pstate k;
    memset(&k, 0, sizeof k);
    uint64_t n = 0;
    for (size_t i = 0; i < nchunks; i++) n += proto_echo_count(p, &k, chunk[i]);
    *partial = k.partial;
    return n;
}

/* Status codes of the first answers, the counts and flags: what kind of run this was
 * (main() keeps mutants that show a kind not seen before). */
static uint64_t last_signature;

static uint64_t signature(const struct result *r)
{
    uint64_t h = 1469598103934665603ULL;
    int seen = 0;
    const char *q = r->out, *end = r->out + r->len;
    while (q && seen < 6 && end - q >= 12 && (q = find_bytes(q, (size_t)(end - q), "HTTP/1.1 ", 9))) {
        for (int i = 9; i < 12; i++) h = (h ^ (uint8_t)q[i]) * 1099511628211ULL;
        q += 9;
        seen++;
    }
    uint64_t flags = (uint64_t)(r->n < 12 ? r->n : 12) << 4 | (uint64_t)r->closing0 << 2 |
                     (uint64_t)r->partial0 << 1 | (uint64_t)r->truncated;
    return (h ^ flags) * 1099511628211ULL;
}

static struct result run_ref, run_cur;   /* their buffers serve input after input */

/* Everything above for one input; fail: the malloc index that fails (-1: none).
 * Returns the most malloc calls one schedule made. */
static long fuzz_one(const uint8_t *data, size_t size, long fail)
{
    uint8_t prm[PARAMS] = {0};
    memcpy(prm, data, size < PARAMS ? size : PARAMS);
    size_t skip = size < PARAMS ? size : PARAMS;
    data += skip;
    size -= skip;
    uint64_t budget = BUDGETS[prm[0] % 16];
    struct proto p;
    proto_init(&p, MSIZE[prm[4] & 7], MAX_HEADER[prm[1] % 8], MAX_BODY[prm[2] % 8], 2 * budget);
    CHECK(p.budget == budget);

    size_t *whole = malloc(sizeof *whole), *split = malloc((size + 1) * sizeof *split);
    size_t *bytes = malloc((size + 1) * sizeof *bytes);
    CHECK(whole && split && bytes);
    size_t nwhole = size ? 1 : 0;
    whole[0] = size;
    size_t nsplit = split_chunks(size, prm[3] * 0x100000001ULL + size, split);
    for (size_t i = 0; i < size; i++) bytes[i] = 1;

    struct result *ref = &run_ref, *r = &run_cur;
    fail_at = -1;
    run_http(&p, data, whole, nwhole, 0, ref);
    CHECK(!ref->enomem);
    if (!ref->truncated) CHECK(count_answers(ref->out, ref->len) == ref->n);
    last_signature = signature(ref);

    long most = 0;
    struct { const size_t *c; size_t n; int lazy; } sched[4] = {
        {whole, nwhole, 0}, {split, nsplit, 0}, {bytes, size, 0}, {split, nsplit, 1}};
    for (int s = fail < 0 ? 1 : 0; s < 4; s++) {
        if (fail >= 0) proto_free(&p);   /* so the scratch buffer's allocations fail too */
        fail_at = fail;
        run_http(&p, data, sched[s].c, sched[s].n, sched[s].lazy, r);
        fail_at = -1;
        if (fail < 0) check_same(ref, r);
        else check_prefix(ref, r);
        if (r->allocs > most) most = r->allocs;
    }

    /* echo: the count of whole messages does not depend on the split */
    uint64_t ms = p.message_size, part_a, part_b;
    uint64_t na = echo_total(&p, split, nsplit, &part_a), nb = echo_total(&p, bytes, size, &part_b);
    if (ms) CHECK(na == size / ms && nb == na && part_a == size % ms && part_b == part_a);
    else CHECK(na == nsplit && nb == size);

    free(whole);
    free(split);
    free(bytes);
    proto_free(&p);
    CHECK(alloc_live == 0);
    return most;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cur_input = data;
    cur_size = size;
    long fail = size >= PARAMS && (data[4] & 0x80) ? data[5] % 8 : -1;
    fuzz_one(data, size, fail);
    return 0;
}

#ifndef USE_LIBFUZZER
/* ---- main(): a mutation fuzzer, an allocation-failure sweep, the differential mode ---- */

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define HAVE_DEATH_CALLBACK 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/common_interface_defs.h>
#define HAVE_DEATH_CALLBACK 1
#endif
#endif

static void result_free(struct result *r) { free(r->out); memset(r, 0, sizeof *r); }

struct input { uint8_t *p; size_t n; };
struct pool { struct input *v; size_t n, cap; };

static void pool_add(struct pool *pl, const uint8_t *p, size_t n)
{
    if (pl->n == pl->cap) {
        pl->cap = pl->cap ? 2 * pl->cap : 64;
        pl->v = realloc(pl->v, pl->cap * sizeof *pl->v);
        CHECK(pl->v != NULL);
    }
    uint8_t *q = malloc(n ? n : 1);
    CHECK(q != NULL);
    if (n) memcpy(q, p, n);
    pl->v[pl->n].p = q;
    pl->v[pl->n++].n = n;
}

static void pool_free(struct pool *pl)
{
    for (size_t i = 0; i < pl->n; i++) free(pl->v[i].p);
    free(pl->v);
    memset(pl, 0, sizeof *pl);
}

static int load_file(struct pool *pl, const char *path, size_t max_len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    uint8_t *b = malloc(max_len ? max_len : 1);
    CHECK(b != NULL);
    size_t n = fread(b, 1, max_len, f);
    fclose(f);
    pool_add(pl, b, n);
    free(b);
    return 0;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A file, or every regular file of a directory in name order (determinism). */
static int load_path(struct pool *pl, const char *path, size_t max_len)
{
    struct stat st;
    if (stat(path, &st) < 0) return -1;
    if (!S_ISDIR(st.st_mode)) return load_file(pl, path, max_len);
    DIR *d = opendir(path);
    if (!d) return -1;
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            names = realloc(names, cap * sizeof *names);
            CHECK(names != NULL);
        }
        size_t len = strlen(path) + strlen(e->d_name) + 2;
        names[n] = malloc(len);
        CHECK(names[n] != NULL);
        snprintf(names[n++], len, "%s/%s", path, e->d_name);
    }
    closedir(d);
    if (n) qsort(names, n, sizeof *names, by_name);
    for (size_t i = 0; i < n; i++) {
        if (stat(names[i], &st) == 0 && S_ISREG(st.st_mode)) load_file(pl, names[i], max_len);
        free(names[i]);
    }
    free(names);
    return 0;
}

static const char *const TOKENS[] = {
    "\r\n", "\r\n\r\n", "\n", "\r", " ", ":", "Content-Length: ", "Content-Length: 0\r\n",
    "18446744073709551616", "1844674407370955161605", "4611686018427387904", "99999999999999999999",
    "/bytes/16777216", "/bytes/16777217", "/bytes/65", "/bytes/16385", "HEAD ", "GET ", "POST ",
    "Connection: close", "Connection: keep-alive\r\n", "Transfer-Encoding: chunked", "Host: x",
    "Host: x\r\n", " HTTP/1.1\r\n", " HTTP/1.0\r\n", "HTTP/1.1", "http://h", "http://h:80/bytes/9",
    "?q=1", "#", "[::1]", "\t", ",", "\x00", "\x7f", "\xff", "0", "00000", "-1",
};
#define NTOKENS (sizeof TOKENS / sizeof TOKENS[0])
static const uint8_t INTERESTING[] = {'\r', '\n', ' ', ':', '\t', ',', '0', '9', '/', '?', '[', 0, 0x7f, 0x80, 0xff};

/* Apply 1 to 6 random edits to buf[0..*n) (room: cap); other: another seed to splice. */
static void mutate(uint8_t *buf, size_t *n, size_t cap, const struct input *other, uint64_t *rng)
{
    int edits = 1 + (int)(rng_next(rng) % 6);
    for (int e = 0; e < edits; e++) {
        uint64_t r = rng_next(rng);
        size_t len = *n, at = len ? (size_t)(r >> 16) % len : 0;
        switch (r % 10) {
        case 0:   /* flip a bit */
            if (len) buf[at] ^= (uint8_t)(1u << ((r >> 8) & 7));
            break;
        case 1:   /* an interesting byte */
            if (len) buf[at] = INTERESTING[(r >> 8) % sizeof INTERESTING];
            break;
        case 2: { /* insert a random byte */
            if (len >= cap) break;
            at = (size_t)(r >> 16) % (len + 1);
            memmove(buf + at + 1, buf + at, len - at);
            buf[at] = (uint8_t)(r >> 8);
            *n = len + 1;
            break;
        }
        case 3: { /* delete a range */
            if (!len) break;
            size_t k = 1 + (size_t)(r >> 8) % 16;
            if (k > len - at) k = len - at;
            memmove(buf + at, buf + at + k, len - at - k);
            *n = len - k;
            break;
        }
        case 4: { /* duplicate a chunk somewhere else */
            if (!len) break;
            size_t k = 1 + (size_t)(r >> 8) % 64, to = (size_t)(r >> 40) % (len + 1);
            if (k > len - at) k = len - at;
            if (k > cap - len) break;
            uint8_t tmp[64];
            memcpy(tmp, buf + at, k);
            memmove(buf + to + k, buf + to, len - to);
            memcpy(buf + to, tmp, k);
            *n = len + k;
            break;
        }
        case 5: { /* splice: this seed's head, the other's tail */
            if (!other || other->n <= PARAMS) break;
            size_t from = PARAMS + (size_t)(r >> 8) % (other->n - PARAMS);
            size_t cut = len > PARAMS ? PARAMS + (size_t)(r >> 32) % (len - PARAMS + 1) : len;
            size_t k = other->n - from;
            if (k > cap - cut) k = cap - cut;
            memcpy(buf + cut, other->p + from, k);
            *n = cut + k;
            break;
        }
        case 6:   /* insert a token */
        case 7: { /* overwrite with a token */
            const char *t = TOKENS[(r >> 8) % NTOKENS];
            size_t k = strlen(t);
            if (!k) k = 1;   /* "\x00": one NUL byte */
            at = (size_t)(r >> 16) % (len + 1);
            if (r % 10 == 6) {
                if (k > cap - len) break;
                memmove(buf + at + k, buf + at, len - at);
                *n = len + k;
            } else if (at + k > len) {
                if (at + k > cap) break;
                *n = at + k;
            }
            memcpy(buf + at, t, k);
            break;
        }
        case 8:   /* another parameter */
            if (len) buf[(r >> 8) % (len < PARAMS ? len : PARAMS)] = (uint8_t)(r >> 16);
            break;
        case 9: { /* a run of digits becomes another number */
            size_t i = at;
            while (i < len && (buf[i] < '0' || buf[i] > '9')) i++;
            if (i == len) break;
            size_t j = i;
            while (j < len && buf[j] >= '0' && buf[j] <= '9') j++;
            char num[32];
            static const uint64_t edges[] = {0, 1, 9, 63, 64, 65, 100, 16384, 16385, 16777216,
                                             16777217, 99999999, 4611686018427387903ULL,
                                             4611686018427387904ULL, 18446744073709551615ULL};
            uint64_t v = r & 0x100 ? edges[(r >> 9) % (sizeof edges / sizeof edges[0])] : (r >> 12) % 100000;
            int k = snprintf(num, sizeof num, "%llu", (unsigned long long)v);
            if ((size_t)k > j - i + (cap - len)) break;
            memmove(buf + i + k, buf + j, len - j);
            memcpy(buf + i, num, (size_t)k);
            *n = len - (j - i) + (size_t)k;
            break;
        }
        }
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A small open-addressing set of signatures. */
#define SIGS (1 << 14)
static uint64_t sigs[SIGS];
static size_t nsigs;

static int sig_new(uint64_t s)
{
    if (!s) s = 1;
    for (size_t i = s % SIGS;; i = (i + 1) % SIGS) {
        if (sigs[i] == s) return 0;
        if (!sigs[i]) {
            if (nsigs >= SIGS / 2) return 0;
            sigs[i] = s;
            nsigs++;
            return 1;
        }
    }
}

/* ---- -diff FILE: the C protocol's answers to given cases, for Python to compare ------
 * Input, little-endian, cases back to back:
 *   u8 kind (0 http, 1 echo), u8 flags (bit 1: lazy), u32 budget, u32 max_header_bytes,
 *   u32 max_body_bytes, u32 message_size, u32 nchunks, u32 len,
 *   u32 chunk length x nchunks (summing to len), then len bytes of data.
 * Output per case:
 *   i64 n, i64 n_before_eof, u8 closing0, u8 partial0, u8 closing1, u8 truncated,
 *   u32 before_eof, u32 out_len, out_len bytes of output
 *   (echo: n = messages counted, before_eof = the partial message's bytes, no output). */

static uint32_t get_u32(const uint8_t **q, const uint8_t *end)
{
    if (end - *q < 4) {
        fprintf(stderr, "proto_fuzz -diff: truncated input\n");
        exit(2);
    }
    uint32_t v = (uint32_t)(*q)[0] | (uint32_t)(*q)[1] << 8 | (uint32_t)(*q)[2] << 16 | (uint32_t)(*q)[3] << 24;
    *q += 4;
    return v;
}

static void put_le(FILE *f, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++) fputc((int)(v >> (8 * i)) & 0xff, f);
}

static int run_diff(const char *path)
{
    struct pool pl = {0};
    struct stat st;
    if (stat(path, &st) < 0 || load_file(&pl, path, (size_t)st.st_size) < 0) {
        fprintf(stderr, "proto_fuzz -diff: cannot read %s: %s\n", path, strerror(errno));
        return 2;
    }
    out_limit = 64ULL << 20;
    call_limit = 4000000;
    const uint8_t *q = pl.v[0].p, *end = q + pl.v[0].n;
    size_t cases = 0;
    while (q < end) {
        if (end - q < 2) return fprintf(stderr, "proto_fuzz -diff: truncated input\n"), 2;
        int kind = q[0], flags = q[1];
        q += 2;
        uint32_t budget = get_u32(&q, end), mhb = get_u32(&q, end), mbb = get_u32(&q, end);
        uint32_t ms = get_u32(&q, end), nchunks = get_u32(&q, end), len = get_u32(&q, end);
        size_t *chunk = malloc(((size_t)nchunks + 1) * sizeof *chunk);
        CHECK(chunk != NULL);
        uint64_t sum = 0;
        for (uint32_t i = 0; i < nchunks; i++) sum += chunk[i] = get_u32(&q, end);
        if (sum != len || (uint64_t)(end - q) < len || !budget || !mhb) {
            fprintf(stderr, "proto_fuzz -diff: bad case %zu\n", cases);
            return 2;
        }
        cur_input = q;
        cur_size = len;
        struct proto p;
        proto_init(&p, ms, mhb, mbb, 2 * (uint64_t)budget);
        if (kind == 1) {
            uint64_t part, n = echo_total(&p, chunk, nchunks, &part);
            put_le(stdout, n, 8);
            put_le(stdout, n, 8);
            put_le(stdout, 0, 4);
            put_le(stdout, part, 4);
            put_le(stdout, 0, 4);
        } else {
            struct result r = {0};
            run_http(&p, q, chunk, nchunks, (flags & 2) != 0, &r);
            put_le(stdout, (uint64_t)r.n, 8);
            put_le(stdout, (uint64_t)r.n_before_eof, 8);
            fputc(r.closing0, stdout);
            fputc(r.partial0, stdout);
            fputc(r.closing1, stdout);
            fputc(r.truncated, stdout);
            put_le(stdout, r.before_eof, 4);
            put_le(stdout, r.len, 4);
            if (r.len) fwrite(r.out, 1, r.len, stdout);
            result_free(&r);
        }
        proto_free(&p);
        free(chunk);
        q += len;
        cases++;
    }
    fflush(stdout);
    fprintf(stderr, "proto_fuzz -diff: %zu cases\n", cases);
    cur_input = NULL;
    pool_free(&pl);
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: proto_fuzz [-runs=N] [-seed=S] [-max_total_time=SECONDS] [-max_len=BYTES]\n"
            "                  [-artifact=PATH] [-alloc_fail=N] CORPUS_DIR_OR_FILE...\n"
            "       proto_fuzz -diff FILE\n");
}

int main(int argc, char **argv)
{
    unsigned long long runs = 10000, seed = 1;
    double max_time = 0;
    size_t max_len = 4096;
    long alloc_sweep = -1;
    struct pool pl = {0};
    const char *diff = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-diff") && i + 1 < argc) diff = argv[++i];
        else if (!strncmp(a, "-runs=", 6)) runs = strtoull(a + 6, NULL, 10);
        else if (!strncmp(a, "-seed=", 6)) seed = strtoull(a + 6, NULL, 10);
        else if (!strncmp(a, "-max_total_time=", 16)) max_time = strtod(a + 16, NULL);
        else if (!strncmp(a, "-max_len=", 9)) max_len = strtoul(a + 9, NULL, 10);
        else if (!strncmp(a, "-artifact=", 10)) artifact_path = a + 10;
        else if (!strncmp(a, "-alloc_fail=", 12)) alloc_sweep = strtol(a + 12, NULL, 10);
        else if (a[0] == '-') { usage(); return 2; }
        else if (load_path(&pl, a, max_len) < 0) {
            fprintf(stderr, "proto_fuzz: cannot read %s: %s\n", a, strerror(errno));
            return 2;
        }
    }
    if (max_len < PARAMS + 1) max_len = PARAMS + 1;
    if (!artifact_path) artifact_path = "proto_fuzz-crash.bin";
#ifdef HAVE_DEATH_CALLBACK
    __sanitizer_set_death_callback(save_artifact);   /* a sanitizer report keeps its input */
#endif
    if (diff) {
        pool_free(&pl);
        return run_diff(diff);
    }
    if (!pl.n) pool_add(&pl, (const uint8_t *)"\x08\x07\x06\x00\x00\x00GET / HTTP/1.1\r\nHost: x\r\n\r\n", 33);
    double t0 = now_s();
    size_t seeds = pl.n;

    if (alloc_sweep >= 0) {
        /* every seed, failing the 0th, 1st, ... malloc of each schedule, until no
         * schedule of that seed allocates that many times */
        unsigned long long execs = 0;
        long deepest = 0;
        for (size_t s = 0; s < seeds; s++) {
            cur_input = pl.v[s].p;
            cur_size = pl.v[s].n;
            for (long f = 0; f < alloc_sweep; f++) {
                long most = fuzz_one(pl.v[s].p, pl.v[s].n, f);
                execs++;
                if (f > deepest) deepest = f;
                if (most <= f) break;
            }
        }
        printf("proto_fuzz: alloc_fail sweep: %llu execs over %zu seeds, %llu PROTO_ENOMEM returns, "
               "deepest failing malloc #%ld, %.1f s\n", execs, seeds, enomem_seen, deepest, now_s() - t0);
        fflush(stdout);
        cur_input = NULL;
        pool_free(&pl);
        result_free(&run_ref);
        result_free(&run_cur);
        return 0;
    }

    for (size_t s = 0; s < seeds; s++) {   /* the corpus as it is first */
        LLVMFuzzerTestOneInput(pl.v[s].p, pl.v[s].n);
        sig_new(last_signature);
    }
    uint8_t *buf = malloc(max_len);
    CHECK(buf != NULL);
    uint64_t rng = seed * 0xD1B54A32D192ED03ULL + 1;
    unsigned long long execs = 0;
    size_t kept = 0;
    for (; execs < runs; execs++) {
        if (max_time > 0 && (execs & 63) == 0 && now_s() - t0 > max_time) break;
        const struct input *in = &pl.v[rng_next(&rng) % pl.n];
        const struct input *other = &pl.v[rng_next(&rng) % pl.n];
        size_t n = in->n < max_len ? in->n : max_len;
        memcpy(buf, in->p, n);
        mutate(buf, &n, max_len, other, &rng);
        LLVMFuzzerTestOneInput(buf, n);
        if (sig_new(last_signature) && pl.n < 4096) {   /* a new kind of run: mutate it too */
            pool_add(&pl, buf, n);
            kept++;
        }
    }
    printf("proto_fuzz: %llu execs after %zu seeds (seed %llu), %zu behaviours seen, %zu mutants kept, "
           "%llu PROTO_ENOMEM returns, %.1f s\n", execs, seeds, seed, nsigs, kept, enomem_seen, now_s() - t0);
    fflush(stdout);
    cur_input = NULL;
    free(buf);
    pool_free(&pl);
    result_free(&run_ref);
    result_free(&run_cur);
    return 0;
}
#endif
