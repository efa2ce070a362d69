/*
 * kernel_abi.h - the kernel interface of the io_uring core: what it uses of
 * include/uapi/linux/io_uring.h (structs, setup flags, opcodes, CQE flags) and of
 * liburing 2.15's C API, resolved with dlsym from the PyPI wheel's liburing.so at
 * uc_init() (we ship no header and do not link: the wheel's SONAME differs).
 * Part of the one translation unit build.py compiles (included by event_core.c).
 */
#ifndef URING_KERNEL_ABI_H
#define URING_KERNEL_ABI_H
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>

/* ---- kernel ABI (include/uapi/linux/io_uring.h), only what we use ---------------- */
struct io_uring_sqe {               /* 64 bytes */
    uint8_t opcode, flags; uint16_t ioprio; int32_t fd;
    uint64_t off, addr; uint32_t len, op_flags; uint64_t user_data;
    uint16_t buf_group, personality; int32_t splice_fd_in; uint64_t addr3, pad2;
};
struct io_uring_cqe { uint64_t user_data; int32_t res; uint32_t flags; };
struct io_sqring_offsets { uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1; uint64_t user_addr; };
struct io_cqring_offsets { uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1; uint64_t user_addr; };
struct io_uring_params {
    uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features, wq_fd, resv[3];
    struct io_sqring_offsets sq_off; struct io_cqring_offsets cq_off;
};
struct __kernel_timespec { int64_t tv_sec; long long tv_nsec; };
struct io_uring;                    /* liburing's, opaque: 216 bytes in 2.15, we give 1 KiB */
struct io_uring_buf_ring;
struct io_uring_probe;

#define IORING_SETUP_SQPOLL        (1U << 1)
#define IORING_SETUP_CQSIZE        (1U << 3)
#define IORING_SETUP_SUBMIT_ALL    (1U << 7)
#define IORING_SETUP_COOP_TASKRUN  (1U << 8)
#define IORING_SETUP_TASKRUN_FLAG  (1U << 9)
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#define IOSQE_FIXED_FILE           (1U << 0)
#define IOSQE_BUFFER_SELECT        (1U << 5)
#define IORING_CQE_F_NOTIF         (1U << 3)
#define IORING_CQE_F_BUFFER        (1U << 0)
#define IORING_CQE_F_MORE          (1U << 1)
#define IORING_CQE_BUFFER_SHIFT    16
#define IORING_CQE_F_SOCK_NONEMPTY (1U << 2)
#define IORING_FEAT_EXT_ARG        (1U << 8)
#define IORING_FEAT_MIN_TIMEOUT    (1U << 15)
#define IORING_OP_POLL_ADD 6
#define IORING_OP_ACCEPT 13
#define IORING_OP_ASYNC_CANCEL 14
#define IORING_OP_SEND 26
#define IORING_OP_RECV 27
#define IORING_OP_MSG_RING 40
#define IORING_OP_SEND_ZC 47

