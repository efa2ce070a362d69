"""What can be known about the machine from inside it, measured and read, for a run's threats.

The accept race is decided by wake-ups, and wake-ups are what a virtual machine perturbs:
a halted vCPU is woken by an IPI the host must deliver and a vCPU thread the host must
schedule.  From inside the guest we can *measure* how long that takes (``wake_latency``:
a thread blocked in ``read()`` on an eventfd, woken from another CPU after a random idle
gap) and how late a short timer sleep returns (``timer_overshoot``), and *read* what the
kernel says: steal time (``/proc/stat``), the clocksource, whether it runs under a
hypervisor (the CPUID ``hypervisor`` flag, DMI vendor), the idle driver (``haltpoll`` is
the guest-side poll-before-halt), topology, and the kernel command line.

What cannot be known from inside is listed as such in every report (``unknowable``): the
host's SMT siblings of our vCPUs, whether the vCPUs are pinned to host CPUs, host-side
halt-polling, and other tenants' load (steal shows only time we wanted and did not get).

``python -m parallelnet.experiments.machine [--json PATH]``
prints the report; experiments record it with their provenance.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

from parallelnet.experiments.machine import idle
from parallelnet.experiments.provenance import _read

UNKNOWABLE = [
    "whether host SMT siblings of our vCPUs run other work (the guest sees its own topology only)",
    "whether the vCPUs are pinned to host CPUs, and to which",
    "host-side halt-polling (kvm halt_poll_ns) and the host's idle and frequency policy",
    "other tenants' load, except as steal (time our vCPU was runnable and not running)",
]


def cpu_times() -> dict[str, list[int]]:
    """Per-CPU jiffies from /proc/stat: {"cpu0": [user, nice, system, idle, iowait, irq,
    softirq, steal, ...]} (proc(5))."""
    out = {}
    for line in (_read("/proc/stat") or "").splitlines():
        f = line.split()
        if f and f[0].startswith("cpu") and f[0] != "cpu":
            out[f[0]] = [int(x) for x in f[1:]]
    return out


def steal_fraction(before: dict, after: dict) -> dict[str, float]:
    """Steal (field 8 of a /proc/stat cpu line) as a fraction of each CPU's elapsed jiffies."""
    res = {}
    for cpu, a in after.items():
        b = before.get(cpu)
        if not b or len(a) < 8:
            continue
        total = sum(a) - sum(b)
        res[cpu] = (a[7] - b[7]) / total if total > 0 else 0.0
    return res


def facts() -> dict:
    """What the kernel says about the machine (nothing measured here)."""
    cpuinfo = _read("/proc/cpuinfo") or ""
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines()
                  if ln.startswith("flags")), [])
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")), None)
    siblings = sorted({_read(p) for p in glob.glob(
        "/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list")} - {None})
    return {
        "cpus_online": _read("/sys/devices/system/cpu/online"),
        "allowed_cpus": sorted(os.sched_getaffinity(0)),
        "model": model,
        "hypervisor_flag": "hypervisor" in flags,
        "dmi_vendor": _read("/sys/class/dmi/id/sys_vendor"),
        "dmi_product": _read("/sys/class/dmi/id/product_name"),
        "kernel": os.uname().release,
        "cmdline": _read("/proc/cmdline"),
        "clocksource": _read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        "clocksources_available": _read(
            "/sys/devices/system/clocksource/clocksource0/available_clocksource"),
        "cpuidle_driver": _read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "cpuidle_governor": _read("/sys/devices/system/cpu/cpuidle/current_governor_ro")
        or _read("/sys/devices/system/cpu/cpuidle/current_governor"),
        "cpuidle_states": idle.describe()["states"],   # the governor: cpuidle_governor
        "smt_siblings": siblings,
        "constant_tsc": "constant_tsc" in flags, "nonstop_tsc": "nonstop_tsc" in flags,
        # A sleep returns up to this late by design (prctl(2) PR_SET_TIMERSLACK; 50 µs default).
        "timer_slack_ns": int(_read("/proc/self/timerslack_ns") or 0) or None,
    }


