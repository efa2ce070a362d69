"""Server CPU per request and latency at a fixed request rate: io_uring's batching window.

    flock /tmp/bench.lock python -m parallelnet.experiments.uring_window [--reps 3]
        [--rate 40000] [--duration 4] [--warmup 1] [--budgets 0 25 50 100 200 400]
        [--configs epoll native uring ...] [--saturation] [--out results]

Each repetition runs every configuration once, in rotated order (drift hits them alike, so
ratios are paired within a repetition).  One point: ``parallelnet serve --cpus 0
--workers 1 --backend B --message-size 64 [ARGS]`` (one worker pinned to CPU 0), the C
load generator on CPU 1, 16 connections, 64-byte echo, open loop at ``--rate`` (latency
from each request's intended send time, so queueing is not hidden), or closed loop with
``--saturation``.

Server CPU: every thread of the server process (``/proc/PID/task/*/schedstat`` field 1,
``harness.process_cpu_ns``), sampled at the start and end of the load generator's
measured window (its warm-up and duration are timed from this side while it runs with
the GIL released), divided by the requests the generator counted in that window.  The
configurations: the references (``epoll``, ``native``, ``uring`` with its defaults) and
one ``uring`` per ``--budgets`` value (``--uring-latency-budget-us B``; 0 = no window).
Noise (steal, other processes' CPU) is recorded per point and noisy points are left out
of the medians when quiet ones exist (harness.prefer_quiet).  Raw JSON and a summary:
``results/<UTC>-uring-window[-saturation]/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

from parallelnet.experiments.bench_uring import parse_variant as parse_config
from parallelnet.experiments.harness import (
    NoiseProbe, bench_lock, prefer_quiet, process_cpu_ns, result_dir, start_server,
)

ALL_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU, CLIENT_CPU = ALL_CPUS[0], ALL_CPUS[-1]
REFERENCES = ("epoll", "native", "uring")


def one_point(backend: str, extra: list[str], args, outdir: str, tag: str) -> dict:
    from parallelnet.experiments.loadgen import LoadSpec, run

    srv = start_server(["--cpus", str(SERVER_CPU), "--workers", "1", "--backend", backend,
                        "--message-size", "64", *extra],
                       os.path.join(outdir, f"{tag}-stats.jsonl"), cpus=set(ALL_CPUS))
    try:
        time.sleep(0.3)
        spec = LoadSpec(port=srv.port, connections=args.connections, cpus=[CLIENT_CPU], size=64,
                        mode="closed" if args.saturation else "open",
                        rate=0.0 if args.saturation else args.rate,
                        duration=args.duration, warmup=args.warmup)
        out: dict = {}
        lg = threading.Thread(target=lambda: out.setdefault("res", run(spec)))
        probe = NoiseProbe([os.getpid()] + srv.worker_pids()).start()
        lg.start()
        time.sleep(args.warmup)
        cpu0 = process_cpu_ns(srv.proc.pid)
        time.sleep(args.duration)
        cpu1 = process_cpu_ns(srv.proc.pid)
        lg.join(args.duration + 30)
        noise = probe.stop()
    finally:
        srv.stop()
    res = out["res"]
    req = max(res.requests, 1)
    return {"server": backend, "args": extra, "requests": res.requests, "rps": res.rps,
            "rate_met": res.rate_met, "errors": res.errors_total,
            "cpu_us_per_req": (cpu1 - cpu0) / 1e3 / req,
            "p50_us": res.latency.get("p50"), "p99_us": res.latency.get("p99"),
            "p999_us": res.latency.get("p99.9"), "client_cpu_us_per_req": res.client_cpu_us_per_req,
            "steal": noise["steal_max"], "others_cpu": noise["others_cpu"], "noisy": noise["noisy"]}


def paired(runs: list[dict], label: str, base: str, key: str = "cpu_us_per_req") -> list[float]:
    """label / base within each repetition (quiet pairs when there are any)."""
    pairs = []
    for rep in sorted({r["rep"] for r in runs}):
        a = [r for r in runs if r["rep"] == rep and r["label"] == label]
        b = [r for r in runs if r["rep"] == rep and r["label"] == base]
        if a and b and b[0][key]:
            pairs.append({"v": a[0][key] / b[0][key], "noisy": a[0]["noisy"] or b[0]["noisy"]})
    used, _, _ = prefer_quiet(pairs, lambda p: p["noisy"])
    return [p["v"] for p in used]


def paired_diff(runs: list[dict], label: str, base: str, key: str) -> list[float]:
    out = []
    for rep in sorted({r["rep"] for r in runs}):
        a = [r for r in runs if r["rep"] == rep and r["label"] == label]
        b = [r for r in runs if r["rep"] == rep and r["label"] == base]
        if a and b and a[0][key] is not None and b[0][key] is not None:
            out.append(a[0][key] - b[0][key])
    return out


def summarize(runs: list[dict], labels: list[str]) -> list[dict]:
    rows = []
    for label in labels:
        rs, dropped, all_noisy = prefer_quiet([r for r in runs if r["label"] == label],
                                              lambda r: r["noisy"])
        if not rs:
            continue
        med = lambda k: statistics.median(r[k] for r in rs if r[k] is not None)  # noqa: E731
        cpu = [r["cpu_us_per_req"] for r in rs]
        row = {"label": label, "n": len(rs), "noisy_dropped": dropped, "all_noisy": all_noisy,
               "cpu_us_per_req": statistics.median(cpu), "cpu_min": min(cpu), "cpu_max": max(cpu),
               "rps": med("rps"), "p50_us": med("p50_us"), "p99_us": med("p99_us"),
               "p999_us": med("p999_us")}
        for base in ("epoll", "native"):
            ratios = paired(runs, label, base)
            if ratios and label != base:
                row[f"vs_{base}"] = statistics.median(ratios)
                row[f"vs_{base}_range"] = (min(ratios), max(ratios))
        d99 = paired_diff(runs, label, "epoll", "p99_us")
        if d99 and label != "epoll":
            row["p99_minus_epoll_us"] = statistics.median(d99)
            row["p99_minus_epoll_range"] = (min(d99), max(d99))
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    def rng(r, k):
        v = r.get(k)
        lo_hi = r.get(k + "_range")
        return "-" if v is None else f"{v:.2f} ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})"

    w = max([8] + [len(r["label"]) for r in rows])
    lines = [f"{'config':{w}s} {'n':>2s} {'us/req':>6s} {'(min-max)':>13s} {'x epoll (paired)':>19s} "
             f"{'x native (paired)':>19s} {'p50':>5s} {'p99':>5s} {'p99.9':>6s} {'p99-epoll':>9s} {'req/s':>8s}"]
    for r in rows:
        d = r.get("p99_minus_epoll_us")
        lines.append(
            f"{r['label']:{w}s} {r['n']:2d} {r['cpu_us_per_req']:6.2f} ({r['cpu_min']:5.2f}-{r['cpu_max']:5.2f}) "
            f"{rng(r, 'vs_epoll'):>19s} {rng(r, 'vs_native'):>19s} {r['p50_us'] or 0:5.0f} "
            f"{r['p99_us'] or 0:5.0f} {r['p999_us'] or 0:6.0f} {'-' if d is None else f'{d:+9.0f}':>9s} "
            f"{r['rps']:8.0f}{'  NOISY (every run)' if r['all_noisy'] else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rate", type=float, default=40000.0, help="open-loop request rate (req/s)")
    p.add_argument("--saturation", action="store_true", help="closed loop instead (max rate)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--configs", nargs="*", default=list(REFERENCES),
                   metavar="[LABEL=]BACKEND[:ARGS]", help="references (default: epoll native uring)")
    p.add_argument("--budgets", type=int, nargs="*", default=[0, 25, 50, 100, 200, 400],
                   help="uring --uring-latency-budget-us values to sweep (us; 0 = no window)")
    p.add_argument("--out", default="results")
    p.add_argument("--name", default="uring-window")
    args = p.parse_args(argv)

    configs = [parse_config(c) for c in args.configs]
    configs += [(f"uring/b{b}", "uring", ["--uring-latency-budget-us", str(b)]) for b in args.budgets]
    labels = [c[0] for c in configs]
    if len(set(labels)) != len(labels):
        p.error(f"duplicate labels: {labels}")
    name = args.name + ("-saturation" if args.saturation else "")
    outdir = result_dir(name, args.out, {"args": vars(args)})
    runs = []
    with bench_lock():
        for rep in range(args.reps):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for label, backend, extra in order:
                tag = f"r{rep}-{labels.index(label)}-{backend}"
                rec = one_point(backend, extra, args, outdir, tag)
                rec.update(label=label, rep=rep)
                runs.append(rec)
                print(f"{label:16s} r{rep} {rec['rps']:8.0f} req/s  server {rec['cpu_us_per_req']:6.2f} us/req"
                      f"  p50 {rec['p50_us'] or 0:5.0f} p99 {rec['p99_us'] or 0:5.0f} us"
                      f"{'' if rec['rate_met'] else '  RATE NOT MET'}{'  NOISY' if rec['noisy'] else ''}",
                      flush=True)
    rows = summarize(runs, labels)
    with open(os.path.join(outdir, "uring_window.json"), "w") as f:
        json.dump({"runs": runs, "summary": rows}, f, indent=1)
    print()
    print(format_rows(rows))
    print(f"\nraw results: {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
