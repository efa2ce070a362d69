/*
 * handoff_recv.h - the worker's side of --accept dispatch, once in C.
 *
 * The core's acceptor (core/dispatch.py) passes each connected socket over an AF_UNIX
 * SOCK_SEQPACKET channel as SCM_RIGHTS, one fd per message, with one byte of data: the
 * listener id (core/handoff.py; HandoffReceiver is the Python receiver).  Both C cores -
 * native_core.c (epoll) and the io_uring core (backends/uring/event_core.c: `uring`,
 * `native-uring`) - take what is waiting with handoff_recv, each when its own mechanism
 * says the channel is readable (epoll, a poll on the ring) and once more at drain:
 *
 *  - recvmsg until EAGAIN (EINTR retried);
 *  - every fd received counts once: a listener id outside 0..nids-1 (a dispatcher bug)
 *    closes it, counted lost - never served by a wrong protocol; else it counts in
 *    handoffs and goes to adopt(ctx, fd, listener id), which counts it accepted and takes
 *    it (or refuses it at max_conns);
 *  - out of fds (EMFILE/ENFILE) the kernel cannot install the passed fd: the message is
 *    consumed with MSG_CTRUNC and that connection is lost - counted in lost (when no fd
 *    came with it), never silent, and episode(ctx) is called at the start of an episode
 *    (the core logs it once); a message that brings an fd whole ends the episode;
 *  - a message of 0 bytes with no fd is EOF: the acceptor closed its end.  Its readiness
 *    would fire at once each time it is watched again: the caller stops watching.
 *
 * Returns HANDOFF_EOF or HANDOFF_EMPTY.  Not on any hot path: one call per wakeup of the
 * channel; adopt and episode are the caller's static functions, inlined with it.
 */
#ifndef HANDOFF_RECV_H
#define HANDOFF_RECV_H
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define HANDOFF_MAX_FDS 16           /* fds one message may carry (the acceptor sends one) */

enum { HANDOFF_EMPTY = 0, HANDOFF_EOF = 1 };

static inline int handoff_recv(int chan, int nids, int *losing, uint64_t *handoffs,
                               uint64_t *lost, void (*adopt)(void *ctx, int fd, int lid),
                               void (*episode)(void *ctx), void *ctx)
{
    for (;;) {
        unsigned char byte = 0;      /* the listener id (core/handoff.py) */
        union { struct cmsghdr align; char b[CMSG_SPACE(HANDOFF_MAX_FDS * sizeof(int))]; } ctl;  /* CMSG_* need cmsghdr alignment */
        struct iovec iov = { &byte, 1 };
        struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1,
                            .msg_control = ctl.b, .msg_controllen = sizeof ctl.b };
        ssize_t r = recvmsg(chan, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (r < 0) {
            if (errno == EINTR) continue;
            return HANDOFF_EMPTY;    /* EAGAIN: empty (anything else: nothing to take now either) */
        }
        int got = 0;
        for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h)) {
            if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
            int n = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < n; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(h) + i * sizeof(int), sizeof fd);
                got++;
                if (byte >= nids) { close(fd); (*lost)++; continue; }
                (*handoffs)++;
                adopt(ctx, fd, byte);
            }
        }
        if (m.msg_flags & MSG_CTRUNC) {
            if (!got) (*lost)++;     /* one fd per message: one connection per CTRUNC */
            if (!*losing) { *losing = 1; episode(ctx); }
            continue;
        }
        if (got) *losing = 0;        /* a connection received whole ends the episode */
        else if (r == 0) return HANDOFF_EOF;
    }
}

#endif
