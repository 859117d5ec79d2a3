"""Hostile probes of replicas and failover (issue 11), on real clusters.

Each test names the guarantee it attacks. Tests that fail on the branch as
reviewed show a defect; the others pin a guarantee that held under attack.
Real processes only: a LocalCluster (redis-server + 3 backends, heartbeat TTL
2 s) per test; faults are kill -9, SIGSTOP/SIGCONT and FLUSHALL.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import chaos
from hostilelib import raw_call, raw_delete, raw_get_attr, wait_for
from lifelib import Counter
from replicalib import TTL
from store.errors import ClaypotError, ConfigurationError, FeatureUnavailable, ObjectNotFound
from store._wire.generated import claypot_pb2 as pb

pytestmark = pytest.mark.slow


def _promoted(c, oid: str, old: str):
    def check():
        try:
            r = c.client.resolve(object_id=oid)
        except ClaypotError:
            return None
        return r if r.backend_id != old else None

    return wait_for(check, TTL * 6, "promotion of a replica")


# -- split brain ---------------------------------------------------------------------------


def test_a_change_running_when_the_primary_is_deposed_is_never_acknowledged(rcluster):
    """A changing call in progress on the primary while it is frozen past the TTL (a
    partition) and a replica takes over must not be acknowledged by the old primary:
    the new primary never saw it, so an acknowledged change would be lost and two
    backends would have acknowledged changes to one object."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    ref = c.client.resolve(object_id=oid)
    old = c.process_of(ref.backend_id)
    out = {}
    t = threading.Thread(
        target=lambda: out.setdefault("r", raw_call(c, old.address, oid, "slow_incr", (TTL * 3.5, 1), "slow-1", 60))
    )
    t.start()
    time.sleep(0.3)  # the call is running (holds the object's lock)
    os.kill(old.pid, signal.SIGSTOP)  # cut off: no heartbeat, no answers
    try:
        new = _promoted(c, oid, ref.backend_id)
    finally:
        os.kill(old.pid, signal.SIGCONT)  # healed while the slow call still runs
    t.join(60)
    acked = out["r"]
    value = raw_call(c, c.process_of(new.backend_id).address, oid, "get", (), "get-1")
    if not isinstance(acked, pb.Error):
        # The old primary acknowledged the increment (returned 1): it must be in the object.
        assert value == acked, (
            f"old primary acknowledged slow_incr -> {acked}, but the new "
            f"primary holds {value}: acknowledged change lost"
        )


def test_a_deposed_primary_does_not_acknowledge_a_delete(rcluster):
    """A Delete that reaches the primary while it is frozen (queued in its socket) is
    served when it resumes, after a replica took over. Delete has no lease check: the
    old primary removes the directory entry of an object another backend now owns,
    while that backend goes on acknowledging changes to it."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    ref = c.client.resolve(object_id=oid)
    old = c.process_of(ref.backend_id)
    os.kill(old.pid, signal.SIGSTOP)
    out = {}
    try:
        t = threading.Thread(target=lambda: out.setdefault("d", raw_delete(c, old.address, oid, 60)))
        t.start()
        new = _promoted(c, oid, ref.backend_id)
        newp = c.process_of(new.backend_id)
        assert raw_call(c, newp.address, oid, "incr", (1,), "after-promotion") == 1
    finally:
        os.kill(old.pid, signal.SIGCONT)
    t.join(60)
    if out["d"] is None:
        # The old primary said the object is deleted. Then nobody may change it any more.
        time.sleep(TTL)
        after = raw_call(c, newp.address, oid, "incr", (1,), "after-delete")
        assert isinstance(after, pb.Error), (
            "the deposed primary acknowledged a delete and the new primary still "
            f"acknowledges changes to the object (incr -> {after})"
        )
    else:
        assert out["d"].code in ("ObjectMoved", "BackendUnavailable"), out["d"]


# -- repair / the directory ----------------------------------------------------------------


def test_a_directory_wipe_does_not_silently_drop_the_replication_factor(rcluster):
    """FLUSHALL: backends republish what they hold, but the replica sets (hash
    ``replicas``) are not republished: the primary forgets the object is replicated,
    the replicas drop their copies, and nothing restores the factor, so the next
    loss of the primary's host loses the object."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    for _ in range(5):
        ctr.incr()
    chaos.wipe_redis(c)
    wait_for(lambda: _resolves(c, oid), TTL * 5, "object republished")
    time.sleep(TTL * 4)  # monitor rounds: step-downs, drops, repair
    ref = c.client.resolve(object_id=oid)
    assert len(ref.replicas) == 1, f"after a directory wipe object has replicas {list(ref.replicas)} (factor 1 lost)"


