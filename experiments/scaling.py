"""scaling: what do more workers give, as threads and as processes, when the server is the bottleneck?

The design's third claim is that N workers, one per CPU, multiply throughput.  That can
only be measured where the **server** saturates while the client stays light, so every
request here carries a service time: ``GET /work/US`` burns US µs of the worker's CPU
(core/protocols/http.py; in C for ``native`` and ``native-uring``), and a closed-loop
client keeps ``connections_per_worker`` requests in flight per worker.  At US = 200 a
request costs the client about 10 µs, so one client thread drives about 20 server CPUs'
worth of work before it saturates: the point is server-bound, with the client's share of
its CPU recorded beside it (``client cpu``).

Workers 1, 2, 4, ... up to the number of server CPUs, for each backend in thread mode
(one process: Python loops share the GIL) and process mode (forked workers sharing the
listening socket, nginx's model), under the seed's ``shared`` socket and under
``reuseport``.  The connections are opened together at the start and live for the whole
window, so *which worker serves them* is decided once, by the accept race (``shared``) or
the 4-tuple hash (``reuseport``): the per-worker split of requests is recorded (``max
share``, Jain's index), because a worker left idle caps the speed-up whatever its CPU.  The figure is the **speed-up**: req/s with N workers over
req/s with one, paired within each repetition (8 repetitions in ``standard``: a 95%
interval, analysis.py), plus server CPU per request.  Linear scaling would be N times one
worker's throughput, less what the client takes from a CPU it shares: that estimate
(``≈ ideal``) is printed beside each speed-up.

Layout: on a machine with more than two CPUs, the server takes the first half and the
client the second (one client thread per client CPU); on two CPUs, N = 2 puts a worker on
each CPU and the client shares the second (light, and its own CPU use is in the record:
the bottleneck label judges it by that).  The same command runs unchanged on a 16-core
machine (8 + 8).  A backend with options is named ``LABEL=BACKEND:ARGS`` among ``backends``
(``--set 'backends=["uring","uring-direct=uring:--uring-calls direct"]'``): its rows carry
the label.  Every run carries an A/A control (``epoll/process/shared/w=1`` measured twice
per repetition).
"""

from __future__ import annotations

import os

from parallelnet.core.stats import jain_index
from parallelnet.experiments import analysis
from parallelnet.experiments.analysis import row_bound
from parallelnet.experiments.framework import (
    Context, Experiment, Plan, PlanNotes, Point, Summary, Table, add_aa_twin, parse_config, rotated,
    server_cpu_per_request, strategy_configs,
)
from parallelnet.experiments.measure import Layout


def layout_for(n: int) -> Layout:
    """N workers over the server CPUs (wrapping if there are fewer CPUs than workers)."""
    cpus = sorted(os.sched_getaffinity(0))
    base = Layout.default(1)
    server = base.server if len(cpus) > 2 else cpus
    return Layout([server[i % len(server)] for i in range(n)], base.client)


def worker_counts(p: dict) -> list[int]:
    if p["workers"] != "auto":
        return list(p["workers"])
    cpus = sorted(os.sched_getaffinity(0))
    nserver = len(Layout.default(1).server) if len(cpus) > 2 else len(cpus)
    out, n = [], 1
    while n <= nserver:
        out.append(n)
        n *= 2
    if out[-1] != nserver:
        out.append(nserver)
    return out


def configs(p: dict) -> tuple[list[tuple[str, str, str, str, list[str]]], PlanNotes]:
    """(label, backend, mode, strategy, server args) for every entry of ``backends`` - a
    backend's name, or ``LABEL=BACKEND:ARGS`` for a backend with options (``uring-direct=
    uring:--uring-calls direct``) - × the modes it runs × the strategies it serves."""
    specs = [parse_config(b) for b in p["backends"]] if p["backends"] != "all" else None
    if specs is None:
        cfgs, notes = strategy_configs("all", p["strategies"], p["modes"])
        return [(b, b, m, st, []) for b, m, st in cfgs], notes
    cfgs, notes = strategy_configs(sorted({b for _, b, _ in specs}), p["strategies"], p["modes"])
    served = {(b, m, st) for b, m, st in cfgs}
    out = [(label, b, m, st, args) for label, b, args in specs for m in p["modes"]
           for st in p["strategies"] if (b, m, st) in served]
    notes.ran = [f"{label}/{m}/{st}" for label, _, m, st, _ in out]
    return out, notes


