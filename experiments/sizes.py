"""sizes: what io_uring buys depends on the payload.

Echo of 64 B to 64 KiB and HTTP responses of 1 KiB to 1 MiB (``GET /bytes/N``), each at
a fixed rate below every configuration's capacity and at saturation (closed loop), for
``epoll``, ``uring`` (plain send, and with ``IORING_OP_SEND_ZC`` from 16 KiB up:
``uring-zc``) and ``native`` (and ``native-uring`` where registered).  One worker on the
server CPU, the client on the other, 16 connections.  Per point: server CPU per request
and per KiB moved, latency, and the bottleneck.

Loopback caveat, stated with the data: a zero-copy send to a loopback peer is copied by
the kernel anyway (the receiver cannot keep pages that belong to the sender), so
``uring-zc`` measures SEND_ZC's bookkeeping here, not what it saves on a NIC.
"""

from __future__ import annotations


from parallelnet.experiments import analysis
from parallelnet.experiments.framework import (
    add_aa_twin,
    Context, Experiment, Plan, PlanNotes, Point, Summary, Table, labelled_configs, rotated,
    server_cpu_per_request,
)
from parallelnet.experiments.load_curve import RANKABLE, paired_ratio, row_stats
from parallelnet.experiments.measure import Layout

def workloads(p: dict) -> list[tuple[str, int, float]]:
    """(protocol, size, fixed rate) in order."""
    return [("echo", n, r) for n, r in p["echo"]] + [("http", n, r) for n, r in p["http"]]


def point_duration(p: dict, rate: float, load: str) -> float:
    """The measured window of one point: ``duration``, or longer at a fixed rate so that it
    holds ``min_requests`` (at 250 req/s a 0.75 s window holds 187 requests: no p99 -
    fewer than 10 beyond it - and a noisy CPU per request)."""
    if load == "rate" and p.get("min_requests"):
        return max(p["duration"], p["min_requests"] / rate)
    return p["duration"]


def plan(p: dict) -> Plan:
    configs, notes = labelled_configs(p)
    points = []
    for rep in range(p["reps"]):
        for proto, size, rate in workloads(p):
            for load in p.get("loads", ("rate", "sat")):
                per = p["warmup"] + point_duration(p, rate, load) + 0.4
                for label, backend, args in rotated(configs, rep):
                    points.append(Point(f"{label}/{proto}-{size}/{load}", rep,
                                        {"label": label, "backend": backend, "args": args,
                                         "protocol": proto, "size": size, "load": load,
                                         "rate": rate}, est_s=per))
    return Plan(add_aa_twin(points, p.get("aa")), notes)


def run_point(point: Point, ctx: Context) -> dict:
    p, q = ctx.params, point.params
    layout = Layout.default(1)
    server = ["--backend", q["backend"], "--workers", "1", "--protocol", q["protocol"], *q["args"]]
    load = {"connections": p["connections"], "duration": point_duration(p, q["rate"], q["load"]),
            "warmup": p["warmup"],
            "protocol": q["protocol"]}
    if q["protocol"] == "echo":
        server += ["--message-size", str(q["size"])]
        load["size"] = q["size"]
    else:
        load["path"] = f"/bytes/{q['size']}"
    if q["load"] == "rate":
        load.update(mode="open", rate=q["rate"])
    else:
        load.update(mode="closed")
    rec = ctx.measure(server, load, layout, point.label().replace("/", "_").replace(" ", "-"))
    cpu = rec["server"]["cpu_us_per_req"]
    rec["server"]["cpu_us_per_kib"] = cpu / (q["size"] / 1024) if cpu is not None else None
    return rec

def ranked(values: dict, cfg: str, base_cfg: str) -> bool:
    """Whether the tables rank ``cfg`` against the baseline ``base_cfg`` (same workload and
    load) - and so whether the ratio figure draws it: a paired ratio exists, and neither
    side was client- or both-bound in any repetition (``row_bound``).  Where either was,
    the ratio rests only on the pairs in which neither was, fewer than the row's
    repetitions, or says something about the client."""
    v, b = values.get(cfg), values.get(base_cfg)
    return (bool(v and b and v.get("ratio")) and v["bound"] in RANKABLE
            and b["bound"] in RANKABLE)


