"""load-curve: what each backend costs per request, from light load to saturation.

The figure that ranks backends on a small machine without measuring the client.  One
worker on the server CPU (CPU 0 on a 2-core box), the C load generator on the other,
64-byte echo over 16 connections, and for each backend:

1. **calibration**: a short closed-loop run gives each backend's capacity; the open-loop
   rates are fractions (~10% to ~90%) of the *slowest* backend's capacity, so every
   backend is measured at the same offered loads, all of them below its capacity;
2. **open loop** at each of those rates (and at any fixed rate the preset adds, e.g. the
   40,000 req/s the io_uring issue targets), latency from each request's intended send
   time (no coordinated omission);
3. **saturation**: closed loop, one request in flight per connection.

Per point: server CPU per request (exact schedstat total of the server process, with
the tick-sampled user/sys split), p50/p99/p99.9, the achieved rate, and the bottleneck
(experiments.measure.bottleneck): a point whose client CPU was saturated is marked and
never ranked.  Backends alternate within each (repetition, load) in rotated order, a
fresh server each time; ratios to the baseline (``native``, the C ceiling, and
``epoll``) are paired within a repetition and summarised as experiments/analysis.py
defines: a t interval on the log-ratios from 8 pairs, the range of the pairs below that.

``compare`` (``make run``) is this experiment with one fixed rate below every backend's
capacity plus saturation, every available backend, the ratio to ``native``.
"""

from __future__ import annotations

import statistics

from parallelnet.experiments import analysis
from parallelnet.experiments.analysis import row_bound
from parallelnet.experiments.framework import (
    add_aa_twin,
    Context, Experiment, Plan, PlanNotes, Point, Summary, Table, labelled_configs, rotated,
    server_cpu_per_request,
)
from parallelnet.experiments.measure import Layout

RANKABLE = ("offered", "server", "gil")   # a client-bound point ranks the client, not the server


def load_label(kind: str, value) -> str:
    if kind == "frac":
        return f"load={value:.2f}"
    if kind == "rate":
        return f"rate={int(value)}"
    if kind == "closed":
        return f"closed={int(value)}"
    return "sat"

def plan(p: dict) -> Plan:
    cfgs, notes = labelled_configs(p)
    per = p["warmup"] + p["duration"] + 0.4
    points = []
    if any(k == "frac" for k, _ in p["loads"]):
        points += [Point(f"calibrate/{label}", 0, {"label": label, "backend": b, "args": a,
                                                   "kind": "calibrate"},
                         est_s=p["calibrate_s"] + 1.5) for label, b, a in cfgs]
    for rep in range(p["reps"]):
        for kind, value in p["loads"]:
            for label, b, a in rotated(cfgs, rep):
                points.append(Point(f"{label}/{load_label(kind, value)}", rep,
                                    {"label": label, "backend": b, "args": a, "kind": kind,
                                     "value": value}, est_s=per))
    return Plan(add_aa_twin(points, p.get("aa")), notes)


def run_point(point: Point, ctx: Context) -> dict:
    p, q = ctx.params, point.params
    layout = Layout.default(1)
    server = ["--backend", q["backend"], "--workers", "1", "--message-size", str(p["size"]),
              *q.get("args", []), *p.get("server_args", [])]
    base = {"connections": p["connections"], "size": p["size"], "warmup": p["warmup"],
            "duration": p["duration"]}
    if q["kind"] == "calibrate":
        rec = ctx.measure(server, {**base, "mode": "closed", "duration": p["calibrate_s"],
                                   "warmup": 0.3}, layout, point.label().replace("/", "_"))
        ctx.state.setdefault("capacity", {})[q.get("label", q["backend"])] = rec["rps"]
        return rec
    if q["kind"] == "sat":
        load = {**base, "mode": "closed"}
    elif q["kind"] == "closed":   # a closed loop over this many connections (1: ping-pong)
        load = {**base, "mode": "closed", "connections": int(q["value"])}
    else:
        rate = q["value"] if q["kind"] == "rate" else q["value"] * capacity_floor(ctx)
        load = {**base, "mode": "open", "rate": round(rate)}
    rec = ctx.measure(server, load, layout, point.label().replace("/", "_").replace(" ", "-"))
    rec["offered"] = load.get("rate")
    return rec


