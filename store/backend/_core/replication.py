"""Replicas of an object: the rules, pure (no gRPC, no Redis, no files).

An object with a replication factor ``n`` has one *primary* (the backend the
directory names as its owner, the only one that runs changing methods) and
up to ``n`` *replicas* on other backends, preferably on other hosts. The
directory keeps, per replicated object, a :class:`ReplicaSet`: its epoch,
primary, replicas and target factor. Every change of that set is a
compare-and-set on the epoch and primary it was computed from
(:mod:`store._directory.directory`), so two backends can never both win a change.

Safety, in the words of this module's functions:

- :func:`verdict`: a replica applies a state only if it comes from the epoch
  it knows or a later one; within an epoch, only a newer LSN replaces what it
  holds (an older one is acknowledged and ignored). A deposed primary's states
  carry an older epoch and are refused, so it cannot get a change acknowledged.
- :func:`after_ship`: the primary acknowledges only when every replica of the
  current set accepted the state. One that could not be reached leaves the set
  only through a compare-and-set in the directory; one that refused (a higher
  epoch) means this primary was deposed: the call fails.
- :func:`promoted` / :func:`can_promote`: a replica whose primary's heartbeat
  expired takes over with epoch + 1, only if the directory still shows the set
  it knows; at most one replica wins.
- :func:`choose_targets`: new replicas go to other hosts first (host identity,
  not backend id), then to other backends of the same host.

:class:`CallLedger` remembers recent changing calls with their results, per
object, so a retried call (same call id) returns its first result instead of
running twice; the recent entries travel with every shipped state.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from store._directory.replica_set import ReplicaSet

RECENT_CALLS = 32  # call ids (with results) shipped with each state of an object
LEDGER_LIMIT = 8192  # call ids remembered by one backend, all objects together


class Verdict(enum.Enum):
    APPLY = "apply"  # newer: store it
    OLD = "old"  # already held (or older): acknowledge, change nothing
    STALE = "stale"  # from a deposed primary (older epoch): refuse


def verdict(held_epoch: int, held_lsn: int, epoch: int, lsn: int) -> Verdict:
    """What a replica holding (held_epoch, held_lsn) does with a state (epoch, lsn)."""
    if epoch < held_epoch:
        return Verdict.STALE
    if epoch > held_epoch or lsn > held_lsn:
        return Verdict.APPLY
    return Verdict.OLD


class ShipOutcome(enum.Enum):
    ACK = "ack"  # every replica has it: acknowledge the call
    DROP = "drop"  # some unreachable: drop them (CAS), then acknowledge
    DEPOSED = "deposed"  # a replica knows a higher epoch: fail, this backend is not primary


def after_ship(rset: ReplicaSet, accepted: set[str], refused: set[str]) -> tuple[ShipOutcome, ReplicaSet]:
    """The primary's decision once a state was sent to every replica of ``rset``.

    Returns the outcome and, for DROP, the set without the unreachable
    replicas (the compare-and-set must still succeed before acknowledging).
    """
    if refused:
        return ShipOutcome.DEPOSED, rset
    unreachable = [r for r in rset.replicas if r not in accepted]
    if not unreachable:
        return ShipOutcome.ACK, rset
    kept = tuple(r for r in rset.replicas if r in accepted)
    return ShipOutcome.DROP, replace(rset, epoch=rset.epoch + 1, replicas=kept)


def can_promote(rset: ReplicaSet, me: str, primary_up: bool, have_copy: bool) -> bool:
    """Whether replica ``me`` should try to take over the object of ``rset``."""
    return not primary_up and have_copy and me in rset.replicas and rset.primary != me


def promoted(rset: ReplicaSet, me: str) -> ReplicaSet:
    """The set after ``me`` takes over: epoch + 1, the old primary out (it rejoins by repair)."""
    return ReplicaSet(rset.epoch + 1, me, tuple(r for r in rset.replicas if r != me), rset.target)


def resized(rset: ReplicaSet, replicas: tuple[str, ...]) -> ReplicaSet:
    """The set with other replicas: every change of a set raises its epoch, so a view
    computed from an older set can never win a compare-and-set."""
    return replace(rset, epoch=rset.epoch + 1, replicas=tuple(replicas))


def choose_targets(
    n: int, primary: str, taken: tuple[str, ...], candidates: list[tuple[str, str]], hosts: dict[str, str]
) -> list[str]:
    """Up to ``n`` backends for new replicas, other hosts first.

    ``candidates`` are (backend id, host id) of the backends that are up, in
    the order to prefer; ``hosts`` maps the primary and the current replicas
    to their host ids. A host already holding the object is used again only
    when no other host is left.
    """
    used_hosts = {hosts.get(b, "") for b in (primary,) + taken}
    pool = [(b, h) for b, h in candidates if b != primary and b not in taken]
    out: list[str] = []
    for fresh_only in (True, False):
        for b, h in pool:
            if len(out) == n:
                return out
            if b in out or (fresh_only and h in used_hosts):
                continue
            out.append(b)
            used_hosts.add(h)
    return out


@dataclass
class Copy:
    """A replica held by this backend: the primary's last state it accepted."""

    object_id: str
    primary: str
    epoch: int
    lsn: int
    class_key: str
    alias: str
    payload: bytes
    buffers: list
    calls: list = field(default_factory=list)  # [(call_id, payload, buffers)], oldest first


class CallLedger:
    """Recent changing calls and their results, per object (thread-safe).

    ``lookup`` finds the result of a call id that already ran on an object;
    ``record`` adds one; ``recent`` lists an object's last ``RECENT_CALLS``
    for shipping; ``seed`` takes those a replica received when it is promoted.
    Bounded: the oldest entries go first.
    """

    def __init__(self, limit: int = LEDGER_LIMIT):
        self.limit = limit
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self._recent: dict[str, OrderedDict[str, None]] = {}

    def lookup(self, object_id: str, call_id: str) -> tuple[bytes, list] | None:
        """(payload, buffers) of the recorded result, or None."""
        with self._lock:
            return self._items.get((object_id, call_id))

    def record(self, object_id: str, call_id: str, result: tuple) -> None:
        with self._lock:
            self._items[(object_id, call_id)] = result
            recent = self._recent.setdefault(object_id, OrderedDict())
            recent[call_id] = None
            while len(recent) > RECENT_CALLS:
                recent.popitem(last=False)
            while len(self._items) > self.limit:
                (oid, cid), _ = self._items.popitem(last=False)
                r = self._recent.get(oid)
                if r is not None:
                    r.pop(cid, None)
                    if not r:
                        del self._recent[oid]

    def recent(self, object_id: str) -> list[tuple[str, tuple]]:
        with self._lock:
            ids = list(self._recent.get(object_id, ()))
            return [(c, self._items[(object_id, c)]) for c in ids if (object_id, c) in self._items]

    def seed(self, object_id: str, calls: list) -> None:
        for call_id, payload, buffers in calls:
            self.record(object_id, call_id, (payload, buffers))

    def forget(self, object_id: str) -> None:
        with self._lock:
            for cid in self._recent.pop(object_id, ()):
                self._items.pop((object_id, cid), None)

    def __len__(self) -> int:
        return len(self._items)

    def validate(self) -> None:
        """Invariants: bounded, and every recent id has its result."""
        with self._lock:
            assert len(self._items) <= self.limit
            for oid, ids in self._recent.items():
                assert ids, f"{oid}: empty recent list kept"
                assert len(ids) <= RECENT_CALLS
                for cid in ids:
                    assert (oid, cid) in self._items, f"{oid}:{cid} recent without result"
