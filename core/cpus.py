"""CPU lists and pinning.

On Linux ``sched_setaffinity(0, …)`` applies to the *calling thread* only (the
syscall takes a thread id; 0 means "me"), so each worker pins itself from inside
its own thread.  A forked worker is a single thread at that moment and pins itself
the same way; threads it starts later inherit the mask.
"""

from __future__ import annotations

import os


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
                if hi < lo:
                    raise ValueError
                cpus.extend(range(lo, hi + 1))
            else:
                cpus.append(int(part))
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}: expected e.g. 0,2 or 0-3") from None
    if not cpus or min(cpus) < 0:
        raise ValueError(f"bad CPU list {text!r}: expected e.g. 0,2 or 0-3")
    return cpus


def assign_cpus(workers: int | None, cpus: list[int] | None) -> list[int]:
    """One CPU per worker: default one worker per allowed CPU; more workers wrap around."""
    allowed = allowed_cpus()
    if cpus is None:
        cpus = allowed
    outside = sorted(set(cpus) - set(allowed))
    if outside:
        raise ValueError(f"CPU(s) {outside} not in this process's affinity mask {allowed}")
    if workers is None:
        workers = len(cpus)
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    return [cpus[i % len(cpus)] for i in range(workers)]


def pin_current_thread(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