def _resolves(c, oid):
    try:
        return c.client.resolve(object_id=oid)
    except ClaypotError:
        return None


# -- durability ----------------------------------------------------------------------------


def _kill_all(c):
    for p in c.processes:
        p.kill()


def _start(c, p):
    p.start()
    c._record_children()


def test_kill9_of_every_holder_after_a_failover_loses_nothing_acknowledged(rcluster):
    """Failover, more acknowledged changes at the new primary, then kill -9 of every
    backend; the stale old primary restarts first (alone for two TTLs), then the rest.
    Every acknowledged increment must survive, none applied twice."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    for _ in range(10):
        ctr.incr()
    ref = c.client.resolve(object_id=oid)
    old = c.process_of(ref.backend_id)
    old.kill()
    new = _promoted(c, oid, ref.backend_id)
    for _ in range(10):
        ctr.incr()  # acknowledged by the new primary (and its replica, if repaired)
    _kill_all(c)
    _start(c, old)  # the deposed one first, with the oldest state
    time.sleep(TTL * 2.5)
    for p in c.processes:
        if p is not old:
            _start(c, p)
    time.sleep(TTL * 2.5)
    got = wait_for(lambda: _value(c, oid), TTL * 5, "a readable object")
    assert got == (20,), f"after kill -9 of every holder: {got[0]} (20 acknowledged)"
    assert ctr.incr() == 21, new


def test_kill9_of_primary_and_replica_restart_replica_first(rcluster):
    """kill -9 of both holders (no failover happened); the replica restarts first and
    promotes itself from its log (the primary is down); then the primary returns."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    for _ in range(15):
        ctr.incr()
    ref = c.client.resolve(object_id=oid)
    prim, rep = c.process_of(ref.backend_id), c.process_of(ref.replicas[0])
    prim.kill()
    rep.kill()
    _start(c, rep)
    _promoted(c, oid, ref.backend_id)
    _start(c, prim)
    time.sleep(TTL * 2)
    assert wait_for(lambda: _value(c, oid), TTL * 5, "a readable object") == (15,)
    assert ctr.incr() == 16


def _value(c, oid):
    try:
        return (_get(c, oid),)
    except ClaypotError:
        return None


def _get(c, oid):
    ref = c.client.resolve(object_id=oid)
    r = raw_call(c, c.process_of(ref.backend_id).address, oid, "get", (), "g", 10)
    if isinstance(r, pb.Error):
        raise ClaypotError(r.message)
    return r


# -- bad input: typed errors, never a hang -----------------------------------------------------


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1", 3, 10**6])
def test_bad_replica_counts_are_configuration_errors_and_leave_nothing(rcluster, bad):
    c = rcluster
    before = chaos.redis_client(c).hlen(_objects_key(c))
    obj = Counter(1)
    started = time.monotonic()
    with pytest.raises(ConfigurationError):
        obj.make_persistent(replicas=bad)
    assert time.monotonic() - started < TTL * 2
    assert chaos.redis_client(c).hlen(_objects_key(c)) == before  # nothing half-made


def _objects_key(c):
    r = chaos.redis_client(c)
    keys = [k.decode() for k in r.keys("*objects*")]
    return keys[0] if keys else "objects"


def test_add_replica_edge_cases_are_typed(rcluster):
    c = rcluster
    ctr = Counter(2)
    ctr.make_persistent(replicas=2)  # every other backend holds a replica already
    ref = c.client.resolve(object_id=ctr.getID())
    with pytest.raises(ConfigurationError):
        ctr.add_replica()
    with pytest.raises(ConfigurationError):
        ctr.add_replica(ref.backend_id)
    with pytest.raises(ConfigurationError):
        ctr.add_replica(ref.replicas[0])
    with pytest.raises(FeatureUnavailable):
        ctr.move(ref.replicas[0])
    assert ctr.incr() == 3
    assert c.client.resolve(object_id=ctr.getID()).replicas == ref.replicas


# -- replica reads ---------------------------------------------------------------------------


