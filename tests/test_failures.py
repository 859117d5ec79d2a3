"""Failures of whole processes: Redis killed or wiped, backends killed mid-call or dead.

Real processes, real signals (see ``chaos.py``); every test checks what the
user sees: which error type, how fast, and that no call ran twice.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

import store
from store import LocalCluster, StorageObject, readonly
from store._ops.cli import main as claypot
from store._directory.directory import Directory
from store.errors import AliasNotFound, BackendUnavailable, CallInterrupted

import chaos

pytestmark = pytest.mark.slow


class Ledger(StorageObject):
    """Records every call's token, so a call that ran twice shows up as a duplicate."""

    def __init__(self):
        self.tokens = []

    def record(self, token):
        self.tokens.append(token)
        return len(self.tokens)

    def slow(self, token, seconds):
        self.tokens.append(token)
        time.sleep(seconds)
        return token

    @readonly
    def all(self):
        return list(self.tokens)


class Note(StorageObject):
    """A small object with a value (for directory checks)."""

    def __init__(self, text):
        self.text = text

    @readonly
    def read(self):
        return self.text


@pytest.fixture
def cluster2(tmp_path, monkeypatch):
    """Two backends whose heartbeat expires after 2 s; the client stops reconnecting after 3 s."""
    monkeypatch.setenv("CLAYPOT_RECONNECT_TIMEOUT", "3")
    with LocalCluster(
        backends=2,
        data_dir=str(tmp_path / "c"),
        backend_env={"CLAYPOT_HEARTBEAT_TTL": "2", "CLAYPOT_HEARTBEAT_INTERVAL": "0.3"},
    ) as c:
        yield c


_proxies: dict[str, Note] = {}  # object id -> the proxy _notes() made it with


def _notes(n: int, backend: str | None = None, alias_every: int = 3):
    """``n`` persistent Notes, every ``alias_every``-th with an alias: {id: (alias, text)}."""
    out = {}
    for i in range(n):
        text = f"note {i} {uuid.uuid4().hex}"
        alias = f"note-{i}-{uuid.uuid4().hex[:6]}" if i % alias_every == 0 else None
        note = Note(text)
        note.make_persistent(alias=alias, backend=backend)
        out[note.getID()] = (alias, text)
        _proxies[note.getID()] = note
    return out


def _check_notes(expected) -> None:
    for oid, (alias, text) in expected.items():
        assert store.get_by_id(oid).read() == text
        if alias:
            obj = store.get_by_alias(alias)
            assert obj.getID() == oid and obj.read() == text


def _directory_snapshot(cluster) -> tuple[dict, dict]:
    d = Directory(cluster.redis_url)
    try:
        return (
            {k.decode(): v.decode() for k, v in d.r.hgetall(d.k_objects).items()},
            {k.decode(): v.decode() for k, v in d.r.hgetall(d.k_aliases).items()},
        )
    finally:
        d.close()


def test_redis_kill9_and_restart_loses_nothing(cluster2):
    """kill -9 of Redis right after writes: after its restart (AOF) every entry is back."""
    c = cluster2
    expected = _notes(40)
    before = _directory_snapshot(c)
    chaos.kill_redis(c)
    # While Redis is down: calls on known objects still work (Redis is off the call
    # path), and what needs the directory fails with a claypot error, not redis-py's.
    some = next(iter(expected))
    proxy = _proxies[some]
    assert proxy.read() == expected[some][1]
    with pytest.raises(BackendUnavailable, match="directory"):
        Note("while down").make_persistent()
    chaos.start_redis(c)
    assert _directory_snapshot(c) == before
    _check_notes(expected)
    # Backends reconnect to the restarted Redis on their own and keep heartbeating.
    chaos.wait_until(lambda: all(b.up for b in store.backends()), what="backends up again")
    more = _notes(5)
    _check_notes(more)


def test_redis_wipe_is_republished_by_backends(cluster2):
    """FLUSHALL: the backends notice (epoch gone) and publish their objects and aliases again."""
    c = cluster2
    expected = _notes(30)
    before = _directory_snapshot(c)
    chaos.wipe_redis(c)
    chaos.wait_until(lambda: _directory_snapshot(c) == before, timeout=10, what="directory republished")
    _check_notes(expected)


def test_repair_rebuilds_directory_from_storage_dirs(cluster2, capsys):
    """With the backends stopped, ``claypot repair`` alone rebuilds objects and aliases."""
    c = cluster2
    expected = _notes(30)
    before = _directory_snapshot(c)
    dirs = [p.data_dir for p in c.processes]
    # On live dirs first: repair only reads them (no log cut, no segment created).
    wal_before = [sorted(os.listdir(os.path.join(d, "wal"))) for d in dirs]
    assert claypot(["repair", "--redis", c.redis_url, *dirs]) == 0
    assert [sorted(os.listdir(os.path.join(d, "wal"))) for d in dirs] == wal_before
    assert _directory_snapshot(c) == before
    for bid in c.backends:
        chaos.stop_backend(c, bid)
    chaos.wipe_redis(c)
    assert _directory_snapshot(c) == ({}, {})
    capsys.readouterr()
    assert claypot(["repair", "--redis", c.redis_url, *dirs]) == 0
    assert "30 object(s)" in capsys.readouterr().out
    assert _directory_snapshot(c) == before
    for bid in c.backends:
        chaos.start_backend(c, bid)
    _check_notes(expected)


