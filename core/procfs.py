"""The project's one reader of ``/proc``: task stat lines, schedstat, status, per-CPU jiffies.

Every figure the server's table and the experiments take from the kernel comes through
here, so each format is parsed once (proc(5)):

* ``/proc/PID/stat`` and ``/proc/PID/task/TID/stat``: one line, fields separated by
  spaces.  Field 2, ``(comm)``, is the command name in parentheses, and the name may
  itself contain spaces and parentheses (``prctl(PR_SET_NAME)`` takes any bytes but NUL:
  ``a) b (c``).  The only reliable split is after the *last* ``)``: everything after it
  is fields 3.. (no later field can hold a parenthesis).  Used here: 3 state, 4 ppid,
  9 flags (``PF_KTHREAD``), 14/15 utime/stime (clock ticks, ``SC_CLK_TCK``, sampled at the
  tick), 39 processor (the CPU the task last ran on).  For ``/proc/PID/stat`` utime and
  stime cover every thread the process ever had.
* ``/proc/PID/task/TID/schedstat``: ``run_ns wait_ns timeslices``; the first is the
  task's time on a CPU in ns, exact (not sampled).
* ``/proc/PID/task/TID/status``: ``voluntary_ctxt_switches`` (the thread slept) and
  ``nonvoluntary_ctxt_switches`` (it was preempted).
* ``/proc/stat``: ``cpu`` and ``cpuN`` lines, jiffies (``USER_HZ``) in user, nice,
  system, idle, iowait, irq, softirq, steal, guest, guest_nice.

A task or process that exits between listing and reading is not an error: readers return
None (or zeros, where a sum is wanted) for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000   # task flag (stat field 9): a kernel thread


@dataclass(frozen=True)
class TaskStat:
    """The fields of one stat line this project uses (numbering as in proc(5))."""

    pid: int          # 1
    comm: str         # 2, without its parentheses
    state: str        # 3
    ppid: int         # 4
    flags: int        # 9
    utime: int        # 14, clock ticks
    stime: int        # 15, clock ticks
    processor: int    # 39
    minflt: int = 0   # 10, minor page faults (the whole process in /proc/PID/stat)
    majflt: int = 0   # 12, major page faults

    @property
    def user_s(self) -> float:
        return self.utime / CLK_TCK

    @property
    def sys_s(self) -> float:
        return self.stime / CLK_TCK

    @property
    def kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_stat(raw: bytes | str) -> TaskStat:
    """One ``stat`` line.  ``ValueError`` if it is not one (too few fields, no comm)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    head, sep, tail = raw.rpartition(b")")
    pid_text, paren, comm = head.partition(b" (")
    if not sep or not paren:
        raise ValueError(f"not a /proc stat line: {raw[:80]!r}")
    fields = tail.split()
    if len(fields) < 37:
        raise ValueError(f"a /proc stat line with {len(fields) + 2} fields, expected at least 39")
    # fields[0] is field 3 (state): field N is fields[N - 3].
    return TaskStat(pid=int(pid_text), comm=comm.decode("utf-8", "replace"),
                    state=fields[0].decode(), ppid=int(fields[1]), flags=int(fields[6]),
                    utime=int(fields[11]), stime=int(fields[12]), processor=int(fields[36]),
                    minflt=int(fields[7]), majflt=int(fields[9]))


def _task_dir(pid: int, tid: int | None) -> str:
    return f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"


def read_stat(pid: int, tid: int | None = None) -> TaskStat | None:
    """``/proc/PID/stat`` (the process), or ``/proc/PID/task/TID/stat`` (one thread);
    None once it is gone."""
    try:
        with open(_task_dir(pid, tid) + "/stat", "rb") as f:
            return parse_stat(f.read())
    except (OSError, ValueError):
        return None


def tasks(pid: int) -> list[int]:
    """The thread ids of ``pid`` (kernel threads of its io_uring included); [] once it is gone."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def parse_schedstat(text: str) -> int:
    """The first field of a ``schedstat`` line: time on a CPU, ns."""
    return int(text.split()[0])


def schedstat_ns(pid: int, tid: int) -> int:
    """Time thread ``tid`` of ``pid`` has run, ns (schedstat); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return parse_schedstat(f.read())
    except (OSError, ValueError, IndexError):
        return 0


def process_cpu_ns(pid: int) -> int:
    """CPU time of every live thread of ``pid``, ns: schedstat summed over its tasks.
    Differenced around a window it counts a whole server process (acceptor, main thread,
    workers, SQPOLL/io-wq tasks), where ``WorkerStats.cpu_ns`` counts one worker thread."""
    return sum(schedstat_ns(pid, tid) for tid in tasks(pid))


def parse_ctx_switches(lines) -> tuple[int, int]:
    """(voluntary, nonvoluntary) context switches from the lines of a ``status`` file."""
    vol = inv = 0
    for line in lines:
        if line.startswith("voluntary_ctxt_switches"):
            vol = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches"):
            inv = int(line.split()[1])
    return vol, inv


def ctx_switches(pid: int, tid: int) -> tuple[int, int]:
    """(voluntary, nonvoluntary) context switches of one thread; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            return parse_ctx_switches(f)
    except (OSError, ValueError, IndexError):
        return 0, 0


def parse_cpu_jiffies(lines) -> dict[str, list[int]]:
    """``{"cpu": [...], "cpu0": [...], ...}`` from the lines of ``/proc/stat``."""
    out = {}
    for line in lines:
        if line.startswith("cpu"):
            name, *vals = line.split()
            out[name] = [int(v) for v in vals]
    return out


def cpu_jiffies() -> dict[str, list[int]]:
    """``/proc/stat``'s per-CPU jiffies (and the ``cpu`` total line)."""
    with open("/proc/stat") as f:
        return parse_cpu_jiffies(f)


def all_processes() -> dict[int, TaskStat]:
    """pid -> its ``/proc/PID/stat`` for every process now (those that exit meanwhile are
    left out)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                out[st.pid] = st
    return out


def descendants(roots, procs: dict[int, TaskStat]) -> set[int]:
    """``roots`` and every process below them in ``procs`` (pid -> stat)."""
    ours = set(roots)
    grew = True
    while grew:  # a process tree is shallow: a few passes
        grew = False
        for pid, st in procs.items():
            if st.ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return ours
