"""The experiment runner: presets, the grid, progress, provenance, raw records, pyperf, figures.

An experiment is a small module with one :class:`Experiment` object.  It declares its
parameter grid per preset (``smoke``: the test suite runs it, under 2 minutes on a
2-core machine; ``standard``: what the paper cites; ``full``: more repetitions and
points) and four functions:

* ``plan(params) -> [Point]``: every measurement, in execution order.  Configurations
  alternate within each repetition (rotated order), so drift hits them alike and a
  ratio of two configurations can be *paired* within a repetition.
* ``run_point(point, ctx) -> dict``: one measurement (usually experiments.measure).
* ``summarize(records, params) -> Summary``: tables, named values, verdict lines.
* ``figures(summary, records, ctx) -> [path]``: PNGs (matplotlib is optional: without
  it the data and tables are still written, and the run says so).

:func:`run` does the rest, the same way for every experiment: a results directory
``results/<UTC>-<name>-<preset>/`` with ``meta.json`` (experiments.provenance: refusing a
dirty tree for ``standard``/``full`` unless ``--allow-dirty``), ``records.jsonl`` (one
raw record per point, appended as it is measured, so an interrupted run keeps what it
measured), ``summary.json`` and ``summary.md``, ``pyperf.json`` (one pyperf benchmark per
configuration, one pyperf run per repetition, lower is better: seconds of server CPU per
request, ``loops`` = requests), and the figures.  Progress is printed as ``[k/N]`` with
an ETA from the points' own estimates, corrected by the time the finished ones took.
Every run holds ``/tmp/bench.lock`` (:func:`bench_lock`), so two experiments never
overlap.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import shlex
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from parallelnet.experiments import provenance, remote
from parallelnet.experiments.machine import idle as idle_states
from parallelnet.experiments.server import ServerHandle, start_server

PRESETS = ("smoke", "standard", "full")
CLEAN_PRESETS = ("standard", "full")   # a dirty tree is refused for these (unless allowed)

#: How a run ended (``meta.json`` ``outcome``).  Only ``ok`` - every planned point measured
#: - may become *current* in results/index.md or be pinned by the paper; ``rebuild`` never
#: changes an outcome.
OK, INTERRUPTED, FAILED, EMPTY = "ok", "interrupted", "failed", "empty"
OUTCOMES = (OK, INTERRUPTED, FAILED, EMPTY)


class Interrupted(BaseException):
    """SIGINT or SIGTERM during a run: the run stops, its servers are reaped, its outcome is
    ``interrupted`` (exit status 128 + the signal).  A BaseException, like KeyboardInterrupt:
    the signal handler raises it wherever the main thread is, often inside a point's own
    ``except Exception`` (a server start, a client wait), which must not take it for that
    point's failure and go on measuring."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interruption(exc: BaseException | None) -> Interrupted | None:
    """The Interrupted that ``exc`` was raised while handling, if any: a cleanup that fails
    while a signal propagates (a server the signal reached too exits 130, and stopping it
    raises) must not turn the interruption into one point's failure."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Interrupted):
            return exc
        seen.add(id(exc))
        exc = exc.__context__
    return None


class EmptyRun(RuntimeError):
    """The plan has no point to measure (every backend skipped, or nothing asked for)."""


@dataclass
class Point:
    """One measurement: ``config`` names what is compared (stable across runs of the same
    experiment, e.g. ``epoll/load=0.30``), ``rep`` the repetition, ``params`` the rest."""

    config: str
    rep: int
    params: dict
    est_s: float = 5.0

    def label(self) -> str:
        return f"{self.config} r{self.rep}"


@dataclass
class PlanNotes:
    """What a plan decided besides its points, handed to ``summarize`` and ``figures`` and
    kept in ``meta.json`` under ``plan`` (so ``rebuild`` and the paper see the same):

    * ``ran``: the configurations the plan measures, in the order summaries list them;
    * ``skipped``: {configuration or backend: why it is not run} (unavailable here, a mode or
      strategy it does not serve);
    * ``derived``: values the plan computed from the parameters (``worker_counts``: the
      worker counts for this machine's CPUs), for the summary to use as planned.

    Runs written before plan notes existed kept ``ran``/``skipped``/``worker_counts`` among
    their parameters; :meth:`from_meta` reads them from there."""

    ran: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    derived: dict = field(default_factory=dict)

    #: parameter keys that older runs' plans wrote into their params (read as notes)
    LEGACY_DERIVED = ("worker_counts",)

    def to_dict(self) -> dict:
        return {"ran": list(self.ran), "skipped": dict(self.skipped), "derived": dict(self.derived)}

    @classmethod
    def from_meta(cls, meta: dict) -> "PlanNotes":
        if isinstance(meta.get("plan"), dict):
            d = meta["plan"]
            return cls(list(d.get("ran") or []), dict(d.get("skipped") or {}),
                       dict(d.get("derived") or {}))
        p = meta.get("params") or {}
        return cls(list(p.get("ran") or []), dict(p.get("skipped") or {}),
                   {k: p[k] for k in cls.LEGACY_DERIVED if k in p})


@dataclass
class Plan:
    """What ``Experiment.plan(params)`` returns: the points in execution order, and notes."""

    points: list[Point]
    notes: PlanNotes = field(default_factory=PlanNotes)


@dataclass
class Record:
    """One line of ``records.jsonl``: the point (``config``, ``rep``, ``params``), when it
    was measured (``measured_at``, UTC ISO 8601), and either what ``run_point`` returned
    (``result``, whose keys are stored at the top level of the line beside these) or, for a
    point that raised, ``error`` (one line) and ``traceback``.  Summaries read the lines as
    dicts (:meth:`to_json`'s form), as they are on disk."""

    config: str
    rep: int
    params: dict
    measured_at: str
    result: dict = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None

    RESERVED = ("config", "rep", "params", "measured_at", "error", "traceback")

    def to_json(self) -> dict:
        clash = [k for k in self.result if k in self.RESERVED]
        if clash:
            raise ValueError(f"run_point returned reserved record keys {clash}")
        out = {"config": self.config, "rep": self.rep, "params": self.params,
               "measured_at": self.measured_at}
        if self.error is not None:
            out.update(error=self.error, traceback=self.traceback)
        return {**out, **self.result}

    @classmethod
    def from_json(cls, d: dict) -> "Record":
        rest = {k: v for k, v in d.items() if k not in cls.RESERVED}
        return cls(d["config"], d["rep"], d["params"], d.get("measured_at", ""), rest,
                   d.get("error"), d.get("traceback"))


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    key: str = ""          # a stable name the paper's template refers to

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
               "|" + "|".join(" --- " for _ in self.header) + "|"]
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in self.rows]
        if self.note:
            out += ["", self.note]
        return "\n".join(out)

    def text(self) -> str:
        cells = [self.header] + [[str(c) for c in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.header))]
        lines = [self.title]
        for r in cells:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))))
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


