"""Regenerate paper/paper.md and paper/figures/ from paper/paper.in.md and the pinned results.

    python paper/build.py [--check]          # make paper

Every table, figure and number of the paper comes from a results directory that the
template *pins* (``<!-- pin EXPERIMENT: results/DIR [results/DIR2 ...] -->``, see
experiments/paper_pins.py); nothing is typed by hand, and a new run changes the paper
only once it is pinned (``parallelnet reproduce`` pins what it has just produced).

Template syntax, each resolved against the pinned run of EXPERIMENT:

* ``{{EXPERIMENT:KEY|FORMAT}}`` - a named value of the experiment's summary (recomputed
  here from its raw records with the experiment's own ``summarize``, so every pinned run
  gets the current statistics).  KEY may descend into a value (``cpu.epoll.sat.median``);
  FORMAT is a Python format spec or one of ``ratio`` (median× [95% CI] n=), ``pct``,
  ``pp`` (percentage points, signed), ``us`` (a signed difference in µs with its CI), ``x``
  (×ratio), ``slope`` (a signed estimate with its interval), ``cost`` (µs with its interval), ``int``.
* ``<!-- table:EXPERIMENT:TABLEKEY -->`` - a summary table, with its source line.
* ``<!-- figure:EXPERIMENT:FILE|CAPTION -->`` - a figure, regenerated from the records by
  the experiment's own plotting code into ``paper/figures/EXPERIMENT-FILE`` and embedded.
* ``{{meta:EXPERIMENT:KEY}}`` - provenance of the pinned run (commit, date, kernel, cpu).
* ``{{pins:commit}}`` - the one commit every pinned run measured: pins from several
  commits, or from a tree that differed from its commit, fail the build.
* Runs of another machine or another commit: a pin named ``EXPERIMENT@GROUP`` (``scaling@16``,
  pinned by hand from a lent 16-CPU machine's runs; ``sizes@later``, a later run on this
  machine) is cited as ``{{scaling@16:KEY}}`` and so on.  Each group must have measured one
  commit on a clean tree of its own (``{{pins:commit@16}}``); ``make reproduce`` re-runs the
  ungrouped pins only (experiments/device/scaling.sh makes the 16-CPU ones).

validate_loadgen, soak and handoff were stand-alone scripts before they became framework
experiments; a pinned run of the old scripts (no ``records.jsonl``, one results file
each) is read by the builders below, a framework run of them like any other, with the
same table and value names.  A missing pin, run, value or table is an error
listing every one of them: the build never prints "n/a" for something it could not find.
``--check`` fails if paper.md is not what the pinned results give.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

from parallelnet.experiments import analysis

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIGURES = os.path.join(HERE, "figures")


class BuildError(RuntimeError):
    pass


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(x, spec=".2f") -> str:
    if x is None:
        raise BuildError("a value the paper shows is missing")
    return format(x, spec)


# -- pinned framework runs -------------------------------------------------------------------

class Run:
    """One pinned run of a framework experiment: its records, recomputed summary, meta."""

    def __init__(self, name: str, rel: str) -> None:
        from parallelnet.experiments import framework

        path = os.path.join(ROOT, rel)
        if not os.path.isdir(path):
            raise BuildError(f"pinned run {rel} of {name} does not exist")
        self.name, self.rel, self.path = name, rel, path
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        if self.meta.get("outcome") != framework.OK or (
                self.meta.get("planned") is not None and self.meta.get("points") != self.meta["planned"]):
            raise BuildError(f"pinned run {rel} of {name} did not end ok with every planned point "
                             f"(outcome: {self.meta.get('outcome')}): the paper cites complete runs only")
        self.exp = framework.get(self.meta["experiment"])
        self.records = [r for r in framework.load_records(path) if "error" not in r]
        self.params = self.meta["params"]
        self.notes = framework.PlanNotes.from_meta(self.meta)
        self.summary = framework.summarize_run(self.exp, self.records, self.params, self.notes)

    def source(self) -> str:
        code = self.meta["code"]
        commit = (code["commit"] or "?")[:12] + ("+dirty" if code.get("dirty") else "")
        m = self.meta["machine"]
        return (f"*Source: `{self.rel}` ({self.meta['preset']} preset, commit {commit}, "
                f"{self.meta['started'][:16].replace('T', ' ')} UTC; {m['cpu_model']}, "
                f"{m['cpus']} CPUs, kernel {m['kernel']}, Python {self.meta['versions']['python']}).*")


def lookup(values: dict, key: str):
    """values[key], where key may continue into a dict value: the longest key present wins
    (keys themselves contain dots, e.g. ``cpu.epoll.load=0.30``)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in values:
            obj = values[head]
            for part in parts[i:]:
                if isinstance(obj, dict) and part in obj:
                    obj = obj[part]
                elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
                    obj = obj[int(part)]
                else:
                    raise KeyError(key)
            return obj
    raise KeyError(key)


