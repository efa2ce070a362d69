"""balance: does a worker busy with its own connections win fewer accept races, so load evens out?

The design's second claim, tested with the mechanism it describes.  Nothing external loads
a CPU: each worker is busy with the connections it accepted, because every request carries
a service time (``GET /work/US``: US µs of the worker's own CPU, in Python or in C).

**The workload** (experiments/loadgen/loadgen.py), two clients side by side, both open loop:

* *long-lived* keep-alive connections carry most of the load: ``long_connections`` of them,
  opened at the start (during the warm-up, so the accept race places them then), at a
  fixed total request rate; the first ``heavy`` of them are a heavy class (e.g. ten times the
  mean service time), the rest light - so whichever worker won the heavy connections is busy
  for the whole window, a skew the design must live with;
* *churn*: new connections at a fixed rate, each sending ``requests_per_conn`` requests one
  after the other (keep-alive) and closing - the new arrivals whose accept race the claim
  is about, each bringing its own work to the worker that wins it.

**The load** is a fraction of the server's measured capacity: once per run and per
(backend, mode), a calibration point saturates *one* worker with ``fixed:S`` (closed loop)
and yields its per-request overhead beyond S; the capacity of W workers is taken as W times
one worker's (on two CPUs the client shares the second, using a few % of it).  The rates of
both clients follow from the utilisation, the classes' mean service times and the churn's
share of the requests.  Swept from light to near saturation.

**What is recorded**, per point: every 0.25 s and per worker, from the server's own stats
records - busy fraction (its thread's CPU), open connections, connections accepted; over the
window - accept shares, per-worker busy, server CPU, the long-lived requests' p50/p99/p99.9
per class (from their intended send time: an open loop, no coordinated omission), the churn's
connect-to-answer latency.  Queued requests per worker are not observable from user space
here (a readiness loop does not see what the kernel holds) and are not claimed.

**The verdicts**:

* *Does the busier worker accept fewer connections?*  Per point, a least-squares slope of
  each worker's share of the accepts in an interval (minus 1/W) against its busy fraction
  in the *previous* interval (minus the workers' mean): negative if a busy worker wins
  less.  Lagged by one interval because a connection won now makes its worker busy now
  (the reverse effect, which would bias a same-interval fit towards positive).  Summarised
  across repetitions (analysis.slope_summary: a 95% CI from 8 repetitions on).
* *Which strategy holds the best p99 at high load?*  p99 of the long-lived requests against
  utilisation, per strategy, and the utilisation each sustains at a p99 target
  (``p99_target_ms``, interpolated between measured loads).
* ``dispatch`` with ``least-connections`` is the active balancer the design does without;
  ``reuseport`` the hash that ignores load.

Layout: W workers on the server CPUs (one each; on two CPUs both, the clients sharing the
second, their own CPU recorded), clients on the client CPUs; derived from the machine, so
the same command runs on 16 cores.  Process mode for the Python backends (no shared GIL)
and thread mode as its own row.  An A/A control per repetition.
"""

from __future__ import annotations

import os
import statistics
import threading

from parallelnet.experiments import analysis
from parallelnet.experiments.analysis import row_bound
from parallelnet.experiments.framework import (
    Context, Experiment, Plan, PlanNotes, Point, Summary, Table, add_aa_twin, available_backends,
    client_p99,
    rotated, server_cpu_per_request,
)
from parallelnet.experiments.server import read_records
from parallelnet.experiments.measure import Layout, bottleneck, measure

CALIBRATE = "calibrate"