def capacity_floor(ctx: Context) -> float:
    caps = ctx.state.get("capacity") or {}
    if not caps:
        raise RuntimeError("no backend's capacity was measured (every calibration failed)")
    return min(caps.values())


def pyperf_value(rec: dict):
    if rec["params"].get("kind") == "calibrate":
        return None
    return server_cpu_per_request(rec)


# -- summary ------------------------------------------------------------------------

def _label(r: dict) -> str:
    return r["params"].get("label", r["params"]["backend"])


def _cpu(r):
    return r["server"]["cpu_us_per_req"]


def row_stats(rs: list[dict]) -> dict:
    """The medians (and spread) of one configuration's repetitions."""
    used, dropped, all_noisy = analysis.prefer_quiet(rs, lambda r: r["noise"]["noisy"])
    lat = lambda k: statistics.median(r["client"]["latency_us"][k] for r in used)  # noqa: E731
    bounds = [r["bound"] for r in used]
    return {
        "n": len(used), "noisy_dropped": dropped, "all_noisy": all_noisy,
        "cpu": analysis.median_range(_cpu(r) for r in used),
        "user": statistics.median(r["server"]["user_us_per_req"] or 0 for r in used),
        "sys": statistics.median(r["server"]["sys_us_per_req"] or 0 for r in used),
        "rps": statistics.median(r["rps"] for r in used),
        "offered": used[0].get("offered"),
        "p50": lat("p50"), "p99": lat("p99"), "p99.9": lat("p99.9"),
        # the latency samples behind those percentiles, in the thinnest repetition
        "samples": analysis.fewest_samples(analysis.latency_samples(r) for r in used),
        "server_util": statistics.median(r["server"]["cpu_util"] for r in used),
        "client_util": statistics.median(r["client"]["cpu_util"] for r in used),
        "bound": row_bound(bounds),
        "rankable": all(b in RANKABLE for b in bounds),
        "rate_met": all(r["client"]["rate_met"] for r in used if r["client"]["mode"] == "open"),
        "errors": sum(r["client"]["errors"] for r in rs),
    }


def paired_ratio(records: list[dict], config_a: str, config_b: str) -> dict | None:
    """config_a / config_b server CPU per request, paired per repetition, over the
    repetitions where both were rankable and quiet (all of them if none was quiet)."""
    def by_rep(cfg):
        return {r["rep"]: r for r in records if r["config"] == cfg}

    a, b = by_rep(config_a), by_rep(config_b)
    pairs = [(a[k], b[k]) for k in sorted(set(a) & set(b))
             if a[k]["bound"] in RANKABLE and b[k]["bound"] in RANKABLE]
    used, _, _ = analysis.prefer_quiet(pairs, lambda ab: ab[0]["noise"]["noisy"] or ab[1]["noise"]["noisy"])
    return analysis.ratio_summary([_cpu(x) / _cpu(y) for x, y in used if _cpu(y)])


def paired_p99_diff(records: list[dict], config_a: str, config_b: str) -> dict | None:
    """p99(a) - p99(b) in µs, paired per repetition over the rankable pairs
    (analysis.diff_summary: a t interval from 8 pairs, else the range; the latency side of
    a CPU ratio)."""
    a = {r["rep"]: r for r in records if r["config"] == config_a}
    b = {r["rep"]: r for r in records if r["config"] == config_b}
    diffs = [a[k]["client"]["latency_us"]["p99"] - b[k]["client"]["latency_us"]["p99"]
             for k in sorted(set(a) & set(b))
             if a[k]["bound"] in RANKABLE and b[k]["bound"] in RANKABLE]
    return analysis.diff_summary(diffs)