def render_value(obj, spec: str) -> str:
    if obj is None:
        raise BuildError("value is None (not measured or not observable)")
    if spec == "ratio":   # experiments/analysis.py: a 95% CI from 8 pairs on, else the range
        return analysis.fmt_ratio(obj)
    if spec == "us":   # a paired difference in µs
        return analysis.fmt_interval(obj, 1, unit=" µs", signed=True)
    if spec == "cost":   # an estimate in µs with its interval (e.g. a fitted µs per wake-up)
        return analysis.fmt_interval(obj, 1, unit=" µs")
    if spec == "slope":   # a fitted slope, signed, with its interval
        return analysis.fmt_interval(obj, 2, signed=True)
    if spec == "x":
        return f"{obj:.2f}×"
    if spec == "pct":
        return f"{100 * obj:.0f}%"
    if spec == "pp":
        if isinstance(obj, dict):
            return analysis.fmt_interval(obj, 1, scale=100, unit=" points", signed=True)
        return f"{100 * obj:+.1f} points"
    if spec == "int":
        return f"{obj:,.0f}"
    if spec == "":
        return str(obj)
    return format(obj, spec)


# -- the earlier experiments (one results file each) -----------------------------------------

def _load(rel: str, name: str):
    path = os.path.join(ROOT, rel, name)
    if not os.path.exists(path):
        raise BuildError(f"{path} missing")
    with open(path) as f:
        return json.load(f)


def validate_loadgen(dirs: list[str], tables: dict, values: dict) -> None:
    (rel,) = dirs
    rows = []
    for r in _load(rel, "wrk_vs_loadgen.json"):
        # What limited each side: the client's own CPU per request (CPU 1 is its core).
        cpu = {side: statistics.median(run[side]["client_cpu_us_per_req"] for run in r["runs"])
               for side in ("wrk", "loadgen")}
        rows.append([r["backend"], f"{r['wrk_median'] / 1e3:.0f}k", f"{r['loadgen_median'] / 1e3:.0f}k",
                     f"{r['diff_pct']:+.1f}%", "yes" if r["within_10pct"] else "no",
                     f"{cpu['wrk']:.2f}", f"{cpu['loadgen']:.2f}"])
        values[f"validate_loadgen:wrk.{r['backend']}.diff"] = f"{r['diff_pct']:+.1f}%"
    src = f"\n\n*Source: `{rel}`.*"
    tables["validate_loadgen:wrk"] = md_table(["server", "wrk req/s (median)", "loadgen req/s",
                                               "difference", "within 10%", "wrk client µs/req",
                                               "loadgen client µs/req"], rows) + src
    rows = []
    for r in _load(rel, "capacity.json"):
        spec = r["spec"]
        rows.append([str(spec["connections"]), str(spec["depth"]), f"{r['rps'] / 1e3:.0f}k",
                     fmt(r["client_cpu_us_per_req"]), fmt(r.get("server_cpu_us_per_req")),
                     fmt(r.get("p50_us"), ".0f"), fmt(r.get("p99_us"), ".0f")])
    tables["validate_loadgen:capacity"] = md_table(
        ["connections", "depth", "req/s", "client CPU µs/req", "server CPU µs/req", "p50 µs",
         "p99 µs"], rows) + src
    rows = []
    for r in _load(rel, "open_loop.json"):
        spec = r["spec"]
        rows.append([spec["mode"], str(spec["connections"]),
                     f"{r['target_rate'] / 1e3:.0f}k" if r["target_rate"] else "–",
                     f"{r['achieved_rate'] / 1e3:.1f}k", "yes" if r["rate_met"] else "**no**",
                     fmt(r.get("p50_us"), ".0f"), fmt(r.get("p99_us"), ".0f"),
                     fmt(r.get("max_us"), ".0f")])
    tables["validate_loadgen:open"] = md_table(["mode", "connections", "target rate", "achieved",
                                                "rate met", "p50 µs", "p99 µs", "max µs"], rows) + src


