"""imbalance: does an overloaded CPU win fewer accept races, so that load evens out by itself?

The design's central claim, as a dose-response.  Two workers, one per CPU (worker 0 on the
first, worker 1 on the second); a CPU hog (experiments.hog) with a duty cycle of 0, 25, 50,
75 or 100% pinned to worker 0's CPU; a *light* open-loop churn client (new connections
at a fixed rate, one 64-byte echo each, latency from the intended connect time) on the
second CPU, its own CPU recorded.  For each accept strategy and backend, per worker: the
share of connections accepted, the share of requests served, CPU, lost races per listen
wakeup; overall: connections/s, p50/p99/p99.9 and server CPU per connection.

Then the **step**: the hog (100%) switches on halfway through the window; the share of
connections worker 0 accepts in each 0.25 s stats interval shows whether and how fast
the load moves.

What the claim predicts: under ``shared`` (and ``exclusive``) worker 0's share falls as
the duty rises, at little cost in latency; under ``reuseport`` the kernel's hash does not
know about the hog, so the split stays 50/50 and the hogged worker's connections wait;
``dispatch`` (least-connections) balances actively.  ``reuseport-cpu`` steers by the CPU
that processes the SYN, which on loopback is the client's: every connection goes to the
worker on the client's CPU, hog or not (recorded as the degenerate case it is here).

Limits of the apparatus, stated with the data: on 2 CPUs the client shares worker 1's
CPU (hence a light client); latency is the client's, not split per worker.
"""

from __future__ import annotations

import math
import os
import statistics
import time

from parallelnet.experiments import analysis
from parallelnet.experiments.framework import (
    TAIL, Context, Experiment, Plan, PlanNotes, Point, Summary, Table, rotated,
    server_cpu_per_request, strategy_configs,
)
from parallelnet.experiments.server import read_records
from parallelnet.experiments.hog import Hog
from parallelnet.experiments.measure import Layout, measure

STEP = "step"


def plan(p: dict) -> Plan:
    cfgs, notes = strategy_configs(p["backends"], p["strategies"])   # (backend, strategy)
    per = p["warmup"] + p["duration"] + 0.6
    points = []
    for rep in range(p["reps"]):
        for duty in p["duties"]:
            for b, s in rotated(cfgs, rep):
                points.append(Point(f"{b}/{s}/duty={duty:.2f}", rep,
                                    {"backend": b, "strategy": s, "duty": duty}, est_s=per))
        if p.get("step"):
            for b, s in rotated(cfgs, rep):
                points.append(Point(f"{b}/{s}/{STEP}", rep,
                                    {"backend": b, "strategy": s, "duty": 1.0, "step": True},
                                    est_s=p["warmup"] + p["step_duration"] + 0.6))
    return Plan(points, notes)


def two_cpu_layout() -> Layout:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("imbalance needs two CPUs (worker 0's, with the hog, and worker 1's)")
    return Layout(server=cpus[:2], client=[cpus[1]])