def layout() -> Layout:
    """Every server CPU gets a worker; on two CPUs the clients share the second."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("balance needs at least two CPUs (two workers to balance between)")
    base = Layout.default(1)
    server = base.server if len(cpus) > 2 else cpus
    return Layout(server, base.client)


def configs(p: dict) -> PlanNotes:
    """``backend/mode/strategy`` for each requested configuration the machine can run
    (``ran``), the others with why (``skipped``)."""
    from parallelnet.core.backend import registry
    from parallelnet.core.listeners import layout_of

    names = sorted({c.split("/")[0] for c in p["configs"]})
    ok, skipped = available_backends(names)
    reg = registry()
    out = []
    for c in p["configs"]:
        b, m, st = c.split("/")
        if b in ok and m in reg[b].modes and layout_of(st) in reg[b].accept_strategies:
            out.append(c)
        elif b in ok:
            skipped[c] = f"{b} does not run {m} mode with --accept {st}"
    return PlanNotes(out, skipped)


def plan(p: dict) -> Plan:
    notes = configs(p)
    cfgs = notes.ran
    points = [Point(f"{CALIBRATE}/{bm}", 0, {"calibrate": True, "backend": bm.split("/")[0],
                                             "mode": bm.split("/")[1]}, est_s=p["warmup"] + 2.5)
              for bm in sorted({c.rsplit("/", 1)[0] for c in cfgs})]
    per = p["warmup"] + p["duration"] + 1.5
    for rep in range(p["reps"]):
        for load in p["loads"]:
            for cfg in rotated(cfgs, rep):
                b, m, st = cfg.split("/")
                points.append(Point(f"{cfg}/load={load:.2f}", rep,
                                    {"backend": b, "mode": m, "strategy": st, "load": load}, est_s=per))
    return Plan(add_aa_twin(points, p.get("aa")), notes)


# -- the workload -------------------------------------------------------------------------

def mean_us(spec: str) -> float:
    from parallelnet.experiments.loadgen import parse_service

    return parse_service(spec).mean_us


def rates(p: dict, load: float, overhead_us: float, workers: int) -> dict:
    """Request rate of the long-lived connections and connection rate of the churn for a
    utilisation ``load`` of W workers' capacity (module docstring)."""
    k, n = p["heavy_connections"], p["long_connections"]
    long_mean = (k * mean_us(p["heavy_service"]) + (n - k) * mean_us(p["service"])) / n
    churn_mean = mean_us(p["churn_service"])
    f = p["churn_share"]
    per_request = (1 - f) * long_mean + f * churn_mean + overhead_us
    total = load * workers * 1e6 / per_request
    return {"long_rate": (1 - f) * total, "churn_conn_rate": f * total / p["requests_per_conn"],
            "total_rate": total, "work_per_request_us": per_request - overhead_us}


def run_point(point: Point, ctx: Context) -> dict:
    q = point.params
    if q.get("calibrate"):
        return calibrate(point, ctx)
    return run_load(point, ctx)


def calibrate(point: Point, ctx: Context) -> dict:
    """One worker saturated with fixed:S, closed loop: its per-request overhead beyond S."""
    p, q = ctx.params, point.params
    lay = layout()
    one = Layout(lay.server[:1], lay.client)
    args = ["--backend", q["backend"], "--mode", q["mode"], "--workers", "1", "--protocol", "http"]
    s_us = mean_us(p["service"])
    rec = ctx.measure(args, {"mode": "closed", "protocol": "http", "service": f"fixed:{s_us:g}",
                             "connections": 8, "threads": 1, "duration": 2.0,
                             "warmup": p["warmup"]}, one,
                      point.label().replace("/", "_").replace(" ", "-"), per_worker=False)
    rec["capacity_rps"] = rec["rps"]
    cpu = rec["server"]["cpu_us_per_req"]
    rec["overhead_us"] = max(0.0, cpu - s_us) if cpu is not None else p["overhead_default_us"]
    ctx.state.setdefault("overhead", {})[f"{q['backend']}/{q['mode']}"] = rec["overhead_us"]
    return rec


