"""Start ``parallelnet serve`` as a child process and wait, bounded, for its addresses.

One place for the handshake every client of the server uses (the demo, experiments,
tests): the child binds port 0 and prints ``listening on ADDR [ADDR ...]`` (every
address, in ``--listen`` order: core/addresses.py); the parent reads that line with a
deadline (select on the pipe, so a child that prints nothing cannot hang the caller) and
gets back the process, which it may stop by its PID.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time

from parallelnet.core.addresses import parse_listening

Address = tuple[str, int]


class ServerStartError(RuntimeError):
    """The server did not print "listening on": it exited first (``returncode``) or the
    wait timed out (``returncode`` None).  ``reason`` is one line: the server's own last
    line on stderr (its one-line refusal), or what happened."""

    def __init__(self, message: str, reason: str, returncode: int | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.returncode = returncode


def _failure(serve_args, timeout: float, returncode: int | None, output: str) -> ServerStartError:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    if returncode is None:
        reason = f"it did not print \"listening on\" within {timeout:g} s"
        head = f"server {serve_args} did not start within {timeout:g} s"
    else:
        last = lines[-1] if lines else f"exit status {returncode}"
        reason = last.removeprefix("parallelnet serve: ")
        head = f"server {serve_args} did not start: it exited with status {returncode}"
    return ServerStartError(f"{head}:\n{output}", reason, returncode)


def serve_command(serve_args: list[str]) -> list[str]:
    """``parallelnet serve`` with ``--port 0`` unless the arguments name their own
    addresses (``--listen``, which excludes ``--port``)."""
    port = [] if any(a == "--listen" or a.startswith("--listen=") for a in serve_args) \
        else ["--port", "0"]
    return [sys.executable, "-m", "parallelnet.core.cli", "serve", *port, *serve_args]


def spawn_server(serve_args: list[str], *, merge_stderr: bool = False, env: dict | None = None,
                 preexec_fn=None, timeout: float = 15.0,
                 output: str | None = None) -> tuple[subprocess.Popen, str, int]:
    """``parallelnet serve --port 0 SERVE_ARGS``; returns (process, host, port) of its
    first address (``spawn_server_all`` returns them all).

    ``output``: a file for everything the server prints (stdout and stderr), so a long
    run never blocks on a pipe nobody reads; the address is read from it.  Without it,
    stdout (and stderr) are pipes the caller must read.
    On failure the child is killed (if it still runs) and ``ServerStartError`` (a
    RuntimeError) carries what it printed, and its one-line ``reason``.
    """
    proc, addresses = spawn_server_all(serve_args, merge_stderr=merge_stderr, env=env,
                                       preexec_fn=preexec_fn, timeout=timeout, output=output)
    host, port = addresses[0]
    return proc, host, port


def spawn_server_all(serve_args: list[str], *, merge_stderr: bool = False, env: dict | None = None,
                     preexec_fn=None, timeout: float = 15.0,
                     output: str | None = None) -> tuple[subprocess.Popen, list[Address]]:
    """As ``spawn_server``; returns (process, every address it listens on, in order)."""
    cmd = serve_command(serve_args)
    if output is not None:
        return _spawn_to_file(cmd, output, env, preexec_fn, timeout)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                            preexec_fn=preexec_fn)
    deadline = time.monotonic() + timeout
    seen = []
    exited = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            break
        line = proc.stdout.readline()  # the server prints whole lines, flushed
        if not line:
            exited = True   # EOF: it exited (or closed its stdout) before listening
            break
        seen.append(line)
        addresses = parse_listening(line)
        if addresses:
            return proc, addresses
    if exited:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    returncode = proc.poll()
    if returncode is None:
        proc.kill()
    out, err = proc.communicate()
    raise _failure(serve_args, timeout, returncode, "".join(seen) + (out or "") + (err or ""))


def _spawn_to_file(cmd, output, env, preexec_fn, timeout):
    with open(output, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=preexec_fn)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(output, errors="replace") as f:
            text = f.read()
        for line in text.splitlines(keepends=True):
            addresses = parse_listening(line) if line.endswith("\n") else None
            if addresses:
                return proc, addresses
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    returncode = proc.poll()
    if returncode is None:
        proc.kill()
    proc.wait()
    with open(output, errors="replace") as f:
        text = f.read()
    raise _failure(cmd[4:], timeout, returncode, text)
