"""Durability: what a backend acknowledged survives kill -9, torn files and restarts.

Every test runs a real cluster (redis-server plus backend processes) and
hurts it with the helpers of ``chaos.py``; nothing is mocked.
"""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest

import store
from store import LocalCluster, StorageObject, readonly
from store.errors import ObjectCorrupt, ObjectNotFound

import chaos

pytestmark = pytest.mark.slow


class Blob(StorageObject):
    """An object whose whole state is one bytes value or one numpy array."""

    def __init__(self, data):
        self.data = data
        self.version = 0

    def replace(self, data):
        self.data = data
        self.version += 1

    def fill(self, value):
        """In-place update of an array (the write-behind path for big objects)."""
        self.data[:] = value
        self.version += 1

    def same(self):
        """Not declared read-only, but changes nothing: must not be logged either."""
        return self.version

    @readonly
    def get(self):
        return self.data


def _payload(rng: random.Random):
    """Random content: mostly small bytes, some arrays big enough to go out of band."""
    if rng.random() < 0.15:
        return np.frombuffer(rng.randbytes(rng.choice([70_000, 300_000])), dtype=np.uint8).copy()
    return rng.randbytes(rng.randint(1, 4000))


@pytest.fixture
def one_backend(tmp_path):
    """One backend (sync policy, the default) that checkpoints often.

    A short checkpoint interval makes the tests cover both places a state
    can come back from: the log and the checkpoint files.
    """
    with LocalCluster(
        backends=1, data_dir=str(tmp_path / "c"), backend_env={"CLAYPOT_CHECKPOINT_INTERVAL": "0.5"}
    ) as c:
        yield c


def test_kill9_after_acknowledged_writes_loses_nothing(one_backend):
    """Rounds of creates, method calls and attribute writes, each ended by kill -9.

    After every restart each object acknowledged so far is back byte for byte
    (content hash) and every alias resolves to the same object.
    """
    c = one_backend
    bid = c.backends[0]
    rng = random.Random(3)
    expected: dict[str, str] = {}  # object id -> hash of acknowledged content
    proxies: dict[str, Blob] = {}
    aliases: dict[str, str] = {}  # alias -> object id
    for rnd in range(3):
        batch = [Blob(_payload(rng)) for _ in range(80)]
        store.make_persistent_many(batch)
        for i in range(20):
            b = Blob(_payload(rng))
            b.make_persistent(alias=f"r{rnd}-{i}")
            aliases[f"r{rnd}-{i}"] = b.getID()
            batch.append(b)
        for b in batch:
            proxies[b.getID()] = b
        # Change a sample of everything stored so far, both ways a client can.
        for oid in rng.sample(sorted(proxies), 60):
            new = _payload(rng)
            if rng.random() < 0.5:
                proxies[oid].replace(new)
            else:
                proxies[oid].data = new
        expected = {oid: chaos.content_hash(p.get()) for oid, p in proxies.items()}
        # The last write above was acknowledged: kill -9 now, with nothing flushed on purpose.
        chaos.restart_backend(c, bid, kill=True)
        for oid, p in proxies.items():
            assert chaos.content_hash(p.get()) == expected[oid], f"round {rnd}: {oid} differs"
        for alias, oid in aliases.items():
            again = store.get_by_alias(alias)
            assert again.getID() == oid
            assert chaos.content_hash(again.get()) == expected[oid]
    assert len(proxies) == 300
    assert [b for b in store.backends() if b.backend_id == bid][0].objects == 300


def test_async_policy_survives_process_kill(tmp_path):
    """Under ``async`` the log is written at once (fsync'd later): a process kill loses nothing.

    (Only a machine crash can lose the last ``flush_interval`` of changes.)
    """
    with LocalCluster(
        backends=1, data_dir=str(tmp_path / "c"), durability="async", backend_env={"CLAYPOT_FLUSH_INTERVAL": "0.2"}
    ) as c:
        objs = [Blob(bytes([i]) * 100) for i in range(50)]
        store.make_persistent_many(objs)
        for i, o in enumerate(objs):
            o.replace(bytes([i]) * 200)
        chaos.restart_backend(c, c.backends[0], kill=True)
        assert [o.get() for o in objs] == [bytes([i]) * 200 for i in range(50)]