def run_load(point: Point, ctx: Context) -> dict:
    from parallelnet.experiments.loadgen import LoadSpec

    p, q = ctx.params, point.params
    lay = layout()
    workers = len(lay.server)
    overhead = ctx.state.get("overhead", {}).get(f"{q['backend']}/{q['mode']}", p["overhead_default_us"])
    r = rates(p, q["load"], overhead, workers)
    args = ["--backend", q["backend"], "--mode", q["mode"], "--workers", str(workers),
            "--accept", q["strategy"], "--protocol", "http", "--cpus", ",".join(map(str, lay.server))]
    if q["strategy"] == "dispatch":
        args += ["--dispatch-policy", p["dispatch_policy"]]
    tag = point.label().replace("/", "_").replace(" ", "-").replace("~", "-")
    srv = ctx.server(args, tag, cpus=lay.server, interval=p["interval"])
    try:
        common = dict(host=srv.host, port=srv.port, protocol="http", cpus=list(lay.client),
                      duration=p["duration"], warmup=p["warmup"], timeout=5.0)
        long_spec = LoadSpec(mode="open", rate=r["long_rate"], connections=p["long_connections"],
                             service=p["service"], heavy=f"{p['heavy_connections']}:{p['heavy_service']}",
                             seed=1000 + point.rep, **common)
        churn_spec = LoadSpec(mode="churn", rate=r["churn_conn_rate"], connections=p["churn_slots"],
                              service=p["churn_service"], requests_per_conn=p["requests_per_conn"],
                              seed=2000 + point.rep, **common)
        churn: dict = {}

        def churn_client():
            try:
                churn["lg"] = ctx.client.run(churn_spec)   # where --client puts it
            except BaseException as exc:  # noqa: BLE001 - re-raised in this thread
                churn["error"] = exc

        th = threading.Thread(target=churn_client, name="churn", daemon=True)
        th.start()
        rec = measure(srv, long_spec, lay)
        th.join(churn_spec.timeout + churn_spec.warmup + churn_spec.duration + 30)
        if th.is_alive():
            raise RuntimeError("the churn client did not return")
        if "error" in churn:
            raise churn["error"]
        series = interval_series(srv, rec["window_server_t"])
    finally:
        ctx.stop_server(srv)
    lg = churn["lg"]
    rec["rates"] = r
    rec["overhead_us"] = overhead
    rec["churn"] = {"connects": lg.connects, "requests": lg.requests, "rate_met": lg.rate_met,
                    "achieved_conn_rate": lg.achieved_rate, "latency_us": lg.latency,
                    "errors": sum(lg.errors.values()), "work_us": lg.work_us,
                    "cpu_s": lg.client_cpu_user_s + lg.client_cpu_sys_s}
    # The server served both clients: its CPU per request is over both clients' requests.
    rec["requests_long"] = rec["requests"]
    rec["requests"] = rec["requests"] + lg.requests
    cpu_s = rec["server"]["cpu_s"]
    rec["server"]["cpu_us_per_req"] = cpu_s * 1e6 / rec["requests"] if rec["requests"] else None
    rec["rps"] = rec["requests"] / rec["window_s"] if rec["window_s"] else 0.0
    # Both clients' CPU: what the bottleneck label judges a client sharing a CPU by.
    client_s = rec["client"]["cpu_s"] + rec["churn"]["cpu_s"]
    rec["client"]["cpu_util_all"] = client_s / rec["window_s"] if rec["window_s"] else 0.0
    rec["bound"] = bottleneck({c: {"busy": v} for c, v in rec["busy"].items()}, lay, True,
                              rec["client"]["rate_met"] and lg.rate_met,
                              client_util=rec["client"]["cpu_util_all"])
    rec["series"] = series
    ws = rec.get("workers") or []
    acc = [w["accepted"] for w in ws]
    rec["accepted"] = acc
    rec["accept_share"] = [a / sum(acc) if sum(acc) else None for a in acc]
    rec["worker_busy"] = [w["cpu_ns"] / 1e9 / rec["window_s"] for w in ws] if rec["window_s"] else []
    rec["slope"] = analysis.ols(*lagged_pairs(series)) if series else None
    return rec


def interval_series(srv, window: list[float]) -> list[dict]:
    """Per stats interval inside the measured window (server clock): per worker busy
    fraction, accepts and open connections, from the server's own records (cumulative
    counters differenced)."""
    recs = [r for r in read_records(srv.stats_path)
            if r["type"] == "interval" and window[0] <= r["t"] <= window[1]]
    out = []
    for prev, r in zip(recs, recs[1:]):
        dt = r["t"] - prev["t"]
        if dt <= 0:
            continue
        out.append({
            "t": round(r["t"] - window[0], 3),
            "busy": [max(0.0, (b["cpu_ns"] - a["cpu_ns"]) / 1e9 / dt)
                     for a, b in zip(prev["workers"], r["workers"])],
            "accepted": [b["accepted"] - a["accepted"] for a, b in zip(prev["workers"], r["workers"])],
            "open": [b["open"] for b in r["workers"]],
        })
    return out


