"""A multi-host test bed: N hosts as Linux network namespaces on one bridge.

Each host is a network namespace with one veth into a bridge, its own address
on a private /24 that exists only inside those namespaces (the bridge has no
address, so the machine running the tests cannot reach it), and its own
hostname (every process runs in a UTS namespace of its own). Redis, backends
and client processes run in the host chosen for them. Faults are real:

    with NetBed(3) as bed:
        a, b, c = bed.hosts
        redis_url = bed.start_redis(a)
        p = bed.start_backend(b, redis_url, token)   # a BackendProcess, address 10.x.y.3:port
        agent = bed.agent(c)                         # a Python process in host c
        agent.run("import store; store.connect(%r, %r)" % (p.address, token))
        bed.netem(b, delay_ms=2)                     # 2 ms on every packet b sends
        bed.partition(b, [a])                        # b cannot talk to a (iptables in b)
        bed.heal(b)
        bed.kill_host(b)                             # SIGKILL every process of b, link down
        bed.revive_host(b)                           # link up (start its processes again)

Names carry a random prefix, so parallel runs do not collide; ``close()``
deletes the namespaces, the bridge and the FORWARD rule. Where a Docker engine
runs, iptables' FORWARD policy is DROP, which also drops bridged traffic: the
bed inserts an ACCEPT rule for its bridge and removes it afterwards.

It needs root, ``ip`` (iproute2), ``tc`` and ``unshare``; ``missing()`` says
what is absent, and ``require()`` skips a test with that reason (or fails it
under CI=true, where the bed must run).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from store._ops.cluster import BackendProcess, _wait_for, find_redis_server

HERE = os.path.dirname(os.path.abspath(__file__))


def _sh(*argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()}")
    return out


def missing() -> str | None:
    """Why the bed cannot run here, or None."""
    if os.geteuid() != 0:
        return "the multi-host test bed needs root (network namespaces, veth, tc)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"the multi-host test bed needs `{tool}` on PATH"
    return None


def require() -> None:
    """Skip the calling test when the bed cannot run; under CI=true, fail instead."""
    why = missing()
    if why is not None:
        skip_or_fail(why)


def skip_or_fail(why: str) -> None:
    """Skip with ``why``, except under CI=true, where the multi-host tests must run."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the multi-host tests: {why}")
    pytest.skip(why)


class Host:
    """One host of the bed: a network namespace, its interface and address."""

    def __init__(self, bed: "NetBed", index: int):
        self.bed = bed
        self.index = index
        self.name = f"host{index}"
        self.ns = f"{bed.prefix}-h{index}"
        self.veth = f"{bed.prefix}v{index}"  # the bridge side (root namespace)
        self.ip = f"{bed.subnet}.{index + 2}"

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip}>"

    def wrapper(self) -> list[str]:
        """A command prefix that runs a program in this host (exec'ing it in place)."""
        return [
            "ip",
            "netns",
            "exec",
            self.ns,
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            self.name,
        ]

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a short command (ip, tc, iptables) in this host's namespace."""
        return _sh("ip", "netns", "exec", self.ns, *argv, check=check)

    def pids(self) -> list[int]:
        out = _sh("ip", "netns", "pids", self.ns, check=False)
        return [int(p) for p in out.stdout.split()]


