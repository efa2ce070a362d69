"""herd: is the lost accept race (EAGAIN) cheap?  The thundering herd vs N workers.

N = 1, 2, 4, ... workers share one listening socket (``shared``); the same N under
``reuseport`` (one queue per worker: no race) and ``dispatch`` (one acceptor: no race) are
the controls.  Open-loop churn (connect, one 64-byte echo, close) at fixed connection
rates, from light up towards what the server can take, so that every configuration does
the same work at each rate; workers as **threads** of one process and as forked
**processes** (no GIL shared between them, so the herd's cost is the kernel's and the
loops', not the interpreter lock's hand-offs); placed **packed** (all on the first CPU:
the herd shares one CPU, the client has its own) and, optionally, **spread**.

Per point, over the measured window:

* lost races and listen wakeups per accept (the counters user space can see);
* **voluntary context switches per accept**, summed over the worker threads
  (``/proc/PID/task/TID/status``): a woken epoll waiter that finds the queue already
  drained goes back to sleep *inside* ``epoll_wait`` without returning, so it never shows
  as EAGAIN - but it did sleep and wake, and that shows here;
* **server CPU per connection** (every thread of the server, schedstat): what the herd
  costs in the end, whatever the counters see;
* Jain's index of the accept split.

And across N, per repetition: the least-squares slope of server CPU per connection against
voluntary context switches per connection - the **absolute cost of one extra wake-up** in
µs (analysis.slope_summary: a 95% interval from 8 repetitions on).  Ratios against a
control pair the two configurations within each repetition and use only repetitions in
which neither point was client- or both-bound (a saturated client ranks the client).

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
from parallelnet.experiments.analysis import UNRANKABLE
from parallelnet.experiments.framework import (
    Context, Experiment, Plan, PlanNotes, Point, Summary, Table, add_aa_twin, rotated,
    server_cpu_per_request, strategy_configs,
)
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




def point_config(cfg: str, placement: str, rate: float, n: int) -> str:
    return f"{cfg}/{placement}/rate={rate:g}/n={n}"


def plan(p: dict) -> Plan:
    _, notes = strategy_configs(p["backends"], p["strategies"], p["modes"])
    cfgs = notes.ran   # backend/mode/strategy
    per = p["warmup"] + p["duration"] + 0.5
    points = []
    for rep in range(p["reps"]):
        for placement in p["placements"]:
            for rate in p["rates"]:
                for n in p["workers"]:
                    for cfg in rotated(cfgs, rep):
                        b, m, st = cfg.split("/")
                        points.append(Point(point_config(cfg, placement, rate, n), rep,
                                            {"backend": b, "mode": m, "strategy": st,
                                             "placement": placement, "rate": rate, "n": n},
                                            est_s=per + (0.05 if m == "thread" else 0.08) * n))
    return Plan(add_aa_twin(points, p.get("aa")), notes)


def run_point(point: Point, ctx: Context) -> dict:
    p, q = ctx.params, point.params
    layout, worker_cpus = layout_for(q["placement"], q["n"])
    args = ["--backend", q["backend"], "--accept", q["strategy"], "--workers", str(q["n"]),
            "--mode", q.get("mode", "thread"), "--message-size", str(p["size"])]
    if q["strategy"] == "dispatch":
        args += ["--dispatch-policy", "round-robin", "--dispatch-cpu", str(worker_cpus[0])]
    # ctx.measure pins the workers with --cpus: a list of one CPU per worker (repeated
    # CPUs put several workers on one CPU, in order).
    srv_layout = Layout(worker_cpus, layout.client)
    rec = ctx.measure(args, {"mode": "churn", "rate": q.get("rate", p.get("rate")),
                             "connections": p["connections"],
                             "size": p["size"], "duration": p["duration"], "warmup": p["warmup"]},
                      srv_layout, point.label().replace("/", "_").replace(" ", "-").replace("~", "-"))
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


def _rankable(r: dict) -> bool:
    return r["bound"] not in UNRANKABLE


def _per_conn(records, config: str) -> dict:
    """{rep: server CPU µs per connection} of the rankable points of one configuration."""
    return {r["rep"]: r["server"]["cpu_us_per_req"] for r in records
            if r["config"] == config and _rankable(r)}


#: Voluntary context switches per connection must span at least this much across N for
#: the wake-up cost to be fitted.
MIN_WAKEUP_SPREAD = 0.5


def wakeup_cost(records: list[dict], cfg: str, placement: str, rate: float,
                workers: list[int]) -> dict | None:
    """The absolute cost of a wake-up: per repetition, the least-squares slope of server CPU
    per connection (µs) against voluntary context switches per connection across N (only
    rankable points), summarised across repetitions."""
    series = []
    for rep in sorted({r["rep"] for r in records}):
        xs, ys = [], []
        for n in workers:
            for r in records:
                if (r["config"] == point_config(cfg, placement, rate, n) and r["rep"] == rep
                        and _rankable(r) and r.get("vcs_per_accept") is not None
                        and r["server"]["cpu_us_per_req"] is not None):
                    xs.append(r["vcs_per_accept"])
                    ys.append(r["server"]["cpu_us_per_req"])
        # A slope needs the wake-ups to vary with N: under a race-free control they do not
        # (one wake-up per accept at every N), and a fit through a cloud would be noise.
        if len(xs) >= 2 and max(xs) - min(xs) >= MIN_WAKEUP_SPREAD:
            series.append((xs, ys))
    return analysis.slope_summary(series)


def upgrade(records: list[dict], p: dict, notes: PlanNotes) -> None:
    """Runs from before modes and rate sweeps (2026-11): thread mode, one rate; their
    records are renamed in place to today's configuration names."""
    if "rates" in p:
        return
    p["rates"] = [p["rate"]]
    notes.ran = [f"{c.split('/')[0]}/thread/{c.split('/', 1)[1]}" for c in notes.ran]
    for r in records:
        q = r["params"]
        q.setdefault("mode", "thread")
        q.setdefault("rate", p["rate"])
        r["config"] = point_config(f"{q['backend']}/{q['mode']}/{q['strategy']}", q["placement"],
                                   q["rate"], q["n"])


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    s = Summary()
    upgrade(records, p, notes)
    cfgs = notes.ran or sorted({"/".join((r["params"]["backend"], r["params"].get("mode", "thread"),
                                             r["params"]["strategy"])) for r in records})
    rates = p.get("rates") or [p.get("rate")]
    for placement in p["placements"]:
        rows = []
        for cfg in cfgs:
            b, m, st = cfg.split("/")
            for rate in rates:
                for n in p["workers"]:
                    rs = [r for r in records if r["config"] == point_config(cfg, placement, rate, n)]
                    if not rs:
                        continue
                    used, dropped, all_noisy = analysis.prefer_quiet(rs, lambda r: r["noise"]["noisy"])
                    cpu = analysis.median_range(r["server"]["cpu_us_per_req"] for r in used)
                    vals = {k: _med(r[k] for r in used) for k in
                            ("lost_per_accept", "listen_wakeups_per_accept", "vcs_per_accept",
                             "ics_per_accept", "jain")}
                    achieved = _med(r["rps"] for r in used)
                    p99 = _med(r["client"]["latency_us"].get("p99") for r in used)
                    # churn: one latency sample per connection
                    samples = analysis.fewest_samples(analysis.latency_samples(r) for r in used)
                    met = all(r["client"]["rate_met"] for r in used)
                    bound = analysis.row_bound([r["bound"] for r in used])
                    s.values[f"{cfg}.{placement}.rate={rate:g}.n={n}"] = {
                        "cpu": cpu, **vals, "conn_rate": achieved, "p99": p99, "bound": bound,
                        "samples": samples}
                    rows.append([b, m, st, f"{rate:g}", str(n), str(len(used)),
                                 f"{cpu['median']:.1f} ({cpu['min']:.1f}–{cpu['max']:.1f})" if cpu else "–",
                                 _f(vals["lost_per_accept"], ".3f"), _f(vals["listen_wakeups_per_accept"], ".2f"),
                                 _f(vals["vcs_per_accept"], ".2f"), _f(vals["ics_per_accept"], ".2f"),
                                 _f(vals["jain"], ".3f"), f"{achieved:.0f}" + ("" if met else " (not met)"),
                                 analysis.fmt_tail(p99, samples, 99),
                                 bound + (", noisy" if all_noisy else "")])
        s.tables.append(Table(
            f"The herd, workers {placement}",
            ["backend", "mode", "strategy", "conn/s offered", "N", "n", "server µs/conn (min–max)",
             "lost/accept", "listen wakeups/accept", "voluntary cs/accept", "involuntary cs/accept",
             "Jain", "conn/s", "p99 µs", "bound"], rows,
            note="unobservable: io_uring's accepts wait inside the kernel, so a lost race never reaches "
                 "user space.  p99: connect, one echo and close, from the intended connect time.  "
                 + analysis.tail_note("connection"),
            key=placement))
    # The herd's price: the shared socket against each race-free control, same N, paired
    # over the repetitions where neither point was client- or both-bound.
    rows = []
    controls = [st for st in ("reuseport", "dispatch") if any(c.endswith("/" + st) for c in cfgs)]
    for placement in p["placements"]:
        for cfg in cfgs:
            b, m, st = cfg.split("/")
            if st != "shared":
                continue
            for ctrl in controls:
                other = f"{b}/{m}/{ctrl}"
                if other not in cfgs:
                    continue
                for rate in rates:
                    cells = []
                    for n in p["workers"]:
                        rr = analysis.ratio_summary(analysis.paired(
                            _per_conn(records, point_config(cfg, placement, rate, n)),
                            _per_conn(records, point_config(other, placement, rate, n))))
                        s.values[f"vs.{b}.{m}.shared.{ctrl}.{placement}.rate={rate:g}.n={n}"] = rr
                        cells.append(analysis.fmt_ratio(rr) if rr else "–")
                    rows.append([b, m, placement, f"{rate:g}", f"shared ÷ {ctrl}", *cells])
    if rows:
        s.tables.append(Table(
            "The price of the race: server CPU per connection, shared socket ÷ a race-free control",
            ["backend", "mode", "placement", "conn/s", "ratio"] + [f"N={n}" for n in p["workers"]], rows,
            note="Paired within each repetition (same N, rate and placement, back to back), over the "
                 "repetitions where neither point was client- or both-bound: a 95% CI from 8 pairs "
                 "on, else the range.", key="versus"))
    # The absolute cost of a wake-up, and the growth from the smallest to the largest N.
    rows = []
    nmax, nmin = max(p["workers"]), min(p["workers"])
    for placement in p["placements"]:
        for cfg in cfgs:
            for rate in rates:
                # Only where there is a herd: under a race-free control the context switches
                # do not come from losing races, and a slope through them means nothing.
                herd = cfg.rsplit("/", 1)[1] in ("shared", "exclusive", "exclusive-rotate")
                cost = wakeup_cost(records, cfg, placement, rate, p["workers"]) if herd else None
                s.values[f"wakeup_cost.{cfg}.{placement}.rate={rate:g}"] = cost
                growth = analysis.ratio_summary(analysis.paired(
                    _per_conn(records, point_config(cfg, placement, rate, nmax)),
                    _per_conn(records, point_config(cfg, placement, rate, nmin))))
                s.values[f"growth.{cfg}.{placement}.rate={rate:g}"] = growth
                rows.append([*cfg.split("/"), placement, f"{rate:g}",
                             analysis.fmt_interval(cost, 1, unit=" µs") if herd else "no herd",
                             analysis.fmt_ratio(growth)])
                lo = s.values.get(f"{cfg}.{placement}.rate={rate:g}.n={nmin}")
                hi = s.values.get(f"{cfg}.{placement}.rate={rate:g}.n={nmax}")
                if lo and hi and lo["cpu"] and hi["cpu"] and cfg.endswith("/shared"):
                    s.findings.append(
                        f"{cfg} {placement} at {rate:g} conn/s: server CPU per connection "
                        f"{lo['cpu']['median']:.1f} µs at N={nmin} → {hi['cpu']['median']:.1f} µs at "
                        f"N={nmax} ({analysis.fmt_ratio(growth)}); voluntary cs/accept "
                        f"{_f(lo['vcs_per_accept'], '.2f')} → {_f(hi['vcs_per_accept'], '.2f')}; one "
                        f"extra wake-up costs {analysis.fmt_interval(cost, 1, unit=' µs')} of server CPU")
    s.tables.append(Table(
        "The absolute cost of a wake-up, and CPU per connection from the fewest to the most workers",
        ["backend", "mode", "strategy", "placement", "conn/s", "µs of server CPU per extra voluntary "
         "context switch (slope across N)", f"µs/conn N={nmax} ÷ N={nmin}"], rows,
        note="The slope is fitted per repetition (server CPU per connection against voluntary "
             "context switches per connection, over N) and summarised across repetitions.",
        key="cost"))
    s.add_skipped(notes.skipped)
    return s