def lagged_pairs(series: list[dict]) -> tuple[list[float], list[float]]:
    """(x, y) per worker and interval: x = its busy fraction in the previous interval minus
    the workers' mean, y = its share of this interval's accepts minus 1/W."""
    xs, ys = [], []
    for before, now in zip(series, series[1:]):
        total = sum(now["accepted"])
        if not total:
            continue
        w = len(now["accepted"])
        mean_busy = statistics.fmean(before["busy"])
        for i in range(w):
            xs.append(before["busy"][i] - mean_busy)
            ys.append(now["accepted"][i] / total - 1 / w)
    return xs, ys


# -- summary ------------------------------------------------------------------------------

def _p99(r: dict, cls: str | None = None) -> float | None:
    if cls is None:
        return r["client"]["latency_us"].get("p99")
    c = (r["client"].get("classes") or {}).get(cls)
    return c["latency_us"].get("p99") if c and c["requests"] else None


def _samples(r: dict, cls: str | None = None) -> int | None:
    """The latency samples behind ``_p99(r, cls)``: the long-lived client's requests (the
    record's ``requests`` counts both clients'), or one class's."""
    if cls is None:
        return r.get("requests_long")
    c = (r["client"].get("classes") or {}).get(cls)
    return c["requests"] if c else None


def _tail_ms(mr: dict | None, samples: int | None) -> str:
    """A median p99 (µs) in ms with the samples beyond it (analysis.fmt_tail)."""
    return analysis.fmt_tail(mr["median"], samples, 99, digits=2, scale=1e-3) if mr else "–"


