"""The life of every object on one backend: an explicit state machine, pure.

No gRPC, no Redis, no file I/O here. The heap reports *events* (a call
finished, a load completed, a move was requested, ...); the core checks that
the transition is legal, updates the object's state, and returns the
*instructions* the heap must carry out, in order (log this state, write this
checkpoint, publish this move, drop the live instance). This keeps every
rule about an object's life in one place, testable without processes, with
:meth:`Lifecycle.validate` checking its invariants.

States and transitions::

                 persisted                 spilled
    (absent) ───────────────► LIVE ◄──────────────────► SPILLED
        ▲    stored_at_start ───────────────────────────►  │ load_started
        │                      ▲  loaded                   ▼
        │                      └──────────────────────  LOADING
        │                                    load_failed ──► SPILLED
        │        move_requested            move_done
        │  LIVE ───────────────► MOVING ────────────► MOVED(to) ── persisted ──► LIVE
        │                          │ move_failed                   (moved back)
        │                          ▼
        │                         LIVE
        │        delete_requested → delete_done
        └──── LIVE / SPILLED ──────────────────────────► DELETED

Each object carries an *epoch*, bumped every time it leaves this backend
(moved or deleted) or arrives again. A call is admitted against the state
and epoch it saw; the heap re-checks both under the object's lock, so a
call that queued behind a move or delete is refused (``ObjectMoved`` /
``ObjectNotFound``) and never runs on the orphaned instance. Each object
also carries the LSN of its last acknowledged stored state.

Memory: the core keeps the resident objects in LRU order with their sizes
and, over the budget, returns :class:`Spill` instructions for the least
recently used ones.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from store.errors import ObjectMoved, ObjectNotFound


class State(enum.Enum):
    LOADING = "loading"
    LIVE = "live"
    SPILLED = "spilled"
    MOVING = "moving"
    MOVED = "moved"
    DELETED = "deleted"


RESIDENT = (State.LIVE, State.MOVING)  # states in which the live instance is in memory
PRESENT = (State.LIVE, State.SPILLED, State.LOADING, State.MOVING)  # held by this backend


class IllegalTransition(AssertionError):
    """An event that the object's current state does not allow (a bug in the caller)."""


@dataclass(slots=True)
class Life:
    """One object's lifecycle record."""

    object_id: str
    state: State
    epoch: int = 0
    lsn: int = 0  # LSN of the last acknowledged stored state (0: none)
    size: int = 0  # bytes of its state, as last measured
    big: bool = False  # over the big-object threshold: write-behind, no rollback copy
    moved_to: str = ""


# -- instructions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogState:
    """Log the object's current state (acknowledged once durable)."""

    object_id: str


@dataclass(frozen=True, slots=True)
class MarkDirty:
    """A big object changed: checkpoint it from a snapshot within the flush interval."""

    object_id: str


@dataclass(frozen=True, slots=True)
class WriteCheckpoint:
    """Write the object's current state straight to its checkpoint file, now."""

    object_id: str


@dataclass(frozen=True, slots=True)
class Restore:
    """Rebuild the live instance from the last acknowledged stored state (a rollback)."""

    object_id: str


@dataclass(frozen=True, slots=True)
class LogDelete:
    """Log that the object no longer lives here (durable before anything else is told)."""

    object_id: str


@dataclass(frozen=True, slots=True)
class SendState:
    """Ship the object's state to backend ``to`` (which stores it durably)."""

    object_id: str
    to: str


@dataclass(frozen=True, slots=True)
class PublishMove:
    """Point the directory entry of the object at backend ``to``."""

    object_id: str
    to: str


@dataclass(frozen=True, slots=True)
class Forget:
    """Remove the object (and its aliases) from the directory."""

    object_id: str


@dataclass(frozen=True, slots=True)
class Drop:
    """Drop the live instance from memory."""

    object_id: str


@dataclass(frozen=True, slots=True)
class Spill:
    """Memory is over budget: write the object out if disk lacks its state, then Drop it."""

    object_id: str


# What a transition asks the heap to do, in order.
Instruction = (
    LogState | MarkDirty | WriteCheckpoint | Restore | LogDelete | SendState | PublishMove | Forget | Drop | Spill
)


