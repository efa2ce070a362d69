"""``parallelnet experiment machine``: the machine characterised from inside, as a run.

What the package measures (wake-up latency across CPUs after an idle gap and on one CPU,
timer overshoot, steal during the probe) repeated ``reps`` times, with the kernel's facts
and the list of what cannot be known, written like every other run (provenance, records,
summary, a figure), so a paper can pin it as the source of its threats section.  Each
record keeps the raw wake-up samples, so the summary and the figure rebuild from the
records alone.
"""

from __future__ import annotations

import os

from parallelnet.experiments import analysis, machine
from parallelnet.experiments.framework import (
    Context, Experiment, Plan, PlanNotes, Point, Summary, Table)


def plan(p: dict) -> Plan:
    cost_s = 2 * sum(us * k for us, k in machine.COST_PLAN) * 1e-6   # the wake-up cost probe, two CPUs
    points = [Point("probe", rep, {}, est_s=3 * p["samples"] * p["gap_us"] * 1e-6 + cost_s + 1)
              for rep in range(p["reps"])]
    return Plan(points, PlanNotes(["probe"], {}))


def run_point(point: Point, ctx: Context) -> dict:
    p = ctx.params
    return machine.probe(p["samples"], p["gap_us"], p["timer_samples"], seed=1 + point.rep * 7)


def _mr(vals: list[float]) -> str:
    m = analysis.median_range(vals)
    return f"{m['median']:.1f} ({m['min']:.1f}–{m['max']:.1f})" if m else "–"


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    s = Summary()
    dirs = list(dict.fromkeys(k for r in records for k in r["wake_latency"]))
    rows = []
    for d in dirs:
        per = [r["wake_latency"][d] for r in records if d in r["wake_latency"]]
        tail = [x["p99_us"] for x in per if "p99_us" in x]
        rows.append([d, str(sum(x["n"] for x in per)), _mr([x["p50_us"] for x in per]),
                     _mr([x["p90_us"] for x in per]), _mr(tail) if tail else "– (too few samples)",
                     _mr([x["max_us"] for x in per])])
        s.values[f"wake.{d}.p50_us"] = analysis.median_range([x["p50_us"] for x in per])
        if tail:
            s.values[f"wake.{d}.p99_us"] = analysis.median_range(tail)
    s.tables.append(Table(
        f"Wake-up latency after an idle gap of about {p['gap_us']} µs (eventfd, µs)",
        ["from->to", "samples", "p50", "p90", "p99", "max"], rows, key="wake",
        note="Median (min–max) over repetitions of each repetition's percentile; a percentile "
             "is printed only with 10 samples beyond it.  Across CPUs: the sleeping vCPU has "
             "halted and must be woken by an IPI the host delivers; on one CPU: a context switch."))
    trows = []
    for c in dict.fromkeys(k for r in records for k in r["timer_overshoot_100us"]):
        per = [r["timer_overshoot_100us"][c] for r in records if c in r["timer_overshoot_100us"]]
        trows.append([c, str(sum(x["n"] for x in per)), _mr([x["p50_us"] for x in per]),
                      _mr([x["p90_us"] for x in per]), _mr([x["max_us"] for x in per])])
    crows = []
    for c in dict.fromkeys(k for r in records for k in r.get("wake_cpu_us", {})):
        per = [r["wake_cpu_us"][c] for r in records if c in r.get("wake_cpu_us", {})]
        for us in dict.fromkeys(k for x in per for k in x):
            vals = [x[us] for x in per if us in x]
            crows.append([c, f"{int(us) / 1000:g} ms", _mr(vals)])
            s.values[f"wake_cpu.{c}.{us}"] = analysis.median_range(vals)
    if crows:
        s.tables.append(Table(
            "CPU charged to a thread per sleep and wake-up, by idle length (µs)",
            ["cpu", "idle", "µs per wake-up"], crows, key="wake_cpu",
            note="Median (min–max) over repetitions; a thread's own CPU clock over many "
                 "clock_nanosleeps.  Below saturation a server pays this once per wake-up "
                 "whatever its event interface: the floor of a CPU per request at a low rate."))
    steal = max((v for r in records for v in r["steal_during"].values()), default=0.0)
    f = records[0]["facts"] if records else {}
    s.tables.append(Table("A 100 µs timer sleep returns late by (µs)",
                          ["cpu", "samples", "p50", "p90", "max"], trows, key="timer",
                          note=f"The thread's timer slack ({(f.get('timer_slack_ns') or 0) / 1000:g} "
                               "µs) is part of it."))
    s.tables.append(Table("What the kernel says, and what cannot be known from inside",
                          ["item", "value"],
                          [["CPU model", str(f.get("model"))],
                           ["CPUs online / allowed", f"{f.get('cpus_online')} / {f.get('allowed_cpus')}"],
                           ["hypervisor flag", str(f.get("hypervisor_flag"))],
                           ["clocksource (available)",
                            f"{f.get('clocksource')} ({f.get('clocksources_available')})"],
                           ["idle driver / governor",
                            f"{f.get('cpuidle_driver')} / {f.get('cpuidle_governor')}"],
                           ["SMT siblings seen by the guest", str(f.get("smt_siblings"))],
                           ["kernel", str(f.get("kernel"))],
                           ["steal during the probes (max over CPUs and reps)", f"{steal:.1%}"]]
                          + [["cannot be known", u] for u in machine.UNKNOWABLE], key="facts"))
    s.values["steal_max"] = steal
    for d in dirs:
        m = s.values.get(f"wake.{d}.p50_us")
        if m:
            s.findings.append(f"wake-up {d}: p50 {m['median']:.1f} µs (reps {m['min']:.1f}–{m['max']:.1f})")
    return s


def figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    from parallelnet.experiments import plots

    series = {}
    for d in dict.fromkeys(k for r in records for k in r["wake_samples_ns"]):
        xs = sorted(v / 1000.0 for r in records for v in r["wake_samples_ns"].get(d, []))
        series[d] = xs
    if not series:
        return []
    return [plots.cdf(series, os.path.join(ctx.outdir, "wakeup.png"), "wake-up latency (µs, log)",
                      "Wake-up latency after an idle gap: across vCPUs and on one")]


EXPERIMENT = Experiment(
    name="machine",
    title="The machine from inside: vCPU wake-up latency, timer overshoot, steal, clocksource",
    presets={"smoke": dict(reps=1, samples=100, gap_us=100, timer_samples=50),
             "standard": dict(reps=3, samples=2000, gap_us=500, timer_samples=1000),
             "full": dict(reps=5, samples=5000, gap_us=500, timer_samples=2000)},
    plan=plan, run_point=run_point, summarize=summarize, figures=figures,
    description=__doc__.split("\n\n")[0],
    params_doc={"reps": "repetitions of the whole probe",
                "samples": "wake-ups per direction per repetition",
                "gap_us": "mean idle gap before each wake-up (µs)",
                "timer_samples": "100 µs sleeps per CPU per repetition"})