def summarise_ns(samples: list[int]) -> dict:
    """Percentiles (µs) of latency samples in ns; tails are printed only with 10 samples
    beyond them (p99 needs 1,000 samples, p99.9 10,000)."""
    xs = sorted(samples)
    n = len(xs)

    def q(p: float) -> float:
        return xs[min(n - 1, int(p * n))] / 1000.0

    out = {"n": n, "min_us": xs[0] / 1000.0, "p50_us": q(0.50), "p90_us": q(0.90),
           "mean_us": statistics.fmean(xs) / 1000.0, "max_us": xs[-1] / 1000.0}
    if n * 0.01 >= 10:
        out["p99_us"] = q(0.99)
    if n * 0.001 >= 10:
        out["p99.9_us"] = q(0.999)
    return out


def _lib():
    try:
        from parallelnet.experiments.machine import _wakeup
    except ImportError as e:      # not built: the install compiles it (setup.py)
        raise RuntimeError(f"the machine probe is not built ({e}); reinstall the package") from e
    return _wakeup


def wake_latency(waker_cpu: int, sleeper_cpu: int, n: int = 2000, gap_us: int = 500,
                 seed: int = 1) -> list[int]:
    """n wake-up latencies in ns (wakeup.c)."""
    w = _lib()
    out = w.ffi.new("int64_t[]", n)
    rc = w.lib.wake_latency(waker_cpu, sleeper_cpu, n, gap_us, seed, out)
    if rc < 0:
        raise OSError(-rc, f"wake_latency({waker_cpu} -> {sleeper_cpu}): {os.strerror(-rc)}")
    return list(out)


def timer_overshoot(cpu: int, n: int = 1000, sleep_us: int = 100) -> list[int]:
    """n overshoots in ns of a clock_nanosleep(sleep_us) on cpu (wakeup.c)."""
    w = _lib()
    out = w.ffi.new("int64_t[]", n)
    rc = w.lib.timer_overshoot(cpu, n, sleep_us, out)
    if rc < 0:
        raise OSError(-rc, f"timer_overshoot(cpu {cpu}): {os.strerror(-rc)}")
    return list(out)


#: (sleep µs, sleeps) of the wake-up cost probe: about 0.55 s per CPU.
COST_PLAN = ((100, 500), (1000, 200), (10000, 30))


def wake_cpu_cost(cpu: int, n: int = 200, sleep_us: int = 1000) -> float:
    """The CPU time charged to a thread per sleep of sleep_us and its wake-up, in µs
    (wakeup.c: its own CPU clock over n sleeps, divided by n)."""
    w = _lib()
    out = w.ffi.new("int64_t *")
    rc = w.lib.wake_cpu_cost(cpu, n, sleep_us, out)
    if rc < 0:
        raise OSError(-rc, f"wake_cpu_cost(cpu {cpu}): {os.strerror(-rc)}")
    return out[0] / 1000.0 / n


def directions() -> list[tuple[int, int]]:
    """(waker CPU, sleeper CPU) pairs probed: across the first and last allowed CPU both
    ways when there are two or more, and on the first one."""
    cpus = sorted(os.sched_getaffinity(0))
    a, b = cpus[0], cpus[-1]
    return ([(a, b), (b, a)] if a != b else []) + [(a, a)]


