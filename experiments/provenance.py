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
* **client**: where the load generator ran (``--client``, experiments/remote.py).  On
  another host (``ssh://``) that host's kernel, CPU model and count, clock (its wall
  clock against ours, read over the connection), clocksource, governor, the same sysctls,
  and its ``parallelnet --version``: a run whose client has another version or commit
  than this tree is refused (:func:`version_mismatch`), since the two ends of one
  measurement must be the same code.
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
        from parallelnet.backends.uring.ring import load

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


# -- the client host (``--client ssh://...``) ----------------------------------------------

#: Printed by the client host, one ``key=value`` a line; ``clock`` last, so that the
#: moment its line arrives here is as close as it gets to the moment it was read there.
_FACTS = (
    'echo "kernel=$(uname -r)"; echo "arch=$(uname -m)"; echo "node=$(uname -n)"; '
    'echo "nproc=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"; '
    'echo "cpus_online=$(cat /sys/devices/system/cpu/online 2>/dev/null)"; '
    'echo "cpu_model=$(sed -n \'s/^model name[[:space:]]*: //p\' /proc/cpuinfo | head -n 1)"; '
    'echo "clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource '
    '2>/dev/null)"; '
    'echo "governor=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null)"; '
    'for k in {sysctls}; do '
    'echo "sysctl.$k=$(cat /proc/sys/$k 2>/dev/null | tr -s \'[:space:]\' \' \')"; done; '
    'v=$({parallelnet} --version 2>&1); echo "version_rc=$?"; '
    'echo "version=$(printf \'%s\' "$v" | head -n 1)"; '
    'echo "clock=$(date +%s.%N)"'
)


def client_facts_command(parallelnet: str = "parallelnet") -> str:
    """The POSIX shell command that prints a client host's facts (:func:`parse_client_facts`);
    ``parallelnet``: how that host's command is invoked, already quoted for its shell."""
    return _FACTS.format(sysctls=" ".join(SYSCTLS), parallelnet=parallelnet)


def parse_client_facts(text: str, clock_seen: float | None = None) -> dict:
    """The client host's facts from what :func:`client_facts_command` printed.

    ``clock_seen``: our wall clock (``time.time()``) when its ``clock=`` line arrived;
    ``clock.offset_s`` is then its clock minus ours (positive: it is ahead), accurate to
    the connection's one-way delay."""
    kv = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq:
            kv[key.strip()] = value.strip()
    node = kv.get("node") or ""
    try:
        nproc = int(kv.get("nproc") or "")
    except ValueError:
        nproc = None
    try:
        remote_clock = float(kv.get("clock") or "")
    except ValueError:   # a `date` without %N
        remote_clock = None
    import hashlib

    return {
        "kernel": kv.get("kernel") or None, "arch": kv.get("arch") or None,
        "cpu_model": kv.get("cpu_model") or None, "cpus": nproc,
        "cpus_online": kv.get("cpus_online") or None,
        "clocksource": kv.get("clocksource") or None, "governor": kv.get("governor") or None,
        "hostname_hash": hashlib.sha256(node.encode()).hexdigest()[:12] if node else None,
        "sysctl": {k.replace("/", "."): kv.get(f"sysctl.{k}") or None for k in SYSCTLS},
        "parallelnet": parse_version_line(kv.get("version") or "")
        if kv.get("version_rc") == "0" else None,
        "parallelnet_said": kv.get("version") or None,
        "clock": {"unix": remote_clock, "seen_here": clock_seen,
                  "offset_s": round(remote_clock - clock_seen, 6)
                  if remote_clock is not None and clock_seen is not None else None},
    }


def parse_version_line(line: str) -> dict | None:
    """``parallelnet 0.1.0 (commit 967797d, modified)`` -> version, commit, modified
    (None where the line is not parallelnet's)."""
    m = re.fullmatch(r"\s*parallelnet\s+(\S+)(?:\s+\(commit\s+([0-9a-f]+)(,\s*modified)?\))?\s*",
                     line or "")
    if not m or m.group(1) == "(not":
        return None
    return {"version": m.group(1), "commit": m.group(2), "modified": bool(m.group(3)),
            "line": line.strip()}


def local_version() -> dict:
    """This tree's package version and full commit (what a client host must match)."""
    try:
        version = importlib.metadata.version("parallelnet")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"version": version, "commit": code_state()["commit"]}


def version_mismatch(local: dict, remote: dict | None, where: str) -> str | None:
    """One line saying why the client host's parallelnet cannot drive this run (another
    version, another commit, or a commit it cannot tell), or None when they match."""
    fix = ("install the same commit there (docs/experiments.md, \"Where the client runs\")")
    if remote is None:
        return f"{where} has no working `parallelnet` command: {fix}"
    if local.get("version") and remote["version"] != local["version"]:
        return (f"{where} runs parallelnet {remote['version']}, this tree is "
                f"{local['version']}: {fix}")
    mine = local.get("commit")
    if mine:
        theirs = remote.get("commit")
        if not theirs:
            return (f"{where} runs parallelnet {remote['version']} from no git checkout, so "
                    f"its commit cannot be checked against this tree's {mine[:12]}: {fix}")
        if not mine.startswith(theirs) and not theirs.startswith(mine):
            return (f"{where} runs parallelnet at commit {theirs}, this tree is at "
                    f"{mine[:12]}: {fix}")
    return None
