"""What every experiment shares: a server subprocess, windows of its stats, machine noise, result files.

Kernel facts used here:

* ``/proc/stat`` ``cpuN`` lines count, per CPU, jiffies (``USER_HZ``, 100/s) spent in
  user, nice, system, idle, iowait, irq, softirq, steal...  Deltas over the measured
  window give how busy each CPU was, how much the hypervisor stole (``steal``), and how
  much went to softirq (on loopback, much of TCP's receive path).
* ``/proc/PID/stat`` fields 14/15 are that process's user/sys jiffies (all threads);
  field 4 its parent, field 9 its flags (``PF_KTHREAD``).  CPU used by user processes
  outside the server's and client's process trees is *others*: a run where others used
  a noticeable share is flagged, not averaged in.
* pyperf treats a lower value as faster; results are stored as seconds (of server CPU)
  per request, so ``python -m pyperf compare_to`` reads them the right way round.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import time
from dataclasses import dataclass, field

from parallelnet.core.launch import spawn_server
from parallelnet.core.stats import add_observable, delta_observable
from parallelnet.experiments.analysis import prefer_quiet  # noqa: F401 - re-exported

_CLK_TCK = os.sysconf("SC_CLK_TCK")
LOCK_PATH = "/tmp/bench.lock"
NOISE_LIMIT = 0.05  # steal or others' CPU above 5% of one CPU over the window: noisy


@contextlib.contextmanager
def bench_lock(stream=None):
    """Hold LOCK_PATH for a timed run, so two benchmarks never overlap.

    Run under ``flock /tmp/bench.lock CMD``, the lock is already ours through an
    inherited descriptor (the same open file description, so flock on it succeeds at
    once): reuse it rather than wait on ourselves.  Otherwise take it - saying so on
    ``stream`` when another benchmark holds it, rather than waiting silently.
    """
    with open(LOCK_PATH, "a") as own:
        target = os.path.realpath(LOCK_PATH)
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == target:
                    fcntl.flock(int(fd), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
            except OSError:
                continue
        else:
            try:
                fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if stream is not None:
                    print(f"waiting for {LOCK_PATH}: another benchmark holds it "
                          "(the run starts when it ends)", file=stream, flush=True)
                t0 = time.monotonic()
                fcntl.flock(own, fcntl.LOCK_EX)
                if stream is not None:
                    print(f"got {LOCK_PATH} after {time.monotonic() - t0:.0f} s", file=stream,
                          flush=True)
        yield


# -- machine noise --------------------------------------------------------------

def read_cpu_jiffies() -> dict[str, list[int]]:
    """``{"cpu": [...], "cpu0": [...], ...}`` from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                name, *vals = line.split()
                out[name] = [int(v) for v in vals]
    return out


_PF_KTHREAD = 0x00200000  # task flag (/proc/PID/stat field 9): a kernel thread


def all_processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, flags, user+sys jiffies of all its threads) for every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = raw[raw.rindex(b")") + 2:].split()
        # fields[0] is field 3 (state): ppid is field 4, flags 9, utime 14, stime 15.
        out[int(name)] = (int(fields[1]), int(fields[6]), int(fields[11]) + int(fields[12]))
    return out


def _descendants(roots, procs: dict) -> set[int]:
    ours = set(roots)
    grew = True
    while grew:  # a process tree is shallow: a few passes
        grew = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return ours


