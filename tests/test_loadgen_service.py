"""The load generator's server-bound workloads: service times, connection classes,
several requests per churned connection, and two runs at once in one process.

Runs go against the real HTTP server (``epoll``, one worker: its ``GET /work/US`` route
burns US µs of CPU), started once for the module.  Every figure asserted is either
exact by construction (a fixed service time, the seeded draws of one connection, M
requests per connection) or, for the distributions, inside 5 standard errors of the
sample size it is computed from; the draws are seeded, so the checks are also
deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import threading
import time

import pytest

from conftest import start_server
from parallelnet.core import procfs
from parallelnet.experiments import loadgen
from parallelnet.experiments.loadgen import (MAX_US, LoadSpec, format_report, parse_heavy,
                                             parse_service, run, sample_service)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("loadgen_service"), "--backend", "epoll",
                       "--protocol", "http", "--workers", "1")
    yield srv
    srv.stop()


def http(srv, **kw) -> LoadSpec:
    return LoadSpec(port=srv.port, protocol="http", **kw)


server_cpu_ns = procfs.process_cpu_ns   # every thread of the process (schedstat: ns, exact)


def assert_clean(r) -> None:
    assert r.ok and r.errors_total == 0 and r.non2xx == 0 and not r.aborted, format_report(r)


def assert_class_sums(r) -> None:
    """The classes split the totals: requests, work and histogram counts add up."""
    light, heavy = r.classes["light"], r.classes["heavy"]
    assert light.requests + heavy.requests == r.requests
    assert light.work_us + heavy.work_us == r.work_us
    for c in (light, heavy):
        assert sum(n for _, n in c.histogram) == c.requests
        if c.requests:
            assert 0 < c.latency["p50"] <= c.latency["p99"] <= c.latency["p99.9"] <= c.latency_max_us
            assert c.latency_min_us <= c.latency_mean_us <= c.latency_max_us


# ---- parsing and validation (no server) --------------------------------------------------

def test_parse_service_forms():
    assert parse_service("fixed:200") == loadgen.ServiceTime("fixed:200", "fixed", 0, 200, 0, 200)
    e = parse_service("exp:100")
    assert (e.kind, e.a, e.mean_us) == ("exp", 100, 100)
    b = parse_service("bimodal:0.995:50:5000")
    assert (b.p, b.a, b.b) == (0.995, 50, 5000)
    assert b.mean_us == pytest.approx(0.995 * 50 + 0.005 * 5000)
    ln = parse_service("lognormal:100:1")
    # mu chosen so that the distribution's mean is MEAN: exp(mu + sigma^2 / 2) = 100
    assert math.exp(ln.a + ln.b ** 2 / 2) == pytest.approx(100) and ln.b == 1
    assert parse_heavy("2:fixed:5000") == (2, parse_service("fixed:5000"))


@pytest.mark.parametrize("spec, message", [
    ("uniform:5", "unknown distribution 'uniform'"),
    ("fixed", "fixed takes 1 parameter"),
    ("fixed:1:2", "fixed takes 1 parameter"),
    ("fixed:abc", "US must be a finite number"),
    ("fixed:-1", "US must be >= 0"),
    ("fixed:100000000", "US must be .*<= 99999999"),
    ("exp:0", "MEAN must be > 0"),
    ("exp:nan", "MEAN must be a finite number"),
    ("exp:inf", "MEAN must be a finite number"),
    ("bimodal:0.5:50", "bimodal takes 3 parameters"),
    ("bimodal:1.5:50:5000", "P must be >= 0 and <= 1"),
    ("bimodal:-0.1:50:5000", "P must be"),
    ("bimodal:0.5:-1:5000", "US1 must be >= 0"),
    ("bimodal:0.5:1:1e9", "US2 must be"),
    ("lognormal:100", "lognormal takes 2 parameters"),
    ("lognormal:0:1", "MEAN must be > 0"),
    ("lognormal:100:-1", "SIGMA must be >= 0"),
    ("lognormal:100:11", "SIGMA must be"),
])
def test_bad_service_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message) as exc:
        run(LoadSpec(port=1, protocol="http", service=spec))
    assert f"service {spec!r}" in str(exc.value)          # and say which spec


@pytest.mark.parametrize("kwargs, message", [
    (dict(service=5), "service must be a string"),
    (dict(heavy="fixed:5000"), "K .* must be an integer >= 1"),
    (dict(heavy="0:fixed:5"), "K .* must be an integer >= 1"),
    (dict(heavy="x:fixed:5"), "K .* must be an integer >= 1"),
    (dict(heavy="2"), "heavy must be 'K:SPEC'"),
    (dict(heavy="2:exp:-1"), "heavy 'exp:-1': MEAN must be > 0"),
    (dict(heavy="5:fixed:1", connections=4), r"K \(5\) must not exceed connections \(4\)"),
    (dict(service="fixed:1", protocol="echo"), "need protocol http"),
    (dict(heavy="1:fixed:1", protocol="echo"), "need protocol http"),
    (dict(service="fixed:1", path="/x"), "replaces the request path"),
    (dict(requests_per_conn=0, mode="churn"), "requests_per_conn must be in 1"),
    (dict(requests_per_conn=True, mode="churn"), "requests_per_conn must be an integer"),
    (dict(requests_per_conn=2), "requests_per_conn is for mode='churn'"),
    (dict(requests_per_conn=2, mode="open", rate=10), "requests_per_conn is for mode='churn'"),
    (dict(seed=-1), "seed must be in 0"),
    (dict(seed="1"), "seed must be an integer"),
])
def test_bad_service_fields_name_the_problem(kwargs, message):
    kw = dict(port=1, protocol="http") | kwargs
    with pytest.raises(ValueError, match=message):
        run(LoadSpec(**kw))


def test_c_and_python_agree_on_classes_and_cap():
    from parallelnet.experiments.loadgen._loadgen import ffi, lib
    assert lib.LG_NCLASS == len(loadgen.CLASSES) == len(ffi.new("struct lg_result *").classes)
    assert (lib.LG_LIGHT, lib.LG_HEAVY) == (0, 1)
    assert lib.LG_MAX_US == MAX_US


# ---- the draws (no server: the C generator's own draw, through lg_sample) -----------------

N = 200_000


def test_exp_draws_have_their_mean():
    x = sample_service("exp:100", N)
    se = 100 / math.sqrt(N)                     # an exponential's sd is its mean
    assert abs(statistics.fmean(x) - 100) < 5 * se
    # its median is mean * ln 2 (69.3): half the draws at most 69 (< 69.5 before rounding)
    below = sum(v <= 69 for v in x) / N
    assert abs(below - (1 - math.exp(-69.5 / 100))) < 5 * math.sqrt(0.25 / N)


def test_bimodal_draws_have_their_fraction():
    x = sample_service("bimodal:0.9:50:5000", N)
    assert set(x) == {50, 5000}
    frac = x.count(50) / N
    assert abs(frac - 0.9) < 5 * math.sqrt(0.9 * 0.1 / N)
    assert set(sample_service("bimodal:1:50:5000", 1000)) == {50}
    assert set(sample_service("bimodal:0:50:5000", 1000)) == {5000}


def test_lognormal_draws_have_their_mean_and_median():
    x = sample_service("lognormal:100:1", N)
    sd = 100 * math.sqrt(math.e - 1)            # a lognormal's sd: mean * sqrt(e^s^2 - 1)
    assert abs(statistics.fmean(x) - 100) < 5 * sd / math.sqrt(N)
    median = math.exp(parse_service("lognormal:100:1").a)          # e^mu = 60.65
    below = sum(v <= round(median) - 1 for v in x) / N              # draws < 60.5
    expect = statistics.NormalDist().cdf(math.log(round(median) - 0.5) - math.log(median))
    assert abs(below - expect) < 5 * math.sqrt(0.25 / N)


def test_draws_are_rounded_capped_and_seeded():
    assert set(sample_service("fixed:200.4", 100)) == {200}
    assert set(sample_service("fixed:200.5", 100)) == {201}
    assert set(sample_service("fixed:0", 100)) == {0}
    huge = sample_service(f"lognormal:{MAX_US}:3", 10_000)
    assert max(huge) == MAX_US and min(huge) >= 0
    a = sample_service("exp:100", 1000, seed=3, conn=0)
    assert a == sample_service("exp:100", 1000, seed=3, conn=0)      # reproducible
    assert a != sample_service("exp:100", 1000, seed=4, conn=0)      # seed matters
    assert a != sample_service("exp:100", 1000, seed=3, conn=1)      # streams differ


# ---- against the real server ----------------------------------------------------------------

def test_fixed_service_time_reaches_the_server(server):
    cpu0 = server_cpu_ns(server.proc.pid)
    r = run(http(server, service="fixed:200", connections=2, duration=1.0, warmup=0.1))
    cpu = server_cpu_ns(server.proc.pid) - cpu0
    assert_clean(r)
    assert r.requests > 100
    assert r.work_us == r.requests * 200                       # exact for fixed
    assert set(r.classes) == {"light", "heavy"}
    light, heavy = r.classes["light"], r.classes["heavy"]
    assert (light.connections, light.service, light.requests) == (2, "fixed:200", r.requests)
    assert (heavy.connections, heavy.service, heavy.requests, heavy.work_us) == (0, None, 0, 0)
    assert light.work_mean_us == 200
    assert_class_sums(r)
    # the server burned the 200 µs before every answer: no answer came sooner, and the
    # server spent at least the work asked for (warm-up requests came on top)
    assert r.latency_min_us >= 200 and light.latency_min_us >= 200
    assert cpu >= r.work_us * 1000
    d = r.to_dict()
    json.dumps(d)
    assert d["work_us"] == r.work_us and d["classes"]["light"]["histogram"]
    assert "fixed:200" in format_report(r)


def test_exp_work_is_the_seeded_draws_of_connection_0(server):
    """One connection, no warm-up, a request budget: the measured requests are exactly
    connection 0's first n draws, which lg_sample reproduces."""
    n = 300
    r = run(http(server, service="exp:100", seed=7, connections=1, max_requests=n,
                 warmup=0, duration=10))
    assert_clean(r)
    assert r.requests == n
    draws = sample_service("exp:100", n, seed=7, conn=0)
    assert r.work_us == sum(draws)
    assert abs(r.work_us / n - 100) < 5 * 100 / math.sqrt(n)   # and it is exp(100)-like


