"""Where a result came from: the code, the machine, the settings that move the numbers.

Every results directory gets a ``meta.json`` from :func:`collect`, written when the run
starts and completed (end time, outcome) when it ends.  What is recorded and why:

* **code**: the full commit and whether the working tree differed from it (``dirty``,
  with the changed paths).  A short hash with no dirty flag cannot tell a reader which
  code produced a number; ``standard`` and ``full`` presets refuse a dirty tree unless
  told otherwise, and the flag is kept either way.
* **versions** of everything that sits on the measured path: Python, cffi, the liburing
  wheel (and the C library version it carries), pyperf, uvloop, rloop, matplotlib, wrk.
* **machine**: kernel, CPU model, current MHz per CPU (``/proc/cpuinfo``), the cpufreq
  governor where the VM exposes one, the CPUs this process may use.
* **sysctls** that change what a loopback benchmark measures: the ephemeral port range
  and TIME_WAIT reuse (churn runs out of ports), ``somaxconn`` (caps every listen
  backlog), ``tcp_fastopen``, ``io_uring_disabled``.
* **argv** relative to the repository (an absolute host path says nothing to a reader and
  leaks the machine's layout), the preset, the start and end time (UTC).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PACKAGES = ("cffi", "liburing", "pyperf", "uvloop", "rloop", "matplotlib", "pytest")
SYSCTLS = ("net/ipv4/ip_local_port_range", "net/ipv4/tcp_tw_reuse", "net/core/somaxconn",
           "net/ipv4/tcp_fastopen", "kernel/io_uring_disabled", "kernel/sched_autogroup_enabled")


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def code_state() -> dict:
    """Full commit, dirty flag and the paths that differ (results/ excluded: a run
    writing its own output must not mark its own tree dirty)."""
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    status = _git("status", "--porcelain", "--untracked-files=normal", "--", ".", ":!results")
    changed = [ln[3:] for ln in (status or "").splitlines() if ln.strip()]
    return {"commit": commit, "dirty": bool(changed) if status is not None else None,
            "changed": changed[:50]}


def versions() -> dict:
    out = {"python": sys.version.split()[0], "implementation": platform.python_implementation()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:  # the C library inside the wheel, as the io_uring backends see it
        from parallelnet.backends.uring import load

        _, lib = load()
        v = lib.uc_lib_version()
        out["liburing_c"] = f"{v // 100}.{v % 100}"
    except Exception:  # noqa: BLE001 - absent or unusable: recorded as unknown
        out["liburing_c"] = None
    wrk = shutil.which("wrk")
    out["wrk"] = None
    if wrk:
        try:
            res = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=5)
            m = re.search(r"wrk\s+(\S+)", res.stdout + res.stderr)
            out["wrk"] = m.group(1) if m else "unknown"
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine() -> dict:
    model, mhz = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("cpu MHz"):
                    mhz.append(round(float(line.split(":", 1)[1]), 1))
    except OSError:
        pass
    governors = sorted({g for g in (_read(f"/sys/devices/system/cpu/cpu{i}/cpufreq/scaling_governor")
                                    for i in range(os.cpu_count() or 1)) if g})
    return {"kernel": platform.release(), "cpu_model": model, "cpu_mhz": mhz,
            "cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "governor": governors or None, "hostname_hash": host_hash(),
            "sysctl": {k.replace("/", "."): _read(f"/proc/sys/{k}") for k in SYSCTLS}}


def host_hash() -> str:
    """Tells two machines apart without publishing a host name."""
    import hashlib

    return hashlib.sha256(platform.node().encode()).hexdigest()[:12]


def relative_argv(argv: list[str]) -> list[str]:
    """argv with paths inside the repository made relative and the interpreter named
    by its basename."""
    out = []
    for i, a in enumerate(argv):
        if i == 0 and os.path.isabs(a):
            a = os.path.relpath(a, REPO) if a.startswith(REPO + os.sep) else os.path.basename(a)
        elif os.path.isabs(a) and a.startswith(REPO + os.sep):
            a = os.path.relpath(a, REPO)
        out.append(a)
    return out


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def collect(experiment: str, preset: str | None = None, extra: dict | None = None) -> dict:
    """The full ``meta.json`` of a run that starts now."""
    return {"experiment": experiment, "preset": preset, "started": utc_now(), "ended": None,
            "outcome": "running", "argv": relative_argv([sys.executable, *sys.argv]),
            "code": code_state(), "versions": versions(), "machine": machine(),
            "ci": os.environ.get("CI", ""), **(extra or {})}