def test_replica_reads_never_go_back_in_time_under_concurrent_writes(rcluster):
    """A read on a replica sees every increment acknowledged before the read started."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=2)
    acked = [0]
    stop = threading.Event()
    bad = []

    def writer():
        while not stop.is_set():
            acked[0] = ctr.incr()

    def reader():
        r = c.client.get_by_id(ctr.getID()).call_on_replica()
        while not stop.is_set():
            floor = acked[0]
            v = r.get()
            if v < floor:
                bad.append((floor, v))

    ts = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in ts:
        t.start()
    time.sleep(4)
    stop.set()
    for t in ts:
        t.join(30)
    assert acked[0] > 20 and bad == [], bad[:5]


def test_replica_read_of_a_deleted_object_is_object_not_found(rcluster):
    """The replica is down (kill -9) while the object is deleted; it restarts with the
    copy in its log. A replica read must not return the deleted object's state."""
    c = rcluster
    ctr = Counter(7)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    ref = c.client.resolve(object_id=oid)
    rep = c.process_of(ref.replicas[0])
    rep.kill()
    reader = c.client.get_by_id(oid).call_on_replica()
    ctr.delete_persistent()
    _start(c, rep)
    for _ in range(int(TTL * 3 / 0.2)):
        with pytest.raises(ObjectNotFound):
            reader.get()
        time.sleep(0.2)


# -- failover back to a backend that held the object before ------------------------------------


def _repaired(c, oid, want: str | None = None):
    def check():
        r = _resolves(c, oid)
        if r is None or not r.replicas:
            return None
        return r if want is None or want in r.replicas else None

    return wait_for(check, TTL * 8, f"repair{' onto ' + want[:8] if want else ''}")


def test_failover_back_to_a_former_primary_keeps_every_acknowledged_change(rcluster):
    """A -> B -> C -> A: the object fails back over to a backend that was its primary,
    lost it (restarted, stale copy dropped) and became its replica again by repair."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    ref = c.client.resolve(object_id=oid)
    a, b = ref.backend_id, ref.replicas[0]
    cc = next(p.backend_id for p in c.processes if p.backend_id not in (a, b))
    for _ in range(5):
        ctr.incr()
    c.process_of(a).kill()
    assert _promoted(c, oid, a).backend_id == b
    _repaired(c, oid, cc)
    for _ in range(5):
        ctr.incr()
    _start(c, c.process_of(a))
    time.sleep(TTL)
    c.process_of(b).kill()
    assert _promoted(c, oid, b).backend_id == cc
    _repaired(c, oid, a)
    for _ in range(5):
        ctr.incr()
    c.process_of(cc).kill()
    assert _promoted(c, oid, cc).backend_id == a
    assert ctr.get() == 15
    assert ctr.incr() == 16


def test_failover_back_to_a_primary_that_stepped_down_in_the_same_process(rcluster):
    """A frozen past the TTL (partition), healed: it steps down and repair makes it a
    replica again; then it must be able to take the object over once more."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=2)
    oid = ctr.getID()
    a = c.client.resolve(object_id=oid).backend_id
    pa = c.process_of(a)
    for _ in range(5):
        ctr.incr()
    os.kill(pa.pid, signal.SIGSTOP)
    try:
        n = _promoted(c, oid, a).backend_id
    finally:
        os.kill(pa.pid, signal.SIGCONT)
    for _ in range(5):
        ctr.incr()
    _repaired(c, oid, a)
    o = next(r for r in c.client.resolve(object_id=oid).replicas if r != a)
    for _ in range(5):
        ctr.incr()
    po = c.process_of(o)
    os.kill(po.pid, signal.SIGSTOP)
    try:
        c.process_of(n).kill()
        assert _promoted(c, oid, n).backend_id == a
    finally:
        os.kill(po.pid, signal.SIGCONT)
    assert ctr.get() == 15
    assert ctr.incr() == 16


# -- operations: drain / scale down ------------------------------------------------------------