def test_bimodal_fraction_through_the_server(server):
    n = 400
    r = run(http(server, service="bimodal:0.5:0:400", connections=2, max_requests=n,
                 warmup=0, duration=10))
    assert_clean(r)
    assert r.requests == n
    long_ones, rest = divmod(r.work_us, 400)                  # each request: 0 or 400 µs
    assert rest == 0
    assert abs(long_ones - n / 2) < 5 * math.sqrt(n * 0.25)


def test_heavy_connections_get_the_heavy_class(server):
    r = run(http(server, service="fixed:10", heavy="1:fixed:1000", connections=4,
                 duration=0.6, warmup=0.1))
    assert_clean(r)
    light, heavy = r.classes["light"], r.classes["heavy"]
    assert (light.connections, heavy.connections) == (3, 1)
    assert (light.service, heavy.service) == ("fixed:10", "fixed:1000")
    assert light.requests > 0 and heavy.requests > 0
    assert heavy.requests == r.per_connection[0]               # connection 0 is the heavy one
    assert light.requests == sum(r.per_connection[1:])
    assert heavy.work_us == 1000 * heavy.requests and light.work_us == 10 * light.requests
    assert heavy.latency_min_us >= 1000 and light.latency_min_us >= 10
    assert_class_sums(r)
    text = format_report(r)
    assert "heavy" in text and "fixed:1000" in text


