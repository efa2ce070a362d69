"""herd: is the lost accept race (EAGAIN) cheap?  The thundering herd vs N workers.

N = 1, 2, 4, 8, 16 workers share one listening socket (``shared``); the same N under
``reuseport`` (one queue per worker: no race) and ``dispatch`` (one acceptor: no race)
are the controls.  A fixed connection rate (open-loop churn: connect, one 64-byte echo,
close) so that every configuration does the same work; workers placed **packed** (all on
the first CPU, several per CPU for N > 1) and **spread** (round robin over the server
CPUs; on a 2-core box both CPUs, the client sharing the second).

Per point, over the measured window:

* lost races and listen wakeups per accept (the counters user space can see);
* **voluntary context switches per accept**, summed over the worker threads
  (``/proc/PID/task/TID/status``): a woken epoll waiter that finds the queue already
  drained goes back to sleep *inside* ``epoll_wait`` without returning, so it never shows
  as EAGAIN - but it did sleep and wake, and that shows here;
* **server CPU per connection** (every thread of the server, schedstat): what the herd
  costs in the end, whatever the counters see;
* Jain's index of the accept split.

io_uring: an accept that finds the queue empty arms a poll with EPOLLEXCLUSIVE inside the
kernel and retries when woken; a ring whose retry finds the queue empty stays armed, so
lost races are *unobservable* and its wake-ups are inside the kernel; context
switches per accept and CPU per connection remain comparable.
"""

from __future__ import annotations

import os
import statistics

from parallelnet.core.stats import jain_index
from parallelnet.experiments import analysis
from parallelnet.experiments.framework import (
    server_cpu_per_request,
    Context, Experiment, Point, Summary, Table, available_backends, rotated,
)
from parallelnet.experiments.imbalance import strategies_for
from parallelnet.experiments.measure import Layout

PLACEMENTS = ("packed", "spread")


def layout_for(placement: str, n: int) -> tuple[Layout, list[int]]:
    """(the layout, each worker's CPU).  Packed: every worker on the first server CPU."""
    base = Layout.default(1)
    cpus = sorted(os.sched_getaffinity(0))
    server = base.server if len(cpus) > 2 else cpus[:1]
    if placement == "packed":
        return Layout(server[:1], base.client), [server[0]] * n
    spread = server if len(cpus) > 2 else cpus   # 2 CPUs: both, the client shares the last
    return Layout(sorted(set(spread[i % len(spread)] for i in range(n))), base.client), \
        [spread[i % len(spread)] for i in range(n)]


def plan(p: dict) -> list[Point]:
    backends, skipped = available_backends(p["backends"])
    p["skipped"] = skipped
    cfgs = [(b, s) for b in backends for s in strategies_for(b, p["strategies"])]
    p["ran"] = [f"{b}/{s}" for b, s in cfgs]
    per = p["warmup"] + p["duration"] + 0.4
    points = []
    for rep in range(p["reps"]):
        for placement in p["placements"]:
            for n in p["workers"]:
                for b, s in rotated(cfgs, rep):
                    points.append(Point(f"{b}/{s}/{placement}/n={n}", rep,
                                        {"backend": b, "strategy": s, "placement": placement,
                                         "n": n}, est_s=per + 0.03 * n))
    return points


def run_point(point: Point, ctx: Context) -> dict:
    p, q = ctx.params, point.params
    layout, worker_cpus = layout_for(q["placement"], q["n"])
    args = ["--backend", q["backend"], "--accept", q["strategy"], "--workers", str(q["n"]),
            "--message-size", str(p["size"])]
    if q["strategy"] == "dispatch":
        args += ["--dispatch-policy", "round-robin", "--dispatch-cpu", str(worker_cpus[0])]
    # ctx.measure pins the workers with --cpus: a list of one CPU per worker (repeated
    # CPUs put several workers on one CPU, in order).
    srv_layout = Layout(worker_cpus, layout.client)
    rec = ctx.measure(args, {"mode": "churn", "rate": p["rate"], "connections": p["connections"],
                             "size": p["size"], "duration": p["duration"], "warmup": p["warmup"]},
                      srv_layout, point.label().replace("/", "_").replace(" ", "-"))
    rec["layout"] = {"server": sorted(set(worker_cpus)), "client": layout.client, "workers": worker_cpus}
    ws = rec.get("workers") or []
    acc = [w["accepted"] for w in ws]
    total = sum(acc)
    lost = [w["lost_races"] for w in ws]
    lwake = [w["listen_wakeups"] for w in ws]
    rec["accepts"] = total
    rec["jain"] = jain_index(acc) if acc else None
    rec["lost_per_accept"] = (None if not total or any(x is None for x in lost)
                              else sum(lost) / total)
    rec["listen_wakeups_per_accept"] = sum(lwake) / total if total and None not in lwake else None
    vol = rec["server"].get("voluntary_cs")
    rec["vcs_per_accept"] = sum(vol) / total if vol and total else None
    inv = rec["server"].get("involuntary_cs")
    rec["ics_per_accept"] = sum(inv) / total if inv and total else None
    return rec