def probe(n: int = 2000, gap_us: int = 500, timer_n: int = 1000, seed: int = 1,
          cost_plan=COST_PLAN) -> dict:
    """One probe with its raw wake-up samples (``wake_samples_ns``): the measurements of
    :func:`characterise` and the ``machine`` experiment's record.  ``wake_cpu_us``: per
    CPU, the CPU charged per sleep and wake-up after each idle length (µs of sleep as
    the key)."""
    before, t0 = cpu_times(), time.monotonic()
    samples = {f"cpu{w}->cpu{s}": wake_latency(w, s, n, gap_us, seed=seed + k)
               for k, (w, s) in enumerate(directions())}
    wakers = sorted({w for w, _ in directions()})
    timer = {f"cpu{c}": summarise_ns(timer_overshoot(c, timer_n)) for c in wakers}
    cost = {f"cpu{c}": {str(us): wake_cpu_cost(c, k, us) for us, k in cost_plan} for c in wakers}
    return {
        "wake_samples_ns": samples,
        "wake_cpu_us": cost,
        "wake_latency": {k: summarise_ns(v) for k, v in samples.items()},
        "wake_gap_us": gap_us,
        "timer_overshoot_100us": timer,
        "steal_during": steal_fraction(before, cpu_times()),
        "measured_s": round(time.monotonic() - t0, 2),
        "facts": facts(),
        "unknowable": UNKNOWABLE,
    }


def characterise(n: int = 2000, gap_us: int = 500, timer_n: int = 1000, cost_plan=COST_PLAN) -> dict:
    """The report: facts, measured wake-ups (:func:`directions`), timer overshoot, steal
    over the measurement, and what cannot be known (the probe without its raw samples).
    About n × (gap + latency) × 3 seconds: 3 s with the defaults."""
    r = probe(n, gap_us, timer_n, cost_plan=cost_plan)
    del r["wake_samples_ns"]
    return r


def format_report(r: dict) -> str:
    f = r["facts"]
    lines = [f"machine: {f['model']}, CPUs {f['cpus_online']} (allowed {f['allowed_cpus']}), "
             f"kernel {f['kernel']}",
             f"virtualised: hypervisor flag {'set' if f['hypervisor_flag'] else 'absent'}, "
             f"DMI {f['dmi_vendor'] or '?'} / {f['dmi_product'] or '?'}",
             f"clocksource {f['clocksource']} (available: {f['clocksources_available']}); "
             f"idle driver {f['cpuidle_driver']}, governor {f['cpuidle_governor']}; "
             f"SMT siblings as the guest sees them: {f['smt_siblings']}"]
    lines.append(f"wake-up latency after an idle gap of ~{r['wake_gap_us']} µs (eventfd, µs):")
    for k, s in r["wake_latency"].items():
        tail = f" p99 {s['p99_us']:.1f}" if "p99_us" in s else ""
        lines.append(f"  {k}: n={s['n']} min {s['min_us']:.1f} p50 {s['p50_us']:.1f} "
                     f"p90 {s['p90_us']:.1f}{tail} max {s['max_us']:.1f}")
    for k, s in r["timer_overshoot_100us"].items():
        lines.append(f"timer 100 µs sleep on {k}: late by p50 {s['p50_us']:.1f} µs, "
                     f"p90 {s['p90_us']:.1f}, max {s['max_us']:.1f} (n={s['n']}; the timer "
                     f"slack, {(f['timer_slack_ns'] or 0) / 1000:g} µs, is part of it)")
    for k, c in r.get("wake_cpu_us", {}).items():
        lines.append(f"CPU charged per sleep and wake-up on {k}: " + ", ".join(
            f"{v:.1f} µs after {int(us) / 1000:g} ms" for us, v in c.items())
            + " (a floor under any CPU per request measured below saturation)")
    lines.append("steal during the probe: " + ", ".join(
        f"{c} {v:.1%}" for c, v in sorted(r["steal_during"].items())))
    lines.append("cannot be known from inside: " + "; ".join(r["unknowable"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parallelnet.experiments.machine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000, help="wake-ups per direction (default 2000)")
    ap.add_argument("--gap-us", type=int, default=500, help="mean idle gap before each (default 500)")
    ap.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    a = ap.parse_args(argv)
    if a.samples < 1 or a.gap_us < 0:
        ap.error("--samples must be >= 1 and --gap-us >= 0")
    r = characterise(n=a.samples, gap_us=a.gap_us)
    print(format_report(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