def why_unranked(values: dict, cfg: str, base_cfg: str, base: str) -> str:
    """Why ``ranked`` said no, in the words of a table cell."""
    v, b = values.get(cfg), values.get(base_cfg)
    if v and v["bound"] not in RANKABLE:
        return f"{v['bound']}-bound"
    if b and b["bound"] not in RANKABLE:
        return f"{base} {b['bound']}-bound"
    return "no paired ratio"


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    s = Summary()
    labels = notes.ran or sorted({r["params"]["label"] for r in records})
    base = p.get("baseline", "epoll")
    # Every cell's figures first: whether a cell is ranked depends on its baseline's too.
    stats = {}
    for proto, size, rate in workloads(p):
        for load in p.get("loads", ("rate", "sat")):
            for label in labels:
                cfg = f"{label}/{proto}-{size}/{load}"
                rs = [r for r in records if r["config"] == cfg]
                if not rs:
                    continue
                st = stats[cfg] = row_stats(rs)
                rr = paired_ratio(records, cfg, f"{base}/{proto}-{size}/{load}") if label != base else None
                s.values[f"{cfg}"] = {"cpu": st["cpu"], "p99": st["p99"], "rps": st["rps"],
                                      "bound": st["bound"], "ratio": rr, "samples": st["samples"]}
    rows = []
    for proto, size, rate in workloads(p):
        for load in p.get("loads", ("rate", "sat")):
            base_cfg = f"{base}/{proto}-{size}/{load}"
            for label in labels:
                cfg = f"{label}/{proto}-{size}/{load}"
                if cfg not in stats:
                    continue
                st, rr = stats[cfg], s.values[cfg]["ratio"]
                kib = size / 1024
                rows.append([f"{proto} {size} B", "rate " + f"{rate:g}" if load == "rate" else "sat",
                             label, str(st["n"]),
                             f"{st['cpu']['median']:.1f} ({st['cpu']['min']:.1f}–{st['cpu']['max']:.1f})"
                             if st["cpu"] else "–",
                             f"{st['cpu']['median'] / kib:.2f}" if st["cpu"] else "–",
                             f"{st['rps']:.0f}", f"{st['p50']:.0f}",
                             analysis.fmt_tail(st["p99"], st["samples"], 99),
                             "1" if label == base else (
                                 analysis.fmt_ratio(rr) if ranked(s.values, cfg, base_cfg) else
                                 f"not ranked ({why_unranked(s.values, cfg, base_cfg, base)})"),
                             st["bound"] + ("" if st["rate_met"] else ", rate not met")])
    s.tables.append(Table(
        "Server CPU per request by payload size",
        ["workload", "load", "config", "n", "server µs/req (min–max)", "µs per KiB", "req/s",
         "p50 µs", "p99 µs", f"× {base} (paired, 95% CI)", "bound"], rows,
        note="uring-zc: IORING_OP_SEND_ZC for sends of 16 KiB or more; on loopback the kernel "
             "copies anyway.  A ratio is ranked only where neither side was client- or "
             "both-bound in any repetition (else it would rest on fewer pairs).  "
             + analysis.tail_note(), key="all"))
    # Page faults per request (runs from 2026-12-05 on record them): a server that reuses
    # its buffers takes none in steady state; one that allocates per reply takes hundreds.
    faults = []
    for proto, size, rate in workloads(p):
        for label in labels:
            cfg = f"{label}/{proto}-{size}/rate"
            vals = [r["server"]["minflt_per_req"] for r in records if r["config"] == cfg
                    and (r.get("server") or {}).get("minflt_per_req") is not None]
            if vals:
                mr = analysis.median_range(vals)
                s.values[f"faults.{cfg}"] = mr
                faults.append([f"{proto} {size} B", label, str(mr["n"]),
                               f"{mr['median']:.3f} ({mr['min']:.3f}–{mr['max']:.3f})"])
    if faults:
        s.tables.append(Table(
            "Minor page faults per request at the fixed rate", ["workload", "config", "n",
                                                                "faults/request (min–max)"],
            faults, note="The server's processes, over the measured window (after the warm-up).",
            key="faults"))
    rows = []
    for proto, size, rate in workloads(p):
        for load in p.get("loads", ("rate", "sat")):
            cells = []
            base_cfg = f"{base}/{proto}-{size}/{load}"
            for label in labels:
                cfg = f"{label}/{proto}-{size}/{load}"
                v = s.values.get(cfg)
                if not v or not v["cpu"]:
                    cells.append("–")
                elif label == base:
                    cells.append(f"{v['cpu']['median']:.1f}" + ("" if v["bound"] in RANKABLE
                                                               else f" ({v['bound']}-bound)"))
                elif ranked(s.values, cfg, base_cfg):
                    cells.append(f"{v['cpu']['median']:.1f} ({v['ratio']['estimate']:.2f}×)")
                else:
                    cells.append(f"{v['cpu']['median']:.1f} ({why_unranked(s.values, cfg, base_cfg, base)})")
            rows.append([f"{proto} {size} B", f"{rate:g}/s" if load == "rate" else "sat", *cells])
    s.tables.append(Table(
        f"Server CPU µs per request by payload, with the paired ratio to {base}",
        ["workload", "load", *labels], rows,
        note=f"(×): the paired ratio to {base} as the full table estimates it (geometric mean "
                 "from 8 pairs, else the median); client- or both-bound cells, and cells whose "
             f"{base} was, are not ranked. Spread and latency: the full table in the run's "
             "summary.md.", key="compact"))
    interface_table(s, stats, records, p, labels)
    for label in labels:
        if label == base:
            continue
        rs = [(k, v["ratio"]) for k, v in s.values.items()
              if k.startswith(f"{label}/") and ranked(s.values, k, f"{base}/{k.split('/', 1)[1]}")]
        if rs:
            s.findings.append(f"{label} vs {base}: " + "; ".join(
                f"{k.split('/', 1)[1]} ×{r['estimate']:.2f}" for k, r in rs))
    s.add_skipped(notes.skipped, "Configurations not run")
    return s