def test_heavy_without_service_leaves_light_on_the_plain_path(server):
    r = run(http(server, heavy="1:fixed:500", connections=2, duration=0.4, warmup=0))
    assert_clean(r)
    light, heavy = r.classes["light"], r.classes["heavy"]
    assert light.service is None and light.requests > 0 and light.work_us == 0
    assert heavy.work_us == 500 * heavy.requests > 0
    assert_class_sums(r)


def test_no_service_no_classes(server):
    r = run(http(server, connections=2, duration=0.2, warmup=0))
    assert_clean(r)
    assert r.classes is None and r.work_us == 0 and r.targets[0].work_us == 0


def test_churn_five_requests_per_connection(server):
    """No warm-up: every connection that sent its first request in the window is
    measured whole, and connects counts exactly those (see docs/loadgen.md)."""
    r = run(http(server, mode="churn", requests_per_conn=5, service="fixed:20", connections=2,
                 duration=0.5, warmup=0))
    assert_clean(r)
    assert r.connects > 10
    assert r.requests == 5 * r.connects
    assert r.work_us == 20 * r.requests
    assert r.client_cpu_us_per_conn == pytest.approx(5 * r.client_cpu_us_per_req)
    assert "5 requests per connection" in format_report(r)


def test_churn_at_a_rate_with_requests_per_conn(server):
    r = run(http(server, mode="churn", rate=100, requests_per_conn=3, connections=4,
                 duration=0.5, warmup=0.1))
    assert_clean(r)
    assert r.rate_met and r.backlog == 0 and abs(r.scheduled - 50) <= 1
    assert r.requests == 3 * r.connects == 3 * r.scheduled
    assert r.achieved_rate == pytest.approx(r.connects / 0.5)  # connections/s, not requests/s


