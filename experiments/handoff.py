"""What the hand-off channel costs under ``--accept dispatch``: SCM_RIGHTS vs IORING_OP_MSG_RING.

    parallelnet experiment handoff --preset standard
    parallelnet experiment handoff --set 'configs=["scm=uring", "mr=uring:--uring-handoff msg-ring"]'

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
rotated order within each repetition; noisy runs are flagged (noise.NoiseProbe) and
left out of the medians when quiet ones exist.  A configuration is ``LABEL=BACKEND[:ARGS]``
(framework.parse_config); the first is the baseline of the ratios.  One record per run
(the same fields the stand-alone script wrote into handoff.json's ``runs``, so
:func:`summary_rows` reads both: the paper still cites a run of that script).
"""

from __future__ import annotations

import os
import statistics

from parallelnet.experiments import analysis
from parallelnet.experiments.analysis import prefer_quiet
from parallelnet.experiments.framework import (
    Context, Experiment, Plan, PlanNotes, Point, Summary, Table, labelled_configs, rotated,
)
from parallelnet.experiments.measure import Layout, bottleneck
from parallelnet.experiments.noise import NoiseProbe, process_cpu_ns


def cpus() -> tuple[int, int]:
    """(the server's CPU, the client's): the first and the last."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], allowed[-1]


def plan(p: dict) -> Plan:
    cfgs, notes = labelled_configs(p)
    per = p["warmup"] + p["duration"] + 1.0
    points = [Point(label, rep, {"label": label, "backend": b, "args": a}, est_s=per)
              for rep in range(p["reps"]) for label, b, a in rotated(cfgs, rep)]
    return Plan(points, notes)


def run_point(point: Point, ctx: Context) -> dict:
    from parallelnet.experiments.loadgen import LoadSpec, run

    p, q = ctx.params, point.params
    server_cpu, client_cpu = cpus()
    srv = ctx.server(["--backend", q["backend"], "--accept", "dispatch", "--cpus", str(server_cpu),
                      "--workers", "2", "--dispatch-cpu", str(server_cpu), "--message-size", "64",
                      *q["args"]], point.label().replace(" ", "-"), cpus={server_cpu})
    try:
        base = LoadSpec(host=srv.host, port=srv.port, mode="churn", connections=p["connections"],
                        cpus=[client_cpu], size=64, warmup=0.0)
        run(LoadSpec(**{**base.__dict__, "duration": p["warmup"]}))  # lazy set-up out of the window
        probe = NoiseProbe([os.getpid(), srv.proc.pid]).start()
        cpu0 = process_cpu_ns(srv.proc.pid)
        res = run(LoadSpec(**{**base.__dict__, "duration": p["duration"]}))
        cpu1 = process_cpu_ns(srv.proc.pid)
        noise = probe.stop()
    finally:
        final = ctx.stop_server(srv)
    conns = res.requests
    workers = final.get("workers", [])
    disp = final.get("dispatcher") or {}
    rec = {
        "label": q["label"], "backend": q["backend"], "args": q["args"],
        "connections": p["connections"], "conn_rate": res.rps, "completed": conns,
        "client_errors": res.errors_total,
        "p50_us": res.latency.get("p50"), "p99_us": res.latency.get("p99"),
        "server_cpu_s": (cpu1 - cpu0) / 1e9,
        "server_us_per_conn": (cpu1 - cpu0) / 1e3 / conns if conns else None,
        "channel": disp.get("channel"), "handed": disp.get("handed"),
        "overflow": disp.get("overflow"), "dispatch_errors": disp.get("errors"),
        "msg_handoffs": sum(w.get("extra", {}).get("msg_handoffs", 0) for w in workers),
        "handoff_wakeups": sum(w.get("extra", {}).get("handoff_wakeups", 0) for w in workers),
        "server_crashed": [w["crashed"] for w in workers if w.get("crashed")],
        "noisy": noise["noisy"], "noise": noise,
        "bound": bottleneck(noise["per_cpu"], Layout([server_cpu], [client_cpu]), False, True),
    }
    if rec["client_errors"] or rec["overflow"] or not conns:
        raise RuntimeError(f"{q['label']}: {rec['client_errors']} client errors, "
                           f"{rec['overflow']} hand-off overflows, {conns} connections")
    return rec


def common_bound(runs: list[dict]) -> str:
    """The most frequent bottleneck of a row's runs ('?' for runs recorded before bottlenecks
    were)."""
    bounds = [r.get("bound") or "?" for r in runs]
    return max(sorted(set(bounds)), key=bounds.count) if bounds else "?"


def summary_rows(runs: list[dict], labels: list[str]) -> list[dict]:
    """One row per configuration: medians over its quiet runs (all runs, marked, when every
    one was noisy), ratios to the first label's."""
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
                     "p99_us": statistics.median(r["p99_us"] for r in rs),
                     # churn: one latency sample per connection; the thinnest run's count
                     "samples": analysis.fewest_samples(r.get("completed") for r in rs)})
    base = next((r for r in rows if r["label"] == labels[0]), None)
    for r in rows:
        if base:
            r["vs_first"] = r["us_per_conn"] / base["us_per_conn"]
            r["rate_vs_first"] = r["conn_rate"] / base["conn_rate"]
    return rows