#: Each io_uring backend and the epoll backend that runs the same protocol code: their
#: paired ratio is what the interface buys, the language held fixed (the 2x2).
TWINS = (("uring", "epoll"), ("native-uring", "native"))


def interface_table(s: Summary, stats: dict, records: list[dict], p: dict, labels: list[str]) -> None:
    """io_uring / epoll at equal protocol code, paired per repetition, for each twin that ran
    (values ``interface.A/B/WORKLOAD/LOAD``: the ratio, None where a side is not ranked)."""
    twins = [(a, b) for a, b in TWINS if a in labels and b in labels]
    if not twins:
        return
    rows = []
    for proto, size, rate in workloads(p):
        for load in p.get("loads", ("rate", "sat")):
            where = f"{proto}-{size}/{load}"
            cells = []
            for a, b in twins:
                sa, sb = stats.get(f"{a}/{where}"), stats.get(f"{b}/{where}")
                if not sa or not sb:
                    cells.append("–")
                    continue
                bad = [f"{x} {st['bound']}-bound" for x, st in ((a, sa), (b, sb))
                       if st["bound"] not in RANKABLE]
                rr = None if bad else paired_ratio(records, f"{a}/{where}", f"{b}/{where}")
                s.values[f"interface.{a}/{b}/{where}"] = rr
                cells.append(f"not ranked ({', '.join(bad)})" if bad else analysis.fmt_ratio(rr))
            rows.append([f"{proto} {size} B", f"{rate:g}/s" if load == "rate" else "sat", *cells])
    s.tables.append(Table(
        "What the interface buys at equal protocol code: io_uring ÷ epoll, paired",
        ["workload", "load", *(f"{a} ÷ {b}" for a, b in twins)], rows,
        note="Server CPU per request, paired within each repetition; a 95% CI from 8 pairs, "
             "else the range. Read each beside the run's A/A control.", key="interface"))