def run_point(point: Point, ctx: Context) -> dict:
    from parallelnet.experiments.loadgen import LoadSpec

    p, q = ctx.params, point.params
    layout = two_cpu_layout()
    step = bool(q.get("step"))
    duration = p["step_duration"] if step else p["duration"]
    strategy = q["strategy"].removesuffix(TAIL)
    hog_cpu = layout.server[0]
    # Workers start (and register the listener) in index order: worker 0 heads the wait
    # queue.  "@tail" puts worker 0 on the other CPU, so the hogged worker is the tail.
    cpus = list(reversed(layout.server)) if q["strategy"].endswith(TAIL) else layout.server
    args = ["--backend", q["backend"], "--accept", strategy, "--workers", "2",
            "--cpus", ",".join(map(str, cpus)), "--message-size", str(p["size"])]
    if strategy == "dispatch":
        args += ["--dispatch-policy", p.get("dispatch_policy", "least-connections")]
    tag = point.label().replace("/", "_").replace(" ", "-")
    srv = ctx.server(args, tag, cpus=layout.server)
    try:
        # The hog runs on worker 0's CPU; in the step it switches on halfway through the
        # window (its process is started now, so no start-up lands inside the window).
        delay = p["warmup"] + duration / 2 if step else 0.0
        with Hog(hog_cpu, q["duty"], seconds=delay + duration + p["warmup"] + 5,
                 delay=delay) as hog:
            if not step and q["duty"]:
                time.sleep(0.2)   # the hog is spinning before the load starts
            spec = LoadSpec(host=srv.host, port=srv.port, mode="churn", rate=p["rate"],
                            connections=p["connections"], cpus=layout.client, size=p["size"],
                            duration=duration, warmup=p["warmup"])
            t_start = time.monotonic()
            rec = measure(srv, spec, layout, extra_pids=(hog.pid,) if hog.pid else ())
        if step:
            t0 = t_start + p["warmup"] - srv.t_listen
            rec["series"] = share_series(srv.stats_path, t0, t0 + duration, cpus.index(hog_cpu))
            rec["step_at"] = duration / 2
    finally:
        ctx.stop_server(srv)
    ws = rec.get("workers") or []
    acc = [w["accepted"] for w in ws]
    req = [w["requests"] for w in ws]
    cpu = [w["cpu_ns"] / 1e9 for w in ws]
    rec["hog_worker"] = cpus.index(hog_cpu)
    rec["accepted"] = acc
    rec["accept_share"] = [a / sum(acc) if sum(acc) else None for a in acc]
    rec["request_share"] = [r / sum(req) if sum(req) else None for r in req]
    rec["worker_cpu_util"] = [c / rec["window_s"] for c in cpu]
    # None where the backend cannot observe lost races (io_uring on a shared socket).
    rec["lost_per_wakeup"] = [w["lost_races"] / w["listen_wakeups"]
                              if w["listen_wakeups"] and w["lost_races"] is not None else None
                              for w in ws]
    return rec


def share_series(stats_path: str, t0: float, t1: float, worker: int = 0) -> list:
    """[[t since the window started, ``worker``'s share of the connections accepted in that
    stats interval, connections in it]] for each interval inside [t0, t1]."""
    recs = [r for r in read_records(stats_path) if r["type"] == "interval" and t0 <= r["t"] <= t1]
    out = []
    for a, b in zip(recs, recs[1:]):
        got = [wb["accepted"] - wa["accepted"] for wa, wb in zip(a["workers"], b["workers"])]
        if sum(got):
            out.append([round(b["t"] - t0, 3), round(got[worker] / sum(got), 4), sum(got)])
    return out

# -- summary ------------------------------------------------------------------------------

def _w0(r):
    """The hogged worker's share of accepted connections (worker 0 unless "@tail")."""
    h = r.get("hog_worker", 0)
    return r["accept_share"][h] if r.get("accept_share") and r["accept_share"][h] is not None else None


def _woke(records, i) -> bool:
    """Whether the hogged (i=0) or the other (i=1) worker's listener ever woke it: without a
    wakeup there is no race to lose ('–'), with one a None means it cannot be seen."""
    return any((r.get("workers") or [{}, {}])[_other(i, r)].get("listen_wakeups") for r in records)


def _other(i, r):
    """Index of the hogged (i=0) or the other (i=1) worker."""
    h = r.get("hog_worker", 0)
    return h if i == 0 else 1 - h


def _by(records, **kw):
    return [r for r in records if all(r["params"].get(k) == v for k, v in kw.items())]


def _med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def paired_delta(records, b, s, key, d_hi, d_lo, ratio=False):
    """key(duty d_hi) - key(duty d_lo) (or their ratio) paired within each repetition."""
    hi = {r["rep"]: key(r) for r in _by(records, backend=b, strategy=s, duty=d_hi) if not r["params"].get("step")}
    lo = {r["rep"]: key(r) for r in _by(records, backend=b, strategy=s, duty=d_lo) if not r["params"].get("step")}
    reps = sorted(k for k in set(hi) & set(lo) if hi[k] is not None and lo[k] is not None)
    if ratio:
        vals = [hi[k] / lo[k] for k in reps if lo[k]]
        return analysis.ratio_summary(vals)
    return analysis.diff_summary([hi[k] - lo[k] for k in reps])


