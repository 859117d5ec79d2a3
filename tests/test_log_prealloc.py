"""The redo log writes into reserved space: what that must never cost.

Log segments are written into space reserved with ``posix_fallocate``
(store/backend/_storage/logspace.py), so the open segment ends in zeros.
These tests hold the log to its promises around that tail: a crash loses no
acknowledged change and warns about nothing, a real torn record is still cut
with a warning, retired and closed segments hold records only, and a file
system that cannot reserve space gets plain appends.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

import pytest

import store
from store import LocalCluster, StorageObject
from store.backend._storage import logspace
from store.backend._storage.storage import Record, Storage, decode, log_bytes, scan_storage_dir
from store.errors import ClaypotError

import chaos

pytestmark = pytest.mark.slow


class Tally(StorageObject):
    """A counter whose every ``bump`` is a logged change."""

    def __init__(self, n=0):
        self.n = n

    def bump(self):
        self.n += 1
        return self.n


def _segments(root: str) -> list[str]:
    wal = os.path.join(root, "wal")
    return [os.path.join(wal, n) for n in sorted(os.listdir(wal)) if n.endswith(".log")]


def _records(path: str) -> tuple[int, int]:
    """(records, bytes they span) of a segment, read from its start to the first non-record."""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    count = offset = 0
    while True:
        parsed = decode(data, offset)
        if parsed is None:
            return count, offset
        count += 1
        offset = parsed[1]


def _oid(i: int) -> str:
    return f"{i:032x}"


def _crashed(root: str, n: int, size: int = 100) -> str:
    """A storage dir whose backend died with ``n`` records logged (no close): the open
    segment's path, which ends in the unused reservation."""
    st = Storage(root, "sync", checkpoint_interval=3600)
    for i in range(n):
        st.write(Record(_oid(i), "k:C", "", b"%d:" % i + b"x" * size))
    # Dropped without close(), as kill -9 leaves it: the reservation stays in the file.
    os.close(st._fd)
    st._fd = -1
    return _segments(root)[-1]


# -- across processes: kill -9 in the middle of a stream -------------------------------


def test_kill9_mid_stream_keeps_every_acknowledged_change_and_cuts_the_zero_tail_quietly(tmp_path):
    env = {"CLAYPOT_CHECKPOINT_INTERVAL": "3600", "CLAYPOT_LOG": "DEBUG"}  # the log holds it all
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), backend_env=env) as c:
        bid = c.backends[0]
        data_dir = chaos.backend(c, bid).data_dir
        counters = [Tally() for _ in range(4)]
        store.make_persistent_many(counters)
        acked = [0] * len(counters)  # highest value each counter acknowledged
        created: list[tuple[str, int]] = []  # (id, n) of each acknowledged make_persistent
        stop = threading.Event()

        def bump(i):
            while not stop.is_set():
                try:
                    acked[i] = counters[i].bump()
                except ClaypotError:
                    return

        def persist():
            n = 0
            while not stop.is_set():
                n += 1
                t = Tally(n)
                try:
                    t.make_persistent()
                except ClaypotError:
                    return
                created.append((t.getID(), n))

        threads = [threading.Thread(target=bump, args=(i,)) for i in range(len(counters))]
        threads.append(threading.Thread(target=persist))
        for t in threads:
            t.start()
        chaos.wait_until(lambda: min(acked) >= 50 and len(created) >= 50, timeout=60, what="a stream of changes")
        chaos.kill_backend(c, bid)
        stop.set()  # callers in flight end with an error or, retried, after the restart
        # The open segment ends in the reservation the crash left unused.
        last = _segments(data_dir)[-1]
        assert os.path.getsize(last) > _records(last)[1]
        with open(last, "rb") as f:
            tail = f.read()[_records(last)[1] :]
        assert tail and not tail.strip(b"\0"), "the unused reservation is zeros"

        log_path = os.path.join(data_dir, "backend.log")
        before = os.path.getsize(log_path)
        chaos.start_backend(c, bid)
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        for i, counter in enumerate(counters):
            # The call in flight at the kill may have been logged, not acknowledged.
            assert counter.n in (acked[i], acked[i] + 1), (i, counter.n, acked[i])
        for oid, n in created:
            assert store.get_by_id(oid).n == n
        with open(log_path, "rb") as f:
            f.seek(before)
            restart_log = f.read().decode(errors="replace")
        assert "unused reserved space" in restart_log
        assert "torn record" not in restart_log
        # The segment that was open is cut to its records by the restart.
        assert os.path.getsize(last) == _records(last)[1]


