"""CPU lists and pinning.

On Linux ``sched_setaffinity(0, …)`` applies to the *calling thread* only (the
syscall takes a thread id; 0 means "me"), so each worker pins itself from inside
its own thread.  A forked worker is a single thread at that moment and pins itself
the same way; threads it starts later inherit the mask.
"""

from __future__ import annotations

import os

#: The largest CPU number a list may name (Linux's CONFIG_NR_CPUS is at most 8192).
MAX_CPU = 8191
#: Workers per CPU at most (``--workers`` is refused above this many per CPU it runs on,
#: and above ``MAX_WORKERS`` in all): each worker is a thread or process with its own
#: loop, and thousands of them only measure the scheduler.  The herd experiment's 32
#: workers on one CPU are well within it.
WORKERS_PER_CPU = 64
MAX_WORKERS = 1024


def allowed_cpus() -> list[int]:
    """CPUs in this process's affinity mask (what ``taskset`` or a cgroup left us)."""
    return sorted(os.sched_getaffinity(0))


def parse_cpu_list(text: str) -> list[int]:
    """Parse ``taskset``-style lists: ``"0"``, ``"0,2"``, ``"0-3,8"``.  Order is kept."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo or lo < 0:
                    raise ValueError
            else:
                lo = hi = int(part)
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}: expected e.g. 0,2 or 0-3") from None
        if lo < 0 or hi > MAX_CPU:
            raise ValueError(f"bad CPU list {text!r}: CPU numbers are 0..{MAX_CPU}")
        cpus.extend(range(lo, hi + 1))
    if not cpus:
        raise ValueError(f"bad CPU list {text!r}: expected e.g. 0,2 or 0-3")
    return cpus


def format_cpu_list(cpus) -> str:
    """The short ``taskset`` spelling of a set of CPUs: ``0-3,8`` (sorted, no repeats)."""
    out: list[str] = []
    values = sorted(set(cpus))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)


def check_in_mask(cpus, what: str) -> None:
    """ValueError, in one short line, if any of ``cpus`` is outside the affinity mask."""
    allowed = allowed_cpus()
    outside = sorted(set(cpus) - set(allowed))
    if outside:
        raise ValueError(f"{what}: CPU{'s' if len(outside) > 1 else ''} "
                         f"{format_cpu_list(outside)} not in this process's affinity mask "
                         f"({format_cpu_list(allowed)})")


def max_workers(cpus: list[int] | None = None) -> int:
    """The most workers ``--workers`` accepts over ``cpus`` (default: the affinity mask)."""
    distinct = len(set(cpus if cpus is not None else allowed_cpus()))
    return min(MAX_WORKERS, WORKERS_PER_CPU * max(1, distinct))


def assign_cpus(workers: int | None, cpus: list[int] | None) -> list[int]:
    """One CPU per worker: default one worker per allowed CPU; more workers wrap around."""
    if cpus is None:
        cpus = allowed_cpus()
    check_in_mask(cpus, "--cpus")
    if workers is None:
        workers = len(cpus)
    limit = max_workers(cpus)
    if not 1 <= workers <= limit:
        raise ValueError(f"--workers must be 1..{limit} ({WORKERS_PER_CPU} per CPU, at most "
                         f"{MAX_WORKERS}), got {workers}")
    return [cpus[i % len(cpus)] for i in range(workers)]


def pin_current_thread(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
