"""Same-host attribute reads answered without an RPC while the object is unchanged.

Real backends on loopback. See store/backend/_storage/versions.py (the backend's change
words) and store/_client/readcache.py (the reader's side).
"""

from __future__ import annotations

import gc
import os
import signal
import threading

import numpy as np
import pytest

from chaos import restart_backend
from store import LocalCluster, StorageObject
from store._client import shm
from store.errors import ObjectNotFound
from store._model.objects import readonly

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")

MiB = 1 << 20
N = MiB  # float64 elements: 8 MiB, over the inline limit


class Field(StorageObject):
    def __init__(self, data):
        self.data = data
        self.tag = "t"

    def add(self, k):
        self.data = self.data + k

    def add_in_place(self, k):
        self.data += k

    @readonly
    def snapshot(self):
        return self.data

    @property
    def doubled(self):
        return self.data * 2


def reused(c: LocalCluster) -> int:
    cache = c.client.__dict__.get("read_cache")
    return cache.reused if cache is not None else 0


def backend_pid(c: LocalCluster, backend_id: str) -> int:
    return [p.pid for p in c.processes if p.backend_id == backend_id][0]


def test_unchanged_object_is_read_again_without_an_rpc(cluster):
    f = Field(np.arange(N, dtype=np.float64))
    f.make_persistent()
    first = f.data
    before = reused(cluster)
    # The backend is stopped (SIGSTOP): an RPC could not be answered, a reused read
    # does not ask it.
    pid = backend_pid(cluster, f.get_location())
    os.kill(pid, signal.SIGSTOP)
    try:
        second = f.data
        third = f.data
    finally:
        os.kill(pid, signal.SIGCONT)
    assert reused(cluster) == before + 2
    # The same memory (the same leased view), as new read-only arrays.
    assert second is not first and np.shares_memory(first, second)
    assert second.__array_interface__["data"][0] == first.__array_interface__["data"][0]
    assert not third.flags.writeable
    assert np.array_equal(third, np.arange(N, dtype=np.float64))


def test_a_change_is_seen_by_the_next_read_and_old_views_keep_their_snapshot(cluster):
    f = Field(np.zeros(N))
    f.make_persistent()
    old = f.data
    assert np.array_equal(f.data, old)  # reused
    f.add(1.0)  # a new array
    assert f.data[0] == 1.0 and f.data[-1] == 1.0
    f.add_in_place(2.0)  # the same array, changed in place
    now = f.data
    assert now[0] == 3.0 and now[-1] == 3.0
    f.data = np.full(N, 7.0)  # an attribute write
    assert f.data[0] == 7.0
    del f.data
    f.data = np.full(N, 8.0)
    assert f.data[-1] == 8.0
    # Readers' snapshots never change.
    assert old[0] == 0.0 and old[-1] == 0.0 and now[0] == 3.0


@pytest.mark.slow
def test_many_changes_interleaved_with_reads_are_never_stale(cluster):
    f = Field(np.zeros(N))
    f.make_persistent()
    keep = []
    for k in range(1, 30):
        keep.append(f.data)
        f.add_in_place(1.0) if k % 2 else f.add(1.0)
        got = f.data
        assert got[0] == float(k) and got[-1] == float(k)
        keep.append(got)
        assert f.data[0] == float(k)  # the reused view: same state
    assert [a[0] for a in keep[1::2]] == [float(k) for k in range(1, 30)]


def test_delete_ends_reuse(cluster):
    f = Field(np.ones(N))
    f.make_persistent()
    held = f.data
    assert f.data[0] == 1.0
    f.delete_persistent()
    with pytest.raises(ObjectNotFound):
        f.data
    assert held[0] == 1.0


def test_move_ends_reuse_and_reads_follow_the_object(cluster):
    f = Field(np.ones(N))
    f.make_persistent()
    held = f.data
    other = [p.backend_id for p in cluster.processes if p.backend_id != f.get_location()][0]
    f.move(other)
    f.add(1.0)
    got = f.data
    assert got[0] == 2.0 and held[0] == 1.0
    assert f.data[-1] == 2.0
    f.add_in_place(1.0)
    assert f.data[0] == 3.0 and got[0] == 2.0


def test_only_plain_array_attributes_are_reused(cluster):
    f = Field(np.ones(N))
    f.make_persistent()
    keep = [f.snapshot(), f.snapshot(), f.doubled, f.doubled]
    before = reused(cluster)
    keep += [f.snapshot(), f.doubled, f.tag, f.tag]
    assert reused(cluster) == before  # methods, properties, small values: RPCs
    assert keep[2][0] == 2.0 and keep[-1] == "t"


def test_no_reuse_once_the_reader_dropped_its_views(cluster):
    f = Field(np.ones(N))
    f.make_persistent()
    view = f.data
    del view
    gc.collect()
    before = reused(cluster)
    got = f.data  # the lease ended: a new one, by RPC
    assert reused(cluster) == before and got[0] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("kill", [True, False])
def test_a_restarted_backend_is_asked_again(tmp_path, kill):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), durability="sync") as c:
        f = Field(np.zeros(N))
        f.make_persistent(alias=f"rc-restart-{kill}")
        view = f.data
        assert f.data[0] == 0.0 and reused(c) == 1
        f.add(5.0)
        held = f.data
        restart_backend(c, f.get_location(), kill=kill)
        before = reused(c)
        again = f.data  # the new process's state, by RPC
        assert reused(c) == before
        assert again[0] == 5.0 and again[-1] == 5.0
        assert view[0] == 0.0 and held[0] == 5.0
        f.add(1.0)
        assert f.data[0] == 6.0 and f.data[-1] == 6.0
        g = Field(np.ones(N))  # kept in a segment of the new process
        g.make_persistent()
        first = g.data
        assert g.data[0] == 1.0 and first[0] == 1.0
        assert reused(c) == before + 1  # reused through the new process's table


class Holder(StorageObject):
    """Holds another object's array by reference (a local call hands over the live array)."""

    def __init__(self):
        self.x = None

    def take(self, other):
        self.x = other.data

    def bump_x(self):
        self.x += 1.0


def test_a_change_through_another_object_sharing_the_array_is_seen(cluster):
    f = Field(np.zeros(N))
    f.make_persistent()
    h = Holder()
    h.make_persistent(backend=f.get_location())
    h.take(f)
    held = f.data
    before = reused(cluster)
    assert f.data[0] == 0.0 and reused(cluster) == before + 1
    h.bump_x()  # writes f's array, in f's segment
    got = f.data
    assert got[0] == 1.0 and got[-1] == 1.0
    assert held[0] == 0.0


@pytest.mark.slow
def test_reads_beside_a_writer_are_whole_and_never_older_than_a_finished_change(cluster):
    f = Field(np.zeros(N))
    f.make_persistent()
    done = [0]
    stop = threading.Event()

    def writer():
        while not stop.is_set() and done[0] < 40:
            f.add_in_place(1.0)
            done[0] += 1  # this change ended: every later read sees it

    t = threading.Thread(target=writer)
    keep = [f.data]
    t.start()
    try:
        while t.is_alive():
            floor = done[0]
            got = f.data
            assert got[0] == got[-1]  # whole: never a change half done
            assert got[0] >= floor  # linearizable: never older than a finished change
            keep.append(got)
            keep = keep[-4:]
    finally:
        stop.set()
        t.join(60)
    assert f.data[0] == float(done[0])