def loads_of(records: list[dict], p: dict) -> list[str]:
    return [load_label(k, v) for k, v in p["loads"]]


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    curve = [r for r in records if r["params"].get("kind") != "calibrate"]
    backends = notes.ran or sorted({_label(r) for r in curve})
    baselines = [b for b in p.get("baselines", ["native", "epoll"]) if b in backends]
    s = Summary()
    caps = {_label(r): r["rps"] for r in records if r["params"].get("kind") == "calibrate"}
    if caps:
        floor = min(caps.values())
        s.values["capacity_floor"] = floor
        s.values["capacity"] = caps
        s.tables.append(Table(
            "Calibration: closed-loop capacity (req/s), one worker",
            ["backend", "req/s", "bound"],
            [[b, f"{caps[b]:.0f}", next(r["bound"] for r in records if r["config"] == f"calibrate/{b}")]
             for b in sorted(caps, key=caps.get)],
            note=f"Open-loop rates are fractions of the slowest: {floor:.0f} req/s.",
            key="calibration"))
    rows, stats = [], {}
    for load in loads_of(curve, p):
        for b in backends:
            rs = [r for r in curve if r["config"] == f"{b}/{load}"]
            if not rs:
                continue
            st = stats[(b, load)] = row_stats(rs)
            cpu = st["cpu"]
            ratio_cells = []
            for base in baselines:
                if base == b:
                    ratio_cells.append("1")
                    continue
                rr = paired_ratio(curve, f"{b}/{load}", f"{base}/{load}")
                if rr:
                    s.values[f"ratio.{b}.vs.{base}.{load}"] = rr
                dd = paired_p99_diff(curve, f"{b}/{load}", f"{base}/{load}")
                if dd:
                    s.values[f"p99diff.{b}.vs.{base}.{load}"] = dd
                ratio_cells.append(analysis.fmt_ratio(rr) if rr else
                                   ("not ranked (" + st["bound"] + "-bound)" if not st["rankable"] else "–"))
            s.values[f"cpu.{b}.{load}"] = cpu
            s.values[f"lat.{b}.{load}"] = {k: st[k] for k in ("p50", "p99", "p99.9", "samples")}
            s.values[f"bound.{b}.{load}"] = st["bound"]
            flags = []
            if not st["rankable"]:
                flags.append(f"{st['bound']}-bound")
            if not st["rate_met"]:
                flags.append("rate not met")
            if st["all_noisy"]:
                flags.append("noisy")
            elif st["noisy_dropped"]:
                flags.append(f"{st['noisy_dropped']} noisy dropped")
            rows.append([load, b, str(st["n"]),
                         f"{cpu['median']:.2f} ({cpu['min']:.2f}–{cpu['max']:.2f})" if cpu else "–",
                         f"{st['user']:.2f}/{st['sys']:.2f}", f"{st['rps']:.0f}",
                         f"{st['p50']:.0f}", analysis.fmt_tail(st["p99"], st["samples"], 99),
                         analysis.fmt_tail(st["p99.9"], st["samples"], 99.9),
                         f"{100 * st['server_util']:.0f}/{100 * st['client_util']:.0f}",
                         *ratio_cells, ", ".join(flags) or "ok"])
    s.tables.append(Table(
        "Server CPU per request and latency by offered load",
        ["load", "backend", "n", "server µs/req (min–max)", "user/sys µs", "req/s", "p50 µs",
         "p99 µs", "p99.9 µs", "CPU % srv/cli"] + [f"× {b} (paired, 95% CI)" for b in baselines]
        + ["flags"], rows,
        note="load=F: open loop at F × the slowest backend's capacity; rate=R: open loop at R "
             "req/s; sat: closed loop.  Ratios are paired within each repetition; a point whose "
             "client (or both sides) was saturated is not ranked.  " + analysis.tail_note(),
        key="cost"))
    # The same, compact: one row per backend, one column per load (CPU per request and the
    # paired ratio to the first baseline), client-bound cells marked.
    base = baselines[-1] if baselines else None
    rows = []
    for b in backends:
        cells = []
        for load in loads_of(curve, p):
            st = stats.get((b, load))
            if not st or not st["cpu"]:
                cells.append("–")
                continue
            cell = f"{st['cpu']['median']:.1f}"
            rr = s.values.get(f"ratio.{b}.vs.{base}.{load}") if base and b != base else None
            if not st["rankable"]:
                cell += f" ({st['bound']}-bound)"
            elif rr:
                cell += f" ({rr['estimate']:.2f}×)"
            cells.append(cell)
        rows.append([b, *cells])
    if base:
        s.tables.append(Table(
            f"Server CPU µs per request by load, with the paired ratio to {base}",
            ["backend"] + loads_of(curve, p), rows,
            note=f"Median over repetitions; (×): the paired ratio to {base} as the full table "
                 "estimates it (geometric mean from 8 pairs, else the median); a client- or "
                 "both-bound cell is not ranked. Every figure with its spread and latency: the "
                 "full table in the run's summary.md.", key="compact"))
    s.add_skipped(notes.skipped, key="skipped")
    # The 2x2: what io_uring buys (with the protocol in Python / in C) and what C buys.
    pairs = [("io_uring, protocol in Python", "uring", "epoll"),
             ("io_uring, all in C", "native-uring", "native"),
             ("C, readiness (epoll)", "native", "epoll"),
             ("C, completion (io_uring)", "native-uring", "uring")]
    if all(b in backends for b in ("epoll", "uring", "native", "native-uring")):
        rows = []
        for load in loads_of(curve, p):
            cells = []
            for name, a, b in pairs:
                rr = paired_ratio(curve, f"{a}/{load}", f"{b}/{load}")
                s.values[f"twobytwo.{a}.vs.{b}.{load}"] = rr
                cells.append(analysis.fmt_ratio(rr) if rr else "not ranked")
            rows.append([load, *cells])
        s.tables.append(Table(
            "The 2×2: server CPU per request, paired ratios",
            ["load"] + [f"{name}: {a} ÷ {b}" for name, a, b in pairs], rows,
            note="Left two columns: what io_uring buys over epoll; right two: what moving the "
                 "loop and protocol into C buys. Paired ratios: geometric mean [95% CI] from 8 "
                 "pairs, else median [range]; n = pairs; 'not ranked' where a side was "
                 "client-bound.", key="2x2"))
    # Findings: the ranking at each load where every row is rankable.
    for load in loads_of(curve, p):
        ranked = [(stats[(b, load)]["cpu"]["median"], b) for b in backends
                  if (b, load) in stats and stats[(b, load)]["rankable"] and stats[(b, load)]["cpu"]]
        unranked = [b for b in backends if (b, load) in stats and not stats[(b, load)]["rankable"]]
        if ranked:
            order = " < ".join(f"{b} {c:.2f}" for c, b in sorted(ranked))
            s.findings.append(f"{load}: server µs/request {order}"
                              + (f" (not ranked, client-bound or both: {', '.join(unranked)})"
                                 if unranked else ""))
    return s


def figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    from parallelnet.experiments import plots

    p = ctx.params
    curve = [r for r in records if r["params"].get("kind") != "calibrate"]
    backends = ctx.notes.ran or sorted({_label(r) for r in curve})
    series = {}
    for b in backends:
        pts = []
        for load in loads_of(curve, p):
            rs = [r for r in curve if r["config"] == f"{b}/{load}"]
            if not rs:
                continue
            st = row_stats(rs)
            pts.append({"x": st["rps"], "cpu": st["cpu"], "p99": st["p99"], "sat": load == "sat",
                        "rankable": st["rankable"]})
        series[b] = pts
    return [plots.load_curves(series, f"{ctx.outdir}/load-curve.png",
                              title=f"{p['size']} B echo, {p['connections']} connections, one worker")]


def pyperf_name(rec: dict) -> str:
    """A load given as a fraction of a capacity calibrated afresh in each run names its
    absolute rate in pyperf (``load=0.20`` is 12,675 req/s in one run and 36,789 in
    another): ``pyperf compare_to`` then pairs only equal offered loads."""
    label = rec["config"]
    rate = (rec.get("client") or {}).get("rate")
    if "/load=" in label and rate:
        return label.rsplit("/load=", 1)[0] + f"/rate={rate:.0f}"
    return label


def _experiment(name: str, title: str, presets: dict, description: str, cited=True) -> Experiment:
    return Experiment(name=name, title=title, presets=presets, plan=plan, run_point=run_point,
                      summarize=summarize, figures=figures, pyperf_value=pyperf_value,
                      cited=cited, description=description, pyperf_name=pyperf_name,
                      params_doc={"server_args": "extra `parallelnet serve` arguments for every "
                                                 "server of the run (a JSON list)"})


FRACTIONS = [("frac", f) for f in (0.1, 0.3, 0.5, 0.7, 0.9)]