@dataclass
class NoiseProbe:
    """Snapshot /proc at the start and end of a measured window.

    Over the window it reports, per CPU, busy/steal/irq/softirq fractions, and the CPU
    (in CPUs, i.e. seconds per second) used by:

    * ``others_cpu``: user processes that are neither ours (``pids`` and all their
      descendants: server workers, a child client such as wrk) — another tenant of the
      machine, a stray job: this is the noise that disqualifies a run;
    * ``kthreads_cpu``: kernel threads (ksoftirqd, kworkers...), reported, not flagged,
      since on loopback they often do our own network processing.

    A run is ``noisy`` when steal on some CPU or ``others_cpu`` exceeds NOISE_LIMIT.
    """

    pids: list[int]                       # server and client processes (roots)
    cpus: dict = field(default_factory=dict)
    procs: dict = field(default_factory=dict)
    t: float = 0.0

    def start(self) -> "NoiseProbe":
        self.cpus, self.procs, self.t = read_cpu_jiffies(), all_processes(), time.monotonic()
        return self

    def stop(self) -> dict:
        cpus, procs, t = read_cpu_jiffies(), all_processes(), time.monotonic()
        wall = max(t - self.t, 1e-9)
        per_cpu = {}
        for name, after in cpus.items():
            if name == "cpu":
                continue
            d = [b - a for a, b in zip(self.cpus.get(name, after), after)]
            total = sum(d[:8]) or 1
            per_cpu[name] = {"busy": (total - d[3] - d[4]) / total,
                             "steal": d[7] / total if len(d) > 7 else 0.0,
                             "softirq": d[6] / total, "irq": d[5] / total}
        ours = _descendants(self.pids, {**self.procs, **procs})
        others = kthreads = 0
        for pid, (_, flags, jiffies) in procs.items():
            if pid in ours:
                continue
            used = jiffies - self.procs[pid][2] if pid in self.procs else jiffies
            if flags & _PF_KTHREAD:
                kthreads += used
            else:
                others += used
        steal = max((c["steal"] for c in per_cpu.values()), default=0.0)
        others_cpu = others / _CLK_TCK / wall
        return {"wall_s": wall, "per_cpu": per_cpu, "steal_max": steal,
                "others_cpu": others_cpu, "kthreads_cpu": kthreads / _CLK_TCK / wall,
                "ncpu": len(per_cpu), "noisy": steal > NOISE_LIMIT or others_cpu > NOISE_LIMIT}


# -- the server under test --------------------------------------------------------

@dataclass
class ServerHandle:
    proc: subprocess.Popen
    host: str
    port: int
    stats_path: str
    t_listen: float  # monotonic time at which it printed "listening on"
    output: str = ""

    def worker_pids(self) -> list[int]:
        recs = read_records(self.stats_path)
        pids = {w["pid"] for r in recs for w in r["workers"] if w["pid"]}
        return sorted(pids | {self.proc.pid})

    def stop(self, timeout: float = 30.0) -> dict:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output = out or ""
        finals = [r for r in read_records(self.stats_path) if r["type"] == "final"]
        return finals[-1] if finals else {}


def start_server(args: list[str], stats_path: str, cpus: set[int] | None = None,
                 interval: float = 0.25, timeout: float = 15.0) -> ServerHandle:
    """``parallelnet serve --port 0 --stats-json PATH --stats-interval S ARGS``."""
    allowed = cpus or set(range(os.cpu_count() or 1))
    proc, host, port = spawn_server(
        ["--stats-json", stats_path, "--stats-interval", str(interval), *args],
        merge_stderr=True, timeout=timeout, preexec_fn=lambda: os.sched_setaffinity(0, allowed))
    return ServerHandle(proc, host, port, stats_path, time.monotonic())


def read_records(stats_path: str) -> list[dict]:
    try:
        with open(stats_path) as f:
            return [json.loads(x) for x in f if x.strip()]
    except FileNotFoundError:
        return []


