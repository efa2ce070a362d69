"""Validate the load generator (issue 4): byte-exact echo, wrk cross-check, capacity,
pipelining, open-loop pacing.  Reproduces the numbers in docs/loadgen.md.

    flock /tmp/bench.lock .venv/bin/python -m parallelnet.experiments.validate_loadgen

Server: ``parallelnet serve --cpus 0 --workers 1`` (one pinned worker on CPU 0); client:
the C load generator's threads pinned to CPU 1 (``LoadSpec.cpus``), or ``wrk`` under
``taskset -c 1``.  Every run's raw figures go to results/<UTC>-validate_loadgen/
(one JSON per step, meta.json, the server's stats records), with /proc/stat deltas
(steal, softirq, and CPU used by neither the server nor the client) so a noisy run can
be recognised.  Server CPU per request comes from the server's own stats records inside
each measured window, as in every experiment (experiments/harness.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from parallelnet.experiments.harness import (
    NoiseProbe, ServerHandle, bench_lock, result_dir, start_server, window,
)
from parallelnet.experiments.loadgen import LoadSpec, run

SERVER_CPU, CLIENT_CPU = 0, 1


# ---- server and measurement (the shared harness) --------------------------------------

@contextlib.contextmanager
def serving(backend: str, protocol: str, folder: str, extra=()):
    """``parallelnet serve`` pinned to SERVER_CPU, with stats records every 0.25 s."""
    stats = os.path.join(folder, f"{backend}-{protocol}-{time.monotonic_ns()}-stats.jsonl")
    srv = start_server(["--backend", backend, "--protocol", protocol, "--workers", "1",
                        "--cpus", str(SERVER_CPU), *extra], stats)
    try:
        yield srv
    finally:
        srv.stop()


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


# ---- steps -----------------------------------------------------------------------------

def step_echo_sizes(a, folder) -> list[dict]:
    out = []
    with serving("native", "echo", folder) as srv:
        for size in (1, 64, 65536, 4 << 20):
            conns = 4 if size >= 65536 else 16
            r = lg(srv.port, size=size, connections=conns, duration=a.short, warmup=0.5)
            d = summary(r)
            # Every response byte is compared with what was sent (loadgen.c); a mismatch
            # aborts the run.  bytes_sent/received count different windows, so they differ.
            d.update(size=size, byte_exact=r.ok and r.errors.get("echo_mismatch", 0) == 0
                     and r.requests > 0)
            print(f"echo {size:>8} B x{conns}: {r.requests} req, {r.rps:.0f} req/s, "
                  f"sent {r.bytes_sent} recv {r.bytes_received}, errors {r.errors_total}",
                  flush=True)
            out.append(d)
    return out


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


def step_wrk(a, folder) -> list[dict]:
    out = []
    for backend in ("native", "epoll"):
        with serving(backend, "http", folder) as srv:
            w_rps, l_rps, runs = [], [], []
            for _ in range(a.repeat):
                w, wwin, wnoise = measured(srv, lambda: wrk(srv.port, 64, a.duration))
                w.update(noise=wnoise, noisy=wnoise["noisy"])
                if wwin:
                    w["server_cpu_us_per_req"] = round(wwin["cpu_us_per_req"], 2)
                r, win, noise = measured(srv, lambda: lg(srv.port, protocol="http", connections=64,
                                                         duration=a.duration, warmup=1.0), 1.0)
                w_rps.append(w["rps"] or 0.0)
                l_rps.append(r.rps)
                runs.append({"wrk": w, "loadgen": summary(r, win, noise)})
            wm, lm = statistics.median(w_rps), statistics.median(l_rps)
            diff = (lm - wm) / wm * 100 if wm else None
            wc = statistics.median(x["wrk"]["client_cpu_us_per_req"] or 0 for x in runs)
            lc = statistics.median(x["loadgen"]["client_cpu_us_per_req"] or 0 for x in runs)
            print(f"http {backend:>6} c64: wrk {wm:.0f} req/s ({wc:.2f} client µs/req), loadgen "
                  f"{lm:.0f} req/s ({lc:.2f} client µs/req) ({diff:+.1f}%)", flush=True)
            out.append({"backend": backend, "wrk_rps": w_rps, "loadgen_rps": l_rps,
                        "wrk_median": wm, "loadgen_median": lm, "diff_pct": diff,
                        "within_10pct": diff is not None and abs(diff) <= 10, "runs": runs})
    return out


def step_capacity(a, folder) -> list[dict]:
    out = []
    with serving("native", "echo", folder, ["--message-size", "64"]) as srv:
        for conns, depth in a.capacity_configs:
            r, win, noise = measured(srv, lambda: lg(srv.port, size=64, connections=conns,
                                                     depth=depth, duration=a.duration, warmup=1.0),
                                     1.0)
            d = summary(r, win, noise)
            d.update(connections=conns, depth=depth)
            print(f"capacity c{conns:<3} depth {depth:<2}: {r.rps:9.0f} req/s, client "
                  f"{r.client_cpu_us_per_req:.2f} µs/req, server "
                  f"{d.get('server_cpu_us_per_req')} µs/req, p50 {r.latency['p50']:.0f} µs, "
                  f"steal {noise['steal_max']:.3f}{' NOISY' if noise['noisy'] else ''}", flush=True)
            out.append(d)
    return out


def step_open_loop(a, folder, capacity_rps: float) -> list[dict]:
    out = []
    with serving("native", "echo", folder, ["--message-size", "64"]) as srv:
        r1 = lg(srv.port, size=64, connections=1, duration=a.duration, warmup=1.0)
        d = summary(r1)
        d.update(kind="closed depth 1, 1 connection")
        out.append(d)
        print(f"closed c1 d1: {r1.rps:.0f} req/s, p50 {r1.latency['p50']:.1f} µs", flush=True)
        r16 = lg(srv.port, size=64, connections=16, duration=a.duration, warmup=1.0)
        d = summary(r16)
        d.update(kind="closed depth 1, 16 connections")
        out.append(d)
        print(f"closed c16 d1: {r16.rps:.0f} req/s, p50 {r16.latency['p50']:.1f} µs", flush=True)
        # "Above capacity" must be above it: the larger of the two closed-loop measurements
        # (a transiently slow capacity run must not turn 2x into a rate the server can meet).
        cap = max(capacity_rps, r16.rps)
        for frac in (0.1, 0.25, 2.0):
            rate = round(cap * frac, -2)
            r = lg(srv.port, size=64, connections=16, mode="open", rate=rate,
                   duration=a.duration, warmup=1.0)
            d = summary(r)
            d.update(kind=f"open {frac:g}x capacity", fraction=frac,
                     achieved_error_pct=round((r.achieved_rate - rate) / rate * 100, 3))
            out.append(d)
            print(f"open {frac:>4g}x ({rate:.0f}/s): achieved {r.achieved_rate:.0f} "
                  f"({d['achieved_error_pct']:+.2f}%), met {r.rate_met}, p50 "
                  f"{r.latency['p50']:.1f} µs, p99 {r.latency['p99']:.1f} µs, p99.9 "
                  f"{r.latency['p99.9']:.1f} µs, max {r.latency_max_us:.0f} µs, "
                  f"backlog {r.backlog}/{r.scheduled}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    p.add_argument("--short", type=float, default=2.0, help="seconds per byte-exactness run")
    p.add_argument("--repeat", type=int, default=3, help="wrk/loadgen pairs per backend")
    p.add_argument("--out", default="results", help="parent folder of the run folder")
    p.add_argument("--steps", default="echo,wrk,capacity,open")
    p.add_argument("--capacity-configs", default="16x1,256x1,16x4,16x16,256x4,16x64",
                   type=lambda text: [tuple(int(x) for x in item.split("x")) for item in text.split(",")],
                   help="capacity step: CONNECTIONSxDEPTH,...")
    a = p.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two CPUs (server on 0, client on 1)", file=sys.stderr)
        return 2
    folder = result_dir("validate_loadgen", a.out, extra={
        "wrk": shutil.which("wrk"), "server_cpu": SERVER_CPU, "client_cpu": CLIENT_CPU})
    steps = a.steps.split(",")
    results: dict = {}
    with bench_lock():  # the same lock flock(1) takes: never two benchmarks
        if "echo" in steps:
            results["echo_sizes"] = step_echo_sizes(a, folder)
        if "wrk" in steps:
            if shutil.which("wrk"):
                results["wrk_vs_loadgen"] = step_wrk(a, folder)
            else:
                print("wrk not installed: skipping the cross-check", file=sys.stderr)
        cap = 0.0
        if "capacity" in steps:
            results["capacity"] = step_capacity(a, folder)
            cap = results["capacity"][0]["rps"]
        if "open" in steps:
            results["open_loop"] = step_open_loop(a, folder, cap)
    for name, data in results.items():
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, os.path.join(folder, f"{name}.json"))
    print(f"raw results: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
