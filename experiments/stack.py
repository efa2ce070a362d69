"""Where the client's TCP stack lands: loopback, veth, and veth with receive steering.

On loopback a sender's ``send()`` runs the receiver's TCP receive path in its own softirq
(``loopback_xmit`` -> ``netif_rx`` -> the backlog of the *sending* CPU, processed when the
sender re-enables bottom halves), so the server's measured CPU includes the client's
receive of every answer, and the client's CPU includes the server's receive of every
request.  A veth pair does the same by default (``veth_xmit`` -> ``netif_rx`` on the
sending CPU).  With Receive Packet Steering on each end (``rps_cpus``, set by
``ClientNamespace.steer_rx``), the receive work is queued to the receiver's own CPUs and
raised there by IPI: each side then pays for its own receive, as with two hosts whose NIC
interrupts go to the receiving side's CPUs.

Three placements of one load point, paired within every repetition:

* ``loopback`` - the default placement (127.0.0.1);
* ``veth`` - the client in a network namespace, veth's default path (``--client
  netns?steer=0``): a control that changes the device but not who pays;
* ``veth-steered`` - the same with each end's receive steered to its side's CPUs
  (``--client netns``).

``loopback - veth-steered`` (server CPU per request, paired) estimates the client's
receive cost that loopback charges to the server, net of what steering itself costs
(the enqueue to another CPU and its IPI are charged to the sender); ``veth ÷ loopback``
shows what the device alone changes.  Needs root and iproute2 (the namespace); without
them the veth placements are skipped with the reason.
"""

from __future__ import annotations

from parallelnet.experiments import analysis
from parallelnet.experiments.framework import (
    Context, Experiment, Plan, PlanNotes, Point, Summary, Table, add_aa_twin,
    available_backends, rotated, server_cpu_per_request)
from parallelnet.experiments.measure import Layout

PLACEMENTS = ("loopback", "veth", "veth-steered")
BASE = "loopback"


def _placement_client(name: str):
    """A fresh, unopened Client for a veth placement; None for loopback (the run's own)."""
    if name == BASE:
        return None
    from parallelnet.experiments.remote import NetnsClient

    return NetnsClient(steer=name == "veth-steered")


def workloads(p: dict) -> list[tuple[str, int, int]]:
    return [(w[0], int(w[1]), int(w[2])) for w in p["workloads"]]


def wname(proto: str, size: int) -> str:
    return f"{proto}-{size}" if proto == "echo" else "http-GET/"


def plan(p: dict) -> Plan:
    from parallelnet.experiments.loadgen.netns import missing

    ok, skipped = available_backends(p["backends"])
    places = list(PLACEMENTS)
    why = missing()
    if why:
        places = [BASE]
        skipped.update({pl: why for pl in PLACEMENTS if pl != BASE})
    per = p["warmup"] + p["duration"] + 0.6
    points = []
    for rep in range(p["reps"]):
        for proto, size, rate in workloads(p):
            for b in rotated(ok, rep):
                for pl in rotated(places, rep):
                    points.append(Point(f"{b}/{wname(proto, size)}/{pl}", rep,
                                        {"backend": b, "protocol": proto, "size": size,
                                         "rate": rate, "placement": pl}, est_s=per))
    ran = [f"{b}/{pl}" for b in ok for pl in places]
    return Plan(add_aa_twin(points, p.get("aa")), PlanNotes(ran, skipped))


def run_point(point: Point, ctx: Context) -> dict:
    p, q = ctx.params, point.params
    server = ["--backend", q["backend"], "--workers", "1", "--protocol", q["protocol"],
              "--message-size", str(max(q["size"], 1))]
    load = {"connections": p["connections"], "duration": p["duration"], "warmup": p["warmup"],
            "protocol": q["protocol"], "mode": "open", "rate": q["rate"]}
    if q["protocol"] == "echo":
        load["size"] = q["size"]
    client = _placement_client(q["placement"])
    if client is None:
        rec = ctx.measure(server, load, Layout.default(1), point.label().replace("/", "_"))
    else:
        run_client = ctx.client
        client.open()            # a namespace for this point only, removed after it
        ctx.client = client
        try:
            rec = ctx.measure(server, load, Layout.default(1), point.label().replace("/", "_"))
        finally:
            ctx.client = run_client
            client.close()
    rec["offered"] = q["rate"]
    return rec


