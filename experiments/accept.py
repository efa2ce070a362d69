"""The accept experiment: how connections spread over workers, and what the race costs.

    python -m parallelnet.experiments.accept [--backends epoll uring] [--strategies shared reuseport]
                                             [--duration 3] [--reps 3] [--connections 64]

For each backend and each accept strategy it supports: a server with 2 workers (one
per CPU, the seed's layout), the C load generator in churn mode (connect, one 64-byte
echo, close; ``--connections`` at once) pinned to the last CPU.  Per run, from the
server's own counters over the measured window: accepts per worker, lost races per
accept (wakeups on the listening socket that found its queue empty), max/min accept
share, Jain's index; from the client: connections/s and the p99 of connect+echo+close.

On a 2-core machine the client shares the last CPU with a worker: that worker competes
with the client for its CPU, which is exactly the seed's claim under test (a busier CPU
should win fewer races).  Raw JSON and a table: results/<timestamp>-accept/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from parallelnet.core.backend import registry
from parallelnet.core.listeners import layout_of
from parallelnet.core.stats import add_observable, jain_index, max_min_ratio
from parallelnet.experiments.harness import (
    NoiseProbe, RunCounter, bench_lock, bound_of, common_bound, prefer_quiet, read_records, result_dir,
    start_server, window,
)

STRATEGIES = ("shared", "exclusive", "exclusive-rotate", "reuseport", "reuseport-cpu", "dispatch")


def one_run(backend: str, strategy: str, mode: str, args, outdir: str, tag: str) -> dict:
    from parallelnet.experiments.loadgen import LoadSpec, run

    cpus = sorted(os.sched_getaffinity(0))
    client_cpu = cpus[-1]
    srv = start_server(["--backend", backend, "--accept", strategy, "--mode", mode,
                        "--workers", str(args.workers), "--message-size", "64"],
                       os.path.join(outdir, f"{tag}-stats.jsonl"), cpus=set(cpus))
    try:
        spec = LoadSpec(host=srv.host, port=srv.port, mode="churn", connections=args.connections,
                        cpus=[client_cpu], size=64, duration=args.duration, warmup=args.warmup)
        t_start = time.monotonic()
        probe = NoiseProbe([os.getpid()] + srv.worker_pids()).start()
        res = run(spec)
        noise = probe.stop()
    finally:
        final = srv.stop()
    t0 = t_start - srv.t_listen + args.warmup
    win = window(srv.stats_path, t0, t0 + args.duration)
    accepted = [w["accepted"] for w in win["workers"]]
    over_time = share_over_time(srv.stats_path, t0, t0 + args.duration)
    lost = add_observable(w["lost_races"] for w in win["workers"])   # None: not observable
    lwake = sum(w["listen_wakeups"] for w in win["workers"])
    total = sum(accepted)
    return {
        "backend": backend, "strategy": strategy, "mode": mode, "workers": args.workers,
        "accepted": accepted, "shares": [a / total if total else 0.0 for a in accepted],
        "lost_races": lost, "listen_wakeups": lwake,
        "lost_per_accept": None if lost is None else lost / total if total else 0.0,
        "max_min": max_min_ratio(accepted), "jain": jain_index(accepted),
        "conn_rate": res.rps, "p99_us": res.latency.get("p99"),
        "p50_us": res.latency.get("p50"), "client_errors": res.errors_total,
        "server_crashed": [w["crashed"] for w in final.get("workers", []) if w.get("crashed")],
        "share_over_time": over_time,
        "w0_share_range": ([min(x[1][0] for x in over_time), max(x[1][0] for x in over_time)]
                           if over_time else None),
        "noise": noise,
        # Two workers on every CPU, the client on the last: it shares worker 1's CPU.
        "bound": bound_of(noise, cpus, [client_cpu]),
    }


def share_over_time(stats_path: str, t0: float, t1: float) -> list:
    """[t, [share of each worker]] of the connections accepted in each stats interval."""
    recs = [r for r in read_records(stats_path) if r["type"] == "interval" and t0 <= r["t"] <= t1]
    out = []
    for a, b in zip(recs, recs[1:]):
        got = [wb["accepted"] - wa["accepted"] for wa, wb in zip(a["workers"], b["workers"])]
        total = sum(got)
        if total:
            out.append([round(b["t"], 2), [round(g / total, 3) for g in got]])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    p.add_argument("--mode", default="thread", choices=["thread", "process"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)

    backends = registry()
    names = args.backends or [n for n, cls in backends.items() if cls.probe()]
    outdir = result_dir("accept", args.out)
    runs = []
    with bench_lock():  # the same lock flock(1) takes: never two benchmarks
        total = args.reps * sum(layout_of(s) in backends[n].accept_strategies
                                for n in names for s in args.strategies)
        counter = RunCounter(total)
        for rep in range(args.reps):
            for name in names:
                for strategy in args.strategies:
                    if layout_of(strategy) not in backends[name].accept_strategies:
                        continue
                    tag = f"r{rep}-{name}-{strategy}"
                    rec = one_run(name, strategy, args.mode, args, outdir, tag)
                    rec["rep"] = rep
                    runs.append(rec)
                    print(f"{counter.tick()} {tag:28s} accepts {'/'.join(map(str, rec['accepted'])):>15s} "
                          f"lost/acc {_f3(rec['lost_per_accept'])} jain {rec['jain']:.3f} "
                          f"{rec['conn_rate']:7.0f} conn/s p99 {rec['p99_us'] or 0:7.0f} us"
                          f" bound {rec['bound']}{'  NOISY' if rec['noise']['noisy'] else ''}", flush=True)
    summary = summarize(runs)
    with open(os.path.join(outdir, "accept.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs, "summary": summary}, f, indent=1)
    print()
    print(format_summary(summary))
    print(f"\nraw results: {outdir}")
    return 0


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["backend"], r["strategy"]) for r in runs}, key=lambda k: (k[0], STRATEGIES.index(k[1])))
    for backend, strategy in keys:
        rs = [r for r in runs if r["backend"] == backend and r["strategy"] == strategy]
        clean, dropped, all_noisy = prefer_quiet(rs, lambda r: r["noise"]["noisy"])
        med = lambda k: statistics.median([r[k] for r in clean if r[k] is not None] or [None])  # noqa: E731
        rows.append({
            "backend": backend, "strategy": strategy, "n": len(clean), "noisy": dropped,
            "bound": common_bound(clean),
            "all_noisy": all_noisy,
            "share_w0": statistics.median(r["shares"][0] for r in clean),
            "lost_per_accept": med("lost_per_accept"), "max_min": med("max_min"), "jain": med("jain"),
            "conn_rate": med("conn_rate"), "p99_us": med("p99_us"),
            "jain_range": (min(r["jain"] for r in clean), max(r["jain"] for r in clean)),
            # worker 0's share per 0.25 s interval: lowest and highest seen over the runs
            "share_w0_time": (min((r["w0_share_range"] or [0, 0])[0] for r in clean),
                              max((r["w0_share_range"] or [0, 0])[1] for r in clean)),
        })
    return rows


def _f3(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"   # None: lost races not observable (io_uring)


def format_summary(rows: list[dict]) -> str:
    out = [f"{'backend':9s} {'strategy':10s} {'n':>2s} {'w0 share':>8s} {'lost/accept':>11s} "
           f"{'max/min':>7s} {'Jain':>5s} {'(range)':>13s} {'conn/s':>7s} {'p99 us':>7s} bound"]
    for r in rows:
        out.append(f"{r['backend']:9s} {r['strategy']:10s} {r['n']:2d} {100 * r['share_w0']:7.0f}% "
                   f"{_f3(r['lost_per_accept']):>11s} {r['max_min']:7.2f} {r['jain']:5.3f} "
                   f"({r['jain_range'][0]:.3f}-{r['jain_range'][1]:.3f}) {r['conn_rate']:7.0f} "
                   f"{r['p99_us']:7.0f} {r.get('bound', '?')}"
                   f"{'  NOISY (every run)' if r.get('all_noisy') else ''}")
    out.append("conn/s and p99 of a client-bound row (bound client/both) rank the client, not the "
               "strategy; read the shares and lost races there, not the rates.")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