def figures(summary: Summary, records: list[dict], ctx: Context) -> list[str]:
    from parallelnet.experiments import plots

    p = ctx.params
    series = {}
    for label in ctx.notes.ran:
        for proto in ("echo", "http"):
            for load in p.get("loads", ("rate", "sat")):
                pts = []
                for pr, size, _ in workloads(p):
                    v = summary.values.get(f"{label}/{pr}-{size}/{load}")
                    if pr == proto and v and v["cpu"]:
                        kib = size / 1024
                        pts.append((size, v["cpu"]["median"] / kib, v["cpu"]["min"] / kib,
                                    v["cpu"]["max"] / kib))
                if pts:
                    series[f"{proto}, {'fixed rate' if load == 'rate' else 'saturation'}|{label}"] = pts
    panels = sorted({k.split("|")[0] for k in series})
    path = f"{ctx.outdir}/sizes.png"
    out = [plots.lines(series, path, "payload bytes (log)", "server CPU µs per KiB (log)",
                       title="Cost per KiB by payload size", logy=True, panels=panels, logx=True)]
    base = p.get("baseline", "epoll")
    ratios = {}
    for label in ctx.notes.ran:
        if label == base:
            continue
        for proto in ("echo", "http"):
            for load in p.get("loads", ("rate", "sat")):
                pts = []
                for pr, size, _ in workloads(p):
                    cfg, base_cfg = f"{label}/{pr}-{size}/{load}", f"{base}/{pr}-{size}/{load}"
                    # exactly what the tables rank: nothing they mark "not ranked"
                    if pr == proto and ranked(summary.values, cfg, base_cfg):
                        r = summary.values[cfg]["ratio"]
                        pts.append((size, r["estimate"], r["interval"][0], r["interval"][1]))
                if pts:
                    ratios[f"{proto}, {'fixed rate' if load == 'rate' else 'saturation'}|{label}"] = pts
    if ratios:
        out.append(plots.lines(ratios, f"{ctx.outdir}/sizes-ratio.png", "payload bytes (log)",
                               f"server CPU per request ÷ {base}'s (paired)",
                               title=f"What each configuration buys over {base}, by payload "
                                     f"(cells the table does not rank - client- or both-bound "
                                     f"on either side - are left out)",
                               hline=1.0, panels=sorted({k.split("|")[0] for k in ratios}),
                               logx=True, ylim0=False))
    return out


CONFIGS = ["epoll", "epoll-b200=epoll:--epoll-latency-budget-us 200", "uring",
           "uring-b0=uring:--uring-latency-budget-us 0", "native", "native-uring"]

EXPERIMENT = Experiment(
    name="sizes", title="What io_uring buys by payload size (echo 64 B-64 KiB, HTTP 1 KiB-1 MiB)",
    presets={
        "smoke": dict(configs=["epoll", "native"], echo=[[64, 5000], [16384, 2000]], http=[],
                      connections=16, reps=1, duration=0.5, warmup=0.3, baseline="epoll", aa=None,
                      min_requests=0),
        "standard": dict(configs=CONFIGS,
                         echo=[[64, 20000], [1024, 20000], [16384, 8000], [65536, 3000]],
                         http=[[1024, 10000], [65536, 3000], [1048576, 250]],
                         connections=16, reps=8, duration=0.75, warmup=0.4, baseline="epoll",
                         loads=["rate"], aa="epoll/echo-64/rate", min_requests=2000),
        "full": dict(configs=CONFIGS,
                     echo=[[64, 20000], [256, 20000], [1024, 20000], [4096, 15000], [16384, 8000],
                           [65536, 3000]],
                     http=[[1024, 10000], [16384, 6000], [65536, 3000], [262144, 1000], [1048576, 250]],
                     connections=16, reps=5, duration=3.0, warmup=0.5, baseline="epoll",
                     aa="epoll/echo-64/rate", min_requests=2000),
    },
    plan=plan, run_point=run_point, summarize=summarize, figures=figures, pyperf_value=server_cpu_per_request,
    description="echo and HTTP payloads at a fixed rate and at saturation: epoll, uring (±ZC), native")