# -- the storage alone, on a real directory ---------------------------------------------


def test_a_zero_tail_is_cut_silently_and_changes_nothing_for_readers(tmp_path, caplog):
    root = str(tmp_path / "s")
    segment = _crashed(root, 30)
    count, length = _records(segment)
    assert count == 30 and os.path.getsize(segment) == logspace.RESERVE_STEP
    # Readers that change nothing (repair, disk-use figures) see the records only.
    assert len(list(scan_storage_dir(root))) == 30
    assert log_bytes(root) == length
    assert os.path.getsize(segment) == logspace.RESERVE_STEP
    with caplog.at_level(logging.DEBUG, logger="claypot.storage"):
        st = Storage(root, "sync")
    assert st.recovered == 30
    assert all(bytes(st.read(_oid(i)).payload) == b"%d:" % i + b"x" * 100 for i in range(30))
    assert os.path.getsize(segment) == length
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "unused reserved space" in caplog.text
    st.close()


def test_a_torn_record_followed_by_zeros_is_cut_with_a_warning(tmp_path, caplog):
    root = str(tmp_path / "s")
    segment = _crashed(root, 10)
    _, length = _records(segment)
    blob = _encoded(Record(_oid(99), "k:C", "", b"y" * 500))
    with open(segment, "r+b") as f:  # half a record written, the reservation after it
        f.seek(length)
        f.write(blob[: len(blob) // 2])
    assert os.path.getsize(segment) == logspace.RESERVE_STEP
    with caplog.at_level(logging.WARNING, logger="claypot.storage"):
        st = Storage(root, "sync")
    assert f"torn record at byte {length}" in caplog.text
    assert os.path.getsize(segment) == length
    assert st.recovered == 10
    with pytest.raises(store.errors.ObjectNotFound):
        st.read(_oid(99))
    st.close()


def test_half_a_record_at_the_very_end_is_cut_with_a_warning(tmp_path, caplog):
    root = str(tmp_path / "s")
    st = Storage(root, "sync", checkpoint_interval=3600)
    for i in range(5):
        st.write(Record(_oid(i), "k:C", "", b"z" * 300))
    st.close()
    segment = _segments(root)[-1]
    length = os.path.getsize(segment)
    assert _records(segment) == (5, length)  # closed: records only
    blob = _encoded(Record(_oid(7), "k:C", "", b"q" * 300))
    with open(segment, "ab") as f:
        f.write(blob[: len(blob) - 40])
    with caplog.at_level(logging.WARNING, logger="claypot.storage"):
        st = Storage(root, "sync")
    assert f"torn record at byte {length}" in caplog.text
    assert os.path.getsize(segment) == length and st.recovered == 5
    st.close()


def test_rotation_and_close_leave_segments_that_hold_records_only(tmp_path):
    root = str(tmp_path / "s")
    st = Storage(root, "sync", checkpoint_interval=3600)
    st.start()
    for i in range(40):
        st.write(Record(_oid(i), "k:C", "", b"r" * 200))
    first = _segments(root)[-1]
    assert os.path.getsize(first) > _records(first)[1]  # reserved ahead while open
    stop = threading.Event()
    stop.set()  # the checkpoint rotates the log, then stops: the old segment is kept
    assert st.checkpoint(stop) == 0
    assert os.path.getsize(first) == _records(first)[1] and _records(first)[0] == 40
    second = _segments(root)[-1]
    assert second != first
    for i in range(40, 50):
        st.write(Record(_oid(i), "k:C", "", b"r" * 200))
    chaos.wait_until(lambda: os.path.getsize(second) > _records(second)[1], what="the new segment reserved")
    assert st.unused_reservation() == os.path.getsize(second) - _records(second)[1]
    st.close()
    assert os.path.getsize(second) == _records(second)[1] and _records(second)[0] == 10
    assert log_bytes(root) == sum(os.path.getsize(s) for s in _segments(root))


def test_writes_past_several_steps_from_many_threads_stay_in_order(tmp_path):
    """The reserver thread keeps ahead of writers crossing several steps; nothing is lost."""
    root = str(tmp_path / "s")
    st = Storage(root, "sync", checkpoint_interval=3600)
    st.start()
    per, size = 600, 8000  # 4 threads x 600 x 8 KB: about 19 MB, several steps
    expected = {}

    def writer(w):
        for i in range(per):
            oid = _oid(w * per + i)
            body = bytes([w]) * size + b"%d" % i
            st.write(Record(oid, "k:C", "", body), durable=i % 50 == 0)
            expected[oid] = body

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st.sync()
    segment = _segments(root)[-1]
    count, length = _records(segment)
    assert count == 4 * per
    # Reserved ahead of the write position (the reserver may still be at it), at most a step.
    chaos.wait_until(lambda: os.path.getsize(segment) > length, what="space reserved ahead")
    assert os.path.getsize(segment) <= length + logspace.RESERVE_STEP
    os.close(st._fd)  # a crash: nothing truncated
    st._fd = -1
    st._stop.set()
    st._reserve_wake.set()
    again = Storage(root, "sync")
    assert again.recovered == 4 * per
    for oid in list(expected)[::97]:
        assert bytes(again.read(oid).payload) == expected[oid]
    again.close()


def test_no_fallocate_support_falls_back_to_appends(tmp_path, monkeypatch, caplog):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    root = str(tmp_path / "s")
    with caplog.at_level(logging.INFO, logger="claypot.storage"):
        st = Storage(root, "sync", checkpoint_interval=3600)
        for i in range(20):
            st.write(Record(_oid(i), "k:C", "", b"a" * 100))
    assert "cannot reserve log space" in caplog.text
    segment = _segments(root)[-1]
    assert os.path.getsize(segment) == _records(segment)[1]  # appended: no tail at all
    assert st.unused_reservation() == 0
    os.close(st._fd)  # a crash
    st._fd = -1
    st = Storage(root, "sync")
    assert st.recovered == 20
    st.write(Record(_oid(20), "k:C", "", b"after"))
    st.close()
    assert Storage(root, "sync").recovered == 21


def test_a_failed_reservation_appends_that_segment_and_the_next_one_reserves(tmp_path, monkeypatch, caplog):
    real = os.posix_fallocate
    calls = []

    def full(fd, offset, length):
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full)
    root = str(tmp_path / "s")
    with caplog.at_level(logging.WARNING, logger="claypot.storage"):
        st = Storage(root, "sync", checkpoint_interval=3600)
        for i in range(10):
            st.write(Record(_oid(i), "k:C", "", b"b" * 100))
    assert "reserving space failed" in caplog.text and len(calls) == 1
    first = _segments(root)[-1]
    assert os.path.getsize(first) == _records(first)[1]
    stop = threading.Event()
    stop.set()
    st.checkpoint(stop)  # rotates: the new segment tries again
    second = _segments(root)[-1]
    assert len(calls) == 2 and os.path.getsize(second) == logspace.RESERVE_STEP
    st.close()
    assert Storage(root, "sync").recovered == 10


def _encoded(rec: Record) -> bytes:
    from store.backend._storage.storage import encode

    rec.lsn = 1 << 50
    return bytes(encode(rec))
