"""``parallelnet experiment | reproduce | compare``: the one entry point to every experiment.

    parallelnet experiment list
    parallelnet experiment NAME [--preset smoke|standard|full] [--out DIR] [--set KEY=JSON ...]
    parallelnet experiment rebuild RESULTS_DIR      # summary, pyperf JSON, figures from records
    parallelnet experiment index                    # results/index.md
    parallelnet reproduce [--preset standard]       # every experiment the paper cites, then the paper
    parallelnet compare                             # what `make run` does

Imported lazily by ``core.cli``: the server never depends on experiment code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from parallelnet.experiments import framework
from parallelnet.experiments.legacy import Script


def _set(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def cmd_list(_args) -> int:
    from parallelnet.experiments.paper_pins import cited_experiments

    cited = cited_experiments()
    for name in framework.REGISTRY:
        exp = framework.get(name)
        mark = "paper" if name in cited else ""
        print(f"{name:17s} {mark:5s} {exp.title}")
        print(f"{'':23s} presets: {', '.join(exp.presets)}"
              + (f"; {exp.description}" if exp.description else ""))
    return 0


def run_one(name: str, preset: str, out: str, overrides: dict | None = None,
            allow_dirty: bool = False, keep_server_stats: bool = False) -> list[str]:
    exp = framework.get(name)
    if isinstance(exp, Script):
        if overrides:
            raise SystemExit(f"{name} takes no --set (its presets are argument lists)")
        return exp.run(preset, out, allow_dirty)
    return [framework.run(exp, preset, out, overrides, allow_dirty, keep_server_stats)]


def cmd_run(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    try:
        dirs = run_one(args.name, args.preset, args.out, dict(args.set or []), args.allow_dirty,
                       args.keep_server_stats)
    except RuntimeError as exc:
        print(f"parallelnet experiment {args.name}: {exc}", file=sys.stderr)
        return 1
    for d in dirs:
        print(f"results directory: {d}")
    return 0


def cmd_rebuild(args) -> int:
    outdir = args.dir.rstrip("/")
    with open(os.path.join(outdir, "meta.json")) as f:
        meta = json.load(f)
    exp = framework.get(meta["experiment"])
    records = framework.load_records(outdir)
    ctx = framework.Context(outdir, meta["params"])
    framework.finish(exp, records, meta["params"], ctx, meta,
                     sum("error" in r for r in records))
    return 0


def cmd_index(args) -> int:
    from parallelnet.experiments.index import write_index

    print(write_index(args.results))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="parallelnet experiment",
                                description="run an experiment, list them, or rebuild a summary")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("list", help="every experiment and its presets").set_defaults(func=cmd_list)
    r = sub.add_parser("rebuild", help="summary, pyperf JSON and figures from a run's records")
    r.add_argument("dir")
    r.set_defaults(func=cmd_rebuild)
    i = sub.add_parser("index", help="write results/index.md")
    i.add_argument("--results", default="results")
    i.set_defaults(func=cmd_index)
    for name in framework.REGISTRY:
        e = sub.add_parser(name, help=f"run {name}")
        e.add_argument("--preset", default="smoke", choices=framework.PRESETS)
        e.add_argument("--out", default="results", help="parent folder of the run folder")
        e.add_argument("--set", type=_set, action="append", metavar="KEY=VALUE",
                       help="override a preset parameter (VALUE as JSON, e.g. reps=5 "
                            "'backends=[\"epoll\"]')")
        e.add_argument("--allow-dirty", action="store_true",
                       help="run standard/full on an uncommitted tree (marked dirty)")
        e.add_argument("--keep-server-stats", action="store_true",
                       help="keep every server's stats JSON lines in the results folder")
        e.set_defaults(func=cmd_run, name=name)
    args = p.parse_args(argv)
    return args.func(args)


def reproduce_main(argv: list[str] | None = None) -> int:
    """Every experiment the paper cites, at one preset, then the paper rebuilt from them."""
    from parallelnet.experiments.paper_pins import cited_experiments, repin

    p = argparse.ArgumentParser(prog="parallelnet reproduce", description=reproduce_main.__doc__)
    p.add_argument("--preset", default="standard", choices=framework.PRESETS)
    p.add_argument("--out", default="results")
    p.add_argument("--only", nargs="+", default=None, help="a subset of the cited experiments")
    p.add_argument("--allow-dirty", action="store_true")
    p.add_argument("--no-paper", action="store_true", help="do not re-pin and rebuild the paper")
    args = p.parse_args(argv)
    names = args.only or cited_experiments()
    t0 = time.monotonic()
    produced: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    for k, name in enumerate(names):
        print(f"=== [{k + 1}/{len(names)}] {name} ({args.preset}), "
              f"{(time.monotonic() - t0) / 60:.1f} min so far", flush=True)
        try:
            produced[name] = run_one(name, args.preset, args.out, allow_dirty=args.allow_dirty)
        except RuntimeError as exc:   # points failed: keep going, report, do not pin it
            failed[name] = str(exc)
            print(f"=== {name} FAILED: {exc}", flush=True)
    if failed:
        print("failed (not pinned): " + "; ".join(f"{k}: {v}" for k, v in failed.items()),
              file=sys.stderr)
        if not args.no_paper:
            repin(produced)
        return 1
    if not args.no_paper:
        repin(produced)
        from parallelnet.experiments.paper_pins import build_paper

        return build_paper()
    return 0


def compare_main(argv: list[str] | None = None) -> int:
    """``make run``: every available backend at a fixed rate and at saturation."""
    p = argparse.ArgumentParser(prog="parallelnet compare", description=compare_main.__doc__)
    p.add_argument("--preset", default="standard", choices=framework.PRESETS)
    p.add_argument("--out", default="results")
    p.add_argument("--set", type=_set, action="append", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    try:
        framework.run(framework.get("compare"), args.preset, args.out, dict(args.set or []),
                      allow_dirty=True)
    except RuntimeError as exc:
        print(f"parallelnet compare: {exc}", file=sys.stderr)
        return 1
    return 0
