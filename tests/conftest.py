"""Shared fixtures: a real local cluster (embedded redis-server + backend processes)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Every backend a test starts checks its lifecycle invariants after each transition.
os.environ.setdefault("CLAYPOT_VALIDATE", "1")

from store import LocalCluster  # noqa: E402
from store._ops.inproc import InProcessCluster  # noqa: E402


def pytest_generate_tests(metafunc):
    """Tests marked ``both_transports`` run on the module's cluster over each transport:
    backends served in this process (in the fast set), and backend processes reached
    by gRPC (marked slow: CI's second step runs them)."""
    if "cluster" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_transports"):
        metafunc.parametrize(
            "cluster", [pytest.param("grpc", marks=pytest.mark.slow), "inproc"], indirect=True, scope="module"
        )


def validate_backends(c: LocalCluster) -> None:
    """Every live backend of ``c`` checks its lifecycle invariants (AssertionError if broken).

    Each backend is asked at the address its process reported, not through the
    directory, so a test that tampers with the directory is still checked.
    """
    import grpc

    from store._client.client import CHANNEL_OPTIONS, TOKEN_HEADER
    from store._wire.generated import claypot_pb2 as pb
    from store._wire.generated import claypot_pb2_grpc as pb_grpc

    for p in c.processes:
        if not p.alive():
            continue
        if getattr(c, "tls_ca", ""):
            with open(c.tls_ca, "rb") as f:
                channel = grpc.secure_channel(
                    p.address, grpc.ssl_channel_credentials(f.read()), options=CHANNEL_OPTIONS
                )
        else:
            channel = grpc.insecure_channel(p.address, options=CHANNEL_OPTIONS)
        try:
            reply = pb_grpc.BackendStub(channel).Validate(
                pb.ValidateRequest(), timeout=30, metadata=((TOKEN_HEADER, c.token),)
            )
        finally:
            channel.close()
        if reply.HasField("error"):
            raise AssertionError(f"backend {p.backend_id[:8]}: {reply.error.message}")


@pytest.fixture(scope="module")
def cluster(request):
    """Two backends connected to this process, for one test module: processes on
    loopback, or (parametrized ``inproc``, see pytest_generate_tests) served in this process."""
    if getattr(request, "param", "grpc") == "inproc":
        with InProcessCluster(backends=2) as c:
            yield c
        return
    with LocalCluster(backends=2) as c:
        yield c


@pytest.fixture
def inproc_cluster():
    """Two backends served in this process (embedded Redis), connected, for one test."""
    with InProcessCluster(backends=2) as c:
        yield c


@pytest.fixture(autouse=True)
def _validate_after_test(request):
    """After each test on the module's cluster, its backends validate their state."""
    yield
    if "cluster" in request.fixturenames:
        c = request.getfixturevalue("cluster")
        if isinstance(c, InProcessCluster):
            if c.servers:
                c.validate()
        elif c.processes and c.processes[0].alive():
            validate_backends(c)


@pytest.fixture
def fresh_cluster(tmp_path):
    """A cluster of its own for one test (for tests that kill or restart things)."""
    with LocalCluster(backends=2, data_dir=str(tmp_path / "cluster")) as c:
        yield c
        if c.processes and c.processes[0].alive():
            validate_backends(c)


@pytest.fixture(autouse=True)
def _cluster_connected(request):
    """Tests that start a cluster of their own leave this process connected to it
    (and then to nothing); reconnect to the module's cluster before each test."""
    if "cluster" in request.fixturenames:
        import store
        from store._model import objects

        c = request.getfixturevalue("cluster")
        if objects._dispatcher is not c.client:
            if isinstance(c, InProcessCluster):
                c.client = store.connect(c.address, c.token, transport=c.transport(), settings=c.settings())
            else:
                c.client = store.connect(c.address, c.token)
    yield


@pytest.fixture
def rcluster(tmp_path, monkeypatch):
    """Three backends with a 2 s heartbeat TTL (tests/replicalib.py), for replica and
    failover attacks; this process takes the same heartbeat settings."""
    from hostilelib import REPLICA_ENV, own_cluster

    with own_cluster(tmp_path, 3, None, REPLICA_ENV, monkeypatch) as c:
        yield c


@pytest.fixture
def bigcluster(tmp_path, monkeypatch):
    """Like ``rcluster``, with states over 64 KiB handled as big objects (write-behind)."""
    from hostilelib import BIG_ENV, own_cluster

    with own_cluster(tmp_path, 3, None, BIG_ENV, monkeypatch) as c:
        yield c
