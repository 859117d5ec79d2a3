"""The transport seam: backends served in this process behave as they do over the wire.

An InProcessCluster (a real redis-server, real Backends with their heaps and
storage dirs, no backend process) is reached through InProcessTransport; these
tests check what that transport must keep of gRPC: typed errors, deadlines,
no sharing of objects between caller and backend, the token, streams, and the
process-wide dispatcher staying the caller's.
"""

import os
import threading
import time

import grpc
import numpy as np
import pytest

import store
from store import StorageObject, errors
from store._model import objects
from store._wire.generated import claypot_pb2 as pb
from store._ops.inproc import InProcessCluster
from store._client.transport import GrpcTransport, InProcessTransport, Transport


class Box(StorageObject):
    def __init__(self, items=None):
        self.items = list(items or [])
        self.hits = 0

    def add(self, x):
        self.items.append(x)
        return self.items

    def get(self):
        return self.items

    def fail(self, message):
        raise KeyError(message)

    def nap(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # short sleeps: a cancelled call stops between them
            time.sleep(0.01)
        return seconds

    def pid(self):
        return os.getpid()

    def big(self, n):
        return np.arange(n, dtype=np.float64)


class Ping(StorageObject):
    def __init__(self, name):
        self.name = name
        self.peer = None
        self.hits = 0

    def bounce(self, depth):
        self.hits += 1
        if depth == 0:
            return [self.name]
        return [self.name] + self.peer.bounce(depth - 1)


def test_both_transports_satisfy_the_protocol(inproc_cluster):
    from store.config import Settings

    grpc_transport = GrpcTransport(Settings.from_env())
    for t in (grpc_transport, inproc_cluster.transport()):
        assert isinstance(t, Transport)
    grpc_transport.close()
    # The process's client reaches the cluster through the in-process transport.
    assert isinstance(store.client().transport, InProcessTransport)


def test_calls_run_in_this_process_on_real_backends(inproc_cluster):
    b = Box([1])
    b.make_persistent(alias="box", backend=inproc_cluster.backends[1])
    assert b.pid() == os.getpid()
    assert b.get_location() == inproc_cluster.backends[1]
    assert store.get_by_alias("box").add(2) == [1, 2]
    # The objects live in the backend's heap, in its storage dir, under the real directory.
    backend = inproc_cluster.servers[1]
    assert backend.heap.count() >= 1
    assert os.path.isdir(backend.settings.data_dir)
    rows = {r.backend_id: r for r in store.backends()}
    assert set(rows) == set(inproc_cluster.backends) and all(r.up for r in rows.values())


def test_no_object_is_shared_between_caller_and_backend(inproc_cluster):
    argument = ["a"]
    b = Box()
    b.make_persistent()
    returned = b.add(argument)
    assert returned == [["a"]]
    argument.append("changed by the caller")
    returned.append("also changed by the caller")
    returned[0].append("and inside")
    assert b.get() == [["a"]]  # the backend's copy is its own
    again = b.get()
    assert again is not b.get()  # each reply is parsed afresh
    live = (
        inproc_cluster.servers[0].heap
        if b.get_location() == inproc_cluster.backends[0]
        else inproc_cluster.servers[1].heap
    )
    assert live.count() >= 1


def test_remote_errors_arrive_as_the_same_types(inproc_cluster):
    b = Box()
    b.make_persistent()
    with pytest.raises(KeyError, match="missing thing"):
        b.fail("missing thing")
    with pytest.raises(errors.AliasNotFound):
        store.get_by_alias("no-such-alias")
    with pytest.raises(errors.ObjectNotFound):
        store.get_by_id("0" * 32)
    with pytest.raises(errors.AlreadyPersistent):
        b.make_persistent()
    with pytest.raises(errors.BackendNotFound):
        Box().make_persistent(backend="0" * 32)


def test_a_deadline_ends_the_wait_with_deadline_exceeded(inproc_cluster):
    b = Box()
    b.make_persistent()
    c = store.client()
    saved = c.settings
    c.settings = saved.replace(call_timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            b.nap(5)
        assert time.monotonic() - started < 4
    finally:
        c.settings = saved
    assert b.nap(0) == 0


def test_the_token_is_carried_and_checked(inproc_cluster):
    stub = inproc_cluster.transport().stub(inproc_cluster.address)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListBackends(pb.ListBackendsRequest(), timeout=5, metadata=(("claypot-token", "not-the-token"),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = stub.ListBackends(pb.ListBackendsRequest(), timeout=5, metadata=(("claypot-token", inproc_cluster.token),))
    assert {b.backend_id for b in reply.backends} == set(inproc_cluster.backends)
    # Ping is open, but tells only token holders who answers.
    anonymous = stub.Ping(pb.PingRequest(), timeout=5)
    assert anonymous.status == "serving" and not anonymous.backend_id
    with pytest.raises(errors.AuthenticationError):
        store.connect(
            inproc_cluster.address,
            "not-the-token",
            transport=inproc_cluster.transport(),
            settings=inproc_cluster.settings(token="not-the-token"),
        )
    store.connect(
        inproc_cluster.address,
        inproc_cluster.token,
        transport=inproc_cluster.transport(),
        settings=inproc_cluster.settings(),
    )


def test_an_address_nothing_serves_is_unavailable(inproc_cluster):
    stub = inproc_cluster.transport().stub("inproc-9:10")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Ping(pb.PingRequest(), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(errors.BackendUnavailable):
        store.connect(
            "inproc-9:10",
            inproc_cluster.token,
            transport=inproc_cluster.transport(),
            settings=inproc_cluster.settings(),
        )
    store.connect(
        inproc_cluster.address,
        inproc_cluster.token,
        transport=inproc_cluster.transport(),
        settings=inproc_cluster.settings(),
    )


def test_large_values_stream_both_ways(inproc_cluster):
    n = 600_000  # 4.8 MB: over the inline limit, streamed
    b = Box([np.ones(n)])
    b.make_persistent()
    items = b.get()
    assert items[0].shape == (n,) and float(items[0].sum()) == n
    result = b.big(n)
    assert result.shape == (n,) and result[-1] == n - 1
    result[0] = 42.0  # writable, and the backend's stays as it was
    assert b.big(3)[0] == 0.0


def test_nested_calls_across_embedded_backends(inproc_cluster):
    a, b = Ping("a"), Ping("b")
    a.make_persistent(backend=inproc_cluster.backends[0])
    b.make_persistent(backend=inproc_cluster.backends[1])
    a.peer = b
    b.peer = a
    assert a.bounce(5) == ["a", "b", "a", "b", "a", "b"]
    assert a.hits == 3 and b.hits == 3


class Probe(StorageObject):
    def which(self):
        """The identity of what dispatches proxies where this method runs (one process here)."""
        return id(objects.get_dispatcher())


def test_the_process_dispatcher_stays_the_callers(inproc_cluster):
    caller = objects.get_dispatcher()
    assert caller is store.client()
    p = Probe()
    p.make_persistent(backend=inproc_cluster.backends[0])
    # Inside the backend's call, its own client dispatched; outside, the caller's still does.
    assert p.which() == id(inproc_cluster.servers[0].client) != id(caller)
    assert objects.get_dispatcher() is caller


def test_dispatching_is_local_to_a_context():
    class Fake:
        pass

    mine, other = Fake(), Fake()
    results = {}

    def in_thread():
        results["thread"] = objects.has_dispatcher() and objects.get_dispatcher() is mine

    with objects.dispatching(mine):
        assert objects.get_dispatcher() is mine
        with objects.dispatching(other):
            assert objects.get_dispatcher() is other
        assert objects.get_dispatcher() is mine
        t = threading.Thread(target=in_thread)  # a new thread starts with an empty context
        t.start()
        t.join()
    assert results["thread"] is False


def test_dropping_an_address_ends_the_calls_in_flight(inproc_cluster):
    b = Box()
    b.make_persistent(backend=inproc_cluster.backends[0])
    c = store.client()
    errors_seen = []

    def call():
        try:
            b.nap(3)
        except errors.ClaypotError as exc:
            errors_seen.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    started = time.monotonic()
    c.transport.drop(inproc_cluster.servers[0].address)
    t.join(10)
    assert not t.is_alive() and time.monotonic() - started < 2.5
    assert errors_seen and isinstance(errors_seen[0], (errors.CallInterrupted, errors.BackendUnavailable))


def test_a_stopped_cluster_leaves_the_process_disconnected(tmp_path):
    with InProcessCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        b = Box([3])
        b.make_persistent(alias="kept")
        assert objects.get_dispatcher() is c.client
    assert not objects.has_dispatcher()
    # Its data dir stays, as a LocalCluster's does: the object is back after a restart.
    with InProcessCluster(backends=1, data_dir=str(tmp_path / "c")):
        assert store.get_by_alias("kept").get() == [3]


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(errors.ConfigurationError):
        InProcessCluster(backends=0)
