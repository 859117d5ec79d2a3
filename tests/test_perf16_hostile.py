"""Hostile tests of two speed changes: the log written into reserved space, and plain
numpy arrays pickled with the C pickler.

The log (store/backend/_storage/logspace.py): records at the reserved end, longer
than a reservation step, ending in long zero runs; crashes and restarts in a row;
a full file system; a scan of a live dir while the log rotates; kill -9 of a
backend at many points under ``sync`` and ``async``.

The pickler (store/_wire/serialization.py): arrays of many dtypes and layouts give
the same bytes as cloudpickle's pickler, or take it when they would not; aliases
stay one object; arrays survive a restart in an object's state, travel through
shared memory and streams, as task arguments, and from a forked child.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import subprocess
import threading
import time

import numpy as np
import pytest
from hostilelib import full_pickle

import store
from store import LocalCluster, StorageObject
from store._wire import serialization
from store._wire.serialization import dumps, loads
from store.backend._storage import logspace
from store.backend._storage.storage import Record, Storage, encode, log_bytes, scan_storage_dir
from store.errors import ClaypotError

import chaos

pytestmark = pytest.mark.slow

MiB = 1 << 20


def _oid(i: int) -> str:
    return f"{i:032x}"


def _segments(root: str) -> list[str]:
    wal = os.path.join(root, "wal")
    return [os.path.join(wal, n) for n in sorted(os.listdir(wal)) if n.endswith(".log")]


def _crash(st: Storage) -> None:
    """Leave a Storage as kill -9 would: no close, its fd dropped, its threads told to stop."""
    st._stop.set()
    st._wake.set()
    st._reserve_wake.set()
    with st._lock:
        fd, st._fd = st._fd, -1
    if fd >= 0:
        os.close(fd)
    if st._checkpointer is not None:
        st._checkpointer.join(10)
    if st._reserver is not None:
        st._reserver.join(10)


def _payload_for(st: Storage, oid: str, length: int, tail_zeros: int) -> bytes:
    """A payload whose record (as ``st`` logs it) is exactly ``length`` bytes and ends
    in ``tail_zeros`` zeros."""
    lsn = st.next_lsn()  # the next ones pickle to the same length
    size = length - len(encode(Record(oid, "k:C", "", b"", lsn=lsn)))
    for _ in range(4):  # the header holds the payload's length, whose pickle may grow
        payload = os.urandom(max(0, size - tail_zeros)).replace(b"\0", b"\1") + bytes(tail_zeros)
        got = len(encode(Record(oid, "k:C", "", payload, lsn=lsn)))
        if got == length:
            return payload
        size += length - got
    raise AssertionError("no payload gives a record of that length")


def _read_all(st: Storage, expected: dict[str, bytes]) -> None:
    for oid, payload in expected.items():
        assert bytes(st.read(oid).payload) == payload, oid


# -- the log, on a real directory -------------------------------------------------------


def test_records_at_the_reserved_end_longer_than_a_step_and_ending_in_zeros_survive_crashes(tmp_path, caplog):
    root = str(tmp_path)
    st = Storage(root, "sync", checkpoint_interval=3600)
    assert st._reserved == logspace.RESERVE_STEP
    # No further reservation for this segment (as after a failed one): the first record
    # fills the reserved space exactly, so the file ends where its last record ends.
    st._reserve_off_seq = st._segment_seq
    first = _payload_for(st, _oid(1), logspace.RESERVE_STEP, tail_zeros=MiB)
    st.write(Record(_oid(1), "k:C", "", first))
    segment = _segments(root)[-1]
    assert os.path.getsize(segment) == logspace.RESERVE_STEP
    _crash(st)
    expected = {_oid(1): first}
    with caplog.at_level(logging.WARNING, logger="claypot.storage"):
        st = Storage(root, "sync", checkpoint_interval=3600)
        _read_all(st, expected)
        assert os.path.getsize(segment) == logspace.RESERVE_STEP  # nothing cut from it
        # Longer than a step, ending in 2 MiB of zeros: the record crosses the reserved
        # end; then records of zeros only, the last one at the file's end.
        expected[_oid(2)] = bytes(1) + os.urandom(5 * MiB) + bytes(2 * MiB)
        expected[_oid(3)] = bytes(3 * MiB)
        expected[_oid(4)] = b""
        for oid in (_oid(2), _oid(3), _oid(4)):
            st.write(Record(oid, "k:C", "", expected[oid]))
        _crash(st)
        st = Storage(root, "sync", checkpoint_interval=3600)
        _read_all(st, expected)
        st.start()
        expected[_oid(5)] = bytes(100)
        st.write(Record(_oid(5), "k:C", "", expected[_oid(5)]))
        _crash(st)
        st = Storage(root, "sync", checkpoint_interval=3600)
        _read_all(st, expected)
        st.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    st = Storage(root, "sync", checkpoint_interval=3600)
    _read_all(st, expected)
    assert st.checkpoint() == len(expected)
    st.close()
    assert log_bytes(root) == 0


def test_restarts_in_a_row_leave_no_empty_segments_and_no_zero_tails(tmp_path):
    """Regression: every start added a log segment that no checkpoint ever trimmed (a
    checkpoint with nothing logged returns early), one more empty file per start."""
    root = str(tmp_path)
    expected: dict[str, bytes] = {}
    for i in range(4):
        st = Storage(root, "sync", checkpoint_interval=3600)
        st.start()
        _read_all(st, expected)
        st.close()  # a graceful stop, nothing written
    assert len(_segments(root)) == 1 and os.path.getsize(_segments(root)[0]) == 0
    for i in range(4):
        st = Storage(root, "sync", checkpoint_interval=3600)
        st.start()
        _read_all(st, expected)
        if i % 2:
            expected[_oid(i)] = os.urandom(1000)
            st.write(Record(_oid(i), "k:C", "", expected[_oid(i)]))
        chaos.wait_until(lambda: st.unused_reservation() > 0, what="the reservation")
        _crash(st)
        segments = _segments(root)
        # Only the segment open at the crash ends in reserved zeros; those before it
        # were cut to their records by the start after their crash.
        for path in segments[:-1]:
            with open(path, "rb") as f:
                assert not f.read().endswith(bytes(64)), path
    st = Storage(root, "sync", checkpoint_interval=3600)
    _read_all(st, expected)
    # Records of two runs (the second crash's segment holds none, nor do the others).
    assert len(_segments(root)) == 3
    # Disk use is the records plus the open segment's reservation, nothing else.
    assert sum(os.path.getsize(p) for p in _segments(root)) == log_bytes(root) + st.unused_reservation()
    st.checkpoint()
    st.close()
    assert len(_segments(root)) == 1 and log_bytes(root) == 0


def test_a_scan_of_a_live_dir_sees_every_acknowledged_object_while_the_log_rotates(tmp_path):
    """``claypot repair`` reads a live backend's dir: checkpoints trim segments under it."""
    root = str(tmp_path)
    st = Storage(root, "sync", checkpoint_interval=0.05, flush_interval=0.05)
    st.start()
    acked: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        i = 0
        while not stop.is_set():
            st.write(Record(_oid(i), "k:C", "", os.urandom(3000)))
            acked.append(_oid(i))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        deadline = time.monotonic() + 4
        scans = 0
        while time.monotonic() < deadline:
            before = set(acked)
            try:
                found = {oid for oid, _, _ in scan_storage_dir(root)}
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                break
            missing = before - found
            assert not missing, f"scan {scans}: {len(missing)} acknowledged object(s) missed"
            scans += 1
    finally:
        stop.set()
        t.join()
        st.close()
    assert not errors, errors
    assert scans > 5


