"""The pure lifecycle core: transitions, instructions, fencing and memory, with no processes.

Every test's Lifecycle is validated after the test (the ``life`` fixture).
"""

from __future__ import annotations

import random

import pytest

from store.backend._core import lifecycle as lc
from store.backend._core.lifecycle import IllegalTransition, Lifecycle, State
from store.errors import ObjectMoved, ObjectNotFound


@pytest.fixture
def life():
    core = Lifecycle()
    yield core
    core.validate()


def test_persist_then_change_logs_and_a_failed_call_restores(life):
    assert life.persisted("a", lsn=1, size=10, big=False) == []
    assert life.get("a").state is State.LIVE
    assert life.call_finished("a", changed=True, size=12, big=False) == [lc.LogState("a")]
    assert life.call_finished("a", changed=False, size=12, big=False) == []
    life.logged("a", 5)
    assert life.get("a").lsn == 5 and life.resident_bytes == 12
    assert life.call_failed("a") == [lc.Restore("a")]


def test_a_big_object_is_marked_dirty_and_checkpointed_when_its_call_fails(life):
    life.persisted("b", 1, 100, big=True)
    assert life.call_finished("b", True, 100, True) == [lc.MarkDirty("b")]
    assert life.call_failed("b") == [lc.WriteCheckpoint("b")]


def test_move_sends_then_publishes_then_logs_the_delete_and_fences_later_calls(life):
    life.persisted("m", 1, 10, False)
    epoch = life.get("m").epoch
    todo = life.move_requested("m", "B")
    assert todo == [lc.SendState("m", "B"), lc.PublishMove("m", "B"), lc.LogDelete("m")]
    assert life.get("m").state is State.MOVING
    life.validate()
    assert life.move_done("m", lsn=9) == [lc.Drop("m")]
    assert life.get("m").state is State.MOVED and life.get("m").epoch == epoch + 1
    with pytest.raises(ObjectMoved) as info:
        life.admit("m")
    assert info.value.moved_to == "B"
    # A call that finished on the orphan stores nothing.
    assert life.call_finished("m", True, 10, False) == []
    assert life.call_failed("m") == []
    # It may come back: live again, one epoch later.
    life.persisted("m", 12, 10, False)
    assert life.get("m").state is State.LIVE and life.get("m").epoch == epoch + 2
    life.admit("m")


def test_a_failed_move_leaves_the_object_live_here(life):
    life.persisted("m", 1, 10, False)
    life.move_requested("m", "B")
    life.move_failed("m")
    assert life.get("m").state is State.LIVE and life.get("m").moved_to == ""
    life.admit("m")


def test_delete_logs_first_then_forgets_and_calls_are_refused(life):
    life.persisted("d", 1, 10, False)
    assert life.delete_requested("d") == [lc.LogDelete("d"), lc.Forget("d")]
    assert life.delete_done("d", 4) == [lc.Drop("d")]
    with pytest.raises(ObjectNotFound):
        life.admit("d")
    assert not life.present("d") and life.resident_bytes == 0
    assert life.call_finished("d", True, 10, False) == []


def test_spilled_objects_load_and_a_failed_load_goes_back(life):
    life.stored_at_start(["s"])
    assert life.get("s").state is State.SPILLED
    life.load_started("s")
    life.load_failed("s")
    life.load_started("s")
    life.loaded("s", 20, False)
    assert life.get("s").state is State.LIVE and life.resident_bytes == 20
    life.spilled("s")
    assert life.get("s").state is State.SPILLED and life.resident_bytes == 0
    assert life.delete_requested("s") == [lc.LogDelete("s"), lc.Forget("s")]
    assert life.delete_done("s", 3) == []  # not resident: nothing to drop


@pytest.mark.parametrize(
    "event",
    [
        lambda life: life.move_requested("x", "B"),  # not live
        lambda life: life.loaded("x", 1, False),  # not loading
        lambda life: life.move_done("x", 1),  # not moving
        lambda life: life.persisted("x", 1, 1, False),  # already here
    ],
)
def test_illegal_transitions_are_refused(life, event):
    life.stored_at_start(["x"])
    with pytest.raises(IllegalTransition):
        event(life)


def test_memory_over_budget_spills_least_recently_used_first():
    life = Lifecycle(memory_budget=1000)
    for i in range(5):
        life.persisted(f"o{i}", i, 100, False)
    life.touch("o0")
    todo = life.persisted("big", 9, 600, False)
    spills = [ins.object_id for ins in todo]
    assert spills and all(isinstance(ins, lc.Spill) for ins in todo)
    assert spills[0] == "o1" and "o0" not in spills[:1] and "big" not in spills
    for oid in spills:
        life.spilled(oid)
    life.validate()
    assert life.resident_bytes <= 1000


def test_random_event_sequences_keep_every_invariant():
    """Random legal events from every state: validate() holds after each one."""
    rng = random.Random(7)
    life = Lifecycle(memory_budget=5000)
    ids = [f"o{i}" for i in range(12)]
    lsn = 0
    for _ in range(3000):
        oid = rng.choice(ids)
        rec = life.get(oid)
        state = rec.state if rec else None
        lsn += 1
        if state is None or state is State.MOVED:
            todo = life.persisted(oid, lsn, rng.randrange(1, 800), rng.random() < 0.2)
        elif state is State.LIVE:
            choice = rng.randrange(5)
            if choice == 0:
                todo = life.call_finished(oid, True, rng.randrange(1, 800), rec.big)
            elif choice == 1:
                life.move_requested(oid, "B")
                todo = life.move_done(oid, lsn) if rng.random() < 0.7 else (life.move_failed(oid) or [])
            elif choice == 2:
                life.delete_requested(oid)
                todo = life.delete_done(oid, lsn)
            elif choice == 3:
                life.spilled(oid)
                todo = []
            else:
                todo = life.logged(oid, lsn)
        elif state is State.SPILLED:
            life.load_started(oid)
            todo = (
                life.loaded(oid, rng.randrange(1, 800), False) if rng.random() < 0.8 else (life.load_failed(oid) or [])
            )
        else:
            todo = []
        for ins in todo:
            if isinstance(ins, lc.Spill) and life.get(ins.object_id).state is State.LIVE:
                life.spilled(ins.object_id)
        life.validate()
