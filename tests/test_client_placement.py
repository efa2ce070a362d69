"""``--client local | netns | ssh://...``: where every framework experiment's load generator
runs (experiments/remote.py).

The end-to-end tests run ``parallelnet experiment load-curve --preset smoke`` with the
client in a network namespace, and with it on an "other host": an SSH server (asyncssh,
the test extra; no system sshd needed) started by the test *inside* a network namespace
the test creates, reached by the system ``ssh`` over the namespace's veth pair, with a
throw-away client key (the server's authorized key) and a throw-away host key (the only
one in the known-hosts file ssh is given).  The namespace shares this filesystem, so the
commands it runs are this tree's.  Both must give complete runs whose records have the
same keys as a local run's.  They need root and iproute2's ``ip``: without them they are
skipped with what is missing.  The parsing, the argument translation, the JSON round trip,
the version check and the layouts are tested everywhere.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from parallelnet.experiments import measure, provenance, remote
from parallelnet.experiments.loadgen import netns
from parallelnet.experiments.loadgen import LoadResult, LoadSpec, add_arguments, spec_from_args

pytestmark = pytest.mark.timeout(120)

MISSING = netns.missing()
needs_netns = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING} (not available here)")
CLI = [sys.executable, "-m", "parallelnet.core.cli", "experiment"]


# ---- everywhere: the option, the command sent, the result read back -------------------------

@pytest.mark.parametrize("text, kind, label", [
    ("local", "local", "local"),
    (None, "local", "local"),
    ("netns", "netns", "netns"),
    ("ssh://bench@10.0.0.2:2222", "ssh", "ssh://bench@10.0.0.2:2222"),
    ("ssh://10.0.0.2?identity=/k&known_hosts=/kh&connect_timeout=3", "ssh", "ssh://10.0.0.2"),
    ("ssh://[fd00::2]:22", "ssh", "ssh://[fd00::2]:22"),
])
def test_client_option_parses(text, kind, label):
    c = remote.parse_client(text)
    assert c.kind == kind and c.label == label
    assert c.elsewhere == (kind == "ssh")


@pytest.mark.parametrize("text, says", [
    ("remote", "expected local, netns or ssh://"),
    ("ssh://", "no host"),
    ("ssh://h/opt/pn", "takes no path"),
    ("ssh://u:pw@h", "no passwords"),
    ("ssh://h:99999", "port must be a number"),
    ("ssh://h?colour=red", "unknown option 'colour'"),
    ("ssh://h?host_key_check=maybe", "host_key_check must be one of"),
    ("ssh://h?connect_timeout=0", "connect_timeout must be 1..300"),
    ("ssh://h?bind=somewhere", "bind must be an IP address"),
])
def test_bad_client_option_says_why(text, says):
    with pytest.raises(ValueError, match=says):
        remote.parse_client(text)


def test_bad_client_option_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([*CLI, "load-curve", "--client", "ftp://x", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res
    assert len(res.stderr.strip().splitlines()) == 1 and "expected local, netns" in res.stderr
    assert not list(tmp_path.iterdir())


def test_ssh_command_is_batch_mode_and_bounded():
    c = remote.parse_client("ssh://root@10.0.0.2:2222?identity=/tmp/id&known_hosts=/tmp/kh"
                            "&connect_timeout=4&parallelnet=~/pn/.venv/bin/parallelnet")
    argv = c.ssh_argv("CMD")
    joined = " ".join(argv)
    for want in ("-T", "BatchMode=yes", "ConnectTimeout=4", "-p 2222", "-l root",
                 "-i /tmp/id", "IdentitiesOnly=yes", "UserKnownHostsFile=/tmp/kh",
                 "StrictHostKeyChecking=yes"):
        assert want in joined
    assert argv[-2:] == ["10.0.0.2", "CMD"]
    spec = LoadSpec(host="127.0.0.1", port=9, connections=2, duration=0.5, warmup=0.1)
    assert c.loadgen_command(spec).startswith('"$HOME"/pn/.venv/bin/parallelnet loadgen ')
    no_check = remote.parse_client("ssh://h?host_key_check=no").ssh_argv("CMD")
    assert "StrictHostKeyChecking=no" in no_check and "UserKnownHostsFile=/dev/null" in no_check


@pytest.mark.parametrize("fields", [
    dict(mode="closed", connections=4, threads=2, size=1000, depth=3, max_requests=77),
    dict(mode="open", rate=1234.5, protocol="http", path="/bytes/100", timeout=2.5),
    dict(mode="churn", rate=300, connections=8, protocol="http", service="exp:200",
         heavy="2:fixed:1000", requests_per_conn=5, seed=42, abort_on_mismatch=False),
    dict(targets=[("127.0.0.1", 9), ("127.0.0.2", 10)], connections=4),
])
def test_loadgen_arguments_give_the_same_spec_there(fields):
    """What the client host parses is the spec asked for (less cpus and netns)."""
    import argparse

    base = {"host": "127.0.0.1", "port": 9} if "targets" not in fields else {}
    spec = LoadSpec(**base, duration=0.75, warmup=0.25, cpus=[0], **fields)
    args = remote.loadgen_args(spec)
    assert args[0] == "loadgen" and args[-2:] == ["--json", "-"]
    p = argparse.ArgumentParser()
    add_arguments(p)
    there = spec_from_args(p.parse_args(args[1:]))
    assert there.resolved_targets() == spec.resolved_targets()
    for f in ("mode", "connections", "threads", "size", "depth", "rate", "duration", "warmup",
              "max_requests", "timeout", "abort_on_mismatch", "service", "heavy",
              "requests_per_conn", "seed"):
        assert getattr(there, f) == getattr(spec, f), f
    assert there.cpus is None and there.netns is None


def test_loadgen_json_on_stdout_round_trips(tmp_path):
    """``parallelnet loadgen --json -``: the report and the start line on stderr, the
    result on stdout, read back as the same LoadResult."""
    from test_loadgen import Server, echo

    srv = Server(echo)
    try:
        res = subprocess.run([sys.executable, "-m", "parallelnet.core.cli", "loadgen",
                              f"127.0.0.1:{srv.port}", "-c", "2", "--max-requests", "50",
                              "--warmup", "0", "--json", "-"],
                             capture_output=True, text=True, timeout=60)
    finally:
        srv.close()
    assert res.returncode == 0, res.stderr
    from parallelnet.experiments.loadgen import STARTED

    assert res.stderr.splitlines()[0] == STARTED and "Requests/sec" in res.stderr
    data = json.loads(res.stdout)
    r = LoadResult.from_dict(data)
    assert r.requests == 50 and r.ok and r.to_dict() == data
    assert isinstance(r.histogram[0], tuple) and r.targets[0].port == srv.port
    undefined = LoadResult.from_dict({**data, "jain": None})
    assert math.isnan(undefined.jain)


def test_version_check():
    here = {"version": "0.1.0", "commit": "967797d0123456789"}
    same = provenance.parse_version_line("parallelnet 0.1.0 (commit 967797d)")
    assert provenance.version_mismatch(here, same, "h") is None
    modified = provenance.parse_version_line("parallelnet 0.1.0 (commit 967797d, modified)")
    assert modified["modified"] and provenance.version_mismatch(here, modified, "h") is None
    other = provenance.parse_version_line("parallelnet 0.1.0 (commit abcdef1)")
    assert "at commit abcdef1, this tree is at 967797d01234" in provenance.version_mismatch(
        here, other, "h")
    older = provenance.parse_version_line("parallelnet 0.0.9 (commit 967797d)")
    assert "runs parallelnet 0.0.9" in provenance.version_mismatch(here, older, "h")
    wheel = provenance.parse_version_line("parallelnet 0.1.0")
    assert "cannot be checked" in provenance.version_mismatch(here, wheel, "h")
    assert "no working `parallelnet`" in provenance.version_mismatch(here, None, "h")
    assert provenance.parse_version_line("sh: parallelnet: not found") is None


def test_client_facts_parse_what_the_command_prints():
    out = subprocess.run(["sh", "-c", provenance.client_facts_command(
        remote._remote_word(sys.executable) + " -m parallelnet.core.cli")],
        capture_output=True, text=True, timeout=60).stdout
    facts = provenance.parse_client_facts(out, time.time())
    assert facts["kernel"] == os.uname().release and facts["cpus"] >= 1
    assert facts["hostname_hash"] == provenance.host_hash()
    assert facts["parallelnet"] and facts["parallelnet"]["version"]
    assert abs(facts["clock"]["offset_s"]) < 5
    assert set(facts["sysctl"]) == {k.replace("/", ".") for k in provenance.SYSCTLS}


def test_layout_when_the_client_is_elsewhere():
    cpus = sorted(os.sched_getaffinity(0))
    here = measure.Layout.default(1)
    with measure.client_elsewhere():
        there = measure.Layout.default(1)
    assert there.server == cpus and there.client == []
    assert measure.Layout.default(1) == here          # only while it lasts
    # A client with no CPU here is judged by its own threads' CPU.
    idle = {f"cpu{c}": {"busy": 0.1} for c in cpus}
    assert measure.bottleneck(idle, there, False, True, client_util=0.95) == "client"
    assert measure.bottleneck(idle, there, False, True, client_util=0.95,
                              client_threads=2) == "neither"
    assert measure.bottleneck(idle, there, True, True, client_util=0.2) == "offered"


# ---- end to end: the smoke load curve from a namespace and over ssh -------------------------

def _flat_keys(obj, prefix="") -> set[str]:
    """Key paths of nested dicts (not into lists, not into per-error-kind counts)."""
    out = set()
    for k, v in obj.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k != "errors_by_kind":
            out |= _flat_keys(v, f"{prefix}{k}.")
    return out


def _kind(rec) -> str:
    return rec["params"].get("kind", "")


def run_load_curve(out, *extra, timeout=100) -> tuple[subprocess.CompletedProcess, str | None]:
    out.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([*CLI, "load-curve", "--preset", "smoke", "--out", str(out), *extra],
                         capture_output=True, text=True, timeout=timeout)
    dirs = [os.path.join(out, d) for d in os.listdir(out)]
    return res, dirs[0] if dirs else None


def complete_run(res, outdir) -> tuple[dict, list[dict]]:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(os.path.join(outdir, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(outdir, "records.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    assert meta["outcome"] == "ok" and meta["failed"] == 0
    assert meta["points"] == meta["planned"] == len(recs) > 0
    assert all("error" not in r and r["requests"] > 0 for r in recs)
    return meta, recs


@pytest.fixture(scope="module")
def local_keys(tmp_path_factory):
    """Record keys of a local smoke run (one backend: the keys do not depend on it)."""
    res, outdir = run_load_curve(tmp_path_factory.mktemp("local"), "--set", 'backends=["epoll"]')
    meta, recs = complete_run(res, outdir)
    assert meta["client"] == {"placement": "local"}
    assert {r["client_placement"] for r in recs} == {"local"}
    return {kind: set.union(*(_flat_keys(r) for r in recs if _kind(r) == kind))
            for kind in {_kind(r) for r in recs}}


def same_keys(recs, local_keys) -> None:
    for r in recs:
        assert _flat_keys(r) == local_keys[_kind(r)], (
            _flat_keys(r) ^ local_keys[_kind(r)])


@needs_netns
def test_load_curve_with_the_client_in_a_namespace(tmp_path, local_keys):
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=30).stdout
    t = time.monotonic()
    res, outdir = run_load_curve(tmp_path, "--client", "netns")
    took = time.monotonic() - t
    meta, recs = complete_run(res, outdir)
    same_keys(recs, local_keys)
    c = meta["client"]
    assert c["placement"] == "netns" and c["client_cpus_pinned"]
    assert {r["client_placement"] for r in recs} == {"netns"}
    assert all(r["layout"]["client"] for r in recs)          # the local layout: CPUs kept
    # The namespace is gone again, and no other was left behind.
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=30).stdout
    assert c["namespace"] not in after and after == before
    assert took < 60, took


SSH_SERVER = textwrap.dedent('''
    """A minimal SSH server for the test: public-key auth for one user, every exec request
    run by /bin/sh -c with its stdout, stderr and exit status passed back."""
    import asyncio, signal, sys
    import asyncssh

    host, port, host_key, authorized, user = sys.argv[1:6]

    async def handle(process):
        if process.get_extra_info("username") != user or not process.command:
            process.stderr.write(b"refused\\n")
            process.exit(1)
            return
        child = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", process.command, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)

        async def pump(src, dst):
            while True:
                chunk = await src.read(65536)
                if not chunk:
                    return
                dst.write(chunk)

        try:
            await asyncio.gather(pump(child.stdout, process.stdout),
                                 pump(child.stderr, process.stderr))
            rc = await child.wait()
        except Exception:                       # the client went away: so does the command
            if child.returncode is None:
                child.kill()
                await child.wait()
            return
        process.exit(rc if rc >= 0 else 128 - rc)

    async def main():
        server = await asyncssh.listen(host, int(port), server_host_keys=[host_key],
                                       authorized_client_keys=authorized,
                                       process_factory=handle, encoding=None,
                                       allow_scp=False, agent_forwarding=False,
                                       x11_forwarding=False, password_auth=False,
                                       kbdint_auth=False)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
''')


class SshHost:
    """The "client host": an asyncssh server in a namespace, and the URL to reach it."""

    PORT = 2222

    def __init__(self, ns: netns.ClientNamespace, tmp) -> None:
        import asyncssh

        self.ns, self.dir = ns, tmp
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.identity = str(tmp / "id_ed25519")
        client_key.write_private_key(self.identity)
        os.chmod(self.identity, 0o600)                   # ssh refuses a readable key
        (tmp / "authorized_keys").write_bytes(client_key.export_public_key())
        (tmp / "host_key").write_bytes(host_key.export_private_key())
        os.chmod(tmp / "host_key", 0o600)
        self.known_hosts = str(tmp / "known_hosts")
        with open(self.known_hosts, "w") as f:
            f.write(f"[{ns.client_address}]:{self.PORT} "
                    f"{host_key.export_public_key().decode().strip()}\n")
        (tmp / "server.py").write_text(SSH_SERVER)
        # The commands it runs find this tree's `parallelnet` first on PATH.
        bindir = tmp / "bin"
        bindir.mkdir()
        (bindir / "parallelnet").write_text(
            f"#!/bin/sh\nexec {sys.executable} -m parallelnet.core.cli \"$@\"\n")
        os.chmod(bindir / "parallelnet", 0o755)
        env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        self.proc = subprocess.Popen(
            # -W ignore: a library's import-time warnings (cryptography 51 warns about DSA
            # as asyncssh imports it) are not the fixture's business.
            ["ip", "netns", "exec", ns.name, sys.executable, "-W", "ignore", str(tmp / "server.py"),
             ns.client_address, str(self.PORT), str(tmp / "host_key"),
             str(tmp / "authorized_keys"), "root"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        # Up to "ready", bounded: anything printed before it is kept for the error.
        said, deadline = [], time.monotonic() + 30
        while True:
            left = deadline - time.monotonic()
            ready = select.select([self.proc.stdout], [], [], max(0.0, left))[0] if left > 0 else []
            line = self.proc.stdout.readline() if ready else ""
            if line.strip() == "ready":
                break
            said.append(line)
            if not line or len(said) > 50:
                self.close()
                raise RuntimeError(f"the test's SSH server did not start: {''.join(said)!r}")

    def url(self, **options) -> str:
        opts = {"identity": self.identity, "known_hosts": self.known_hosts, **options}
        return (f"ssh://root@{self.ns.client_address}:{self.PORT}?"
                + "&".join(f"{k}={v}" for k, v in opts.items()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    if MISSING is not None:
        pytest.skip(f"{MISSING} (not available here)")
    if shutil.which("ssh") is None:
        pytest.skip("OpenSSH's client `ssh` is not on PATH")
    with netns.ClientNamespace() as ns:
        host = SshHost(ns, tmp_path_factory.mktemp("sshhost"))
        try:
            yield host
        finally:
            host.close()


@needs_netns
def test_load_curve_with_the_client_over_ssh(tmp_path, local_keys, ssh_host):
    t = time.monotonic()
    res, outdir = run_load_curve(tmp_path, "--client", ssh_host.url())
    took = time.monotonic() - t
    meta, recs = complete_run(res, outdir)
    same_keys(recs, local_keys)
    label = f"ssh://root@{ssh_host.ns.client_address}:{SshHost.PORT}"
    assert {r["client_placement"] for r in recs} == {label}
    c = meta["client"]
    assert c["placement"] == label and not c["client_cpus_pinned"]
    # The server listened where the host could reach it: this side of the veth pair.
    assert c["server_bind"] == ssh_host.ns.host_address and c["bind_from"] == "route"
    assert c["same_host_name"] is True            # the "other host" is this one, in a namespace
    host = c["host"]
    assert host["kernel"] == os.uname().release and host["cpus"] >= 1
    assert host["parallelnet"]["version"] == provenance.local_version()["version"]
    assert host["clock"]["unix"] and abs(host["clock"]["offset_s"]) < 5
    # Every CPU here may serve; no client CPU here.
    cpus = sorted(os.sched_getaffinity(0))
    assert all(r["layout"] == {"server": cpus, "client": []} for r in recs)
    # The client's figures are its own (measured there), in the same fields.
    assert all(r["client"]["cpu_s"] > 0 and r["client"]["latency_us"]["p50"] > 0 for r in recs)
    assert took < 60, took


def _peer_recording_server(host="127.0.0.1"):
    from test_loadgen import Server, echo

    def record(c, srv):
        with srv.lock:
            srv.peers = getattr(srv, "peers", set()) | {c.getpeername()[0]}
        echo(c, srv)

    return Server(record, host)


def _spec(srv, **kw):
    return LoadSpec(host=srv.host, port=srv.port, connections=2, max_requests=100,
                    duration=2, warmup=0, **kw)


def test_client_run_here():
    """``ctx.client.run(spec)`` (an experiment's own extra generator, e.g. balance's churn)."""
    srv = _peer_recording_server()
    try:
        r = remote.parse_client("local").run(_spec(srv))
    finally:
        srv.close()
    assert r.ok and r.requests == 100 and srv.peers == {"127.0.0.1"}


@needs_netns
def test_client_run_in_the_namespace():
    with remote.parse_client("netns") as client:
        assert client.server_args() == ["--host", client.bind, "--allow-remote"]
        srv = _peer_recording_server(client.bind)
        try:
            r = client.run(_spec(srv, cpus=[sorted(os.sched_getaffinity(0))[-1]]))
        finally:
            srv.close()
        name = client.ns.name
        assert r.ok and r.requests == 100 and srv.peers == {client.ns.client_address}
        assert r.spec["netns"] == name
    assert not netns.exists(name)                     # closed: the namespace is gone


@needs_netns
def test_client_run_over_ssh(ssh_host):
    client = remote.parse_client(ssh_host.url())
    with client:
        assert client.bind == ssh_host.ns.host_address
        srv = _peer_recording_server(client.bind)
        try:
            r = client.run(_spec(srv, cpus=[0]))       # CPU numbers of here: not sent there
        finally:
            srv.close()
    assert r.ok and r.requests == 100 and srv.peers == {ssh_host.ns.client_address}
    assert r.spec["cpus"] is None and r.spec["host"] == ssh_host.ns.host_address


@needs_netns
def test_another_version_on_the_client_host_is_refused(tmp_path, ssh_host):
    fake = ssh_host.dir / "old-parallelnet"
    fake.write_text("#!/bin/sh\necho 'parallelnet 0.0.1 (commit deadbee)'\n")
    os.chmod(fake, 0o755)
    res, outdir = run_load_curve(tmp_path, "--client", ssh_host.url(parallelnet=fake))
    assert res.returncode == 1 and outdir is None, res
    said = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(said) == 1 and "runs parallelnet 0.0.1" in said[0], res.stderr


@needs_netns
def test_an_unreachable_client_host_is_one_line(tmp_path, ssh_host):
    url = (f"ssh://root@{ssh_host.ns.client_address}:{SshHost.PORT + 1}"
           f"?identity={ssh_host.identity}&connect_timeout=3")
    t = time.monotonic()
    res, outdir = run_load_curve(tmp_path, "--client", url)
    assert res.returncode == 1 and outdir is None, res
    said = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(said) == 1 and "ssh failed" in said[0] and "refused" in said[0], res.stderr
    assert time.monotonic() - t < 30