def soak(dirs: list[str], tables: dict, values: dict) -> None:
    rows = []
    for rel in dirs:
        d = _load(rel, "soak.json")
        faults = ", ".join(f"{k} {v}" for k, v in sorted(d["faults"].items()))
        rows.append([d["backend"], f"{d['duration']:.0f} s", f"{d['requests']:,}", faults,
                     str(d["responses_lost"]), str(d["mismatches"]),
                     f"{d['fds'][0]} → {d['fds'][1]}",
                     f"{d['rss_kib'][0] / 1024:.1f} → {d['rss_kib'][1] / 1024:.1f}",
                     "PASS" if d["passed"] else "**FAIL**"])
        values[f"soak:{d['backend']}.lost"] = str(d["responses_lost"])
    tables["soak:all"] = (md_table(["backend", "duration", "well-formed requests", "faults injected",
                                    "lost", "mismatches", "fds", "RSS MiB", "verdict"], rows)
                          + "\n\n*Sources: " + ", ".join(f"`{d}`" for d in dirs) + ".*")


def handoff(dirs: list[str], tables: dict, values: dict) -> None:
    (rel,) = dirs
    data = _load(rel, "handoff.json")
    from parallelnet.experiments.analysis import fmt_tail, tail_note
    from parallelnet.experiments.handoff import summary_rows

    labels = list(dict.fromkeys(r["label"] for r in data["runs"]))
    summary = summary_rows(data["runs"], labels)
    rows = []
    for r in summary:
        rows.append([r["label"] + (" (noisy)" if r.get("all_noisy") else ""), r["backend"], str(r["n"]),
                     f"{fmt(r['us_per_conn'])} ({fmt(r['us_min'])}–{fmt(r['us_max'])})",
                     fmt(r.get("vs_first"), ".3f"),
                     f"{r['conn_rate'] / 1e3:.1f}k ({r['rate_min'] / 1e3:.1f}–{r['rate_max'] / 1e3:.1f}k)",
                     f"{r['p50_us']:.0f}", fmt_tail(r["p99_us"], r.get("samples"), 99),
                     r.get("bound", "?")])
        for k in ("us_per_conn", "vs_first", "rate_vs_first"):
            values[f"handoff:{r['label']}.{k}"] = r.get(k)
    tables["handoff:all"] = (
        md_table(["channel", "backend", "n", "server CPU µs/connection, median (min–max)",
                  f"× {labels[0]}", "conn/s (min–max)", "p50 µs", "p99 µs", "bound"], rows)
        + f"\n\n{tail_note('connection')}"
        + f"\n\n*Source: `{rel}`.*")


LEGACY = {"validate_loadgen": validate_loadgen, "soak": soak, "handoff": handoff}


# -- rendering -----------------------------------------------------------------------------