@dataclass
class Summary:
    tables: list[Table] = field(default_factory=list)
    values: dict = field(default_factory=dict)      # named figures the paper may cite
    findings: list[str] = field(default_factory=list)  # one line each, with its numbers

    def add_skipped(self, skipped: dict | None, title: str = "Backends not run", key: str = "") -> None:
        """The table of what a plan left out and why (nothing when it left out nothing)."""
        if skipped:
            self.tables.append(Table(title, ["backend", "why"],
                                     [[b, why] for b, why in skipped.items()], key=key))

    def to_dict(self) -> dict:
        return {"tables": [t.__dict__ for t in self.tables], "values": self.values,
                "findings": self.findings}

    def markdown(self) -> str:
        parts = [t.markdown() for t in self.tables]
        if self.findings:
            parts.append("### Findings\n\n" + "\n".join(f"- {f}" for f in self.findings))
        return "\n\n".join(parts) + "\n"

    def text(self) -> str:
        parts = [t.text() for t in self.tables]
        if self.findings:
            parts.append("findings:\n" + "\n".join(f"  - {f}" for f in self.findings))
        return "\n\n".join(parts)


@dataclass
class Context:
    """What run_point and figures get from the runner.

    ``client``: where the run's load generators run (``--client``; experiments/remote.py):
    servers started here listen where it can reach them, :meth:`measure` and
    ``experiments.measure.measure`` on such a server run their generator there, and an
    experiment's own extra generator runs there with ``ctx.client.run(spec)``."""

    outdir: str
    params: dict
    notes: PlanNotes = field(default_factory=PlanNotes)   # what the plan decided
    keep_server_stats: bool = False
    state: dict = field(default_factory=dict)   # what earlier points found (e.g. capacities)
    _servers: list = field(default_factory=list)
    client: remote.Client = field(default_factory=remote.Client)

    def server(self, args: list[str], tag: str, cpus=None, interval: float = 0.25) -> ServerHandle:
        """Start ``parallelnet serve ARGS`` with its stats in the results directory, on
        the address the client reaches (loopback for a local client)."""
        os.makedirs(os.path.join(self.outdir, "servers"), exist_ok=True)
        path = os.path.join(self.outdir, "servers", f"{tag}.jsonl")
        srv = start_server([*args, *self.client.server_args()], path,
                           cpus=set(cpus) if cpus else None, interval=interval)
        srv.client_placement = self.client    # measure() runs its generator there
        self._servers.append(srv)
        return srv

    def stop_server(self, srv: ServerHandle) -> dict:
        """Stop it (SIGTERM, bounded) and return its final stats record.  Its stats file is
        deleted unless asked to keep it: the record already holds the window's figures."""
        final = srv.stop()
        if srv in self._servers:
            self._servers.remove(srv)
        if not self.keep_server_stats:
            try:
                os.unlink(srv.stats_path)
            except OSError:
                pass
        crashed = [w.get("crashed") for w in final.get("workers", []) if w.get("crashed")]
        if srv.proc.returncode not in (0, None) or crashed:
            raise RuntimeError(f"server exited with {srv.proc.returncode}; crashed workers: "
                               f"{crashed}; it said:\n{srv.output[-2000:]}")
        return final

    def measure(self, server_args: list[str], load: dict, layout, tag: str,
                extra_pids: tuple = (), per_worker: bool = True, interval: float = 0.25) -> dict:
        """A fresh server confined to ``layout.server`` (workers pinned there), one load
        point from the CPUs of ``layout.client`` (experiments.measure) - or from the
        client host, for a client elsewhere - the server stopped and checked.  ``load``:
        LoadSpec fields other than host, port and cpus."""
        from parallelnet.experiments.loadgen import LoadSpec
        from parallelnet.experiments.measure import measure

        srv = self.server([*server_args, "--cpus", ",".join(map(str, layout.server))], tag,
                          cpus=layout.server, interval=interval)
        try:
            spec = LoadSpec(host=srv.host, port=srv.port, cpus=list(layout.client) or None,
                            **load)
            rec = measure(srv, spec, layout, extra_pids, per_worker=per_worker,
                          client=self.client)
        finally:
            final = self.stop_server(srv)
        rec["server"]["final_requests"] = (final.get("totals") or {}).get("requests")
        return rec

    def cleanup(self) -> None:
        for srv in list(self._servers):
            try:
                srv.stop(timeout=10)
            except Exception:  # noqa: BLE001 - best effort at the end of a failed point
                pass
        self._servers.clear()


