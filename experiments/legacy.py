"""The earlier stand-alone experiments, under the same entry point and presets.

``bench_uring``, ``accept``, ``handoff``, ``soak`` and ``validate_loadgen`` keep their own
command lines (``python -m parallelnet.experiments.NAME --help``) and their own summary
files; here each preset is the argument list(s) that command gets.  They write their
results directory through ``harness.result_dir``, which records the same provenance as the
framework's experiments (experiments.provenance) with the preset in the folder name; the
run's ``meta.json`` is completed here with its end time and outcome.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import sys
from dataclasses import dataclass

from parallelnet.experiments import provenance


@dataclass
class Script:
    name: str
    title: str
    module: str
    presets: dict[str, list[list[str]]]   # preset -> one or more argument lists
    cited: bool = True
    description: str = ""
    needs: tuple = ()                     # backends it cannot run without

    def run(self, preset: str = "smoke", out: str = "results", allow_dirty: bool = False,
            stream=sys.stdout) -> list[str]:
        """Run every argument list of ``preset``; return the results directories."""
        from parallelnet.experiments.framework import CLEAN_PRESETS

        if preset not in self.presets:
            raise SystemExit(f"experiment {self.name} has no preset {preset!r} "
                             f"(it has: {', '.join(self.presets)})")
        code = provenance.code_state()
        if preset in CLEAN_PRESETS and code["dirty"] and not allow_dirty:
            raise SystemExit(f"refusing a {preset} run of {self.name} on a dirty tree: commit "
                             "first, or pass --allow-dirty")
        main = importlib.import_module(self.module).main
        dirs = []
        argvs = self.presets[preset]
        for k, argv in enumerate(argvs):
            print(f"[{k + 1}/{len(argvs)}] {self.name} {' '.join(argv)}", file=stream, flush=True)
            before = set(glob.glob(os.path.join(out, "*")))
            os.environ["PARALLELNET_PRESET"] = preset
            os.environ["PARALLELNET_EXPERIMENT"] = self.name
            try:
                rc = main([*argv, "--out", out])
            finally:
                os.environ.pop("PARALLELNET_PRESET", None)
                os.environ.pop("PARALLELNET_EXPERIMENT", None)
            new = sorted(set(glob.glob(os.path.join(out, "*"))) - before)
            for d in new:
                _complete_meta(d, preset, rc)
            dirs += new
            if rc:
                raise RuntimeError(f"{self.name} {' '.join(argv)} exited with {rc}")
        return dirs


def _complete_meta(outdir: str, preset: str, rc: int) -> None:
    path = os.path.join(outdir, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return
    meta.update(preset=preset, ended=provenance.utc_now(), outcome="ok" if not rc else f"exit {rc}")
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


BENCH_URING = Script(
    "bench_uring", "Server CPU per request at saturation: uring vs uring-py vs epoll (closed loop)",
    "parallelnet.experiments.bench_uring",
    {"smoke": [["--reps", "1", "--duration", "1.5", "--warmup", "0.3", "--connections", "16"]],
     "standard": [["--reps", "5", "--duration", "4"]],
     "full": [["--reps", "8", "--duration", "6"]]},
    needs=("uring", "uring-py", "epoll"), cited=False,
    description="closed loop at 16 and 256 connections, 64 B echo, one worker "
                "(superseded by load-curve and uring-window)")
ACCEPT = Script(
    "accept", "How connections spread over two workers, per accept strategy (closed-loop churn)",
    "parallelnet.experiments.accept",
    {"smoke": [["--backends", "epoll", "--reps", "1", "--duration", "0.6", "--warmup", "0.2",
                "--connections", "16"]],
     "standard": [["--reps", "3", "--duration", "2"]],
     "full": [["--reps", "5", "--duration", "3"]]},
    cited=False,
    description="every backend × strategy, 2 workers, churn clients on the last CPU "
                "(superseded by imbalance, which controls the client's load)")
HANDOFF = Script(
    "handoff", "The dispatch channel: SCM_RIGHTS vs IORING_OP_MSG_RING",
    "parallelnet.experiments.handoff",
    {"smoke": [["--reps", "1", "--duration", "0.5", "--warmup", "0.2", "--connections", "8"]],
     "standard": [["--reps", "5", "--duration", "3"]],
     "full": [["--reps", "8", "--duration", "4"]]},
    needs=("uring", "epoll"), description="server CPU per connection under --accept dispatch")
SOAK = Script(
    "soak", "Faults mixed with load: nothing lost, nothing leaked",
    "parallelnet.experiments.soak",
    {"smoke": [["--backend", "epoll", "--duration", "3"]],
     "standard": [["--backend", b, "--duration", "30"] for b in ("epoll", "uring", "native")],
     "full": [["--backend", b, "--duration", "120"] for b in ("epoll", "uring", "uring-py", "native")]},
    description="resets, slow readers, malformed input, fd exhaustion under load")
VALIDATE_LOADGEN = Script(
    "validate_loadgen", "The instrument: byte checks, wrk cross-check, capacity, open loop",
    "parallelnet.experiments.validate_loadgen",
    {"smoke": [["--steps", "echo,capacity", "--capacity-configs", "16x1", "--duration", "1",
                "--short", "0.5"]],
     "standard": [["--duration", "3", "--short", "1", "--repeat", "3"]],
     "full": [["--duration", "5", "--short", "2", "--repeat", "5"]]},
    description="the C load generator against native and wrk")