def _med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(records: list[dict], p: dict) -> Summary:
    s = Summary()
    cfgs = p.get("ran") or sorted({f"{r['params']['backend']}/{r['params']['strategy']}" for r in records})
    for placement in p["placements"]:
        rows = []
        for cfg in cfgs:
            b, st = cfg.split("/", 1)
            for n in p["workers"]:
                rs = [r for r in records if r["config"] == f"{cfg}/{placement}/n={n}"]
                if not rs:
                    continue
                used, dropped, all_noisy = analysis.prefer_quiet(rs, lambda r: r["noise"]["noisy"])
                cpu = analysis.median_range(r["server"]["cpu_us_per_req"] for r in used)
                vals = {k: _med(r[k] for r in used) for k in
                        ("lost_per_accept", "listen_wakeups_per_accept", "vcs_per_accept",
                         "ics_per_accept", "jain")}
                rate = _med(r["rps"] for r in used)
                p99 = _med(r["client"]["latency_us"].get("p99") for r in used)
                met = all(r["client"]["rate_met"] for r in used)
                s.values[f"{cfg}.{placement}.n={n}"] = {"cpu": cpu, **vals, "conn_rate": rate, "p99": p99}
                rows.append([b, st, str(n), str(len(used)),
                             f"{cpu['median']:.1f} ({cpu['min']:.1f}–{cpu['max']:.1f})" if cpu else "–",
                             _f(vals["lost_per_accept"], ".3f"), _f(vals["listen_wakeups_per_accept"], ".2f"),
                             _f(vals["vcs_per_accept"], ".2f"), _f(vals["ics_per_accept"], ".2f"),
                             _f(vals["jain"], ".3f"), f"{rate:.0f}" + ("" if met else " (not met)"),
                             _f(p99, ".0f") + (" noisy" if all_noisy else "")])
        s.tables.append(Table(
            f"The herd, workers {placement}",
            ["backend", "strategy", "N", "n", "server µs/conn (min–max)", "lost/accept",
             "listen wakeups/accept", "voluntary cs/accept", "involuntary cs/accept", "Jain",
             "conn/s", "p99 µs"], rows,
            note="unobservable: io_uring's accepts wait inside the kernel, so a lost race never reaches "
                 "user space.",
            key=placement))
    # The herd's price: the shared socket against each race-free control, same N, paired.
    rows = []
    backends = sorted({c.split("/")[0] for c in cfgs})
    controls = [st for st in ("reuseport", "dispatch") if any(c.endswith("/" + st) for c in cfgs)]
    for placement in p["placements"]:
        for b in backends:
            if f"{b}/shared" not in cfgs:
                continue
            for ctrl in controls:
                if f"{b}/{ctrl}" not in cfgs:
                    continue
                cells = []
                for n in p["workers"]:
                    rr = _paired_cfgs(records, f"{b}/shared/{placement}/n={n}",
                                      f"{b}/{ctrl}/{placement}/n={n}")
                    s.values[f"vs.{b}.shared.{ctrl}.{placement}.n={n}"] = rr
                    cells.append(analysis.fmt_ratio(rr) if rr else "–")
                rows.append([b, placement, f"shared ÷ {ctrl}", *cells])
    if rows:
        s.tables.append(Table(
            "The price of the race: server CPU per connection, shared socket ÷ a race-free control",
            ["backend", "placement", "ratio"] + [f"N={n}" for n in p["workers"]], rows,
            note="Paired within each repetition (same N, same placement, back to back); median "
                 "[bootstrap 95% CI] n=pairs.", key="versus"))
    # Findings: CPU per connection at the largest N relative to N=1, shared vs controls.
    nmax, nmin = max(p["workers"]), min(p["workers"])
    for placement in p["placements"]:
        for cfg in cfgs:
            hi = s.values.get(f"{cfg}.{placement}.n={nmax}")
            lo = s.values.get(f"{cfg}.{placement}.n={nmin}")
            if hi and lo and hi["cpu"] and lo["cpu"]:
                ratio = _paired_growth(records, cfg, placement, nmax, nmin)
                s.values[f"growth.{cfg}.{placement}"] = ratio
                s.findings.append(
                    f"{cfg} {placement}: server CPU per connection {lo['cpu']['median']:.1f} µs at "
                    f"N={nmin} → {hi['cpu']['median']:.1f} µs at N={nmax}"
                    + (f" (×{ratio['median']:.2f} [{ratio['ci95'][0]:.2f}–{ratio['ci95'][1]:.2f}], "
                       f"n={ratio['n']})" if ratio else "")
                    + (f"; voluntary cs/accept {_f(lo['vcs_per_accept'], '.2f')} → "
                       f"{_f(hi['vcs_per_accept'], '.2f')}; lost races/accept "
                       f"{_f(lo['lost_per_accept'], '.3f')} → {_f(hi['lost_per_accept'], '.3f')}"))
    s.add_skipped(p.get("skipped"))
    return s