def test_corrupt_checkpoint_quarantines_one_object(one_backend):
    """A truncated file and a flipped byte: the backend starts, those two raise, the rest work."""
    c = one_backend
    bid = c.backends[0]
    objs = [Blob(bytes([i]) * 5000) for i in range(20)]
    store.make_persistent_many(objs)
    # Let the checkpointer write every object file and trim the log, so the files
    # (and not the log) are what the restarted backend reads.
    chaos.wait_until(
        lambda: all(os.path.exists(chaos.object_file(c, bid, o.getID())) for o in objs), what="checkpoints written"
    )
    chaos.wait_until(lambda: chaos.wal_bytes(c, bid) == 0, what="log trimmed")
    chaos.stop_backend(c, bid)
    torn, rotten = objs[3].getID(), objs[7].getID()
    chaos.truncate_file(chaos.object_file(c, bid, torn), keep=0.6)
    chaos.flip_byte(chaos.object_file(c, bid, rotten), offset_from_end=10)
    # A torn record at the log's tail (a write that never completed) is cut off too.
    wal = os.path.join(chaos.backend(c, bid).data_dir, "wal")
    with open(os.path.join(wal, sorted(os.listdir(wal))[-1]), "ab") as f:
        f.write(b"CPv1\x10\x00\x00")
    # And the temp file of a checkpoint a crash interrupted is swept at start.
    stale = chaos.object_file(c, bid, objs[0].getID()) + ".tmp-deadbeef"
    with open(stale, "wb") as f:
        f.write(b"half a checkpoint")
    chaos.start_backend(c, bid)
    assert not os.path.exists(stale)
    for oid in (torn, rotten):
        with pytest.raises(ObjectCorrupt, match="corrupt"):
            store.get_by_id(oid).get()
        # The error stays: the file went to quarantine, it is not re-read as good.
        with pytest.raises(ObjectCorrupt):
            store.get_by_id(oid).get()
    quarantine = os.listdir(os.path.join(chaos.backend(c, bid).data_dir, "quarantine"))
    assert sorted(quarantine) == sorted([torn + ".obj", rotten + ".obj"])
    for i, o in enumerate(objs):
        if o.getID() not in (torn, rotten):
            assert o.get() == bytes([i]) * 5000
    fresh = Blob(b"after")
    fresh.make_persistent()
    assert fresh.get() == b"after"
    # Still an ObjectCorrupt after another restart (not a vanished object), until deleted.
    chaos.restart_backend(c, bid, kill=True)
    with pytest.raises(ObjectCorrupt):
        store.get_by_id(rotten).get()
    store.get_by_id(rotten).delete_persistent()
    with pytest.raises(ObjectNotFound):
        store.get_by_id(rotten).get()
    assert os.listdir(os.path.join(chaos.backend(c, bid).data_dir, "quarantine")) == [torn + ".obj"]


def test_reads_and_unchanged_calls_write_nothing(one_backend):
    """@readonly methods, attribute reads and calls that change nothing leave the log alone."""
    c = one_backend
    bid = c.backends[0]
    o = Blob(b"x" * 1000)
    o.make_persistent()
    before = chaos.wal_bytes(c, bid)
    for _ in range(20):
        o.get()
        o.same()
        assert o.version == 0
    if chaos.wal_bytes(c, bid) != before:
        # The checkpointer may have trimmed the log meanwhile; a trim only shrinks it.
        assert chaos.wal_bytes(c, bid) < before
    low = chaos.wal_bytes(c, bid)
    o.replace(b"y" * 1000)
    assert chaos.wal_bytes(c, bid) > low or chaos.wal_bytes(c, bid) == 0