@dataclass
class Experiment:
    name: str
    title: str
    presets: dict[str, dict]
    plan: Callable[[dict], Plan]
    run_point: Callable[[Point, Context], dict]
    summarize: Callable[[list[dict], dict, PlanNotes], Summary]
    figures: Callable[[Summary, list[dict], Context], list[str]] | None = None
    #: (record) -> seconds per unit of work (lower is better) and the units, for pyperf
    pyperf_value: Callable[[dict], tuple[float, int] | None] | None = None
    cited: bool = True             # part of `parallelnet reproduce`
    description: str = ""
    #: (record) -> the A/A control's figure (default: pyperf_value's, server CPU per unit)
    aa_metric: Callable[[dict], float | None] | None = None
    #: (record) -> the pyperf benchmark name's configuration part, naming absolute
    #: quantities (``rate=12675``, not ``load=0.20`` of a capacity calibrated per run), so
    #: that ``pyperf compare_to`` of two runs compares like with like; default: the config
    pyperf_name: Callable[[dict], str] | None = None
    #: --set keys: {key: what it means}; the keys a preset takes are the only ones accepted
    params_doc: dict[str, str] = field(default_factory=dict)


# -- --set: only the keys a preset declares, with their types and ranges ------------------

#: Lower bounds of numeric keys, by name (everything numeric is at least 0).
_MINIMUM = {"reps": 1, "duration": 0.05, "connections": 1, "connections_per_worker": 1,
            "long_connections": 1, "requests_per_conn": 1, "churn_slots": 1}


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


def param_kinds(exp: Experiment) -> dict[str, set[str]]:
    """Every key any preset of ``exp`` takes, and the kinds of value the presets give it."""
    kinds: dict[str, set[str]] = {}
    for preset in exp.presets.values():
        for k, v in preset.items():
            kinds.setdefault(k, set()).add(_kind(v))
    return kinds


def validate_overrides(exp: Experiment, overrides: dict) -> None:
    """Raise ValueError naming the first ``--set`` key that the experiment does not take,
    whose value has the wrong kind, or whose number is out of range."""
    kinds = param_kinds(exp)
    for key, value in overrides.items():
        if key not in kinds and key in exp.params_doc:
            continue   # a key no preset sets (its doc says what it takes)
        if key not in kinds:
            known = sorted(set(kinds) | set(exp.params_doc))
            raise ValueError(f"{exp.name} takes no --set {key}; it takes: {', '.join(known)}")
        got, want = _kind(value), kinds[key]
        if got == "int" and "number" in want:
            got = "number"
        if got not in want:
            raise ValueError(f"--set {key}: expected {' or '.join(sorted(want))}, got {value!r}")
        if got in ("int", "number"):
            lo = _MINIMUM.get(key, 0)
            if value < lo:
                raise ValueError(f"--set {key} must be >= {lo}, got {value}")
        if got == "list" and not value:
            raise ValueError(f"--set {key}: an empty list measures nothing")

#: The suffix of an A/A twin: one configuration measured a second time in every
#: repetition, as if it were another; its ratio to the original is the run's noise floor.
AA_SUFFIX = "~aa"


def add_aa_twin(points: list[Point], config: str | None) -> list[Point]:
    """Append to every repetition an A/A twin of ``config``: the same parameters, measured
    last in the repetition (the original sits wherever the rotation put it, so the pair
    spans the repetition like any other pair)."""
    if not config or not any(q.config == config for q in points):
        return points   # no A/A control asked for, or its configuration is not run here
    out: list[Point] = []
    for i, pt in enumerate(points):
        out.append(pt)
        last_of_rep = i + 1 == len(points) or points[i + 1].rep != pt.rep
        if last_of_rep:
            twin = next((q for q in points if q.rep == pt.rep and q.config == config), None)
            if twin is not None:
                out.append(Point(config + AA_SUFFIX, twin.rep, dict(twin.params), twin.est_s))
    return out


def client_p99(rec: dict) -> float | None:
    """The client's p99 latency of a record (µs), None where it has none."""
    return ((rec.get("client") or {}).get("latency_us") or {}).get("p99")