def window(stats_path: str, t0: float, t1: float) -> dict:
    """Per-worker and total deltas between the first and last interval records in [t0, t1]
    (server clock: seconds since it started)."""
    recs = [r for r in read_records(stats_path) if r["type"] == "interval" and t0 <= r["t"] <= t1]
    if len(recs) < 2:
        raise RuntimeError(f"fewer than two stats records in the window [{t0:.2f}, {t1:.2f}] s")
    first, last = recs[0], recs[-1]
    keys = ("requests", "accepted", "lost_races", "wakeups", "listen_wakeups", "bytes_in",
            "bytes_out", "cpu_ns", "user_s", "sys_s")
    workers = []
    for a, b in zip(first["workers"], last["workers"]):
        d = {k: delta_observable(a[k], b[k]) for k in keys}   # lost_races may be n/a (None)
        d["index"], d["cpu"] = b["index"], b["cpu"]
        ea, eb = a.get("extra", {}), b.get("extra", {})
        d["extra"] = {k: eb[k] - ea[k] for k in eb
                      if isinstance(eb[k], (int, float)) and isinstance(ea.get(k), (int, float))}
        workers.append(d)
    total = {k: add_observable(w[k] for w in workers) for k in keys}
    req = max(total["requests"], 1)
    total.update(seconds=last["t"] - first["t"],
                 cpu_us_per_req=total["cpu_ns"] / 1e3 / req,
                 user_us_per_req=total["user_s"] * 1e6 / req,
                 sys_us_per_req=total["sys_s"] * 1e6 / req)
    return {"workers": workers, "total": total}


def process_cpu_ns(pid: int) -> int:
    """CPU time of every live thread of ``pid`` in ns (``schedstat``: sum_exec_runtime).

    Differenced around a window it counts a whole server process - acceptor, main
    thread and workers - where ``WorkerStats.cpu_ns`` counts one worker thread.
    """
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended: the server's threads all outlive the window
    return total


class RunCounter:
    """``[k/N, ETA mm:ss]`` for scripts that loop over runs of about equal length."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def tick(self) -> str:
        self.done += 1
        el = time.monotonic() - self.t0
        left = el / self.done * (self.total - self.done)
        return f"[{self.done}/{self.total}, ETA {int(left) // 60}m{int(left) % 60:02d}s]"


def bound_of(noise: dict, server_cpus, client_cpus, open_loop: bool = False,
             rate_met: bool = True) -> str:
    """The bottleneck of a run from its NoiseProbe figures (experiments.measure.bottleneck)."""
    from parallelnet.experiments.measure import Layout, bottleneck

    return bottleneck(noise["per_cpu"], Layout(sorted(set(server_cpus)), sorted(set(client_cpus))),
                      open_loop, rate_met)


def common_bound(runs: list[dict]) -> str:
    """The most frequent bottleneck of a summary row's runs ('?' for runs recorded before
    bottlenecks were)."""
    bounds = [r.get("bound") or "?" for r in runs]
    return max(sorted(set(bounds)), key=bounds.count) if bounds else "?"


# -- result files ------------------------------------------------------------------

def machine_metadata() -> dict:
    """The provenance of a run (experiments.provenance), for scripts that write their own
    summary file."""
    from parallelnet.experiments import provenance

    return provenance.collect(os.environ.get("PARALLELNET_EXPERIMENT", ""),
                              os.environ.get("PARALLELNET_PRESET") or None)


def result_dir(name: str, root: str = "results", extra: dict | None = None) -> str:
    """``ROOT/<UTC stamp>-NAME/`` with ``meta.json`` (experiments.provenance + extra)."""
    preset = os.environ.get("PARALLELNET_PRESET")
    path = os.path.join(root, time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + name
                        + (f"-{preset}" if preset else ""))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({**machine_metadata(), "experiment": os.environ.get("PARALLELNET_EXPERIMENT") or name,
                   **(extra or {})}, f, indent=1)
    return path


def write_pyperf(path: str, series: dict[str, list[float]], metadata: dict | None = None) -> None:
    """One pyperf benchmark per series (values: seconds per request, lower is faster)."""
    import pyperf

    benches = []
    for name, values in series.items():
        if not values:
            continue
        meta = {"name": name, "unit": "second"}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        run = pyperf.Run(values, metadata=meta, collect_metadata=False)
        benches.append(pyperf.Benchmark([run]))
    if benches:
        pyperf.BenchmarkSuite(benches).dump(path, replace=True)