EXPERIMENT = _experiment(
    "load-curve", "Server CPU per request and latency vs offered load",
    {
        "smoke": dict(backends=["epoll", "native"], size=64, connections=16, reps=1,
                      loads=[("frac", 0.2), ("sat", None)], duration=0.6, warmup=0.3,
                      calibrate_s=0.6, baselines=["native", "epoll"], aa=None),
        "standard": dict(backends="all", size=64, connections=16, reps=8,
                         loads=FRACTIONS + [("rate", 40000), ("sat", None)], duration=1.0,
                         warmup=0.4, calibrate_s=1.5, baselines=["native", "epoll"],
                         aa="epoll/rate=40000"),
        "full": dict(backends="all", size=64, connections=16, reps=5,
                     loads=[("frac", f) for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
                     + [("rate", 40000), ("sat", None)], duration=4.0, warmup=1.0,
                     calibrate_s=2.0, baselines=["native", "epoll"], aa="epoll/rate=40000"),
    },
    "open loop at fractions of the slowest backend's capacity, then saturation; every backend")

COMPARE = _experiment(
    "compare", "Every backend at one fixed rate and at saturation (make run)",
    {
        "smoke": dict(backends=["epoll", "native"], size=64, connections=16, reps=1,
                      loads=[("rate", 10000), ("sat", None)], duration=0.5, warmup=0.3,
                      calibrate_s=0, baselines=["native"], aa=None),
        "standard": dict(backends="all", size=64, connections=16, reps=3,
                         loads=[("rate", 20000), ("sat", None)], duration=1.0, warmup=0.3,
                         calibrate_s=0, baselines=["native"], aa=None),
        "full": dict(backends="all", size=64, connections=16, reps=5,
                     loads=[("rate", 20000), ("sat", None)], duration=3.0, warmup=0.5,
                     calibrate_s=0, baselines=["native"], aa=None),
    },
    "every available backend at 20,000 req/s (below every backend's capacity) and at "
    "saturation, with the paired ratio to native", cited=False)


# -- the io_uring batching window ---------------------------------------------------------

BUDGETS = (0, 50, 100, 150, 200, 400)


def window_figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    """Server CPU per request and latency against the window's latency budget (uring),
    with the references as horizontal lines, one panel per load."""
    from parallelnet.experiments import plots

    p = ctx.params
    labels = ctx.notes.ran
    out = figures(summary, records, ctx)
    series = {}
    for kind, value in p["loads"]:
        load = load_label(kind, value)
        pts_cpu: dict[str, list] = {}
        pts_p99: dict[str, list] = {}
        for label in labels:
            fb = budget_of(label)
            cpu = summary.values.get(f"cpu.{label}.{load}")
            lat = summary.values.get(f"lat.{label}.{load}")
            if fb is None or not cpu:
                continue
            family, b = fb
            pts_cpu.setdefault(family, []).append((b, cpu["median"], cpu["min"], cpu["max"]))
            pts_p99.setdefault(family, []).append((b, lat["p99"], lat["p99"], lat["p99"]))
        for family in pts_cpu:
            series[f"{load}: server µs/request|{family}"] = sorted(pts_cpu[family])
            series[f"{load}: p99 µs|{family} windowed"] = sorted(pts_p99[family])
        for ref in p.get("baselines", []):
            cpu = summary.values.get(f"cpu.{ref}.{load}")
            lat = summary.values.get(f"lat.{ref}.{load}")
            if cpu and pts_cpu:
                xs = [x[0] for x in sorted(pts_cpu)]
                series[f"{load}: server µs/request|{ref}"] = [(x, cpu["median"], cpu["min"], cpu["max"]) for x in (xs[0], xs[-1])]
                series[f"{load}: p99 µs|{ref}"] = [(x, lat["p99"], lat["p99"], lat["p99"]) for x in (xs[0], xs[-1])]
    panels = [f"{load_label(k, v)}: {m}" for k, v in p["loads"] for m in ("server µs/request", "p99 µs")]
    out.append(plots.lines(series, f"{ctx.outdir}/uring-window.png", "latency budget (µs)", "",
                           title="io_uring's batching window: CPU per request vs latency",
                           panels=panels, ncols=2))
    return out


def window_summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    """The load curve's summary plus io_uring against epoll *at the same policy*: each
    budget B of uring beside epoll with the same window (backends/window.py), and each
    uring budget against the epoll configuration whose p99 is nearest (matched latency),
    CPU paired per repetition, p99 difference paired too."""
    s = summarize(records, p, notes)
    labels = notes.ran
    fams = {lab: budget_of(lab) for lab in labels}
    uring = {fb[1]: lab for lab, fb in fams.items() if fb and fb[0] == "uring"}
    epoll = {fb[1]: lab for lab, fb in fams.items() if fb and fb[0] == "epoll"}
    if "epoll" in labels:
        epoll.setdefault(0, "epoll")
    for kind, value in p["loads"]:
        load = load_label(kind, value)
        rows = []
        for b in sorted(uring):
            u = uring[b]
            lat_u = s.values.get(f"lat.{u}.{load}")
            if not lat_u:
                continue
            same = epoll.get(b)
            # Matched latency: the epoll configuration whose median p99 is nearest.
            near = min(((abs(s.values[f"lat.{e}.{load}"]["p99"] - lat_u["p99"]), e)
                        for e in epoll.values() if s.values.get(f"lat.{e}.{load}")), default=None)
            cells = [str(b), p50_p99(lat_u)]
            for other in (same, near[1] if near else None):
                if other is None:
                    cells += ["–", "–"]
                    continue
                lat_e = s.values[f"lat.{other}.{load}"]
                rr = paired_ratio(records, f"{u}/{load}", f"{other}/{load}")
                s.values[f"vs.{u}.{other}.{load}"] = rr
                cells += [f"{other}: {p50_p99(lat_e)}", analysis.fmt_ratio(rr)]
            rows.append(cells)
        if rows:
            s.tables.append(Table(
                f"io_uring against epoll at the same batching policy, {load}",
                ["budget µs", "uring p50/p99 µs", "epoll, same budget (p50/p99)",
                 "server CPU uring ÷ it", "epoll at the nearest p99 (p50/p99)",
                 "server CPU uring ÷ it"], rows,
                note="Both windows follow one policy (backends/uring/event_core.c window_nr, backends/window.py); "
                     "epoll's waits out the budget where io_uring returns on a full batch.  Ratios "
                     "paired within each repetition.  " + analysis.tail_note(),
                key=f"policy.{load}"))
    return s


def p50_p99(lat: dict) -> str:
    """``110/225 (38 beyond)``: a configuration's median p50 and p99, the p99 with the
    samples beyond it (analysis.fmt_tail; runs before the count was kept: ``?``)."""
    return f"{lat['p50']:.0f}/{analysis.fmt_tail(lat['p99'], lat.get('samples'), 99)}"


def budget_of(label: str) -> tuple[str, int] | None:
    """``uring-b150`` -> ("uring", 150), ``epoll-b150`` -> ("epoll", 150) (epoll with the
    same window policy, backends/window.py); None for a label that is not a budget point."""
    head, _, tail = label.rpartition("-b")
    return (head, int(tail)) if head in ("uring", "epoll") and tail.isdigit() else None


WINDOW = Experiment(
    name="uring-window", title="io_uring's batching window: the CPU-vs-latency curve",
    presets={
        "smoke": dict(configs=["epoll", "uring", "uring-b0=uring:--uring-latency-budget-us 0"],
                      size=64, connections=16, reps=1, loads=[("rate", 10000)], duration=0.5,
                      warmup=0.3, calibrate_s=0, baselines=["epoll"], aa=None),
        "standard": dict(configs=["epoll", "native", "native-uring", "uring"]
                         + [f"uring-b{b}=uring:--uring-latency-budget-us {b}" for b in BUDGETS]
                         + [f"epoll-b{b}=epoll:--epoll-latency-budget-us {b}" for b in BUDGETS if b],
                         size=64, connections=16, reps=8,
                         loads=[("rate", 40000), ("sat", None), ("closed", 1)],
                         duration=1.5, warmup=0.5, calibrate_s=0, baselines=["epoll", "native"],
                         aa="epoll/rate=40000"),
        "full": dict(configs=["epoll", "native", "native-uring", "uring"]
                     + [f"uring-b{b}=uring:--uring-latency-budget-us {b}" for b in BUDGETS + (25, 300)]
                     + [f"epoll-b{b}=epoll:--epoll-latency-budget-us {b}" for b in BUDGETS + (25, 300) if b],
                     size=64, connections=16, reps=5,
                     loads=[("rate", 20000), ("rate", 40000), ("rate", 80000), ("sat", None)],
                     duration=4.0, warmup=1.0, calibrate_s=0, baselines=["epoll", "native"],
                     aa="epoll/rate=40000"),
    },
    plan=plan, run_point=run_point, summarize=window_summarize, figures=window_figures,
    pyperf_value=pyperf_value, pyperf_name=pyperf_name,
    description="uring at latency budgets 0-400 us vs epoll, native, native-uring: 40k req/s and saturation")