# -- a full file system -------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: str):
    """An 8 MiB tmpfs mounted at ``path`` (root only): writes there run out of space."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: the full-disk tests need to mount a tmpfs")
        pytest.skip("mounting a small tmpfs needs root")
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


@pytest.fixture
def small_fs(tmp_path):
    with _tmpfs(str(tmp_path / "fs")) as path:
        yield path


def test_a_full_disk_fails_writes_clearly_and_acknowledges_nothing_it_lost(small_fs):
    root = os.path.join(small_fs, "d")
    filler = os.path.join(small_fs, "filler")
    with open(filler, "wb") as f:
        f.write(b"f" * MiB)  # freed before the restart: room for its own files
    st = Storage(root, "sync", checkpoint_interval=3600)
    st.start()
    acked: dict[str, bytes] = {}
    failed: list[str] = []
    for i in range(200):
        payload = os.urandom(150_000)
        try:
            st.write(Record(_oid(i), "k:C", "", payload))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            failed.append(_oid(i))
            if len(failed) == 3:
                break
            continue
        acked[_oid(i)] = payload
    assert failed and len(acked) > 10
    # Not a backend that stopped for good: space again, writes again.
    os.unlink(filler)
    late = os.urandom(1000)
    st.write(Record(_oid(1000), "k:C", "", late))
    acked[_oid(1000)] = late
    _crash(st)
    st = Storage(root, "sync", checkpoint_interval=3600)
    _read_all(st, acked)
    for oid in failed:
        with pytest.raises(ClaypotError):
            st.read(oid)
    st.close()


class Blob(StorageObject):
    def __init__(self):
        self.data = b""
        self.n = 0

    def put(self, size):
        self.data = os.urandom(size)
        self.n += 1
        return self.n


def test_a_full_disk_under_a_backend_fails_calls_and_persists_and_keeps_what_was_acknowledged(tmp_path):
    data_dir = str(tmp_path / "c")
    env = {"CLAYPOT_CHECKPOINT_INTERVAL": "3600"}
    with _tmpfs(os.path.join(data_dir, "backend-0")):  # the backend's storage dir only
        with LocalCluster(backends=1, data_dir=data_dir, backend_env=env) as c:
            bid = c.backends[0]
            blob = Blob()
            blob.make_persistent()
            acked = 0
            with pytest.raises(OSError) as failed:
                for _ in range(200):
                    acked = blob.put(300_000)
            assert failed.value.errno == errno.ENOSPC or "No space left" in str(failed.value)
            assert acked > 5
            with pytest.raises(OSError):
                Tally(7).make_persistent(alias="late")
            with pytest.raises(ClaypotError):
                store.get_by_alias("late")
            assert blob.n == acked  # the failed change is not kept in memory either
            chaos.kill_backend(c, bid)
            chaos.start_backend(c, bid)
            assert blob.n == acked
            with pytest.raises(ClaypotError):
                store.get_by_alias("late")


# -- kill -9 of a backend, at many points -----------------------------------------------


class Big(StorageObject):
    """A big logged state (over a reservation step, under big_object) and a counter."""

    def __init__(self):
        self.seed = 0
        self.data = np.zeros(1)

    def put(self, seed, n):
        self.data = np.random.default_rng(seed).random(n)
        self.data[-n // 4 :] = 0.0  # a record that ends in a long run of zeros
        self.seed = seed
        return seed

    def check(self):
        """(seed, whether data is what put(seed) made)."""
        if self.seed == 0:
            return 0, True
        want = np.random.default_rng(self.seed).random(self.data.size)
        want[-self.data.size // 4 :] = 0.0
        return self.seed, bool(np.array_equal(want, self.data))


class Tally(StorageObject):
    def __init__(self, n=0):
        self.n = n

    def bump(self):
        self.n += 1
        return self.n


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_kill9_at_many_points_keeps_every_acknowledged_change(tmp_path, durability):
    # Checkpoints (and so rotations) several times a second, records from 100 bytes to
    # over a reservation step: the kills land in rotations, checkpoints, reservations
    # and writes across the reserved end.
    env = {"CLAYPOT_CHECKPOINT_INTERVAL": "0.3", "CLAYPOT_FLUSH_INTERVAL": "0.1"}
    rng = random.Random(16)
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), durability=durability, backend_env=env) as c:
        bid = c.backends[0]
        big, tally = Big(), Tally()
        store.make_persistent_many([big, tally])
        acked_seed = [0]
        acked_n = [0]
        created: list[tuple[str, int]] = []
        for round_ in range(4):
            stop = threading.Event()

            def putter():
                seed = acked_seed[0]
                while not stop.is_set():
                    seed += 1
                    # 5.5 MiB or 40 KiB: across the reserved end, or many inside it.
                    n = 720_000 if seed % 3 == 0 else 5_000
                    try:
                        acked_seed[0] = big.put(seed, n)
                    except ClaypotError:
                        return

            def bumper():
                while not stop.is_set():
                    try:
                        acked_n[0] = tally.bump()
                    except ClaypotError:
                        return

            def persister():
                k = 0
                while not stop.is_set():
                    k += 1
                    t = Tally(round_ * 100_000 + k)
                    try:
                        t.make_persistent()
                    except ClaypotError:
                        return
                    created.append((t.getID(), round_ * 100_000 + k))

            threads = [threading.Thread(target=f) for f in (putter, bumper, persister)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.5, 1.5))
            chaos.kill_backend(c, bid)
            stop.set()
            chaos.start_backend(c, bid)
            for t in threads:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in threads)
            seed, intact = big.check()
            assert intact, f"round {round_}: the state of put({seed}) is torn"
            # The call in flight at the kill may have been logged, not acknowledged;
            # a caller retried after the restart may have gone on.
            assert seed >= acked_seed[0], (round_, seed, acked_seed[0])
            acked_seed[0] = seed
            assert tally.n >= acked_n[0], (round_, tally.n, acked_n[0])
            acked_n[0] = tally.n
            for oid, n in created:
                assert store.get_by_id(oid).n == n
        assert acked_seed[0] >= 6, "too few big records to cross the reserved end"
        # Disk use after the restarts: only the open segment holds a reservation (the
        # restarts cut the others' tails), at most one step of it.
        data_dir = chaos.backend(c, bid).data_dir
        reserved = sum(os.path.getsize(p) for p in _segments(data_dir)) - log_bytes(data_dir)
        assert 0 <= reserved <= logspace.RESERVE_STEP, reserved


# -- plain numpy arrays and the C pickler -------------------------------------------------


class Tag:
    """A class of this test module, which a dtype's metadata may carry."""