def share_slope(records, b, s, duties) -> dict | None:
    """The dose-response: per repetition, the least-squares slope of the hogged worker's
    share against the hog's duty (points of share per 100% duty), summarised across
    repetitions (analysis.slope_summary: a 95% CI from 8 repetitions on, else a range)."""
    series = []
    for rep in sorted({r["rep"] for r in records}):
        xs, ys = [], []
        for d in duties:
            for r in _by(records, backend=b, strategy=s, duty=d):
                if r["rep"] == rep and not r["params"].get("step") and _w0(r) is not None:
                    xs.append(d)
                    ys.append(_w0(r))
        if len(set(xs)) > 1:
            series.append((xs, ys))
    return analysis.slope_summary(series)


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    s = Summary()
    steady = [r for r in records if not r["params"].get("step")]
    duties = p["duties"]
    cfgs = notes.ran or sorted({f"{r['params']['backend']}/{r['params']['strategy']}" for r in steady})
    rows = []
    for cfg in cfgs:
        b, st = cfg.split("/", 1)
        cells = []
        for d in duties:
            rs = _by(steady, backend=b, strategy=st, duty=d)
            used, _, _ = analysis.prefer_quiet(rs, lambda r: r["noise"]["noisy"])
            mr = analysis.median_range(_w0(r) for r in used)
            s.values[f"share.{cfg}.{d:.2f}"] = mr
            cells.append(f"{100 * mr['median']:.0f}% ({100 * mr['min']:.0f}–{100 * mr['max']:.0f})" if mr else "–")
        delta = paired_delta(steady, b, st, _w0, max(duties), min(duties)) if len(duties) > 1 else None
        s.values[f"delta_share.{cfg}"] = delta
        slope = share_slope(steady, b, st, duties) if len(duties) > 1 else None
        s.values[f"slope_share.{cfg}"] = slope
        rows.append([b, st, *cells,
                     analysis.fmt_interval(slope, 1, scale=100, unit=" pp", signed=True)])
    s.tables.append(Table(
        "The hogged worker's share of accepted connections vs the hog's duty on its CPU",
        ["backend", "strategy"] + [f"duty {100 * d:.0f}%" for d in duties]
        + [f"Δ share {100 * max(duties):.0f}% − {100 * min(duties):.0f}% (paired, 95% CI)"], rows,
        note="Median (min–max) over repetitions. 50% = an even split. The hogged worker is "
             "worker 0, which registers the listener first (heads its wait queue); in "
             "'@tail' rows it registers last.", key="share"))
    rows = []
    for cfg in cfgs:
        b, st = cfg.split("/", 1)
        for d in (min(duties), max(duties)):
            rs = _by(steady, backend=b, strategy=st, duty=d)
            if not rs:
                continue
            used, dropped, all_noisy = analysis.prefer_quiet(rs, lambda r: r["noise"]["noisy"])
            lat = {k: _med(r["client"]["latency_us"].get(k) for r in used) for k in ("p50", "p99", "p99.9")}
            # churn: one latency sample per connection, counted in the thinnest repetition
            samples = analysis.fewest_samples(analysis.latency_samples(r) for r in used)
            reqshare = _med(r["request_share"][_other(0, r)] for r in used if r.get("request_share"))
            lost = [_med(r["lost_per_wakeup"][_other(i, r)] for r in used if r.get("lost_per_wakeup"))
                    for i in (0, 1)]
            util = [_med(r["worker_cpu_util"][_other(i, r)] for r in used if r.get("worker_cpu_util"))
                    for i in (0, 1)]
            cpu = _med(r["server"]["cpu_us_per_req"] for r in used)
            rate = _med(r["rps"] for r in used)
            ccpu = _med(r["client"]["cpu_util"] for r in used)
            met = all(r["client"]["rate_met"] for r in used)
            s.values[f"cost.{cfg}.{d:.2f}"] = {"lat": lat, "cpu_us_per_conn": cpu, "conn_rate": rate,
                                               "lost_per_wakeup": lost, "worker_util": util,
                                               "samples": samples}
            rows.append([b, st, f"{100 * d:.0f}%", f"{rate:.0f}" + ("" if met else " (rate not met)"),
                         f"{100 * reqshare:.0f}%" if reqshare is not None else "–",
                         f"{cpu:.1f}" if cpu is not None else "–",
                         " / ".join(f"{100 * u:.0f}%" if u is not None else "–" for u in util),
                         " / ".join(f"{x:.3f}" if x is not None else
                                    ("–" if not _woke(used, i) else "unobservable")
                                    for i, x in enumerate(lost)),
                         f"{lat['p50']:.0f}", analysis.fmt_tail(lat["p99"], samples, 99),
                         analysis.fmt_tail(lat["p99.9"], samples, 99.9),
                         f"{100 * ccpu:.0f}%" + (" noisy" if all_noisy else "")])
        ratio = paired_delta(steady, b, st, lambda r: r["client"]["latency_us"].get("p99"),
                             max(duties), min(duties), ratio=True)
        s.values[f"p99_ratio.{cfg}"] = ratio
    s.tables.append(Table(
        "What the hog costs: the extremes of the dose",
        ["backend", "strategy", "duty", "conn/s", "hogged worker's request share", "server µs/conn",
         "worker CPU hogged / other", "lost races per listen wakeup hogged / other", "p50 µs",
         "p99 µs", "p99.9 µs", "client CPU"], rows,
        note="Lost races are unobservable under io_uring (its accept waits inside the "
             "kernel); '–': the worker's listener never woke it (dispatch, or a reuseport-cpu "
             "socket that gets no connection). Latency is the client's, from the intended "
             "connect time.  " + analysis.tail_note("connection"),
        key="cost"))
    # The step.
    steps = [r for r in records if r["params"].get("step") and r.get("series")]
    rows = []
    for cfg in cfgs:
        b, st = cfg.split("/", 1)
        rs = _by(steps, backend=b, strategy=st)
        if not rs:
            continue
        before = _med(_med(x[1] for x in r["series"] if x[0] <= r["step_at"]) for r in rs)
        after = _med(_med(x[1] for x in r["series"] if x[0] > r["step_at"] + 0.5) for r in rs)
        settle = _med(settle_time(r) for r in rs)
        s.values[f"step.{cfg}"] = {"before": before, "after": after, "settle_s": settle}
        rows.append([b, st, f"{100 * before:.0f}%" if before is not None else "–",
                     f"{100 * after:.0f}%" if after is not None else "–",
                     f"{settle:.2f}" if settle is not None else "–", str(len(rs))])
    if rows:
        s.tables.append(Table(
            "The step: the hogged worker's share before and after a 100% hog switches on mid-run",
            ["backend", "strategy", "share before", "share after (from +0.5 s)",
             "settle time s", "n"], rows,
            note="Medians over every repetition (n) of each repetition's own median share "
                 "before and after, and of its settle time: from the step until the first 0.25 s "
                 "interval whose share is within 5 points of the after-median.", key="step"))
    for cfg in cfgs:
        d = s.values.get(f"delta_share.{cfg}")
        r = s.values.get(f"p99_ratio.{cfg}")
        if d:
            s.findings.append(
                f"{cfg}: the hogged worker's share changed by "
                f"{analysis.fmt_interval(s.values.get(f'slope_share.{cfg}'), 1, scale=100, unit=' points', signed=True)}"
                f" per 100% of hog duty (least-squares slope per repetition over duties "
                f"{', '.join(f'{100 * x:.0f}%' for x in duties)}); endpoints "
                f"{100 * min(duties):.0f}% → {100 * max(duties):.0f}%: "
                f"{analysis.fmt_interval(d, 1, scale=100, unit=' points', signed=True)}"
                + (f"; p99 {analysis.fmt_ratio(r)}" if r else ""))
    s.add_skipped(notes.skipped)
    return s


