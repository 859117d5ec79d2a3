"""Replicas and failover on a real cluster (3 backends, short heartbeat TTL).

The primary is killed (kill -9) or frozen (SIGSTOP: a partition from the
directory and the clients) at a seeded random moment while clients change
and read a replicated counter; the recorded history must be linearizable
(nothing acknowledged lost, nothing run twice), the replication factor comes
back, a retried call id runs once, and a healed old primary never
acknowledges anything again.
"""

from __future__ import annotations

import dataclasses
import os
import time

import grpc
import pytest

import store
from lifelib import Counter
from replicalib import ENV, TTL, RoundStats, run_round
from store import LocalCluster
from store.backend._engine.replicas import ReplicaLog
from store._client.client import CHANNEL_OPTIONS, TOKEN_HEADER
from store.errors import ConfigurationError, FeatureUnavailable, ProtocolError
from store._wire.generated import claypot_pb2 as pb
from store._wire.generated import claypot_pb2_grpc as pb_grpc
from store._wire.serialization import dumps, loads

pytestmark = pytest.mark.slow


@pytest.fixture
def env_ttl(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def rcluster(tmp_path, env_ttl):
    with LocalCluster(backends=3, data_dir=str(tmp_path / "c"), backend_env=ENV) as c:
        yield c


def _raw_call(cluster, address: str, object_id: str, name: str, args, call_id: str):
    payload, buffers = dumps((args, {}))
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        reply = pb_grpc.BackendStub(channel).Call(
            pb.CallRequest(
                object_id=object_id,
                kind=pb.METHOD,
                name=name,
                chain_id=call_id,
                call_id=call_id,
                args=pb.Value(payload=payload, buffers=buffers),
            ),
            # A new channel may share the killed backend's connection backoff: wait.
            timeout=30,
            metadata=((TOKEN_HEADER, cluster.token),),
            wait_for_ready=True,
        )
    finally:
        channel.close()
    if reply.HasField("error"):
        return reply.error
    return loads(reply.result.payload, list(reply.result.buffers))


def _copies(cluster, backend_id: str) -> dict:
    """The replica copies a backend's log holds (read from its file, as a restart would)."""
    d = os.path.join(cluster.process_of(backend_id).data_dir, "replicas")
    return ReplicaLog(d, False).read()[0]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_replicas_are_placed_elsewhere_read_and_deleted_with_the_object(rcluster):
    c = rcluster
    ctr = Counter(5)
    ctr.make_persistent(replicas=2)
    ref = c.client.resolve(object_id=ctr.getID())
    assert len(ref.replicas) == 2 and ref.backend_id not in ref.replicas and ref.epoch == 1
    assert len(store._api.api.get_locations(ctr.getID())) == 3
    for _ in range(10):
        ctr.incr()
    # Synchronous shipping: every replica has every acknowledged change.
    reader = ctr.call_on_replica()
    assert [reader.get() for _ in range(4)] == [15] * 4 and reader.value == 15
    assert reader.incr() == 16  # a changing call still goes to the primary
    ctr.call_on_replica(False)
    for rid in ref.replicas:
        assert list(_copies(c, rid)) == [ctr.getID()]
    with pytest.raises(FeatureUnavailable):
        ctr.move(ref.replicas[0])
    ctr.delete_persistent()
    for rid in ref.replicas:
        _wait(lambda: _copies(c, rid) == {}, 10, "replica copies dropped")
    with pytest.raises(ConfigurationError):
        Counter().make_persistent(replicas=3)  # only 2 other backends
    with pytest.raises(ConfigurationError):
        Counter().make_persistent(replicas=-1)


class ReplicatedCounter(Counter):
    """Every instance keeps one replica unless make_persistent says otherwise."""

    claypot_replicas = 1


def test_the_factor_comes_from_the_call_the_class_or_the_cluster(rcluster, monkeypatch):
    c = rcluster
    by_class = ReplicatedCounter(1)
    by_class.make_persistent()
    assert len(c.client.resolve(object_id=by_class.getID()).replicas) == 1
    overridden = ReplicatedCounter(1)
    overridden.make_persistent(replicas=0)
    assert c.client.resolve(object_id=overridden.getID()).epoch == 0
    # As CLAYPOT_REPLICAS=2 would:
    monkeypatch.setattr(c.client, "settings", dataclasses.replace(c.client.settings, replicas=2))
    plain = Counter(1)
    plain.make_persistent()
    assert len(c.client.resolve(object_id=plain.getID()).replicas) == 2
    # A replica added later counts too, and serves reads.
    overridden.add_replica()
    assert overridden.call_on_replica().get() == 1


def test_a_retried_call_id_runs_once_even_across_a_failover(rcluster):
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    ref = c.client.resolve(object_id=oid)
    primary = c.process_of(ref.backend_id)
    assert _raw_call(c, primary.address, oid, "incr", (10,), "call-a") == 10
    assert _raw_call(c, primary.address, oid, "incr", (10,), "call-a") == 10  # a retry
    assert _raw_call(c, primary.address, oid, "incr", (1,), "call-b") == 11
    primary.kill()
    new = _wait(lambda: (r := c.client.resolve(object_id=oid)).backend_id != ref.backend_id and r, TTL * 5, "promotion")
    assert new.epoch > ref.epoch
    promoted = c.process_of(new.backend_id)
    # The interrupted client retries both calls at the new primary: original results.
    assert _raw_call(c, promoted.address, oid, "incr", (10,), "call-a") == 10
    assert _raw_call(c, promoted.address, oid, "incr", (1,), "call-b") == 11
    assert ctr.get() == 11
    # The factor comes back: a new replica on the remaining backend.
    again = _wait(lambda: (r := c.client.resolve(object_id=oid)).replicas and r, TTL * 5, "repair")
    assert again.replicas[0] not in (ref.backend_id, new.backend_id)
    # The old primary restarts: the directory names another owner, so it drops its copy
    # and sends callers there.
    c.restart(ref.backend_id, kill=True)
    err = _raw_call(c, primary.address, oid, "incr", (1,), "call-c")
    assert isinstance(err, pb.Error) and err.code in ("ObjectMoved", "ObjectNotFound")
    assert ctr.incr() == 12


@pytest.mark.parametrize("seed", [11, 12])
def test_killing_the_primary_under_load_loses_nothing_and_runs_nothing_twice(rcluster, seed):
    stats = RoundStats()
    run_round(rcluster, seed, stats, clients=3, ops=30, fault="kill")
    assert stats.violations == [] and stats.lost_updates == 0 and stats.duplicates == 0
    assert stats.failovers == 1 and stats.acknowledged > 60
    # Calls resume within a bound: generous here (the bench publishes the measured one).
    assert stats.failover_seconds[0] < TTL * 4, stats.as_dict()


def test_a_partitioned_primary_is_fenced_and_steps_down_when_healed(rcluster):
    stats = RoundStats()
    run_round(rcluster, 21, stats, clients=3, ops=30, fault="partition")
    assert stats.violations == [] and stats.lost_updates == 0 and stats.duplicates == 0
    assert stats.failovers == 1


def test_replica_reads_refuse_changing_methods(rcluster):
    c = rcluster
    ctr = Counter(1)
    ctr.make_persistent(replicas=1)
    ref = c.client.resolve(object_id=ctr.getID())
    replica = c.process_of(ref.replicas[0])
    payload, buffers = dumps(((), {}))
    channel = grpc.insecure_channel(replica.address, options=CHANNEL_OPTIONS)
    try:
        reply = pb_grpc.BackendStub(channel).Call(
            pb.CallRequest(
                object_id=ctr.getID(),
                kind=pb.METHOD,
                name="incr",
                chain_id="x",
                call_id="x",
                on_replica=True,
                args=pb.Value(payload=payload, buffers=buffers),
            ),
            timeout=30,
            metadata=((TOKEN_HEADER, c.token),),
        )
    finally:
        channel.close()
    assert reply.error.code == ProtocolError.__name__, reply.error
    assert ctr.get() == 1
