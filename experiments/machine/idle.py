"""The guest's CPU idle states, read and (for one run, as root) restricted to polling.

``/sys/devices/system/cpu/cpuN/cpuidle/stateK/{name,disable}`` (Documentation/admin-guide/
pm/cpuidle.rst): writing 1 to ``disable`` keeps the idle governor from choosing that state
on that CPU; the ``POLL`` state (a loop on ``need_resched``) cannot be disabled.  With every
other state disabled an idle vCPU never halts, so waking it needs no halt exit and no
host-side wake-up of the vCPU thread: a run so made separates what a virtual machine's
halting adds to a wake-up from what the design costs.  The polling is the idle task's, so
the CPU it burns is nobody's in schedstat (the server's and client's figures stay theirs);
the host sees busy vCPUs.

The per-state ``disable`` is not honoured by the ``haltpoll`` governor (the guest governor of a
KVM guest with the haltpoll driver), measured on this project's VM: its halt state's usage count
kept rising with the state disabled, and under ``menu`` it stopped (``teo`` and ``ladder`` check
``disable`` too, by their source in drivers/cpuidle/governors; not measured here).  So :class:`PollOnly` also switches the governor to one
that honours it (``/sys/devices/system/cpu/cpuidle/current_governor``), restores it after,
and checks that no state but POLL is entered any more before the run starts.

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


#: Governors that honour a state's ``disable`` (drivers/cpuidle/governors), best first.
HONOURING = ("menu", "teo", "ladder")


def _gov_path(root: str, name: str) -> str:
    return os.path.join(root, "cpuidle", name)


def governor(root: str | None = None) -> str | None:
    try:
        with open(_gov_path(root or SYSFS_CPU, "current_governor")) as f:
            return f.read().strip()
    except OSError:
        return None


def _usage(states: dict) -> dict[str, int]:
    out = {}
    for named in states.values():
        for name, st in named:
            if name != "POLL":
                try:
                    with open(os.path.join(st, "usage")) as f:
                        out[st] = int(f.read().strip() or 0)
                except (OSError, ValueError):
                    pass
    return out


def _read_disable(state_dir: str) -> str:
    with open(os.path.join(state_dir, "disable")) as f:
        return f.read().strip()


def describe(root: str | None = None) -> dict:
    """{"governor": "menu", "states": {"cpu0": ["POLL", "haltpoll (disabled)"], ...}};
    no states without cpuidle."""
    return {"governor": governor(root), "states": _describe_states(root)}


def _describe_states(root: str | None) -> dict[str, list[str]]:
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

    #: How long the check that only POLL is entered watches the usage counts (s), after
    #: SETTLE_S for a CPU that chose a state just before the change to wake from it.
    VERIFY_S = 0.2
    SETTLE_S = 0.05

    def __init__(self, root: str | None = None) -> None:
        self.root = root or SYSFS_CPU
        self.saved: list[tuple[str, str]] = []   # (file, previous content), restored in reverse

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
        self._target_governor()

    def _target_governor(self) -> str | None:
        """The governor to run under: the current one if it honours ``disable``, else the
        first available that does; IdleError if none is."""
        cur = governor(self.root)
        if cur is None or cur in HONOURING:
            return None
        try:
            with open(_gov_path(self.root, "available_governors")) as f:
                avail = f.read().split()
        except OSError:
            avail = []
        for g in HONOURING:
            if g in avail:
                if not os.access(_gov_path(self.root, "current_governor"), os.W_OK):
                    raise IdleError("cannot switch the cpuidle governor: not writable "
                                    "(--idle poll needs root)")
                return g
        raise IdleError(f"the cpuidle governor {cur!r} ignores disabled states and none that "
                        f"honours them is available ({' '.join(avail) or 'none listed'})")

    def _write(self, path: str, value: str) -> None:
        with open(path) as f:
            prev = f.read().strip()
        with open(path, "w") as f:
            f.write(value)
        self.saved.append((path, prev))

    def __enter__(self) -> "PollOnly":
        import time

        states = _states(self.root)
        if not states:
            raise IdleError(f"no cpuidle states under {self.root}: --idle poll needs cpuidle")
        gov = self._target_governor()
        targets = [st for named in states.values() for name, st in named if name != "POLL"]
        where = _gov_path(self.root, "current_governor")
        try:
            if gov:
                self._write(where, gov)
            for where in (os.path.join(st, "disable") for st in targets):
                self._write(where, "1")
        except OSError as exc:
            self._restore()
            raise IdleError(f"cannot write {where}: {exc.strerror} (--idle poll needs root)") from None
        # Did it take?  No state but POLL may be entered from now on (a CPU may still have
        # entered one while the change was being written: counted before the watch starts).
        time.sleep(self.SETTLE_S)
        before = _usage(states)
        time.sleep(self.VERIFY_S)
        entered = {st: n - before[st] for st, n in _usage(states).items()
                   if st in before and n > before[st]}
        if entered:
            self._restore()
            raise IdleError(f"idle states still entered with the governor {governor(self.root)!r}: "
                            + ", ".join(f"{st} +{n}" for st, n in sorted(entered.items())))
        return self

    def _restore(self) -> None:
        while self.saved:
            path, prev = self.saved.pop()
            try:
                with open(path, "w") as f:
                    f.write(prev)
            except OSError:
                pass   # nothing better to do; it stays as it is, and describe() says so

    def __exit__(self, *exc) -> None:
        self._restore()
