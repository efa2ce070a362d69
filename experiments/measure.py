"""One measured load point: a running server, one load generator run, everything the kernel says.

:func:`measure` runs the C load generator in a thread (it releases the GIL for the whole
run) and, from this thread, snapshots ``/proc`` exactly at the start and the end of the
generator's measured window (after its warm-up).  The window is what every figure of the
record refers to.

Kernel facts relied on:

* ``/proc/PID/task/TID/schedstat`` field 1 is the task's time on a CPU in ns (exact, not
  sampled).  Summed over every task of the server's process tree it is the **server
  CPU**: workers, the main thread, a dispatcher, SQPOLL or io-wq kernel threads of the
  process (``iou-sqp-*`` and ``iou-wrk-*`` are tasks of the process that owns the ring).
* ``/proc/PID/stat`` fields 14/15 (utime/stime, ticks of ``USER_HZ``) cover every thread
  the process ever had; the kernel apportions them by sampling at the tick, so the
  user/sys split is approximate (±1 tick per process per window) while the schedstat
  total is exact.
* ``/proc/PID/task/TID/status`` ``voluntary_ctxt_switches`` counts the times a thread
  slept (blocked in a wait); ``nonvoluntary_ctxt_switches`` the times it was preempted.
  A woken epoll waiter that finds nothing to do and sleeps again inside ``epoll_wait``
  never returns to user space, so it shows here and nowhere else.
* ``/proc/stat`` per-CPU jiffies say how busy each CPU was (noise.NoiseProbe), which is
  what decides the **bottleneck** of a point (:func:`bottleneck`).

Where the generator runs is the run's client placement (experiments/remote.py:
``local``, ``netns``, ``ssh://...``): :func:`measure` takes it from its ``client``
argument or from the server the Context started for it; the server's figures are read
here in every placement.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

from parallelnet.core import procfs
from parallelnet.experiments.noise import NoiseProbe
from parallelnet.experiments.server import ServerHandle, read_records, window

_CLK_TCK = procfs.CLK_TCK
BUSY = 0.90   # a CPU busy at least this fraction of the window counts as saturated

#: The load generator runs on another machine for the run in progress (``--client
#: ssh://...``): set by the framework for a run's duration (:func:`client_elsewhere`).
_CLIENT_ELSEWHERE = False


@contextlib.contextmanager
def client_elsewhere(on: bool = True):
    """While it lasts, :meth:`Layout.default` leaves no CPU of this machine to the client."""
    global _CLIENT_ELSEWHERE
    before, _CLIENT_ELSEWHERE = _CLIENT_ELSEWHERE, bool(on)
    try:
        yield
    finally:
        _CLIENT_ELSEWHERE = before


@dataclass
class Layout:
    """Which CPUs the server's workers and the load generator's threads run on."""

    server: list[int]
    client: list[int]

    @property
    def shared(self) -> bool:
        return bool(set(self.server) & set(self.client))

    @classmethod
    def default(cls, workers: int = 1) -> "Layout":
        """The 2-core rule generalised: the client takes the last CPU (the last half on a
        bigger machine), the server the others; with more workers than server CPUs the
        workers wrap around the server CPUs (several per CPU).  With the client on
        another machine (:func:`client_elsewhere`) every CPU may serve and the client has
        none here."""
        cpus = sorted(os.sched_getaffinity(0))
        if _CLIENT_ELSEWHERE:
            return cls(cpus, [])
        if len(cpus) == 1:
            return cls(cpus, cpus)
        half = max(1, len(cpus) // 2) if len(cpus) > 2 else 1
        client = cpus[-half:]
        server = [c for c in cpus if c not in client]
        return cls(server, client)


ctx_switches = procfs.ctx_switches   # (voluntary, nonvoluntary) of one thread


@dataclass
class TreeSample:
    """CPU of a process tree at one instant."""

    t: float
    cpu_ns: int
    user_ticks: int
    sys_ticks: int
    ctx: dict = field(default_factory=dict)   # (pid, tid) of a worker -> (vol, invol)
    faults: tuple = (0, 0)                    # (minor, major) page faults of the tree

    @classmethod
    def take(cls, root: int, workers: list[tuple[int, int]]) -> "TreeSample":
        pids = sorted(procfs.descendants([root], procfs.all_processes()))
        cpu = sum(procfs.process_cpu_ns(p) for p in pids)
        ut = st = mn = mj = 0
        for p in pids:
            stat = procfs.read_stat(p)
            if stat is not None:
                ut, st = ut + stat.utime, st + stat.stime
                mn, mj = mn + stat.minflt, mj + stat.majflt
        return cls(time.monotonic(), cpu, ut, st, {w: ctx_switches(*w) for w in workers},
                   (mn, mj))


def worker_tasks(stats_path: str, wait: float = 2.0) -> list[tuple[int, int]]:
    """(pid, tid) of every worker, in worker order, from the server's stats records
    (waiting, bounded, for the first record: a server writes one per stats interval)."""
    deadline = time.monotonic() + wait
    while True:
        for rec in read_records(stats_path):
            ws = rec.get("workers") or []
            if ws and all(w.get("tid") for w in ws):
                return [(w["pid"], w["tid"]) for w in ws]
        if time.monotonic() >= deadline:
            return []
        time.sleep(0.02)


def bottleneck(per_cpu: dict, layout: Layout, open_loop: bool, rate_met: bool,
               client_util: float | None = None, client_threads: int = 1) -> str:
    """What limited this point, from how busy each CPU was over the window.

    * ``offered``: an open loop that met its rate with no CPU saturated: the numbers
      describe the server at that load, not a limit;
    * ``server`` / ``client``: the CPUs of that side were saturated (at least BUSY) and
      the other side's were not;
    * ``both``: both sides saturated (or they share a saturated CPU);
    * ``neither``: nothing saturated yet the rate was not met (latency-bound: too few
      connections in flight for the rate).

    A run ranked on a ``client`` or ``both`` point ranks the client: summaries mark those
    rows and never rank backends on them.

    When the client shares a CPU with the server (``layout.shared``: two CPUs, two
    workers), that CPU's busy time says nothing about which side is short of it; the
    client is then judged by its own threads' CPU (``client_util``, in CPUs: saturated
    at ``BUSY`` per client CPU), and the server by its CPUs' busy time, which with a light
    client (a server-bound workload: the client uses a few % of a CPU) is the server's.

    A client with no CPU here (``layout.client`` empty: it runs on another host) is
    judged by its own threads' CPU alone: saturated at ``BUSY`` per generator thread
    (``client_threads``; a thread uses one CPU at most).
    """
    def busy(cpus):
        vals = [per_cpu.get(f"cpu{c}", {}).get("busy", 0.0) for c in cpus]
        return max(vals) if vals else 0.0

    srv = busy(layout.server)
    if not layout.client:
        cli_sat = client_util is not None and client_util >= BUSY * max(1, client_threads)
    elif layout.shared and client_util is not None:
        cli_sat = client_util >= BUSY * len(layout.client)
    else:
        cli_sat = busy(layout.client) >= BUSY
    srv_sat = srv >= BUSY
    if open_loop and rate_met and not (srv_sat or cli_sat):
        return "offered"
    if srv_sat and cli_sat:
        return "both"
    if srv_sat:
        return "server"
    if cli_sat:
        return "client"
    return "offered" if open_loop and rate_met else "neither"


#: Threads of one process that together use at most this many CPUs, with more CPUs given
#: to them and none saturated, are serialised by a lock (gil_bound).
GIL_CPUS = 1.3


def gil_bound(bound: str, workers: list[tuple[int, int]], server_cpus_used: float,
              layout: Layout) -> str:
    """``gil`` where ``bottleneck`` says ``neither`` but the server is one process whose
    worker threads (two or more, given two or more CPUs) together used no more than
    about one CPU (GIL_CPUS): a lock serialises them - for a Python loop the GIL, which
    every worker must hold to run its protocol and its loop.  The label ranks the server
    (its design is the limit), unlike ``neither`` (too few requests in flight)."""
    if bound != "neither" or len(workers) < 2 or len({pid for pid, _ in workers}) != 1:
        return bound
    if len(set(layout.server)) < 2 or server_cpus_used > GIL_CPUS:
        return bound
    return "gil"


def measure(srv: ServerHandle, spec, layout: Layout, extra_pids: tuple = (),
            per_worker: bool = True, client=None) -> dict:
    """Run ``spec`` (a loadgen.LoadSpec) against ``srv`` and return one record.

    CPU figures are deltas between two snapshots taken at the start and the end of the
    generator's measured window; ``requests`` is what the generator completed in it.
    ``client``: where the generator runs (experiments.remote.Client); by default the
    placement ``srv`` was started for (Context.server), else here.  With the client
    elsewhere the layout's client CPUs are none of this machine's.
    """
    from parallelnet.experiments.remote import START_GRACE, placement_of

    client = client or placement_of(srv)
    if client.elsewhere:
        layout = Layout(list(layout.server), [])
    workers = worker_tasks(srv.stats_path)
    client.place(layout)
    job = client.start(spec)
    try:
        probe = NoiseProbe([os.getpid(), srv.proc.pid, *job.pids, *extra_pids])
        t_start = job.started(START_GRACE + 30)
        _sleep_until(t_start + spec.warmup)
        probe.start()
        a = TreeSample.take(srv.proc.pid, workers)
        _sleep_until(t_start + spec.warmup + spec.duration)
        b = TreeSample.take(srv.proc.pid, workers)
        noise = probe.stop()
        lg = job.result(client.limit(spec))
    except BaseException:
        job.cancel()
        raise
    wall = b.t - a.t
    req = lg.requests
    cpu_s = (b.cpu_ns - a.cpu_ns) / 1e9
    user_s = (b.user_ticks - a.user_ticks) / _CLK_TCK
    sys_s = (b.sys_ticks - a.sys_ticks) / _CLK_TCK
    split = user_s + sys_s
    # The tick-sampled split, scaled to the exact total (schedstat).
    user_share = user_s / split if split else 0.0
    client_cpu = lg.client_cpu_user_s + lg.client_cpu_sys_s
    rec = {
        "window_s": wall,
        "requests": req,
        "rps": lg.rps,
        "server": {
            "cpu_s": cpu_s, "cpu_util": cpu_s / wall if wall else 0.0,
            "cpu_us_per_req": cpu_s * 1e6 / req if req else None,
            "user_us_per_req": cpu_s * user_share * 1e6 / req if req else None,
            "sys_us_per_req": cpu_s * (1 - user_share) * 1e6 / req if req else None,
            "ticks_user": user_s, "ticks_sys": sys_s,
            # Page faults of the server's processes in the window: in steady state a server
            # that reuses its buffers takes none (a cold start takes hundreds).
            "minflt_per_req": (b.faults[0] - a.faults[0]) / req if req else None,
            "majflt": b.faults[1] - a.faults[1],
        },
        "client": {
            "mode": spec.mode, "rate": getattr(spec, "rate", 0.0), "rate_met": lg.rate_met,
            "achieved": lg.achieved_rate, "latency_us": lg.latency,
            "latency_max_us": lg.latency_max_us, "errors": lg.errors_total,
            "errors_by_kind": {k: v for k, v in lg.errors.items() if v},
            "backlog": lg.backlog, "scheduled": lg.scheduled, "connects": lg.connects,
            "cpu_s": client_cpu, "cpu_util": client_cpu / spec.duration if spec.duration else 0.0,
            "cpu_us_per_req": lg.client_cpu_us_per_req, "aborted": lg.aborted,
            "message": lg.message, "non2xx": lg.non2xx,
        },
        "noise": {k: noise[k] for k in ("steal_max", "others_cpu", "kthreads_cpu", "noisy")},
        "busy": {c: round(v["busy"], 4) for c, v in noise["per_cpu"].items()},
        "softirq": {c: round(v["softirq"], 4) for c, v in noise["per_cpu"].items()},
        "bound": gil_bound(
            bottleneck(noise["per_cpu"], layout, spec.mode == "open" or
                       (spec.mode == "churn" and getattr(spec, "rate", 0) > 0), lg.rate_met,
                       client_util=client_cpu / wall if wall else None,
                       client_threads=spec.threads),
            workers, cpu_s / wall if wall else 0.0, layout),
        "layout": {"server": layout.server, "client": layout.client},
        "client_placement": client.label,
        # The receive steering in force (netns: RPS masks, hex); None where the placement
        # has none to set (loopback, another host).  Present in every record: one schema.
        "rx_steering": {k: (getattr(client, "masks", None) or {}).get(k)
                        for k in ("host_rps_cpus", "client_rps_cpus")},
    }

    if lg.classes is not None:   # service times on: the per-class figures of the requests
        rec["client"]["work_us"] = lg.work_us
        rec["client"]["classes"] = {
            name: {"connections": c.connections, "service": c.service, "requests": c.requests,
                   "work_us": c.work_us, "latency_us": c.latency}
            for name, c in lg.classes.items()}
    # The window on the server's clock (seconds since it said "listening"), for experiments
    # that read its per-interval records.
    rec["window_server_t"] = [t_start + spec.warmup - srv.t_listen,
                              t_start + spec.warmup + spec.duration - srv.t_listen]
    if workers:
        vol = [b.ctx[w][0] - a.ctx[w][0] for w in workers]
        inv = [b.ctx[w][1] - a.ctx[w][1] for w in workers]
        rec["server"]["voluntary_cs"] = vol
        rec["server"]["involuntary_cs"] = inv
    if per_worker:
        rec["workers"] = _worker_window(srv, t_start + spec.warmup, t_start + spec.warmup + spec.duration)
    return rec


def _worker_window(srv: ServerHandle, t0: float, t1: float) -> list[dict] | None:
    """Per-worker counter deltas from the server's own stats records inside [t0, t1]
    (our monotonic clock, mapped to the server's: seconds since it said "listening")."""
    try:
        win = window(srv.stats_path, t0 - srv.t_listen, t1 - srv.t_listen)
    except RuntimeError:
        return None
    return win["workers"]


def _sleep_until(t: float) -> None:
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))