def plan(p: dict) -> Plan:
    cfgs, notes = configs(p)
    notes.derived["worker_counts"] = counts = worker_counts(p)
    per = p["warmup"] + p["duration"] + 0.8
    points = []
    for rep in range(p["reps"]):
        for n in counts:
            for label, backend, m, st, args in rotated(cfgs, rep):
                q = {"backend": backend, "mode": m, "strategy": st, "workers": n}
                if args:
                    q["args"] = args
                points.append(Point(f"{label}/{m}/{st}/w={n}", rep, q, est_s=per + 0.1 * n))
    return Plan(add_aa_twin(points, p.get("aa")), notes)


def run_point(point: Point, ctx: Context) -> dict:
    p, q = ctx.params, point.params
    layout = layout_for(q["workers"])
    args = ["--backend", q["backend"], "--mode", q["mode"], "--workers", str(q["workers"]),
            "--accept", q.get("strategy", "shared"), "--protocol", "http", *q.get("args", [])]
    threads = len(layout.client)
    conns = max(threads, p["connections_per_worker"] * q["workers"])
    rec = ctx.measure(args, {"mode": "closed", "protocol": "http", "path": f"/work/{p['service_us']}",
                             "connections": conns, "threads": threads,
                             "duration": p["duration"], "warmup": p["warmup"]},
                      layout, point.label().replace("/", "_").replace(" ", "-").replace("~", "-"))
    rec["connections"] = conns
    # What linear scaling would give here, roughly: N CPUs less the client's share of a CPU
    # it shares with a worker (an estimate, not a bound).
    shared = len(set(layout.server) & set(layout.client))
    rec["ceiling_cpus"] = len(set(layout.server)) - (rec["client"]["cpu_util"] if shared else 0.0)
    reqs = [w["requests"] for w in rec.get("workers") or []]
    rec["request_share_max"] = max(reqs) / sum(reqs) if reqs and sum(reqs) else None
    rec["request_jain"] = jain_index(reqs) if reqs and sum(reqs) else None
    return rec


def _speedups(records: list[dict], cfg: str, n: int, base: int) -> dict | None:
    """rps(N) / rps(base), paired within each repetition."""
    a = {r["rep"]: r["rps"] for r in records if r["config"] == f"{cfg}/w={n}"}
    b = {r["rep"]: r["rps"] for r in records if r["config"] == f"{cfg}/w={base}"}
    return analysis.ratio_summary(analysis.paired(a, b))