def _f(x, spec):
    return "unobservable" if x is None else format(x, spec)


def figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    from parallelnet.experiments import plots

    p = ctx.params
    upgrade(records, p, ctx.notes)
    cfgs = ctx.notes.ran
    rates = p.get("rates") or []
    panels = sorted({f"{c.rsplit('/', 1)[0]}, {pl}, {r:g}/s" for c in cfgs for pl in p["placements"]
                     for r in rates})
    cpu, vcs = {}, {}
    for cfg in cfgs:
        bm, st = cfg.rsplit("/", 1)
        for pl in p["placements"]:
            for rate in rates:
                pts, vpts = [], []
                for n in p["workers"]:
                    v = summary.values.get(f"{cfg}.{pl}.rate={rate:g}.n={n}")
                    if v and v["cpu"]:
                        pts.append((n, v["cpu"]["median"], v["cpu"]["min"], v["cpu"]["max"]))
                    if v and v["vcs_per_accept"] is not None:
                        vpts.append((n, v["vcs_per_accept"], v["vcs_per_accept"], v["vcs_per_accept"]))
                cpu[f"{bm}, {pl}, {rate:g}/s|{st}"] = pts
                vcs[f"{bm}, {pl}, {rate:g}/s|{st}"] = vpts
    return [plots.lines(cpu, f"{ctx.outdir}/herd-cpu.png", "workers sharing the socket (N)",
                        "server CPU µs per connection", title="What the herd costs", panels=panels,
                        ncols=2),
            plots.lines(vcs, f"{ctx.outdir}/herd-cs.png", "workers (N)",
                        "voluntary context switches per accept", title="Sleeps and wake-ups per accept",
                        panels=panels, ncols=2)]


