"""Same-host zero-copy reads and writes: leased read-only views of a backend's segments.

Real backends on loopback; readers in this process and in child processes
(one killed with kill -9). See store/backend/_storage/segments.py and store/_client/leases.py.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import store
from chaos import restart_backend
from store import LocalCluster, StorageObject
from store._client import shm
from store._model.objects import readonly

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")

MiB = 1 << 20
N = 4 * MiB  # float64 elements: 32 MiB, over the inline limit


class Grid(StorageObject):
    def __init__(self, data):
        self.data = data

    def bump(self, k=1.0):
        self.data += k  # in place: the backend's private pages, never the segment

    def bump_head(self):
        self.data[:1024] += 1.0

    @readonly
    def head(self):
        return float(self.data[0])


def report(cluster: LocalCluster, obj) -> dict:
    return cluster.client.shm_report(obj.get_location())


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s")
        time.sleep(0.1)


@pytest.mark.slow
def test_read_is_a_leased_view_that_stays_unchanged_while_a_writer_changes(cluster):
    g = Grid(np.arange(N, dtype=np.float64))
    g.make_persistent()
    base = report(cluster, g)
    view = g.data
    # Zero copies: a read-only view of the backend's own segment, under a lease.
    assert not view.flags.writeable
    assert view[0] == 0.0 and view[-1] == N - 1
    held = report(cluster, g)
    assert held["leases"] == base["leases"] + 1
    assert held["leased_bytes"] >= base["leased_bytes"] + N * 8

    stop = threading.Event()
    bumps = []

    def writer():
        while not stop.is_set() and len(bumps) < 20:
            g.bump()
            bumps.append(1)

    t = threading.Thread(target=writer)
    t.start()
    try:
        # The reader's snapshot never moves, however often the writer changes the object.
        for _ in range(50):
            assert view[0] == 0.0 and view[N // 2] == N // 2 and view[-1] == N - 1
            time.sleep(0.005)
    finally:
        stop.set()
        t.join(60)
    expected = np.arange(N, dtype=np.float64) + len(bumps)
    now = g.data
    assert np.array_equal(now, expected)  # a later read sees the new state, whole
    assert not now.flags.writeable  # ... again without a copy (a new segment)
    assert report(cluster, g)["relocations"] >= 1
    assert np.array_equal(view, np.arange(N, dtype=np.float64))
    # The snapshot's segment no longer describes a live object: reported as extra memory.
    assert report(cluster, g)["stale_leased_bytes"] >= N * 8
    del view, now
    gc.collect()
    after = report(cluster, g)
    assert after["leases"] == base["leases"]
    assert after["stale_leased_bytes"] == 0
    g.delete_persistent()


def test_a_small_change_after_a_read_leaves_the_whole_view_alone(cluster):
    g = Grid(np.zeros(N))
    g.make_persistent()
    view = g.data
    g.bump_head()  # changes 1024 elements, after the copy aside
    assert view[0] == 0.0 and g.head() == 1.0
    assert np.array_equal(view, np.zeros(N))


def test_store_zeros_is_handed_over_without_a_copy(cluster, monkeypatch):
    exported = []
    real = shm.export
    monkeypatch.setattr(shm, "export", lambda b: exported.append(len(b)) or real(b))
    a = store.zeros(N)
    assert a.shape == (N,) and not a.any()
    a[:] = 7.0
    g = Grid(a)
    g.make_persistent()
    assert exported == []  # the segment itself went to the backend
    a[0] = -1.0  # this process's copy-on-write: the object keeps 7
    assert g.head() == 7.0
    view = g.data
    assert not view.flags.writeable and view[0] == 7.0 and view[-1] == 7.0
    g.bump()  # this process still maps the segment: moved aside
    assert a[0] == -1.0 and a[1] == 7.0 and a[-1] == 7.0
    assert view[1] == 7.0 and g.head() == 8.0
    e = store.empty((3, 5), dtype=np.int32)
    assert e.shape == (3, 5) and e.dtype == np.int32


def test_a_reader_killed_with_kill_9_releases_its_lease(cluster):
    g = Grid(np.ones(N))
    g.make_persistent(alias="zc-killed-reader")
    base = report(cluster, g)
    script = (
        "import sys, time, store\n"
        "store.connect(sys.argv[1], sys.argv[2])\n"
        "g = store.get_by_alias('zc-killed-reader')\n"
        "view = g.data\n"
        "assert not view.flags.writeable\n"
        "print('holding', flush=True)\n"
        "time.sleep(600)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, cluster.address, cluster.token],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "holding", line
        assert report(cluster, g)["leases"] == base["leases"] + 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: report(cluster, g)["leases"] == base["leases"])
        assert report(cluster, g)["leased_bytes"] == base["leased_bytes"]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stdout.close()


def test_leased_memory_is_bounded_and_reported(tmp_path):
    with LocalCluster(
        backends=1, data_dir=str(tmp_path / "c"), durability="none", backend_env={"CLAYPOT_SHM_LEASE_LIMIT": "48MiB"}
    ) as c:
        a, b = Grid(np.ones(N)), Grid(np.full(N, 2.0))
        a.make_persistent()
        b.make_persistent()
        va = a.data
        vb = b.data  # a second lease would pass the limit: a copy
        assert not va.flags.writeable
        assert vb.flags.writeable and vb[0] == 2.0
        r = c.client.shm_report(a.get_location())
        assert r["limit"] == 48 * MiB
        assert r["leases"] == 1 and r["leased_bytes"] == N * 8 <= r["limit"]
        assert r["segments"] == 2 and r["segment_bytes"] == 2 * N * 8
        del va
        gc.collect()
        r = c.client.shm_report(a.get_location())
        assert r["leases"] == 0 and r["leased_bytes"] == 0
        assert not b.data.flags.writeable  # room again: b's read is leased now


def test_cross_host_readers_get_copies(tmp_path):
    # A backend whose host identity differs is another host: nothing goes through /dev/shm.
    with LocalCluster(
        backends=1, data_dir=str(tmp_path / "c"), durability="none", backend_env={"CLAYPOT_HOST_ID": "another-host"}
    ) as c:
        g = Grid(np.arange(N, dtype=np.float64))
        g.make_persistent()
        got = g.data
        assert got.flags.writeable  # a copy of its own, streamed
        assert np.array_equal(got, np.arange(N, dtype=np.float64))
        r = c.client.shm_report(g.get_location())
        assert r["segments"] == 0 and r["leases"] == 0


def test_a_restart_never_serves_segments_and_readers_keep_their_snapshot(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), durability="sync") as c:
        g = Grid(np.zeros(MiB))  # 8 MiB: logged under sync before a call returns
        g.make_persistent(alias="zc-restart")
        view = g.data
        assert not view.flags.writeable
        g.bump(5.0)
        restart_backend(c, g.get_location(), kill=True)
        assert view[0] == 0.0 and view[-1] == 0.0  # the reader's mapping outlives it
        again = store.get_by_alias("zc-restart").data
        assert again[0] == 5.0 and again[-1] == 5.0  # the acknowledged state, from disk
        del view


# -- the sync write of a big object (store/backend/_storage/direct.py) ---------------------------


def test_direct_write_is_byte_for_byte_the_encoded_record(tmp_path, monkeypatch):
    from store.backend._storage import direct, storage

    data = np.random.default_rng(1).random((40 * MiB) // 8 + 77)  # not block-aligned
    rec = storage.Record("oid", "mod:Cls#1", "alias", b"payload", [memoryview(data).cast("B")])
    rec.lsn = 42
    path = str(tmp_path / "rec")
    assert direct.write(
        path, storage._PREFIX, storage._MAGIC, storage.record_header(rec), [rec.payload] + list(rec.buffers), os.fsync
    )
    with open(path, "rb") as f:
        assert f.read() == bytes(storage.encode(rec))
    # A system without O_DIRECT: nothing written, the caller takes the buffered path.
    monkeypatch.delattr(os, "O_DIRECT")
    probe = str(tmp_path / "probe")
    assert direct.write(probe, storage._PREFIX, storage._MAGIC, b"h", [b"x" * 10], os.fsync) is False
    assert not os.path.exists(probe)


def test_big_object_under_sync_survives_kill_9(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), durability="sync") as c:
        data = np.arange(5 * MiB, dtype=np.float64)  # 40 MiB: the direct path
        g = Grid(data)
        g.make_persistent(alias="zc-big-sync")
        restart_backend(c, g.get_location(), kill=True)
        assert np.array_equal(store.get_by_alias("zc-big-sync").data, data)


@pytest.mark.slow
def test_freed_segments_are_reused_and_never_while_a_reader_maps_them(tmp_path):
    M = N + 4096  # a size of its own: other clusters' free segments do not fit it exactly
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), durability="none") as c:
        first = Grid(np.full(M, 1.0))
        first.make_persistent()
        bid = first.get_location()
        view = first.data  # a reader maps the segment
        # Its first lease readies a spare of its size (for a copy-on-write), mapped by the
        # backend ahead of need: kept for the backend's own copy, never claimed by a put.
        wait_for(lambda: c.client.shm_report(bid)["pool_segments"] == 1)
        first.delete_persistent()
        r = c.client.shm_report(bid)
        assert r["pool_segments"] == 1 and r["leases"] == 1  # held by the view: not reusable
        second = Grid(np.full(M, 2.0))
        second.make_persistent()  # the leased one is untouchable, the spare kept
        assert view[0] == 1.0 and view[-1] == 1.0
        assert c.client.shm_report(bid)["pool_segments"] == 1
        del view
        gc.collect()
        r = wait_for(lambda: (lambda r: r if r["pool_segments"] == 2 else None)(c.client.shm_report(bid)))
        assert r["pool_bytes"] == 2 * M * 8 and r["leases"] == 0
        third = Grid(np.full(M, 3.0))
        third.make_persistent()  # claims the freed segment: pages already there
        assert c.client.shm_report(bid)["pool_segments"] == 1
        assert np.array_equal(third.data, np.full(M, 3.0))
        assert np.array_equal(second.data, np.full(M, 2.0))
