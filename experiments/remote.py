"""Where the load generator runs: ``--client local | netns | ssh://[user@]host[:port]``.

Every framework experiment starts its load generator through one :class:`Client`, the
run's ``ctx.client`` (experiments/framework.py); :func:`experiments.measure.measure` takes
it from the server the Context started (or from its ``client`` argument), and an
experiment with a second generator of its own (balance's churn) runs it with
``ctx.client.run(spec)``.  Three placements:

* ``local`` (the default): a thread of the experiment process, pinned to the layout's
  client CPUs; the server listens on 127.0.0.1.  Today's layout (experiments/measure.py,
  ``Layout.default``).
* ``netns``: the same thread, its generator forked into a network namespace joined to
  this one by a veth pair (experiments/loadgen/netns.py, made when the run starts and removed when
  it ends); the server listens on the root side's veth address (``--allow-remote``).  Same
  CPUs as ``local``: only the packet path changes (a device, its queue, its softirq).
  Each end's receive is steered to its own side's CPUs (RPS, ``ClientNamespace.steer_rx``):
  the server's CPUs process what the server receives, the client's CPUs what the client
  receives, so the server's CPU no longer includes the client's TCP receive (on loopback,
  and on a veth without steering, the receiver's stack runs in the sender's softirq).
  ``netns?steer=0`` keeps veth's default (receive on the sender's CPU), the middle step
  of the loopback/veth ablation (``parallelnet experiment stack``).
* ``ssh://[user@]host[:port][?key=value&...]``: ``parallelnet loadgen ... --json -`` on
  that host, started with the system ``ssh`` (``BatchMode=yes``: never a prompt; a
  bounded ``ConnectTimeout``); its JSON comes back on stdout and becomes the same
  :class:`~parallelnet.experiments.loadgen.LoadResult`.  The server listens on the address
  of this machine that the route to that host leaves from (or ``bind=``); its CPU is still
  read here, from ``/proc``.  The client's CPUs are not this machine's, so every CPU here
  may serve (``Layout.default`` gives the server all of them and the client none), the
  generator's threads are not pinned there, and a point's ``client`` bottleneck is judged
  by the generator's own CPU (its threads' time, which it measures itself).

  When the run starts, the host's facts go into ``meta.json`` (``client``: kernel, CPU
  model and count, clock against ours, clocksource, sysctls, its ``parallelnet --version``)
  and a host whose parallelnet has another version or commit than this tree is refused
  with one line.  The window: the remote generator says ``parallelnet loadgen: started``
  on stderr as it starts; the moment that line arrives here is the start of its warm-up,
  the server's window is timed from it (late by the connection's one-way delay, well
  inside any warm-up).

  URL options (``?k=v&k=v``): ``identity=PATH`` (a private key, only that one),
  ``known_hosts=PATH`` (the host keys to trust, checked strictly), ``host_key_check=
  yes|accept-new|no`` (``no``: no host-key check at all, for throw-away hosts),
  ``connect_timeout=S`` (default 10), ``bind=ADDR`` (the server's address, when the route
  does not give the one that host can reach), ``parallelnet=CMD`` (the command on that
  host, default ``parallelnet`` on its PATH; ``~/`` is its home).  More ``ssh`` options:
  the environment variable ``PARALLELNET_SSH_ARGS`` (split as a shell would), e.g.
  ``-F ~/.ssh/bench_config``.

Records are the same in every placement (experiments/measure.py), plus
``client_placement``: ``local``, ``netns`` or ``ssh://[user@]host[:port]``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from urllib.parse import parse_qsl, urlsplit

#: What ``--client`` takes, for messages.
SYNTAX = ("local, netns or ssh://[user@]host[:port][?option=value&...] (netns?steer=0: "
          "veth without receive steering)")
SSH_OPTIONS = ("identity", "known_hosts", "host_key_check", "connect_timeout", "bind",
               "parallelnet")
HOST_KEY_CHECKS = ("yes", "accept-new", "no")
#: Seconds a remote generator may take from ``ssh`` starting to saying "started"
#: (connection, login, the interpreter's start-up and imports), beyond ConnectTimeout.
START_GRACE = 30.0


class ClientError(RuntimeError):
    """The client placement cannot be used; the message is one line saying why."""


# -- a generator run in progress ------------------------------------------------------------

class Job:
    """One load generator run, started: when it started, and (later) its result."""

    pids: tuple = ()     # local processes of the client outside this one's tree (none)

    def started(self, timeout: float) -> float:
        """``time.monotonic()`` at which the generator started (its warm-up began)."""
        raise NotImplementedError

    def result(self, timeout: float):
        """The LoadResult; raises what the run raised.  Bounded by ``timeout``."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop it if it can be stopped (after an error or an interruption here)."""