def test_draining_the_primary_of_a_replicated_object_works(rcluster):
    """`claypot drain` / LocalCluster.drain / scale down move every object off a backend.
    A replicated object is never moved (FeatureUnavailable), so draining its primary
    should hand it to a replica (or skip it and let failover do it), not fail."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    plain = Counter(100)
    oid = ctr.getID()
    a = c.client.resolve(object_id=oid).backend_id
    plain.make_persistent(backend=a)
    for _ in range(3):
        ctr.incr()
    c.drain(a)
    assert c.client.resolve(object_id=oid).backend_id != a
    assert ctr.get() == 3 and plain.get() == 100
    assert ctr.incr() == 4


# -- Redis restarts ------------------------------------------------------------------------------


def test_a_redis_restart_longer_than_the_ttl_loses_and_duplicates_nothing(rcluster):
    """kill -9 of Redis for longer than the heartbeat TTL while clients increment: every
    alive key has expired when it returns, so replicas may promote while their primary
    is alive. Whatever happens: no acknowledged increment lost, none applied twice, and
    calls work again within a bound."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    acked, unknown = [0], [0]
    stop = threading.Event()

    def writer():
        p = c.client.get_by_id(oid)
        while not stop.is_set():
            try:
                p.incr()
                acked[0] += 1
            except ClaypotError:
                unknown[0] += 1
                time.sleep(0.05)

    ts = [threading.Thread(target=writer) for _ in range(2)]
    for t in ts:
        t.start()
    time.sleep(1)
    chaos.kill_redis(c)
    time.sleep(TTL * 1.5)
    chaos.start_redis(c)
    time.sleep(TTL * 3)
    stop.set()
    for t in ts:
        t.join(60)
    final = wait_for(lambda: _value(c, oid), TTL * 5, "object readable after the Redis restart")[0]
    assert acked[0] <= final <= acked[0] + unknown[0], (acked[0], unknown[0], final)
    started = time.monotonic()
    ctr.incr()
    assert time.monotonic() - started < TTL * 2


def test_a_healed_old_primary_never_serves_a_stale_read(rcluster):
    """After a partition heals, the deposed primary must not answer reads from its stale
    copy (the new primary acknowledged an increment meanwhile). A race between the
    heartbeat (renews the lease) and the monitor (steps down): up to 3 rounds."""
    c = rcluster
    stale = []
    for round_ in range(3):
        ctr = Counter(0)
        ctr.make_persistent(replicas=1)
        oid = ctr.getID()
        ref = c.client.resolve(object_id=oid)
        old = c.process_of(ref.backend_id)
        os.kill(old.pid, signal.SIGSTOP)
        try:
            new = _promoted(c, oid, ref.backend_id)
            assert raw_call(c, c.process_of(new.backend_id).address, oid, "incr", (1,), f"i{round_}") == 1
        finally:
            os.kill(old.pid, signal.SIGCONT)
        end = time.monotonic() + TTL
        while time.monotonic() < end:
            r = raw_get_attr(c, old.address, oid, "value")
            if isinstance(r, int) and r == 0:
                stale.append(round_)
        if stale:
            break
        time.sleep(TTL)  # let the healed backend come back up before the next round
    assert not stale, f"{len(stale)} stale read(s) of 0 from the deposed primary (new value 1)"


# -- big objects -------------------------------------------------------------------------------


def test_a_retried_call_id_on_a_big_replicated_object_runs_once(bigcluster):
    """The client library retries CallInterrupted of a replicated object's changing calls
    with the same call id, relying on the ledger. A big (write-behind) object's changes
    never record their call id, so a retry runs the method a second time."""
    from lifelib import Grow

    c = bigcluster
    g = Grow()
    g.make_persistent(replicas=1)
    g.grow(200_000)  # now over big_object: write-behind
    oid = g.getID()
    ref = c.client.resolve(object_id=oid)
    addr = c.process_of(ref.backend_id).address
    assert raw_call(c, addr, oid, "slow", (0.0,), "once") is None
    assert raw_call(c, addr, oid, "slow", (0.0,), "once") is None  # the retry
    assert g.info() == (1000, 200_000), f"a retried call ran twice: {g.info()}"


def test_a_big_replicated_object_survives_failover_after_its_flush(bigcluster):
    from lifelib import Grow

    c = bigcluster
    g = Grow()
    g.make_persistent(replicas=1)
    g.grow(200_000)
    g.settag(7)
    time.sleep(3)  # past the flush interval: shipped at checkpoint
    oid = g.getID()
    ref = c.client.resolve(object_id=oid)
    c.process_of(ref.backend_id).kill()
    _promoted(c, oid, ref.backend_id)
    assert g.info() == (7, 200_000)


