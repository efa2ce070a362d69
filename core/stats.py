"""Per-worker counters, snapshots and the fairness arithmetic.

Each worker owns one ``WorkerStats`` and is its only writer, so the hot path is a
plain attribute increment with no lock.  Other threads only read: under CPython an
``int`` attribute read is atomic, so a snapshot taken from the outside is a consistent
value per counter (not across counters, which is fine for monitoring; final figures
are taken after the worker has stopped).

CPU time per worker comes from the kernel, never from wall-clock guesses:

* ``/proc/<pid>/task/<tid>/stat`` fields 14/15 (utime, stime, in clock ticks of
  ``SC_CLK_TCK``, usually 10 ms) and field 39 (the CPU the thread last ran on), read by
  ``core/procfs.py``.  Any thread of the process (or the parent of a forked worker, by
  pid) can read them.
* ``time.pthread_getcpuclockid`` of the worker thread: its total CPU time with ns
  resolution, readable from any thread of the same process.  Used for ``cpu_ns``,
  the precise figure an experiment divides by its request count.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from parallelnet.core import procfs

#: Counters every backend maintains (the hot-path ones first).
COUNTERS = (
    "requests",
    "bytes_in",
    "bytes_out",
    "wakeups",          # returns from the backend's wait (poll/epoll_wait/...)
    "listen_wakeups",   # wakeups in which a listening socket was reported ready
    "accepted",         # connections this worker won
    "lost_races",       # listen wakeups that found the accept queue already empty
                        # (None: not observable by this backend, see NOT_OBSERVABLE)
    "closed",           # connections closed (any reason)
    "refused",          # accepted then closed at once (over a limit, fd too high for select)
    "errors",           # connections that ended in an I/O error (reset, ...)
    "handler_errors",   # exceptions raised by protocol code (the connection is closed)
    "backpressure",     # times reading was paused because output exceeded the limit
)

#: The declared schema of ``WorkerStats.extra``: every worker starts with each of these at
#: 0, whatever its backend, so a record always has them (a rule a backend does not
#: exercise stays 0).  A backend adds only what is its own (io_uring kernel entries...).
#: Who counts what: core/accept.py (accept_*), core/handoff.py (handoff*),
#: core/policy.py (the per-connection rules), readiness.py (rotations).
EXTRA_COUNTERS = {
    "accept_errors": "accept(2) failures of any kind",
    "accept_backoffs": "times a listener was paused after EMFILE/ENFILE/ENOBUFS/ENOMEM",
    "idle_timeouts": "connections closed by --idle-timeout",
    "header_timeouts": "connections closed by the request deadline (--header-timeout, --header-min-rate)",
    "max_pending": "high-water mark of one connection's pending output (bytes)",
    "handoffs": "connections received from the dispatcher (--accept dispatch)",
    "handoff_lost": "hand-offs the kernel dropped (MSG_CTRUNC: out of fds)",
    "rotations": "listener re-adds of --accept exclusive-rotate",
    "output_holds": "times a protocol held answers back at its output budget (reading paused until they were pulled)",
    "alloc_failures": "connections closed because an answer could not be allocated",
}


#: Counters kept per listener id as well (``WorkerStats.per_listener``): which of this
#: worker's accepts, races and listen wakeups were on which address.
LISTENER_COUNTERS = ("accepted", "lost_races", "listen_wakeups")


#: The value of a counter a backend cannot observe (io_uring's lost accept races happen
#: inside the kernel and never complete): ``None``, never a 0 that reads as measured.
#: Sums and deltas that meet one are ``None`` too; tables print ``n/a``.
NOT_OBSERVABLE = None


def add_observable(values):
    """Sum of counters, ``None`` if any of them is not observable."""
    total = 0
    for v in values:
        if v is None:
            return None
        total += v
    return total


#: Worker extras that are a level or a running maximum, not a count, whatever the backend:
#: a measured window reports them as its last record had them (their difference would mean
#: nothing).  A backend declares its own (``WorkerStats.declare_levels``); every snapshot
#: names them all in ``extra_levels``, so a reader needs no list of any backend's names.
CORE_LEVEL_EXTRAS = frozenset({"max_pending"})


def delta_observable(before, after):
    """``after - before``, ``None`` if either is not observable."""
    return None if before is None or after is None else after - before


def fmt_observable(value) -> str:
    return "n/a" if value is None else str(value)


class ListenerStats:
    """One worker's counters for one listener id (one address).  Single writer: the worker.
    Under ``--accept dispatch`` ``accepted`` counts the hand-offs that came from that
    address (the worker never touches the listener: no wakeup, no race)."""

    __slots__ = LISTENER_COUNTERS

    def __init__(self) -> None:
        self.accepted = 0
        self.lost_races = 0
        self.listen_wakeups = 0

    def snapshot(self) -> dict:
        return {"accepted": self.accepted, "lost_races": self.lost_races,
                "listen_wakeups": self.listen_wakeups}


class WorkerStats:
    """Counters of one worker.  Single writer: the worker itself."""

    __slots__ = COUNTERS + ("index", "cpu", "pid", "tid", "ident", "affinity", "open",
                            "extra", "started", "stopped", "backend", "exit_cpu", "crashed",
                            "ready", "refresh", "per_listener", "per_listener_from_totals",
                            "levels")

    def __init__(self, index: int, cpu: int | None, backend: str = "",
                 listeners: int = 1) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        self.index = index
        self.cpu = cpu
        self.backend = backend
        self.pid = 0
        self.tid = 0
        self.ident = 0
        self.affinity: list[int] = []
        self.open = 0
        self.extra: dict[str, object] = dict.fromkeys(EXTRA_COUNTERS, 0)
        self.levels: set[str] = set(CORE_LEVEL_EXTRAS)   # extras that are levels, not counts
        self.started = 0.0
        self.stopped = 0.0
        self.exit_cpu: dict | None = None
        self.crashed = ""
        self.ready = 0.0        # monotonic time the worker's loop could first take a connection
        # A backend whose counters live elsewhere (in C) sets this to copy them in;
        # snapshot() calls it first, so readers always see live figures.
        self.refresh = None
        # Per listener id (LISTENER_COUNTERS), counted by a backend that serves several
        # addresses.  One that serves one (``Backend.max_listeners`` 1) does not count
        # them: the core sets ``per_listener_from_totals`` and its only listener's
        # figures are the worker's own, by definition.
        self.per_listener = [ListenerStats() for _ in range(listeners)]
        self.per_listener_from_totals = False

    def declare_levels(self, *names: str) -> None:
        """Extras of this backend that are a level or a running maximum (a budget, a
        measured rate, a high-water mark) rather than a count: a window over two records
        takes the last value, not the difference."""
        self.levels.update(names)

    def bind_current_thread(self) -> None:
        """Record which OS thread runs this worker (call from inside it)."""
        import threading

        self.pid = os.getpid()
        self.tid = threading.get_native_id()
        self.ident = threading.get_ident()
        self.affinity = sorted(os.sched_getaffinity(0))
        self.started = time.monotonic()

    def mark_ready(self) -> None:
        """The backend calls this once its sources of connections (listeners, hand-off
        channel) are registered with the kernel, right before its first wait: from then
        on a new connection can wake it.  ``Server.start`` returns only when every worker
        has, so no worker begins a measurement late or misses the first accept races."""
        if not self.ready:
            self.ready = time.monotonic()

    def record_exit(self) -> None:
        """Keep the thread's final CPU figures (call from inside it, last thing):
        once the thread is gone, /proc no longer has them."""
        import resource

        self.stopped = time.monotonic()
        cpu = thread_cpu(self.pid, self.tid, self.ident)
        ru = resource.getrusage(resource.RUSAGE_THREAD)  # microsecond resolution
        cpu.update(user_s=ru.ru_utime, sys_s=ru.ru_stime,
                   cpu_ns=time.thread_time_ns(), alive=False)
        self.exit_cpu = cpu

    def snapshot(self) -> dict:
        """A plain dict of every counter plus kernel CPU figures for the thread."""
        if self.refresh is not None:
            self.refresh()
        snap = {name: getattr(self, name) for name in COUNTERS}
        snap.update(
            index=self.index, cpu=self.cpu, backend=self.backend, pid=self.pid,
            tid=self.tid, affinity=list(self.affinity), open=self.open,
            extra=dict(self.extra), extra_levels=sorted(self.levels), crashed=self.crashed, ready=bool(self.ready),
            per_listener=self.listener_snapshot(),
            elapsed=(self.stopped or time.monotonic()) - self.started if self.started else 0.0,
        )
        snap.update(self.exit_cpu if self.exit_cpu is not None
                    else thread_cpu(self.pid, self.tid, self.ident))
        return snap


    def listener_snapshot(self) -> list[dict]:
        if self.per_listener_from_totals:
            return [{name: getattr(self, name) for name in LISTENER_COUNTERS}]
        return [pl.snapshot() for pl in self.per_listener]


def thread_cpu(pid: int, tid: int, ident: int = 0) -> dict:
    """Kernel view of one thread: user/sys seconds, precise total, last CPU.

    Returns zeros (and ``alive=False``) once the thread has exited.
    """
    out = {"user_s": 0.0, "sys_s": 0.0, "cpu_ns": 0, "last_cpu": None, "alive": False}
    if not tid:
        return out
    stat = procfs.read_stat(pid, tid)
    if stat is None:
        return out
    out["user_s"] = stat.user_s
    out["sys_s"] = stat.sys_s
    out["last_cpu"] = stat.processor
    out["alive"] = True
    if ident and pid == os.getpid():
        try:
            out["cpu_ns"] = time.clock_gettime_ns(time.pthread_getcpuclockid(ident))
        except (OSError, OverflowError, ValueError):
            pass
    if not out["cpu_ns"]:
        out["cpu_ns"] = int((out["user_s"] + out["sys_s"]) * 1e9)
    return out


# ---------------------------------------------------------------------------
# Fairness arithmetic.

def jain_index(values) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1.0 = perfectly even, 1/n = one
    took all.  The project's only implementation (the server's table, the load
    generator, the experiments all call this one).

    Empty or all-zero input returns ``float('nan')``: with nothing shared there is no
    fairness to speak of, and any number (1.0 "fair", 0.0 "unfair") would be read as a
    finding.  Printers show it as "n/a" (:func:`fmt_jain`)."""
    values = list(values)
    squares = sum(v * v for v in values)
    if not squares:
        return float("nan")
    total = sum(values)
    return total * total / (len(values) * squares)