def test_two_runs_at_once_in_one_process(server):
    """A keep-alive open loop and a churn stream side by side, from two Python threads,
    each pinned to its own CPU: both complete, and neither's figures leak into the other's."""
    cpus = sorted(os.sched_getaffinity(0))
    specs = [http(server, mode="open", rate=400, connections=4, service="fixed:50",
                  duration=1.0, warmup=0.2, cpus=[cpus[0]]),
             http(server, mode="churn", rate=100, connections=4, requests_per_conn=2,
                  service="fixed:30", heavy="1:fixed:60", seed=5, duration=1.0, warmup=0.2,
                  cpus=[cpus[-1]])]
    start = threading.Barrier(2)
    results: list = [None, None]
    spans: list = [None, None]

    def go(i):
        start.wait(timeout=10)
        t0 = time.monotonic()
        try:
            results[i] = run(specs[i])
        except Exception as exc:               # reported below, not lost in the thread
            results[i] = exc
        spans[i] = (t0, time.monotonic())

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    open_r, churn_r = results
    assert not isinstance(open_r, Exception), open_r
    assert not isinstance(churn_r, Exception), churn_r
    # they ran at the same time (each call lasts warm-up + window, 1.2 s)
    assert max(s for s, _ in spans) + 1.0 < min(e for _, e in spans)
    for r in results:
        assert_clean(r)
        assert r.rate_met
        assert_class_sums(r)
    assert abs(open_r.requests - 400) <= 8 and all(n >= 90 for n in open_r.per_connection)
    assert open_r.work_us == 50 * open_r.requests
    assert open_r.classes["heavy"].requests == 0
    assert churn_r.requests == 2 * churn_r.connects and abs(churn_r.connects - 100) <= 2
    light, heavy = churn_r.classes["light"], churn_r.classes["heavy"]
    assert light.work_us == 30 * light.requests and heavy.work_us == 60 * heavy.requests
    assert heavy.requests > 0
    from parallelnet.experiments.loadgen import loadgen as wrapper

    assert wrapper._fd_reserved == 0           # both runs gave their descriptors back


