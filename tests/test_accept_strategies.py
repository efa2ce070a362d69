"""Accept strategies beyond the seed: CPU-steered SO_REUSEPORT."""

from __future__ import annotations

import os
import struct

from parallelnet.core.client import run_clients
from parallelnet.core.listeners import cpu_steering_program, layout_of


def test_steering_program_maps_each_cpu_to_its_first_worker():
    code = cpu_steering_program([2, 5, 2])
    insns = [struct.unpack("HBBI", code[i:i + 8]) for i in range(0, len(code), 8)]
    assert insns[0] == (0x20, 0, 0, (-0x1000 + 36) & 0xFFFFFFFF)  # A = current CPU
    assert insns[1:5] == [(0x15, 0, 1, 2), (0x06, 0, 0, 0), (0x15, 0, 1, 5), (0x06, 0, 0, 1)]
    assert insns[-1] == (0x06, 0, 0, 0xFFFFFFFF)  # no worker there: fall back to the hash
    assert len(insns) == 6  # the second worker on CPU 2 gets no rule of its own


def test_backends_see_reuseport_cpu_as_reuseport():
    assert layout_of("reuseport-cpu") == "reuseport"
    assert layout_of("shared") == "shared"


def test_reuseport_cpu_sends_connections_to_the_worker_on_the_clients_cpu(server_factory):
    """On loopback the SYN is processed on the connecting thread's CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    workers = [cpus[i % len(cpus)] for i in range(2)]
    srv = server_factory("--accept", "reuseport-cpu", "--workers", "2",
                         "--cpus", ",".join(map(str, cpus)))
    client_cpu = cpus[-1]
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {client_cpu})
    try:
        res = run_clients(srv.host, srv.port, connections=4, mode="short", max_requests=60,
                          duration=20)
    finally:
        os.sched_setaffinity(0, saved)
    final = srv.stop()
    assert res.errors == {} and res.requests == 60
    accepted = [w["accepted"] for w in final["workers"]]
    target = workers.index(client_cpu)
    assert accepted[target] == res.connects
    assert sum(accepted) == res.connects