EXPERIMENT = Experiment(
    name="herd", title="Is the lost race cheap? The thundering herd vs the number of workers",
    presets={
        "smoke": dict(backends=["epoll"], modes=["process"], strategies=["shared", "reuseport"],
                      workers=[1, 4], placements=["packed"], rates=[500], connections=32, size=64,
                      reps=1, duration=0.8, warmup=0.3, aa="epoll/process/shared/packed/rate=500/n=4"),
        "standard": dict(backends=["epoll", "native"], modes=["thread", "process"],
                         strategies=["shared", "reuseport"], workers=[1, 2, 4, 16],
                         placements=["packed"], rates=[3000, 9000], connections=64, size=64,
                         reps=8, duration=1.5, warmup=0.5,
                         aa="epoll/process/shared/packed/rate=3000/n=4"),
        "full": dict(backends=["epoll", "uring", "native"], modes=["thread", "process"],
                     strategies=["shared", "exclusive", "reuseport", "dispatch"],
                     workers=[1, 2, 4, 8, 16, 32], placements=["packed", "spread"],
                     rates=[1000, 3000, 9000, 15000], connections=64, size=64, reps=10,
                     duration=3.0, warmup=0.5, aa="epoll/process/shared/packed/rate=3000/n=4"),
    },
    plan=plan, run_point=run_point, summarize=summarize, figures=figures, pyperf_value=server_cpu_per_request,
    description="N = 1..16 workers on one socket vs reuseport (and dispatch), threads and processes, "
                "at several connection rates; the cost of one wake-up as a fitted slope")
