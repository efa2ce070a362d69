/*
 * cproto.c - the C-protocol mode of `native-uring` (backends/uring/native_uring.py).
 * Compiled in one translation unit after event_core.c (build.py), whose internals it uses.
 */

/* ---- C-protocol mode: native-uring ---------------------------------------------------
 * The seed's design in C over io_uring, the counterpart of `native` (epoll): the same
 * event core (single-shot accept on the shared socket, multishot recv, provided buffer
 * ring, sends, backpressure, close, drain, the batching window), with each batch of
 * events answered here by proto_core.h's echo/HTTP - the very code `native` runs -
 * instead of being handed to Python.  uc_serve is called once by the worker thread and
 * returns only at stop: cffi releases the GIL for the whole loop.  Echo sends the
 * received provided buffer itself (out_buf: no copy); HTTP answers are copied out of
 * the scratch buffer.  Timeouts are the core's own sweep (both modes); a feed that leaves
 * an HTTP request incomplete starts its deadline (rule request-deadline), as conn_progress does for Python. */
static struct pstate *cp_state(uc_core *c, int id)
{
    if (id >= c->ps_cap) {
        int n = c->ps_cap ? c->ps_cap : 256;
        while (n <= id) n *= 2;
        struct pstate *q = realloc(c->ps, (size_t)n * sizeof *q);
        if (!q) return NULL;
        memset(q + c->ps_cap, 0, (size_t)(n - c->ps_cap) * sizeof *q);
        c->ps = q; c->ps_cap = n;
    }
    return &c->ps[id];
}

/* Send what the feed left in the scratch buffer.  A large answer (TAKE_MIN or more) is
 * handed over: the send takes the scratch memory (freed once sent) and the scratch gets a
 * fresh block of the same capacity, a malloc without a copy, where copying it cost a
 * second pass over every byte (native's epoll loop sends straight from its scratch buffer).
 * A small one is copied, which keeps the scratch buffer warm. */
#define TAKE_MIN (16 * 1024)
static int cp_send_scratch(uc_core *c, int id)
{
    struct buf *sc = &c->proto.scratch;
    if (!sc->len) return 0;
    if (sc->len >= TAKE_MIN && sc->head == 0) {
        char *fresh = malloc(sc->cap);
        if (fresh) {
            char *m = sc->p;
            size_t n = sc->len;
            sc->p = fresh; sc->len = 0;
            return out_take(c, id, m, n);
        }
    }
    return out_copy(c, id, sc->p + sc->head, sc->len);
}

/* One batch of events (c->ev[0 .. n)), answered in C. */
static void cp_process(uc_core *c, int n)
{
    for (int i = 0; i < n; i++) {
        int32_t *e = c->ev + 4 * i;
        int id = e[1];
        struct pstate *ps;
        switch (e[0]) {
        case EV_DATA: {
            ps = &c->ps[id];
            if (ps->pclosing) break;
            char *data = c->pool + (size_t)e[2] * c->cfg.bufsize;
            unsigned len = (unsigned)e[3];
            int rc = 0;
            if (c->cfg.lproto[c->conns[id].lid] == UC_ECHO) {
                c->st.requests += proto_echo_count(&c->proto, ps, len);
                rc = out_buf(c, id, e[2], 0, len);
            } else {
                int64_t done = proto_http_feed(&c->proto, ps, data, len);
                if (done < 0) { uc_alloc_failed(c, id); break; }
                c->st.requests += (uint64_t)done;
                if (pstate_partial(ps) || c->conns[id].pol.req_start_ms)   /* rule request-deadline */
                    pol_progress(&c->conns[id].pol, pstate_partial(ps), (uint64_t)done, len, c->now_ms);
                rc = cp_send_scratch(c, id);
                proto_scratch_done(&c->proto);
            }
            if (rc < 0) conn_kill(c, id, 1);
            else if (ps->pclosing) conn_finish(c, id);
            else if (pstate_more(ps)) conn_hold(c, id, 1);
            break;
        }
        case EV_PULL: {             /* rule held-answers: the next held answers */
            ps = &c->ps[id];
            const char *out;
            size_t olen;
            int64_t done = proto_http_pull(&c->proto, ps, &out, &olen);
            if (done < 0) { uc_alloc_failed(c, id); break; }
            c->st.requests += (uint64_t)done;
            int rc = 0;
            if (olen) rc = proto_is_body_piece(out) ? out_static(c, id, out, olen)
                                                    : out_copy(c, id, out, olen);
            proto_scratch_done(&c->proto);
            if (rc < 0) { conn_kill(c, id, 1); break; }
            conn_pulled(c, id, pstate_more(ps));
            if (ps->pclosing) conn_finish(c, id);
            break;
        }
        case EV_OPEN:
            ps = cp_state(c, id);
            if (!ps) { conn_kill(c, id, 1); break; }
            memset(ps, 0, sizeof *ps);
            c->st.opened++;
            break;
        case EV_CLOSED:
            if (id < c->ps_cap) pstate_free(&c->ps[id]);
            c->st.closed++;
            if (e[2]) c->st.errors++;
            break;
        case EV_EOF:                /* a partial request is dropped unanswered; held ones are answered */
            ps = &c->ps[id];
            proto_eof(ps);
            conn_finish(c, id);
            break;
        case EV_DRAINED:
            conn_finish(c, id);
            break;
        default:
            break;                  /* EV_STOP: uc_wait has set stop_seen; EV_TICK: swept there */
        }
    }
}

/* Serve until stop.  0, or -errno if the ring failed (the worker raises it). */
static int uc_serve(uc_core *c)
{
    while (!c->stop_seen) {
        int n = wait_batch(c, -1);
        if (n < 0) return n;
        cp_process(c, n);
    }
    return 0;
}

/* Wait and answer until the deadline, or until no connection is left (and, with
 * all_ops, no operation in the kernel either).  0, or -errno if the ring failed. */
static int cp_pump(uc_core *c, int64_t deadline, int all_ops)
{
    while (c->nconns > 0 || (all_ops && c->inflight > 0)) {
        int64_t left = deadline - mono_ms();
        if (left <= 0) break;
        int n = wait_batch(c, (int)left);
        if (n < 0) return n;
        cp_process(c, n);
    }
    return 0;
}

/* Stop accepting, answer what was received, flush within timeout_ms. */
static int uc_drain(uc_core *c, int timeout_ms)
{
    uc_drain_begin(c);
    int64_t deadline = mono_ms() + timeout_ms;
    int n = wait_batch(c, 0);          /* msg-ring hand-overs posted before stop, as in uring.py */
    if (n < 0) return n;
    cp_process(c, n);
    return cp_pump(c, deadline, 0);
}

/* Close everything and wait (bounded) until the kernel holds nothing of ours. */
static void uc_close_all(uc_core *c, int timeout_ms)
{
    uc_shutdown(c);
    if (cp_pump(c, mono_ms() + timeout_ms, 1) < 0) return;
    int n = wait_batch(c, 0);          /* closes released synchronously by uc_shutdown */
    if (n > 0) cp_process(c, n);
}