/* ---- liburing entry points, resolved at init ------------------------------------ */
#define LU_FUNCS(X) \
    X(int, io_uring_major_version, (void)) \
    X(int, io_uring_minor_version, (void)) \
    X(int, io_uring_queue_init_params, (unsigned, struct io_uring *, struct io_uring_params *)) \
    X(void, io_uring_queue_exit, (struct io_uring *)) \
    X(struct io_uring_sqe *, io_uring_get_sqe, (struct io_uring *)) \
    X(int, io_uring_submit, (struct io_uring *)) \
    X(int, io_uring_submit_and_wait, (struct io_uring *, unsigned)) \
    X(int, io_uring_submit_and_get_events, (struct io_uring *)) \
    X(int, io_uring_submit_and_wait_timeout, (struct io_uring *, struct io_uring_cqe **, unsigned, struct __kernel_timespec *, sigset_t *)) \
    X(int, io_uring_submit_and_wait_min_timeout, (struct io_uring *, struct io_uring_cqe **, unsigned, struct __kernel_timespec *, unsigned, sigset_t *)) \
    X(int, io_uring_register_ring_fd, (struct io_uring *)) \
    X(unsigned, io_uring_peek_batch_cqe, (struct io_uring *, struct io_uring_cqe **, unsigned)) \
    X(void, io_uring_cq_advance, (struct io_uring *, unsigned)) \
    X(unsigned, io_uring_cq_ready, (const struct io_uring *)) \
    X(_Bool, io_uring_cq_has_overflow, (const struct io_uring *)) \
    X(struct io_uring_buf_ring *, io_uring_setup_buf_ring, (struct io_uring *, unsigned, int, unsigned, int *)) \
    X(int, io_uring_free_buf_ring, (struct io_uring *, struct io_uring_buf_ring *, unsigned, int)) \
    X(void, io_uring_buf_ring_add, (struct io_uring_buf_ring *, void *, unsigned, unsigned short, int, int)) \
    X(void, io_uring_buf_ring_advance, (struct io_uring_buf_ring *, int)) \
    X(int, io_uring_buf_ring_mask, (uint32_t)) \
    X(void, io_uring_prep_accept, (struct io_uring_sqe *, int, struct sockaddr *, socklen_t *, int)) \
    X(void, io_uring_prep_multishot_accept, (struct io_uring_sqe *, int, struct sockaddr *, socklen_t *, int)) \
    X(void, io_uring_prep_recv_multishot, (struct io_uring_sqe *, int, void *, size_t, int)) \
    X(void, io_uring_prep_send, (struct io_uring_sqe *, int, const void *, size_t, int)) \
    X(void, io_uring_prep_sendmsg, (struct io_uring_sqe *, int, const struct msghdr *, unsigned)) \
    X(void, io_uring_prep_cancel64, (struct io_uring_sqe *, uint64_t, int)) \
    X(void, io_uring_prep_poll_add, (struct io_uring_sqe *, int, unsigned)) \
    X(void, io_uring_prep_send_zc, (struct io_uring_sqe *, int, const void *, size_t, int, unsigned)) \
    X(void, io_uring_prep_msg_ring, (struct io_uring_sqe *, int, unsigned, uint64_t, unsigned)) \
    X(int, io_uring_register_files_sparse, (struct io_uring *, unsigned)) \
    X(int, io_uring_register_files_update, (struct io_uring *, unsigned, const int *, unsigned)) \
    X(int, io_uring_sqring_wait, (struct io_uring *)) \
    X(struct io_uring_probe *, io_uring_get_probe_ring, (struct io_uring *)) \
    X(int, io_uring_opcode_supported, (const struct io_uring_probe *, int)) \
    X(void, io_uring_free_probe, (struct io_uring_probe *))
#define LU_DECL(ret, name, args) static ret (*p_##name) args;
LU_FUNCS(LU_DECL)

static char uc_errmsg[512];
static int uc_ready;

/* Resolve liburing from the wheel's file.  Returns NULL or a reason. */
static const char *uc_init(const char *path)
{
    if (uc_ready) return NULL;
    /* NOLOAD first: if something already loaded it, share that copy. */
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (!h) h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) { snprintf(uc_errmsg, sizeof uc_errmsg, "dlopen %s: %s", path, dlerror()); return uc_errmsg; }
#define LU_LOAD(ret, name, args) \
    if (!(p_##name = (ret (*) args)dlsym(h, #name))) { \
        snprintf(uc_errmsg, sizeof uc_errmsg, "symbol %s missing from %s", #name, path); return uc_errmsg; }
    LU_FUNCS(LU_LOAD)
    int maj = p_io_uring_major_version(), min = p_io_uring_minor_version();
    if (maj != 2 || min < 15) {
        snprintf(uc_errmsg, sizeof uc_errmsg, "liburing %d.%d found, this core was written for 2.15+ (2.x)", maj, min);
        return uc_errmsg;
    }
    uc_ready = 1;
    return NULL;
}

static int uc_lib_version(void) { return uc_ready ? p_io_uring_major_version() * 100 + p_io_uring_minor_version() : 0; }

#endif