def aa_control(exp: Experiment, records: list[dict], metric=None) -> dict | None:
    """The A/A ratio (twin / original, per repetition) of the experiment's figure (or of
    ``metric``), summarised like any comparison (analysis.ratio_summary), flagged when it
    leaves AA_BAND."""
    from parallelnet.experiments import analysis

    metric = metric or exp.aa_metric or (lambda r: (exp.pyperf_value(r) or (None,))[0]
                                         if exp.pyperf_value else None)
    twins = {r["rep"]: r for r in records if r["config"].endswith(AA_SUFFIX)}
    if not twins:
        return None
    config = next(iter(twins.values()))["config"].removesuffix(AA_SUFFIX)
    orig = {r["rep"]: r for r in records if r["config"] == config}
    a = {k: metric(r) for k, r in twins.items()}
    b = {k: metric(r) for k, r in orig.items()}
    s = analysis.ratio_summary(analysis.paired(a, b))
    if s is None:
        return None
    return {**s, "config": config, "flag": analysis.aa_flag(s), "band": list(analysis.AA_BAND)}


def server_cpu_per_request(rec: dict) -> tuple[float, int] | None:
    """The usual ``pyperf_value``: the server's CPU seconds per request, over the
    run's requests (pyperf's loops); None where the server's CPU was not measured."""
    cpu = (rec.get("server") or {}).get("cpu_us_per_req")
    return (cpu / 1e6, rec["requests"]) if cpu is not None else None


def parse_config(spec: str) -> tuple[str, str, list[str]]:
    """A configuration named on the command line: ``LABEL=BACKEND[:ARGS]`` (ARGS split
    as a shell would) or just ``BACKEND`` -> (label, backend, server args)."""
    label, eq, rest = spec.partition("=")
    if not eq:
        return spec, spec, []
    backend, _, argstr = rest.partition(":")
    return label, backend, shlex.split(argstr)


# -- the registry ------------------------------------------------------------------------

#: The entry-point group experiments register under, like backends under
#: ``parallelnet.backends``: ``NAME = "package.module:ATTRIBUTE"`` in a pyproject's
#: ``[project.entry-points."parallelnet.experiments"]`` (this project's own included).
ENTRY_POINTS = "parallelnet.experiments"


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def names() -> list[str]:
    """Every registered experiment's name (nothing imported: listing costs nothing)."""
    return list(_entry_points())


def get(name: str):
    """The registered experiment ``name``; one line (SystemExit) for an unknown name or
    one whose entry point cannot be loaded."""
    eps = _entry_points()
    ep = eps.get(name)
    if ep is None:
        raise SystemExit(f"unknown experiment {name!r}; known: {', '.join(eps)}")
    try:
        exp = ep.load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin is one line, not a traceback
        raise SystemExit(f"experiment {name!r} ({ep.value}) cannot be loaded: "
                         f"{type(exc).__name__}: {exc}") from None
    if getattr(exp, "name", None) != name:
        raise SystemExit(f"experiment {name!r} ({ep.value}) is not an Experiment named {name!r} "
                         f"(got {type(exp).__name__} {getattr(exp, 'name', None)!r})")
    return exp


# -- the benchmark lock ------------------------------------------------------------------

LOCK_PATH = "/tmp/bench.lock"