def table_row(r: dict) -> list[str]:
    def f(x, spec=".2f"):
        return "–" if x is None else format(x, spec)

    return [r["label"] + (" (noisy)" if r.get("all_noisy") else ""), r["backend"], str(r["n"]),
            f"{f(r['us_per_conn'])} ({f(r['us_min'])}–{f(r['us_max'])})", f(r.get("vs_first"), ".3f"),
            f"{r['conn_rate'] / 1e3:.1f}k ({r['rate_min'] / 1e3:.1f}–{r['rate_max'] / 1e3:.1f}k)",
            f"{r['p50_us']:.0f}", analysis.fmt_tail(r["p99_us"], r.get("samples"), 99),
            r.get("bound", "?")]


def header(first: str) -> list[str]:
    return ["channel", "backend", "n", "server CPU µs/connection, median (min–max)", f"× {first}",
            "conn/s (min–max)", "p50 µs", "p99 µs", "bound"]


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    s = Summary()
    labels = notes.ran or list(dict.fromkeys(r["label"] for r in records))
    rows = summary_rows(records, labels)
    s.tables.append(Table("The dispatch channel: server CPU per connection", header(labels[0]),
                          [table_row(r) for r in rows], key="all",
                          note="p99: connect, one echo and close.  " + analysis.tail_note("connection")))
    for r in rows:
        for k in ("us_per_conn", "vs_first", "rate_vs_first"):
            s.values[f"{r['label']}.{k}"] = r.get(k)
        s.findings.append(f"{r['label']} ({r['backend']}): {r['us_per_conn']:.2f} µs of server CPU "
                          f"per connection, ×{r.get('vs_first', float('nan')):.3f} {labels[0]}")
    s.add_skipped(notes.skipped)
    return s


def per_connection(rec: dict) -> tuple[float, int] | None:
    us = rec.get("server_us_per_conn")
    return (us / 1e6, rec["completed"]) if us else None


EXPERIMENT = Experiment(
    name="handoff", title="The dispatch channel: SCM_RIGHTS vs IORING_OP_MSG_RING",
    presets={
        "smoke": dict(configs=["scm=uring", "msg-ring=uring:--uring-handoff msg-ring",
                               "epoll-scm=epoll"], connections=8, reps=1, duration=0.5, warmup=0.2),
        "standard": dict(configs=["scm=uring", "msg-ring=uring:--uring-handoff msg-ring",
                                  "epoll-scm=epoll"], connections=32, reps=5, duration=3.0,
                         warmup=0.5),
        "full": dict(configs=["scm=uring", "msg-ring=uring:--uring-handoff msg-ring",
                              "epoll-scm=epoll"], connections=32, reps=8, duration=4.0, warmup=0.5),
    },
    plan=plan, run_point=run_point, summarize=summarize, pyperf_value=per_connection,
    description="server CPU per connection under --accept dispatch, churn (one echo per connection)")