# -- creation window -----------------------------------------------------------------------------


def test_a_change_made_while_replicas_are_being_created_is_not_lost(rcluster):
    """make_persistent(replicas=1) must not publish the object (alias included) before its
    replicas hold it: a change another client makes in between would be acknowledged by
    the primary alone and never reach the replica, so a kill of the primary right after
    would lose it. The replicas are frozen for a moment (< TTL) while it is created."""
    from store._api import api

    c = rcluster
    p = c.processes[0]
    others = [q for q in c.processes if q is not p]
    Counter(0).make_persistent(backend=p.backend_id, replicas=2)  # channels to both open
    out = {}
    for q in others:
        os.kill(q.pid, signal.SIGSTOP)  # the replicas take their state slowly (< TTL)
    thaw = threading.Timer(0.4, lambda: [os.kill(q.pid, signal.SIGCONT) for q in others])
    thaw.start()
    try:
        t = threading.Thread(
            target=lambda: out.setdefault(
                "r", Counter(0).make_persistent(alias="race", backend=p.backend_id, replicas=1)
            )
        )
        t.start()
        proxy = wait_for(lambda: _by_alias(api, "race"), 5, "the alias published")
        t1 = time.monotonic()
        acked = proxy.incr(5)
        assert time.monotonic() - t1 < TTL, "a call waited past the TTL for the replica set"
    finally:
        thaw.join()
    t.join(30)
    oid = proxy.getID()
    ref = c.client.resolve(object_id=oid)
    assert ref.replicas, "created without replicas"
    p.kill()
    _promoted(c, oid, p.backend_id)
    assert proxy.get() == acked == 5, f"acknowledged incr(5) lost: now {proxy.get()}"


def _by_alias(api, alias):
    try:
        return api.get_by_alias(alias)
    except ClaypotError:
        return None


# -- repair -----------------------------------------------------------------------------------


def test_repair_survives_its_target_freezing_mid_copy_and_restores_the_factor(rcluster):
    """The replica is killed; the only repair target is frozen while repair copies to it,
    then healed. Calls must not stall beyond a bound, nothing acknowledged is lost, and
    the factor comes back once the target is back."""
    c = rcluster
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    ref = c.client.resolve(object_id=oid)
    x = next(p for p in c.processes if p.backend_id not in (ref.backend_id, *ref.replicas))
    for _ in range(3):
        ctr.incr()
    os.kill(x.pid, signal.SIGSTOP)
    worst = 0.0
    try:
        c.process_of(ref.replicas[0]).kill()
        end = time.monotonic() + TTL * 3
        while time.monotonic() < end:
            t = time.monotonic()
            ctr.incr()
            worst = max(worst, time.monotonic() - t)
    finally:
        os.kill(x.pid, signal.SIGCONT)
    n = ctr.get()
    again = _repaired(c, oid, x.backend_id)
    assert list(again.replicas) == [x.backend_id]
    assert worst < TTL * 2, f"a call stalled {worst:.1f}s while repair copied"
    assert ctr.incr() == n + 1
    c.process_of(ref.backend_id).kill()
    _promoted(c, oid, ref.backend_id)
    assert ctr.get() == n + 1


# -- one slow replica must not stall unrelated objects ----------------------------------------------


def test_a_frozen_replica_does_not_stall_objects_replicated_elsewhere(rcluster):
    """Every ship goes through one pool of 8 threads per backend. 24 objects whose
    replica is frozen each hold a pool thread for the ship timeout; an object whose
    replica is healthy waits behind them (ceil(24/8) x the ship timeout)."""
    c = rcluster
    p, r, x = c.processes
    stuck = []
    for _ in range(24):
        o = Counter(0)
        o.make_persistent(backend=p.backend_id)
        o.add_replica(r.backend_id)
        stuck.append(o)
    healthy = Counter(0)
    healthy.make_persistent(backend=p.backend_id)
    healthy.add_replica(x.backend_id)
    healthy.incr()
    os.kill(r.pid, signal.SIGSTOP)
    try:
        ts = [threading.Thread(target=o.incr) for o in stuck]
        for t in ts:
            t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        healthy.incr()
        took = time.monotonic() - t0
    finally:
        os.kill(r.pid, signal.SIGCONT)
    for t in ts:
        t.join(60)
    assert took < TTL, f"a call on an object with a healthy replica took {took:.1f}s"
