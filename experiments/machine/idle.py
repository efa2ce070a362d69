"""The guest's CPU idle states, read and (for one run, as root) restricted to polling.

``/sys/devices/system/cpu/cpuN/cpuidle/stateK/{name,disable}`` (Documentation/admin-guide/
pm/cpuidle.rst): writing 1 to ``disable`` keeps the idle governor from choosing that state
on that CPU; the ``POLL`` state (a loop on ``need_resched``) cannot be disabled.  With every
other state disabled an idle vCPU never halts, so waking it needs no halt exit and no
host-side wake-up of the vCPU thread: a run so made separates what a virtual machine's
halting adds to a wake-up from what the design costs.  The polling is the idle task's, so
the CPU it burns is nobody's in schedstat (the server's and client's figures stay theirs);
the host sees busy vCPUs.

:class:`PollOnly` disables the states for the length of a ``with`` block and restores each
one's previous value afterwards, whatever ends the block; :func:`describe` says what is in
effect (recorded in every record's ``facts`` by experiments/machine and in a run's meta).
"""

from __future__ import annotations

import glob
import os

#: The sysfs root (tests point it at a fake tree).
SYSFS_CPU = "/sys/devices/system/cpu"


class IdleError(RuntimeError):
    """The idle states cannot be changed here (no cpuidle, or not root)."""


def _states(root: str) -> dict[str, list[tuple[str, str]]]:
    """{"cpu0": [(name, stateK directory), ...]} for every CPU with cpuidle states."""
    out: dict[str, list[tuple[str, str]]] = {}
    for cpu_dir in sorted(glob.glob(os.path.join(root, "cpu[0-9]*")),
                          key=lambda p: int(os.path.basename(p)[3:])):
        states = sorted(glob.glob(os.path.join(cpu_dir, "cpuidle", "state[0-9]*")),
                        key=lambda p: int(os.path.basename(p)[5:]))
        named = []
        for st in states:
            try:
                with open(os.path.join(st, "name")) as f:
                    named.append((f.read().strip(), st))
            except OSError:
                continue
        if named:
            out[os.path.basename(cpu_dir)] = named
    return out


def _read_disable(state_dir: str) -> str:
    with open(os.path.join(state_dir, "disable")) as f:
        return f.read().strip()


def describe(root: str | None = None) -> dict[str, list[str]]:
    """{"cpu0": ["POLL", "haltpoll (disabled)"], ...}; {} without cpuidle."""
    out = {}
    for cpu, states in _states(root or SYSFS_CPU).items():
        names = []
        for name, st in states:
            try:
                off = _read_disable(st) == "1"
            except OSError:
                off = False
            names.append(f"{name} (disabled)" if off else name)
        out[cpu] = names
    return out


class PollOnly:
    """``with PollOnly(): ...`` - every idle state but POLL disabled on every CPU, restored
    on exit.  Raises IdleError, having changed nothing, where that cannot be done."""

    def __init__(self, root: str | None = None) -> None:
        self.root = root or SYSFS_CPU
        self.saved: list[tuple[str, str]] = []

    def check(self) -> None:
        """Raise IdleError if the states could not be changed (no cpuidle, not writable),
        changing nothing: a run checks before it makes its results directory, and changes
        the states only once it holds the benchmark lock."""
        states = _states(self.root)
        if not states:
            raise IdleError(f"no cpuidle states under {self.root}: --idle poll needs cpuidle")
        for named in states.values():
            for name, st in named:
                if name != "POLL" and not os.access(os.path.join(st, "disable"), os.W_OK):
                    raise IdleError(f"cannot disable idle state {st}: not writable "
                                    "(--idle poll needs root)")

    def __enter__(self) -> "PollOnly":
        states = _states(self.root)
        if not states:
            raise IdleError(f"no cpuidle states under {self.root}: --idle poll needs cpuidle")
        targets = [st for named in states.values() for name, st in named if name != "POLL"]
        try:
            for st in targets:
                prev = _read_disable(st)
                with open(os.path.join(st, "disable"), "w") as f:
                    f.write("1")
                self.saved.append((st, prev))
        except OSError as exc:
            self._restore()
            raise IdleError(f"cannot disable idle state {st}: {exc.strerror} "
                            "(--idle poll needs root)") from None
        return self

    def _restore(self) -> None:
        while self.saved:
            st, prev = self.saved.pop()
            try:
                with open(os.path.join(st, "disable"), "w") as f:
                    f.write(prev)
            except OSError:
                pass   # nothing better to do; the state stays as it is, and describe() says so

    def __exit__(self, *exc) -> None:
        self._restore()