def settle_time(r: dict) -> float | None:
    after = [x[1] for x in r["series"] if x[0] > r["step_at"] + 0.5]
    if not after:
        return None
    target = statistics.median(after)
    for t, share, _ in r["series"]:
        if t > r["step_at"] and abs(share - target) <= 0.05:
            return t - r["step_at"]
    return None


def figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    from parallelnet.experiments import plots

    p = ctx.params
    cfgs = ctx.notes.ran
    backends = sorted({c.split("/")[0] for c in cfgs})
    series, lat = {}, {}
    for cfg in cfgs:
        b, st = cfg.split("/", 1)
        pts, lpts = [], []
        for d in p["duties"]:
            mr = summary.values.get(f"share.{cfg}.{d:.2f}")
            if mr:
                pts.append((100 * d, 100 * mr["median"], 100 * mr["min"], 100 * mr["max"]))
            rs = [r for r in _by(records, backend=b, strategy=st, duty=d) if not r["params"].get("step")]
            p99 = [r["client"]["latency_us"].get("p99") for r in rs]
            if p99:
                lpts.append((100 * d, statistics.median(p99), min(p99), max(p99)))
        series[f"{b}|{st}"] = pts
        lat[f"{b}|{st}"] = lpts
    out = [plots.lines(series, f"{ctx.outdir}/imbalance-share.png", "hog duty on worker 0's CPU (%)",
                       "hogged worker's share of accepted connections (%)",
                       title="Does a busy CPU win fewer accept races? (50% = even split)",
                       hline=50.0, panels=backends),
           plots.lines(lat, f"{ctx.outdir}/imbalance-p99.png", "hog duty on worker 0's CPU (%)",
                       "p99 latency of connect+echo+close (µs)", title="What the imbalance costs",
                       logy=True, panels=backends)]
    steps, reps = {}, set()
    width = interval_width([r for r in records if r["params"].get("step") and r.get("series")])
    for cfg in cfgs:
        b, st = cfg.split("/", 1)
        rs = [r for r in _by(records, backend=b, strategy=st) if r["params"].get("step") and r.get("series")]
        if rs and width:
            steps[f"{b}|{st}"] = [(x, 100 * med, 100 * lo, 100 * hi)
                                  for x, med, lo, hi in step_band(rs, width)]
            reps.add(len(rs))
    if steps:
        n = f"{min(reps)}" if len(reps) == 1 else f"{min(reps)}–{max(reps)}"
        out.append(plots.lines(steps, f"{ctx.outdir}/imbalance-step.png",
                               "seconds since the hog switched on (0: the interval it switched on in)",
                               f"hogged worker's share per {width:g} s (%)",
                               title=f"The step: median and range of {n} repetitions per interval",
                               hline=50.0, panels=backends))
    return out


