"""Start ``parallelnet serve`` as a child process and wait, bounded, for its address.

One place for the handshake every client of the server uses (the demo, experiments,
tests): the child binds port 0 and prints ``listening on HOST:PORT``; the parent reads
that line with a deadline (select on the pipe, so a child that prints nothing cannot hang
the caller) and gets back the process, which it may stop by its PID.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time


def spawn_server(serve_args: list[str], *, merge_stderr: bool = False, env: dict | None = None,
                 preexec_fn=None, timeout: float = 15.0,
                 output: str | None = None) -> tuple[subprocess.Popen, str, int]:
    """``parallelnet serve --port 0 SERVE_ARGS``; returns (process, host, port).

    ``output``: a file for everything the server prints (stdout and stderr), so a long
    run never blocks on a pipe nobody reads; the address is read from it.  Without it,
    stdout (and stderr) are pipes the caller must read.
    On failure the child is killed and RuntimeError carries what it printed.
    """
    cmd = [sys.executable, "-m", "parallelnet.core.cli", "serve", "--port", "0", *serve_args]
    if output is not None:
        return _spawn_to_file(cmd, output, env, preexec_fn, timeout)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                            preexec_fn=preexec_fn)
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            break
        line = proc.stdout.readline()  # the server prints whole lines, flushed
        if not line:
            break
        seen.append(line)
        if line.startswith("listening on "):
            host, _, port = line.split()[-1].rpartition(":")
            return proc, host, int(port)
    proc.kill()
    out, err = proc.communicate()
    raise RuntimeError(f"server {serve_args} did not start within {timeout:g} s:\n"
                       + "".join(seen) + (out or "") + (err or ""))


def _spawn_to_file(cmd, output, env, preexec_fn, timeout):
    with open(output, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=preexec_fn)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(output, errors="replace") as f:
            text = f.read()
        for line in text.splitlines(keepends=True):
            if line.startswith("listening on ") and line.endswith("\n"):
                host, _, port = line.split()[-1].rpartition(":")
                return proc, host, int(port)
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    with open(output, errors="replace") as f:
        text = f.read()
    raise RuntimeError(f"server {cmd[5:]} did not start within {timeout:g} s:\n{text}")