class MyVoid(np.void):
    """A numpy.void subclass from a user's module."""


def _arrays() -> dict:
    base = np.arange(100_000, dtype=np.float64)
    frozen = np.arange(20_000, dtype=np.int64)
    frozen.flags.writeable = False
    return {
        "0d": np.array(3.5),
        "empty": np.zeros((0, 3)),
        "bool": np.ones(5, bool),
        "complex": np.ones(70_000, complex),
        "big_endian": np.arange(20_000, dtype=">i8"),
        "structured": np.zeros(10_000, dtype=[("a", "<i4"), ("b", ">f8", (2,))]),
        "aligned": np.zeros(3, dtype=np.dtype([("a", "u1"), ("b", "f8")], align=True)),
        "datetime": np.arange(10_000).astype("M8[ns]"),
        "timedelta": np.arange(10).astype("m8[s]"),
        "unicode": np.array(["x" * 5] * 20_000),
        "bytes": np.array([b"ab", b"c"]),
        "void": np.zeros(3, dtype="V8"),
        "half": np.ones(3, np.float16),
        "fortran": np.asfortranarray(np.ones((300, 40))),
        "view": base[10:20_000],
        "reversed": base[::-1],
        "strided": base[::3],
        "read_only": frozen,
        "from_bytes": np.frombuffer(bytes(80_000), dtype=np.uint8),
        "record": np.zeros(3, dtype=[("a", "i4")]).view(np.dtype((np.record, [("a", "i4")]))),
        "subarray": np.zeros(3, dtype=np.dtype(("i4", (2, 2)))),
        "metadata": np.zeros(3, dtype=np.dtype("f8", metadata={"unit": "m"})),
    }