def test_cli_flags(server, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    helptext = parser.format_help()
    for flag in ("--service", "--heavy-conns", "--requests-per-conn", "--seed"):
        assert flag in helptext
    out = tmp_path / "r.json"
    # a bare address with --service is HTTP: service times exist only there
    args = parser.parse_args([f"127.0.0.1:{server.port}", "-c", "3", "-d", "300ms",
                              "--warmup", "0", "--service", "exp:50", "--heavy-conns",
                              "1:fixed:300", "--seed", "9", "--json", str(out)])
    assert loadgen.main_from_args(args) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert "exp:50" in text and "fixed:300" in text
    data = json.loads(out.read_text())
    assert data["spec"]["protocol"] == "http" and data["spec"]["seed"] == 9
    assert data["classes"]["heavy"]["work_us"] == 300 * data["classes"]["heavy"]["requests"]
    assert data["work_us"] == sum(c["work_us"] for c in data["classes"].values())

    args = parser.parse_args([f"http://127.0.0.1:{server.port}/", "--mode", "churn", "-c", "2",
                              "-d", "200ms", "--warmup", "0", "--requests-per-conn", "4",
                              "--json", str(out)])
    assert loadgen.main_from_args(args) == 0
    data = json.loads(out.read_text())
    assert data["requests"] == 4 * data["connects"] > 0 and data["classes"] is None

    args = parser.parse_args([f"127.0.0.1:{server.port}", "--service", "exp:-3"])
    assert loadgen.main_from_args(args) == 2
    assert "MEAN must be > 0" in capsys.readouterr().err


def test_pipelined_requests_are_built_per_request(server):
    """depth 8 on one connection: up to 8 requests built back to back in the
    connection's buffer; the work is still exactly connection 0's draws, in order."""
    n = 800
    r = run(http(server, service="exp:20", seed=11, connections=1, depth=8, max_requests=n,
                 warmup=0, duration=10))
    assert_clean(r)
    assert r.requests == n
    assert r.work_us == sum(sample_service("exp:20", n, seed=11, conn=0))


def test_open_loop_with_service(server):
    r = run(http(server, mode="open", rate=300, connections=3, service="lognormal:40:0.5",
                 duration=0.5, warmup=0.1))
    assert_clean(r)
    assert r.rate_met and abs(r.requests - 150) <= 3
    assert 0 < r.work_us and r.classes["light"].requests == r.requests


def test_churn_budget_counts_requests(server):
    # closed churn charges each request; at a rate a connect takes its M at once, so
    # the budget ends on a whole connection (12 // 5 = 2 connections)
    r = run(http(server, mode="churn", requests_per_conn=5, connections=2, max_requests=23,
                 warmup=0, duration=10))
    assert r.requests == 23 and r.errors_total == 0
    r = run(http(server, mode="churn", rate=200, requests_per_conn=5, connections=2,
                 max_requests=12, warmup=0, duration=10))
    assert r.requests == 10 and r.connects == 2 and r.errors_total == 0


def test_later_requests_of_a_connection_count_from_their_send(server):
    """A server that answers a new connection's first request 100 ms late: that one
    request per connection is slow (its latency runs from the connect); the other M-1
    are measured from their own send, so they are fast."""
    from test_loadgen import Server, http_server

    def slow_first(c, srv):
        time.sleep(0.1)
        http_server(200)(c, srv)

    srv = Server(slow_first)
    try:
        r = run(LoadSpec(port=srv.port, protocol="http", mode="churn", requests_per_conn=4,
                         connections=2, duration=0.35, warmup=0, timeout=2))
    finally:
        srv.close()
    assert_clean(r)
    slow = sum(c for v, c in r.histogram if v >= 99_000_000)
    assert r.connects >= 4 and r.requests == 4 * r.connects
    assert slow == r.connects                     # exactly one slow request per connection
    assert r.latency["p50"] < 50_000