class Agent:
    """A Python process in one host that runs snippets sent by the test.

    ``run(code, expr)`` executes ``code`` in the agent's globals, then returns
    the JSON value of ``expr``; an exception in the agent comes back as
    ``AgentError`` with its type name and message. Every exchange has a
    deadline, and an agent that misses it is killed: no test hangs on one.
    """

    def __init__(self, host: Host, env: dict):
        self.host = host
        self.proc = subprocess.Popen(
            [*host.wrapper(), sys.executable, "-u", os.path.join(HERE, "netbed_agent.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            text=True,
            start_new_session=True,
        )
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="agent-reader").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(line)
        self.proc.stdout.close()  # the agent is gone: nothing more to read
        self._replies.put(None)

    def run(self, code: str = "", expr: str = "None", timeout: float = 60.0):
        if self.proc.poll() is not None:
            raise AgentError("AgentGone", f"the agent in {self.host.name} has exited")
        self.proc.stdin.write(json.dumps({"code": code, "expr": expr}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise AssertionError(
                f"agent in {self.host.name} gave no answer within {timeout}s to {code!r} / {expr!r}"
            ) from None
        if line is None:
            raise AgentError("AgentGone", f"the agent in {self.host.name} died")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AgentError(reply["type"], reply["message"])
        return reply["value"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close_stdin()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._close_stdin()

    def _close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:  # the pipe broke with the agent: closed all the same
            pass


class AgentError(Exception):
    """An exception raised in an agent: ``type`` is its class name."""

    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}")
        self.type = type_name
        self.message = message


class NetBed:
    """N hosts as network namespaces on one bridge (see the module docstring)."""

    def __init__(self, n: int = 3, workdir: str | None = None):
        self.prefix = "cp" + secrets.token_hex(3)  # interface names stay within 15 chars
        self.subnet = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
        self.bridge = self.prefix + "br"
        self._tmp = None if workdir else tempfile.mkdtemp(prefix="claypot-netbed-")
        self.workdir = workdir or self._tmp
        self.hosts = [Host(self, i) for i in range(n)]
        self._procs: list = []  # every process started, stopped on close
        self._forward_rule: list[str] | None = None
        self._down: set[str] = set()
        self._netem_kind: str | None = None  # "tc", "nfqueue", or "" (unavailable)
        self._netem_why = ""
        self._netem_rules: dict[str, list] = {}
        self._delayers: dict = {}

    # -- building and tearing down -------------------------------------------------
    def start(self) -> "NetBed":
        try:
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
            _sh("ip", "link", "set", self.bridge, "up")
            for h in self.hosts:
                _sh("ip", "netns", "add", h.ns)
                _sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", h.veth + "p")
                _sh("ip", "link", "set", h.veth + "p", "netns", h.ns)
                _sh("ip", "link", "set", h.veth, "master", self.bridge)
                _sh("ip", "link", "set", h.veth, "up")
                h.exec("ip", "link", "set", h.veth + "p", "name", "eth0")
                h.exec("ip", "addr", "add", f"{h.ip}/24", "dev", "eth0")
                h.exec("ip", "link", "set", "eth0", "up")
                h.exec("ip", "link", "set", "lo", "up")
            self._allow_forwarding()
        except BaseException:
            self.close()
            raise
        # Also when the test process is stopped without running its teardown.
        atexit.register(self.close)
        return self

    def _allow_forwarding(self) -> None:
        """Bridged frames go through iptables FORWARD where br_netfilter is loaded
        (Docker loads it and sets the policy to DROP): accept our bridge's."""
        if shutil.which("iptables") is None:
            return
        rules = _sh("iptables", "-S", "FORWARD", check=False)
        if rules.returncode != 0 or ("-P FORWARD DROP" not in rules.stdout and "DOCKER" not in rules.stdout):
            return
        rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        _sh("iptables", "-I", *rule)
        self._forward_rule = rule

    def close(self) -> None:
        for p in self._procs:
            try:
                if isinstance(p, Agent):
                    p.kill()
                elif isinstance(p, BackendProcess):
                    p.kill()
                elif p.poll() is None:
                    p.kill()
                    p.wait(5)
            except Exception:
                pass
        for h in self.hosts:
            self.clear_netem(h)
        for h in self.hosts:
            for pid in h.pids():  # anything a test started in the host by other means
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _sh("ip", "netns", "del", h.ns, check=False)
            _sh("ip", "link", "del", h.veth, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        if self._forward_rule:
            _sh("iptables", "-D", *self._forward_rule, check=False)
            self._forward_rule = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        atexit.unregister(self.close)

    def __enter__(self) -> "NetBed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- processes ---------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        for key in ("CLAYPOT_ADVERTISE", "CLAYPOT_PORT", "CLAYPOT_ADDRESS", "CLAYPOT_HOST"):
            env.pop(key, None)
        env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in sys.path if p])
        env.update(extra or {})
        return env

    def start_redis(self, host: Host, port: int = 6379, args: list | None = None, name: str = "redis") -> str:
        """A redis-server in ``host`` listening on its address; returns its URL."""
        d = os.path.join(self.workdir, f"{name}-{host.name}-{port}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "redis.log"), "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [
                    *host.wrapper(),
                    find_redis_server(),
                    "--port",
                    str(port),
                    "--bind",
                    host.ip,
                    "--dir",
                    d,
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--save",
                    "",
                    "--protected-mode",
                    "no",
                    "--daemonize",
                    "no",
                    *(args or []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._procs.append(proc)
        self.wait_port(host, port, proc)
        return f"redis://{host.ip}:{port}/0"

    def start_program(self, host: Host, argv: list[str], log: str) -> subprocess.Popen:
        """Any program in ``host`` (stdout and stderr to ``log``)."""
        with open(log, "ab") as out:  # the child keeps its own copy
            proc = subprocess.Popen(
                [*host.wrapper(), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def wait_port(self, host: Host, port: int, proc=None, timeout: float = 15.0) -> None:
        def listening():
            out = host.exec("ss", "-ltnH", f"sport = :{port}", check=False)
            return bool(out.stdout.strip())

        _wait_for(listening, timeout, f"a server on {host.name}:{port}", proc)

    def start_backend(
        self,
        host: Host,
        redis_url: str,
        token: str,
        name: str = "",
        env: dict | None = None,
        extra_args: list | None = None,
    ) -> BackendProcess:
        """A backend in ``host`` listening on (and registering) the host's address."""
        d = os.path.join(self.workdir, name or f"backend-{host.name}-{len(self._procs)}")
        p = BackendProcess(
            d,
            redis_url,
            token,
            host=host.ip,
            env=self.env(env),
            extra_args=list(extra_args or []),
            wrapper=host.wrapper(),
        )
        self._procs.append(p)
        return p.start()

    def agent(self, host: Host, env: dict | None = None) -> Agent:
        """A Python process in ``host`` that runs snippets (see Agent)."""
        a = Agent(host, self.env(env))
        self._procs.append(a)
        return a

    # -- faults --------------------------------------------------------------------------
    def netem_missing(self) -> str | None:
        """Why ``netem`` cannot work here, or None.

        It uses the kernel's sch_netem where the kernel has it; where it was
        built without qdiscs, an NFQUEUE listener in this process holds the
        packets instead (tests/netdelay.py), which needs iptables and bridged
        traffic going through it (br_netfilter, as Docker sets up).
        """
        if self._netem_kind is None:
            self._netem_kind, self._netem_why = self._probe_netem()
        return None if self._netem_kind else self._netem_why

    def _probe_netem(self) -> tuple[str, str]:
        h = self.hosts[0]
        out = h.exec("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms", check=False)
        if out.returncode == 0:
            h.exec("tc", "qdisc", "del", "dev", "lo", "root", check=False)
            return "tc", ""
        why = f"tc netem is unavailable on this kernel ({out.stderr.strip()})"
        try:
            with open("/proc/sys/net/bridge/bridge-nf-call-iptables") as f:
                bridged = f.read().strip() == "1"
        except OSError:
            bridged = False
        if not bridged or shutil.which("iptables") is None:
            return "", why + " and bridged traffic does not pass iptables (no br_netfilter)"
        try:
            import netdelay

            netdelay.Delayer(secrets.randbelow(60000) + 1000, 0).close()
        except OSError as exc:
            return "", why + f" and nfnetlink_queue is unavailable ({exc})"
        return "nfqueue", ""

    def netem(self, host: Host, delay_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """Delay (and drop) every packet ``host`` sends to other hosts."""
        why = self.netem_missing()
        if why:
            raise RuntimeError(why)
        self.clear_netem(host)
        if self._netem_kind == "tc":
            spec = ["delay", f"{delay_ms}ms"] + (["loss", f"{loss_pct}%"] if loss_pct else [])
            host.exec("tc", "qdisc", "replace", "dev", "eth0", "root", "netem", *spec)
            return
        import netdelay

        port = ["FORWARD", "-m", "physdev", "--physdev-in", host.veth]
        rules = []
        if delay_ms:
            queue = secrets.randbelow(60000) + 1000
            self._delayers[host.name] = netdelay.Delayer(queue, delay_ms / 1000)
            rules.append(port + ["-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"])
        if loss_pct:  # inserted last, so it is first: dropped packets are never queued
            rules.append(
                port + ["-m", "statistic", "--mode", "random", "--probability", f"{loss_pct / 100:.6f}", "-j", "DROP"]
            )
        for rule in rules:
            _sh("iptables", "-I", *rule)
            self._netem_rules.setdefault(host.name, []).append(rule)

    def clear_netem(self, host: Host) -> None:
        if self._netem_kind == "tc":
            host.exec("tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        for rule in self._netem_rules.pop(host.name, []):
            _sh("iptables", "-D", *rule, check=False)
        delayer = self._delayers.pop(host.name, None)
        if delayer is not None:
            delayer.close()

    def partition(self, host: Host, others: list[Host] | None = None) -> None:
        """Cut ``host`` off from ``others`` (silently dropped packets, both ways), or
        from every host when ``others`` is None (its link goes down)."""
        if others is None:
            _sh("ip", "link", "set", host.veth, "down")
            return
        for o in others:
            host.exec("iptables", "-A", "INPUT", "-s", o.ip, "-j", "DROP")
            host.exec("iptables", "-A", "OUTPUT", "-d", o.ip, "-j", "DROP")

    def heal(self, host: Host) -> None:
        """Undo ``partition`` of ``host``."""
        if shutil.which("iptables"):
            host.exec("iptables", "-F", "INPUT", check=False)
            host.exec("iptables", "-F", "OUTPUT", check=False)
        if host.name not in self._down:
            _sh("ip", "link", "set", host.veth, "up")

    def kill_host(self, host: Host) -> list[int]:
        """A machine loss: SIGKILL every process in the host at once and take its
        link down (packets to it vanish, nothing answers); returns the PIDs."""
        self._down.add(host.name)
        _sh("ip", "link", "set", host.veth, "down")
        pids = host.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self._procs:  # reap our children so they do not linger as zombies
            proc = p.proc if isinstance(p, (Agent, BackendProcess)) else p
            if proc is not None and proc.pid in pids:
                proc.wait()
        deadline = time.monotonic() + 10
        while host.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids

    def revive_host(self, host: Host) -> None:
        """The machine is back (empty): its link comes up; start its processes again."""
        self._down.discard(host.name)
        _sh("ip", "link", "set", host.veth, "up")
