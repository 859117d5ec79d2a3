"""The pure replication rules (store.backend._core.replication) and the history checker."""

from __future__ import annotations

import math

from histories import Op, check
from store.backend._core import replication as rp
from store.backend._core.replication import CallLedger, ReplicaSet, ShipOutcome, Verdict


def test_replica_set_round_trips_through_its_directory_encoding():
    rs = ReplicaSet(7, "p", ("r1", "r2"), 2)
    assert ReplicaSet.decode(rs.encode()) == rs
    assert ReplicaSet.decode(ReplicaSet(1, "p", (), 1).encode()).replicas == ()
    assert ReplicaSet(1, "p", ("a",), 3).missing == 2


def test_a_replica_refuses_older_epochs_and_ignores_older_states():
    assert rp.verdict(3, 100, 2, 500) is Verdict.STALE  # a deposed primary
    assert rp.verdict(3, 100, 3, 101) is Verdict.APPLY
    assert rp.verdict(3, 100, 3, 100) is Verdict.OLD  # a resend: acknowledged, no change
    assert rp.verdict(3, 100, 3, 50) is Verdict.OLD
    assert rp.verdict(3, 100, 4, 1) is Verdict.APPLY  # a new epoch wins whatever its LSN


def test_the_primary_acknowledges_only_when_every_replica_has_the_state():
    rs = ReplicaSet(2, "p", ("a", "b"), 2)
    assert rp.after_ship(rs, {"a", "b"}, set()) == (ShipOutcome.ACK, rs)
    outcome, new = rp.after_ship(rs, {"a"}, set())
    assert outcome is ShipOutcome.DROP and new.replicas == ("a",) and new.epoch == 3
    assert rp.after_ship(rs, {"a"}, {"b"})[0] is ShipOutcome.DEPOSED


def test_promotion_raises_the_epoch_and_only_a_member_with_a_copy_may_try():
    rs = ReplicaSet(4, "p", ("a", "b"), 2)
    assert rp.can_promote(rs, "a", primary_up=False, have_copy=True)
    assert not rp.can_promote(rs, "a", primary_up=True, have_copy=True)
    assert not rp.can_promote(rs, "c", primary_up=False, have_copy=True)  # dropped earlier
    assert not rp.can_promote(rs, "a", primary_up=False, have_copy=False)
    new = rp.promoted(rs, "a")
    assert (new.epoch, new.primary, new.replicas, new.target) == (5, "a", ("b",), 2)
    assert rp.resized(rs, ("a",)).epoch == 5


def test_targets_prefer_other_hosts_then_fall_back_to_other_backends():
    hosts = {"p": "h1", "q": "h1", "x": "h2", "y": "h2", "z": "h3"}
    cands = [(b, h) for b, h in hosts.items()]
    assert rp.choose_targets(2, "p", (), cands, hosts) == ["x", "z"]
    assert rp.choose_targets(1, "p", ("x",), cands, hosts) == ["z"]
    # One host only: other backends of it are better than nothing.
    one = {"p": "h", "q": "h"}
    assert rp.choose_targets(1, "p", (), list(one.items()), one) == ["q"]
    assert rp.choose_targets(3, "p", (), list(one.items()), one) == ["q"]


def test_the_call_ledger_is_bounded_and_ships_recent_calls():
    ledger = CallLedger(limit=50)
    for i in range(40):
        ledger.record("o1", f"c{i}", (b"r%d" % i, []))
    assert ledger.lookup("o1", "c39") == (b"r39", [])
    recent = ledger.recent("o1")
    assert len(recent) == rp.RECENT_CALLS and recent[-1][0] == "c39"
    for i in range(30):
        ledger.record("o2", f"d{i}", (b"", []))
    assert len(ledger) == 50 and ledger.lookup("o1", "c0") is None
    ledger.validate()
    other = CallLedger()
    other.seed("o1", [(c, r[0], r[1]) for c, r in recent])
    assert other.lookup("o1", "c39") == (b"r39", [])
    other.forget("o1")
    assert other.lookup("o1", "c39") is None
    other.validate()


def _op(name, arg, start, end, result):
    return Op(0, name, arg, start, end, result)


def test_the_checker_accepts_linearizable_counter_histories():
    ops = [_op("incr", 1, 0, 2, 1), _op("incr", 1, 1, 3, 2), _op("get", None, 4, 5, 2)]
    assert check(ops) is None
    # Concurrent increments may take effect in either order.
    ops = [_op("incr", 1, 0, 5, 2), _op("incr", 1, 1, 6, 1)]
    assert check(ops) is None
    # An interrupted increment may or may not have happened.
    ops = [_op("incr", 1, 0, math.inf, None), _op("get", None, 5, 6, 1)]
    ops[0].result = __import__("histories").UNKNOWN
    assert check(ops) is None


def test_the_checker_rejects_lost_updates_and_stale_reads():
    lost = [_op("incr", 1, 0, 1, 1), _op("incr", 1, 2, 3, 2), _op("get", None, 4, 5, 1)]
    assert check(lost) is not None
    duplicate = [_op("incr", 1, 0, 1, 1), _op("get", None, 2, 3, 2)]
    assert check(duplicate) is not None
    # A read after an acknowledged write that does not see it.
    stale = [_op("incr", 5, 0, 1, 5), _op("get", None, 2, 3, 0)]
    assert check(stale) is not None
