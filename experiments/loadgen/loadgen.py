"""Python face of the C load generator (``loadgen.c`` via the cffi module ``_loadgen``).

One :func:`run` call hands a :class:`LoadSpec` to C, which runs the whole test on its
own pinned pthreads with the GIL released, and returns a :class:`LoadResult`.  The
measured figures mean:

* ``requests``: responses completed whose request *started* in the measured window
  (after ``warmup``, before ``warmup + duration``).  Start = actual send (closed loop),
  intended send time on the fixed schedule (open loop, so a stalled server cannot hide
  its stall: the latency includes the time the request should already have been out),
  connect start (churn: the handshake is part of each request), or the connect's
  intended time on the fixed schedule (churn at a rate).  In churn every request is one
  connection, so ``requests`` is also the number of connections completed.  With
  ``requests_per_conn`` M > 1 a churned connection is measured whole: all M requests
  count iff its first one's start is in the window; the first one's latency runs from
  the connect (as for M = 1), the later ones' from their own send.
* ``scheduled``/``backlog`` (open loop, churn at a rate): sends (connects) due in the
  window, and how many of them never went out before it closed.
* ``achieved_rate`` (open loop, churn at a rate): ``requests`` (churn at a rate:
  connections, ``requests / requests_per_conn``) over the span they were
  scheduled in (``duration``, or up to the due time of the first request over
  ``max_requests``), not over ``elapsed``: the drain is not part of the schedule.  ``rate_met``, the
  generator's rule: not aborted, achieved >= 99% of the target, and backlog <= 1% of
  scheduled.  How late the answers came is the latency's business (from intended
  times); the in-flight cap (``connections`` x ``depth``, or ``connections`` in
  churn) bounds how far behind a server can fall before the backlog shows it.
* ``elapsed``: from the start of the measured window until the last worker thread
  finished, i.e. the window plus the drain of requests still in flight (at most
  ``timeout``); ``rps = requests / elapsed``.
* ``errors``: counted per failure *event* on a connection (a reset loses everything in
  flight on it but counts once), over the whole run, warm-up included.  The connection
  reconnects with an exponential back-off.  ``non2xx`` responses are not errors.
* ``client_cpu_*``: CPU time of the generator's own threads over the measured window
  (``getrusage(RUSAGE_THREAD)`` deltas), so other threads in this process, e.g. a
  Python test server, are not charged to the client.
* ``targets``: the same figures per target (several targets in one run: connection i
  goes to target ``i % len(targets)``; churn at a rate sends thread t's k-th connect to
  target ``(t + k) % len(targets)``); the top-level figures are their total.

Modes: ``closed`` (``depth`` requests in flight per connection), ``open`` (requests at a
fixed total ``rate`` over persistent connections, as wrk2), ``churn`` (connect,
``requests_per_conn`` requests one after the other, close).  ``churn`` with ``rate > 0`` is open-loop
churn: connects at a fixed total rate (connections/s) on a fixed schedule per thread,
at most ``connections`` in flight; a connect due with no free slot waits for one (and
is ``backlog`` if the window closes first), and every scheduled connect is one attempt
(no retries: a failure is one error of its kind).  ``netns=NAME`` runs the generator in
a network namespace (experiments/loadgen/netns.py).

Service times (HTTP): ``service="exp:100"`` makes every request ``GET /work/US`` with US
drawn per request (the server burns US µs of CPU, then answers as ``GET /``);
``heavy="K:SPEC"`` gives the first K connections another distribution.  The result then
has ``work_us`` (the service time asked for by the measured requests) and ``classes``
(``light``/``heavy``: requests, latency, histogram, work_us).  See docs/loadgen.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import socket
import sys
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from parallelnet.core.stats import fmt_jain, jain_index

PROTOCOLS = ("echo", "http")
MODES = ("closed", "open", "churn")
#: Error kinds, in the order of ``LG_E_*`` in loadgen.c.
ERROR_KINDS = ("connect_refused", "connect_timeout", "reset", "read_timeout", "eof",
               "echo_mismatch", "http_parse", "addr_not_avail", "other")
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)
MAX_SIZE = 64 * 1024 * 1024
MAX_DEPTH = 4096
#: Service-time distributions (``service``, ``heavy``), as written in a spec.
SERVICE_KINDS = {"fixed": "fixed:US", "exp": "exp:MEAN", "bimodal": "bimodal:P:US1:US2",
                 "lognormal": "lognormal:MEAN:SIGMA"}
#: The largest service time a request can ask for (the server's route takes 8 digits).
MAX_US = 99_999_999
MAX_SIGMA = 10.0
MAX_REQUESTS_PER_CONN = 1_000_000
CLASSES = ("light", "heavy")


def _lib():
    try:
        from parallelnet.experiments.loadgen._loadgen import ffi, lib
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise ImportError("the C load generator is not built; reinstall the project "
                          "(pip install -e .) so setup.py's cffi_modules compiles it") from exc
    return ffi, lib


@dataclass(frozen=True)
class ServiceTime:
    """A service-time distribution parsed from its spec (µs; see :func:`parse_service`).
    ``p``/``a``/``b`` are what the C draw uses: fixed ``a``; exp mean ``a``; bimodal ``a``
    with probability ``p``, else ``b``; lognormal ``exp(N(a, b))`` (``a`` = mu, ``b`` =
    sigma of the underlying normal).  ``mean_us``: the distribution's mean, before the
    rounding to whole µs and the cap at MAX_US."""

    spec: str
    kind: str
    p: float
    a: float
    b: float
    mean_us: float


def parse_service(text: str, what: str = "service") -> ServiceTime:
    """``fixed:US``, ``exp:MEAN``, ``bimodal:P:US1:US2`` or ``lognormal:MEAN:SIGMA``
    (microseconds) -> ServiceTime; ValueError naming the problem otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string such as 'exp:100', got {text!r}")
    kind, *params = text.strip().split(":")
    if kind not in SERVICE_KINDS:
        raise ValueError(f"{what} {text!r}: unknown distribution {kind!r} (one of "
                         f"{', '.join(SERVICE_KINDS.values())})")
    form = SERVICE_KINDS[kind]
    want = form.count(":")
    if len(params) != want:
        raise ValueError(f"{what} {text!r}: {kind} takes {want} parameter"
                         f"{'s' if want > 1 else ''} ({form}), got {len(params)}")
    names = form.split(":")[1:]
    values = {}
    for name, raw in zip(names, params):
        try:
            v = float(raw)
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            raise ValueError(f"{what} {text!r}: {name} must be a finite number, got {raw!r}")
        values[name] = v

    def check(name, lo, hi, strict_lo=False, unit=" µs"):
        v = values[name]
        if v < lo or (strict_lo and v == lo) or v > hi:
            raise ValueError(f"{what} {text!r}: {name} must be {'>' if strict_lo else '>='} "
                             f"{lo:.15g}{unit} and <= {hi:.15g}{unit}, got {v:.15g}")

    if kind == "fixed":
        check("US", 0, MAX_US)
        return ServiceTime(text, kind, 0.0, values["US"], 0.0, values["US"])
    if kind == "exp":
        check("MEAN", 0, MAX_US, strict_lo=True)
        return ServiceTime(text, kind, 0.0, values["MEAN"], 0.0, values["MEAN"])
    if kind == "bimodal":
        check("P", 0, 1, unit="")
        check("US1", 0, MAX_US)
        check("US2", 0, MAX_US)
        p, a, b = values["P"], values["US1"], values["US2"]
        return ServiceTime(text, kind, p, a, b, p * a + (1 - p) * b)
    check("MEAN", 0, MAX_US, strict_lo=True)
    check("SIGMA", 0, MAX_SIGMA, unit="")
    mean, sigma = values["MEAN"], values["SIGMA"]
    # E[exp(N(mu, sigma))] = exp(mu + sigma^2 / 2): choose mu so that the mean is MEAN.
    return ServiceTime(text, kind, 0.0, math.log(mean) - sigma * sigma / 2, sigma, mean)


