"""Packaging: the pinned public API, the command lines, and the container files.

Changing what ``store`` or ``store.errors`` export is a decision: update the
lists here in the same change. docker-compose.yml is checked structurally (no
Docker engine is needed) and its backend command line is run for real.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types

import grpc
import pytest
import yaml

import store
import store.errors
from store import LocalCluster, StorageObject
from store.config import Settings
from store._wire.generated import claypot_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STORE_API = [
    "Alien",
    "BackendStatus",
    "LocalCluster",
    "Settings",
    "StorageObject",
    "aio",
    "backends",
    "client",
    "connect",
    "delete_alias",
    "disconnect",
    "empty",
    "errors",
    "getByID",
    "get_backends",
    "get_by_alias",
    "get_by_id",
    "get_locations",
    "make_persistent_many",
    "readonly",
    "show_transfers",
    "stub_class",
    "zeros",
]

ERRORS_API = [
    "AliasExists",
    "AliasNotFound",
    "AlreadyPersistent",
    "AuthenticationError",
    "BackendDown",
    "BackendError",
    "BackendNotFound",
    "BackendUnavailable",
    "CallCancelled",
    "CallInterrupted",
    "ClassNotFound",
    "ClaypotError",
    "ConfigurationError",
    "DeadlineExceeded",
    "FeatureUnavailable",
    "InvalidKey",
    "NotAVersion",
    "NotPersistent",
    "ObjectBusy",
    "ObjectCorrupt",
    "ObjectError",
    "ObjectMoved",
    "ObjectNotFound",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "StorageFailed",
    "TaskCancelled",
    "TaskError",
    "TaskTimeout",
    "ValueTooLarge",
    "by_code",
]


# -- public API ---------------------------------------------------------------------------


def test_store_exports_exactly_the_pinned_names():
    assert sorted(store.__all__) == STORE_API
    assert len(set(store.__all__)) == len(store.__all__)
    for name in store.__all__:
        assert getattr(store, name) is not None, name
    # Nothing public escapes __all__ (submodules such as store._api.api are not API names).
    public = {
        name
        for name, value in vars(store).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(STORE_API) - {"errors", "aio"}


def test_store_errors_exports_exactly_the_pinned_names():
    assert sorted(store.errors.__all__) == ERRORS_API
    defined = {
        name
        for name, value in vars(store.errors).items()
        if not name.startswith("_") and getattr(value, "__module__", "") == "store.errors"
    }
    assert defined == set(ERRORS_API)
    for name in ERRORS_API:
        value = getattr(store.errors, name)
        if inspect.isclass(value):
            assert issubclass(value, store.errors.ClaypotError)
            assert value.__doc__, f"{name} has no docstring"
            assert store.errors.by_code(name) is value


def test_error_tree_in_the_docstring_matches_the_classes():
    """The tree drawn in store/errors.py's docstring is the real class tree."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in store.errors.__doc__.splitlines():
        match = re.search(r"(?:^\s*|── )([A-Z]\w+)(?:\s|$)", line)
        if not match or ("──" not in line and line.strip() != "ClaypotError"):
            continue
        column, name = match.start(1), match.group(1)  # each level sits 4 columns deeper
        while stack and stack[-1][0] >= column:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((column, name))
    classes = {n for n in ERRORS_API if inspect.isclass(getattr(store.errors, n))}
    assert set(parents) == classes - {"ClaypotError"}
    for name, parent in parents.items():
        cls = getattr(store.errors, name)
        assert getattr(store.errors, parent) in cls.__bases__, f"{name} is not a {parent}"


# -- command lines ------------------------------------------------------------------------


def _claypot() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "claypot")
    return (
        exe
        if os.path.exists(exe)
        else shutil.which("claypot")
        or pytest.fail("the claypot console script is not installed (pip install -e '.[dev]')")
    )