def build(template: str, regenerate_figures: bool = True) -> str:
    from parallelnet.experiments.paper_pins import PIN

    pins = {m.group(1): m.group(2).split() for m in PIN.finditer(template)}
    missing: list[str] = []
    runs: dict[str, Run] = {}
    tables: dict[str, str] = {}
    legacy_values: dict = {}
    legacy_runs: set[str] = set()
    for name, dirs in pins.items():
        try:
            if name in LEGACY and not os.path.exists(os.path.join(ROOT, dirs[0], "records.jsonl")):
                legacy_runs.add(name)
                LEGACY[name](dirs, tables, legacy_values)
            else:
                (rel,) = dirs
                runs[name] = run = Run(name, rel)
                for t in run.summary.tables:
                    if t.key:
                        tables[f"{name}:{t.key}"] = _table_md(t) + "\n\n" + run.source()
        except BuildError as exc:
            missing.append(f"pin {name}: {exc}")

    def table(m):
        key = m.group(1)
        if key not in tables:
            missing.append(f"table {key}")
            return ""
        return tables[key]

    def value(m):
        ref, _, spec = m.group(1).partition("|")
        if ref.startswith("pins:commit"):   # the one commit every pinned run (of a group) measured
            group = ref.partition("@")[2]
            if group not in measured:
                missing.append(f"value {ref}: no pin of group {group!r}")
                return ""
            return (measured[group] or "")[:12]
        if ref.startswith("meta:"):
            _, name, key = ref.split(":", 2)
            try:
                return str(lookup(runs[name].meta, key))
            except KeyError:
                missing.append(f"value {ref}")
                return ""
        name, _, key = ref.partition(":")
        try:
            if name in legacy_runs:
                obj = legacy_values[ref]
            else:
                obj = lookup(runs[name].summary.values, key)
            return render_value(obj, spec)
        except (KeyError, BuildError, TypeError, ValueError) as exc:
            missing.append(f"value {m.group(1)} ({type(exc).__name__}: {exc})")
            return ""

    def figure(m):
        ref, _, caption = m.group(1).partition("|")
        name, _, file = ref.partition(":")
        run = runs.get(name)
        if run is None:
            missing.append(f"figure {ref}: {name} is not pinned")
            return ""
        out = f"{name.replace('@', '-at-')}-{file}"
        if regenerate_figures:
            made = _regenerate(run)
            if file not in made:
                missing.append(f"figure {ref}: the experiment drew {sorted(made)}")
                return ""
            os.replace(made[file], os.path.join(FIGURES, out))
        elif not os.path.exists(os.path.join(FIGURES, out)):
            missing.append(f"figure {ref}: paper/figures/{out} missing")
        return f"![{caption}](figures/{out})\n\n*Figure: {caption} Source: `{run.rel}`.*"

    groups: dict[str, dict[str, Run]] = {}
    for name, run in runs.items():
        groups.setdefault(name.partition("@")[2], {})[name] = run
    measured = {g: one_commit(rs, missing) for g, rs in groups.items()}

    text = re.sub(r"<!-- table:([\w.:=@-]+) -->", table, template)
    text = re.sub(r"<!-- figure:([^>]+?) -->", figure, text)
    text = re.sub(r"\{\{([^}]+)\}\}", value, text)
    if missing:
        raise BuildError("the paper cannot be built; missing:\n  " + "\n  ".join(missing))
    return text


def one_commit(runs: dict[str, "Run"], missing: list[str]) -> str | None:
    """The commit that every pinned run (of one machine group) measured, from each run's
    ``meta.json``.

    A paper whose numbers come from several commits cannot be reproduced by re-running
    one: every pinned run must name the same commit with a clean tree (results/ aside,
    experiments/provenance.py), which is what ``parallelnet reproduce`` produces from a
    clean checkout.  Anything else is added to ``missing`` (the build fails, listing it)."""
    commits: dict[str, list[str]] = {}
    for name, run in runs.items():
        code = run.meta.get("code") or {}
        if code.get("dirty") is not False:
            missing.append(f"pin {name}: {run.rel} ran on a tree that differed from its commit "
                           f"(dirty: {code.get('dirty')}; changed: {code.get('changed')})")
        commits.setdefault(code.get("commit") or "?", []).append(name)
    if len(commits) > 1:
        missing.append("pins from more than one commit (re-run them with `make reproduce`): "
                       + "; ".join(f"{c[:12]}: {', '.join(n)}" for c, n in sorted(commits.items())))
        return None
    return next(iter(commits), None)