def test_big_object_write_behind_survives_kill_and_stop(tmp_path):
    """Objects over ``big_object`` are checkpointed in the background, within the flush interval.

    An in-place update is on disk after the interval (kill -9 then loses
    nothing), and a graceful stop writes dirty big objects before exiting.
    """
    env = {"CLAYPOT_BIG_OBJECT": str(1 << 20), "CLAYPOT_FLUSH_INTERVAL": "0.2"}
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), backend_env=env) as c:
        bid = c.backends[0]
        big = Blob(np.zeros(3 << 20, dtype=np.uint8))
        big.make_persistent()
        big.fill(7)
        time.sleep(1.0)  # well past the 0.2 s write-behind interval
        chaos.restart_backend(c, bid, kill=True)
        arr = big.get()
        assert arr.shape == (3 << 20,) and int(arr.min()) == 7 and int(arr.max()) == 7
        assert big.version == 1
        big.fill(9)
        took = chaos.stop_backend(c, bid)
        chaos.start_backend(c, bid)
        arr = big.get()
        assert int(arr.min()) == 9 and int(arr.max()) == 9 and big.version == 2
        assert took < 2.0


def test_graceful_stop_is_fast_and_complete(one_backend):
    """A stop right after many writes takes well under a second and loses nothing."""
    c = one_backend
    bid = c.backends[0]
    objs = [Blob(i.to_bytes(4, "little") * 8) for i in range(5000)]
    for i in range(0, len(objs), 1000):
        store.make_persistent_many(objs[i : i + 1000])
    took = chaos.stop_backend(c, bid)
    assert took < 1.0, f"graceful stop took {took:.2f}s"
    chaos.start_backend(c, bid)
    for i in range(0, 5000, 97):
        assert objs[i].get() == i.to_bytes(4, "little") * 8
    assert [b for b in store.backends() if b.backend_id == bid][0].objects == 5000


def test_durability_policy_is_per_backend(tmp_path):
    """One cluster, a ``sync`` backend and a ``none`` backend (scratch): each keeps its promise.

    After kill -9 the sync backend has every object back; the scratch backend
    has lost its objects, which then raise ObjectNotFound (a clear error, not
    a hang or a wrong value).
    """
    from store._ops.cluster import BackendProcess
    from store._directory.directory import Directory

    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        scratch = BackendProcess(
            str(tmp_path / "c" / "scratch"), c.redis_url, c.token, extra_args=["--durability", "none"]
        ).start()
        c.processes.append(scratch)  # stopped with the cluster
        durable_id = c.backends[0]
        d = Directory(c.redis_url, token=c.token)
        try:
            policies = {b["backend_id"]: b["durability"] for b in d.backends()}
        finally:
            d.close()
        assert policies == {durable_id: "sync", scratch.backend_id: "none"}
        kept = [Blob(bytes([i]) * 64) for i in range(10)]
        lost = [Blob(bytes([i]) * 64) for i in range(10)]
        store.make_persistent_many(kept, backend=durable_id)
        store.make_persistent_many(lost, backend=scratch.backend_id)
        kept[0].replace(b"changed")
        lost[0].replace(b"changed")
        for bid in (durable_id, scratch.backend_id):
            chaos.restart_backend(c, bid, kill=True)
        assert kept[0].get() == b"changed"
        assert [k.get() for k in kept[1:]] == [bytes([i]) * 64 for i in range(1, 10)]
        with pytest.raises(ObjectNotFound):
            lost[0].get()