def parse_heavy(text: str) -> tuple[int, ServiceTime]:
    """``K:SPEC`` (e.g. ``2:fixed:5000``) -> (K, ServiceTime)."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"heavy must be 'K:SPEC' (e.g. '2:fixed:5000'), got {text!r}")
    k, _, spec = text.partition(":")
    try:
        n = int(k)
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(f"heavy {text!r}: K (the number of heavy connections) must be an "
                         f"integer >= 1, got {k!r}")
    return n, parse_service(spec, what="heavy")


def sample_service(spec: str, n: int, seed: int = 1, conn: int = 0) -> list[int]:
    """The first ``n`` service times (µs) that connection ``conn`` draws in a run with
    this ``seed``: the C generator's own draw, so a run's ``work_us`` can be predicted
    exactly and a distribution inspected without a server."""
    d = parse_service(spec)
    ffi, lib = _lib()
    cs = ffi.new("struct lg_service *")
    _fill_service(lib, cs, d)
    out = ffi.new("uint32_t[]", max(n, 1))
    lib.lg_sample(cs, seed, conn, out, n)
    return list(ffi.unpack(out, n))


def _fill_service(lib, cs, d: ServiceTime | None) -> None:
    """Set a ``struct lg_service`` (LG_SVC_NONE for None)."""
    cs.kind = lib.LG_SVC_NONE if d is None else {
        "fixed": lib.LG_SVC_FIXED, "exp": lib.LG_SVC_EXP, "bimodal": lib.LG_SVC_BIMODAL,
        "lognormal": lib.LG_SVC_LOGNORMAL}[d.kind]
    if d is not None:
        cs.p, cs.a, cs.b = d.p, d.a, d.b


@dataclass
class Target:
    """One server to drive.  ``protocol``/``path`` None: the LoadSpec's."""

    host: str
    port: int
    protocol: str | None = None
    path: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class LoadSpec:
    """What to run.  ``rate`` is the total request rate of the open loop (req/s),
    spread evenly over the connections, or the total connect rate of churn (conn/s);
    ``depth`` is the number of requests in flight per connection (closed loop) or the
    cap on them (open loop: 1 behaves like wrk2, more lets a connection pipeline to
    catch up).

    One target: ``host``/``port``/``protocol``/``path``.  Several: ``targets``, a list
    of :class:`Target` (or ``(host, port[, protocol[, path]])`` tuples), whose missing
    protocol/path default to this spec's; then leave ``host``/``port`` unset.
    ``netns``: run the client inside that network namespace (``/run/netns/NAME``).

    HTTP service times: ``service`` (e.g. ``"exp:100"``, see :func:`parse_service`)
    makes each request ``GET /work/US`` with US drawn per request; ``heavy`` (``"K:SPEC"``)
    gives connections 0..K-1 (churn at a rate: slots) SPEC instead, the rest keep
    ``service`` (or, without it, the plain ``path``).  ``seed`` seeds the draws
    (connection i's sequence depends only on ``seed`` and i).  ``requests_per_conn``
    (churn): requests each connection sends, one after the other, before it closes."""

    host: str = "127.0.0.1"
    port: int = 0
    protocol: str = "echo"
    mode: str = "closed"
    connections: int = 16
    threads: int = 1
    cpus: list[int] | None = None
    size: int = 64
    depth: int = 1
    rate: float = 0.0
    duration: float = 5.0
    warmup: float = 1.0
    max_requests: int = 0
    path: str = "/"
    timeout: float = 5.0
    abort_on_mismatch: bool = True
    targets: list[Target] | None = None
    netns: str | None = None
    service: str | None = None
    heavy: str | None = None
    requests_per_conn: int = 1
    seed: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, tuple)):
            self.targets = [t if isinstance(t, Target) else
                            Target(**t) if isinstance(t, dict) else Target(*t)
                            for t in self.targets]

    @property
    def churn_rate(self) -> bool:
        """Open-loop churn: connects on a fixed schedule."""
        return self.mode == "churn" and bool(self.rate)

    @property
    def uses_service(self) -> bool:
        """Service times on: requests go to /work/US and the result has classes."""
        return self.service is not None or self.heavy is not None

    def service_time(self) -> ServiceTime | None:
        return None if self.service is None else parse_service(self.service)

    def heavy_conns(self) -> tuple[int, ServiceTime | None]:
        return (0, None) if self.heavy is None else parse_heavy(self.heavy)

    def resolved_targets(self) -> list[Target]:
        """Every target with its protocol and path filled in."""
        given = self.targets if self.targets is not None else [Target(self.host, self.port)]
        return [Target(t.host, t.port, t.protocol or self.protocol,
                       self.path if t.path is None else t.path) for t in given]

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def integer(name, lo, hi=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
                raise ValueError(f"{name} must be {rng}, got {v}")

        def number(name, lo, strict):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if v < lo or (strict and v == lo):
                raise ValueError(f"{name} must be {'>' if strict else '>='} {lo}, got {v}")

        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.targets is not None:
            if not isinstance(self.targets, list) or not self.targets:
                raise ValueError("targets must be None or a non-empty list of Target")
            if self.port != 0 or self.host != "127.0.0.1":
                raise ValueError("give either targets or host/port (the one-target "
                                 "shorthand), not both")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        integer("connections", 1)
        targets = self.resolved_targets()
        if len(targets) > self.connections and not self.churn_rate:
            raise ValueError(f"connections ({self.connections}) must be at least the number "
                             f"of targets ({len(targets)}): each target needs a connection")
        integer("threads", 1)
        if self.threads > self.connections:
            raise ValueError(f"threads ({self.threads}) must not exceed connections "
                             f"({self.connections}): each thread needs a connection")
        if self.cpus is not None:
            allowed = os.sched_getaffinity(0)
            if not isinstance(self.cpus, (list, tuple)) or not self.cpus:
                raise ValueError("cpus must be None or a non-empty list of CPU numbers")
            for cpu in self.cpus:
                if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu not in allowed:
                    raise ValueError(f"cpu {cpu!r} is not one this process may run on "
                                     f"(allowed: {sorted(allowed)})")
        integer("size", 1, MAX_SIZE)
        integer("depth", 1, MAX_DEPTH)
        if self.mode == "churn" and self.depth != 1:
            raise ValueError("churn sends one request per connection: depth must be 1")
        number("rate", 0, strict=False)
        if self.mode == "open" and self.rate <= 0:
            raise ValueError("open loop needs rate > 0 (total requests per second)")
        if self.mode == "closed" and self.rate:
            raise ValueError("rate is for mode='open' (requests/s) or mode='churn' "
                             "(connections/s), not the closed loop")
        number("duration", 0, strict=True)
        number("warmup", 0, strict=False)
        number("timeout", 0, strict=True)
        integer("max_requests", 0)
        integer("requests_per_conn", 1, MAX_REQUESTS_PER_CONN)
        if self.requests_per_conn != 1 and self.mode != "churn":
            raise ValueError("requests_per_conn is for mode='churn' (requests per connection "
                             "before it closes); closed and open loops keep connections open")
        integer("seed", 0, 2**64 - 1)
        for t in targets:
            _validate_target(t)
        if self.uses_service:
            self.service_time()                 # each raises ValueError naming its problem
            k, _ = self.heavy_conns()
            if k > self.connections:
                raise ValueError(f"heavy {self.heavy!r}: K ({k}) must not exceed connections "
                                 f"({self.connections})")
            echo = [t.address for t in targets if t.protocol != "http"]
            if echo:
                raise ValueError("service/heavy need protocol http (requests go to the "
                                 f"server's /work/US route); echo target(s): {', '.join(echo)}")
            if self.service is not None:
                paths = sorted({t.path for t in targets if t.path != "/"})
                if paths:
                    raise ValueError(f"service replaces the request path with /work/US; "
                                     f"drop the path(s) {', '.join(paths)}")
        if self.netns is not None:
            import parallelnet.experiments.loadgen.netns as netns
            if not netns.exists(self.netns):
                raise ValueError(f"netns {self.netns!r}: no such network namespace "
                                 f"({netns.netns_path(str(self.netns))} does not exist)")


def _validate_target(t: Target) -> None:
    if not isinstance(t.host, str) or not t.host:
        raise ValueError(f"host must be a non-empty string, got {t.host!r}")
    if isinstance(t.port, bool) or not isinstance(t.port, int) or not 1 <= t.port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535, got {t.port!r}")
    if t.protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {t.protocol!r}")
    if not isinstance(t.path, str) or not t.path.startswith("/") \
            or re.search(r"[\x00-\x20\x7f]", t.path):
        raise ValueError(f"path must start with '/' and contain no spaces or control "
                         f"characters, got {t.path!r}")
    try:
        socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve host {t.host!r}: {exc}") from None


@dataclass
class TargetResult:
    """One target's share of a run (the figures mean what LoadResult's do)."""

    host: str
    port: int
    protocol: str
    path: str
    requests: int
    bytes_sent: int
    bytes_received: int
    rps: float
    latency: dict[str, float]
    latency_min_us: float
    latency_mean_us: float
    latency_max_us: float
    histogram: list[tuple[int, int]]
    errors: dict[str, int]
    non2xx: int
    connects: int
    work_us: int = 0                           # service time asked for by its requests

    @property
    def address(self) -> str:
        return Target(self.host, self.port).address


@dataclass
class ClassResult:
    """One class of connections (``light``: those with ``service``, ``heavy``: the first
    K): the latency figures mean what LoadResult's do."""

    connections: int                           # connections (churn at a rate: slots)
    service: str | None                        # its spec; None: the plain path
    requests: int
    work_us: int                               # sum of the drawn US of those requests
    latency: dict[str, float]
    latency_min_us: float
    latency_mean_us: float
    latency_max_us: float
    histogram: list[tuple[int, int]]

    @property
    def work_mean_us(self) -> float | None:
        return self.work_us / self.requests if self.requests else None


@dataclass
class LoadResult:
    spec: dict
    requests: int
    bytes_sent: int
    bytes_received: int
    elapsed: float
    rps: float
    latency: dict[str, float]                  # percentile label -> microseconds
    latency_min_us: float
    latency_mean_us: float
    latency_max_us: float
    histogram: list[tuple[int, int]]           # (bucket midpoint ns, count), non-empty
    per_connection: list[int]
    jain: float
    errors: dict[str, int]
    non2xx: int
    connects: int
    target_rate: float
    achieved_rate: float
    rate_met: bool                             # always True without a rate to meet
    scheduled: int                             # open loop / churn at a rate: due in the window
    backlog: int                               # of those, never sent (connected)
    client_cpu_user_s: float
    client_cpu_sys_s: float
    client_cpu_us_per_req: float | None
    client_cpu_us_per_conn: float | None       # churn: the same per connection completed
    aborted: bool
    targets: list[TargetResult]                # per target; the fields above are the total
    message: str = ""
    work_us: int = 0                           # service time asked for by the measured requests
    classes: dict[str, ClassResult] | None = None   # with service/heavy: "light", "heavy"

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        """No abort, no errors, and the rate was met where there was one."""
        return not self.aborted and self.errors_total == 0 and self.rate_met

    def raise_for_errors(self) -> None:
        if not self.ok:
            raise RuntimeError(_problems(self))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["histogram"] = [list(b) for b in self.histogram]
        for t in d["targets"] + list((d["classes"] or {}).values()):
            t["histogram"] = [list(b) for b in t["histogram"]]
        if math.isnan(d["jain"]):
            d["jain"] = None                    # undefined; strict JSON has no NaN
        d["errors_total"] = self.errors_total
        d["ok"] = self.ok
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoadResult":
        """The result :meth:`to_dict` wrote (e.g. ``parallelnet loadgen --json -`` on
        another host), as a LoadResult again; unknown keys are ignored."""
        def hist(h):
            return [(int(v), int(c)) for v, c in h]

        def fields(kind, src):
            names = {f.name for f in dataclasses.fields(kind)}
            return {k: v for k, v in src.items() if k in names}

        out = fields(cls, d)
        out["histogram"] = hist(d["histogram"])
        out["jain"] = math.nan if d.get("jain") is None else d["jain"]
        out["targets"] = [TargetResult(**{**fields(TargetResult, t), "histogram": hist(t["histogram"])})
                          for t in d["targets"]]
        if d.get("classes") is not None:
            out["classes"] = {name: ClassResult(**{**fields(ClassResult, c),
                                                  "histogram": hist(c["histogram"])})
                              for name, c in d["classes"].items()}
        return cls(**out)


def percentile_rank(p: float, total: int) -> int:
    """The 1-based rank of the sample reported as the p-th percentile of ``total``:
    ceil(p% * total), at least 1.  One place, so that what a summary says about the
    samples beyond a percentile (experiments.analysis.tail_samples) counts from the very
    sample reported, float rounding included."""
    return max(1, math.ceil(p / 100.0 * total))


def percentiles_from_histogram(hist: list[tuple[int, int]], pcts=PERCENTILES,
                               lo: int | None = None, hi: int | None = None) -> dict[str, float]:
    """Percentiles (µs) from (value_ns, count) buckets, HdrHistogram's way: the value
    of the bucket holding the ceil(p% * total)-th sample, clamped to the exact
    min/max when known."""
    total = sum(c for _, c in hist)
    out = {}
    for p in pcts:
        label = f"p{p:g}"
        if not total:
            out[label] = 0.0
            continue
        rank = percentile_rank(p, total)
        seen = 0
        for value, count in hist:
            seen += count
            if seen >= rank:
                break
        if hi is not None:
            value = min(value, hi)
        if lo is not None:
            value = max(value, lo)
        out[label] = value / 1000.0
    return out


def run(spec: LoadSpec) -> LoadResult:
    """Run one load test; blocks (GIL released) for about warmup + duration.  With
    ``spec.netns`` it runs in a forked child inside that namespace, killed if it is
    still running ``timeout + 30`` s after the window should have closed."""
    spec.validate()
    if spec.netns is None:
        return _run_here(spec)
    import parallelnet.experiments.loadgen.netns as netns

    # Load the extension here: a dlopen in the forked child of a threaded process could
    # block on a loader lock some other thread held at the fork.
    _lib()

    limit = spec.warmup + spec.duration + spec.timeout + 30
    try:
        return netns.call_in_netns(spec.netns, _run_here, spec, timeout=limit)
    except netns.NetnsError as exc:
        raise RuntimeError(f"load generator failed: {exc}") from exc


def _run_here(spec: LoadSpec) -> LoadResult:
    # Runs in this process may overlap (one per Python thread): each holds its
    # connections' worth of descriptors until it returns.
    with _fd_reservation(spec.connections + 64):
        return _run_c(spec)


def _run_c(spec: LoadSpec) -> LoadResult:
    ffi, lib = _lib()
    targets = spec.resolved_targets()

    keep = []                                  # cdata that must outlive the call
    ctargets = ffi.new("struct lg_target[]", len(targets))
    for ct, t in zip(ctargets, targets):
        host, path = ffi.new("char[]", t.host.encode()), ffi.new("char[]", t.path.encode())
        keep += [host, path]
        ct.host, ct.path, ct.port = host, path, t.port
        ct.protocol = lib.LG_ECHO if t.protocol == "echo" else lib.LG_HTTP
    cfg = ffi.new("struct lg_config *")
    cfg.targets, cfg.ntargets = ctargets, len(targets)
    cfg.mode = {"closed": lib.LG_CLOSED, "open": lib.LG_OPEN, "churn": lib.LG_CHURN}[spec.mode]
    cfg.connections, cfg.threads = spec.connections, spec.threads
    if spec.cpus:
        cpus = ffi.new("int[]", list(spec.cpus))
        keep.append(cpus)
        cfg.cpus, cfg.ncpus = cpus, len(spec.cpus)
    cfg.size, cfg.depth = spec.size, spec.depth
    cfg.rate, cfg.duration, cfg.warmup, cfg.timeout = (float(spec.rate), float(spec.duration),
                                                       float(spec.warmup), float(spec.timeout))
    cfg.max_requests = spec.max_requests
    cfg.abort_on_mismatch = 1 if spec.abort_on_mismatch else 0
    service = spec.service_time()
    n_heavy, heavy = spec.heavy_conns()
    _fill_service(lib, cfg.service, service)
    _fill_service(lib, cfg.heavy, heavy)
    cfg.heavy_conns = n_heavy
    cfg.requests_per_conn = spec.requests_per_conn
    cfg.seed = spec.seed

    nb = lib.lg_hist_buckets()
    res = ffi.new("struct lg_result *")
    tres = ffi.new("struct lg_tresult[]", len(targets))
    hists = [ffi.new("uint64_t[]", nb) for _ in targets]
    for tr, h in zip(tres, hists):
        tr.hist = h
    per_conn = ffi.new("uint64_t[]", spec.connections)
    res.targets, res.per_conn = tres, per_conn
    chists = [ffi.new("uint64_t[]", nb) for _ in CLASSES] if spec.uses_service else []
    for k, h in enumerate(chists):
        res.classes[k].hist = h

    rc = lib.lg_run(cfg, res)
    message = ffi.string(res.message).decode(errors="replace")
    if rc != 0:
        raise RuntimeError(f"load generator failed: {message or 'unknown error'}")

    elapsed = res.elapsed
    mids = [(lib.lg_hist_low(i) + lib.lg_hist_high(i)) // 2 for i in range(nb)]
    raws = []
    for tr, h in zip(tres, hists):
        counts = ffi.unpack(h, nb)
        raws.append(_Raw(tr.requests, tr.bytes_sent, tr.bytes_received,
                         {mids[i]: c for i, c in enumerate(counts) if c},
                         tr.min_ns, tr.max_ns,
                         {k: tr.errors[i] for i, k in enumerate(ERROR_KINDS)},
                         tr.non2xx, tr.connects, tr.work_us))
    per_target = [_figures(t, raw, elapsed) for t, raw in zip(targets, raws)]
    total = _figures(Target("", 0, "", ""), _Raw.total(raws), elapsed)
    classes = None
    if chists:
        classes = {}
        for k, (name, h) in enumerate(zip(CLASSES, chists)):
            cr = res.classes[k]
            counts = ffi.unpack(h, nb)
            buckets = sorted((mids[i], c) for i, c in enumerate(counts) if c)
            heavy_class = name == "heavy"
            classes[name] = ClassResult(
                connections=n_heavy if heavy_class else spec.connections - n_heavy,
                service=(heavy if heavy_class else service).spec
                if (heavy if heavy_class else service) is not None else None,
                requests=cr.requests, work_us=cr.work_us,
                **_latency_figures(buckets, cr.requests, cr.min_ns, cr.max_ns))

    per = [per_conn[i] for i in range(spec.connections)]
    requests = total.requests
    target = float(spec.rate) if spec.mode == "open" or spec.churn_rate else 0.0
    achieved = total.rps
    rate_met = True
    if target:
        # The work scheduled in the window, over the window (or up to the due time of
        # the first request over max_requests): the drain after it is not part of the
        # schedule, and one late answer must not decide "met".  How late answers
        # came is what the latency from the intended time shows.
        # Churn at a rate counts connections: requests_per_conn measured requests each.
        units = requests / spec.requests_per_conn if spec.churn_rate else requests
        achieved = units / res.span if res.span > 0 else 0.0
        rate_met = (not res.aborted and achieved >= 0.99 * target
                    and res.backlog * 100 <= res.scheduled)
    cpu = res.cpu_user + res.cpu_sys
    per_req = cpu * 1e6 / requests if requests else None
    # churn: each measured connection is requests_per_conn measured requests
    return LoadResult(
        spec=dataclasses.asdict(spec),
        requests=requests, bytes_sent=total.bytes_sent, bytes_received=total.bytes_received,
        elapsed=elapsed, rps=total.rps, latency=total.latency,
        latency_min_us=total.latency_min_us, latency_mean_us=total.latency_mean_us,
        latency_max_us=total.latency_max_us, histogram=total.histogram, per_connection=per,
        jain=jain_index(per), errors=total.errors, non2xx=total.non2xx, connects=total.connects,
        target_rate=target, achieved_rate=achieved, rate_met=rate_met,
        scheduled=res.scheduled, backlog=res.backlog,
        client_cpu_user_s=res.cpu_user, client_cpu_sys_s=res.cpu_sys,
        client_cpu_us_per_req=per_req,
        client_cpu_us_per_conn=(per_req * spec.requests_per_conn
                                if spec.mode == "churn" and per_req is not None else None),
        aborted=bool(res.aborted), targets=per_target,
        message=message, work_us=total.work_us, classes=classes,
    )


@dataclass
class _Raw:
    """A target's counts as C left them (histogram: bucket midpoint ns -> count)."""

    requests: int
    bytes_sent: int
    bytes_received: int
    hist: dict[int, int]
    min_ns: int
    max_ns: int
    errors: dict[str, int]
    non2xx: int
    connects: int
    work_us: int

    @classmethod
    def total(cls, parts: list["_Raw"]) -> "_Raw":
        hist: dict[int, int] = {}
        for p in parts:
            for v, c in p.hist.items():
                hist[v] = hist.get(v, 0) + c
        served = [p for p in parts if p.requests]
        return cls(sum(p.requests for p in parts), sum(p.bytes_sent for p in parts),
                   sum(p.bytes_received for p in parts), hist,
                   min((p.min_ns for p in served), default=0),
                   max((p.max_ns for p in served), default=0),
                   {k: sum(p.errors[k] for p in parts) for k in ERROR_KINDS},
                   sum(p.non2xx for p in parts), sum(p.connects for p in parts),
                   sum(p.work_us for p in parts))


def _latency_figures(buckets: list[tuple[int, int]], n: int, min_ns: int,
                     max_ns: int) -> dict:
    return dict(
        latency=percentiles_from_histogram(buckets, lo=min_ns, hi=max_ns),
        latency_min_us=min_ns / 1000.0,
        latency_mean_us=sum(v * c for v, c in buckets) / n / 1000.0 if n else 0.0,
        latency_max_us=max_ns / 1000.0, histogram=buckets)


def _figures(t: Target, raw: _Raw, elapsed: float) -> TargetResult:
    buckets = sorted(raw.hist.items())
    n = raw.requests
    return TargetResult(
        host=t.host, port=t.port, protocol=t.protocol, path=t.path, requests=n,
        bytes_sent=raw.bytes_sent, bytes_received=raw.bytes_received,
        rps=n / elapsed if elapsed > 0 else 0.0,
        **_latency_figures(buckets, n, raw.min_ns, raw.max_ns), errors=raw.errors,
        non2xx=raw.non2xx, connects=raw.connects, work_us=raw.work_us)


_fd_lock = threading.Lock()
_fd_reserved = 0                               # descriptors held by runs in progress


class _fd_reservation:
    """Hold ``n`` descriptors for one run: raise RLIMIT_NOFILE's soft limit to what all
    runs in progress need together (never lowering it, so one run cannot take a
    concurrent run's descriptors away)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        global _fd_reserved
        with _fd_lock:
            _ensure_fd_limit(_fd_reserved + self.n)
            _fd_reserved += self.n
        return self

    def __exit__(self, *exc):
        global _fd_reserved
        with _fd_lock:
            _fd_reserved -= self.n


def _ensure_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ValueError(f"{need} file descriptors needed but RLIMIT_NOFILE hard limit "
                             f"is {hard}; use fewer connections or raise `ulimit -Hn`")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


# ---- reporting -----------------------------------------------------------------------

def _fmt_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.2f}s"
    if us >= 1e3:
        return f"{us / 1e3:.2f}ms"
    return f"{us:.1f}us"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.2f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return f"{n:.2f}GB"  # pragma: no cover


def _problems(r: LoadResult) -> str:
    parts = []
    if r.aborted:
        parts.append(f"ABORTED: {r.message or 'stopped'}")
    errs = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r.errors.items() if v)
    if errs:
        parts.append(f"errors: {errs}")
    if not r.rate_met:
        unit, what = ("conn/s", "connects") if r.spec["mode"] == "churn" else ("req/s", "sends")
        parts.append(f"target rate NOT met: {r.achieved_rate:.1f} of {r.target_rate:g} {unit}, "
                     f"{r.backlog} of {r.scheduled} scheduled {what} never went out")
    return "; ".join(parts) or "ok"


def _target_label(t: TargetResult) -> str:
    return t.address + (t.path if t.protocol == "http" else "")


def format_report(r: LoadResult) -> str:
    """A few lines in wrk's spirit (and a line per target when there are several)."""
    s = r.spec
    protocols = sorted({t.protocol for t in r.targets})
    what = "/".join(p + (f" {s['size']}B" if p == "echo" else "") for p in protocols)
    churn_unit = "conn/s" if s["mode"] == "churn" else "req/s"
    mode = {"closed": f"closed loop, depth {s['depth']}",
            "open": f"open loop at {s['rate']:g} req/s, depth cap {s['depth']}",
            "churn": f"churn at {s['rate']:g} conn/s, at most {s['connections']} in flight"
            if s["rate"] else "churn"}[s["mode"]]
    rpc = s.get("requests_per_conn", 1)
    if s["mode"] == "churn":
        mode += (f", {rpc} requests per connection" if rpc > 1 else
                 "" if s["rate"] else " (one request per connection)")
    where = ", ".join(_target_label(t) for t in r.targets)
    lines = [
        f"Running {s['duration']:g}s test @ {where} ({what}, {mode}, warm-up {s['warmup']:g}s)"
        + (f" in netns {s['netns']}" if s.get("netns") else ""),
        f"  {s['threads']} thread(s) and {s['connections']} connections"
        + (f" on CPUs {','.join(map(str, s['cpus']))}" if s["cpus"] else ""),
        "  Latency " + "".join(f"{k:>10}" for k in list(r.latency) + ["max"]),
        "          " + "".join(f"{_fmt_us(v):>10}" for v in list(r.latency.values())
                               + [r.latency_max_us]),
        f"  {r.requests} requests in {r.elapsed:.2f}s, {_fmt_bytes(r.bytes_received)} read",
        f"Requests/sec: {r.rps:10.2f}",
        f"Transfer/sec: {_fmt_bytes(r.bytes_received / r.elapsed if r.elapsed else 0):>10}",
    ]
    if len(r.targets) > 1:
        w = max(len(_target_label(t)) for t in r.targets) + 7
        lines.append(f"  {'target':<{w}} {'requests':>9} {'errors':>7} {'non2xx':>7} "
                     f"{'p50':>9} {'p99':>9} {'max':>9}")
        for t in r.targets:
            lines.append(f"  {_target_label(t) + ' (' + t.protocol + ')':<{w}} {t.requests:>9} "
                         f"{sum(t.errors.values()):>7} {t.non2xx:>7} "
                         f"{_fmt_us(t.latency['p50']):>9} {_fmt_us(t.latency['p99']):>9} "
                         f"{_fmt_us(t.latency_max_us):>9}")
    if r.classes is not None:
        lines.append(f"  Service time asked for: {r.work_us / 1e3:.1f}ms in all"
                     + (f", mean {r.work_us / r.requests:.1f}us/request" if r.requests else "")
                     + f" (seed {s.get('seed')})")
        lines.append(f"  {'class':<7} {'service':<24} {'conns':>5} {'requests':>9} "
                     f"{'mean US':>8} {'p50':>9} {'p99':>9} {'max':>9}")
        for name, c in r.classes.items():
            if name == "heavy" and not c.connections:
                continue
            mean = f"{c.work_mean_us:.1f}" if c.work_mean_us is not None else "-"
            lines.append(f"  {name:<7} {c.service or '(path ' + s['path'] + ')':<24} "
                         f"{c.connections:>5} {c.requests:>9} {mean:>8} "
                         f"{_fmt_us(c.latency['p50']):>9} {_fmt_us(c.latency['p99']):>9} "
                         f"{_fmt_us(c.latency_max_us):>9}")
    if r.per_connection and not (s["mode"] == "churn" and s["rate"]):
        # (at a rate, slots are interchangeable: completions per slot say nothing)
        lines.append(f"  Per connection: min {min(r.per_connection)}, max {max(r.per_connection)}, "
                     f"Jain {fmt_jain(r.jain)}")
    if s["mode"] == "churn" or r.connects > s["connections"]:
        lines.append(f"  Connects: {r.connects}")
    if r.client_cpu_us_per_req is not None:
        if s["mode"] != "churn":
            per = f"{r.client_cpu_us_per_req:.2f}us/request"
        elif rpc > 1:
            per = (f"{r.client_cpu_us_per_conn:.2f}us/connection, "
                   f"{r.client_cpu_us_per_req:.2f}us/request")
        else:
            per = f"{r.client_cpu_us_per_conn:.2f}us/connection"
        lines.append(f"  Client CPU: {per} "
                     f"(user {r.client_cpu_user_s:.2f}s, sys {r.client_cpu_sys_s:.2f}s)")
    if r.target_rate:
        drain = r.elapsed - s["duration"]
        lines.append(f"  Target {r.target_rate:g} {churn_unit}, achieved {r.achieved_rate:.1f} "
                     f"{churn_unit}, {r.backlog} of {r.scheduled} scheduled never went out"
                     + (f", last answer {drain * 1e3:.1f}ms after the window" if drain > 0 else "")
                     + ": " + ("met" if r.rate_met else "NOT MET"))
    if "http" in protocols:
        lines.append(f"  Non-2xx responses: {r.non2xx}")
    if not r.ok:
        lines.append(f"  {_problems(r)}")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------

def _duration(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 10, 10s, 500ms, 2m)")
    return float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


#: The longest duration (warm-up, timeout) the command line takes.
MAX_SECONDS = 7 * 86400.0


def _duration_of(flag: str, positive: bool):
    """A duration flag: ``_duration`` within 0..MAX_SECONDS (``positive``: above 0)."""
    def parse(text: str) -> float:
        try:
            value = _duration(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"{flag} is not a duration: {text!r} (e.g. 10, 10s, 500ms, 2m)") from None
        if value > MAX_SECONDS or (positive and value <= 0):
            lo = "above 0" if positive else "0"
            raise argparse.ArgumentTypeError(
                f"{flag} must be {lo} up to {MAX_SECONDS / 86400:g} days, got {text!r}")
        return value
    parse.__name__ = "duration"
    return parse


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmM]?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--size is not a size: {text!r} (e.g. 64, 4k, 1m)")
    value = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if not 1 <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"--size must be 1..{MAX_SIZE} bytes (64m), got {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"--rate must be 0 or more (per second), got {text!r}")
    return value


#: What ``--json -`` prints on stderr the moment the generator starts (the caller on the
#: other end of an ssh connection takes it as the start of the warm-up).
STARTED = "parallelnet loadgen: started"


def _json_path(text: str) -> str:
    """--json: checked before the run (a result that cannot be written is refused then,
    not after the whole measurement); ``-`` is standard output."""
    from parallelnet.core.cli import output_file   # serve's check of --stats-json

    return text if text == "-" else output_file("--json")(text)


def parse_target(target: str) -> tuple[str, int, str | None]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``http://HOST[:PORT]/path`` -> (host, port, path);
    path is None for a bare address (echo unless told otherwise)."""
    if "://" in target:
        u = urlsplit(target)
        if u.scheme != "http":
            raise ValueError(f"only http:// URLs are supported, got {u.scheme}://")
        if not u.hostname:
            raise ValueError(f"no host in {target!r}")
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        return u.hostname, u.port or 80, path
    m = re.fullmatch(r"\[([0-9a-fA-F:.%\w]+)\]:(\d+)|([^:\[\]]+):(\d+)", target)
    if not m:
        raise ValueError(f"target must be HOST:PORT, [IPv6]:PORT or http://HOST:PORT/path, "
                         f"got {target!r}")
    host = m.group(1) or m.group(3)
    return host, int(m.group(2) or m.group(4)), None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``parallelnet loadgen``, wrk-style."""
    from parallelnet.core.cli import cpu_list, int_in   # serve's own argument types

    parser.description = (
        "Drive one or more servers with the C load generator: N pinned threads, each with "
        "its own epoll and share of the connections (spread over the targets round robin). "
        "Closed loop (depth requests in flight per connection), open loop at a fixed total "
        "rate (latency from the intended send time, as wrk2), or churn (connect, "
        "--requests-per-conn requests, close), closed or, with --rate, at a fixed connect "
        "rate.  --service makes HTTP requests ask the server for drawn service times.")
    parser.add_argument("target", nargs="+",
                        help="HOST:PORT (echo unless --protocol http), [::1]:PORT, or "
                             "http://HOST:PORT/path; several: connection i goes to the "
                             "(i mod n)-th")
    parser.add_argument("-c", "--connections", type=int_in("--connections", 1, 1_000_000),
                        default=16, metavar="N",
                        help="connections to keep open (default 16)")
    parser.add_argument("-t", "--threads", type=int_in("--threads", 1, 1024), default=1, metavar="N",
                        help="threads to use (default 1)")
    parser.add_argument("-d", "--duration", type=_duration_of("--duration", True), default=5.0, metavar="T",
                        help="measured duration, e.g. 10s, 2m (default 5s)")
    parser.add_argument("-R", "--rate", type=_rate, default=0.0,
                        metavar="RATE",
                        help="open loop: total requests/sec (implies --mode open); with "
                             "--mode churn: total connections/sec (default 0: closed loop)")
    parser.add_argument("--depth", type=int_in("--depth", 1, MAX_DEPTH), default=1, metavar="N",
                        help="requests in flight per connection (pipelining; default 1)")
    parser.add_argument("--size", type=_size, default=64, metavar="BYTES",
                        help="echo message size, e.g. 64, 4k (default 64)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="closed (default), open (needs --rate) or churn "
                             "(closed, or at --rate connections/s)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None,
                        help="echo or http (default: http for http:// targets or with "
                             "--service/--heavy-conns, else echo)")
    parser.add_argument("--cpus", type=cpu_list, default=None, metavar="LIST",
                        help="pin thread i to the i-th CPU of this list, e.g. 1 or 2-3")
    parser.add_argument("--warmup", type=_duration_of("--warmup", False), default=1.0, metavar="T",
                        help="unrecorded warm-up before the measurement (default 1s)")
    parser.add_argument("--max-requests", type=int_in("--max-requests", 0, 2**63 - 1), default=0,
                        metavar="N",
                        help="stop after this many measured requests (default: no cap)")
    parser.add_argument("--timeout", type=_duration_of("--timeout", True), default=5.0, metavar="T",
                        help="connect and response timeout (default 5s)")
    parser.add_argument("--no-abort", action="store_true",
                        help="count echo mismatches but keep going")
    parser.add_argument("--service", metavar="SPEC", default=None,
                        help="HTTP: send GET /work/US with US (microseconds of server CPU) "
                             "drawn per request from SPEC: fixed:US, exp:MEAN, "
                             "bimodal:P:US1:US2 (US1 with probability P, else US2), "
                             "lognormal:MEAN:SIGMA (mean of the distribution, sigma of the "
                             "underlying normal); rounded to whole us")
    parser.add_argument("--heavy-conns", metavar="K:SPEC", default=None,
                        help="HTTP: the first K connections (churn at a rate: slots) draw "
                             "from SPEC instead (e.g. 2:fixed:5000); the result splits "
                             "light and heavy")
    parser.add_argument("--requests-per-conn", metavar="M", default=1,
                        type=int_in("--requests-per-conn", 1, MAX_REQUESTS_PER_CONN),
                        help="churn: requests per connection, one after the other, before "
                             "it closes (default 1); the first one's latency counts from "
                             "the connect, later ones' from their send")
    parser.add_argument("--seed", type=int_in("--seed", 0, 2**64 - 1), default=1, metavar="N",
                        help="seed of the service-time draws (default 1): same seed, same "
                             "draws on each connection")
    parser.add_argument("--netns", metavar="NAME", default=None,
                        help="run the client inside network namespace NAME "
                             "(/run/netns/NAME; root needed)")
    parser.add_argument("--json", metavar="PATH", default=None, type=_json_path,
                        help="also write the full result (histogram included) as JSON; the "
                             "path is checked before the run (its directory must exist); "
                             "'-': the JSON on stdout, the report on stderr (what an "
                             "experiment's --client ssh://... runs on the client host)")


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    given = [args.target] if isinstance(args.target, str) else list(args.target)
    targets = []
    for text in given:
        host, port, path = parse_target(text)
        # (service times exist only over HTTP: --service makes a bare address HTTP)
        wants_http = path is not None or bool(getattr(args, "service", None)
                                              or getattr(args, "heavy_conns", None))
        protocol = args.protocol or ("http" if wants_http else "echo")
        if path is not None and protocol != "http":
            raise ValueError(f"an http:// target implies --protocol http ({text})")
        targets.append(Target(host, port, protocol, path or "/"))
    mode = args.mode or ("open" if args.rate else "closed")
    common = dict(mode=mode, connections=args.connections, threads=args.threads,
                  cpus=args.cpus, size=args.size, depth=args.depth, rate=args.rate,
                  duration=args.duration, warmup=args.warmup, max_requests=args.max_requests,
                  timeout=args.timeout, abort_on_mismatch=not args.no_abort,
                  netns=getattr(args, "netns", None), service=getattr(args, "service", None),
                  heavy=getattr(args, "heavy_conns", None),
                  requests_per_conn=getattr(args, "requests_per_conn", 1),
                  seed=getattr(args, "seed", 1))
    if len(targets) == 1:
        t = targets[0]
        spec = LoadSpec(host=t.host, port=t.port, protocol=t.protocol, path=t.path, **common)
    else:
        spec = LoadSpec(targets=targets, **common)
    spec.validate()
    return spec


def _hint(message: str, spec: LoadSpec) -> str | None:
    """A likely cause of a failed run the user can fix, in one line (or None)."""
    message = message or ""
    if "echo mismatch" in message and any(t.protocol == "echo" for t in spec.resolved_targets()):
        said = "" if "got 0x48" not in message else " (it answered 'H', as in 'HTTP/1.1')"
        return (f"the server did not echo{said}: if it speaks HTTP, give an "
                f"http://HOST:PORT/ URL or --protocol http")
    return None


def main_from_args(args: argparse.Namespace) -> int:
    """Run from parsed arguments; 0 ok, 1 the run failed (abort, errors, rate not met,
    nothing completed, the result could not be written), 2 bad arguments."""
    prog = "parallelnet loadgen"
    try:
        spec = spec_from_args(args)
        to_stdout = args.json == "-"
        if args.json:
            try:
                _json_path(args.json)    # again: args need not come from our parser
            except argparse.ArgumentTypeError as exc:
                raise ValueError(str(exc)) from None
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if to_stdout:
        print(STARTED, file=sys.stderr, flush=True)
    try:
        result = run(spec)
    except (RuntimeError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        hint = _hint(str(exc), spec)
        if hint:
            print(f"{prog}: hint: {hint}", file=sys.stderr)
        return 1
    print(format_report(result), file=sys.stderr if to_stdout else sys.stdout)
    hint = _hint(result.message, spec) if not result.ok else None
    if hint:
        print(f"{prog}: hint: {hint}", file=sys.stderr)
    if to_stdout:
        json.dump(result.to_dict(), sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
    elif args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result.to_dict(), f, indent=1)
                f.write("\n")
        except OSError as exc:
            print(f"{prog}: --json {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 0 if result.ok and result.requests else 1


def main(argv: list[str] | None = None) -> int:
    """drive a server with the C load generator (see: parallelnet loadgen -h)"""
    from parallelnet.core.cli import DefaultsOnce, OneLineParser  # one line per mistake

    parser = OneLineParser(prog="parallelnet loadgen", formatter_class=DefaultsOnce)
    add_arguments(parser)
    try:
        return main_from_args(parser.parse_args(argv))
    except KeyboardInterrupt:
        print("parallelnet loadgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
