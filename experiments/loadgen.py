"""Python face of the C load generator (``loadgen.c`` via the cffi module ``_loadgen``).

One :func:`run` call hands a :class:`LoadSpec` to C, which runs the whole test on its
own pinned pthreads with the GIL released, and returns a :class:`LoadResult`.  The
measured figures mean:

* ``requests``: responses completed whose request *started* in the measured window
  (after ``warmup``, before ``warmup + duration``).  Start = actual send (closed loop),
  intended send time on the fixed schedule (open loop, so a stalled server cannot hide
  its stall: the latency includes the time the request should already have been out),
  connect start (churn: the handshake is part of each request).
* ``elapsed``: from the start of the measured window until the last worker thread
  finished, i.e. the window plus the drain of requests still in flight (at most
  ``timeout``); ``rps = requests / elapsed``.
* ``errors``: counted per failure *event* on a connection (a reset loses everything in
  flight on it but counts once), over the whole run, warm-up included.  The connection
  reconnects with an exponential back-off.  ``non2xx`` responses are not errors.
* ``client_cpu_*``: CPU time of the generator's own threads over the measured window
  (``getrusage(RUSAGE_THREAD)`` deltas), so other threads in this process, e.g. a
  Python test server, are not charged to the client.
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
from dataclasses import dataclass
from urllib.parse import urlsplit

from parallelnet.core.stats import fmt_jain, jain_index

PROTOCOLS = ("echo", "http")
MODES = ("closed", "open", "churn")
#: Error kinds, in the order of ``LG_E_*`` in loadgen.c.
ERROR_KINDS = ("connect_refused", "connect_timeout", "reset", "read_timeout", "eof",
               "echo_mismatch", "http_parse", "other")
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)
MAX_SIZE = 64 * 1024 * 1024
MAX_DEPTH = 4096


def _lib():
    try:
        from parallelnet.experiments._loadgen import ffi, lib
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise ImportError("the C load generator is not built; reinstall the project "
                          "(pip install -e .) so setup.py's cffi_modules compiles it") from exc
    return ffi, lib


@dataclass
class LoadSpec:
    """What to run.  ``rate`` is the total request rate of the open loop (req/s),
    spread evenly over the connections; ``depth`` is the number of requests in flight
    per connection (closed loop) or the cap on them (open loop: 1 behaves like wrk2,
    more lets a connection pipeline to catch up)."""

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

        if not isinstance(self.host, str) or not self.host:
            raise ValueError("host must be a non-empty string")
        integer("port", 1, 65535)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        integer("connections", 1)
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
        if self.mode != "open" and self.rate:
            raise ValueError(f"rate is only for mode='open' (mode is {self.mode!r})")
        number("duration", 0, strict=True)
        number("warmup", 0, strict=False)
        number("timeout", 0, strict=True)
        integer("max_requests", 0)
        if not isinstance(self.path, str) or not self.path.startswith("/") \
                or re.search(r"[\x00-\x20\x7f]", self.path):
            raise ValueError(f"path must start with '/' and contain no spaces or control "
                             f"characters, got {self.path!r}")
        try:
            socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve host {self.host!r}: {exc}") from None


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
    rate_met: bool                             # always True without a target (not open)
    scheduled: int                             # open loop: sends due in the window
    backlog: int                               # open loop: of those, never sent
    client_cpu_user_s: float
    client_cpu_sys_s: float
    client_cpu_us_per_req: float | None
    aborted: bool
    message: str = ""

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
        if math.isnan(d["jain"]):
            d["jain"] = None                    # undefined; strict JSON has no NaN
        d["errors_total"] = self.errors_total
        d["ok"] = self.ok
        return d


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
        rank = max(1, math.ceil(p / 100.0 * total))
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
    """Run one load test; blocks (GIL released) for about warmup + duration."""
    spec.validate()
    ffi, lib = _lib()
    _ensure_fd_limit(spec.connections + 64)

    keep = []                                  # cdata that must outlive the call
    cfg = ffi.new("struct lg_config *")
    host = ffi.new("char[]", spec.host.encode())
    path = ffi.new("char[]", spec.path.encode())
    keep += [host, path]
    cfg.host, cfg.path, cfg.port = host, path, spec.port
    cfg.protocol = lib.LG_ECHO if spec.protocol == "echo" else lib.LG_HTTP
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

    nb = lib.lg_hist_buckets()
    res = ffi.new("struct lg_result *")
    hist = ffi.new("uint64_t[]", nb)
    per_conn = ffi.new("uint64_t[]", spec.connections)
    res.hist, res.per_conn = hist, per_conn

    rc = lib.lg_run(cfg, res)
    message = ffi.string(res.message).decode(errors="replace")
    if rc != 0:
        raise RuntimeError(f"load generator failed: {message or 'unknown error'}")

    buckets = [((lib.lg_hist_low(i) + lib.lg_hist_high(i)) // 2, hist[i])
               for i in range(nb) if hist[i]]
    requests = res.requests
    lat = percentiles_from_histogram(buckets, lo=res.min_ns, hi=res.max_ns)
    mean = sum(v * c for v, c in buckets) / requests / 1000.0 if requests else 0.0
    per = [per_conn[i] for i in range(spec.connections)]
    elapsed = res.elapsed
    rps = requests / elapsed if elapsed > 0 else 0.0
    errors = {kind: res.errors[i] for i, kind in enumerate(ERROR_KINDS)}
    target = float(spec.rate) if spec.mode == "open" else 0.0
    if spec.mode == "open":
        rate_met = (not res.aborted and rps >= 0.99 * target
                    and res.backlog * 100 <= res.scheduled)
    else:
        rate_met = True
    cpu = res.cpu_user + res.cpu_sys
    return LoadResult(
        spec=dataclasses.asdict(spec),
        requests=requests, bytes_sent=res.bytes_sent, bytes_received=res.bytes_received,
        elapsed=elapsed, rps=rps, latency=lat,
        latency_min_us=res.min_ns / 1000.0, latency_mean_us=mean,
        latency_max_us=res.max_ns / 1000.0, histogram=buckets, per_connection=per,
        jain=jain_index(per), errors=errors, non2xx=res.non2xx, connects=res.connects,
        target_rate=target, achieved_rate=rps, rate_met=rate_met,
        scheduled=res.scheduled, backlog=res.backlog,
        client_cpu_user_s=res.cpu_user, client_cpu_sys_s=res.cpu_sys,
        client_cpu_us_per_req=cpu * 1e6 / requests if requests else None,
        aborted=bool(res.aborted), message=message,
    )


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
        parts.append(f"target rate NOT met: {r.achieved_rate:.1f} of {r.target_rate:g} req/s, "
                     f"{r.backlog} of {r.scheduled} scheduled sends never went out")
    return "; ".join(parts) or "ok"


def format_report(r: LoadResult) -> str:
    """A few lines in wrk's spirit."""
    s = r.spec
    target = f"{s['host']}:{s['port']}" + (s["path"] if s["protocol"] == "http" else "")
    what = f"{s['protocol']}" + (f" {s['size']}B" if s["protocol"] == "echo" else "")
    mode = {"closed": f"closed loop, depth {s['depth']}",
            "open": f"open loop at {s['rate']:g} req/s, depth cap {s['depth']}",
            "churn": "churn (one request per connection)"}[s["mode"]]
    lines = [
        f"Running {s['duration']:g}s test @ {target} ({what}, {mode}, warm-up {s['warmup']:g}s)",
        f"  {s['threads']} thread(s) and {s['connections']} connections"
        + (f" on CPUs {','.join(map(str, s['cpus']))}" if s["cpus"] else ""),
        "  Latency " + "".join(f"{k:>10}" for k in list(r.latency) + ["max"]),
        "          " + "".join(f"{_fmt_us(v):>10}" for v in list(r.latency.values())
                               + [r.latency_max_us]),
        f"  {r.requests} requests in {r.elapsed:.2f}s, {_fmt_bytes(r.bytes_received)} read",
        f"Requests/sec: {r.rps:10.2f}",
        f"Transfer/sec: {_fmt_bytes(r.bytes_received / r.elapsed if r.elapsed else 0):>10}",
    ]
    if r.per_connection:
        lines.append(f"  Per connection: min {min(r.per_connection)}, max {max(r.per_connection)}, "
                     f"Jain {fmt_jain(r.jain)}")
    if s["mode"] == "churn" or r.connects > s["connections"]:
        lines.append(f"  Connects: {r.connects}")
    if r.client_cpu_us_per_req is not None:
        lines.append(f"  Client CPU: {r.client_cpu_us_per_req:.2f}us/request "
                     f"(user {r.client_cpu_user_s:.2f}s, sys {r.client_cpu_sys_s:.2f}s)")
    if s["mode"] == "open":
        lines.append(f"  Target {r.target_rate:g} req/s, achieved {r.achieved_rate:.1f} req/s: "
                     + ("met" if r.rate_met else "NOT MET"))
    if s["protocol"] == "http":
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


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmM]?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64, 4k, 1m)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def _cpus(text: str) -> list[int]:
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r} (e.g. 1 or 0,2 or 0-3)") from None
    return out


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
    parser.description = (
        "Drive a server with the C load generator: N pinned threads, each with its own "
        "epoll and share of the connections.  Closed loop (depth requests in flight per "
        "connection), open loop at a fixed total rate (latency from the intended send "
        "time, as wrk2), or churn (connect, one request, close).")
    parser.add_argument("target", help="HOST:PORT (echo), [::1]:PORT, or http://HOST:PORT/path")
    parser.add_argument("-c", "--connections", type=int, default=16,
                        help="connections to keep open (default 16)")
    parser.add_argument("-t", "--threads", type=int, default=1,
                        help="threads to use (default 1)")
    parser.add_argument("-d", "--duration", type=_duration, default=5.0,
                        help="measured duration, e.g. 10s, 2m (default 5s)")
    parser.add_argument("-R", "--rate", type=float, default=0.0,
                        help="open loop: total requests/sec (implies --mode open)")
    parser.add_argument("--depth", type=int, default=1,
                        help="requests in flight per connection (pipelining; default 1)")
    parser.add_argument("--size", type=_size, default=64,
                        help="echo message size, e.g. 64, 4k (default 64)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="closed (default), open (needs --rate) or churn")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None,
                        help="echo or http (default: http for http:// targets, else echo)")
    parser.add_argument("--cpus", type=_cpus, default=None,
                        help="pin thread i to the i-th CPU of this list, e.g. 1 or 2-3")
    parser.add_argument("--warmup", type=_duration, default=1.0,
                        help="unrecorded warm-up before the measurement (default 1s)")
    parser.add_argument("--max-requests", type=int, default=0,
                        help="stop after this many measured requests (default: no cap)")
    parser.add_argument("--timeout", type=_duration, default=5.0,
                        help="connect and response timeout (default 5s)")
    parser.add_argument("--no-abort", action="store_true",
                        help="count echo mismatches but keep going")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the full result (histogram included) as JSON")


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    host, port, path = parse_target(args.target)
    protocol = args.protocol or ("http" if path is not None else "echo")
    if path is not None and protocol != "http":
        raise ValueError("an http:// target implies --protocol http")
    mode = args.mode or ("open" if args.rate else "closed")
    spec = LoadSpec(host=host, port=port, protocol=protocol, mode=mode,
                    connections=args.connections, threads=args.threads, cpus=args.cpus,
                    size=args.size, depth=args.depth, rate=args.rate, duration=args.duration,
                    warmup=args.warmup, max_requests=args.max_requests, path=path or "/",
                    timeout=args.timeout, abort_on_mismatch=not args.no_abort)
    spec.validate()
    return spec


def main_from_args(args: argparse.Namespace) -> int:
    """Run from parsed arguments; 0 ok, 1 the run failed (abort, errors, rate not met,
    nothing completed), 2 bad arguments."""
    try:
        spec = spec_from_args(args)
    except ValueError as exc:
        print(f"loadgen: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(spec)
    except (RuntimeError, ValueError) as exc:
        print(f"loadgen: error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=1)
            f.write("\n")
    return 0 if result.ok and result.requests else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parallelnet loadgen")
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
