"""``parallelnet``: serve, list backends, run the demo.

    parallelnet serve --backend epoll --workers 2 --protocol http --port 0
    parallelnet serve --listen 127.0.0.1:8080 --listen [::1]:8081,protocol=http
    parallelnet backends
    parallelnet demo            # what ``make run`` does

Subcommands that drive load import their client lazily, so the server itself never
depends on experiment code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from parallelnet.core.addresses import format_listening, parse_listen
from parallelnet.core.backend import REUSEPORT, SHARED, BackendError, Limits, registry
from parallelnet.core.cpus import parse_cpu_list
from parallelnet.core.dispatch import POLICIES
from parallelnet.core.listeners import STRATEGIES, SocketBuffers, is_loopback, layout_of
from parallelnet.core.protocols import PROTOCOLS
from parallelnet.core.server import MODES, Server, ServerConfig
from parallelnet.core.stats import (
    Fairness, add_observable, fmt_observable, format_table, listener_totals,
)
from parallelnet.core.stopping import StopRequest

ACCEPT_HELP = {
    SHARED: "one listening socket in every worker's loop; workers race to accept (the seed)",
    "exclusive": "the shared socket registered with EPOLLEXCLUSIVE: the kernel wakes one waiter",
    REUSEPORT: "one SO_REUSEPORT socket per worker; the kernel hashes connections to them",
    "reuseport-cpu": "SO_REUSEPORT steered by a cBPF program to the worker on the CPU "
                     "that processes the SYN (on loopback: the client's CPU)",
    "exclusive-rotate": "exclusive, each worker re-adding the listener every 16 accepts "
                        "(nginx's fix for EPOLLEXCLUSIVE's head-of-queue bias)",
    "dispatch": "one acceptor thread hands each connection to a worker by --dispatch-policy "
                "(no race, active balancing)",
}


def _cpu_list(text: str) -> list[int]:
    try:
        return parse_cpu_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen(text: str):
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    backends = registry()
    p.add_argument("--backend", default="epoll", choices=list(backends),
                   help="event loop of each worker (default: epoll)")
    p.add_argument("--workers", type=int, default=None,
                   help="number of workers (default: one per CPU in the affinity mask)")
    p.add_argument("--cpus", type=_cpu_list, default=None,
                   help="CPUs to pin workers to, e.g. 0,1 or 0-3 (default: the affinity mask)")
    p.add_argument("--no-pin", action="store_true", help="do not pin workers to CPUs")
    p.add_argument("--protocol", default="echo", choices=sorted(PROTOCOLS),
                   help="what --host/--port serves, and every --listen without protocol=")
    p.add_argument("--message-size", type=int, default=0,
                   help="echo: count one request per this many bytes (default: per read)")
    p.add_argument("--accept", default=SHARED, choices=list(STRATEGIES),
                   help="; ".join(f"{k}: {v}" for k, v in ACCEPT_HELP.items()))
    p.add_argument("--dispatch-policy", default="round-robin", choices=list(POLICIES),
                   help="--accept dispatch: how the acceptor picks a worker")
    p.add_argument("--dispatch-cpu", type=int, default=None,
                   help="--accept dispatch: pin the acceptor thread to this CPU (default: unpinned)")
    p.add_argument("--mode", default="thread", choices=list(MODES),
                   help="workers as threads of one process, or forked processes sharing the socket")
    p.add_argument("--listen", action="append", type=_listen, default=None,
                   metavar="ADDR:PORT[,protocol=NAME]",
                   help="an address to listen on, repeatable: 127.0.0.1:8080, [::1]:8080 "
                        "(port 0: a free one), each with its own protocol if given; every "
                        "worker's loop watches all of them (listener id = the order given). "
                        "Instead of --host/--port")
    p.add_argument("--host", default=None,
                   help=f"address to bind, the one-listener shorthand (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None,
                   help=f"port (0: pick a free one; default {DEFAULT_PORT})")
    p.add_argument("--allow-remote", action="store_true",
                   help="permit binding a non-loopback address (printed as a warning)")
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--sndbuf", type=int, default=None, metavar="BYTES",
                   help="fixed SO_SNDBUF of every connection, set on the listeners and inherited "
                        "(the kernel doubles it, capped by net.core.wmem_max; default: autotuning)")
    p.add_argument("--rcvbuf", type=int, default=None, metavar="BYTES",
                   help="fixed SO_RCVBUF of every connection, likewise (net.core.rmem_max)")
    lim = Limits()
    p.add_argument("--max-output", type=int, default=lim.max_output,
                   help="pending output per connection before reading pauses (bytes)")
    p.add_argument("--max-connections", type=int, default=lim.max_connections,
                   help="connections per worker; more are closed at once and counted")
    p.add_argument("--drain-timeout", type=float, default=lim.drain_timeout,
                   help="seconds to finish responses after a stop signal")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help=f"close a connection with no bytes in or out for S seconds "
                        f"(default {lim.idle_timeout:g}; 0: never)")
    p.add_argument("--header-timeout", type=float, default=None,
                   help=f"close a connection whose request is still incomplete S seconds after "
                        f"its first byte, however steadily it trickles (default "
                        f"{lim.header_timeout:g}; 0: never)")
    p.add_argument("--header-min-rate", type=float, default=None, metavar="BYTES_PER_S",
                   help="with --header-timeout: each byte of an incomplete request extends its "
                        "deadline by 1/RATE s, so a request arriving at RATE B/s or faster is "
                        "never cut (default 0: off)")
    ARGUMENT_ERRORS.clear()
    for name, cls in backends.items():
        try:
            cls.add_arguments(p)
        except Exception as exc:  # noqa: BLE001 - reported below and when the backend is chosen
            # A broken plugin must not break the CLI for the others, nor pass unnoticed.
            ARGUMENT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
            print(f"warning: backend {name}: add_arguments failed ({ARGUMENT_ERRORS[name]}); "
                  "its options are missing", file=sys.stderr)


#: Backends whose ``add_arguments`` raised: name -> the error (serving them is refused).
ARGUMENT_ERRORS: dict[str, str] = {}


LIMIT_FLAGS = {"idle_timeout": "--idle-timeout", "header_timeout": "--header-timeout",
               "header_min_rate": "--header-min-rate",
               "max_connections": "--max-connections", "max_output": "--max-output"}
_OPTIONAL_LIMITS = ("idle_timeout", "header_timeout", "header_min_rate")   # flags default to None


def _limits_from_args(args: argparse.Namespace) -> Limits:
    """Limits from the flags.  A limit the backend does not enforce (``Backend.unsupported``)
    is refused when given explicitly and disabled, with a warning, when left at its
    default: never ignored silently."""
    lim = Limits(max_output=args.max_output, max_connections=args.max_connections,
                 drain_timeout=args.drain_timeout)
    cls = registry().get(args.backend)
    unsupported = (lambda name: cls.unsupported(name)) if cls is not None else (lambda name: None)
    for name in _OPTIONAL_LIMITS:
        value = getattr(args, name, None)
        if value is not None:
            if value < 0:
                raise ValueError(f"{LIMIT_FLAGS[name]} must be >= 0")
            setattr(lim, name, value)
        elif unsupported(name) and getattr(lim, name):
            setattr(lim, name, 0.0)
            print(f"warning: backend {args.backend} does not enforce {LIMIT_FLAGS[name]} "
                  f"({unsupported(name)}); disabled", file=sys.stderr)
    for name, flag in LIMIT_FLAGS.items():
        why = unsupported(name)
        value = getattr(lim, name)
        explicit = bool(value) if name in _OPTIONAL_LIMITS else value != getattr(Limits(), name)
        if why and explicit:
            raise BackendError(f"backend {args.backend} cannot enforce {flag}: {why}")
    if cls is not None and not cls.follows_policy and getattr(args, "header_timeout", None):
        print(f"warning: backend {args.backend} predates the connection policy: its "
              f"--header-timeout closes a request after S seconds without progress, not S "
              f"seconds after its first byte (docs/faults.md)", file=sys.stderr)
    return lim


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.backend in ARGUMENT_ERRORS:
        raise BackendError(f"backend {args.backend}: its add_arguments failed "
                           f"({ARGUMENT_ERRORS[args.backend]})")
    if args.listen and (args.host is not None or args.port is not None):
        raise ValueError("give the addresses either with --listen or with --host/--port, "
                         "not both")
    # Every listener of a protocol gets its options (make_factory drops what it does not take).
    protocol_options = {}
    if args.message_size:
        protocol_options["message_size"] = args.message_size
    return ServerConfig(
        backend=args.backend, workers=args.workers, cpus=args.cpus, pin=not args.no_pin,
        protocol=args.protocol, protocol_options=protocol_options, accept=args.accept,
        mode=args.mode, host=DEFAULT_HOST if args.host is None else args.host,
        port=DEFAULT_PORT if args.port is None else args.port, listen=args.listen,
        allow_remote=args.allow_remote,
        backlog=args.backlog, buffers=SocketBuffers(args.sndbuf, args.rcvbuf),
        dispatch_policy=args.dispatch_policy,
        dispatch_cpu=args.dispatch_cpu, limits=_limits_from_args(args), options=args)


def totals(snaps: list[dict]) -> dict:
    keys = ("accepted", "lost_races", "wakeups", "listen_wakeups", "requests",
            "bytes_in", "bytes_out", "open", "refused", "errors", "handler_errors")
    out = {k: add_observable(s[k] for s in snaps) for k in keys}   # lost_races may be n/a
    out["cpu_s"] = sum(s["cpu_ns"] for s in snaps) / 1e9
    out["accept_jain"] = Fairness.of(s["accepted"] for s in snaps).jain
    out["request_jain"] = Fairness.of(s["requests"] for s in snaps).jain
    out["per_listener"] = listener_totals(snaps)
    return out


def _interval_line(t: float, snaps: list[dict], prev: dict | None, dt: float) -> str:
    tot = totals(snaps)
    rate = (tot["requests"] - prev["requests"]) / dt if prev and dt > 0 else 0.0
    parts = [f"[{t:7.1f}s] {rate:10.0f} req/s  open {tot['open']:5d}"]
    for s in snaps:
        parts.append(f"w{s['index']}@{s['cpu']} acc {s['accepted']} lost {fmt_observable(s['lost_races'])} "
                     f"req {s['requests']}")
    return " | ".join(parts)


def cmd_serve(args: argparse.Namespace) -> int:
    # Handlers and the stats file come first: a signal that arrives right after
    # "listening on" is printed must already find them in place.
    stop = StopRequest()     # not threading.Event: see core/stopping.py
    signals_seen = []
    server: Server | None = None

    def on_signal(signum, _frame):
        signals_seen.append(signum)
        if len(signals_seen) > 1 and server is not None:
            # A second signal: stop waiting for the drain.
            server.kill()
            os._exit(130)
        stop.request()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    json_out = open(args.stats_json, "w", buffering=1) if args.stats_json else None
    try:
        server = Server(config_from_args(args))
        server.start()
    except (BackendError, ValueError, OSError) as exc:
        print(f"parallelnet serve: {exc}", file=sys.stderr)
        return 2
    for host, _ in server.addresses:
        if not is_loopback(host):
            print(f"WARNING: listening on non-loopback address {host}", file=sys.stderr)
    print(format_listening(server.addresses), flush=True)
    labels = server.listener_labels()
    served = (f"protocol {server.protocols[0].name}" if len(labels) == 1
              else "listeners " + ", ".join(f"{i}: {x}" for i, x in enumerate(labels)))
    print(f"backend {args.backend}, {len(server.cpus)} {args.mode} workers on CPUs "
          f"{','.join(map(str, server.cpus))}, accept {args.accept}, {served}", flush=True)

    interval = args.stats_interval
    deadline = time.monotonic() + args.duration if args.duration else None
    prev, prev_t = None, time.monotonic()
    while not stop.is_set():
        timeout = interval if interval else 0.5
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        stop.wait(timeout)
        if deadline is not None and time.monotonic() >= deadline:
            break
        dead = server.dead_workers()
        if dead:
            # A server missing a worker is not serving what it says: stop, report, fail.
            for i, why in sorted(dead.items()):
                print(f"parallelnet serve: worker {i} died: {why}", file=sys.stderr, flush=True)
            break
        if interval and not stop.is_set():
            now = time.monotonic()
            snaps = server.snapshots()
            print(_interval_line(server.elapsed, snaps, prev, now - prev_t), flush=True)
            if json_out:
                json_out.write(json.dumps({"type": "interval", "t": server.elapsed,
                                           "listeners": labels, "workers": snaps,
                                           "totals": totals(snaps)}) + "\n")
            prev, prev_t = totals(snaps), now

    elapsed = server.elapsed
    clean = server.stop()
    snaps = server.snapshots()
    print(format_table(snaps, elapsed, labels), flush=True)
    dispatcher = server.dispatcher.snapshot() if server.dispatcher else None
    if dispatcher:
        per_listener = ("" if len(labels) == 1 else " (per listener "
                        + "/".join(map(str, dispatcher["accepted_per_listener"])) + ")")
        print(f"dispatcher ({dispatcher['policy']}, {dispatcher.get('channel', 'scm')}): accepted {dispatcher['accepted']}{per_listener}, handed "
              f"{'/'.join(map(str, dispatcher['handed']))}, spilled {dispatcher['spills']}, "
              f"overflow {dispatcher['overflow']}, errors {dispatcher['errors']}", flush=True)
    crashed = [s for s in snaps if s.get("crashed")]
    for s in crashed:
        print(f"worker {s['index']} crashed: {s['crashed']}", file=sys.stderr)
    if not clean:
        print("drain did not finish in time; workers were killed", file=sys.stderr)
    if json_out:
        json_out.write(json.dumps({"type": "final", "t": elapsed, "clean": clean,
                                   "listeners": labels, "workers": snaps, "totals": totals(snaps),
                                   "dispatcher": dispatcher}) + "\n")
        json_out.close()
    return 1 if crashed or server.dead_workers() else 0


def cmd_backends(args: argparse.Namespace) -> int:
    rows = []
    for name, cls in registry().items():
        avail = cls.probe()
        status = "available" if avail else "unavailable"
        why = avail.reason if not avail else avail.detail
        served = getattr(cls, "accept_strategies", ())
        strategies = ",".join(s for s in STRATEGIES if layout_of(s) in served)
        rows.append((name, status, strategies, cls.description, why))
    w = max(len(r[0]) for r in rows)
    for name, status, strategies, desc, why in rows:
        print(f"{name:<{w}}  {status:<11}  {desc}" + (f"  [{why}]" if why else ""))
        print(f"{'':<{w}}  {'':<11}  accept: {strategies}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from parallelnet.core.demo import run_demo  # the small built-in client

    return run_demo(args)


def cmd_loadgen(argv: list[str]) -> int:
    from parallelnet.experiments.loadgen import main as loadgen_main  # lazy: core never needs it

    return loadgen_main(argv)


def cmd_experiments(command: str, argv: list[str]) -> int:
    """experiment / reproduce / compare: handed over unparsed to the experiments package
    (imported only here, so the server never depends on it)."""
    from parallelnet.experiments import cli as experiments_cli

    entry = {"experiment": experiments_cli.main, "reproduce": experiments_cli.reproduce_main,
             "compare": experiments_cli.compare_main}[command]
    return entry(argv)


EXPERIMENT_COMMANDS = {
    "experiment": "run an experiment by name and preset, list them, rebuild a summary "
                  "(see: parallelnet experiment -h)",
    "reproduce": "run every experiment the paper cites, then rebuild the paper",
    "compare": "every available backend at a fixed rate and at saturation (what `make run` does)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallelnet", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_server_arguments(p)
    p.add_argument("--stats-interval", type=float, default=0.0,
                   help="print a stats line every S seconds (0: only the final table)")
    p.add_argument("--stats-json", default=None, help="write stats as JSON lines to PATH")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop by itself after S seconds (0: run until SIGINT/SIGTERM)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("backends", help="list registered backends and whether they can run here")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("loadgen", add_help=False,
                       help="drive a server with the C load generator (see: parallelnet loadgen -h)")
    # Its options are the load generator's own: main() hands them over unparsed.

    for name, text in EXPERIMENT_COMMANDS.items():
        sub.add_parser(name, add_help=False, help=text)   # options: their own -h

    p = sub.add_parser("demo", help="start a server, drive it briefly, print the per-worker table")
    p.add_argument("--backend", default="epoll")
    p.add_argument("--mode", default="thread", choices=list(MODES))
    p.add_argument("--accept", default=SHARED, choices=list(STRATEGIES))
    p.add_argument("--clients", type=int, default=64, help="concurrent clients")
    p.add_argument("--duration", type=float, default=3.0, help="seconds of load")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadgen"]:
        return cmd_loadgen(argv[1:])
    if argv[:1] and argv[0] in EXPERIMENT_COMMANDS:
        return cmd_experiments(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
