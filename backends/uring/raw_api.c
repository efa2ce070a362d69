/*
 * raw_api.c - the raw API of `uring-py` (backends/uring/uring_py.py): Python submits
 * and reaps every operation itself; the core lends it the ring, the provided buffers and the
 * SQE/CQE plumbing.  Compiled in one translation unit after event_core.c (build.py), whose
 * internals it uses.
 */

/* ---- the raw API of `uring-py`: Python handles each completion itself ------------- */
static int uc_raw_accept(uc_core *c, int fd, uint64_t ud, int multishot)
{
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return -c->fail;
    if (multishot) p_io_uring_prep_multishot_accept(s, fd, NULL, NULL, SOCK_CLOEXEC);
    else p_io_uring_prep_accept(s, fd, NULL, NULL, SOCK_CLOEXEC);
    s->user_data = ud;
    return 0;
}
static int uc_raw_recv(uc_core *c, int fd, uint64_t ud)
{
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return -c->fail;
    p_io_uring_prep_recv_multishot(s, fd, NULL, 0, 0);
    s->flags |= IOSQE_BUFFER_SELECT; s->buf_group = BGID; s->user_data = ud;
    return 0;
}
static int uc_raw_send(uc_core *c, int fd, const char *p, size_t len, uint64_t ud)
{
    if (len > UINT32_MAX) return -EMSGSIZE;
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return -c->fail;
    p_io_uring_prep_send(s, fd, p, len, MSG_NOSIGNAL);
    s->user_data = ud;
    return 0;
}
static int uc_raw_cancel(uc_core *c, uint64_t target, uint64_t ud)
{
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return -c->fail;
    p_io_uring_prep_cancel64(s, target, 0);
    s->user_data = ud;
    return 0;
}
static int uc_raw_poll(uc_core *c, int fd, uint64_t ud)
{
    struct io_uring_sqe *s = sqe_get(c);
    if (!s) return -c->fail;
    p_io_uring_prep_poll_add(s, fd, POLLIN);
    s->user_data = ud;
    return 0;
}
static void uc_raw_recycle(uc_core *c, int bid) { buf_recycle(c, bid); }

/* Submit, wait, copy out up to max CQEs as (user_data, res, flags) and advance. */
static int uc_raw_wait(uc_core *c, int timeout_ms, uint64_t *ud, int32_t *res, uint32_t *fl, int max)
{
    if (c->fail) return -c->fail;
    ring_refill(c);
    if (c->br_pending) { p_io_uring_buf_ring_advance(c->br, c->br_pending); c->br_pending = 0; }
    submit_and_wait(c, p_io_uring_cq_ready(RING(c)) ? 0 : timeout_ms);
    if (c->fail) return -c->fail;
    struct io_uring_cqe *cqes[256];
    int got = 0;
    while (got < max) {
        unsigned n = p_io_uring_peek_batch_cqe(RING(c), cqes, (unsigned)(max - got < 256 ? max - got : 256));
        if (!n) break;
        for (unsigned i = 0; i < n; i++, got++) {
            ud[got] = cqes[i]->user_data; res[got] = cqes[i]->res; fl[got] = cqes[i]->flags;
            if (!(cqes[i]->flags & IORING_CQE_F_MORE) && (cqes[i]->user_data & 0xff) != OP_MSG) c->inflight--;
            if ((cqes[i]->flags & IORING_CQE_F_BUFFER)) c->ring_free--;
        }
        p_io_uring_cq_advance(RING(c), n);
    }
    c->st.cqes += got;
    rate_update(c, mono_ns(), (unsigned)got);
    if (p_io_uring_cq_has_overflow(RING(c))) c->st.cq_overflows++;
    return got;
}