def _paired_cfgs(records, a: str, b: str):
    ra = {r["rep"]: r["server"]["cpu_us_per_req"] for r in records if r["config"] == a}
    rb = {r["rep"]: r["server"]["cpu_us_per_req"] for r in records if r["config"] == b}
    return analysis.ratio_summary(analysis.paired(ra, rb))


def _paired_growth(records, cfg, placement, n_hi, n_lo):
    hi = {r["rep"]: r["server"]["cpu_us_per_req"] for r in records if r["config"] == f"{cfg}/{placement}/n={n_hi}"}
    lo = {r["rep"]: r["server"]["cpu_us_per_req"] for r in records if r["config"] == f"{cfg}/{placement}/n={n_lo}"}
    return analysis.ratio_summary(analysis.paired(hi, lo))


def _f(x, spec):
    return "unobservable" if x is None else format(x, spec)


def figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    from parallelnet.experiments import plots

    p = ctx.params
    cfgs = p.get("ran") or []
    backends = sorted({c.split("/")[0] for c in cfgs})
    panels = [f"{b}, {pl}" for b in backends for pl in p["placements"]]
    cpu, vcs = {}, {}
    for cfg in cfgs:
        b, st = cfg.split("/", 1)
        for pl in p["placements"]:
            pts, vpts = [], []
            for n in p["workers"]:
                v = summary.values.get(f"{cfg}.{pl}.n={n}")
                if v and v["cpu"]:
                    pts.append((n, v["cpu"]["median"], v["cpu"]["min"], v["cpu"]["max"]))
                if v and v["vcs_per_accept"] is not None:
                    vpts.append((n, v["vcs_per_accept"], v["vcs_per_accept"], v["vcs_per_accept"]))
            cpu[f"{b}, {pl}|{st}"] = pts
            vcs[f"{b}, {pl}|{st}"] = vpts
    return [plots.lines(cpu, f"{ctx.outdir}/herd-cpu.png", "workers sharing the socket (N)",
                        "server CPU µs per connection", title="What the herd costs", panels=panels,
                        ncols=2),
            plots.lines(vcs, f"{ctx.outdir}/herd-cs.png", "workers (N)",
                        "voluntary context switches per accept", title="Sleeps and wake-ups per accept",
                        panels=panels, ncols=2)]


EXPERIMENT = Experiment(
    name="herd", title="Is the lost race cheap? The thundering herd vs the number of workers",
    presets={
        "smoke": dict(backends=["epoll"], strategies=["shared", "reuseport"], workers=[1, 4],
                      placements=["packed"], rate=500, connections=32, size=64, reps=1,
                      duration=0.8, warmup=0.3),
        "standard": dict(backends=["epoll", "uring", "native"],
                         strategies=["shared", "reuseport", "dispatch"], workers=[1, 2, 4, 8, 16],
                         placements=["packed", "spread"], rate=3000, connections=64, size=64,
                         reps=3, duration=1.5, warmup=0.5),
        "full": dict(backends=["epoll", "uring", "native", "select", "uvloop"],
                     strategies=["shared", "exclusive", "reuseport", "dispatch"],
                     workers=[1, 2, 4, 8, 16, 32], placements=["packed", "spread"], rate=3000,
                     connections=64, size=64, reps=5, duration=3.0, warmup=0.5),
    },
    plan=plan, run_point=run_point, summarize=summarize, figures=figures, pyperf_value=server_cpu_per_request,
    description="N = 1..16 workers on one socket vs reuseport and dispatch, packed and spread")