def upgrade(records: list[dict], p: dict, notes: PlanNotes) -> None:
    """Runs from before the server-bound workload and the strategies (2026-11: 64-byte echo,
    the shared socket): their records are renamed in place to today's configurations."""
    if "strategies" in p:
        return
    p["strategies"] = ["shared"]
    notes.ran = [f"{c}/shared" for c in notes.ran]
    for r in records:
        r["params"].setdefault("strategy", "shared")
        q = r["params"]
        r["config"] = f"{q['backend']}/{q['mode']}/{q['strategy']}/w={q['workers']}"


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    s = Summary()
    upgrade(records, p, notes)
    counts = notes.derived.get("worker_counts") or sorted({r["params"]["workers"] for r in records})
    cfgs = notes.ran or sorted({f"{r['params']['backend']}/{r['params']['mode']}/"
                                   f"{r['params'].get('strategy', 'shared')}" for r in records})
    rows = []
    for cfg in cfgs:
        for n in counts:
            rs = [r for r in records if r["config"] == f"{cfg}/w={n}"]
            if not rs:
                continue
            used, dropped, all_noisy = analysis.prefer_quiet(rs, lambda r: r["noise"]["noisy"])
            rps = analysis.median_range(r["rps"] for r in used)
            cpu = analysis.median_range(r["server"]["cpu_us_per_req"] for r in used)
            client = analysis.median_range(r["client"]["cpu_util"] for r in used)
            ceiling = analysis.median_range(r.get("ceiling_cpus") for r in used)
            share = analysis.median_range(r.get("request_share_max") for r in used)
            bound = row_bound([r["bound"] for r in used])
            shared = any(set(r["layout"]["server"]) & set(r["layout"]["client"]) for r in used)
            speedup = _speedups(records, cfg, n, counts[0]) if n != counts[0] else None
            s.values[f"{cfg}.w={n}"] = {"rps": rps, "cpu": cpu, "bound": bound, "speedup": speedup,
                                         "shared_cpu": shared, "client_util": client,
                                         "ceiling": ceiling, "share_max": share}
            rows.append([*cfg.split("/"), str(n), str(len(used)),
                         f"{rps['median']:.0f} ({rps['min']:.0f}–{rps['max']:.0f})",
                         analysis.fmt_ratio(speedup) if speedup else "1",
                         f"{ceiling['median']:.2f}" if ceiling else "–",
                         f"{100 * share['median']:.0f}% ({100 * share['min']:.0f}–{100 * share['max']:.0f})"
                         if share else "–",
                         f"{cpu['median']:.1f}" if cpu else "–",
                         f"{100 * client['median']:.0f}%" if client else "–",
                         bound + (", client shares a server CPU" if shared else "")
                         + (", noisy" if all_noisy else "")])
    workload = (f"GET /work/{p['service_us']}" + (", server-bound" if p["service_us"] else "")
                if "service_us" in p else f"{p.get('size', 64)}-byte echo")   # older runs: echo
    s.tables.append(Table(
        f"Throughput vs workers ({workload}, closed loop)",
        ["backend", "mode", "accept", "workers", "n", "req/s (min–max)",
         f"× {counts[0] if counts else 1} worker", "≈ ideal ×", "busiest worker's share",
         "server µs/req", "client cpu", "bound"],
        rows, note="Speed-ups are paired within each repetition: a 95% CI from 8 repetitions "
                   "on, else the range.  ≈ ideal: N CPUs less the client's measured share of a "
                   "CPU it shares with a worker - an estimate of linear scaling, not a bound "
                   "(a speed-up a little above it is within its error).  A client-bound row "
                   "measures the client.",
        key="all"))
    top = counts[-1] if counts else 1
    for cfg in cfgs:
        v = s.values.get(f"{cfg}.w={top}")
        if v and v["speedup"] and top > 1:
            ceiling = f"≈ ideal ×{v['ceiling']['median']:.2f}; " if v["ceiling"] else ""
            s.findings.append(
                f"{cfg}: {top} workers gave {analysis.fmt_ratio(v['speedup'])} the req/s of "
                f"{counts[0]} ({ceiling}{v['bound']}-bound, client "
                f"{100 * v['client_util']['median']:.0f}% of a CPU"
                f"{', on a server CPU' if v['shared_cpu'] else ''})")
    s.add_skipped(notes.skipped)
    return s


def figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    from parallelnet.experiments import plots

    p = ctx.params
    upgrade(records, p, ctx.notes)
    counts = ctx.notes.derived.get("worker_counts") or []
    series = {}
    for cfg in ctx.notes.ran:
        b, m, st = cfg.split("/")
        pts = []
        for n in counts:
            v = summary.values.get(f"{cfg}.w={n}")
            if v:
                pts.append((n, v["rps"]["median"] / 1e3, v["rps"]["min"] / 1e3, v["rps"]["max"] / 1e3))
        series[f"{m}|{b} {st}"] = pts
    return [plots.lines(series, f"{ctx.outdir}/scaling.png", "workers", "thousand requests/s",
                        title=(("Server-bound throughput" if p["service_us"] else "Throughput")
                               + f" vs workers (GET /work/{p['service_us']}, "
                               if "service_us" in p else "Throughput vs workers (echo, ")
                              + f"{os.cpu_count()} CPUs)",
                        panels=[m for m in p["modes"]])]


BACKENDS = ["epoll", "uring", "native", "native-uring", "asyncio"]

EXPERIMENT = Experiment(
    name="scaling", title="Scaling across CPUs, server-bound: workers 1..N, threads vs processes",
    presets={
        "smoke": dict(backends=["epoll", "native"], modes=["thread", "process"], workers=[1, 2],
                      strategies=["shared"], connections_per_worker=4, service_us=200, reps=1,
                      duration=0.5, warmup=0.3, aa="epoll/process/shared/w=1"),
        "standard": dict(backends=BACKENDS, modes=["thread", "process"], workers="auto",
                         strategies=["shared", "reuseport"], connections_per_worker=16,
                         service_us=200, reps=8, duration=1.5, warmup=0.5,
                         aa="epoll/process/shared/w=1"),
        "full": dict(backends="all", modes=["thread", "process"], workers="auto",
                     strategies=["shared", "reuseport"], connections_per_worker=16,
                     service_us=200, reps=12, duration=3.0, warmup=1.0,
                     aa="epoll/process/shared/w=1"),
    },
    plan=plan, run_point=run_point, summarize=summarize, figures=figures,
    pyperf_value=server_cpu_per_request,
    description="server-bound throughput (GET /work/US) and CPU/request, 1..N workers, thread and process mode")
