"""Shared fixtures: a real local cluster (embedded redis-server + backend processes)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Every backend a test starts checks its lifecycle invariants after each transition.
os.environ.setdefault("CLAYPOT_VALIDATE", "1")

from store import LocalCluster  # noqa: E402


def validate_backends(c: LocalCluster) -> None:
    """Every live backend of ``c`` checks its lifecycle invariants (AssertionError if broken)."""
    from store.client import Client
    client = Client(c.address, c.token)
    try:
        for p in c.processes:
            if p.alive():
                client.validate_backend(p.backend_id)
    finally:
        client.close()


@pytest.fixture(scope="module")
def cluster():
    """Two backends on loopback, connected to this process, for one test module."""
    with LocalCluster(backends=2) as c:
        yield c


@pytest.fixture(autouse=True)
def _validate_after_test(request):
    """After each test on the module's cluster, its backends validate their state."""
    yield
    if "cluster" in request.fixturenames:
        c = request.getfixturevalue("cluster")
        if c.processes and c.processes[0].alive():
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
        from store import objects
        c = request.getfixturevalue("cluster")
        if objects._dispatcher is not c.client:
            c.client = store.connect(c.address, c.token)
    yield