def sustained(points: list[tuple[float, float]], target: float) -> float | None:
    """The utilisation up to which p99 stays within ``target``: (load, p99) pairs sorted by
    load, linear between the last load that met it and the first that did not.  None if
    the lightest load already missed it."""
    best = prev = None
    for load, v in points:
        if v <= target:
            best, prev = load, (load, v)
            continue
        if prev is not None:
            l0, v0 = prev
            best = l0 + (load - l0) * (target - v0) / (v - v0)
        return best
    return best


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    s = Summary()
    cal = [r for r in records if r["config"].startswith(CALIBRATE + "/")]
    runs = [r for r in records if not r["config"].startswith(CALIBRATE + "/")]
    if cal:
        s.tables.append(Table(
            "Calibration: one worker saturated with fixed service times",
            ["backend/mode", "req/s", "overhead µs/request beyond the service time", "bound"],
            [[r["config"].split("/", 1)[1], f"{r['capacity_rps']:.0f}", f"{r['overhead_us']:.1f}",
              r["bound"]] for r in cal], key="calibration"))
    cfgs = notes.ran or sorted({r["config"].rsplit("/", 1)[0] for r in runs})
    loads = p["loads"]
    rows, p99_rows = [], []
    target_us = 1000 * p["p99_target_ms"]
    for cfg in cfgs:
        curve = []
        cells_p99 = []
        for load in loads:
            rs = [r for r in runs if r["config"] == f"{cfg}/load={load:.2f}"]
            if not rs:
                cells_p99.append("–")
                continue
            used, _, all_noisy = analysis.prefer_quiet(rs, lambda r: r["noise"]["noisy"])
            slope = analysis.slope_summary([lagged_pairs(r["series"]) for r in used if r.get("series")])
            busy = analysis.median_range(max(r["worker_busy"]) - min(r["worker_busy"])
                                         for r in used if r.get("worker_busy"))
            p99 = analysis.median_range(_p99(r) for r in used)
            p99_light = analysis.median_range(_p99(r, "light") for r in used)
            churn99 = analysis.median_range(r["churn"]["latency_us"].get("p99") for r in used)
            # the samples behind each p99, in the thinnest repetition (analysis.fmt_tail)
            samples = {"p99": analysis.fewest_samples(_samples(r) for r in used),
                       "p99_light": analysis.fewest_samples(_samples(r, "light") for r in used),
                       "churn_p99": analysis.fewest_samples(r["churn"].get("requests") for r in used)}
            client = analysis.median_range(r["client"]["cpu_util_all"] for r in used)
            met = sum(r["client"]["rate_met"] and r["churn"]["rate_met"] for r in used)
            bound = row_bound([r["bound"] for r in used])
            s.values[f"{cfg}.load={load:.2f}"] = {
                "slope": slope, "busy_spread": busy, "p99": p99, "p99_light": p99_light,
                "churn_p99": churn99, "client_util": client, "bound": bound,
                "rate_met": met, "n": len(used), "samples": samples}
            rows.append([*cfg.split("/"), f"{100 * load:.0f}%", str(len(used)),
                         analysis.fmt_interval(slope, 2, signed=True),
                         f"{100 * busy['median']:.0f} pp" if busy else "–",
                         _tail_ms(p99, samples["p99"]), _tail_ms(p99_light, samples["p99_light"]),
                         _tail_ms(churn99, samples["churn_p99"]),
                         f"{100 * client['median']:.0f}%" if client else "–",
                         f"{met}/{len(used)}", bound + (", noisy" if all_noisy else "")])
            if p99:
                curve.append((load, p99["median"]))
                cells_p99.append(_tail_ms(p99, samples["p99"]))
            else:
                cells_p99.append("–")
        reach = sustained(curve, target_us)
        s.values[f"{cfg}.sustained"] = reach
        p99_rows.append([*cfg.split("/"), *cells_p99,
                         f"{100 * reach:.0f}%" if reach is not None else f"< {100 * loads[0]:.0f}%"])
    s.tables.append(Table(
        "Does the busier worker accept fewer connections?  Slope of accept share on busy fraction",
        ["backend", "mode", "accept", "load", "n", "slope (share per unit busy, lag 0.25 s)",
         "busy spread", "p99 ms", "p99 light ms", "churn p99 ms", "client cpu", "rates met", "bound"],
        rows, note="Slope: per repetition, least squares of each worker's share of an interval's "
                   "accepts (minus 1/W) on its busy fraction in the interval before (minus the mean); "
                   "negative = a busy worker wins less.  Busy spread: busiest minus idlest worker "
                   "over the window.  p99: the long-lived requests from their intended send time; "
                   "churn p99: the churned connections' requests.  " + analysis.tail_note(),
        key="slope"))
    s.tables.append(Table(
        f"p99 of the long-lived requests (ms) against utilisation, and the load each strategy "
        f"sustains at p99 <= {p['p99_target_ms']:g} ms",
        ["backend", "mode", "accept", *[f"{100 * x:.0f}%" for x in loads], "sustained"],
        p99_rows, key="p99",
        note="Sustained: interpolated between the measured loads' median p99s.  "
             + analysis.tail_note()))
    # Verdict lines: the slope's sign at each load (where its 95% interval lies), the tail.
    for cfg in cfgs:
        fewer, more, neither, ranges = [], [], [], []
        for load in loads:
            v = s.values.get(f"{cfg}.load={load:.2f}")
            sl = v and v["slope"]
            if not sl:
                continue
            tag = f"{100 * load:.0f}%"
            if sl["kind"] != "ci95":
                ranges.append(tag)
            elif sl["interval"][1] < 0:
                fewer.append(tag)
            elif sl["interval"][0] > 0:
                more.append(tag)
            else:
                neither.append(tag)
        if not (fewer or more or neither or ranges):
            continue
        parts = []
        if fewer:
            parts.append(f"the busier worker accepted fewer connections at {', '.join(fewer)}")
        if more:
            parts.append(f"it accepted more at {', '.join(more)}")
        if neither:
            parts.append(f"no effect distinguishable at {', '.join(neither)}")
        if ranges:
            parts.append(f"too few repetitions for an interval at {', '.join(ranges)}")
        reach = s.values.get(f"{cfg}.sustained")
        tail = (f"p99 <= {p['p99_target_ms']:g} ms up to {100 * reach:.0f}% of capacity"
                if reach is not None else
                f"p99 above {p['p99_target_ms']:g} ms even at {100 * loads[0]:.0f}% of capacity")
        s.findings.append(f"{cfg}: {'; '.join(parts)} (slopes above); {tail}")
    best = [(s.values.get(f"{cfg}.sustained") or 0.0, cfg) for cfg in cfgs]
    if best:
        load, cfg = max(best)
        s.findings.append(f"best p99 at high load: {cfg} (sustains {100 * load:.0f}% of capacity at "
                          f"p99 <= {p['p99_target_ms']:g} ms)")
    s.add_skipped(notes.skipped, title="Configurations not run")
    return s


def figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    from parallelnet.experiments import plots

    p = ctx.params
    cfgs = ctx.notes.ran
    p99, slopes = {}, {}
    for cfg in cfgs:
        b, m, st = cfg.split("/")
        pts, sp = [], []
        for load in p["loads"]:
            v = summary.values.get(f"{cfg}.load={load:.2f}")
            if v and v["p99"]:
                pts.append((100 * load, v["p99"]["median"] / 1000, v["p99"]["min"] / 1000,
                            v["p99"]["max"] / 1000))
            if v and v["slope"]:
                sl = v["slope"]
                sp.append((100 * load, sl["estimate"], sl["interval"][0], sl["interval"][1]))
        p99[f"{b} {m}|{st}"] = pts
        slopes[f"{b} {m}|{st}"] = sp
    panels = sorted({f"{c.split('/')[0]} {c.split('/')[1]}" for c in cfgs})
    return [plots.lines(p99, f"{ctx.outdir}/balance-p99.png", "utilisation of measured capacity (%)",
                        "p99 of long-lived requests (ms)", title="Tail latency against load",
                        panels=panels),
            plots.lines(slopes, f"{ctx.outdir}/balance-slope.png", "utilisation (%)",
                        "accept share per unit busy fraction (lag 0.25 s)",
                        title="Does the busier worker accept fewer? (negative: yes)", panels=panels)]


STRATEGIES = ["shared", "exclusive", "exclusive-rotate", "reuseport", "dispatch"]
WORKLOAD = dict(service="exp:200", heavy_service="fixed:1000", heavy_connections=2, long_connections=16,
                churn_service="exp:200", requests_per_conn=20, churn_share=0.4, churn_slots=64,
                dispatch_policy="least-connections", p99_target_ms=10.0, interval=0.25,
                overhead_default_us=30.0)

EXPERIMENT = Experiment(
    name="balance", title="Does load even out by itself?  The accept race under server-bound load",
    presets={
        "smoke": dict(configs=["epoll/process/shared", "epoll/process/reuseport"], loads=[0.5],
                      reps=1, duration=1.5, warmup=0.5, aa="epoll/process/shared/load=0.50",
                      **WORKLOAD),
        "standard": dict(configs=[f"epoll/process/{s}" for s in STRATEGIES]
                         + ["epoll/thread/shared", "native/thread/shared", "native/thread/reuseport"],
                         loads=[0.5, 0.7, 0.85, 0.95], reps=8, duration=3.0, warmup=1.0,
                         aa="epoll/process/shared/load=0.70", **WORKLOAD),
        "full": dict(configs=[f"epoll/process/{s}" for s in STRATEGIES]
                     + [f"uring/process/{s}" for s in ("shared", "reuseport", "dispatch")]
                     + ["epoll/thread/shared", "uring/thread/shared", "native/thread/shared",
                        "native/thread/exclusive", "native/thread/reuseport", "native/thread/dispatch"],
                     loads=[0.3, 0.5, 0.7, 0.85, 0.95], reps=12, duration=5.0, warmup=1.0,
                     aa="epoll/process/shared/load=0.70", **WORKLOAD),
    },
    plan=plan, run_point=run_point, summarize=summarize, figures=figures,
    pyperf_value=server_cpu_per_request,
    pyperf_name=lambda r: (r["config"].rsplit("/load=", 1)[0]
                           + f"/rate={r['rates']['total_rate']:.0f}" if r.get("rates") else r["config"]),
    aa_metric=client_p99,   # the figure strategies are compared by
    description="long-lived skewed connections plus churn, load 50-95% of measured capacity; "
                "slope of accept share on busy fraction, p99 per strategy")
