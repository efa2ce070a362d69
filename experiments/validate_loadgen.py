"""Validate the load generator (issue 4): byte-exact echo, wrk cross-check, capacity,
pipelining, open-loop pacing.  Reproduces the numbers in docs/loadgen.md.

    parallelnet experiment validate_loadgen --preset standard

Server: ``parallelnet serve --cpus 0 --workers 1`` (one pinned worker on CPU 0); client:
the C load generator's threads pinned to CPU 1 (``LoadSpec.cpus``), or ``wrk`` under
``taskset -c 1``.  One point per step item: ``echo/size=N`` (byte-exactness at that size),
``wrk/BACKEND`` (wrk then the load generator against one server, once per repetition),
``capacity/cCxdD`` (closed loop, C connections, depth D), ``open`` (closed loops of 1 and
16 connections, then open loops at fractions of the capacity the first capacity point
measured).  Every measured window carries /proc/stat deltas (steal, softirq, and CPU used
by neither the server nor the client) so a noisy run can be recognised; server CPU per
request comes from the server's own stats records inside each window.  Without ``wrk`` on
the PATH the cross-check is left out (plan notes).  The records hold the same fields the
stand-alone script wrote into its JSON files; the paper still cites a run of that script.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import time

from parallelnet.experiments.framework import (
    Context, Experiment, Plan, PlanNotes, Point, Summary, Table,
)
from parallelnet.experiments.loadgen import LoadSpec, run
from parallelnet.experiments.noise import NoiseProbe
from parallelnet.experiments.server import ServerHandle, window

SERVER_CPU, CLIENT_CPU = 0, 1


# ---- server and measurement --------------------------------------------------------------

@contextlib.contextmanager
def serving(ctx: Context, backend: str, protocol: str, extra=()):
    """``parallelnet serve`` pinned to SERVER_CPU, with stats records every 0.25 s."""
    srv = ctx.server(["--backend", backend, "--protocol", protocol, "--workers", "1",
                      "--cpus", str(SERVER_CPU), *extra],
                     f"{backend}-{protocol}-{time.monotonic_ns()}", cpus={SERVER_CPU})
    try:
        yield srv
    finally:
        ctx.stop_server(srv)


def measured(srv: ServerHandle, fn, warmup: float = 0.0):
    """Run ``fn()``; return (its result, the server's window totals, machine noise).

    The server's CPU per request comes from its own stats records inside the measured
    part of the call (after ``warmup``), as in every experiment."""
    probe = NoiseProbe([os.getpid(), *srv.worker_pids()]).start()
    t0 = time.monotonic()
    out = fn()
    t1 = time.monotonic()
    noise = probe.stop()
    try:
        win = window(srv.stats_path, t0 - srv.t_listen + warmup, t1 - srv.t_listen)["total"]
    except RuntimeError:
        win = None  # too short a window for two records
    return out, win, noise


def lg(port: int, **kw):
    spec = LoadSpec(port=port, cpus=[CLIENT_CPU], threads=1, **kw)
    return run(spec)


def summary(r, win: dict | None = None, noise: dict | None = None) -> dict:
    d = {
        "requests": r.requests, "rps": round(r.rps, 1), "errors": r.errors_total,
        "error_kinds": {k: v for k, v in r.errors.items() if v},
        "non2xx": r.non2xx, "ok": r.ok, "rate_met": r.rate_met,
        "target_rate": r.target_rate, "achieved_rate": round(r.achieved_rate, 1),
        "p50_us": r.latency.get("p50"), "p99_us": r.latency.get("p99"),
        "p999_us": r.latency.get("p99.9"), "max_us": r.latency_max_us,
        "client_cpu_us_per_req": r.client_cpu_us_per_req,
        "bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received,
        "spec": r.spec, "latency": r.latency,
    }
    if win is not None:
        d["server_cpu_us_per_req"] = round(win["cpu_us_per_req"], 2)
    if noise is not None:
        d["noise"] = noise
        d["noisy"] = noise["noisy"]
    return d


# ---- the steps, one point each --------------------------------------------------------------

def echo_size(p: dict, ctx: Context, size: int) -> dict:
    with serving(ctx, "native", "echo") as srv:
        conns = 4 if size >= 65536 else 16
        r = lg(srv.port, size=size, connections=conns, duration=p["short"], warmup=0.5)
    d = summary(r)
    # Every response byte is compared with what was sent (loadgen.c); a mismatch aborts
    # the run.  bytes_sent/received count different windows, so they differ.
    d.update(size=size, byte_exact=r.ok and r.errors.get("echo_mismatch", 0) == 0
             and r.requests > 0)
    if not d["byte_exact"]:
        raise RuntimeError(f"echo {size} B: not byte-exact ({r.requests} requests, "
                           f"errors {d['error_kinds']})")
    return d


def wrk(port: int, conns: int, duration: float) -> dict:
    cmd = ["taskset", "-c", str(CLIENT_CPU), "wrk", "-t1", f"-c{conns}", f"-d{int(duration)}s",
           "--latency", f"http://127.0.0.1:{port}/"]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    total = re.search(r"(\d+) requests in", p.stdout)
    m = re.search(r"Requests/sec:\s+([\d.]+)", p.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", p.stdout)
    errs = re.search(r"Socket errors:.*", p.stdout)
    return {"cmd": " ".join(cmd), "rps": float(m.group(1)) if m else None,
            "client_cpu_s": round(cpu, 3),
            "client_cpu_us_per_req": round(cpu * 1e6 / int(total.group(1)), 2) if total else None,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errs.group(0) if errs else "", "stdout": p.stdout}


def wrk_pair(p: dict, ctx: Context, backend: str) -> dict:
    """wrk, then the load generator, against one server: one pair of the cross-check."""
    with serving(ctx, backend, "http") as srv:
        w, wwin, wnoise = measured(srv, lambda: wrk(srv.port, 64, p["duration"]))
        w.update(noise=wnoise, noisy=wnoise["noisy"])
        if wwin:
            w["server_cpu_us_per_req"] = round(wwin["cpu_us_per_req"], 2)
        r, win, noise = measured(srv, lambda: lg(srv.port, protocol="http", connections=64,
                                                 duration=p["duration"], warmup=1.0), 1.0)
    return {"backend": backend, "wrk": w, "loadgen": summary(r, win, noise)}


def capacity(p: dict, ctx: Context, conns: int, depth: int) -> dict:
    with serving(ctx, "native", "echo", ["--message-size", "64"]) as srv:
        r, win, noise = measured(srv, lambda: lg(srv.port, size=64, connections=conns, depth=depth,
                                                 duration=p["duration"], warmup=1.0), 1.0)
    d = summary(r, win, noise)
    d.update(connections=conns, depth=depth)
    ctx.state.setdefault("capacity_rps", r.rps)   # the first capacity point's: open's reference
    return d


def open_loop(p: dict, ctx: Context) -> dict:
    out = []
    with serving(ctx, "native", "echo", ["--message-size", "64"]) as srv:
        for conns in (1, 16):
            r = lg(srv.port, size=64, connections=conns, duration=p["duration"], warmup=1.0)
            d = summary(r)
            d.update(kind=f"closed depth 1, {conns} connection{'s' if conns > 1 else ''}")
            out.append(d)
        # "Above capacity" must be above it: the larger of the two closed-loop measurements
        # (a transiently slow capacity run must not turn 2x into a rate the server can meet).
        cap = max(ctx.state.get("capacity_rps", 0.0), r.rps)
        for frac in p["open_fractions"]:
            rate = round(cap * frac, -2)
            r = lg(srv.port, size=64, connections=16, mode="open", rate=rate,
                   duration=p["duration"], warmup=1.0)
            d = summary(r)
            d.update(kind=f"open {frac:g}x capacity", fraction=frac,
                     achieved_error_pct=round((r.achieved_rate - rate) / rate * 100, 3))
            out.append(d)
    return {"runs": out}


# ---- the experiment --------------------------------------------------------------------------

def plan(p: dict) -> Plan:
    notes = PlanNotes()
    if len(os.sched_getaffinity(0)) < 2:
        notes.skipped["validate_loadgen"] = "needs two CPUs (server on 0, client on 1)"
        return Plan([], notes)
    steps = p["steps"]
    points = []
    if "echo" in steps:
        points += [Point(f"echo/size={n}", 0, {"step": "echo", "size": n}, est_s=p["short"] + 1)
                   for n in p["echo_sizes"]]
    if "wrk" in steps:
        if shutil.which("wrk"):
            points += [Point(f"wrk/{b}", rep, {"step": "wrk", "backend": b},
                             est_s=2 * p["duration"] + 3)
                       for rep in range(p["repeat"]) for b in p["wrk_backends"]]
        else:
            notes.skipped["wrk"] = "wrk not installed: no cross-check"
    if "capacity" in steps:
        points += [Point(f"capacity/c{c}xd{d}", 0, {"step": "capacity", "connections": c, "depth": d},
                         est_s=p["duration"] + 2) for c, d in p["capacity_configs"]]
    if "open" in steps:
        points.append(Point("open", 0, {"step": "open"},
                            est_s=(2 + len(p["open_fractions"])) * (p["duration"] + 1) + 1))
    notes.ran = list(dict.fromkeys(pt.config for pt in points))
    return Plan(points, notes)


def run_point(point: Point, ctx: Context) -> dict:
    p, q = ctx.params, point.params
    if q["step"] == "echo":
        return echo_size(p, ctx, q["size"])
    if q["step"] == "wrk":
        return wrk_pair(p, ctx, q["backend"])
    if q["step"] == "capacity":
        return capacity(p, ctx, q["connections"], q["depth"])
    return open_loop(p, ctx)


def _f(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    s = Summary()
    by_step: dict[str, list[dict]] = {}
    for r in records:
        by_step.setdefault(r["params"]["step"], []).append(r)
    echo = by_step.get("echo", [])
    if echo:
        s.tables.append(Table("Byte-exact echo", ["bytes", "connections", "requests", "byte-exact"],
                              [[str(r["size"]), str(r["spec"]["connections"]), str(r["requests"]),
                                "yes" if r["byte_exact"] else "**no**"] for r in echo], key="echo"))
    rows = []
    for b in dict.fromkeys(r["backend"] for r in by_step.get("wrk", [])):
        runs = [r for r in by_step["wrk"] if r["backend"] == b]
        wm = statistics.median(r["wrk"]["rps"] or 0.0 for r in runs)
        lm = statistics.median(r["loadgen"]["rps"] for r in runs)
        diff = (lm - wm) / wm * 100 if wm else None
        wc = statistics.median(r["wrk"]["client_cpu_us_per_req"] or 0 for r in runs)
        lc = statistics.median(r["loadgen"]["client_cpu_us_per_req"] or 0 for r in runs)
        rows.append([b, f"{wm / 1e3:.0f}k", f"{lm / 1e3:.0f}k", _f(diff, "+.1f") + "%",
                     "yes" if diff is not None and abs(diff) <= 10 else "no", f"{wc:.2f}", f"{lc:.2f}"])
        s.values[f"wrk.{b}.diff"] = f"{diff:+.1f}%" if diff is not None else None
    if rows:
        s.tables.append(Table("The load generator against wrk (HTTP, 64 connections)",
                              ["server", "wrk req/s (median)", "loadgen req/s", "difference",
                               "within 10%", "wrk client µs/req", "loadgen client µs/req"], rows,
                              key="wrk"))
    cap = by_step.get("capacity", [])
    if cap:
        s.tables.append(Table("Capacity (native, 64 B echo)",
                              ["connections", "depth", "req/s", "client CPU µs/req",
                               "server CPU µs/req", "p50 µs", "p99 µs"],
                              [[str(r["connections"]), str(r["depth"]), f"{r['rps'] / 1e3:.0f}k",
                                _f(r["client_cpu_us_per_req"]), _f(r.get("server_cpu_us_per_req")),
                                _f(r.get("p50_us"), ".0f"), _f(r.get("p99_us"), ".0f")] for r in cap],
                              key="capacity"))
    for r in by_step.get("open", []):
        s.tables.append(Table("Closed and open loops", ["mode", "connections", "target rate",
                                                        "achieved", "rate met", "p50 µs", "p99 µs",
                                                        "max µs"],
                              [[x["spec"]["mode"], str(x["spec"]["connections"]),
                                f"{x['target_rate'] / 1e3:.0f}k" if x["target_rate"] else "–",
                                f"{x['achieved_rate'] / 1e3:.1f}k", "yes" if x["rate_met"] else "**no**",
                                _f(x.get("p50_us"), ".0f"), _f(x.get("p99_us"), ".0f"),
                                _f(x.get("max_us"), ".0f")] for x in r["runs"]], key="open"))
    s.add_skipped(notes.skipped, title="Not run")
    return s


EXPERIMENT = Experiment(
    name="validate_loadgen",
    title="The instrument: byte checks, wrk cross-check, capacity, open loop",
    presets={
        "smoke": dict(steps=["echo", "capacity"], echo_sizes=[1, 64, 65536, 4 << 20],
                      wrk_backends=["native", "epoll"], capacity_configs=[[16, 1]],
                      open_fractions=[0.1, 0.25, 2.0], duration=1.0, short=0.5, repeat=1),
        "standard": dict(steps=["echo", "wrk", "capacity", "open"], echo_sizes=[1, 64, 65536, 4 << 20],
                         wrk_backends=["native", "epoll"],
                         capacity_configs=[[16, 1], [256, 1], [16, 4], [16, 16], [256, 4], [16, 64]],
                         open_fractions=[0.1, 0.25, 2.0], duration=3.0, short=1.0, repeat=3),
        "full": dict(steps=["echo", "wrk", "capacity", "open"], echo_sizes=[1, 64, 65536, 4 << 20],
                     wrk_backends=["native", "epoll"],
                     capacity_configs=[[16, 1], [256, 1], [16, 4], [16, 16], [256, 4], [16, 64]],
                     open_fractions=[0.1, 0.25, 2.0], duration=5.0, short=2.0, repeat=5),
    },
    plan=plan, run_point=run_point, summarize=summarize, cited=True,
    description="the C load generator against native and wrk")
