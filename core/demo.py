"""``parallelnet demo`` (``make run``): a server, a short burst of clients, the per-worker table.

The server runs as a child process (``parallelnet serve --port 0``) with its default
layout: one worker per CPU.  The client runs here, pinned to the last CPU, with
clients opening short connections (connect, one echo, close) so that the accept
race is visible in the table the server prints when it stops.
"""

from __future__ import annotations

import os
import signal
import subprocess

import sys

from parallelnet.core.client import run_clients
from parallelnet.core.cpus import allowed_cpus, format_cpu_list
from parallelnet.core.launch import ServerStartError, spawn_server


def start_server(extra: list[str], timeout: float = 10.0) -> tuple[subprocess.Popen, str, int]:
    """Start ``parallelnet serve --port 0 …``; return the process and the address it printed."""
    return spawn_server(extra, timeout=timeout)


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out + err


def run_demo(args) -> int:
    """0: served without errors; 1: client errors or a server that did not exit cleanly;
    2: the server could not start (its reason in one line)."""
    cpus = allowed_cpus()
    extra = ["--backend", args.backend, "--mode", args.mode, "--accept", args.accept]
    try:
        proc, host, port = start_server(extra)
    except ServerStartError as exc:
        print(f"parallelnet demo: the server did not start: {exc.reason}", file=sys.stderr)
        return 2
    try:
        os.sched_setaffinity(0, {cpus[-1]})
        print(f"server: backend {args.backend}, {args.mode} workers on CPUs "
              f"{format_cpu_list(cpus)}, accept {args.accept}, listening on {host}:{port}")
        print(f"client: {args.clients} clients opening short connections for "
              f"{args.duration:g} s, on CPU {cpus[-1]}")
        res = run_clients(host, port, connections=args.clients, mode="short",
                          duration=args.duration)
    finally:
        report = stop_server(proc)
    print(f"client: {res.requests} echoes over {res.connects} connections in "
          f"{res.elapsed:.1f} s ({res.rate:.0f}/s), errors: {res.errors or 'none'}")
    print(report.rstrip())
    return 0 if not res.errors and proc.returncode == 0 else 1
