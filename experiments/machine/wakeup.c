/* How long a blocked thread takes to run again after another CPU wakes it.
 *
 * The waker stamps CLOCK_MONOTONIC and writes an eventfd; the sleeper, blocked in read()
 * on it, stamps the clock when read() returns.  The difference is the wake-up latency the
 * accept race lives on: a SYN's softirq wakes the workers blocked in epoll_wait() the same
 * way.  Between samples the waker sleeps a random gap, so the sleeper's CPU has gone idle
 * (in a VM: the vCPU halted, and its wake-up needs the host to deliver an IPI and schedule
 * the vCPU's thread - the part virtualisation adds).  With both threads on one CPU the
 * figure is a plain context switch instead.
 *
 * CLOCK_MONOTONIC is one clock for all CPUs (the kernel keeps it consistent across CPUs),
 * so stamps taken on two CPUs subtract.  Every sample is returned; the caller summarises. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int pin(int cpu)
{
    if (cpu < 0) return 0;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    return pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}

struct sleeper {
    int efd_go, efd_back, cpu, n, err;
    volatile int64_t *sent;     /* the waker's stamp of sample i */
    int64_t *out;
};

static void *sleeper_main(void *arg)
{
    struct sleeper *s = arg;
    if (pin(s->cpu) != 0) { s->err = EINVAL; }
    uint64_t v = 1;
    /* Tell the waker we are pinned (or failed to pin) and about to block. */
    if (write(s->efd_back, &v, sizeof v) != sizeof v) { s->err = errno; return NULL; }
    for (int i = 0; i < s->n; i++) {
        if (read(s->efd_go, &v, sizeof v) != sizeof v) { s->err = errno; return NULL; }
        s->out[i] = now_ns() - s->sent[i];
        if (write(s->efd_back, &v, sizeof v) != sizeof v) { s->err = errno; return NULL; }
    }
    return NULL;
}

/* n samples of the wake-up latency (ns) of a thread on sleeper_cpu woken from waker_cpu
 * (-1: not pinned), with a gap drawn uniformly from [gap_us/2, 3*gap_us/2] before each.
 * 0, or -errno (EINVAL: a CPU outside the allowed set). */
int wake_latency(int waker_cpu, int sleeper_cpu, int n, int gap_us, unsigned seed, int64_t *out)
{
    if (n <= 0 || gap_us < 0) return -EINVAL;
    int64_t *sent = calloc((size_t)n, sizeof *sent);
    if (!sent) return -ENOMEM;
    struct sleeper s = { .efd_go = eventfd(0, EFD_CLOEXEC), .efd_back = eventfd(0, EFD_CLOEXEC),
                         .cpu = sleeper_cpu, .n = n, .sent = sent, .out = out };
    int rc = 0;
    pthread_t th;
    if (s.efd_go < 0 || s.efd_back < 0) { rc = -errno; goto done; }
    if (pthread_create(&th, NULL, sleeper_main, &s) != 0) { rc = -EAGAIN; goto done; }
    uint64_t v = 1;
    cpu_set_t saved;            /* the caller's thread is the waker: its mask is restored */
    pthread_getaffinity_np(pthread_self(), sizeof saved, &saved);
    int pinned = pin(waker_cpu);
    if (read(s.efd_back, &v, sizeof v) != sizeof v) rc = -errno;
    if (pinned != 0 || s.err) {
        /* Let the sleeper run to its end so it can be joined: feed it without measuring. */
        rc = -EINVAL;
    }
    for (int i = 0; i < n; i++) {
        if (rc == 0 && gap_us > 0) {
            long us = gap_us / 2 + (long)(rand_r(&seed) % (unsigned)(gap_us + 1));
            struct timespec t = { us / 1000000, (us % 1000000) * 1000 };
            nanosleep(&t, NULL);
        }
        sent[i] = now_ns();
        v = 1;
        if (write(s.efd_go, &v, sizeof v) != sizeof v) { rc = rc ? rc : -errno; break; }
        if (read(s.efd_back, &v, sizeof v) != sizeof v) { rc = rc ? rc : -errno; break; }
    }
    pthread_join(th, NULL);
    pthread_setaffinity_np(pthread_self(), sizeof saved, &saved);
    if (rc == 0 && s.err) rc = -s.err;
done:
    if (s.efd_go >= 0) close(s.efd_go);
    if (s.efd_back >= 0) close(s.efd_back);
    free(sent);
    return rc;
}

/* n samples of how late a clock_nanosleep of sleep_us returns (ns past the deadline):
 * timer slack plus the CPU's own wake-up from idle. */
int timer_overshoot(int cpu, int n, int sleep_us, int64_t *out)
{
    if (n <= 0 || sleep_us <= 0) return -EINVAL;
    cpu_set_t saved;
    pthread_getaffinity_np(pthread_self(), sizeof saved, &saved);
    if (pin(cpu) != 0) return -EINVAL;
    for (int i = 0; i < n; i++) {
        int64_t t0 = now_ns(), dl = t0 + (int64_t)sleep_us * 1000;
        struct timespec t = { dl / 1000000000, dl % 1000000000 };
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {}
        out[i] = now_ns() - dl;
    }
    pthread_setaffinity_np(pthread_self(), sizeof saved, &saved);
    return 0;
}

/* The CPU time charged to a thread per sleep and wake-up: n clock_nanosleeps of sleep_us
 * on cpu, the thread's own CPU clock (CLOCK_THREAD_CPUTIME_ID: what schedstat and every
 * "server CPU per request" here count) read before and after.  The loop itself costs a
 * few hundred ns per turn; the rest is what entering the sleep and coming back costs the
 * sleeper - in a VM whose halted vCPU the host must wake, measured here at tens of µs, and
 * more the longer the CPU was idle.  Below saturation a server
 * pays it once per wake-up, whatever its event interface: it is the floor of any CPU per
 * request measured at a low rate.  *cpu_ns: the total; 0 or -errno. */
int wake_cpu_cost(int cpu, int n, int sleep_us, int64_t *cpu_ns)
{
    if (n <= 0 || sleep_us <= 0) return -EINVAL;
    cpu_set_t saved;
    pthread_getaffinity_np(pthread_self(), sizeof saved, &saved);
    if (pin(cpu) != 0) return -EINVAL;
    struct timespec c0, c1, t = { sleep_us / 1000000, (long)(sleep_us % 1000000) * 1000 };
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    for (int i = 0; i < n; i++)
        while (clock_nanosleep(CLOCK_MONOTONIC, 0, &t, &t) == EINTR) {}
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
    pthread_setaffinity_np(pthread_self(), sizeof saved, &saved);
    *cpu_ns = (int64_t)(c1.tv_sec - c0.tv_sec) * 1000000000 + (c1.tv_nsec - c0.tv_nsec);
    return 0;
}