def fmt_jain(value: float, spec: str = ".3f") -> str:
    """A Jain index for a table: "n/a" where it is undefined (nan)."""
    return "n/a" if math.isnan(value) else format(value, spec)


def max_min_ratio(values) -> float:
    """max/min share; ``inf`` when some worker got nothing while another got something."""
    values = list(values)
    if not values or max(values) == 0:
        return 1.0
    low = min(values)
    return float("inf") if low == 0 else max(values) / low


@dataclass
class Fairness:
    total: int
    max_min: float
    jain: float
    shares: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values) -> "Fairness":
        values = list(values)
        total = sum(values)
        shares = [v / total if total else 0.0 for v in values]
        return cls(total, max_min_ratio(values), jain_index(values), shares)


def listener_totals(snaps: list[dict]) -> list[dict]:
    """Per listener id, summed over the workers (lost races ``None`` if not observable)."""
    count = max((len(s.get("per_listener") or ()) for s in snaps), default=0)
    out = []
    for lid in range(count):
        rows = [s["per_listener"][lid] for s in snaps if lid < len(s.get("per_listener") or ())]
        out.append({"accepted": sum(r["accepted"] for r in rows),
                    "lost_races": add_observable(r["lost_races"] for r in rows),
                    "listen_wakeups": sum(r["listen_wakeups"] for r in rows)})
    return out