def test_kill9_during_long_call_raises_call_interrupted(cluster2):
    """The caller of a call in flight when its backend dies gets CallInterrupted, quickly."""
    c = cluster2
    ledger = Ledger()
    ledger.make_persistent()
    owner = ledger.get_location()
    chaos.kill_later(c, owner, delay=0.5)
    start = time.monotonic()
    with pytest.raises(CallInterrupted, match="may have run"):
        ledger.slow("t-long", 30)
    assert time.monotonic() - start < 5
    chaos.start_backend(c, owner)
    # The interrupted call is not re-run behind the caller's back (it never finished,
    # and a kill -9 keeps nothing a call had not yet acknowledged).
    assert ledger.all() == []
    assert ledger.record("t-after") == 1


def test_calls_resume_through_restarts_and_none_runs_twice(cluster2):
    """A client calling in a loop across a graceful restart and a kill -9 restart.

    Calls resume by themselves; every acknowledged call is recorded exactly once;
    a call cut off by the kill raised CallInterrupted and is recorded at most once,
    never re-run behind the caller's back.
    """
    c = cluster2
    ledger = Ledger()
    ledger.make_persistent()
    owner = ledger.get_location()
    acked, interrupted, errors = [], [], []
    stop = threading.Event()

    def caller():
        n = 0
        while not stop.is_set():
            token = f"t{n}"
            n += 1
            try:
                ledger.record(token)
                acked.append(token)
            except CallInterrupted:
                interrupted.append(token)
            except Exception as exc:  # anything else is a failure of the test
                errors.append(exc)
                return

    t = threading.Thread(target=caller)
    t.start()
    try:
        chaos.wait_until(lambda: len(acked) >= 50, what="calls flowing")
        chaos.restart_backend(c, owner, kill=False)
        mark = len(acked)
        chaos.wait_until(lambda: len(acked) >= mark + 50, what="calls resumed after stop")
        chaos.restart_backend(c, owner, kill=True)
        mark = len(acked)
        chaos.wait_until(lambda: len(acked) >= mark + 50, what="calls resumed after kill -9")
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    recorded = ledger.all()
    assert len(recorded) == len(set(recorded)), "a call ran twice"
    assert set(acked) <= set(recorded), "an acknowledged call was lost"
    assert set(recorded) <= set(acked) | set(interrupted)
    # Only the kill -9 interrupts calls: the one in flight, and a call or two sent on
    # the dead connection before the client saw it close (they cannot know they did
    # not run). A graceful stop finishes its calls and refuses new ones: retried.
    assert len(interrupted) <= 3, interrupted


def test_dead_backend_is_shown_down_and_fails_fast(cluster2):
    """A killed backend: shown down, BackendUnavailable within the deadline, back on restart."""
    c = cluster2
    victim, survivor = c.backends
    on_victim = _notes(5, backend=victim)
    on_survivor = _notes(5, backend=survivor)
    chaos.kill_backend(c, victim)
    chaos.wait_until(
        lambda: [b.up for b in store.backends() if b.backend_id == victim] == [False],
        timeout=6,
        what="heartbeat expiry",
    )
    oid = next(iter(on_victim))
    for _ in range(2):
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            store.get_by_id(oid).read()
        assert time.monotonic() - start < 3 + 1.5  # reconnect_timeout plus slack
    _check_notes(on_survivor)
    # New objects go to the live backend only.
    fresh = _notes(4)
    assert {store.get_by_id(o).get_location() for o in fresh} == {survivor}
    chaos.start_backend(c, victim)
    chaos.wait_until(lambda: all(b.up for b in store.backends()), what="victim back up")
    _check_notes(on_victim)


def test_status_command_shows_dead_backend(cluster2, capsys):
    """``claypot status`` marks a backend whose heartbeat expired as DOWN, and exits 3."""
    c = cluster2
    victim = c.backends[1]
    chaos.kill_backend(c, victim)
    chaos.wait_until(
        lambda: not [b for b in store.backends() if b.backend_id == victim][0].up, timeout=6, what="heartbeat expiry"
    )
    assert claypot(["status", "--address", c.address, "--token", c.token]) == 3
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith(victim[:8])][0]
    assert "DOWN" in line
    assert "1 up" in out


def test_a_deleted_alias_stays_deleted_after_a_rebuild(cluster2):
    """delete_alias reaches the owner's stored state: a wipe and republish keep it gone."""
    c = cluster2
    note = Note("kept")
    note.make_persistent(alias="short-lived", backend=c.backends[1])
    # Ask through the other backend: the request still goes to the owner.
    store.delete_alias("short-lived")
    chaos.wipe_redis(c)
    chaos.wait_until(lambda: note.getID() in _directory_snapshot(c)[0], timeout=10, what="directory republished")
    assert "short-lived" not in _directory_snapshot(c)[1]
    with pytest.raises(AliasNotFound):
        store.get_by_alias("short-lived")
    assert store.get_by_id(note.getID()).read() == "kept"