def interval_width(records: list[dict]) -> float | None:
    """The stats interval of the step series (s): the median spacing of their points (the
    server's ``interval``, which the records do not name), to 10 ms - the servers' ticks
    come a millisecond or so late, which would otherwise show in every label."""
    gaps = [b[0] - a[0] for r in records for a, b in zip(r["series"], r["series"][1:])]
    return round(statistics.median(gaps), 2) if gaps else None


def step_band(rs: list[dict], width: float) -> list[tuple[float, float, float, float]]:
    """The step across repetitions: [(seconds since the step, median share, min, max)].

    Each repetition's stats intervals end at its own server's clock ticks (``t`` is an
    interval's end), so they are aligned on the step by their centres: bin k holds the
    interval whose centre lies nearest k widths after the step - bin 0 the one the hog
    switched on in (one value per repetition and bin: the median, should two fall in
    one).  Only bins that every repetition reaches are drawn, so each point is the
    median of all of them."""
    bins: dict[int, dict[int, list[float]]] = {}
    for i, r in enumerate(rs):
        for t, share, _ in r["series"]:
            k = math.floor((t - width / 2 - r["step_at"]) / width + 0.5)
            bins.setdefault(k, {}).setdefault(i, []).append(share)
    out = []
    for k in sorted(bins):
        if len(bins[k]) < len(rs):
            continue
        vals = [statistics.median(v) for v in bins[k].values()]
        out.append((round(k * width, 3), statistics.median(vals), min(vals), max(vals)))
    return out


EXPERIMENT = Experiment(
    name="imbalance", title="Does load even out by itself? A CPU-hog dose-response per accept strategy",
    presets={
        "smoke": dict(backends=["epoll"], strategies=["shared", "exclusive@tail"], duties=[0.0, 1.0],
                      rate=500, connections=32, size=64, reps=1, duration=0.8, warmup=0.3,
                      step=True, step_duration=1.2),
        "standard": dict(backends=["epoll", "native"],
                         strategies=["shared", "exclusive", "reuseport", "dispatch"],
                         duties=[0.0, 0.25, 0.5, 0.75, 1.0], rate=3000, connections=64, size=64,
                         reps=8, duration=1.5, warmup=0.5, step=True, step_duration=4.0),
        "full": dict(backends=["epoll", "uring", "native", "uring-py", "uvloop"],
                     strategies=["shared", "exclusive", "exclusive@tail", "exclusive-rotate",
                                 "reuseport", "reuseport-cpu", "dispatch"],
                     duties=[0.0, 0.25, 0.5, 0.75, 1.0], rate=3000, connections=64, size=64,
                     reps=5, duration=4.0, warmup=1.0, step=True, step_duration=6.0),
    },
    plan=plan, run_point=run_point, summarize=summarize, figures=figures,
    pyperf_value=server_cpu_per_request,
    description="2 workers, a hog of 0-100% duty on worker 0's CPU, a light open-loop churn client")
