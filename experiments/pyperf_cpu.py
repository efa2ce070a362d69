"""Server CPU per request, driven by pyperf's own machinery (worker processes, calibration).

    flock /tmp/bench.lock python -m parallelnet.experiments.pyperf_cpu \\
        [--backends uring epoll] [--connections 16] [--fast | --rigorous | -p 10 ...] [-o FILE]
    python -m pyperf stats results/<timestamp>-pyperf_cpu/pyperf.json

Without ``-o`` the JSON goes to ``results/<timestamp>-pyperf_cpu/pyperf.json`` (with the
usual ``meta.json``); at the end the main process prints each backend's median and MAD
and its ratio to the last backend listed (the baseline, ``epoll`` by default).  For
pyperf's significance test, run one backend per file and ``pyperf compare_to a.json b.json``.

The other experiments run the load in windows and keep their own statistics; this one
hands the loop to ``pyperf.Runner``: pyperf spawns the worker processes, calibrates the
number of loops, takes warm-ups and values, checks stability and writes its JSON, so
``pyperf stats``/``compare_to``/``hist`` apply as they do to any Python benchmark.

One *loop* is one request.  ``bench_time_func`` calls ``server_cpu(loops)``, which runs
the C load generator (closed loop, 64-byte echo, ``--connections`` connections, its
threads on the last CPU) for exactly ``loops`` requests against a server that this pyperf
worker process started once (``--cpus 0 --workers 1``, thread mode), and returns the CPU
the *server process* spent meanwhile - every thread, from ``/proc/PID/task/*/schedstat``
(ns) - not wall time.  pyperf divides by ``loops``: seconds of server CPU per request.
Each call also opens and closes its connections; with the default ``--min-time 0.3`` (of
server CPU per value) that set-up is well under 1% of a value.

Pinning: the server process is confined to the first CPU, the load generator's threads
to the last, pyperf's own worker process is left where the kernel puts it (it only waits).
"""

from __future__ import annotations

import atexit
import os
import sys

import pyperf

from parallelnet.core.launch import spawn_server
from parallelnet.experiments.noise import process_cpu_ns

ALL_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU, CLIENT_CPU = ALL_CPUS[0], ALL_CPUS[-1]
_servers: dict[str, tuple] = {}   # backend -> (process, host, port), one per pyperf worker


def _server(backend: str):
    if backend not in _servers:
        proc, host, port = spawn_server(
            ["--backend", backend, "--cpus", str(SERVER_CPU), "--workers", "1", "--message-size", "64"],
            merge_stderr=True, preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CPU}))
        _servers[backend] = (proc, host, port)
        atexit.register(_stop, proc)
    return _servers[backend]


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()   # ours, by PID: drains and exits
    try:
        proc.communicate(timeout=30)
    except Exception:  # noqa: BLE001 - last resort at exit
        proc.kill()
        proc.communicate()


def server_cpu(loops: int, backend: str, connections: int) -> float:
    """Seconds of server CPU for ``loops`` requests (pyperf's time function)."""
    from parallelnet.experiments.loadgen import LoadSpec, run

    proc, host, port = _server(backend)
    conns = max(1, min(connections, loops))
    spec = LoadSpec(host=host, port=port, mode="closed", connections=conns, cpus=[CLIENT_CPU],
                    size=64, warmup=0.0, duration=600.0, max_requests=loops)
    before = process_cpu_ns(proc.pid)
    res = run(spec)
    after = process_cpu_ns(proc.pid)
    if res.errors_total or res.requests != loops:
        raise RuntimeError(f"{backend}: {res.requests}/{loops} requests, errors {res.errors}")
    return (after - before) / 1e9


def add_cmdline_args(cmd: list[str], args) -> None:
    cmd.extend(["--backends", *args.backends, "--connections", str(args.connections)])


def main() -> None:
    runner = pyperf.Runner(min_time=0.3, processes=10, values=3, warmups=1,
                           program_args=("-m", "parallelnet.experiments.pyperf_cpu"),
                           add_cmdline_args=add_cmdline_args)
    runner.argparser.add_argument("--backends", nargs="+", default=["uring", "epoll"])
    runner.argparser.add_argument("--connections", type=int, default=16)
    args = runner.parse_args()
    if not args.worker and not args.output:
        from parallelnet.experiments import framework, provenance

        outdir = framework.result_dir("pyperf_cpu", None, "results")
        framework.write_meta(outdir, provenance.collect("pyperf_cpu", None, {"params": {
            "backends": args.backends, "connections": args.connections}}))
        args.output = os.path.join(outdir, "pyperf.json")
    runner.metadata["server_cpu"] = str(SERVER_CPU)
    runner.metadata["client_cpu"] = str(CLIENT_CPU)
    runner.metadata["unit_meaning"] = "seconds of server-process CPU per request"
    benches = [runner.bench_time_func(f"{b}-c{args.connections}", server_cpu, b, args.connections)
               for b in args.backends]
    if args.worker or any(b is None for b in benches):
        return 0   # a worker process (or a benchmark pyperf skipped): the parent reports
    base = benches[-1].median()
    print(f"\n{'benchmark':16s} {'median us/req':>13s} {'MAD':>6s} {'x ' + args.backends[-1]:>8s}")
    for b in benches:
        print(f"{b.get_name():16s} {b.median() * 1e6:13.2f} {b.median_abs_dev() * 1e6:6.2f} "
              f"{b.median() / base:8.3f}")
    print(f"\npyperf JSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
