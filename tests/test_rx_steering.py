"""Receive steering of the netns placement (experiments/loadgen/netns.py steer_rx,
experiments/remote.py NetnsClient) and the `stack` experiment's summary arithmetic.

Without steering, a veth pair (like loopback) runs the receiver's TCP receive in the
sender's softirq; the placement writes rps_cpus on both ends so each side pays for its
own.  These tests read the masks back from sysfs: the kernel's view, not ours."""

from __future__ import annotations

import os
import subprocess

import pytest

from parallelnet.experiments import remote, stack
from parallelnet.experiments.loadgen import netns
from parallelnet.experiments.measure import Layout

MISSING = netns.missing()
needs_netns = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING} (not available here)")


def _host_mask(ns) -> str:
    with open(f"/sys/class/net/{ns.host_if}/queues/rx-0/rps_cpus") as f:
        return f.read().strip().replace(",", "").lstrip("0") or "0"


def _client_mask(ns) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns.name, "cat",
                          f"/sys/class/net/{ns.ns_if}/queues/rx-0/rps_cpus"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return out.strip().replace(",", "").lstrip("0") or "0"


def test_the_placement_options_parse_and_bad_ones_are_one_clear_error():
    assert remote.parse_client("netns").steer is True
    assert remote.parse_client("netns?steer=0").steer is False
    assert remote.parse_client("netns?steer=0").label == "netns?steer=0"
    for bad in ("netns?steer=2", "netns?rps=1", "netns?steer=1&x=2"):
        with pytest.raises(ValueError, match="steer=0 or steer=1"):
            remote.parse_client(bad)


@needs_netns
def test_place_steers_each_ends_receive_to_its_sides_cpus_and_steer0_clears_it():
    cpus = sorted(os.sched_getaffinity(0))
    layout = Layout([cpus[0]], [cpus[-1]])
    c = remote.NetnsClient(steer=True)
    c.open()
    try:
        c.place(layout)
        assert _host_mask(c.ns) == format(1 << cpus[0], "x")
        assert _client_mask(c.ns) == format(1 << cpus[-1], "x")
        assert c.masks == {"host_rps_cpus": format(1 << cpus[0], "x"),
                           "client_rps_cpus": format(1 << cpus[-1], "x")}
    finally:
        c.close()
    assert not netns.exists(c.facts().get("namespace") or "none")
    c = remote.NetnsClient(steer=False)
    c.open()
    try:
        c.place(layout)
        assert _host_mask(c.ns) == "0" and _client_mask(c.ns) == "0"
    finally:
        c.close()


def test_stack_summary_pairs_placements_within_repetitions():
    def rec(pl, rep, server, client=20.0):
        return {"config": f"epoll/echo-64/{pl}", "rep": rep, "bound": "offered",
                "params": {"backend": "epoll", "protocol": "echo", "size": 64, "rate": 1000,
                           "placement": pl},
                "server": {"cpu_us_per_req": server}, "client": {"cpu_us_per_req": client,
                                                                 "latency_us": {"p99": 100.0}}}
    # Loopback is 2 µs dearer than steered veth in every repetition, whatever the drift.
    records = []
    for rep, drift in enumerate((0.0, 1.0, -0.5)):
        records += [rec("loopback", rep, 20 + drift), rec("veth", rep, 20 + drift),
                    rec("veth-steered", rep, 18 + drift)]
    p = {"workloads": [["echo", 64, 1000]]}
    notes = stack.PlanNotes(["epoll/loopback", "epoll/veth", "epoll/veth-steered"], {})
    s = stack.summarize(records, p, notes)
    moved = s.values["moved_us.epoll.echo-64.veth-steered"]
    assert moved["estimate"] == pytest.approx(2.0) and moved["kind"] == "range"
    assert s.values["ratio.epoll.echo-64.veth"]["estimate"] == pytest.approx(1.0)
    assert any("loopback charges the server 2.00 µs" in f for f in s.findings)
    assert [t.key for t in s.tables][:2] == ["all", "compact"]
