"""``parallelnet``: serve, list backends, run the demo; and every registered command.

    parallelnet serve --backend epoll --workers 2 --protocol http --port 0
    parallelnet serve --listen 127.0.0.1:8080 --listen [::1]:8081,protocol=http
    parallelnet backends
    parallelnet demo

The server's own commands are here.  The others (``loadgen``, ``experiment``,
``reproduce``, ``compare``) are registered like backends, by entry point (group
``parallelnet.commands``: name -> a ``main(argv) -> int`` whose docstring's first line
is its help), and handed their arguments unparsed: the core never imports the
experiments package, and a command's module is imported only when it runs (or when
``parallelnet --help`` lists them).  Likewise ``serve --backend X`` imports X's module
alone; every backend is imported only to list them (``backends``, ``serve --help``) or
to name the owner of an option given to another backend.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points

from parallelnet.core.addresses import format_listening, parse_host, parse_listen
from parallelnet.core.backend import (
    REUSEPORT, SHARED, Availability, BackendError, Limits, backend_names, get_backend, registry,
)
from parallelnet.core.cpus import (
    MAX_WORKERS, WORKERS_PER_CPU, allowed_cpus, check_in_mask, format_cpu_list, max_workers,
    parse_cpu_list,
)
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


#: Exit statuses of ``parallelnet serve`` (docs/server.md).
EXIT_OK = 0
EXIT_FAILED = 1        # a worker or the dispatcher died while serving
EXIT_USAGE = 2         # a bad option, or a server that could not start (nothing was served)
EXIT_UNCLEAN = 3       # stopped, but the drain abandoned answers (or the workers were killed)
EXIT_FORCED = 130      # a second SIGINT/SIGTERM: exit at once, the drain abandoned


# -- the command line's own rules: one line per mistake, each default shown once ---------

class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line on stderr and exit status 2: ``PROG:
    MESSAGE`` (the usage is in ``--help``), never a usage block or a traceback."""

    def error(self, message: str):
        # argparse says "argument --port: --port must be ..."; the flag once is enough.
        if message.startswith("argument "):
            flag, sep, rest = message[len("argument "):].partition(": ")
            if sep and rest.lstrip().startswith("-"):
                self.exit(EXIT_USAGE, f"{self.prog}: {rest}\n")   # our own message, complete
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class DefaultsOnce(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help unless its text already says its
    default (or it has none worth saying: None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False
                or default == argparse.SUPPRESS
                or "default" in text.lower() or isinstance(default, (list, dict))):
            return text
        return f"{text} (default: %(default)s)"


def fail(prog: str, message: str) -> None:
    """A mistake found after parsing: one line, exit status 2."""
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _number(text: str, flag: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{flag} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{flag} must be a finite number, got {text!r}")
    return value


def int_in(flag: str, lo: int, hi: int, unit: str = ""):
    """An argparse type: an integer in lo..hi, refused in one line naming ``flag``."""
    def parse(text: str) -> int:
        value = _number(text, flag, int)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{flag} must be {lo}..{hi}{unit}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _plain(x: float) -> str:
    """1, 0.01, 31536000: never 3.1536e+07."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def seconds_in(flag: str, lo: float, hi: float, zero: str | None = None, unit: str = " s"):
    """An argparse type: a number (seconds) in lo..hi (``zero``: what 0 means, when 0 is
    allowed below ``lo``)."""
    def parse(text: str) -> float:
        value = _number(text, flag, float)
        if zero is not None and value == 0:
            return 0.0
        if not lo <= value <= hi:
            span = f"{_plain(lo)}..{_plain(hi)}"
            allowed = f"0 ({zero}) or {span}" if zero is not None else span
            raise argparse.ArgumentTypeError(f"{flag} must be {allowed}{unit}, got {text}")
        return value
    parse.__name__ = "seconds"
    return parse


def output_file(flag: str):
    """An argparse type: a file this process can create or overwrite, checked before
    anything runs (its directory exists, it is not a directory)."""
    def parse(text: str) -> str:
        path = os.path.abspath(text)
        parent = os.path.dirname(path)
        if os.path.isdir(path):
            raise argparse.ArgumentTypeError(f"{flag} {text}: is a directory")
        if not os.path.isdir(parent):
            raise argparse.ArgumentTypeError(f"{flag} {text}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise argparse.ArgumentTypeError(f"{flag} {text}: not writable")
        return text
    parse.__name__ = "path"
    return parse


def cpu_list(text: str) -> list[int]:
    """An argparse type: a CPU list (``0,2-3``) within this process's affinity mask."""
    try:
        cpus = parse_cpu_list(text)
        check_in_mask(cpus, f"--cpus {text}")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--cpus: {exc}" if str(exc).startswith("bad") else str(exc)) from None
    return cpus


def _dispatch_cpu(text: str) -> int:
    cpu = _number(text, "--dispatch-cpu", int)
    if cpu not in allowed_cpus():
        raise argparse.ArgumentTypeError(
            f"--dispatch-cpu {cpu} is not in this process's affinity mask "
            f"({format_cpu_list(allowed_cpus())})")
    return cpu


def _listen(text: str):
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--listen: {exc}") from None


def _host(text: str) -> str:
    try:
        return parse_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def version_line() -> str:
    """``parallelnet VERSION`` plus the commit of the source tree when it is a git work
    tree (an editable install); one line."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = f"parallelnet {version('parallelnet')}"
    except PackageNotFoundError:
        text = "parallelnet (not installed)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, ".git")):
        try:
            commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, timeout=2).stdout.strip()
            dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--"],
                                   capture_output=True, timeout=2).returncode == 1
        except (OSError, subprocess.SubprocessError):
            commit, dirty = "", False
        if commit:
            text += f" (commit {commit}{', modified' if dirty else ''})"
    return text


class _Version(argparse.Action):
    """``--version``: the line is made only when asked for (it may run git)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit(0)


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080
#: Bounds of the serve options (README.md, docs/server.md).
MAX_OUTPUT = 1 << 32                # bytes of pending output per connection
MAX_CONNECTIONS = 1 << 20           # per worker (fs.nr_open's default)
MAX_BACKLOG = 65535                 # the kernel caps it at net.core.somaxconn anyway
MAX_MESSAGE_SIZE = 1 << 30
MAX_BUFFER = (1 << 31) - 1          # SO_SNDBUF/SO_RCVBUF take an int
DAY = 86400.0
MIN_STATS_INTERVAL = 0.01


def _buffer_bytes(flag: str):
    def parse(text: str) -> int:
        value = _number(text, flag, int)
        if not 1 <= value <= MAX_BUFFER:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a positive number of bytes, got {value} (1..{MAX_BUFFER})")
        return value
    parse.__name__ = "bytes"
    return parse


DEFAULT_BACKEND = "epoll"


def add_server_arguments(p: argparse.ArgumentParser, backends: dict | None = None) -> None:
    """The serve options, with the options of ``backends`` (name -> class; default: every
    registered backend, each module imported)."""
    if backends is None:
        backends = registry()
    names = sorted(set(backend_names()) | set(backends))
    lim = Limits()
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=names,
                   help="event loop of each worker: `parallelnet backends` lists them and "
                        "whether they run here (default: epoll)")
    p.add_argument("--workers", type=int_in("--workers", 1, MAX_WORKERS), default=None,
                   metavar="N",
                   help=f"number of workers (default: one per CPU in --cpus or the affinity "
                        f"mask); at most {WORKERS_PER_CPU} per CPU and {MAX_WORKERS} in all; "
                        f"more workers than CPUs wrap around the list (with a warning)")
    p.add_argument("--cpus", type=cpu_list, default=None, metavar="LIST",
                   help="CPUs to pin workers to, in order, e.g. 0,1 or 0-3; each must be in the "
                        "affinity mask (default: the affinity mask)")
    p.add_argument("--no-pin", action="store_true", help="do not pin workers to CPUs")
    p.add_argument("--protocol", default="echo", choices=sorted(PROTOCOLS),
                   help="what --host/--port serves, and every --listen without protocol= "
                        "(default: echo)")
    p.add_argument("--message-size", type=int_in("--message-size", 0, MAX_MESSAGE_SIZE),
                   default=0, metavar="BYTES",
                   help="echo: count one request per this many bytes (default 0: one per read)")
    p.add_argument("--accept", default=SHARED, choices=list(STRATEGIES),
                   help="; ".join(f"{k}: {v}" for k, v in ACCEPT_HELP.items())
                        + f" (default: {SHARED})")
    p.add_argument("--dispatch-policy", default="round-robin", choices=list(POLICIES),
                   help="--accept dispatch only: how the acceptor picks a worker "
                        "(default: round-robin)")
    p.add_argument("--dispatch-cpu", type=_dispatch_cpu, default=None, metavar="CPU",
                   help="--accept dispatch only: pin the acceptor thread to this CPU of the "
                        "affinity mask (default: unpinned)")
    p.add_argument("--mode", default="thread", choices=list(MODES),
                   help="workers as threads of one process, or forked processes sharing the "
                        "socket (default: thread)")
    p.add_argument("--listen", action="append", type=_listen, default=None,
                   metavar="ADDR:PORT[,protocol=NAME]",
                   help="an address to listen on, repeatable: 127.0.0.1:8080, [::1]:8080 "
                        "(port 0: a free one), each with its own protocol if given; every "
                        "worker's loop watches all of them (listener id = the order given). "
                        "Instead of --host/--port")
    p.add_argument("--host", type=_host, default=None,
                   help=f"address to bind, the one-listener shorthand: a name or an IP "
                        f"address, IPv6 with or without brackets (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=int_in("--port", 0, 65535), default=None,
                   help=f"port, 0..65535 (0: pick a free one; default: {DEFAULT_PORT})")
    p.add_argument("--allow-remote", action="store_true",
                   help="permit binding a non-loopback address (printed as a warning)")
    p.add_argument("--reuseport-join", action="store_true",
                   help="--accept reuseport/reuseport-cpu on a fixed port: join the "
                        "SO_REUSEPORT group of a listener already there (a rolling restart) "
                        "instead of refusing the port; the kernel then splits connections "
                        "between both servers")
    p.add_argument("--backlog", type=int_in("--backlog", 1, MAX_BACKLOG), default=4096,
                   metavar="N",
                   help=f"listen(2) backlog of each listening socket, 1..{MAX_BACKLOG}; the "
                        "kernel caps it at net.core.somaxconn (default: 4096)")
    p.add_argument("--sndbuf", type=_buffer_bytes("--sndbuf"), default=None, metavar="BYTES",
                   help="fixed SO_SNDBUF of every connection, set on the listeners and inherited "
                        "(the kernel doubles it, capped by net.core.wmem_max; default: autotuning)")
    p.add_argument("--rcvbuf", type=_buffer_bytes("--rcvbuf"), default=None, metavar="BYTES",
                   help="fixed SO_RCVBUF of every connection, likewise (net.core.rmem_max; "
                        "default: autotuning)")
    p.add_argument("--max-output", type=int_in("--max-output", 1, MAX_OUTPUT, " bytes"),
                   default=lim.max_output, metavar="BYTES",
                   help=f"pending output per connection before reading pauses, 1..{MAX_OUTPUT} "
                        f"(default: {lim.max_output})")
    p.add_argument("--max-connections", type=int_in("--max-connections", 1, MAX_CONNECTIONS),
                   default=lim.max_connections, metavar="N",
                   help=f"connections per worker, 1..{MAX_CONNECTIONS}; more are closed at once "
                        f"and counted (default: {lim.max_connections})")
    p.add_argument("--drain-timeout", type=seconds_in("--drain-timeout", 0, DAY),
                   default=lim.drain_timeout, metavar="S",
                   help=f"seconds to finish answers after a stop signal, 0..{DAY:g}; what is "
                        f"still unsent then is abandoned and serve exits with status "
                        f"{EXIT_UNCLEAN} (default: {lim.drain_timeout:g})")
    p.add_argument("--idle-timeout", type=seconds_in("--idle-timeout", 0, DAY), default=None,
                   metavar="S",
                   help=f"close a connection with no bytes in or out for S seconds, 0..{DAY:g} "
                        f"(default: {lim.idle_timeout:g}; 0: never)")
    p.add_argument("--header-timeout", type=seconds_in("--header-timeout", 0, DAY), default=None,
                   metavar="S",
                   help=f"close a connection whose request is still incomplete S seconds after "
                        f"its first byte, however steadily it trickles, 0..{DAY:g} (default: "
                        f"{lim.header_timeout:g}; 0: never)")
    p.add_argument("--header-min-rate", type=seconds_in("--header-min-rate", 0, 1e12, unit=" bytes/s"),
                   default=None, metavar="BYTES_PER_S",
                   help="with --header-timeout: each byte of an incomplete request extends its "
                        "deadline by 1/RATE s, so a request arriving at RATE B/s or faster is "
                        "never cut (default: 0, off)")
    ARGUMENT_ERRORS.clear()
    for name, cls in backends.items():
        try:
            cls.add_arguments(p)
        except Exception as exc:  # noqa: BLE001 - reported below and when the backend is chosen
            # A broken plugin must not break the CLI for the others, nor pass unnoticed.
            ARGUMENT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
            print(f"warning: backend {name}: add_arguments failed ({ARGUMENT_ERRORS[name]}); "
                  "its options are missing", file=sys.stderr)
    BACKEND_OPTIONS.clear()
    BACKEND_OPTIONS.update(_backend_options(backends))


#: Options that backends add (``Backend.add_arguments``): dest -> (flag, default, the
#: backends whose add_arguments adds it).  Given to another backend, one is refused.
BACKEND_OPTIONS: dict[str, tuple[str, object, frozenset[str]]] = {}


def _backend_options(backends: dict) -> dict[str, tuple[str, object, frozenset[str]]]:
    """Which backend takes which option: each backend's add_arguments on a parser of its
    own (options shared by several backends, such as io_uring's, belong to each)."""
    owners: dict[str, set[str]] = {}
    flags: dict[str, tuple[str, object]] = {}
    for name, cls in backends.items():
        scratch = argparse.ArgumentParser(add_help=False)
        try:
            cls.add_arguments(scratch)
        except Exception:  # noqa: BLE001 - already reported by add_server_arguments
            continue
        for action in scratch._actions:
            if action.option_strings:
                owners.setdefault(action.dest, set()).add(name)
                flags[action.dest] = (max(action.option_strings, key=len), action.default)
    return {dest: (flags[dest][0], flags[dest][1], frozenset(names))
            for dest, names in owners.items()}


def check_serve_args(args: argparse.Namespace, prog: str = "parallelnet serve") -> None:
    """What one option alone cannot say: combinations, and options of another backend.
    Each mistake: one line, exit status 2 (``fail``)."""
    for dest, (flag, default, owners) in sorted(BACKEND_OPTIONS.items()):
        if args.backend not in owners and getattr(args, dest, default) != default:
            fail(prog, f"{flag} is an option of backend{'s' if len(owners) > 1 else ''} "
                       f"{', '.join(sorted(owners))}, not of --backend {args.backend}")
    if args.accept != "dispatch":
        if args.dispatch_cpu is not None:
            fail(prog, f"--dispatch-cpu is for --accept dispatch, not --accept {args.accept}")
        if args.dispatch_policy != "round-robin":
            fail(prog, f"--dispatch-policy is for --accept dispatch, not --accept {args.accept}")
    if args.reuseport_join and layout_of(args.accept) != REUSEPORT:
        fail(prog, f"--reuseport-join is for --accept reuseport or reuseport-cpu, not "
                   f"--accept {args.accept}")
    if args.listen and (args.host is not None or args.port is not None):
        fail(prog, "give the addresses either with --listen or with --host/--port, not both")
    cpus = args.cpus if args.cpus is not None else allowed_cpus()
    if args.workers is not None:
        limit = max_workers(cpus)
        if args.workers > limit:
            fail(prog, f"--workers must be 1..{limit} here ({WORKERS_PER_CPU} per CPU of "
                       f"{format_cpu_list(cpus)}, at most {MAX_WORKERS}), got {args.workers}")
        if args.workers > len(cpus) and not args.no_pin:
            pins = [cpus[i % len(cpus)] for i in range(args.workers)]
            shown = ",".join(map(str, pins[:16])) + (",..." if len(pins) > 16 else "")
            print(f"{prog}: warning: {args.workers} workers on {len(cpus)} CPU"
                  f"{'s' if len(cpus) != 1 else ''}: pinned to {shown} (several per CPU)",
                  file=sys.stderr)
    if args.stats_interval and args.duration and args.stats_interval > args.duration:
        print(f"{prog}: warning: --stats-interval {args.stats_interval:g} is longer than "
              f"--duration {args.duration:g}: no interval line will be printed", file=sys.stderr)


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
    cls = _backend_class(args.backend)
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
    return lim


def _backend_class(name: str):
    """The class of backend ``name`` (its module alone imported), None if unknown."""
    try:
        return get_backend(name)
    except BackendError:
        return None


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
        dispatch_policy=args.dispatch_policy, reuseport_join=getattr(args, "reuseport_join", False),
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


def _say(text: str) -> None:
    """One line on stderr from a signal handler: os.write, which cannot meet a print
    already in progress on the same stream."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


class _QuietWorkerCrash(logging.Filter):
    """Without -v, a worker's crash is not logged with its traceback: serve reports it
    in one line (which worker, why); -v shows the traceback too."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "parallelnet.server" and record.msg == "worker %d crashed")


def _banner(server: Server, args: argparse.Namespace) -> str:
    labels = server.listener_labels()
    served = (f"protocol {server.protocols[0].name}" if len(labels) == 1
              else "listeners " + ", ".join(f"{i}: {x}" for i, x in enumerate(labels)))
    n = len(server.cpus)
    workers = f"{n} {args.mode} worker{'s' if n != 1 else ''}"
    if args.no_pin:
        workers += f", not pinned (affinity mask {format_cpu_list(allowed_cpus())})"
    else:
        workers += f" on CPUs {','.join(map(str, server.cpus))}"
    return f"backend {args.backend}, {workers}, accept {args.accept}, {served}"


def cmd_serve(args: argparse.Namespace) -> int:
    # Handlers come first: a signal that arrives right after "listening on" is printed
    # must already find them in place.
    stop = StopRequest()     # not threading.Event: see core/stopping.py
    signals_seen = []
    server: Server | None = None

    def on_signal(signum, _frame):
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            # A second signal: stop waiting for the drain.
            _say(f"parallelnet serve: second signal: forced exit without the drain "
                 f"(status {EXIT_FORCED})")
            if server is not None:
                server.kill()
            os._exit(EXIT_FORCED)
        stop.request()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server = Server(config_from_args(args))
        server.start()
    except (BackendError, ValueError, OSError, RuntimeError) as exc:
        print(f"parallelnet serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    json_out = None
    if args.stats_json:
        # Opened once the server could start (a server that cannot writes nothing), and
        # before "listening on" (a stop right after it finds the file in place).
        try:
            json_out = open(args.stats_json, "w", buffering=1)
        except OSError as exc:
            server.stop()
            print(f"parallelnet serve: --stats-json {args.stats_json}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
    for host, _ in server.addresses:
        if not is_loopback(host):
            print(f"WARNING: listening on non-loopback address {host}", file=sys.stderr)
    print(format_listening(server.addresses), flush=True)
    labels = server.listener_labels()
    print(_banner(server, args), flush=True)

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
        if server.failures():
            break   # a server missing a part is not serving what it says: stop, report, fail
        if interval and not stop.is_set():
            now = time.monotonic()
            snaps = server.snapshots()
            print(_interval_line(server.elapsed, snaps, prev, now - prev_t), flush=True)
            if json_out:
                json_out.write(json.dumps({"type": "interval", "t": server.elapsed,
                                           "listeners": labels, "workers": snaps,
                                           "totals": totals(snaps)}) + "\n")
            prev, prev_t = totals(snaps), now

    died = server.failures()
    for part, why in died.items():
        print(f"parallelnet serve: {part} died: {why}", file=sys.stderr, flush=True)
    elapsed = server.elapsed
    server.stop()
    drain = server.drain
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
        if f"worker {s['index']}" not in died:
            print(f"parallelnet serve: worker {s['index']} crashed: {s['crashed']}", file=sys.stderr)
    unclean = drain.line(args.drain_timeout)
    if unclean:
        print(f"parallelnet serve: {unclean} (status {EXIT_UNCLEAN})", file=sys.stderr, flush=True)
    if json_out:
        json_out.write(json.dumps({"type": "final", "t": elapsed, "clean": drain.clean,
                                   "drain": {"abandoned": drain.abandoned, "killed": drain.killed,
                                             "seconds": round(drain.seconds, 3)},
                                   "listeners": labels, "workers": snaps, "totals": totals(snaps),
                                   "dispatcher": dispatcher}) + "\n")
        json_out.close()
    if crashed or died:
        return EXIT_FAILED
    return EXIT_UNCLEAN if not drain.clean else EXIT_OK


def cmd_backends(args: argparse.Namespace) -> int:
    rows = []
    for name, cls in registry().items():
        try:
            avail = cls.probe()
        except Exception as exc:  # noqa: BLE001 - a broken backend is listed, not a traceback
            avail = Availability(False, f"its probe failed: {type(exc).__name__}: {exc}")
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


#: The entry-point group of the commands other packages add (``parallelnet loadgen``,
#: ``experiment``, ...): name -> ``main(argv: list[str]) -> int``.
COMMAND_GROUP = "parallelnet.commands"


def registered_commands() -> dict:
    """name -> entry point of every command registered under COMMAND_GROUP (nothing
    imported)."""
    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}


def _command_help(ep) -> str:
    """The first line of a registered command's docstring (imports its module)."""
    try:
        doc = (ep.load().__doc__ or "").strip()
    except Exception as exc:  # noqa: BLE001 - a broken command is listed, not a traceback
        return f"(cannot import {ep.value}: {type(exc).__name__})"
    return doc.splitlines()[0] if doc else ""


def check_demo_args(args: argparse.Namespace, prog: str = "parallelnet demo") -> None:
    """Refuse, before a server is started, what the demo's server could not serve."""
    cls = get_backend(args.backend)
    avail = cls.probe()
    if not avail:
        fail(prog, f"backend {args.backend} is unavailable here: {avail.reason}")
    if layout_of(args.accept) not in cls.accept_strategies:
        fail(prog, f"backend {args.backend} does not support --accept {args.accept} (it "
                   f"supports: {', '.join(s for s in STRATEGIES if layout_of(s) in cls.accept_strategies)})")
    if args.mode not in cls.modes:
        fail(prog, f"backend {args.backend} cannot run in {args.mode} mode")


def _wanted_backend(argv: list[str]) -> str | None:
    """The one backend ``argv`` can need: ``serve``'s ``--backend`` (or its default), if
    registered; None when every backend is wanted (help, another command, a bad name)."""
    _, rest = _leading_verbose(argv)
    if rest[:1] != ["serve"] or "-h" in rest or "--help" in rest:
        return None
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--backend", default=DEFAULT_BACKEND)
    name = peek.parse_known_args(rest[1:])[0].backend
    return name if name in backend_names() else None


def build_parser(argv: list[str] | None = None,
                 every_backend: bool = False) -> argparse.ArgumentParser:
    """The whole command line.  Given the ``argv`` it will parse, it imports only what
    that needs: the chosen backend of ``serve`` (unless ``every_backend``), the help of
    the registered commands only for ``parallelnet --help``."""
    wanted = _wanted_backend(argv) if argv is not None and not every_backend else None
    backends = {wanted: get_backend(wanted)} if wanted else None
    _, rest = _leading_verbose(argv or [])
    describe = argv is None or not rest or rest[0] in ("-h", "--help")
    parser = OneLineParser(prog="parallelnet", description=__doc__.split("\n")[0],
                           formatter_class=DefaultsOnce)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at debug level, with the traceback of a worker's crash")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the version (and the commit of a source checkout) and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the server", formatter_class=DefaultsOnce,
                       description="Run the server until SIGINT/SIGTERM (or --duration). Exit "
                                   f"status: {EXIT_OK} served and drained cleanly; {EXIT_FAILED} "
                                   f"a worker or the dispatcher died; {EXIT_USAGE} a bad option "
                                   f"or a server that could not start; {EXIT_UNCLEAN} the drain "
                                   f"abandoned answers; {EXIT_FORCED} forced out by a second "
                                   "signal (docs/server.md).")
    add_server_arguments(p, backends)
    p.add_argument("--stats-interval", default=0.0, metavar="S",
                   type=seconds_in("--stats-interval", MIN_STATS_INTERVAL, DAY, zero="off"),
                   help=f"print a stats line every S seconds, {MIN_STATS_INTERVAL:g}..{DAY:g} "
                        "(default: 0, only the final table)")
    p.add_argument("--stats-json", type=output_file("--stats-json"), default=None,
                   metavar="PATH",
                   help="write stats as JSON lines to PATH (created or overwritten once the "
                        "server has started; its directory must exist)")
    p.add_argument("--duration", type=seconds_in("--duration", 0, 365 * DAY), default=0.0,
                   metavar="S",
                   help="stop by itself after S seconds (default: 0, run until SIGINT/SIGTERM)")
    p.set_defaults(func=cmd_serve, check=check_serve_args)

    p = sub.add_parser("backends", help="list registered backends and whether they can run here")
    p.set_defaults(func=cmd_backends)

    for name, ep in registered_commands().items():
        # Their options are their own: main() hands them over unparsed.
        sub.add_parser(name, add_help=False, help=_command_help(ep) if describe else None)

    p = sub.add_parser("demo", formatter_class=DefaultsOnce,
                       help="start a server, drive it briefly, print the per-worker table")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=backend_names(),
                   help="the server's backend (default: epoll)")
    p.add_argument("--mode", default="thread", choices=list(MODES),
                   help="the server's workers as threads or forked processes (default: thread)")
    p.add_argument("--accept", default=SHARED, choices=list(STRATEGIES),
                   help="the server's accept strategy, as serve --accept (default: shared)")
    p.add_argument("--clients", type=int_in("--clients", 1, 4096), default=64,
                   help="concurrent clients, 1..4096, each opening short connections "
                        "(default: 64)")
    p.add_argument("--duration", type=seconds_in("--duration", 0.1, 3600), default=3.0,
                   metavar="S", help="seconds of load, 0.1..3600 (default: 3)")
    p.set_defaults(func=cmd_demo, check=check_demo_args)
    return parser