class Lifecycle:
    """The states of all objects of one backend (see the module docstring).

    Not thread-safe by itself: the heap calls it under one short mutex and
    performs the returned instructions outside it.
    """

    def __init__(self, memory_budget: int = 0):
        self.memory_budget = memory_budget
        self._lives: dict[str, Life] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # oid -> size, LRU first
        self.resident_bytes = 0
        self.largest = 0  # bytes of the largest object seen: headroom for one arriving
        self._present = 0  # objects held here (PRESENT states), kept as they change
        # Memory held outside the objects: shared-memory segments that readers still
        # lease after their object changed or left (store.backend._storage.segments).
        self.leased_bytes = 0

    def leased(self, nbytes: int) -> list[Instruction]:
        """Readers' leases now hold ``nbytes`` that no live object accounts for.

        They count against the memory budget like resident objects. Returns
        the spills that would make room now; a caller that may not perform
        them where it stands (it holds an object's lock) leaves them to the
        next transition, which asks again.
        """
        self.leased_bytes = max(0, int(nbytes))
        return self._spills()

    # -- queries ----------------------------------------------------------------------
    def get(self, object_id: str) -> Life | None:
        return self._lives.get(object_id)

    def present(self, object_id: str) -> bool:
        life = self._lives.get(object_id)
        return life is not None and life.state in PRESENT

    def count(self) -> int:
        return self._present

    def resident_count(self) -> int:
        return len(self._resident)

    def admit(self, object_id: str, backend: str = "") -> Life:
        """The object's record if a call may go ahead on it here; else the typed refusal."""
        life = self._lives.get(object_id)
        if life is None or life.state is State.DELETED:
            raise ObjectNotFound(f"object {object_id} is not on backend {backend[:8]}")
        if life.state is State.MOVED:
            raise ObjectMoved(
                f"object {object_id} moved from backend {backend[:8]} to {life.moved_to[:8]}", life.moved_to
            )
        return life

    def touch(self, object_id: str) -> None:
        if object_id in self._resident:
            self._resident.move_to_end(object_id)

    # -- transitions ------------------------------------------------------------------
    def stored_at_start(self, object_ids: Iterable[str]) -> None:
        """Objects found in the storage dir at start: on disk, not in memory."""
        for oid in object_ids:
            if oid not in self._lives:
                self._present += 1
            self._lives[oid] = Life(oid, State.SPILLED)

    def persisted(self, object_id: str, lsn: int, size: int, big: bool) -> list[Instruction]:
        """A new object (or one moved back here) was stored durably and is live."""
        life = self._lives.get(object_id)
        if life is not None and life.state in PRESENT:
            raise IllegalTransition(f"{object_id} persisted while {life.state.value}")
        if life is None:
            life = self._lives[object_id] = Life(object_id, State.LIVE)
        else:
            life.state, life.moved_to, life.epoch = State.LIVE, "", life.epoch + 1
        self._present += 1
        life.lsn, life.big = lsn, big
        self._make_resident(life, size)
        return self._spills()

    def load_started(self, object_id: str) -> None:
        life = self._expect(object_id, State.SPILLED, "load_started")
        life.state = State.LOADING

    def loaded(self, object_id: str, size: int, big: bool) -> list[Instruction]:
        life = self._expect(object_id, State.LOADING, "loaded")
        life.state, life.big = State.LIVE, big
        self._make_resident(life, size)
        return self._spills()

    def load_failed(self, object_id: str) -> None:
        life = self._expect(object_id, State.LOADING, "load_failed")
        life.state = State.SPILLED

    def call_finished(self, object_id: str, changed: bool, size: int, big: bool) -> list[Instruction]:
        """A call that may change its object returned. Instructions to store the change.

        Nothing when the object did not change, or when the call itself moved
        or deleted it (then there is nothing here left to store).
        """
        life = self._lives.get(object_id)
        if life is None or life.state is not State.LIVE or not changed:
            return []
        life.big = big
        self._resize(life, size)
        return [MarkDirty(object_id) if big else LogState(object_id)]

    def logged(self, object_id: str, lsn: int) -> list[Instruction]:
        """A state of the object is durable with ``lsn``."""
        life = self._lives.get(object_id)
        if life is not None and lsn > life.lsn:
            life.lsn = lsn
        return self._spills()

    def call_failed(self, object_id: str) -> list[Instruction]:
        """A call that may have changed its object raised: put it back as acknowledged.

        Small objects are rolled back from their last acknowledged bytes; a big
        one (no copy is kept) keeps its in-place changes, which are written to
        its checkpoint before the error returns, so memory and disk agree.
        """
        life = self._lives.get(object_id)
        if life is None or life.state is not State.LIVE:
            return []
        return [WriteCheckpoint(object_id)] if life.big else [Restore(object_id)]

    def spilled(self, object_id: str) -> None:
        life = self._expect(object_id, State.LIVE, "spilled")
        life.state = State.SPILLED
        self._make_absent(life)

    def move_requested(self, object_id: str, to: str) -> list[Instruction]:
        """Start moving: the state goes to ``to``, then the directory, then the local delete."""
        life = self._expect(object_id, State.LIVE, "move_requested")
        life.state = State.MOVING
        life.moved_to = to
        return [SendState(object_id, to), PublishMove(object_id, to), LogDelete(object_id)]

    def move_failed(self, object_id: str) -> None:
        life = self._expect(object_id, State.MOVING, "move_failed")
        life.state, life.moved_to = State.LIVE, ""

    def move_done(self, object_id: str, lsn: int) -> list[Instruction]:
        life = self._expect(object_id, State.MOVING, "move_done")
        life.state, life.epoch, life.lsn = State.MOVED, life.epoch + 1, lsn
        self._present -= 1
        self._make_absent(life)
        return [Drop(object_id)]

    def delete_requested(self, object_id: str) -> list[Instruction]:
        """Delete: durable in storage first, then out of the directory."""
        life = self._lives.get(object_id)
        if life is None or life.state not in (State.LIVE, State.SPILLED):
            raise IllegalTransition(f"{object_id} delete_requested while {life.state.value if life else 'absent'}")
        return [LogDelete(object_id), Forget(object_id)]

    def delete_done(self, object_id: str, lsn: int) -> list[Instruction]:
        life = self._lives[object_id]
        if life.state not in (State.LIVE, State.SPILLED):
            raise IllegalTransition(f"{object_id} delete_done while {life.state.value}")
        was_resident = life.state is State.LIVE
        life.state, life.epoch, life.lsn = State.DELETED, life.epoch + 1, lsn
        self._present -= 1
        self._make_absent(life)
        # A deleted id never comes back (ids are unique): keep no record of it.
        del self._lives[object_id]
        return [Drop(object_id)] if was_resident else []

    # -- memory -------------------------------------------------------------------------
    def _make_resident(self, life: Life, size: int) -> None:
        old = self._resident.pop(life.object_id, None)
        if old is not None:
            self.resident_bytes -= old
        self._resident[life.object_id] = size
        self.resident_bytes += size
        life.size = size
        self.largest = max(self.largest, size)

    def _make_absent(self, life: Life) -> None:
        old = self._resident.pop(life.object_id, None)
        if old is not None:
            self.resident_bytes -= old

    def _resize(self, life: Life, size: int) -> None:
        if life.object_id in self._resident:
            self.resident_bytes += size - self._resident[life.object_id]
            self._resident[life.object_id] = size
            self._resident.move_to_end(life.object_id)
        life.size = size
        self.largest = max(self.largest, size)

    def _spills(self) -> list[Instruction]:
        """Spill instructions that bring resident bytes back under budget, LRU first.

        Room for one more object as large as the largest seen is kept free,
        since the next value arriving (a persist, or a load from disk) lands
        in memory before anything can be spilled for it. Spilling down to 3/4
        of that (not just under it) makes the next few loads free instead of
        spilling one object per call. The most recently used object is never
        spilled: it is the one being served.
        """
        if not self.memory_budget:
            return []
        budget = max(self.memory_budget - self.largest, self.memory_budget // 4)
        used = self.resident_bytes + self.leased_bytes
        if used <= budget:
            return []
        target = int(budget * 0.75)
        out: list[Instruction] = []
        freed = 0
        for oid in list(self._resident)[:-1]:
            if used - freed <= target:
                break
            if self._lives[oid].state is State.LIVE:
                out.append(Spill(oid))
                freed += self._resident[oid]
        return out

    # -- invariants ---------------------------------------------------------------------
    def _expect(self, object_id: str, state: State, event: str) -> Life:
        life = self._lives.get(object_id)
        if life is None or life.state is not state:
            raise IllegalTransition(f"{object_id}: {event} while {life.state.value if life else 'absent'}")
        return life

    def validate(self) -> None:
        """Check every invariant; raises AssertionError naming the first broken one."""
        total = 0
        for oid, size in self._resident.items():
            life = self._lives.get(oid)
            assert life is not None, f"{oid} resident without a record"
            assert life.state in RESIDENT, f"{oid} resident while {life.state.value}"
            assert size == life.size, f"{oid} resident size {size} != {life.size}"
            total += size
        assert self.leased_bytes >= 0, f"leased bytes {self.leased_bytes} < 0"
        assert total == self.resident_bytes, f"resident bytes {self.resident_bytes} != sum of sizes {total}"
        present = sum(1 for life in self._lives.values() if life.state in PRESENT)
        assert present == self._present, f"present count {self._present} != {present}"
        for oid, life in self._lives.items():
            assert life.object_id == oid
            assert life.state is not State.DELETED, f"{oid} deleted but still recorded"
            if life.state in RESIDENT:
                assert oid in self._resident, f"{oid} {life.state.value} but not resident"
            else:
                assert oid not in self._resident, f"{oid} {life.state.value} but resident"
            assert bool(life.moved_to) == (life.state in (State.MOVED, State.MOVING)), (
                f"{oid} {life.state.value} with moved_to={life.moved_to!r}"
            )
            assert life.epoch >= 0 and life.lsn >= 0 and life.size >= 0
