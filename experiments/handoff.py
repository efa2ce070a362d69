"""What the hand-off channel costs under ``--accept dispatch``: SCM_RIGHTS vs IORING_OP_MSG_RING.

    flock /tmp/bench.lock python -m parallelnet.experiments.handoff [--reps 5] [--duration 3]
        [--configs scm=uring msg-ring=uring:--uring-handoff=msg-ring epoll=epoll]

One acceptor thread (core/dispatch.py) accepts every connection and hands it to one of
two workers.  The channel is what differs:

* ``scm`` (every backend): ``sendmsg`` with ``SCM_RIGHTS`` on the worker's socketpair,
  the acceptor closes its own fd; the worker's ring has a poll armed on its end, which
  completes, and the C core takes the fds with ``recvmsg`` until EAGAIN;
* ``msg-ring`` (``uring --uring-handoff msg-ring``, thread mode): the acceptor submits
  ``IORING_OP_MSG_RING`` on a small ring of its own; the fd number lands in the
  worker's CQ as one completion; no duplicate fd, no poll, no recvmsg.

Load: the C load generator in churn mode (connect, one 64-byte echo, close), so every
request is also a hand-off.  Layout: the whole server (both workers, the acceptor, the
main thread) on the first CPU, the client on the last.  Measured per run, over the
load generator's window: connections/s and the p50/p99 of connect+echo+close (client),
and **server CPU per connection**: every thread of the server process, from
``/proc/PID/task/*/schedstat`` (ns), differenced around the window - the acceptor's
work counts, since that is where the channels differ most.  Configurations alternate in
rotated order within each repetition; noisy runs are flagged (harness.NoiseProbe) and
left out of the medians when quiet ones exist.  Raw JSON, pyperf JSON and a table:
results/<timestamp>-handoff/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from parallelnet.experiments.harness import (
    NoiseProbe, RunCounter, bench_lock, bound_of, common_bound, machine_metadata, prefer_quiet, process_cpu_ns,
    result_dir, start_server, write_pyperf,
)

ALL_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU, CLIENT_CPU = ALL_CPUS[0], ALL_CPUS[-1]
DEFAULT_CONFIGS = ["scm=uring", "msg-ring=uring:--uring-handoff=msg-ring", "epoll-scm=epoll"]


def parse_config(spec: str) -> tuple[str, str, list[str]]:
    """``LABEL=BACKEND[:ARG,ARG...]`` (an ARG may be ``--flag=value``)."""
    label, eq, rest = spec.partition("=")
    if not eq:
        raise ValueError(f"config {spec!r}: expected LABEL=BACKEND[:ARGS]")
    backend, _, argstr = rest.partition(":")
    args = []
    for a in filter(None, argstr.split(",")):
        args += a.split("=", 1) if a.startswith("--") else [a]
    return label, backend, args


def one_run(label: str, backend: str, extra: list[str], args, outdir: str, tag: str) -> dict:
    from parallelnet.experiments.loadgen import LoadSpec, run

    srv = start_server(["--backend", backend, "--accept", "dispatch", "--cpus", str(SERVER_CPU),
                        "--workers", "2", "--dispatch-cpu", str(SERVER_CPU),
                        "--message-size", "64", *extra],
                       os.path.join(outdir, f"{tag}-stats.jsonl"), cpus={SERVER_CPU})
    try:
        base = LoadSpec(host=srv.host, port=srv.port, mode="churn", connections=args.connections,
                        cpus=[CLIENT_CPU], size=64, warmup=0.0)
        run(LoadSpec(**{**base.__dict__, "duration": args.warmup}))  # lazy set-up out of the window
        probe = NoiseProbe([os.getpid(), srv.proc.pid]).start()
        cpu0 = process_cpu_ns(srv.proc.pid)
        res = run(LoadSpec(**{**base.__dict__, "duration": args.duration}))
        cpu1 = process_cpu_ns(srv.proc.pid)
        noise = probe.stop()
    finally:
        final = srv.stop()
    conns = res.requests
    workers = final.get("workers", [])
    disp = final.get("dispatcher") or {}
    return {
        "label": label, "backend": backend, "args": extra, "connections": args.connections,
        "conn_rate": res.rps, "completed": conns, "client_errors": res.errors_total,
        "p50_us": res.latency.get("p50"), "p99_us": res.latency.get("p99"),
        "server_cpu_s": (cpu1 - cpu0) / 1e9,
        "server_us_per_conn": (cpu1 - cpu0) / 1e3 / conns if conns else None,
        "channel": disp.get("channel"), "handed": disp.get("handed"),
        "overflow": disp.get("overflow"), "dispatch_errors": disp.get("errors"),
        "msg_handoffs": sum(w.get("extra", {}).get("msg_handoffs", 0) for w in workers),
        "handoff_wakeups": sum(w.get("extra", {}).get("handoff_wakeups", 0) for w in workers),
        "server_crashed": [w["crashed"] for w in workers if w.get("crashed")],
        "noisy": noise["noisy"], "noise": noise, "bound": bound_of(noise, [SERVER_CPU], [CLIENT_CPU]),
    }


def summarize(runs: list[dict], labels: list[str]) -> list[dict]:
    rows = []
    for label in labels:
        rs, dropped, all_noisy = prefer_quiet([r for r in runs if r["label"] == label],
                                              lambda r: r["noisy"])
        rs = [r for r in rs if r["server_us_per_conn"]]
        if not rs:
            continue
        cpu = [r["server_us_per_conn"] for r in rs]
        rate = [r["conn_rate"] for r in rs]
        rows.append({"label": label, "backend": rs[0]["backend"], "n": len(rs), "bound": common_bound(rs),
                     "noisy_dropped": dropped, "all_noisy": all_noisy,
                     "us_per_conn": statistics.median(cpu), "us_min": min(cpu), "us_max": max(cpu),
                     "conn_rate": statistics.median(rate), "rate_min": min(rate), "rate_max": max(rate),
                     "p50_us": statistics.median(r["p50_us"] for r in rs),
                     "p99_us": statistics.median(r["p99_us"] for r in rs)})
    base = next((r for r in rows if r["label"] == labels[0]), None)
    for r in rows:
        if base:
            r["vs_first"] = r["us_per_conn"] / base["us_per_conn"]
            r["rate_vs_first"] = r["conn_rate"] / base["conn_rate"]
    return rows


def format_summary(rows: list[dict], first: str) -> str:
    out = [f"{'config':12s} {'n':>2s} {'server us/conn':>14s} {'(min-max)':>15s} {'x ' + first:>8s} "
           f"{'conn/s':>8s} {'(min-max)':>17s} {'p50 us':>7s} {'p99 us':>7s}"]
    for r in rows:
        out.append(f"{r['label']:12s} {r['n']:2d} {r['us_per_conn']:14.2f} "
                   f"({r['us_min']:6.2f}-{r['us_max']:6.2f}) {r.get('vs_first', float('nan')):8.3f} "
                   f"{r['conn_rate']:8.0f} ({r['rate_min']:7.0f}-{r['rate_max']:7.0f}) "
                   f"{r['p50_us']:7.0f} {r['p99_us']:7.0f} {r.get('bound', '?')}"
                   f"{'  NOISY (every run)' if r['all_noisy'] else ''}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="LABEL=BACKEND[:ARGS] (comma-separated args, --flag=value allowed); "
                        "the first is the baseline of the ratios")
    p.add_argument("--connections", type=int, default=32, help="concurrent churning clients")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.configs]
    labels = [c[0] for c in configs]
    if len(set(labels)) != len(labels):
        p.error("config labels must differ")
    if SERVER_CPU == CLIENT_CPU:
        print("note: one CPU only: server and client share it (figures are not comparable "
              "with a two-CPU run)", file=sys.stderr)
    outdir = result_dir("handoff", args.out, {"configs": args.configs})
    runs = []
    with bench_lock():
        counter = RunCounter(args.reps * len(configs))
        for rep in range(args.reps):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for label, backend, extra in order:
                rec = one_run(label, backend, extra, args, outdir, f"r{rep}-{label}")
                rec["rep"] = rep
                runs.append(rec)
                print(f"{counter.tick()} {label:12s} r{rep} {rec['conn_rate']:8.0f} conn/s  server "
                      f"{rec['server_us_per_conn'] or 0:7.2f} us/conn  p99 {rec['p99_us'] or 0:6.0f} us"
                      f"  channel {rec['channel']}  bound {rec['bound']}{'  NOISY' if rec['noisy'] else ''}",
                      flush=True)
    summary = summarize(runs, labels)
    with open(os.path.join(outdir, "handoff.json"), "w") as f:
        json.dump({"meta": machine_metadata(), "args": vars(args), "runs": runs,
                   "summary": summary}, f, indent=1)
    write_pyperf(os.path.join(outdir, "pyperf.json"),
                 {r["label"]: [x["server_us_per_conn"] / 1e6 for x in runs
                               if x["label"] == r["label"] and x["server_us_per_conn"]
                               and (r["all_noisy"] or not x["noisy"])]
                  for r in summary})
    print()
    print(format_summary(summary, labels[0]))
    print(f"\nraw results: {outdir}")
    bad = [r for r in runs if r["client_errors"] or r["server_crashed"] or r["overflow"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
