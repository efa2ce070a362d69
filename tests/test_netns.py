"""Client placement in a network namespace (experiments/loadgen/netns.py) and the load generator
run inside one.  Creating namespaces needs root and iproute2's `ip`; without them the
tests that create one are skipped with the precise reason (what is missing), and the
refusal itself is tested everywhere."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import start_server
from parallelnet.experiments.loadgen import netns
from parallelnet.experiments.loadgen import LoadSpec, format_report, run
from test_loadgen import Server, echo

pytestmark = pytest.mark.timeout(60)

MISSING = netns.missing()
needs_netns = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING} (not available here)")


def ip_out(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30).stdout


def assert_gone(name: str, *links: str) -> None:
    """Nothing of a namespace is left: not listed, no bind mount, no veth end."""
    assert name not in ip_out("netns", "list")
    assert not os.path.exists(netns.netns_path(name))
    listed = ip_out("-o", "link")
    for link in links:
        assert link not in listed


@pytest.fixture
def ns():
    with netns.ClientNamespace() as made:
        yield made
    assert_gone(made.name, made.host_if)


# ---- refusal (everywhere) ----------------------------------------------------------------

def test_refused_without_root_naming_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netns.NetnsError, match=r"need root .*uid 1000"):
        with netns.ClientNamespace():
            pass


def test_refused_without_ip(monkeypatch):
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    with pytest.raises(netns.NetnsError, match=r"iproute2's `ip` command"):
        with netns.ClientNamespace():
            pass


def test_loadspec_refuses_unknown_namespace():
    with pytest.raises(ValueError, match="no such network namespace"):
        run(LoadSpec(port=1, netns="pn-does-not-exist"))


# ---- the namespace itself ---------------------------------------------------------------

@needs_netns
def test_namespace_and_veth_pair_exist_then_are_removed():
    with netns.ClientNamespace() as ns:
        assert ns.name in ip_out("netns", "list")
        assert f"inet {ns.host_address}/30" in ip_out("addr", "show", "dev", ns.host_if)
        inside = ip_out("-n", ns.name, "addr", "show", "dev", ns.ns_if)
        assert f"inet {ns.client_address}/30" in inside
        assert ns.ns_if not in ip_out("-o", "link")        # its end is inside, not here
        assert len(ns.host_if) <= 15 and len(ns.ns_if) <= 15
    assert_gone(ns.name, ns.host_if, ns.ns_if)


@needs_netns
def test_removed_after_an_error():
    with pytest.raises(ZeroDivisionError):
        with netns.ClientNamespace() as ns:
            1 / 0
    assert_gone(ns.name, ns.host_if, ns.ns_if)


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_removed_after_a_signal(sig):
    child = textwrap.dedent("""
        import time
        from parallelnet.experiments.loadgen.netns import ClientNamespace
        with ClientNamespace() as ns:
            print(ns.name, ns.host_if, ns.ns_if, flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    name = host_if = ns_if = ""
    try:
        name, host_if, ns_if = proc.stdout.readline().split()
        assert name in ip_out("netns", "list")
        proc.send_signal(sig)
        proc.communicate(timeout=20)
        assert proc.returncode != 0
        assert_gone(name, host_if, ns_if)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if name and netns.exists(name):         # failed: still leave nothing behind
            subprocess.run(["ip", "netns", "del", name], timeout=30)
            subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)


@needs_netns
def test_parallel_namespaces_do_not_collide():
    with netns.ClientNamespace() as a, netns.ClientNamespace() as b:
        assert a.name != b.name and a.host_if != b.host_if
        assert not a.network.overlaps(b.network)
    assert_gone(a.name, a.host_if)
    assert_gone(b.name, b.host_if)


@needs_netns
def test_call_in_netns_runs_inside_and_is_bounded(ns):
    names = [n for _, n in netns.call_in_netns(ns.name, socket.if_nameindex, timeout=10)]
    assert ns.ns_if in names and ns.host_if not in names
    with pytest.raises(RuntimeError, match="ValueError"):
        netns.call_in_netns(ns.name, int, "not a number", timeout=10)
    t = time.monotonic()
    with pytest.raises(netns.NetnsError, match="killed"):
        netns.call_in_netns(ns.name, time.sleep, 30, timeout=0.5)
    assert time.monotonic() - t < 5


@needs_netns
def test_sysctl_is_per_namespace(ns):
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        before = f.read().split()
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40100")
    assert ns.read_sysctl("net.ipv4.ip_local_port_range") == "40000 40100"
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        assert f.read().split() == before


# ---- the load generator inside ---------------------------------------------------------------

def peer_recording_echo(c, srv):
    with srv.lock:
        srv.peers = getattr(srv, "peers", set()) | {c.getpeername()[0]}
    echo(c, srv)


@needs_netns
def test_loadgen_in_namespace_end_to_end(ns):
    srv = Server(peer_recording_echo, ns.host_address)
    try:
        r = run(LoadSpec(host=ns.host_address, port=srv.port, netns=ns.name, connections=4,
                         size=1000, max_requests=400, duration=5, warmup=0))
    finally:
        srv.close()
    assert r.ok and r.requests == 400, format_report(r)
    assert r.bytes_received == r.bytes_sent == 400 * 1000
    assert srv.peers == {ns.client_address}             # it really ran in there
    assert r.spec["netns"] == ns.name and f"in netns {ns.name}" in format_report(r)


@needs_netns
def test_namespace_is_isolated_from_root_loopback(ns):
    srv = Server(echo)                                  # 127.0.0.1 of the root namespace
    try:
        r = run(LoadSpec(port=srv.port, netns=ns.name, connections=2, duration=0.3, warmup=0))
    finally:
        srv.close()
    assert r.requests == 0 and r.errors["connect_refused"] >= 2 and srv.accepted == 0


@needs_netns
def test_project_server_on_the_veth_address_with_churn_at_rate(ns, tmp_path):
    srv = start_server(tmp_path, "--backend", "epoll", "--host", ns.host_address,
                       "--allow-remote", "--workers", "1")
    r = run(LoadSpec(host=srv.host, port=srv.port, netns=ns.name, mode="churn", rate=200,
                     connections=4, duration=0.5, warmup=0, timeout=2))
    final = srv.stop()
    assert r.ok and r.rate_met, format_report(r)
    assert sum(w["accepted"] for w in final["workers"]) == r.connects == r.requests


@needs_netns
def test_local_port_exhaustion_is_its_own_error_kind(ns):
    """Eight local ports in the namespace, TIME_WAIT kept (no reuse): churn runs out of
    ports and connect() fails with EADDRNOTAVAIL."""
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40007")
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0")
    srv = Server(echo, ns.host_address)
    try:
        r = run(LoadSpec(host=ns.host_address, port=srv.port, netns=ns.name, mode="churn",
                         rate=200, connections=2, duration=0.3, warmup=0))
    finally:
        srv.close()
    assert r.requests <= 8
    assert r.errors["addr_not_avail"] > 0
    assert r.errors["other"] == 0
    # every scheduled connect that went out is either done or one error
    assert r.requests + r.errors_total == r.scheduled - r.backlog
    assert "addr not avail" in format_report(r)


@needs_netns
def test_cli_netns_option(ns, capsys):
    from parallelnet.experiments import loadgen
    srv = Server(echo, ns.host_address)
    try:
        code = loadgen.main([f"{ns.host_address}:{srv.port}", "--netns", ns.name, "-c", "1",
                             "--max-requests", "20", "--warmup", "0"])
    finally:
        srv.close()
    assert code == 0 and f"in netns {ns.name}" in capsys.readouterr().out
