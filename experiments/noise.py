"""Machine noise over a measured window, from /proc: how busy each CPU was, what stole it.

Kernel facts used here:

* ``/proc/stat`` ``cpuN`` lines count, per CPU, jiffies (``USER_HZ``, 100/s) spent in
  user, nice, system, idle, iowait, irq, softirq, steal...  Deltas over the measured
  window give how busy each CPU was, how much the hypervisor stole (``steal``), and how
  much went to softirq (on loopback, much of TCP's receive path).
* ``/proc/PID/stat`` fields 14/15 are that process's user/sys jiffies (all threads);
  field 4 its parent, field 9 its flags (``PF_KTHREAD``).  CPU used by user processes
  outside the server's and client's process trees is *others*: a run where others used
  a noticeable share is flagged, not averaged in.
* ``/proc/PID/task/TID/schedstat`` field 1: a thread's time on a CPU in ns
  (:func:`process_cpu_ns`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

_CLK_TCK = os.sysconf("SC_CLK_TCK")
NOISE_LIMIT = 0.05  # steal or others' CPU above 5% of one CPU over the window: noisy


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
