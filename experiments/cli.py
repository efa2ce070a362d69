"""``parallelnet experiment | reproduce | compare``: the one entry point to every experiment.

    parallelnet experiment list
    parallelnet experiment NAME [--preset smoke|standard|full] [--out DIR] [--set KEY=JSON ...]
    parallelnet experiment rebuild RESULTS_DIR      # summary, pyperf JSON, figures from records
    parallelnet experiment index                    # results/index.md
    parallelnet experiment diff RUN_A RUN_B         # equal configurations of two runs, B / A
    parallelnet reproduce [--preset standard]       # every experiment the paper cites, then the paper
    parallelnet compare                             # what `make run` does

Registered as commands by entry point (pyproject.toml, group ``parallelnet.commands``):
the core runs them without importing this package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from parallelnet.experiments import framework
from parallelnet.experiments.machine.idle import IdleError


def _set(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _loadable() -> tuple[dict, dict[str, str]]:
    """({name: experiment} for every registered one that loads, {name: the one line why
    not} for the others)."""
    ok, broken = {}, {}
    for name in framework.names():
        try:
            ok[name] = framework.get(name)
        except SystemExit as exc:
            broken[name] = str(exc.code)
    return ok, broken


def cmd_list(_args) -> int:
    from parallelnet.experiments.paper_pins import cited_experiments

    cited = cited_experiments()
    exps, broken = _loadable()
    for name in framework.names():
        if name in broken:
            print(f"{name:17s} {'':5s} BROKEN: {broken[name]}")
            continue
        exp = exps[name]
        mark = "paper" if name in cited else ""
        print(f"{name:17s} {mark:5s} {exp.title}")
        print(f"{'':23s} presets: {', '.join(exp.presets)}"
              + (f"; {exp.description}" if exp.description else ""))
    return 0


def run_one(name: str, preset: str, out: str, overrides: dict | None = None,
            allow_dirty: bool = False, keep_server_stats: bool = False,
            client: str = "local", idle: str = "default") -> list[str]:
    exp = framework.get(name)
    return [framework.run(exp, preset, out, overrides, allow_dirty, keep_server_stats,
                          client=client, idle=idle)]


def _out_dir(path: str, who: str) -> None:
    """The parent folder of run folders: created if missing; one clear line if it cannot be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{who}: --out {path} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{who}: cannot create --out {path}: {exc.strerror}") from None


class UserError(Exception):
    """A mistake of the user's: one line on stderr, exit status 2, no traceback."""


def cmd_run(args) -> int:
    who = f"parallelnet experiment {args.name}"
    _out_dir(args.out, who)
    try:
        dirs = run_one(args.name, args.preset, args.out, dict(args.set or []), args.allow_dirty,
                       args.keep_server_stats, args.client, args.idle)
    except (ValueError, IdleError) as exc:   # --set, --client or --idle refused
        raise UserError(f"{who}: {exc}") from None
    except framework.EmptyRun as exc:
        print(f"{who}: {exc}", file=sys.stderr)
        return 1
    except framework.Interrupted as exc:
        return 128 + exc.signum
    except RuntimeError as exc:
        print(f"{who}: {exc}", file=sys.stderr)
        return 1
    for d in dirs:
        print(f"results directory: {d}")
    return 0


