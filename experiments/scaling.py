"""scaling: does thread-per-core with one shared socket scale across CPUs, in Python?

Workers 1, 2, 4, ... up to the number of server CPUs, as threads of one process and as
forked processes sharing the socket, for every backend: throughput at saturation (closed
loop, 64-byte echo, many connections) and server CPU per request.  Under the GIL, threads
of a Python loop contend for one interpreter lock on every recv/send; processes do not; a
backend whose loop runs in C with the GIL released (``native``, ``native-uring``, and
``uring``'s event core between batches) is the one that can scale as threads.

Layout: the load generator takes the last half of the CPUs (one thread per CPU), the
server the first half; the worker counts are the powers of two up to the number of server
CPUs.  On a 2-core machine that is 1 worker on CPU 0 with the client on CPU 1, plus 2
workers over both CPUs with the client sharing CPU 1: both points are client-bound or
shared, and the summary says so - the throughput question needs more cores.  The same
command runs unchanged on a 16-core machine (8 + 8), where it answers it:

    parallelnet experiment scaling --preset standard

``experiments/device/scaling.sh`` is the prepared one-call script for a lent 16-core
machine with no network (wheels carried, a results directory written under $OUT).
"""

from __future__ import annotations

import os

from parallelnet.experiments import analysis
from parallelnet.experiments.analysis import row_bound
from parallelnet.experiments.framework import (
    server_cpu_per_request,
    Context, Experiment, Point, Summary, Table, available_backends, rotated,
)
from parallelnet.experiments.measure import Layout


def layout_for(n: int) -> Layout:
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


def plan(p: dict) -> list[Point]:
    backends, skipped = available_backends(p["backends"])
    p["skipped"] = skipped
    from parallelnet.backends.base import registry

    reg = registry()
    cfgs = [(b, m) for b in backends for m in p["modes"] if m in reg[b].modes]
    p["ran"] = [f"{b}/{m}" for b, m in cfgs]
    p["worker_counts"] = counts = worker_counts(p)
    per = p["warmup"] + p["duration"] + 0.4
    points = []
    for rep in range(p["reps"]):
        for n in counts:
            for b, m in rotated(cfgs, rep):
                points.append(Point(f"{b}/{m}/w={n}", rep, {"backend": b, "mode": m, "workers": n},
                                    est_s=per + 0.1 * n))
    return points


def run_point(point: Point, ctx: Context) -> dict:
    p, q = ctx.params, point.params
    layout = layout_for(q["workers"])
    args = ["--backend", q["backend"], "--mode", q["mode"], "--workers", str(q["workers"]),
            "--message-size", str(p["size"])]
    threads = len(layout.client)
    conns = max(threads, p["connections_per_worker"] * q["workers"])
    rec = ctx.measure(args, {"mode": "closed", "connections": conns, "threads": threads,
                             "size": p["size"], "duration": p["duration"], "warmup": p["warmup"]},
                      layout, point.label().replace("/", "_").replace(" ", "-"))
    rec["connections"] = conns
    return rec

def summarize(records: list[dict], p: dict) -> Summary:
    s = Summary()
    counts = p.get("worker_counts") or sorted({r["params"]["workers"] for r in records})
    cfgs = p.get("ran") or sorted({f"{r['params']['backend']}/{r['params']['mode']}" for r in records})
    rows = []
    for cfg in cfgs:
        base = None
        for n in counts:
            rs = [r for r in records if r["config"] == f"{cfg}/w={n}"]
            if not rs:
                continue
            used, dropped, all_noisy = analysis.prefer_quiet(rs, lambda r: r["noise"]["noisy"])
            rps = analysis.median_range(r["rps"] for r in used)
            cpu = analysis.median_range(r["server"]["cpu_us_per_req"] for r in used)
            bounds = [r["bound"] for r in used]
            bound = row_bound(bounds)
            shared = any(set(r["layout"]["server"]) & set(r["layout"]["client"]) for r in used)
            if n == counts[0]:
                base = rps
            speedup = rps["median"] / base["median"] if base and base["median"] else None
            s.values[f"{cfg}.w={n}"] = {"rps": rps, "cpu": cpu, "bound": bound, "speedup": speedup,
                                         "shared_cpu": shared}
            rows.append([*cfg.split("/"), str(n), str(len(used)),
                         f"{rps['median']:.0f} ({rps['min']:.0f}–{rps['max']:.0f})",
                         f"{speedup:.2f}" if speedup else "–",
                         f"{cpu['median']:.2f}" if cpu else "–",
                         bound + (", client shares a server CPU" if shared else "")
                         + (", noisy" if all_noisy else "")])
    s.tables.append(Table(
        "Throughput at saturation and server CPU per request vs workers",
        ["backend", "mode", "workers", "n", "req/s (min–max)", "× 1 worker", "server µs/req", "bound"],
        rows, note="A client-bound or shared-CPU row measures the client as much as the server.",
        key="all"))
    top = counts[-1]
    for cfg in cfgs:
        v = s.values.get(f"{cfg}.w={top}")
        if v and v["speedup"] and top > 1:
            s.findings.append(f"{cfg}: {top} workers gave ×{v['speedup']:.2f} the req/s of one "
                              f"({v['bound']}-bound{', client on a server CPU' if v['shared_cpu'] else ''})")
    s.add_skipped(p.get("skipped"))
    return s


def figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    from parallelnet.experiments import plots

    p = ctx.params
    counts = p.get("worker_counts") or []
    series = {}
    for cfg in p.get("ran") or []:
        b, m = cfg.split("/")
        pts = []
        for n in counts:
            v = summary.values.get(f"{cfg}.w={n}")
            if v:
                pts.append((n, v["rps"]["median"] / 1e3, v["rps"]["min"] / 1e3, v["rps"]["max"] / 1e3))
        series[f"{m}|{b}"] = pts
    return [plots.lines(series, f"{ctx.outdir}/scaling.png", "workers", "thousand requests/s",
                        title=f"Saturation throughput vs workers ({os.cpu_count()} CPUs)",
                        panels=[m for m in p["modes"]])]


EXPERIMENT = Experiment(
    name="scaling", title="Scaling across CPUs: workers 1..N, threads vs processes",
    presets={
        "smoke": dict(backends=["epoll", "native"], modes=["thread", "process"], workers=[1, 2],
                      connections_per_worker=16, size=64, reps=1, duration=0.6, warmup=0.3),
        "standard": dict(backends="all", modes=["thread", "process"], workers="auto",
                         connections_per_worker=64, size=64, reps=3, duration=2.0, warmup=0.5),
        "full": dict(backends="all", modes=["thread", "process"], workers="auto",
                     connections_per_worker=64, size=64, reps=5, duration=4.0, warmup=1.0),
    },
    plan=plan, run_point=run_point, summarize=summarize, figures=figures, pyperf_value=server_cpu_per_request,
    description="saturation throughput and CPU/request, 1..N workers, thread and process mode")