_figure_cache: dict[str, dict[str, str]] = {}


def _regenerate(run: Run) -> dict[str, str]:
    """Draw the run's figures into a scratch folder; {file name: path}."""
    if run.rel in _figure_cache:
        return _figure_cache[run.rel]
    from parallelnet.experiments.framework import Context

    scratch = os.path.join(FIGURES, ".build", run.name)
    os.makedirs(scratch, exist_ok=True)
    ctx = Context(scratch, run.params, run.notes)
    from parallelnet.experiments.framework import AA_SUFFIX

    records = [r for r in run.records if not r["config"].endswith(AA_SUFFIX)]   # as the summary
    paths = run.exp.figures(run.summary, records, ctx) if run.exp.figures else []
    made = {os.path.basename(p): p for p in paths}
    _figure_cache[run.rel] = made
    return made


def _table_md(t) -> str:
    out = md_table(t.header, t.rows)
    return out + (f"\n\n{t.note}" if t.note else "")


#: What runs while a point is measured (git pathspecs): a change here after the pinned
#: commit means the paper's numbers may describe code that HEAD no longer is.  The
#: experiment modules hold both their run_point and their summaries, so a change to either
#: shows; the pure analysis, plotting and bookkeeping modules are left out.
MEASURED_CODE = ("core", "backends", "experiments", ":!experiments/analysis.py",
                 ":!experiments/plots.py", ":!experiments/paper_pins.py", ":!experiments/index.py",
                 ":!experiments/diff.py", ":!experiments/device")


def code_since(template: str) -> list[str]:
    """The files of MEASURED_CODE that differ between the pinned runs' commit and the working
    tree (empty when they agree, or when git or the commit is not available)."""
    import subprocess

    from parallelnet.experiments.paper_pins import PIN

    commits = set()
    for m in PIN.finditer(template):
        if "@" in m.group(1):   # another machine's runs: not re-measured here
            continue
        for rel in m.group(2).split():
            try:
                with open(os.path.join(ROOT, rel, "meta.json")) as f:
                    commits.add(json.load(f)["code"]["commit"])
            except (OSError, KeyError, ValueError):
                return []
    if len(commits) != 1:
        return []
    try:
        out = subprocess.run(["git", "diff", "--name-only", commits.pop(), "--", *MEASURED_CODE],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.split() if out.returncode == 0 else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="fail if paper.md is stale")
    args = p.parse_args(argv)
    with open(os.path.join(HERE, "paper.in.md")) as f:
        template = f.read()
    os.makedirs(FIGURES, exist_ok=True)
    try:
        text = build(template, regenerate_figures=not args.check)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        import shutil

        shutil.rmtree(os.path.join(FIGURES, ".build"), ignore_errors=True)
    out = os.path.join(HERE, "paper.md")
    drift = code_since(template)
    if drift and not args.check:
        print("note: the pinned runs measured an older commit; since then these files of measurement "
              "code changed (some perhaps only in their summaries or figures; `make reproduce` "
              "re-measures):\n  " + "\n  ".join(drift),
              file=sys.stderr)
    if args.check:
        with open(out) as f:
            if f.read() != text:
                print("paper/paper.md is stale: run `make paper`", file=sys.stderr)
                return 1
        return 0
    with open(out, "w") as f:
        f.write(text)
    from parallelnet.experiments.index import write_index

    write_index(os.path.join(ROOT, "results"))
    print(f"wrote {os.path.relpath(out, ROOT)} and {len(os.listdir(FIGURES))} figures; "
          f"results/index.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