def _describe(a) -> tuple:
    """What must survive pickling: dtype, shape, Fortran order, bytes (a strided view
    comes back contiguous, as it always did)."""
    fortran = a.flags.f_contiguous and not a.flags.c_contiguous
    return (a.dtype.str, a.dtype.descr, a.dtype.metadata, a.shape, fortran, a.tobytes())


def test_every_dtype_and_layout_pickles_to_the_full_picklers_bytes_and_loads_back():
    for name, a in _arrays().items():
        for value in ((a,), {"state": a, "again": a}, [a, "x", (1, a)]):
            payload, buffers = dumps(value)
            want_payload, want_buffers = full_pickle(value)
            assert payload == want_payload, name
            assert [bytes(b.raw()) for b in buffers] == [bytes(b.raw()) for b in want_buffers], name
            back = loads(payload, [bytearray(b.raw()) for b in buffers])
            got = back[0] if isinstance(back, (tuple, list)) else back["state"]
            assert _describe(got) == _describe(a), name
            if isinstance(back, dict):
                assert back["state"] is back["again"], name  # the memo keeps one array
            elif isinstance(back, list):
                assert back[0] is back[2][1], name


def test_a_dtype_that_carries_a_class_takes_the_full_pickler():
    """Regression: the C pickler pickled a class in a dtype (its metadata, a field's
    metadata, a numpy.void subclass) by reference where cloudpickle sends a class of a
    user's script by value: other bytes, and a backend that cannot import the class."""
    cases = {
        "metadata": np.zeros(3, dtype=np.dtype("f8", metadata={"k": Tag})),
        "field": np.zeros(3, dtype=[("a", np.dtype("i4", metadata={"k": Tag}))]),
        "subarray": np.zeros(3, dtype=np.dtype((np.dtype("i4", metadata={"k": Tag}), (2,)))),
        "void_subclass": np.zeros(3, dtype=np.dtype((MyVoid, [("a", "i4")]))),
    }
    for name, a in cases.items():
        assert serialization._plain((a,)) == serialization._NOT_PLAIN, name
        payload, buffers = dumps((a,))
        assert payload == full_pickle((a,))[0], name
        assert loads(payload, buffers)[0].tobytes() == a.tobytes()


