"""Regenerate paper/paper.md from paper/paper.in.md and the raw results in results/.

    python paper/build.py [--results results] [--check]

Every table and every number in the paper comes from a results directory; none is typed
by hand.  In the template, ``<!-- table:NAME -->`` is replaced by a generated table and
``{{NAME}}`` by a generated value; each section names the run directory it was built
from.  For each experiment the newest run directory is used (``--results`` to point
elsewhere).  ``--check`` exits non-zero if paper.md is not what the results give.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def newest(results: str, name: str, filename: str) -> tuple[str, dict] | None:
    runs = sorted(glob.glob(os.path.join(results, f"*-{name}", filename)))
    if not runs:
        return None
    path = runs[-1]
    with open(path) as f:
        return os.path.relpath(os.path.dirname(path), ROOT), json.load(f)


def fmt(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def bench_uring(results: str, tables: dict, values: dict) -> None:
    found = newest(results, "bench_uring", "bench_uring.json")
    if not found:
        return
    run_dir, data = found
    # The summary is recomputed from the raw runs by the experiment's own code, so every
    # committed run gets the current statistics (the paired ratios among them).
    from types import SimpleNamespace

    from parallelnet.experiments.bench_uring import summarize

    runs = data["runs"]
    data["summary"] = summarize(runs, SimpleNamespace(
        connections=sorted({r["connections"] for r in runs}),
        labels=list(dict.fromkeys(r["backend"] for r in runs))))
    rows = []
    for r in data["summary"]:
        paired = (f"{fmt(r['vs_epoll_paired'], '.3f')} ({fmt(r['paired_min'], '.3f')}–{fmt(r['paired_max'], '.3f')})"
                  if "vs_epoll_paired" in r else "–")
        rows.append([r["backend"] + (" (noisy)" if r.get("all_noisy") else ""),
                     str(r["connections"]), str(r["n"]),
                     f"{fmt(r['cpu_us_per_req'])} ({fmt(r['cpu_min'])}–{fmt(r['cpu_max'])})",
                     fmt(r["user_us"]), fmt(r["sys_us"]), paired,
                     f"{r['rps'] / 1e3:.0f}k ({r['rps_min'] / 1e3:.0f}–{r['rps_max'] / 1e3:.0f}k)",
                     fmt(r.get("entries_per_req"), ".3f")])
        values[f"bench_uring.{r['backend']}.c{r['connections']}.vs_epoll"] = fmt(r.get("vs_epoll_paired"), ".3f")
        values[f"bench_uring.{r['backend']}.c{r['connections']}.paired_range"] = (
            f"{fmt(r.get('paired_min'), '.3f')}–{fmt(r.get('paired_max'), '.3f')}")
        values[f"bench_uring.{r['backend']}.c{r['connections']}.cpu"] = fmt(r["cpu_us_per_req"])
        values[f"bench_uring.{r['backend']}.c{r['connections']}.user"] = fmt(r["user_us"])
        values[f"bench_uring.{r['backend']}.c{r['connections']}.sys"] = fmt(r["sys_us"])
        values[f"bench_uring.{r['backend']}.c{r['connections']}.entries"] = fmt(r.get("entries_per_req"), ".3f")
    ratios = [r["vs_epoll_paired"] for r in data["summary"]
              if r["backend"] == "uring" and r.get("vs_epoll_paired")]
    values["bench_uring.target"] = ("was met" if ratios and max(ratios) <= 0.80 else
                                    "was not met" if ratios else "could not be judged")
    noisy = (sum(r["noisy_dropped"] for r in data["summary"])
             if all("noisy_dropped" in r for r in data["summary"])
             else sum(1 for r in data["runs"] if r.get("noisy")))
    all_noisy = ("; a row marked *(noisy)* had no quiet run and uses its noisy ones"
                 if any(r.get("all_noisy") for r in data["summary"]) else "")
    meta = data.get("meta", {})
    values["bench_uring.cffi_call_ns"] = fmt(meta.get("micro", {}).get("cffi_call_ns"), ".0f")
    values["bench_uring.noisy"] = str(noisy)
    values["bench_uring.runs"] = str(len(data["runs"]))
    tables["bench_uring"] = (
        md_table(["backend", "conns", "n", "server CPU µs/req, median (min–max)", "user",
                  "sys", "× epoll, paired per rep: median (min–max)", "req/s (min–max)",
                  "kernel entries/req"], rows)
        + f"\n\n*Source: `{run_dir}` — {meta.get('cpu_model', '?')}, kernel "
          f"{meta.get('kernel', '?')}, Python {meta.get('python', '?')}, {meta.get('date', '?')}; "
          f"{noisy} of {len(data['runs'])} runs flagged noisy and left out of the medians{all_noisy}.*")


def drift(results: str, tables: dict, values: dict) -> None:
    """The same configuration (epoll, 16 connections) across every bench_uring run."""
    seen = []
    for path in sorted(glob.glob(os.path.join(results, "*-bench_uring", "bench_uring.json"))):
        with open(path) as f:
            data = json.load(f)
        for r in data["summary"]:
            if r["backend"] == "epoll" and r["connections"] == 16:
                seen.append((r["cpu_us_per_req"], r["sys_us"], data.get("meta", {}).get("date", "?"),
                             os.path.relpath(os.path.dirname(path), ROOT)))
    if len(seen) < 2:
        return
    lo, hi = min(seen), max(seen)
    values["drift.epoll.lo"] = f"{lo[0]:.2f} µs (sys {lo[1]:.2f}) at {lo[2]} (`{lo[3]}`)"
    values["drift.epoll.hi"] = f"{hi[0]:.2f} µs (sys {hi[1]:.2f}) at {hi[2]} (`{hi[3]}`)"
    values["drift.epoll.ratio"] = f"{hi[0] / lo[0]:.2f}"


def accept(results: str, tables: dict, values: dict) -> None:
    found = newest(results, "accept", "accept.json")
    if not found:
        return
    run_dir, data = found
    rows = []
    for r in data["summary"]:
        time_range = r.get("share_w0_time")
        rows.append([r["backend"], r["strategy"] + (" (noisy)" if r.get("all_noisy") else ""), str(r["n"]),
                     f"{100 * r['share_w0']:.0f}%" + (f" ({100 * time_range[0]:.0f}–{100 * time_range[1]:.0f}%)"
                                                      if time_range else ""),
                     fmt(r["lost_per_accept"], ".3f"), fmt(r["max_min"]), fmt(r["jain"], ".3f"),
                     f"{r['conn_rate']:.0f}", f"{r['p99_us']:.0f}"])
        key = f"accept.{r['backend']}.{r['strategy']}"
        values[key + ".lost"] = fmt(r["lost_per_accept"], ".3f")
        values[key + ".jain"] = fmt(r["jain"], ".3f")
        values[key + ".share_w0"] = f"{100 * r['share_w0']:.0f}%"
        values[key + ".rate"] = f"{r['conn_rate'] / 1e3:.1f}k"
        values[key + ".p99"] = f"{r['p99_us'] / 1e3:.1f} ms"
    meta = {}
    meta_path = os.path.join(ROOT, run_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    args = data.get("args", {})
    tables["accept"] = (
        md_table(["backend", "strategy", "n", "worker 0 share (range per 0.25 s)", "lost races/accept", "max/min",
                  "Jain", "conn/s", "p99 µs (connect+echo+close)"], rows)
        + f"\n\n*Source: `{run_dir}` — {args.get('workers')} workers, {args.get('connections')} "
          f"concurrent churning clients, {args.get('duration')} s × {args.get('reps')} reps; "
          f"{meta.get('cpu_model', '?')}, kernel {meta.get('kernel', '?')}, {meta.get('date', '?')}.*")


def validate_loadgen(results: str, tables: dict, values: dict) -> None:
    runs = sorted(glob.glob(os.path.join(results, "*-validate_loadgen")))
    if not runs:
        return
    run_dir = runs[-1]
    rel = os.path.relpath(run_dir, ROOT)

    def load(name):
        path = os.path.join(run_dir, f"{name}.json")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return json.load(f)

    rows = []
    for r in load("wrk_vs_loadgen"):
        rows.append([r["backend"], f"{r['wrk_median'] / 1e3:.0f}k", f"{r['loadgen_median'] / 1e3:.0f}k",
                     f"{r['diff_pct']:+.1f}%", "yes" if r["within_10pct"] else "no"])
        values[f"validate.wrk.{r['backend']}.diff"] = f"{r['diff_pct']:+.1f}%"
    tables["validate_wrk"] = (md_table(["server", "wrk req/s (median of 3)", "loadgen req/s",
                                        "difference", "within 10%"], rows)
                              + f"\n\n*Source: `{rel}`.*")
    rows = []
    for r in load("capacity"):
        spec = r["spec"]
        rows.append([str(spec["connections"]), str(spec["depth"]), f"{r['rps'] / 1e3:.0f}k",
                     fmt(r["client_cpu_us_per_req"]), fmt(r.get("server_cpu_us_per_req")),
                     fmt(r.get("p50_us"), ".0f"), fmt(r.get("p99_us"), ".0f")])
    tables["validate_capacity"] = (md_table(["connections", "depth", "req/s", "client CPU µs/req",
                                             "server CPU µs/req", "p50 µs", "p99 µs"], rows)
                                   + f"\n\n*Source: `{rel}` — 64 B echo against `native`.*")
    rows = []
    for r in load("open_loop"):
        spec = r["spec"]
        rows.append([spec["mode"], str(spec["connections"]),
                     f"{r['target_rate'] / 1e3:.0f}k" if r["target_rate"] else "–",
                     f"{r['achieved_rate'] / 1e3:.1f}k", "yes" if r["rate_met"] else "**no**",
                     fmt(r.get("p50_us"), ".0f"), fmt(r.get("p99_us"), ".0f"),
                     fmt(r.get("max_us"), ".0f")])
    tables["validate_open_loop"] = (md_table(["mode", "connections", "target rate", "achieved",
                                              "rate met", "p50 µs", "p99 µs", "max µs"], rows)
                                    + f"\n\n*Source: `{rel}`.*")


def soak(results: str, tables: dict, values: dict) -> None:
    rows = []
    sources = []
    for backend_dir in sorted({os.path.basename(p).split("-soak-", 1)[1]
                               for p in glob.glob(os.path.join(results, "*-soak-*"))}):
        found = newest(results, f"soak-{backend_dir}", "soak.json")
        if not found:
            continue
        run_dir, d = found
        sources.append(f"`{run_dir}`")
        faults = ", ".join(f"{k} {v}" for k, v in sorted(d["faults"].items()))
        rows.append([d["backend"], f"{d['duration']:.0f} s", f"{d['requests']:,}", faults,
                     str(d["responses_lost"]), str(d["mismatches"]),
                     f"{d['fds'][0]} → {d['fds'][1]}",
                     f"{d['rss_kib'][0] / 1024:.1f} → {d['rss_kib'][1] / 1024:.1f}",
                     "PASS" if d["passed"] else "**FAIL**"])
    if rows:
        tables["soak"] = (md_table(["backend", "duration", "well-formed requests", "faults injected",
                                    "lost", "mismatches", "fds", "RSS MiB", "verdict"], rows)
                          + "\n\n*Sources: " + ", ".join(sources) + ".*")




def handoff(results: str, tables: dict, values: dict) -> None:
    found = newest(results, "handoff", "handoff.json")
    if not found:
        return
    run_dir, data = found
    rows = []
    first = data["summary"][0]["label"] if data["summary"] else ""
    for r in data["summary"]:
        rows.append([r["label"] + (" (noisy)" if r.get("all_noisy") else ""), r["backend"], str(r["n"]),
                     f"{fmt(r['us_per_conn'])} ({fmt(r['us_min'])}–{fmt(r['us_max'])})",
                     fmt(r.get("vs_first"), ".3f"),
                     f"{r['conn_rate'] / 1e3:.1f}k ({r['rate_min'] / 1e3:.1f}–{r['rate_max'] / 1e3:.1f}k)",
                     f"{r['p50_us']:.0f}", f"{r['p99_us']:.0f}"])
        key = f"handoff.{r['label']}"
        values[key + ".us"] = fmt(r["us_per_conn"])
        values[key + ".vs"] = fmt(r.get("vs_first"), ".3f")
        values[key + ".rate"] = f"{r['conn_rate'] / 1e3:.1f}k"
        values[key + ".rate_vs"] = fmt(r.get("rate_vs_first"), ".3f")
        values[key + ".p99"] = f"{r['p99_us'] / 1e3:.1f} ms"
        values[key + ".range"] = f"{fmt(r['us_min'])}–{fmt(r['us_max'])}"
    meta, args = data.get("meta", {}), data.get("args", {})
    tables["handoff"] = (
        md_table(["channel", "backend", "n", "server CPU µs/connection, median (min–max)",
                  f"× {first}", "conn/s (min–max)", "p50 µs", "p99 µs"], rows)
        + f"\n\n*Source: `{run_dir}` — {args.get('connections')} churning clients, "
          f"{args.get('duration')} s × {args.get('reps')} reps, rotated order; {meta.get('cpu_model', '?')}, "
          f"kernel {meta.get('kernel', '?')}, {meta.get('date', '?')}.*")


def pyperf_cpu(results: str, tables: dict, values: dict) -> None:
    runs = sorted(glob.glob(os.path.join(results, "*-pyperf_cpu", "pyperf.json")))
    if not runs:
        return
    import pyperf  # the bench extra; only needed once such a run exists

    path = runs[-1]
    run_dir = os.path.relpath(os.path.dirname(path), ROOT)
    suite = pyperf.BenchmarkSuite.load(path)
    benches = suite.get_benchmarks()
    base = next((b for b in benches if b.get_name().startswith("epoll-")), None)
    rows = []
    for b in benches:
        name = b.get_name()
        backend = name.rsplit("-c", 1)[0]
        ratio = b.median() / base.median() if base else None
        rows.append([backend, str(b.get_nrun()), str(b.get_nvalue()), f"{b.median() * 1e6:.2f}",
                     f"{b.median_abs_dev() * 1e6:.2f}", f"{b.mean() * 1e6:.2f} ± {b.stdev() * 1e6:.2f}",
                     fmt(ratio, ".3f")])
        values[f"pyperf_cpu.{backend}.median"] = f"{b.median() * 1e6:.2f}"
        values[f"pyperf_cpu.{backend}.vs_epoll"] = fmt(ratio, ".3f")
    meta = benches[0].get_metadata() if benches else {}
    dates = benches[0].get_dates() if benches else None
    meta["date"] = dates[0].strftime("%Y-%m-%dT%H:%M:%S") if dates else "?"
    conns = benches[0].get_name().rsplit("-c", 1)[1] if benches else "?"
    values["pyperf_cpu.connections"] = conns
    values["pyperf_cpu.loops"] = str(meta.get("loops", "?"))
    tables["pyperf_cpu"] = (
        md_table(["backend", "pyperf runs", "values", "median µs/req", "MAD", "mean ± std dev", "× epoll"], rows)
        + f"\n\n*Source: `{run_dir}` — pyperf {pyperf.__version__} worker processes, calibrated loops "
          f"({meta.get('loops', '?')} requests per value), {conns} connections; "
          f"{meta.get('cpu_model_name', '?')}, kernel {meta.get('platform', '?')}, {meta.get('date', '?')}.*")


BUILDERS = [bench_uring, drift, pyperf_cpu, accept, handoff, validate_loadgen, soak]


def render(template: str, tables: dict, values: dict) -> str:
    def table(m):
        name = m.group(1)
        return tables.get(name, f"*(no `{name}` results yet: run the experiment, then `make paper`)*")

    def value(m):
        return values.get(m.group(1), "n/a")

    text = re.sub(r"<!-- table:([\w.-]+) -->", table, template)
    return re.sub(r"\{\{([\w.:-]+)\}\}", value, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=os.path.join(ROOT, "results"))
    p.add_argument("--check", action="store_true", help="fail if paper.md is stale")
    args = p.parse_args(argv)
    tables: dict[str, str] = {}
    values: dict[str, str] = {}
    for build in BUILDERS:
        build(args.results, tables, values)
    with open(os.path.join(HERE, "paper.in.md")) as f:
        text = render(f.read(), tables, values)
    out = os.path.join(HERE, "paper.md")
    if args.check:
        with open(out) as f:
            if f.read() != text:
                print("paper/paper.md is stale: run python paper/build.py", file=sys.stderr)
                return 1
        return 0
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(out, ROOT)} ({len(tables)} tables, {len(values)} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