class ThreadJob(Job):
    """``loadgen.run(spec)`` in a thread of this process (it releases the GIL for the run);
    with ``spec.netns`` it forks into that namespace."""

    def __init__(self, spec) -> None:
        from parallelnet.experiments.loadgen import run

        self._out: dict = {}

        def body():
            try:
                self._out["lg"] = run(spec)
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self._out["error"] = exc

        self._thread = threading.Thread(target=body, name="loadgen", daemon=True)
        self._t = time.monotonic()
        self._thread.start()

    def started(self, timeout: float) -> float:
        return self._t

    def result(self, timeout: float):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("load generator did not return (it is bounded by its timeout; "
                               "this is a bug)")
        if "error" in self._out:
            raise self._out["error"]
        return self._out["lg"]


class SshJob(Job):
    """``ssh ... parallelnet loadgen ... --json -``: stdout is the JSON, stderr the report
    (and first the "started" line)."""

    def __init__(self, argv: list[str], where: str) -> None:
        from parallelnet.experiments.loadgen import STARTED

        self.where = where
        self._started = threading.Event()
        self._t: float | None = None
        self._err: list[str] = []
        self._out: list[bytes] = []
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)

        def read_err():
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                if line.strip() == STARTED and self._t is None:
                    self._t = time.monotonic()
                    self._started.set()
                else:
                    self._err.append(line)
            self._started.set()          # EOF: it ended (maybe without starting)

        def read_out():
            self._out.append(self.proc.stdout.read())

        self._readers = [threading.Thread(target=f, daemon=True, name=f"ssh-{f.__name__}")
                         for f in (read_err, read_out)]
        for th in self._readers:
            th.start()

    def _said(self, n: int = 6) -> str:
        lines = [ln for ln in self._err if ln.strip()]
        return " | ".join(lines[-n:]) or "nothing"

    def started(self, timeout: float) -> float:
        if not self._started.wait(timeout):
            self.cancel()
            raise ClientError(f"the load generator on {self.where} did not start within "
                              f"{timeout:g}s (ssh killed); it said: {self._said()}")
        if self._t is None:
            self.proc.wait(10)
            raise ClientError(f"the load generator on {self.where} did not start "
                              f"({_exit_text(self.proc.returncode)}); it said: {self._said()}")
        return self._t

    def result(self, timeout: float):
        from parallelnet.experiments.loadgen import LoadResult

        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise ClientError(f"the load generator on {self.where} ran past {timeout:g}s "
                              "(ssh killed)") from None
        for th in self._readers:
            th.join(10)
        text = b"".join(self._out).decode(errors="replace").strip()
        try:
            data = json.loads(text.splitlines()[-1]) if text else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ClientError(f"the load generator on {self.where} gave no result "
                              f"({_exit_text(self.proc.returncode)}); it said: {self._said()}")
        # Exit status 1 with a result is a run that was not ok (errors, a rate not met):
        # the result says so, as a local run's would.
        return LoadResult.from_dict(data)

    def cancel(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)   # its own session: ssh alone
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _exit_text(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc == 255:
        return "ssh failed, exit status 255"
    if rc == 127:
        return "exit status 127: command not found there"
    return f"exit status {rc}" if rc >= 0 else f"killed by {signal.Signals(-rc).name}"


# -- the placements -----------------------------------------------------------------------------

class Client:
    """Where the load generator runs (the base: here, on the layout's client CPUs)."""

    kind = "local"
    #: Its CPUs are not this machine's: every CPU here may serve (Layout.default).
    elsewhere = False

    def __init__(self) -> None:
        self.bind: str | None = None     # the address servers listen on (None: loopback)
        self.opened = False

    @property
    def label(self) -> str:
        """What records and meta.json call it."""
        return self.kind

    def open(self) -> None:
        """Make it usable (a namespace, a checked remote host); once per run."""
        self.opened = True

    def close(self) -> None:
        """Undo :meth:`open`; idempotent."""
        self.opened = False

    def __enter__(self) -> "Client":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def facts(self) -> dict:
        """Provenance (``meta.json`` ``client``)."""
        return {"placement": self.label}

    def server_args(self) -> list[str]:
        """What ``parallelnet serve`` needs so that the client can reach it."""
        return ["--host", self.bind, "--allow-remote"] if self.bind else []

    def place(self, layout) -> None:
        """Told the point's layout (experiments.measure.Layout) before its generator starts:
        a placement that depends on it (netns's receive steering) adjusts here."""

    def prepare(self, spec):
        """The spec as this placement runs it (a copy)."""
        return dataclasses.replace(spec)

    def start(self, spec) -> Job:
        return ThreadJob(self.prepare(spec))

    def limit(self, spec) -> float:
        """Seconds a run of ``spec`` may take, start-up included."""
        return spec.warmup + spec.duration + spec.timeout + 30

    def run(self, spec):
        """Run ``spec`` here or there and return its LoadResult (what loadgen.run does)."""
        job = self.start(spec)
        try:
            job.started(START_GRACE + 30)
            return job.result(self.limit(spec))
        except BaseException:
            job.cancel()
            raise


LocalClient = Client


class SshClient(Client):
    """The load generator on another host, over the system ``ssh`` (module docstring)."""

    kind = "ssh"
    elsewhere = True

    def __init__(self, url: str) -> None:
        super().__init__()
        u = urlsplit(url)
        if u.scheme != "ssh":
            raise ValueError(f"--client {url!r}: expected {SYNTAX}")
        try:
            port = u.port
        except ValueError:
            raise ValueError(f"--client {url!r}: the port must be a number in 1..65535") from None
        host = u.hostname
        if not host or host.startswith("-"):
            raise ValueError(f"--client {url!r}: no host (expected ssh://[user@]host[:port])")
        if u.path not in ("", "/"):
            raise ValueError(f"--client {url!r}: an ssh:// URL takes no path (the remote "
                             "command is ?parallelnet=CMD)")
        if u.password is not None:
            raise ValueError(f"--client {url!r}: no passwords in the URL (ssh runs in batch "
                             "mode: keys only)")
        self.user, self.host, self.port = u.username, host, port
        opts: dict[str, str] = {}
        for key, value in parse_qsl(u.query, keep_blank_values=True):
            if key not in SSH_OPTIONS:
                raise ValueError(f"--client {url!r}: unknown option {key!r} (known: "
                                 f"{', '.join(SSH_OPTIONS)})")
            opts[key] = value
        self.options = opts
        check = opts.get("host_key_check")
        if check is not None and check not in HOST_KEY_CHECKS:
            raise ValueError(f"--client {url!r}: host_key_check must be one of "
                             f"{', '.join(HOST_KEY_CHECKS)}, got {check!r}")
        try:
            self.connect_timeout = float(opts.get("connect_timeout", 10))
        except ValueError:
            self.connect_timeout = -1.0
        if not 1 <= self.connect_timeout <= 300:
            raise ValueError(f"--client {url!r}: connect_timeout must be 1..300 seconds, got "
                             f"{opts.get('connect_timeout')!r}")
        if "bind" in opts:
            try:
                ipaddress.ip_address(opts["bind"])
            except ValueError:
                raise ValueError(f"--client {url!r}: bind must be an IP address of this "
                                 f"machine, got {opts['bind']!r}") from None
        self.command = _remote_word(opts.get("parallelnet") or "parallelnet")
        self.host_facts: dict | None = None
        self.route_source: str | None = None

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (f"ssh://{self.user + '@' if self.user else ''}{host}"
                f"{':' + str(self.port) if self.port else ''}")

    def ssh_argv(self, command: str) -> list[str]:
        ssh = shutil.which("ssh")
        if ssh is None:
            raise ClientError(f"--client {self.label}: no `ssh` command on this machine "
                              "(OpenSSH's client is needed)")
        argv = [ssh, "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout:g}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                "-o", "LogLevel=ERROR"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.user:
            argv += ["-l", self.user]
        o = self.options
        if o.get("identity"):
            argv += ["-i", os.path.expanduser(o["identity"]), "-o", "IdentitiesOnly=yes"]
        if o.get("known_hosts"):
            argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(o['known_hosts'])}",
                     "-o", "GlobalKnownHostsFile=/dev/null",
                     "-o", f"StrictHostKeyChecking={o.get('host_key_check', 'yes')}"]
        elif o.get("host_key_check") == "no":
            argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        elif o.get("host_key_check"):
            argv += ["-o", f"StrictHostKeyChecking={o['host_key_check']}"]
        argv += shlex.split(os.environ.get("PARALLELNET_SSH_ARGS", ""))
        return [*argv, self.host, command]

    def open(self) -> None:
        """Reach the host, record its facts, refuse another version or commit, and find
        the address the server must listen on."""
        from parallelnet.experiments import provenance

        self.bind = self.options.get("bind") or self._route_source()
        argv = self.ssh_argv("sh -c " + shlex.quote(provenance.client_facts_command(self.command)))
        limit = self.connect_timeout + START_GRACE
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise ClientError(f"--client {self.label}: cannot run ssh: {exc}") from None
        lines: list[tuple[float, str]] = []
        errs: list[bytes] = []

        def read_out():
            for raw in proc.stdout:     # when each line came: the clock line comes last
                lines.append((time.time(), raw.decode(errors="replace")))

        readers = [threading.Thread(target=read_out, daemon=True),
                   threading.Thread(target=lambda: errs.append(proc.stderr.read()), daemon=True)]
        for th in readers:
            th.start()
        try:
            proc.wait(limit)
        except BaseException as exc:               # the limit, or an interruption here
            os.killpg(proc.pid, signal.SIGKILL)    # its own session: ssh alone
            proc.wait(10)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise ClientError(f"--client {self.label}: no answer within {limit:g}s "
                                  "(ssh killed)") from None
            raise
        finally:
            for th in readers:
                th.join(10)
        out = "".join(text for _, text in lines)
        seen = next((t for t, text in lines if text.startswith("clock=")), None)
        err = b"".join(errs)
        said = " ".join(err.decode(errors="replace").split())
        if proc.returncode != 0:
            raise ClientError(f"--client {self.label}: ssh failed ({_exit_text(proc.returncode)})"
                              f": {said or 'no message'}")
        facts = provenance.parse_client_facts(out, seen)
        problem = provenance.version_mismatch(provenance.local_version(), facts["parallelnet"],
                                              f"--client {self.label}")
        if problem:
            raise ClientError(problem + (f" (it said: {facts['parallelnet_said']})"
                                         if facts["parallelnet"] is None and
                                         facts["parallelnet_said"] else ""))
        self.host_facts = facts
        self.opened = True

    def _route_source(self) -> str:
        """This machine's address on the route to the host: a connected UDP socket is
        given its source address by the routing table (nothing is sent)."""
        port = self.port or 22
        try:
            infos = socket.getaddrinfo(self.host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise ClientError(f"--client {self.label}: cannot resolve {self.host}: {exc}") from None
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.connect(addr)
            except OSError as exc:
                raise ClientError(f"--client {self.label}: no route to {self.host}: "
                                  f"{exc.strerror or exc}") from None
            self.route_source = s.getsockname()[0]
        return self.route_source

    def facts(self) -> dict:
        from parallelnet.experiments.provenance import host_hash

        facts = self.host_facts or {}
        return {"placement": self.label, "server_bind": self.bind,
                "bind_from": "option" if "bind" in self.options else "route",
                "client_cpus_pinned": False,
                # This machine's host name there: the "other host" is likely this one (a
                # test), and its generator's CPU counts as foreign here (points noisy).
                "same_host_name": facts.get("hostname_hash") == host_hash() if facts else None,
                "host": self.host_facts}

    def prepare(self, spec):
        if spec.netns is not None:
            raise ValueError("netns is for a client on this machine, not on an ssh host")
        # Its CPU numbers would be this machine's: the generator's threads are not pinned
        # there.  Checked here as far as this machine can (fields, ranges, the address).
        spec = dataclasses.replace(spec, cpus=None)
        spec.validate()
        return spec

    def loadgen_command(self, spec) -> str:
        return " ".join([self.command, *map(shlex.quote, loadgen_args(spec))])

    def start(self, spec) -> Job:
        if not self.opened:
            raise ClientError(f"--client {self.label}: not opened (the run opens it)")
        spec = self.prepare(spec)
        return SshJob(self.ssh_argv(self.loadgen_command(spec)), self.label)

    def limit(self, spec) -> float:
        return super().limit(spec) + self.connect_timeout + START_GRACE


def _remote_word(cmd: str) -> str:
    """The remote command as its shell must see it: quoted, ``~/`` its home."""
    if cmd.startswith("~/"):
        return '"$HOME"/' + shlex.quote(cmd[2:])
    return shlex.quote(cmd)


def _secs(x: float) -> str:
    """A duration as ``parallelnet loadgen`` reads it (plain decimal seconds)."""
    text = f"{float(x):.9f}".rstrip("0").rstrip(".")
    return text or "0"


def loadgen_args(spec) -> list[str]:
    """``parallelnet loadgen`` arguments (after the command) that run ``spec`` and print
    its result as JSON on stdout.  ``cpus`` and ``netns`` are not carried over."""
    targets = spec.resolved_targets()
    protocols = {t.protocol for t in targets}
    if len(protocols) > 1:
        raise ValueError("targets of different protocols cannot be run over ssh "
                         "(`parallelnet loadgen` takes one --protocol)")
    out = ["loadgen"]
    for t in targets:
        out.append(f"http://{t.address}{t.path}" if t.protocol == "http" else t.address)
    out += ["--protocol", targets[0].protocol, "--mode", spec.mode,
            "--connections", str(spec.connections), "--threads", str(spec.threads),
            "--duration", _secs(spec.duration), "--warmup", _secs(spec.warmup),
            "--timeout", _secs(spec.timeout), "--size", str(spec.size),
            "--depth", str(spec.depth), "--max-requests", str(spec.max_requests),
            "--requests-per-conn", str(spec.requests_per_conn), "--seed", str(spec.seed)]
    if spec.rate:
        out += ["--rate", repr(float(spec.rate))]
    if spec.service is not None:
        out += ["--service", spec.service]
    if spec.heavy is not None:
        out += ["--heavy-conns", spec.heavy]
    if not spec.abort_on_mismatch:
        out.append("--no-abort")
    return [*out, "--json", "-"]


class NetnsClient(Client):
    """``--client netns`` (experiments/remote.py): one :class:`ClientNamespace` for the
    whole run, made when it opens and removed when it closes; every load generator of the
    run runs inside it (pinned to the layout's client CPUs, as ``local``) and every server
    listens on the root side's veth address (``--allow-remote``)."""

    kind = "netns"
    elsewhere = False            # the same CPUs: only the packet path changes

    def __init__(self, steer: bool = True) -> None:
        super().__init__()
        self.ns: ClientNamespace | None = None
        self.steer = steer
        self._steered: tuple | None = None      # (server CPUs, client CPUs) last written
        self.masks: dict = {}

    @property
    def label(self) -> str:
        return "netns" if self.steer else "netns?steer=0"

    def open(self) -> None:
        if self.ns is not None:
            return
        from parallelnet.experiments.loadgen.netns import ClientNamespace

        ns = ClientNamespace()
        ns.__enter__()            # NetnsError (one line: what is missing) if it cannot
        self.ns, self.bind, self.opened = ns, ns.host_address, True

    def close(self) -> None:
        ns, self.ns, self.bind, self.opened = self.ns, None, None, False
        self._steered = None
        if ns is not None:
            ns.__exit__(None, None, None)

    def facts(self) -> dict:
        ns = self.ns
        return {"placement": self.label, "server_bind": self.bind,
                "namespace": ns.name if ns else None, "steer_rx": self.steer,
                "veth": {"host": ns.host_if, "client": ns.ns_if,
                         "subnet": str(ns.network)} if ns else None,
                "client_address": ns.client_address if ns else None,
                "client_cpus_pinned": True}

    def prepare(self, spec):
        import dataclasses

        if self.ns is None:
            from parallelnet.experiments.loadgen.netns import NetnsError

            raise NetnsError("--client netns: not opened (the run opens it)")
        if self._steered is None:       # a generator started outside measure(): no layout
            client = sorted(spec.cpus or ())
            self._steer(sorted(set(os.sched_getaffinity(0)) - set(client)) or client, client)
        return dataclasses.replace(spec, netns=self.ns.name)

    def place(self, layout) -> None:
        if self.ns is not None:
            self._steer(layout.server, layout.client)

    def _steer(self, server_cpus, client_cpus) -> None:
        want = (tuple(sorted(server_cpus)), tuple(sorted(client_cpus))) if self.steer else ((), ())
        if want != self._steered:       # written when the layout changes, not per point
            self.masks = self.ns.steer_rx(*want)
            self._steered = want


def parse_client(text: str | Client | None) -> Client:
    """``--client``'s value -> an unopened Client; ValueError naming the problem."""
    if isinstance(text, Client):
        return text
    if text in (None, "", "local"):
        return Client()
    if text == "netns":
        return NetnsClient()
    if isinstance(text, str) and text.startswith("netns?"):
        opts = dict(parse_qsl(text[len("netns?"):], keep_blank_values=True))
        if set(opts) != {"steer"} or opts["steer"] not in ("0", "1"):
            raise ValueError(f"--client {text!r}: netns takes one option, steer=0 or steer=1")
        return NetnsClient(steer=opts["steer"] == "1")
    if isinstance(text, str) and text.startswith("ssh://"):
        return SshClient(text)
    raise ValueError(f"--client {text!r}: expected {SYNTAX}")


def placement_of(srv) -> Client:
    """The client a server was started for (Context.server), else a local one."""
    return getattr(srv, "client_placement", None) or Client()