# -- summary --------------------------------------------------------------------------

def _by(records: list[dict]) -> dict:
    """{(backend, workload, placement): {rep: record}}."""
    out: dict = {}
    for r in records:
        q = r["params"]
        out.setdefault((q["backend"], wname(q["protocol"], q["size"]), q["placement"]),
                       {})[r["rep"]] = r
    return out


def _cpu(r: dict, side: str) -> float | None:
    return (r.get(side) or {}).get("cpu_us_per_req")


def _mr(m: dict | None) -> str:
    return f"{m['median']:.1f} ({m['min']:.1f}–{m['max']:.1f})" if m else "–"


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    s = Summary()
    by = _by(records)
    backends = list(dict.fromkeys(k.split("/")[0] for k in notes.ran))
    rows, compact = [], []
    for b in backends:
        for proto, size, rate in workloads(p):
            w = wname(proto, size)
            base = by.get((b, w, BASE), {})
            for pl in PLACEMENTS:
                recs = by.get((b, w, pl))
                if not recs:
                    continue
                srv = analysis.median_range([_cpu(r, "server") for r in recs.values()
                                             if _cpu(r, "server") is not None])
                cli = analysis.median_range([_cpu(r, "client") for r in recs.values()
                                             if _cpu(r, "client") is not None])
                p99 = analysis.median_range([r["client"]["latency_us"]["p99"]
                                             for r in recs.values()
                                             if (r.get("client") or {}).get("latency_us")])
                # the samples behind the p99s, in the thinnest repetition
                samples = analysis.fewest_samples(analysis.latency_samples(r) for r in recs.values()
                                                  if (r.get("client") or {}).get("latency_us"))
                bounds = analysis.row_bound([str(r.get("bound")) for r in recs.values()])
                ratio = diff = None
                if pl != BASE and base:
                    sa = {k: _cpu(r, "server") for k, r in recs.items()}
                    sb = {k: _cpu(r, "server") for k, r in base.items()}
                    ratio = analysis.ratio_summary(analysis.paired(sa, sb))
                    diff = analysis.diff_summary(analysis.paired_diff(sb, sa))
                    s.values[f"ratio.{b}.{w}.{pl}"] = ratio
                    s.values[f"moved_us.{b}.{w}.{pl}"] = diff
                s.values[f"server_us.{b}.{w}.{pl}"] = srv
                s.values[f"client_us.{b}.{w}.{pl}"] = cli
                s.values[f"p99.{b}.{w}.{pl}"] = {**p99, "samples": samples} if p99 else None
                rows.append([b, w, f"{rate}/s", pl, len(recs),
                             _mr(srv), _mr(cli),
                             analysis.fmt_tail(p99["median"], samples, 99) if p99 else "–",
                             analysis.fmt_ratio(ratio) if ratio else ("1" if pl == BASE else "–"),
                             analysis.fmt_interval(diff, digits=2, unit=" µs") if diff else "–",
                             bounds])
            st = s.values.get(f"moved_us.{b}.{w}.veth-steered")
            lo = s.values.get(f"server_us.{b}.{w}.{BASE}")
            if st and lo:
                share = st["estimate"] / lo["median"] if lo["median"] else None
                compact.append([b, w, f"{lo['median']:.1f}",
                                analysis.fmt_interval(st, digits=2, unit=" µs"),
                                f"{100 * share:.0f}%" if share is not None else "–"])
    s.tables.append(Table(
        "Server and client CPU per request by where the client's packets go",
        ["backend", "workload", "rate", "placement", "n", "server µs/req", "client µs/req",
         "p99 µs", f"server × {BASE} (paired)", f"{BASE} − this (server µs/req, paired)", "bound"],
        rows, key="all",
        note="µs/req: median (min–max) over repetitions; server CPU is the exact schedstat sum "
             "of its tasks (softirq run in their context included), client CPU the load "
             "generator's threads.  veth: client in a network namespace, receive on the "
             "sender's CPU (veth's default); veth-steered: each end's receive steered to its "
             "own side's CPUs (RPS).  " + analysis.tail_note()))
    if compact:
        s.tables.append(Table(
            "The client's stack cost that loopback charges to the server",
            ["backend", "workload", "server µs/req on loopback",
             "loopback − veth-steered (paired)", "share of loopback's figure"], compact,
            key="compact",
            note="A positive difference is work the server's CPU did for the client on "
                 "loopback; it is net of what steering costs the sender (the remote enqueue "
                 "and IPI), so it is a lower bound of the client's receive cost."))
    s.add_skipped(notes.skipped, key="skipped")
    for b in backends:
        for proto, size, _ in workloads(p):
            w = wname(proto, size)
            d = s.values.get(f"moved_us.{b}.{w}.veth-steered")
            v = s.values.get(f"ratio.{b}.{w}.veth")
            if d:
                s.findings.append(
                    f"{b} {w}: loopback charges the server {analysis.fmt_interval(d, 2, unit=' µs')}"
                    f" per request more than veth with steered receive"
                    + (f"; veth alone: {analysis.fmt_ratio(v)} of loopback" if v else ""))
    return s


def figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    import os

    from parallelnet.experiments import plots

    groups, series = [], {pl: [] for pl in PLACEMENTS}
    for b in dict.fromkeys(k.split("/")[0] for k in ctx.notes.ran):
        for proto, size, _ in workloads(ctx.params):
            w = wname(proto, size)
            if not summary.values.get(f"server_us.{b}.{w}.{BASE}"):
                continue
            groups.append(f"{b} {w}")
            for pl in PLACEMENTS:
                m = summary.values.get(f"server_us.{b}.{w}.{pl}")
                series[pl].append((m["median"], m["min"], m["max"]) if m else None)
    series = {pl: v for pl, v in series.items() if any(x is not None for x in v)}
    if not groups:
        return []
    return [plots.grouped_bars(groups, series, os.path.join(ctx.outdir, "stack.png"),
                               "server CPU µs/request",
                               "Server CPU per request by where the client's packets go")]


def pyperf_name(rec: dict) -> str:
    q = rec["params"]
    return f"{q['backend']}/{wname(q['protocol'], q['size'])}/rate={q['rate']}/{q['placement']}"


EXPERIMENT = Experiment(
    name="stack",
    title="Where the client's TCP stack lands: loopback, veth, veth with receive steering",
    presets={
        "smoke": dict(backends=["epoll"], workloads=[["echo", 64, 2000]], reps=1,
                      duration=0.4, warmup=0.2, connections=4, aa=None),
        "standard": dict(backends=["epoll", "native", "uring"],
                         workloads=[["echo", 64, 20000], ["echo", 16384, 6000],
                                    ["http", 0, 10000]],
                         reps=8, duration=2.0, warmup=0.5, connections=16,
                         aa="epoll/echo-64/loopback"),
        "full": dict(backends=["epoll", "native", "uring", "native-uring", "uvloop"],
                     workloads=[["echo", 64, 20000], ["echo", 16384, 6000],
                                ["echo", 65536, 2000], ["http", 0, 10000]],
                     reps=10, duration=3.0, warmup=0.5, connections=16,
                     aa="epoll/echo-64/loopback"),
    },
    plan=plan, run_point=run_point, summarize=summarize, figures=figures,
    pyperf_value=server_cpu_per_request, pyperf_name=pyperf_name,
    description=__doc__.split("\n\n")[0],
    params_doc={
        "backends": "backends to run (names, or \"all\")",
        "workloads": "[protocol, size, rate] triples: echo SIZE bytes or http GET / (size 0), "
                     "open loop at RATE req/s",
        "reps": "repetitions (placements rotated and paired within each)",
        "duration": "measured seconds per point", "warmup": "seconds before measuring",
        "connections": "client connections",
        "aa": "configuration measured twice per repetition (A/A control), or null",
    })
