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

import errno
import io
import logging
import os
import pickle
import random
import subprocess
import tempfile
import threading
import time

import numpy as np
import pytest

import store
from store import LocalCluster, StorageObject
from store._wire import serialization
from store._wire.serialization import _Pickler, dumps, loads
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


@pytest.fixture
def small_fs():
    """An 8 MiB tmpfs (root only): writes there run out of space."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: the full-disk test needs to mount a tmpfs")
        pytest.skip("mounting a small tmpfs needs root")
    path = tempfile.mkdtemp(prefix="claypot-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)


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
