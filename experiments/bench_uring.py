"""Server CPU per request: uring vs uring-py vs epoll, 64-byte echo, on a 2-core box.

    python -m parallelnet.experiments.bench_uring [--reps 4] [--duration 5] [--warmup 1]

Server: ``parallelnet serve --cpus 0 --workers 1 --backend B --message-size 64`` (one
worker thread pinned to CPU 0).  Load: the project's C closed-loop load generator
(``parallelnet.experiments.loadgen``), its threads pinned to CPU 1, 64-byte echo, one
request in flight per connection, at 16 and 256 connections.  Backends alternate within
each repetition (rotated order), so drift and noise hit them alike.

Server CPU per request comes from the server's own stats JSON: two interval records
(every 0.25 s) that both lie inside the measured window, ``cpu_ns`` (the worker
thread's CPU clock, user + sys, ns resolution) and ``requests`` differenced between
them.  user/sys split from the same records (clock ticks).  req/s is the load
generator's figure for the window.  /proc/stat deltas over the window flag noisy runs
(steal or other load > 5% of a CPU).  Every timed run holds ``/tmp/bench.lock``
(flock), so two benchmarks never overlap.  Raw JSON: results/<timestamp>-bench_uring/.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time

BACKENDS = ("uring", "uring-py", "epoll")
LOCK = "/tmp/bench.lock"
ALL_CPUS = set(os.sched_getaffinity(0))


def proc_stat() -> list[int]:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                return [int(x) for x in line.split()[1:]]
    return []


def start_server(backend: str, stats_path: str, extra: list[str]):
    cmd = [sys.executable, "-m", "parallelnet.core.cli", "serve", "--cpus", "0", "--workers", "1",
           "--port", "0", "--backend", backend, "--message-size", "64",
           "--stats-json", stats_path, "--stats-interval", "0.25", *extra]
    every = os.sched_getaffinity(0) | ALL_CPUS  # this process sits on CPU 1; the server may use 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, every))
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server {backend} did not start")
        if line.startswith("listening on "):
            return proc, time.monotonic(), int(line.split(":")[-1])


def window_cpu(stats_path: str, t0: float, t1: float) -> dict:
    with open(stats_path) as f:
        recs = [json.loads(x) for x in f if x.strip()]
    recs = [r for r in recs if r["type"] == "interval" and t0 <= r["t"] <= t1]
    if len(recs) < 2:
        raise RuntimeError("fewer than two interval records inside the window")
    a, b = recs[0]["workers"][0], recs[-1]["workers"][0]
    req = b["requests"] - a["requests"]
    out = {"requests": req, "seconds": recs[-1]["t"] - recs[0]["t"],
           "cpu_us_per_req": (b["cpu_ns"] - a["cpu_ns"]) / 1e3 / max(req, 1),
           "user_us_per_req": (b["user_s"] - a["user_s"]) * 1e6 / max(req, 1),
           "sys_us_per_req": (b["sys_s"] - a["sys_s"]) * 1e6 / max(req, 1),
           "wakeups_per_req": (b["wakeups"] - a["wakeups"]) / max(req, 1)}
    ea, eb = a.get("extra", {}), b.get("extra", {})
    for k in ("entries", "cqes", "sqes"):
        if k in eb and k in ea:
            out[f"{k}_per_req"] = (eb[k] - ea[k]) / max(req, 1)
    return out


def one_run(backend: str, conns: int, args, outdir: str, tag: str) -> dict:
    from parallelnet.experiments.loadgen import LoadSpec, run

    stats_path = os.path.join(outdir, f"{tag}-stats.jsonl")
    proc, t_srv0, port = start_server(backend, stats_path, [])
    try:
        time.sleep(0.3)
        spec = LoadSpec(port=port, connections=conns, threads=1, cpus=[1], size=64,
                        duration=args.duration, warmup=args.warmup)
        s0 = proc_stat()
        t_lg = time.monotonic()
        res = run(spec)
        s1 = proc_stat()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    # The measured window, in the server's clock (t since it printed "listening"),
    # shrunk by a margin so both records bracket steady state only.
    w0 = t_lg - t_srv0 + args.warmup + 0.3
    w1 = t_lg - t_srv0 + args.warmup + args.duration - 0.3
    cpu = window_cpu(stats_path, w0, w1)
    d = [y - x for x, y in zip(s0, s1)]
    total = sum(d) or 1
    steal = d[7] / total if len(d) > 7 else 0.0
    busy = (total - d[3] - d[4]) / total  # fraction of both CPUs busy
    rec = {"backend": backend, "connections": conns, "rps": res.rps, "errors": res.errors_total,
           "client_cpu_us_per_req": res.client_cpu_us_per_req, "steal": steal, "busy": busy,
           "noisy": steal > 0.05, **cpu}
    return rec


def cffi_call_cost() -> dict:
    from parallelnet.backends._uring import lib

    n = 1_000_000
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for i in range(n):
            lib.uc_nop(i)
        best = min(best, (time.perf_counter() - t) / n)
    t = time.perf_counter()
    for i in range(n):
        pass
    loop = (time.perf_counter() - t) / n
    return {"cffi_call_ns": best * 1e9, "python_loop_ns": loop * 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, nargs="+", default=[16, 256])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS))
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)

    os.sched_setaffinity(0, {1})  # this process (and the loadgen's threads) off the server's CPU
    stamp = time.strftime("%Y%m%dT%H%M%S")
    outdir = os.path.join(args.out, f"{stamp}-bench_uring")
    os.makedirs(outdir, exist_ok=True)
    runs = []
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the same lock flock(1) takes: never two benchmarks
        micro = cffi_call_cost()
        for rep in range(args.reps):
            for conns in args.connections:
                order = args.backends[rep % len(args.backends):] + args.backends[:rep % len(args.backends)]
                for backend in order:
                    tag = f"r{rep}-c{conns}-{backend}"
                    rec = one_run(backend, conns, args, outdir, tag)
                    rec["rep"] = rep
                    runs.append(rec)
                    print(f"{tag:22s} {rec['rps']:9.0f} req/s  server {rec['cpu_us_per_req']:6.2f} us/req "
                          f"(user {rec['user_us_per_req']:.2f} sys {rec['sys_us_per_req']:.2f})"
                          f"  steal {100 * rec['steal']:.1f}%{'  NOISY' if rec['noisy'] else ''}",
                          flush=True)
    summary = summarize(runs, args)
    meta = {"argv": sys.argv, "uname": os.uname()._asdict() if hasattr(os.uname(), "_asdict")
            else list(os.uname()), "python": sys.version, "micro": micro}
    with open(os.path.join(outdir, "bench_uring.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs, "summary": summary}, f, indent=1)
    print(f"\ncffi API-mode call (GIL released and re-taken): {micro['cffi_call_ns']:.0f} ns "
          f"(empty Python loop iteration: {micro['python_loop_ns']:.0f} ns)")
    print(format_summary(summary))
    print(f"\nraw results: {outdir}")
    return 0


def summarize(runs, args) -> list[dict]:
    out = []
    for conns in args.connections:
        base = None
        for backend in args.backends:
            rs = [r for r in runs if r["backend"] == backend and r["connections"] == conns and not r["noisy"]]
            if not rs:
                continue
            cpu = [r["cpu_us_per_req"] for r in rs]
            row = {"backend": backend, "connections": conns, "n": len(rs),
                   "cpu_us_per_req": statistics.median(cpu), "cpu_min": min(cpu), "cpu_max": max(cpu),
                   "user_us": statistics.median(r["user_us_per_req"] for r in rs),
                   "sys_us": statistics.median(r["sys_us_per_req"] for r in rs),
                   "rps": statistics.median(r["rps"] for r in rs),
                   "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs)}
            for k in ("entries_per_req", "cqes_per_req", "wakeups_per_req"):
                vals = [r[k] for r in rs if k in r]
                if vals:
                    row[k] = statistics.median(vals)
            out.append(row)
        epoll = [r for r in out if r["backend"] == "epoll" and r["connections"] == conns]
        if epoll:
            for r in out:
                if r["connections"] == conns:
                    r["vs_epoll"] = r["cpu_us_per_req"] / epoll[0]["cpu_us_per_req"]
    return out


def format_summary(rows) -> str:
    lines = [f"{'backend':9s} {'conns':>5s} {'n':>2s} {'srv us/req':>10s} {'(min-max)':>13s} "
             f"{'user':>5s} {'sys':>5s} {'vs epoll':>8s} {'req/s':>9s} {'(min-max)':>17s} "
             f"{'entries/req':>11s} {'cqes/req':>8s}"]
    for r in rows:
        lines.append(
            f"{r['backend']:9s} {r['connections']:5d} {r['n']:2d} {r['cpu_us_per_req']:10.2f} "
            f"({r['cpu_min']:5.2f}-{r['cpu_max']:5.2f}) {r['user_us']:5.2f} {r['sys_us']:5.2f} "
            f"{r.get('vs_epoll', float('nan')):8.2f} {r['rps']:9.0f} ({r['rps_min']:7.0f}-{r['rps_max']:7.0f}) "
            f"{r.get('entries_per_req', float('nan')):11.3f} {r.get('cqes_per_req', float('nan')):8.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