def test_backend_module_help():
    proc = subprocess.run([sys.executable, "-m", "store.backend", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: claypot backend")
    for flag in ("--data-dir", "--redis", "--host", "--port", "--advertise", "--token"):
        assert flag in proc.stdout


@pytest.mark.parametrize(
    "command", [["claypot"], [sys.executable, "-m", "store"]], ids=["console-script", "python-m-store"]
)
@pytest.mark.slow
def test_claypot_help_lists_the_commands(command):
    exe = [_claypot()] if command == ["claypot"] else command
    proc = subprocess.run([*exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: claypot")
    for sub in ("up", "status", "down", "demo", "backend", "repair", "restart", "logs", "forget", "health"):
        assert re.search(rf"^\s+{sub}\s", proc.stdout, re.M), sub
    backend = subprocess.run([*exe, "backend", "--help"], capture_output=True, text=True, timeout=60)
    assert backend.returncode == 0 and "--advertise" in backend.stdout


def test_claypot_rejects_an_unknown_command():
    proc = subprocess.run([_claypot(), "no-such-command"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "No such command 'no-such-command'" in proc.stderr


def test_advertise_setting_comes_from_the_environment():
    assert Settings.from_env(env={}).advertise == ""
    env = {"CLAYPOT_ADVERTISE": "backend1:7000"}
    assert Settings.from_env(env=env).advertise == "backend1:7000"
    assert Settings.from_env(env=env, advertise="b:1").advertise == "b:1"


# -- docker-compose.yml without a YAML library ---------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice (docker compose refuses it too,
    while plain safe_load keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for key in keys:
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", node.start_mark)
        return super().construct_mapping(node, deep)


def load_compose() -> dict:
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        return yaml.load(f, Loader=_UniqueKeyLoader)


def test_compose_loader_refuses_duplicate_keys():
    assert yaml.load("a:\n  b: 1\n", Loader=_UniqueKeyLoader) == {"a": {"b": 1}}
    with pytest.raises(yaml.YAMLError, match="duplicate key"):
        yaml.load("a: 1\na: 2\n", Loader=_UniqueKeyLoader)


def _flags(argv: list[str]) -> dict[str, str]:
    assert len(argv) % 2 == 0 and all(a.startswith("--") for a in argv[::2]), argv
    return dict(zip(argv[::2], argv[1::2]))


def test_compose_file_wires_redis_backends_and_demo():
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"redis", "backend", "demo", "prometheus"}
    declared_volumes = set(compose["volumes"])

    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert _flags(redis["command"][1:])["--appendonly"] == "yes"
    assert redis["volumes"] == ["redis-data:/data"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # Redis always has a password, from the environment; redis-cli reads it from REDISCLI_AUTH.
    password = _flags(redis["command"][1:])["--requirepass"]
    assert re.fullmatch(r"\$\{CLAYPOT_REDIS_PASSWORD:\?[^}]+\}", password)
    assert redis["environment"]["REDISCLI_AUTH"] == password

    backend = services["backend"]
    # N backends from one block: replicas (or --scale backend=N), no copied services.
    assert backend["deploy"]["replicas"] == "${CLAYPOT_BACKENDS:-2}"
    assert backend["command"][0] == "backend"
    flags = _flags(backend["command"][1:])
    assert flags["--data-dir"] == "/data"
    # The Redis URL carries the password: in the environment, never on the command line.
    assert "--redis" not in flags
    assert backend["environment"]["CLAYPOT_REDIS"] == f"redis://:{password}@redis:6379/0"
    assert flags["--host"] == "0.0.0.0"
    # No --advertise: each replica registers its own container address, and every
    # replica listens on the port its image exposes (what `docker compose ps` shows).
    assert "--advertise" not in flags and flags["--port"] == "7000"
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        assert re.findall(r"^EXPOSE (\d+)$", f.read(), re.M) == [flags["--port"]]
    # An anonymous volume: one per replica, kept across restarts, dropped by down -v.
    assert backend["volumes"] == ["/data"]
    assert "ports" not in backend
    assert backend["depends_on"]["redis"]["condition"] == "service_healthy"
    # The standard gRPC health check of this very backend, which needs no token.
    assert backend["healthcheck"]["test"] == ["CMD", "claypot", "health", "127.0.0.1:7000"]

    demo = services["demo"]
    # The image is built once, by the backend service; the demo runs it.
    assert backend["build"] == "." and "build" not in demo
    assert demo["image"] == backend["image"] and demo["pull_policy"] == "never"
    assert demo["restart"] == "no"
    assert demo["command"] == ["demo", "--address", f"backend:{flags['--port']}"]
    assert demo["depends_on"]["backend"]["condition"] == "service_healthy"
    # One shared token, taken from the environment, never a secret written in the file.
    tokens = {backend["environment"]["CLAYPOT_TOKEN"], demo["environment"]["CLAYPOT_TOKEN"]}
    (token,) = tokens
    assert re.fullmatch(r"\$\{CLAYPOT_TOKEN:\?[^}]+\}", token)
    assert declared_volumes == {"redis-data"}

    # Prometheus only under its profile (the default `up` pulls and starts nothing more),
    # scraping the port the backends publish their metrics on.
    prom = services["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert prom["image"].startswith("prom/prometheus:")
    assert prom["ports"] == ["127.0.0.1:9090:9090"]
    config_path = prom["volumes"][0].split(":")[0]
    with open(os.path.join(ROOT, config_path)) as f:
        scrape = f.read()
    port = backend["environment"]["CLAYPOT_METRICS_PORT"]
    assert f"port: {port}" in scrape and 'names: ["backend"]' in scrape


def test_dockerfile_builds_on_python_311_slim_and_runs_claypot():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    stages = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert stages and all(s == "python:3.11-slim" for s in stages)
    assert re.search(r'^ENTRYPOINT \["claypot"\]$', dockerfile, re.M)
    assert re.search(r"^USER claypot$", dockerfile, re.M)
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert {".git", "tests", "**/__pycache__"} <= ignored
    copied = [path for paths in re.findall(r"^COPY (?!--from)(.+?) \S+$", dockerfile, re.M) for path in paths.split()]
    # Everything the package build reads is in the build context.
    assert {"pyproject.toml", "README.md", "proto", "store", "runtime"} <= set(copied)
    for path in copied:
        assert os.path.exists(os.path.join(ROOT, path)), path
        assert path not in ignored, f"{path} is copied but .dockerignore drops it"


# -- the compose backend command line, run for real ----------------------------------------


class Box(StorageObject):
    def __init__(self, value):
        self.value = value

    def double(self):
        self.value *= 2
        return self.value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_compose_backend_command_registers_a_reachable_address(tmp_path):
    """The backend command from docker-compose.yml, with local values: the backend
    registers an address clients and peers reach it at."""
    argv = load_compose()["services"]["backend"]["command"]
    port = _free_port()
    advertised = f"127.0.0.1:{port}"
    with LocalCluster(backends=1) as cluster:
        local = {"--data-dir": str(tmp_path / "backend"), "--host": "127.0.0.1", "--port": str(port)}
        flags = _flags(argv[1:])
        assert set(flags) == set(local)
        args = [argv[0]] + [x for flag in flags for x in (flag, local[flag])]
        env = dict(os.environ, CLAYPOT_TOKEN=cluster.token, CLAYPOT_REDIS=cluster.redis_url)
        log = open(tmp_path / "backend.log", "wb")
        proc = subprocess.Popen(
            [_claypot(), *args], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 30
            mine = []
            while not mine and time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "backend.log").read_text()
                mine = [b for b in store.backends() if b.pid == proc.pid and b.up]
                time.sleep(0.1)
            assert mine, "the backend never registered"
            assert mine[0].address == advertised
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                ping = channel.unary_unary(
                    "/claypot.v1.Backend/Ping",
                    request_serializer=pb.PingRequest.SerializeToString,
                    response_deserializer=pb.PingReply.FromString,
                )(pb.PingRequest(), metadata=[("claypot-token", cluster.token)], timeout=10)
            assert ping.address == advertised and ping.pid == proc.pid

            # This process reaches the new backend at the advertised address...
            box = Box(21)
            box.make_persistent(backend=mine[0].backend_id)
            assert box.get_location() == mine[0].backend_id
            assert box.double() == 42
            # ...and so does the other backend, forwarding a call it does not own.
            with grpc.insecure_channel(cluster.address) as channel:
                reply = pb.JsonCallReply.FromString(
                    channel.unary_unary("/claypot.v1.Backend/CallJson")(
                        pb.JsonCallRequest(object_id=box.getID(), kind=pb.METHOD, name="double").SerializeToString(),
                        metadata=[("claypot-token", cluster.token)],
                        timeout=30,
                    )
                )
            assert reply.result_json == "84", reply.error

            # The compose healthcheck and demo command: claypot status against it.
            status = subprocess.run(
                [_claypot(), "status", "--address", advertised], env=env, capture_output=True, text=True, timeout=60
            )
            assert status.returncode == 0, status.stderr
            assert advertised in status.stdout and "2 backend(s), 2 up" in status.stdout
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    assert proc.returncode == 0


def test_a_backend_on_a_wildcard_address_registers_its_own_address():
    """Listening on 0.0.0.0 (a container) with no --advertise: the backend registers
    the address its host reaches others from, never the wildcard."""
    from store.backend._service.server import advertised_address

    assert advertised_address("10.1.2.3", 7000) == "10.1.2.3:7000"
    for wildcard in ("0.0.0.0", "", "::"):
        host, port = advertised_address(wildcard, 7000).rsplit(":", 1)
        assert port == "7000" and host not in ("0.0.0.0", "", "::")
        socket.inet_aton(host)
