"""Client placement in a network namespace: a veth pair instead of loopback.

On loopback the client's and the server's packets never leave one device and skip
most of the path a packet from a NIC takes.  Here the client runs in its own network
namespace and reaches the server (in the root namespace) over a veth pair: the packet
goes through a real device transmit, the receiving device's backlog (softirq, NAPI)
and the other namespace's stack, with a 1500-byte MTU.  Both sides stay on this
machine, so this is closer to a NIC's path, not a NIC.

Use::

    with ClientNamespace() as ns:                 # root needed; removed again on exit
        server bound to ns.host_address (parallelnet serve --host ... --allow-remote)
        run(LoadSpec(host=ns.host_address, port=P, netns=ns.name, ...))

Kernel semantics relied on:

* A network namespace has its own interfaces, addresses, routes, sockets, ephemeral
  port range and most ``net.*`` sysctls (``net.ipv4.ip_local_port_range``,
  ``net.ipv4.tcp_tw_reuse`` are per namespace), so a client's TIME_WAITs and port
  range in there do not touch the machine's.
* ``ip netns add NAME`` keeps the namespace alive with a bind mount of
  ``/proc/self/ns/net`` on ``/run/netns/NAME``; ``ip netns del`` removes that mount,
  and the namespace ends when its last user (mount, process, open fd) is gone.
* A veth pair is two devices joined back to back.  Deleting either end deletes both,
  and so does destroying the namespace that holds one end; ``ip link del`` of the
  root-side end is the belt to those braces.
* ``setns(fd, CLONE_NEWNET)`` moves only the *calling thread*; threads it creates
  afterwards start in the namespace, sockets stay in the namespace they were created
  in.  It needs CAP_SYS_ADMIN.  So the load generator runs in a forked child that
  calls setns before the C core starts its threads (:func:`call_in_netns`).
* Both ends get an address in one /30, so each end reaches the other over the
  connected route that adding the address creates; nothing else is routed.
* ``/proc/sys/net`` shows the sysctls of the namespace of the process that opens it,
  so :meth:`ClientNamespace.sysctl` writes them from a child inside the namespace.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import pickle
import random
import secrets
import select
import shutil
import signal
import subprocess
import threading
import time
import traceback

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
#: Where the /30s come from (private, unusual; every subnet in use is avoided).
POOL = ipaddress.ip_network("10.213.0.0/16")
LOCK_PATH = "/tmp/parallelnet-netns.lock"


class NetnsError(RuntimeError):
    """A namespace could not be made, used or removed; the message says why."""


def missing() -> str | None:
    """What this process lacks to create namespaces and veth pairs, or None."""
    needs = []
    if os.geteuid() != 0:
        needs.append(f"root (CAP_NET_ADMIN and CAP_SYS_ADMIN; running as uid {os.geteuid()})")
    if shutil.which("ip") is None:
        needs.append("iproute2's `ip` command (not on PATH)")
    return "network namespaces need " + " and ".join(needs) if needs else None


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return isinstance(name, str) and "/" not in name and os.path.exists(netns_path(name))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {res.stderr.strip() or res.returncode}")
    return res


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


class ClientNamespace:
    """A fresh network namespace joined to the root one by a veth pair; a context
    manager that removes both on exit, also after an error or SIGINT (SIGTERM too,
    when entered from the main thread where SIGTERM still has its default action).

    Names are unique per run (``pn-<pid>-<random>``; veth ends ``pnh<random>`` in the
    root namespace and ``pnc<random>`` in the new one), and the /30 is chosen under a
    lock among subnets nobody uses, so parallel runs do not collide."""

    def __init__(self, prefix: str = "pn") -> None:
        token = secrets.token_hex(3)
        self.name = f"{prefix}-{os.getpid()}-{token}"
        self.host_if = f"pnh{token}"            # interface names: at most 15 characters
        self.ns_if = f"pnc{token}"
        self.network: ipaddress.IPv4Network | None = None
        self.host_address = ""
        self.client_address = ""
        self._old_term = None

    # ---- life cycle -------------------------------------------------------------------

    def __enter__(self) -> "ClientNamespace":
        why = missing()
        if why:
            raise NetnsError(why)
        self._catch_sigterm()
        try:
            with _blocked_signals():            # set up whole, or not at all
                self._create()
        except BaseException:
            self.close()
            self._restore_sigterm()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            self._restore_sigterm()

    def _create(self) -> None:
        with open(LOCK_PATH, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)     # subnet choice and creation, one run at a time
            self.network = self._free_subnet()
            host, client = list(self.network.hosts())[:2]
            self.host_address, self.client_address = str(host), str(client)
            plen = str(self.network.prefixlen)
            _ip("netns", "add", self.name)
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
                "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/{plen}", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.name, "addr", "add", f"{self.client_address}/{plen}", "dev", self.ns_if)
            _ip("-n", self.name, "link", "set", self.ns_if, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")

    def _free_subnet(self) -> ipaddress.IPv4Network:
        used = _subnets_in_use()
        candidates = list(POOL.subnets(new_prefix=30))
        rng = random.Random(secrets.randbits(64))
        for _ in range(256):
            net = rng.choice(candidates)
            if not any(net.overlaps(u) for u in used):
                return net
        raise NetnsError(f"no free /30 in {POOL} (every one tried overlaps an address in use)")

    def close(self) -> None:
        """Remove the namespace and the veth pair; idempotent.  Raises NetnsError if
        something is still there afterwards."""
        with _blocked_signals():                # a second Ctrl-C must not cut this short
            if exists(self.name):
                _ip("netns", "del", self.name, check=False)
            if self._link_exists():
                _ip("link", "del", self.host_if, check=False)
            left = [what for what, there in ((f"namespace {self.name}", exists(self.name)),
                                             (f"link {self.host_if}", self._link_exists()))
                    if there]
        if left:
            raise NetnsError(f"could not remove {', '.join(left)}")

    def _link_exists(self) -> bool:
        return _ip("link", "show", "dev", self.host_if, check=False).returncode == 0

    def _catch_sigterm(self) -> None:
        # SIGTERM's default action kills us without unwinding; turn it into an
        # exception so __exit__ runs.  Only where nobody else has claimed it.
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            def on_term(signum, frame):
                raise SystemExit(128 + signum)
            self._old_term = signal.signal(signal.SIGTERM, on_term)

    def _restore_sigterm(self) -> None:
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None

    # ---- using it ---------------------------------------------------------------------

    def sysctl(self, key: str, value: str) -> None:
        """Set a per-namespace sysctl (e.g. ``net.ipv4.ip_local_port_range``, "40000
        40100") inside this namespace only."""
        call_in_netns(self.name, _write_sysctl, key, str(value), timeout=10)

    def read_sysctl(self, key: str) -> str:
        return call_in_netns(self.name, _read_sysctl, key, timeout=10)


def _sysctl_path(key: str) -> str:
    if not key.startswith("net.") or ".." in key or "/" in key:
        raise ValueError(f"only net.* sysctls are per namespace, got {key!r}")
    return "/proc/sys/" + key.replace(".", "/")


def _write_sysctl(key: str, value: str) -> None:
    with open(_sysctl_path(key), "w") as f:
        f.write(value)


def _read_sysctl(key: str) -> str:
    with open(_sysctl_path(key)) as f:
        return " ".join(f.read().split())


class _blocked_signals:
    """Hold SIGINT and SIGTERM back (main thread only; they arrive once this ends)."""

    SIGS = {signal.SIGINT, signal.SIGTERM}

    def __enter__(self):
        self.on = threading.current_thread() is threading.main_thread()
        if self.on:
            self.old = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGS)

    def __exit__(self, *exc):
        if self.on:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old)


def _setns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(name: str, fn, *args, timeout: float):
    """Run ``fn(*args)`` in a forked child that has entered namespace ``name`` and
    return its (picklable) result.  The child's exception comes back as a
    RuntimeError with its traceback; a child still running after ``timeout`` seconds
    is killed (by its PID) and NetnsError raised."""
    if not exists(name):
        raise NetnsError(f"no network namespace {name!r} ({netns_path(name)} does not exist)")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                # the child: never returns
        code = 0
        try:
            os.close(rfd)
            _setns(name)
            payload = ("ok", fn(*args))
        except BaseException as exc:            # noqa: BLE001 - everything goes back to the parent
            payload = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            code = 1
        try:
            data = pickle.dumps(payload)
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view):]
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetnsError(f"the child in namespace {name} (pid {pid}) ran past "
                                 f"{timeout:g}s and was killed")
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    except BaseException:
        _kill(pid)
        raise
    finally:
        os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        raise NetnsError(f"the child in namespace {name} died without an answer "
                         f"(wait status {status})")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        raise RuntimeError(f"in namespace {name}: {value}")
    return value


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
