"""Server CPU per request: uring vs uring-py vs epoll, 64-byte echo, on a 2-core box.

    flock /tmp/bench.lock python -m parallelnet.experiments.bench_uring [--reps 4] [--duration 5]
        [--warmup 1] [--variants 'uring:--uring-fixed-files' 'bufs64=uring:--uring-buffers 64']

``--variants LABEL=BACKEND:ARGS`` (the label defaults to ``BACKEND:ARGS``) adds a server
configuration that runs side by side with the baselines, in the same rotated alternation.

Server: ``parallelnet serve --cpus 0 --workers 1 --backend B --message-size 64`` (one
worker thread pinned to CPU 0).  Load: the project's C closed-loop load generator
(``parallelnet.experiments.loadgen``), its threads pinned to CPU 1, 64-byte echo, one
request in flight per connection, at 16 and 256 connections.  Backends alternate within
each repetition (rotated order), so drift and noise hit them alike.

Server CPU per request comes from the server's own stats JSON: two interval records
(every 0.25 s) that both lie inside the measured window, ``cpu_ns`` (the worker
thread's CPU clock, user + sys, ns resolution) and ``requests`` differenced between
them.  user/sys split from the same records (clock ticks).  req/s is the load
generator's figure for the window.  Accounting: a backend that moves work onto a
kernel thread of its own (``--uring-sqpoll``: the ``iou-sqp-*`` thread, a task of the server
process) reports that thread's CPU in ``extra["sqpoll_cpu_ns"]``; it is added to the
server's CPU (and to sys) here, or SQPOLL would hide CPU rather than save it.  /proc/stat deltas over the window flag noisy runs
(steal or other load > 5% of a CPU).  Every timed run holds ``/tmp/bench.lock``
(flock), so two benchmarks never overlap; run under ``flock /tmp/bench.lock`` it
uses the lock flock(1) already holds (an inherited descriptor) instead of waiting on it.  Raw JSON: results/<timestamp>-bench_uring/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

from parallelnet.experiments.harness import (
    NoiseProbe, RunCounter, bench_lock, bound_of, common_bound, machine_metadata, prefer_quiet, result_dir,
    start_server, window, write_pyperf,
)

ALL_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU, CLIENT_CPU = ALL_CPUS[0], ALL_CPUS[-1]  # 0 and 1 on the 2-core box

BACKENDS = ("uring", "uring-py", "epoll")


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """``[LABEL=]BACKEND[:ARGS]`` -> (label, backend, args)."""
    label, eq, rest = spec.partition("=")
    if not eq or ":" in label:
        label, rest = "", spec
    backend, _, argstr = rest.partition(":")
    return label or spec, backend, shlex.split(argstr)


def one_run(label: str, backend: str, extra_args: list[str], conns: int, args, outdir: str,
            tag: str) -> dict:
    from parallelnet.experiments.loadgen import LoadSpec, run

    srv = start_server(["--cpus", str(SERVER_CPU), "--workers", "1", "--backend", backend,
                        "--message-size", str(args.size), *extra_args],
                       os.path.join(outdir, f"{tag}-stats.jsonl"),
                       cpus=set(ALL_CPUS))
    try:
        time.sleep(0.3)
        spec = LoadSpec(port=srv.port, connections=conns, threads=1, cpus=[CLIENT_CPU], size=args.size,
                        duration=args.duration, warmup=args.warmup)
        probe = NoiseProbe([os.getpid()] + srv.worker_pids()).start()
        t_lg = time.monotonic()
        res = run(spec)
        noise = probe.stop()
    finally:
        srv.stop()
    # The measured window in the server's clock (s since "listening on"), shrunk by a
    # margin so both bracketing records lie in steady state.
    w0 = t_lg - srv.t_listen + args.warmup + 0.3
    w1 = t_lg - srv.t_listen + args.warmup + args.duration - 0.3
    win = window(srv.stats_path, w0, w1)
    tot, extra = win["total"], win["workers"][0]["extra"]
    req = max(tot["requests"], 1)
    # SQPOLL's kernel thread: CPU of the server process that cpu_ns (the worker thread's
    # clock) does not see.  Counted in, as sys time.
    sqp_us = sum(w["extra"].get("sqpoll_cpu_ns", 0) for w in win["workers"]) / 1e3 / req
    rec = {"backend": label, "server": backend, "args": extra_args, "connections": conns, "rps": res.rps, "errors": res.errors_total,
           "client_cpu_us_per_req": res.client_cpu_us_per_req,
           "steal": noise["steal_max"], "others_cpu": noise["others_cpu"],
           "busy_cpu0": noise["per_cpu"].get("cpu0", {}).get("busy"),
           "noisy": noise["noisy"], "bound": bound_of(noise, [SERVER_CPU], [CLIENT_CPU]),
           "requests": tot["requests"], "seconds": tot["seconds"],
           "cpu_us_per_req": tot["cpu_us_per_req"] + sqp_us, "user_us_per_req": tot["user_us_per_req"],
           "sys_us_per_req": tot["sys_us_per_req"] + sqp_us, "sqpoll_us_per_req": sqp_us,
           "wakeups_per_req": tot["wakeups"] / req}
    for k in ("entries", "cqes", "sqes", "sendzc_notifs"):
        if k in extra:
            rec[f"{k}_per_req"] = extra[k] / req
    return rec


def cffi_call_cost() -> dict:
    from parallelnet.backends.uring._uring import lib

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
    p.add_argument("--variants", nargs="*", default=[], metavar="[LABEL=]BACKEND:ARGS",
                   help="extra server configurations run alongside the backends, e.g. "
                        "'fixed=uring:--uring-fixed-files'")
    p.add_argument("--size", type=int, default=64, help="echo message size (bytes)")
    p.add_argument("--out", default="results")
    p.add_argument("--name", default="bench_uring",
                   help="results folder suffix (e.g. bench_uring-options for a variants study)")
    args = p.parse_args(argv)

    outdir = result_dir(args.name, args.out)
    configs = [(b, b, []) for b in args.backends] + [parse_variant(v) for v in args.variants]
    labels = [c[0] for c in configs]
    if len(set(labels)) != len(labels):
        p.error(f"duplicate labels: {labels}")
    args.labels = labels
    runs = []
    with bench_lock():  # the same lock flock(1) takes: never two benchmarks
        micro = cffi_call_cost()
        counter = RunCounter(args.reps * len(args.connections) * len(configs))
        for rep in range(args.reps):
            for conns in args.connections:
                order = configs[rep % len(configs):] + configs[:rep % len(configs)]
                for i, (label, backend, extra_args) in enumerate(order):
                    tag = f"r{rep}-c{conns}-v{labels.index(label)}-{backend}"
                    rec = one_run(label, backend, extra_args, conns, args, outdir, tag)
                    rec["rep"] = rep
                    runs.append(rec)
                    print(f"{counter.tick()} {label[:28]:28s} r{rep} c{conns:<4d} {rec['rps']:9.0f} req/s  server {rec['cpu_us_per_req']:6.2f} us/req "
                          f"(user {rec['user_us_per_req']:.2f} sys {rec['sys_us_per_req']:.2f})"
                          f"  steal {100 * rec['steal']:.1f}% others {100 * rec['others_cpu']:.1f}%"
                          f"  bound {rec['bound']}{'  NOISY' if rec['noisy'] else ''}",
                          flush=True)
    summary = summarize(runs, args)
    meta = {**machine_metadata(), "micro": micro}
    with open(os.path.join(outdir, "bench_uring.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs, "summary": summary}, f, indent=1)
    # Server CPU seconds per request, one pyperf benchmark per backend and connection count:
    # `python -m pyperf compare_to --table pyperf.json` (lower is faster).
    write_pyperf(os.path.join(outdir, "pyperf.json"),
                 {f"{b}-c{c}": [r["cpu_us_per_req"] / 1e6 for r in _used(runs, b, c)[0]]
                  for b in args.labels for c in args.connections})
    print(f"\ncffi API-mode call (GIL released and re-taken): {micro['cffi_call_ns']:.0f} ns "
          f"(empty Python loop iteration: {micro['python_loop_ns']:.0f} ns)")
    print(format_summary(summary))
    print(f"\nraw results: {outdir}")
    return 0


def _used(runs, backend, conns):
    """(runs, dropped, all_noisy) of one configuration: see ``harness.prefer_quiet``."""
    return prefer_quiet([r for r in runs if r["backend"] == backend and r["connections"] == conns],
                        lambda r: r["noisy"])


def summarize(runs, args) -> list[dict]:
    out = []
    for conns in args.connections:
        for backend in args.labels:
            rs, dropped, all_noisy = _used(runs, backend, conns)
            if not rs:
                continue
            cpu = [r["cpu_us_per_req"] for r in rs]
            row = {"backend": backend, "connections": conns, "n": len(rs), "bound": common_bound(rs),
                   "cpu_us_per_req": statistics.median(cpu), "cpu_min": min(cpu), "cpu_max": max(cpu),
                   "user_us": statistics.median(r["user_us_per_req"] for r in rs),
                   "sys_us": statistics.median(r["sys_us_per_req"] for r in rs),
                   "rps": statistics.median(r["rps"] for r in rs),
                   "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs),
                   "noisy_dropped": dropped, "all_noisy": all_noisy}
            for k in ("entries_per_req", "cqes_per_req", "wakeups_per_req", "sqpoll_us_per_req"):
                vals = [r[k] for r in rs if k in r]
                if vals:
                    row[k] = statistics.median(vals)
            out.append(row)
        epoll = [r for r in out if r["backend"] == "epoll" and r["connections"] == conns]
        if epoll:
            for r in out:
                if r["connections"] == conns:
                    r["vs_epoll"] = r["cpu_us_per_req"] / epoll[0]["cpu_us_per_req"]
                    paired = paired_ratios(runs, r["backend"], conns)
                    if paired:
                        r["vs_epoll_paired"] = statistics.median(paired)
                        r["paired_min"], r["paired_max"] = min(paired), max(paired)
    return out


def paired_ratios(runs, backend, conns, baseline="epoll") -> list[float]:
    """backend / baseline server CPU per request within each repetition.

    The configurations of one repetition run back to back, so a slow drift of the
    host's speed (which this VM shows, with no steal) moves both alike and cancels in
    the ratio; the ratio of medians across repetitions does not cancel it.  Pairs with
    a noisy member are left out when quiet pairs exist (harness.prefer_quiet).
    """
    pairs = []
    for rep in sorted({r["rep"] for r in runs}):
        a = [r for r in runs if r["rep"] == rep and r["connections"] == conns and r["backend"] == backend]
        b = [r for r in runs if r["rep"] == rep and r["connections"] == conns and r["backend"] == baseline]
        if a and b and b[0]["cpu_us_per_req"]:
            pairs.append({"ratio": a[0]["cpu_us_per_req"] / b[0]["cpu_us_per_req"],
                          "noisy": a[0]["noisy"] or b[0]["noisy"]})
    used, _, _ = prefer_quiet(pairs, lambda p: p["noisy"])
    return [p["ratio"] for p in used]


def format_summary(rows) -> str:
    w = max([9] + [len(r["backend"]) for r in rows])
    lines = [f"{'backend':{w}s} {'conns':>5s} {'n':>2s} {'srv us/req':>10s} {'(min-max)':>13s} "
             f"{'user':>5s} {'sys':>5s} {'vs epoll':>8s} {'paired (min-max)':>19s} {'req/s':>9s} {'(min-max)':>17s} "
             f"{'entries/req':>11s} {'cqes/req':>8s}"]
    for r in rows:
        lines.append(
            f"{r['backend']:{w}s} {r['connections']:5d} {r['n']:2d} {r['cpu_us_per_req']:10.2f} "
            f"({r['cpu_min']:5.2f}-{r['cpu_max']:5.2f}) {r['user_us']:5.2f} {r['sys_us']:5.2f} "
            f"{r.get('vs_epoll', float('nan')):8.2f} {r.get('vs_epoll_paired', float('nan')):6.3f} "
            f"({r.get('paired_min', float('nan')):5.3f}-{r.get('paired_max', float('nan')):5.3f}) {r['rps']:9.0f} ({r['rps_min']:7.0f}-{r['rps_max']:7.0f}) "
            f"{r.get('entries_per_req', float('nan')):11.3f} {r.get('cqes_per_req', float('nan')):8.3f}"
            f"  bound {r.get('bound', '?')}"
            f"{'  NOISY (every run)' if r.get('all_noisy') else ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