def format_listeners(snaps: list[dict], labels: list[str]) -> list[str]:
    """One line per listener id: its accepts, lost races and listen wakeups, per worker
    (w0/w1/...) and in total; ``labels[i]`` names listener i (address, protocol)."""
    lines = []
    for lid, total in enumerate(listener_totals(snaps)):
        per = [s["per_listener"][lid] for s in snaps]
        label = labels[lid] if lid < len(labels) else ""
        lines.append(
            f"listener {lid} {label}: accepted {'/'.join(str(r['accepted']) for r in per)} "
            f"(total {total['accepted']}), lost "
            f"{'/'.join(fmt_observable(r['lost_races']) for r in per)} "
            f"(total {fmt_observable(total['lost_races'])}), listen wakeups "
            f"{'/'.join(str(r['listen_wakeups']) for r in per)}")
    return lines


def format_table(snaps: list[dict], elapsed: float | None = None,
                 listeners: list[str] | None = None) -> str:
    """The per-worker table, in the spirit of ``ps -L -o pid,tid,psr,pcpu``."""
    head = (f"{'wk':>3} {'pid':>7} {'tid':>7} {'cpu':>3} {'psr':>3} {'%cpu':>5} "
            f"{'user_s':>7} {'sys_s':>7} {'accepted':>8} {'lost':>6} {'wakeups':>8} "
            f"{'lwake':>7} {'requests':>9} {'bytes_in':>10} {'bytes_out':>10} {'open':>5}")
    lines = [head]
    for s in snaps:
        cpu_s = s["cpu_ns"] / 1e9
        pcpu = f"{100 * cpu_s / elapsed:5.1f}" if elapsed else "    -"
        psr = s["last_cpu"] if s["last_cpu"] is not None else "-"
        lines.append(
            f"{s['index']:>3} {s['pid']:>7} {s['tid']:>7} {str(s['cpu']):>3} {psr:>3} {pcpu} "
            f"{s['user_s']:>7.2f} {s['sys_s']:>7.2f} {s['accepted']:>8} {fmt_observable(s['lost_races']):>6} "
            f"{s['wakeups']:>8} {s['listen_wakeups']:>7} {s['requests']:>9} {s['bytes_in']:>10} "
            f"{s['bytes_out']:>10} {s['open']:>5}")
    for name in ("accepted", "requests"):
        fair = Fairness.of(s[name] for s in snaps)
        lines.append(f"{name}: total {fair.total}, max/min {fair.max_min:.2f}, "
                     f"Jain {fmt_jain(fair.jain)}, shares "
                     + "/".join(f"{100 * x:.0f}%" for x in fair.shares))
    lost = add_observable(s["lost_races"] for s in snaps)
    lwake = sum(s["listen_wakeups"] for s in snaps)
    if lwake and lost is None:
        lines.append(f"accept races: {lwake} listen wakeups, lost n/a (not observable: "
                     "the kernel retries a lost accept itself)")
    elif lwake:
        lines.append(f"accept races: {lwake} listen wakeups, {lost} lost "
                     f"({100 * lost / lwake:.1f}%)")
    if listeners and len(listeners) > 1:
        # With one address the worker columns above are that listener's already.
        lines += format_listeners(snaps, listeners)
    return "\n".join(lines)
