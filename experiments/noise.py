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

Every file is read through core/procfs.py, the project's one parser of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from parallelnet.core import procfs
from parallelnet.core.procfs import all_processes, process_cpu_ns  # noqa: F401 - this module's face

NOISE_LIMIT = 0.05  # steal or others' CPU above 5% of one CPU over the window: noisy


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
        self.cpus, self.procs, self.t = procfs.cpu_jiffies(), all_processes(), time.monotonic()
        return self

    def stop(self) -> dict:
        cpus, procs, t = procfs.cpu_jiffies(), all_processes(), time.monotonic()
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
        ours = procfs.descendants(self.pids, {**self.procs, **procs})
        others = kthreads = 0
        for pid, st in procs.items():
            if pid in ours:
                continue
            before = self.procs.get(pid)
            used = st.utime + st.stime - (before.utime + before.stime if before else 0)
            if st.kthread:
                kthreads += used
            else:
                others += used
        steal = max((c["steal"] for c in per_cpu.values()), default=0.0)
        others_cpu = others / procfs.CLK_TCK / wall
        return {"wall_s": wall, "per_cpu": per_cpu, "steal_max": steal,
                "others_cpu": others_cpu, "kthreads_cpu": kthreads / procfs.CLK_TCK / wall,
                "ncpu": len(per_cpu), "noisy": steal > NOISE_LIMIT or others_cpu > NOISE_LIMIT}