def _meta_of(outdir: str, who: str) -> dict:
    try:
        with open(os.path.join(outdir, "meta.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{who}: {outdir} is not a results directory (no meta.json)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{who}: cannot read {outdir}/meta.json: {exc}") from None


def cmd_rebuild(args) -> int:
    outdir = args.dir.rstrip("/")
    meta = _meta_of(outdir, "parallelnet experiment rebuild")
    exp = framework.get(meta["experiment"])
    records = framework.load_records(outdir)
    ctx = framework.Context(outdir, meta["params"], framework.PlanNotes.from_meta(meta))
    framework.finish(exp, records, meta["params"], ctx, meta,
                     sum("error" in r for r in records))
    return 0


def cmd_index(args) -> int:
    from parallelnet.experiments.index import write_index

    if not os.path.isdir(args.results):
        raise UserError(f"parallelnet experiment index: {args.results} is not a directory")
    print(write_index(args.results))
    return 0


def cmd_diff(args) -> int:
    from parallelnet.experiments.diff import diff_runs

    who = "parallelnet experiment diff"
    metas = [_meta_of(d.rstrip("/"), who) for d in (args.a, args.b)]
    print(diff_runs(args.a.rstrip("/"), args.b.rstrip("/"), metas[0], metas[1]))
    return 0


def _params_help(exp) -> str:
    """The --set keys of an experiment, what each means, and each preset's value."""
    kinds = framework.param_kinds(exp)
    lines = ["--set keys (VALUE is JSON; the kind must match a preset's):"]
    for key in sorted(kinds):
        vals = "; ".join(f"{name}: {json.dumps(p[key])}" for name, p in exp.presets.items() if key in p)
        doc = exp.params_doc.get(key, "") if hasattr(exp, "params_doc") else ""
        lines.append(f"  {key:24s} {doc + ' ' if doc else ''}[{vals}]")
    for key in sorted(set(getattr(exp, "params_doc", {})) - set(kinds)):
        lines.append(f"  {key:24s} {exp.params_doc[key]} [no preset sets it]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """run an experiment by name and preset, list them, rebuild a summary (see: parallelnet experiment -h)"""
    p = argparse.ArgumentParser(prog="parallelnet experiment",
                                description="run an experiment, list them, rebuild a summary, "
                                            "or compare two runs")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("list", help="every experiment and its presets").set_defaults(func=cmd_list)
    r = sub.add_parser("rebuild", help="summary, pyperf JSON and figures from a run's records "
                                       "(its outcome is kept as it was)")
    r.add_argument("dir", help="a results directory")
    r.set_defaults(func=cmd_rebuild)
    i = sub.add_parser("index", help="write results/index.md")
    i.add_argument("--results", default="results", help="the results folder (default: results)")
    i.set_defaults(func=cmd_index)
    d = sub.add_parser("diff", help="pair the equal configurations of two runs and print B / A "
                                    "per configuration, with a warning where presets, commits or "
                                    "machines differ")
    d.add_argument("a", metavar="RUN_A", help="the reference results directory")
    d.add_argument("b", metavar="RUN_B", help="the results directory compared with it")
    d.set_defaults(func=cmd_diff)
    exps, broken = _loadable()
    for name, exp in exps.items():
        e = sub.add_parser(name, help=f"run {name}", formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=_params_help(exp))
        e.add_argument("--preset", default="smoke", choices=framework.PRESETS,
                       help="smoke (the tests' size), standard (what the paper cites) or full "
                            "(default: smoke)")
        e.add_argument("--out", default="results", help="parent folder of the run folder "
                                                        "(default: results)")
        e.add_argument("--set", type=_set, action="append", metavar="KEY=VALUE",
                       help="override a preset parameter (VALUE as JSON, e.g. reps=5 "
                            "'backends=[\"epoll\"]'); the keys are listed below")
        e.add_argument("--allow-dirty", action="store_true",
                       help="run standard/full on an uncommitted tree (marked dirty)")
        e.add_argument("--keep-server-stats", action="store_true",
                       help="keep every server's stats JSON lines in the results folder")
        e.add_argument("--client", default="local",
                       metavar="local|netns|ssh://[user@]host[:port]",
                       help="where the load generator runs: local (default: this machine, "
                            "its own CPUs), netns (a network namespace over a veth pair; "
                            "root), or another host over ssh, with the same parallelnet "
                            "commit installed there (options ?identity=, known_hosts=, "
                            "host_key_check=, connect_timeout=, bind=, parallelnet=; "
                            "docs/experiments.md, \"Where the client runs\")")
        e.add_argument("--idle", choices=framework.IDLE_MODES, default="default",
                       help="default: the CPUs' idle states as they are; poll: every idle "
                            "state but polling disabled for the run and restored after "
                            "(root), so no vCPU halts - separates a VM's halt and wake-up "
                            "from the design (docs/experiments.md, \"Idle states\")")
        e.set_defaults(func=cmd_run, name=name)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in broken:
        print(f"parallelnet experiment: {broken[argv[0]]}", file=sys.stderr)
        return 2
    if argv and not argv[0].startswith("-") and argv[0] not in sub.choices:
        # One line, not argparse's usage block: the registered names are the answer.
        print(f"parallelnet experiment: unknown experiment {argv[0]!r}; known: "
              f"{', '.join(framework.names())} (or: list, rebuild, index, diff)", file=sys.stderr)
        return 2
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # outside a run (the run itself records and reports it)
        return 130
    except BrokenPipeError:   # `... | head`: the reader left; nothing more to say
        return 0


def reproduce_main(argv: list[str] | None = None) -> int:
    """run every experiment the paper cites, then rebuild the paper

    Every experiment the paper cites, at one preset, then the paper rebuilt from them."""
    from parallelnet.experiments.paper_pins import cited_experiments, repin

    p = argparse.ArgumentParser(prog="parallelnet reproduce", description=reproduce_main.__doc__)
    p.add_argument("--preset", default="standard", choices=framework.PRESETS,
                   help="preset of every experiment (default: standard, what the paper cites)")
    p.add_argument("--out", default="results", help="parent folder of the run folders (default: results)")
    p.add_argument("--only", nargs="+", default=None, help="a subset of the cited experiments")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run on an uncommitted tree (every run is marked dirty; the paper refuses them)")
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
        except framework.Interrupted as exc:   # stop everything; nothing is pinned
            print(f"reproduce: interrupted by {exc} during {name}; nothing re-pinned", file=sys.stderr)
            return 128 + exc.signum
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
    """every available backend at a fixed rate and at saturation (what `make run` does)"""
    p = argparse.ArgumentParser(prog="parallelnet compare", description=compare_main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=_params_help(framework.get("compare")))
    p.add_argument("--preset", default="standard", choices=framework.PRESETS,
                   help="default: standard (`parallelnet experiment compare` defaults to smoke, "
                        "like every experiment)")
    p.add_argument("--out", default="results", help="parent folder of the run folder (default: results)")
    p.add_argument("--set", type=_set, action="append", metavar="KEY=VALUE",
                   help="override a preset parameter (keys below)")
    args = p.parse_args(argv)
    try:
        _out_dir(args.out, "parallelnet compare")
        framework.run(framework.get("compare"), args.preset, args.out, dict(args.set or []),
                      allow_dirty=True)
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"parallelnet compare: {exc}", file=sys.stderr)
        return 2
    except framework.Interrupted as exc:
        return 128 + exc.signum
    except RuntimeError as exc:
        print(f"parallelnet compare: {exc}", file=sys.stderr)
        return 1
    return 0