def test_storage_recovery_orders_log_and_checkpoints(tmp_path):
    """The storage layer alone, on a real directory: what recovery must get right.

    - A checkpoint written directly (a spill, a write-behind object) is newer
      than the object's earlier log records: after reopening, it wins.
    - A checkpoint abandoned by a stop keeps its log, so nothing is lost.
    - ``scan_storage_dir`` (repair) sees every object and changes no file.
    """
    from store.backend._storage.storage import Record, Storage, scan_storage_dir

    root = str(tmp_path / "s")
    st = Storage(root, "sync", checkpoint_interval=3600)
    st.write(Record("a" * 32, "k:C", "alias-a", b"old-state"))
    st.write_checkpoint(Record("a" * 32, "k:C", "alias-a", b"new-state-from-a-spill"))
    for i in range(300):
        st.write(Record(f"{i:032x}", "k:C", "", b"v%d" % i))
    stop = threading.Event()
    stop.set()  # a stop arriving as the checkpoint starts
    assert st.checkpoint(stop) == 0
    assert st.pending_count() == 300  # given back, not dropped
    st.close()

    wal = sorted(os.listdir(os.path.join(root, "wal")))
    found = {oid: (key, alias) for oid, key, alias in scan_storage_dir(root)}
    assert sorted(os.listdir(os.path.join(root, "wal"))) == wal
    assert len(found) == 301 and found["a" * 32] == ("k:C", "alias-a")

    st = Storage(root, "sync", checkpoint_interval=3600)
    assert bytes(st.read("a" * 32).payload) == b"new-state-from-a-spill"
    assert all(bytes(st.read(f"{i:032x}").payload) == b"v%d" % i for i in range(300))
    assert st.checkpoint() == 300  # now for real: files written, log trimmed
    st.close()
    st = Storage(root, "sync")
    assert st.recovered == 0 and len(st.object_ids()) == 301
    assert bytes(st.read(f"{7:032x}").payload) == b"v7"
    st.close()


def test_damage_inside_the_log_skips_one_record_not_the_rest(tmp_path):
    """A corrupt record in the middle of the log loses that record only.

    Only a bad record at the very end is a torn write (cut off); one followed
    by valid records is damage, and the acknowledged records after it stay.
    """
    from store.backend._storage.storage import Record, Storage, decode

    root = str(tmp_path / "s")
    st = Storage(root, "sync", checkpoint_interval=3600)
    for i in range(3):
        st.write(Record(f"{i:032x}", "k:C", "", b"state-%d" % i * 50))
    st.close()
    wal = os.path.join(root, "wal")
    segment = os.path.join(wal, sorted(os.listdir(wal))[-1])
    with open(segment, "rb") as f:
        _, first = decode(memoryview(f.read()))  # where the second record starts
    with open(segment, "r+b") as f:  # one byte of the second record's body
        f.seek(first + 200)
        byte = f.read(1)
        f.seek(first + 200)
        f.write(bytes([byte[0] ^ 0xFF]))
    st = Storage(root, "sync")
    assert bytes(st.read(f"{0:032x}").payload) == b"state-0" * 50
    assert bytes(st.read(f"{2:032x}").payload) == b"state-2" * 50
    with pytest.raises(ObjectNotFound):
        st.read(f"{1:032x}")
    st.close()


def test_a_late_background_checkpoint_never_overwrites_a_newer_direct_write(tmp_path):
    """Ordering of checkpoint files: a spill (direct write) that lands while the
    checkpointer has an older state of the same object staged wins."""
    from store.backend._storage.storage import Record, Storage

    s = Storage(str(tmp_path / "b"), policy="sync")
    s.write(Record("a" * 32, "k", "", b"old", []))

    def checkpoint_live(object_id):
        # Runs inside the checkpointer's batch, after "a"'s old state was staged:
        # the state of "a" is spilled meanwhile, newer than the staged one.
        s.write_checkpoint(Record("a" * 32, "k", "", b"new", []))
        return True

    s.checkpoint_live = checkpoint_live
    s.mark_dirty("b" * 32)
    s.checkpoint()
    assert bytes(s.read("a" * 32).payload) == b"new"
    s.close()
    again = Storage(str(tmp_path / "b"), policy="sync")
    assert bytes(again.read("a" * 32).payload) == b"new"
    again.close()