def _leading_verbose(argv: list[str]) -> tuple[bool, list[str]]:
    verbose = False
    while argv[:1] and argv[0] in ("-v", "--verbose"):
        verbose, argv = True, argv[1:]
    return verbose, argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose, rest = _leading_verbose(argv)
    command = registered_commands().get(rest[0]) if rest else None
    if command is not None:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return command.load()(rest[1:])
    parser = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    if extras and _wanted_backend(argv) is not None:
        # Maybe another backend's option (--epoll-edge with --backend uring): parsed with
        # every backend's options, check_serve_args names its owner.
        args, extras = build_parser(argv, every_backend=True).parse_known_args(argv)
    if extras:   # said by the subcommand they were given to
        fail(f"parallelnet {args.command}", f"unrecognized arguments: {' '.join(extras)} "
                                            f"(see parallelnet {args.command} --help)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietWorkerCrash())
    check = getattr(args, "check", None)
    if check is not None:
        check(args, f"parallelnet {args.command}")
    try:
        return args.func(args)
    except KeyboardInterrupt:   # Ctrl-C outside serve's own handler (the demo, the list)
        print(f"parallelnet {args.command}: interrupted", file=sys.stderr)
        return EXIT_FORCED


if __name__ == "__main__":
    sys.exit(main())