def test_a_forked_child_pickles_arrays_as_its_parent_does():
    a = np.arange(50_000, dtype=np.float64)  # 400 KiB: out of band
    value = {"a": a, "b": a, "t": (np.int16(3).dtype, "x")}
    want = dumps(value)[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answers over the pipe, never returns into pytest
        try:
            payload, buffers = dumps(value)
            ok = payload == want and len(buffers) == 1 and payload == full_pickle(value)[0]
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        answer = os.read(read, 1)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert answer == b"1"


class ArrayBag(StorageObject):
    """An object whose state is arrays only: the C pickler's path for states."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.same = arrays["view"]
        self.again = arrays["view"]

    def describe(self):
        return {k: _describe(a) for k, a in self.arrays.items()}, self.same is self.again is self.arrays["view"]

    def echo(self, value):
        return value

    def total(self, a):
        return float(np.asarray(a, dtype=np.float64).sum())

    def get(self, key):
        return self.arrays[key]


def test_arrays_in_a_state_survive_a_restart_and_kill_9_with_their_aliases(cluster):
    arrays = _arrays()
    want = {k: _describe(a) for k, a in arrays.items()}
    bag = ArrayBag(arrays)
    bag.make_persistent(backend=cluster.backends[0])
    assert bag.describe() == (want, True)
    chaos.restart_backend(cluster, cluster.backends[0], kill=False)  # from its checkpoint or log
    assert bag.describe() == (want, True)
    chaos.restart_backend(cluster, cluster.backends[0], kill=True)
    assert bag.describe() == (want, True)
    bag.move(cluster.backends[1])
    assert bag.describe() == (want, True)
    # Results come back with the same dtypes and layouts.
    for key in ("structured", "fortran", "datetime", "big_endian", "0d", "empty"):
        assert _describe(bag.get(key)) == want[key], key


@pytest.mark.parametrize("path", ["shm", "stream"])
def test_arrays_in_calls_over_shared_memory_and_streams(cluster, path, monkeypatch):
    client = store.client()
    if path == "stream":
        monkeypatch.setattr(client, "settings", client.settings.replace(shm=False))
    bag = ArrayBag({"view": np.arange(10)})
    bag.make_persistent(backend=cluster.backends[0])
    a = np.random.default_rng(3).random(3 * MiB // 8 * 2)  # 6 MiB: over the inline limit
    f = np.asfortranarray(np.random.default_rng(4).random((600, 700)))
    s = np.zeros(200_000, dtype=[("t", "M8[us]"), ("v", ">f4")])
    s["v"] = 1.5
    value = {"a": a, "again": a, "f": f, "s": s, "small": np.arange(3), "ro": np.frombuffer(a.tobytes(), ">u8")}
    back = bag.echo(value)
    assert back["a"] is back["again"]
    for k in value:
        assert _describe(back[k]) == _describe(value[k]), k
    assert bag.total(a) == float(a.sum())
    # A leased, read-only result passed back as an argument and stored again.
    held = ArrayBag({"view": a})
    held.make_persistent(backend=cluster.backends[0])
    view = held.same  # an attribute read: on the same host a leased view of its segment
    assert np.array_equal(view, a)
    assert view.flags.writeable is (path == "stream"), "same host: a leased read-only view"
    assert np.array_equal(bag.echo(view), a)
    assert bag.total(view) == float(a.sum())
    bag2 = ArrayBag({"view": view})
    bag2.make_persistent(backend=cluster.backends[1])
    assert bag2.describe()[1] is True
    assert np.array_equal(bag2.get("view"), a)


def test_arrays_as_task_arguments_and_results(cluster):
    from runtime import task, wait_on

    @task(returns=1)
    def scaled(bag, a, k):
        return {"a": a * k, "same": a, "fortran": np.asfortranarray(a.reshape(-1, 4)), "bag": bag.total(a)}

    bag = ArrayBag({"view": np.arange(10)})
    bag.make_persistent(backend=cluster.backends[1])
    a = np.arange(400_000, dtype=np.float64)  # 3 MiB
    out = wait_on(scaled(bag, a, 2.0))
    assert np.array_equal(out["a"], a * 2.0)
    assert np.array_equal(out["same"], a)
    assert out["fortran"].flags.f_contiguous and np.array_equal(out["fortran"], a.reshape(-1, 4))
    assert out["bag"] == float(a.sum())


def test_a_big_state_moved_then_both_backends_killed_lives_on_the_target_only(tmp_path):
    env = {"CLAYPOT_CHECKPOINT_INTERVAL": "3600"}  # the moved state stays in the target's log
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c"), backend_env=env) as c:
        source, target = c.backends
        big = Big()
        big.make_persistent(backend=source)
        for seed in (3, 4, 6):  # 5.5 MiB records, across the reserved end of the log
            big.put(seed, 720_000)
        big.move(target)
        big.put(9, 720_000)  # logged on the target after the move
        for bid in (source, target):
            chaos.kill_backend(c, bid)
        for bid in (target, source):
            chaos.start_backend(c, bid)
        assert big.check() == (9, True)
        assert big.get_location() == target
        target_dir = chaos.backend(c, target).data_dir
        assert big.getID() in {oid for oid, _, _ in scan_storage_dir(target_dir)}
        source_dir = chaos.backend(c, source).data_dir
        assert big.getID() not in {oid for oid, _, _ in scan_storage_dir(source_dir)}


def test_a_big_fortran_array_and_its_alias_in_a_state_survive_kill_9(cluster):
    # 100 MiB: over big_object (written directly, not logged) and far over the inline limit.
    a = np.asfortranarray(np.random.default_rng(5).random((256, 200, 256)))
    bag = ArrayBag({"view": a, "small": np.arange(5, dtype=">i2")})
    bag.make_persistent(backend=cluster.backends[1])
    described = bag.describe()
    assert described[1] is True
    assert described[0]["view"] == _describe(a)
    chaos.restart_backend(cluster, cluster.backends[1], kill=True)
    assert bag.describe() == described
    got = bag.same
    assert got.flags.f_contiguous and chaos.content_hash(np.ascontiguousarray(got)) == chaos.content_hash(
        np.ascontiguousarray(a)
    )


# -- kill -9 of a process writing the log alone, many times on one dir ---------------------

_WRITER = r"""
import hashlib, os, random, sys
from store.backend._storage.storage import Record, Storage
root, policy, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
st = Storage(root, policy, checkpoint_interval=0.05, flush_interval=0.05)
st.start()
version = seed * 1_000_000
while True:
    version += 1
    oid = "%032x" % rng.randrange(40)
    if rng.random() < 0.1:
        st.delete(oid)
        print(oid, version, "-", flush=True)
        continue
    size = rng.choice([100, 5000, 300_000, 3_000_000, 5_000_000])
    body = os.urandom(size) + bytes(rng.choice([0, 4096, size]))  # some end in long zero runs
    payload = b"%d:" % version + body
    st.write(Record(oid, "k:C", "", payload))
    print(oid, version, hashlib.sha256(payload).hexdigest(), flush=True)
"""


@pytest.mark.parametrize("policy", ["sync", "async"])
def test_a_log_writer_killed_at_random_points_loses_and_resurrects_nothing(tmp_path, policy):
    import hashlib
    import signal

    from store.errors import ObjectNotFound

    root = str(tmp_path / "d")
    rng = random.Random(1616)
    acked: dict[str, tuple[int, str]] = {}  # object -> (version, sha or "-") of its last acknowledged op
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for round_ in range(1, 7):
        proc = subprocess.Popen(
            [os.sys.executable, "-c", _WRITER, root, policy, str(round_)],
            stdout=subprocess.PIPE,
            cwd=repo,
            env={**os.environ, "PYTHONPATH": repo},
        )
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout))
        reader.start()
        chaos.wait_until(lambda: len(lines) >= 5, timeout=30, what="the writer's first records")
        time.sleep(rng.uniform(0.1, 1.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        reader.join(30)
        proc.stdout.close()
        for k, line in enumerate(lines):
            fields = line.decode(errors="replace").split()
            if len(fields) != 3 or not line.endswith(b"\n"):
                # Only the writer's last line can be cut by the kill (not acknowledged).
                assert k == len(lines) - 1, f"a garbled acknowledgement before the last: {line!r}"
                continue
            oid, version, sha = fields
            acked[oid] = (int(version), sha)
        st = Storage(root, policy, checkpoint_interval=3600)
        newer = 0  # objects found at an op newer than their last acknowledged one
        for oid, (version, sha) in acked.items():
            try:
                payload = bytes(st.read(oid).payload)
            except ObjectNotFound:
                if sha != "-":
                    # Only a delete in flight at the kill may have removed it.
                    newer += 1
                continue
            got = int(payload.split(b":", 1)[0])
            if got != version:
                assert got > version, f"round {round_}: {oid} went back from {version} to {got}"
                newer += 1
            elif sha != "-":
                assert hashlib.sha256(payload).hexdigest() == sha, f"round {round_}: {oid} torn"
            else:
                raise AssertionError(f"round {round_}: {oid} deleted at {version}, found at {got}")
        assert newer <= 1, f"round {round_}: {newer} objects ahead of what was acknowledged"
        # What the next round counts as acknowledged: what this restart found.
        for oid in list(acked):
            try:
                payload = bytes(st.read(oid).payload)
                acked[oid] = (int(payload.split(b":", 1)[0]), hashlib.sha256(payload).hexdigest())
            except ObjectNotFound:
                acked[oid] = (acked[oid][0], "-")
        st.close()
    st = Storage(root, policy, checkpoint_interval=3600)
    st.checkpoint()
    st.close()
    assert log_bytes(root) == 0 and len(_segments(root)) == 1


def _disk_bytes(metrics_address: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "claypot_disk_bytes":
                return s.value
    raise AssertionError("no claypot_disk_bytes")


def test_disk_use_leaves_the_reservation_out_across_kill_9(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        bid = c.backends[0]
        Tally(1).make_persistent()
        for kill in (False, True, True):
            if kill:
                chaos.kill_backend(c, bid)
                chaos.start_backend(c, bid)
                Tally(2).make_persistent()
            (info,) = store.backends()
            data_dir = chaos.backend(c, bid).data_dir
            files = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(data_dir) for n in names)
            assert files >= logspace.RESERVE_STEP  # the open segment's reservation is on disk
            # Each backend process computes it at its first scrape: what its dir holds,
            # less the open segment's unused reservation (the old one was cut at start).
            used = _disk_bytes(info.metrics_address)
            assert 0 < used < logspace.RESERVE_STEP // 2, (kill, used, files)


def test_a_replicated_big_state_survives_kill_9_of_its_primary_then_of_the_promoted_one(rcluster):
    from replicalib import TTL

    c = rcluster
    big = Big()
    big.make_persistent(replicas=1)
    for seed in (3, 6, 9):  # 5.5 MiB records in the replica's log, across its reserved end
        assert big.put(seed, 720_000) == seed
    first = c.client.resolve(object_id=big.getID())
    c.process_of(first.backend_id).kill()
    second = chaos.wait_until(
        lambda: (r := c.client.resolve(object_id=big.getID())).backend_id != first.backend_id and r,
        timeout=TTL * 6,
        what="promotion of the replica",
    )
    assert big.check() == (9, True)
    assert big.put(12, 720_000) == 12
    c.restart(first.backend_id, kill=True)
    # Once the factor is back, the promoted primary is killed and restarted (no time to fail
    # over): its own log, with the big records past its reserved end, brings the state back.
    chaos.wait_until(lambda: c.client.resolve(object_id=big.getID()).replicas, timeout=TTL * 6, what="repair")
    c.restart(second.backend_id, kill=True)

    def settled():
        try:
            return big.check() == (12, True)
        except ClaypotError:  # calls while the restarted primary comes back
            return False

    chaos.wait_until(settled, timeout=TTL * 6, what="the state after the restarts")
    assert big.check() == (12, True)