def _ancestors() -> set[int]:
    """Our parent, its parent, ... (from /proc/PID/stat field 4)."""
    out, pid = set(), os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
            pid = int(raw[raw.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _held_by_ancestor(path: str) -> bool:
    """Whether a process we descend from holds a flock on ``path`` (``/proc/locks``): we
    run under ``flock PATH CMD`` even where the descriptor itself was not inherited (a
    subprocess started with close_fds, as pytest and subprocess.run do)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    ino = f":{st.st_ino}"
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}{ino}"
    ancestors = _ancestors()
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue   # a waiter, or another kind of lock
        try:
            pid = int(parts[4])
        except ValueError:
            continue
        if parts[5] == dev and pid in ancestors:
            return True
    return False


@contextlib.contextmanager
def bench_lock(stream=None):
    """Hold LOCK_PATH for a timed run, so two benchmarks never overlap.

    Run under ``flock /tmp/bench.lock CMD``, the lock is already ours: through an inherited
    descriptor (the same open file description, so flock on it succeeds at once), or held
    by an ancestor whose descriptor was not passed down (a test's subprocess); then it is
    used rather than waited on.  Otherwise it is taken - saying so on ``stream`` when
    another benchmark holds it, rather than waiting silently.
    """
    with open(LOCK_PATH, "a") as own:
        target = os.path.realpath(LOCK_PATH)
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == target:
                    fcntl.flock(int(fd), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
            except OSError:
                continue
        else:
            try:
                fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if _held_by_ancestor(LOCK_PATH):
                    yield
                    return
                if stream is not None:
                    print(f"waiting for {LOCK_PATH}: another benchmark holds it "
                          "(the run starts when it ends)", file=stream, flush=True)
                t0 = time.monotonic()
                fcntl.flock(own, fcntl.LOCK_EX)
                if stream is not None:
                    print(f"got {LOCK_PATH} after {time.monotonic() - t0:.0f} s", file=stream,
                          flush=True)
        yield


# -- running -----------------------------------------------------------------------------

def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """``[k/N] label ... ETA`` from each point's estimate, scaled by how long the finished
    points took against their estimates."""

    def __init__(self, points: list[Point], out=sys.stdout) -> None:
        self.points, self.out = points, out
        self.done_est = self.done_real = 0.0
        self.t0 = time.monotonic()

    def total_estimate(self) -> float:
        return sum(p.est_s for p in self.points)

    def start(self, k: int) -> None:
        left = sum(p.est_s for p in self.points[k:])
        scale = self.done_real / self.done_est if self.done_est else 1.0
        print(f"[{k + 1}/{len(self.points)}] {self.points[k].label()}  "
              f"(elapsed {_fmt_s(time.monotonic() - self.t0)}, ETA {_fmt_s(left * scale)})",
              file=self.out, flush=True)

    def finish(self, k: int, took: float) -> None:
        self.done_est += self.points[k].est_s
        self.done_real += took


def result_dir(name: str, preset: str | None, root: str) -> str:
    """``ROOT/<UTC stamp>-NAME-PRESET/`` (no ``-PRESET`` for None), made now."""
    path = os.path.join(root, time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{name}"
                        + (f"-{preset}" if preset else ""))
    os.makedirs(path, exist_ok=False)
    return path


def write_meta(outdir: str, meta: dict) -> None:
    with open(os.path.join(outdir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


#: ``--idle``: the guest's idle states as they are, or polling only for the run.
IDLE_MODES = ("default", "poll")


def run(exp: Experiment, preset: str = "smoke", out: str = "results", overrides: dict | None = None,
        allow_dirty: bool = False, keep_server_stats: bool = False, stream=sys.stdout,
        client: "str | remote.Client" = "local", idle: str = "default") -> str:
    """Run one experiment; return its results directory.  Raises RuntimeError if any point
    failed (after writing everything that was measured).  ``client``: where the load
    generators run (``local``, ``netns``, ``ssh://[user@]host[:port]``: experiments/remote.py);
    a placement that cannot be used raises remote.ClientError (netns.NetnsError) before any
    results directory is made.  ``idle``: ``poll`` disables every CPU idle state but polling
    for the run and restores them after (experiments/machine/idle.py; root), so that no
    vCPU halts; refused (machine.idle.IdleError) before any results directory is made where
    it cannot be done."""
    from parallelnet.experiments.measure import client_elsewhere

    if idle not in IDLE_MODES:
        raise ValueError(f"--idle must be one of {', '.join(IDLE_MODES)}, got {idle!r}")
    poll_only = idle_states.PollOnly() if idle == "poll" else None
    if poll_only:
        poll_only.check()
    placement = remote.parse_client(client)
    try:
        with client_elsewhere(placement.elsewhere):   # the layouts the plan and points see
            return _run(exp, preset, out, overrides, allow_dirty, keep_server_stats, stream,
                        placement, poll_only)
    finally:
        placement.close()


@contextlib.contextmanager
def _idle_or_discard(poll_only, outdir: str):
    """``--idle poll``'s states for the body; if they cannot be set (machine.idle.IdleError,
    having changed nothing), the run's directory, which holds no measurement yet, goes."""
    with contextlib.ExitStack() as stack:
        if poll_only is not None:
            try:
                stack.enter_context(poll_only)
            except idle_states.IdleError:
                shutil.rmtree(outdir, ignore_errors=True)
                raise
        yield


def _run(exp: Experiment, preset: str, out: str, overrides: dict | None, allow_dirty: bool,
         keep_server_stats: bool, stream, placement: remote.Client, poll_only=None) -> str:
    if preset not in exp.presets:
        raise SystemExit(f"experiment {exp.name} has no preset {preset!r} "
                         f"(it has: {', '.join(exp.presets)})")
    validate_overrides(exp, overrides or {})
    params = {**exp.presets[preset], **(overrides or {})}
    planned = exp.plan(dict(params))   # the plan reads params; what it decided is in notes
    points, notes = planned.points, planned.notes
    if not points:
        skipped = notes.skipped
        raise EmptyRun(f"nothing to measure: the plan has no point"
                       + (f" (not run: {'; '.join(f'{k}: {v}' for k, v in skipped.items())})"
                          if skipped else ""))
    meta = provenance.collect(exp.name, preset, {"params": params, "plan": notes.to_dict()})
    if preset in CLEAN_PRESETS and meta["code"]["dirty"]:
        if not allow_dirty:
            raise SystemExit(f"refusing a {preset} run of {exp.name} on a dirty tree "
                             f"({len(meta['code']['changed'])} changed paths, e.g. "
                             f"{meta['code']['changed'][:3]}): commit first, or pass "
                             "--allow-dirty (the run is then marked dirty in meta.json)")
        print(f"WARNING: dirty tree: {exp.name} {preset} results are marked dirty",
              file=stream, flush=True)
    placement.open()   # a namespace made, a client host reached and checked (or refused)
    meta["client"] = placement.facts()
    outdir = result_dir(exp.name, preset, out)
    write_meta(outdir, meta)
    ctx = Context(outdir, params, notes, keep_server_stats=keep_server_stats, client=placement)
    progress = Progress(points, stream)
    print(f"{exp.name} ({preset}): {len(points)} runs, about "
          f"{_fmt_s(progress.total_estimate())}; results: {outdir}", file=stream, flush=True)
    meta["planned"] = len(points)
    write_meta(outdir, meta)
    records, failed = [], 0
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def interrupt(signum, _frame):
        raise Interrupted(signum)

    try:
        for sig in previous:
            signal.signal(sig, interrupt)
    except ValueError:   # not the main thread (a test driving run() from a thread)
        previous = {}
    try:
        with bench_lock(stream), _idle_or_discard(poll_only, outdir), \
                open(os.path.join(outdir, "records.jsonl"), "w") as rf:
            # The idle states change only under the lock: no other benchmark is running.
            meta["idle"] = {"mode": "poll" if poll_only else "default", **idle_states.describe()}
            write_meta(outdir, meta)
            progress.t0 = time.monotonic()   # elapsed counts from the lock, not the wait
            for k, point in enumerate(points):
                progress.start(k)
                t = time.monotonic()
                try:
                    rec = exp.run_point(point, ctx)
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on (not Interrupted: a BaseException)
                    if (intr := interruption(exc)) is not None:
                        raise intr from exc
                    failed += 1
                    rec = Record(point.config, point.rep, point.params, provenance.utc_now(),
                                 error=f"{type(exc).__name__}: {exc}",
                                 traceback=traceback.format_exc()[-4000:])
                    print(f"  FAILED: {rec.error.splitlines()[0]}", file=stream, flush=True)
                else:
                    rec = Record(point.config, point.rep, point.params, provenance.utc_now(), rec)
                finally:
                    ctx.cleanup()
                rec = rec.to_json()
                records.append(rec)
                rf.write(json.dumps(rec) + "\n")
                rf.flush()
                progress.finish(k, time.monotonic() - t)
                _print_point(rec, stream)
    except Interrupted as exc:
        ctx.cleanup()   # the servers of the point in progress are reaped, by PID
        meta.update(ended=provenance.utc_now(), outcome=INTERRUPTED, points=len(records),
                    failed=failed, reason=f"{exc} after {len(records)} of {len(points)} points")
        write_meta(outdir, meta)
        print(f"{exp.name}: interrupted by {exc} after {len(records)} of {len(points)} points; "
              f"what was measured is in {outdir} (outcome: interrupted)", file=stream, flush=True)
        raise
    else:   # every point measured; the handlers stay until the run's end is recorded
        outcome = OK if not failed else FAILED
        if failed == len(points):
            outcome = EMPTY
        meta.update(outcome=outcome, points=len(records), failed=failed)
        if failed:
            meta["reason"] = f"{failed} of {len(points)} points failed"
        try:
            finish(exp, records, params, ctx, meta, failed, stream)
        except Interrupted as exc:
            # Every point was measured, but the summary, figures or pyperf file may be
            # partial: the run did not end normally (`rebuild` writes them again).
            meta.update(ended=provenance.utc_now(), outcome=INTERRUPTED,
                        reason=f"{exc} while the summary was written, after all "
                               f"{len(records)} points")
            write_meta(outdir, meta)
            print(f"{exp.name}: interrupted by {exc} while writing the summary; every point "
                  f"is in {outdir} (`parallelnet experiment rebuild {outdir}`)",
                  file=stream, flush=True)
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise RuntimeError(f"{failed} of {len(points)} points of {exp.name} failed; "
                           f"see {os.path.join(outdir, 'records.jsonl')}")
    return outdir


def summarize_run(exp: Experiment, records: list[dict], params: dict, notes) -> Summary:
    """A run's summary from its good records: the experiment's own ``summarize`` over every
    configuration but the A/A twin, then the A/A control (value ``aa``, first finding).
    One function for the run's own summary.json and for every later rebuild (the paper
    recomputes each pinned run's summary with it)."""
    summary = exp.summarize([r for r in records if not r["config"].endswith(AA_SUFFIX)], params,
                            notes)
    aa = aa_control(exp, records)
    if aa is not None:
        from parallelnet.experiments import analysis

        summary.values["aa"] = aa
        summary.findings.insert(0, (
            f"A/A control ({aa['config']} measured twice in every repetition): "
            f"{analysis.fmt_ratio(aa)}; "
            + ("FLAGGED: outside [0.95, 1.05], this run's noise floor is wider than the "
               "effects it would be read for" if aa["flag"] else "within [0.95, 1.05]")))
        # The tail's own noise floor, where the records have one and the A/A above is not
        # already on it: a p99 moves far more from one window to the next than a mean.
        # (None where the records have no latencies: paired ratios skip missing values.)
        tail = None if exp.aa_metric is client_p99 else aa_control(exp, records, client_p99)
        if tail is not None:
            summary.values["aa_p99"] = tail
            summary.findings.insert(1, (
                f"A/A on p99 ({tail['config']} twice in every repetition): "
                f"{analysis.fmt_ratio(tail)}; p99 ratios inside that interval are not read"))
    return summary


def finish(exp: Experiment, records: list[dict], params: dict, ctx: Context, meta: dict,
           failed: int, stream=sys.stdout) -> Summary:
    """Summary, pyperf JSON, figures, meta completion: also used to rebuild them from a
    results directory's records (``parallelnet experiment rebuild DIR``)."""
    outdir = ctx.outdir
    good = [r for r in records if "error" not in r]
    if meta.get("outcome") in (None, "running"):
        # A rebuild of a run that never recorded its end (killed outright): it did not
        # end normally, whatever its records say.
        meta["outcome"] = INTERRUPTED
        meta.setdefault("reason", "the run never recorded its end")
    summary = summarize_run(exp, good, params, ctx.notes)
    aa = summary.values.get("aa")
    if aa is not None:
        meta["aa"] = {k: aa[k] for k in ("estimate", "interval", "kind", "n", "flag", "config")}
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(summary.to_dict(), f, indent=1, sort_keys=True)
        f.write("\n")
    write_csv(outdir, summary, good)
    if exp.pyperf_value is not None:
        write_pyperf(os.path.join(outdir, "pyperf.json"), exp, good, meta)
    figs = []
    if exp.figures is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib not installed: no figures (pip install 'parallelnet[plot]')",
                  file=stream)
        else:
            figs = exp.figures(summary, [r for r in good if not r["config"].endswith(AA_SUFFIX)],
                               ctx)   # the twin is the A/A control's, not a configuration to draw
    # The outcome is run()'s (rebuild keeps it): never upgraded here.
    meta.update(ended=meta.get("ended") or provenance.utc_now(), points=len(records), failed=failed,
                figures=[os.path.basename(p) for p in figs])
    write_meta(outdir, meta)
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write(summary_header(exp, meta) + summary.markdown()
                + "".join(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in figs))
    servers = os.path.join(outdir, "servers")
    if os.path.isdir(servers) and not os.listdir(servers):
        shutil.rmtree(servers)
    print("\n" + summary.text(), file=stream)
    for p in figs:
        print(f"figure: {p}", file=stream)
    print(f"results: {outdir}", file=stream, flush=True)
    return summary


def summary_header(exp: Experiment, meta: dict) -> str:
    """The first lines of summary.md: what ran, from which code, where, when, how it ended."""
    code = meta.get("code") or {}
    machine = meta.get("machine") or {}
    commit = (code.get("commit") or "?")[:12] + ("+dirty" if code.get("dirty") else "")
    cpus = machine.get("cpus_allowed") or machine.get("cpus") or machine.get("cpu_count")
    where = ", ".join(str(x) for x in (machine.get("cpu_model"), f"{cpus} CPUs" if cpus else None,
                                        machine.get("kernel")) if x)
    lines = [f"# {exp.title} ({meta.get('preset')})", "",
             f"- commit `{commit}`, preset `{meta.get('preset')}`, outcome **{meta.get('outcome')}**"
             + (f" ({meta['reason']})" if meta.get("reason") else ""),
             f"- machine: {where or 'unknown'}",
             f"- ran {meta.get('started')} → {meta.get('ended')}, {meta.get('points')} points"
             + (f" of {meta['planned']} planned" if meta.get("planned") else ""),
             "- `pyperf.json` holds one value per repetition (a whole measured window), so "
             "`pyperf check` warns that there are not enough samples for 1% certainty: the "
             "uncertainty of every comparison is the interval or range printed here "
             "(docs/experiments.md, Comparisons)", ""]
    return "\n".join(lines) + "\n"


def write_csv(outdir: str, summary: Summary, records: list[dict]) -> None:
    """CSV beside the JSON: every summary table (``table-<key or index>.csv``) and the raw
    records flattened (``records.csv``: one row per point, nested fields as dotted columns,
    lists as JSON)."""
    for i, t in enumerate(summary.tables):
        name = f"table-{t.key or i}.csv"
        with open(os.path.join(outdir, name), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(t.header)
            w.writerows(t.rows)
    rows = [_flatten(r) for r in records]
    cols = sorted({k for r in rows for k in r})
    with open(os.path.join(outdir, "records.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _flatten(obj, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def _print_point(rec: dict, stream) -> None:
    if "error" in rec:
        return
    srv, cli = rec.get("server") or {}, rec.get("client") or {}
    lat = cli.get("latency_us") or {}
    cpu = srv.get("cpu_us_per_req")
    print(f"  {rec.get('rps', 0):9.0f}/s  server {cpu if cpu is not None else float('nan'):7.2f} us/req "
          f"(cpu {100 * srv.get('cpu_util', 0):3.0f}%)  client cpu {100 * cli.get('cpu_util', 0):3.0f}%  "
          f"p50 {lat.get('p50', 0):7.0f} p99 {lat.get('p99', 0):7.0f} us  bound {rec.get('bound')}"
          f"{'  NOISY' if (rec.get('noise') or {}).get('noisy') else ''}"
          f"{'  RATE NOT MET' if cli.get('mode') == 'open' and not cli.get('rate_met') else ''}",
          file=stream, flush=True)


#: pyperf metadata that describe the process writing pyperf.json, not the measurement.
WRITER_FACTS = frozenset({"uptime", "load_avg_1min", "mem_max_rss", "runnable_threads",
                          "cpu_temp", "cpu_freq"})


def write_pyperf(path: str, exp: Experiment, records: list[dict], run_meta: dict | None = None) -> None:
    """One pyperf benchmark per configuration, one pyperf run per repetition.

    The value is seconds (of server CPU) per unit of work and ``loops`` the number of
    units, so pyperf's raw value is the window's total server CPU.  The benchmark's name
    carries absolute quantities (``Experiment.pyperf_name``), so ``pyperf compare_to`` of
    two runs matches only like with like; the preset, commit and calibration are in the
    metadata (``parallelnet experiment diff`` warns when they differ).  pyperf's own
    metadata is collected, with the interpreter path made relative and ``date`` the
    moment the point was measured, plus ours: the point's parameters, its bottleneck and
    its noise figures.
    """
    import pyperf

    by_config: dict[str, list] = {}
    host = provenance.host_hash()
    run_meta = run_meta or {}
    for rec in records:
        got = exp.pyperf_value(rec)
        if not got:
            continue
        value, loops = got
        config = exp.pyperf_name(rec) if exp.pyperf_name else rec["config"]
        if rec["config"].endswith(AA_SUFFIX) and not config.endswith(AA_SUFFIX):
            config += AA_SUFFIX   # the A/A twin stays a benchmark of its own
        meta = {"name": f"{exp.name}/{config}", "unit": "second", "loops": max(1, int(loops)),
                "rep": rec["rep"], "bound": str(rec.get("bound")),
                "noisy": str(bool((rec.get("noise") or {}).get("noisy"))).lower(),
                "preset": str(run_meta.get("preset")),
                "commit": str((run_meta.get("code") or {}).get("commit", ""))[:12]}
        for k, v in rec["params"].items():
            if isinstance(v, (str, int, float)) and not isinstance(v, bool):
                meta[f"p_{k}"] = v
            else:
                meta[f"p_{k}"] = json.dumps(v)
        noise = rec.get("noise") or {}
        meta["steal_max"] = round(float(noise.get("steal_max", 0.0)), 4)
        meta["others_cpu"] = round(float(noise.get("others_cpu", 0.0)), 4)
        # Given keys win over collected ones: no absolute interpreter path, no host name.
        meta["python_executable"] = provenance.relative_argv([sys.executable])[0]
        meta["hostname"] = host
        if rec.get("measured_at"):
            meta["date"] = rec["measured_at"].replace("T", " ").rstrip("Z")
        # pyperf collects the machine's facts when the file is written; those of the
        # writing process (uptime, load, its RSS, runnable threads) described the writing,
        # not the measurement (the noise figures above do that), and made a rebuild differ.
        collected = pyperf.Run([value], metadata=meta, collect_metadata=True).get_metadata()
        run = pyperf.Run([value], collect_metadata=False,
                         metadata={k: v for k, v in collected.items() if k not in WRITER_FACTS})
        by_config.setdefault(config, []).append(run)
    benches = [pyperf.Benchmark(runs) for runs in by_config.values()]
    if benches:
        pyperf.BenchmarkSuite(benches).dump(path, replace=True)


def available_backends(names) -> tuple[list[str], dict[str, str]]:
    """(the available ones among ``names`` — "all" for every registered backend — and
    {name: why not} for the others).  Summaries list the skipped ones with the reason."""
    from parallelnet.core.backend import registry

    reg = registry()
    wanted = list(reg) if names in ("all", None) else list(names)
    ok, skipped = [], {}
    for name in wanted:
        cls = reg.get(name)
        if cls is None:
            skipped[name] = "not registered"
            continue
        avail = cls.probe()
        if avail:
            ok.append(name)
        else:
            skipped[name] = avail.reason
    return ok, skipped


# -- the configurations a plan runs (shared by the experiments' plans) ----------------------

#: A strategy name may carry this suffix: the same strategy, the hogged worker registering
#: the listener last (imbalance's variant); the server sees the strategy without it.
TAIL = "@tail"


def strategies_for(backend: str, wanted: list[str]) -> list[str]:
    """The strategies of ``wanted`` that ``backend`` serves (a ``@tail`` variant counts as
    its strategy)."""
    from parallelnet.core.backend import registry
    from parallelnet.core.listeners import layout_of

    served = registry()[backend].accept_strategies
    return [s for s in wanted if layout_of(s.removesuffix(TAIL)) in served]


def strategy_configs(backends, strategies: list[str], modes: list[str] | None = None
                     ) -> tuple[list[tuple[str, ...]], PlanNotes]:
    """Every available backend × mode it runs × strategy it serves, as ``(backend, mode,
    strategy)`` (``(backend, strategy)`` when ``modes`` is None), and the notes: ``ran``
    their ``/``-joined names, ``skipped`` the unavailable backends with why."""
    from parallelnet.core.backend import registry

    ok, skipped = available_backends(backends)
    reg = registry()
    if modes is None:
        out = [(b, st) for b in ok for st in strategies_for(b, strategies)]
    else:
        out = [(b, m, st) for b in ok for m in modes if m in reg[b].modes
               for st in strategies_for(b, strategies)]
    return out, PlanNotes(["/".join(c) for c in out], skipped)


def labelled_configs(p: dict) -> tuple[list[tuple[str, str, list[str]]], PlanNotes]:
    """The configurations to run: ``configs`` (``LABEL=BACKEND[:ARGS]``, :func:`parse_config`)
    if the parameters give them, else one per backend of ``backends`` ("all": every
    registered one), as ``(label, backend, server args)``; the notes: ``ran`` the labels,
    ``skipped`` the unavailable backends with why."""
    if p.get("configs"):
        cfgs = [parse_config(c) for c in p["configs"]]
        ok, skipped = available_backends(sorted({b for _, b, _ in cfgs}))
    else:
        ok, skipped = available_backends(p["backends"])
        cfgs = [(b, b, []) for b in ok]
    cfgs = [c for c in cfgs if c[1] in ok]
    return cfgs, PlanNotes([c[0] for c in cfgs], skipped)


def load_records(outdir: str) -> list[dict]:
    with open(os.path.join(outdir, "records.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def rotated(configs: list, rep: int) -> list:
    """Rotate the order of configurations by repetition (each goes first once in a while)."""
    k = rep % len(configs) if configs else 0
    return configs[k:] + configs[:k]
