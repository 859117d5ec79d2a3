"""Sharded collections (store.collections) on a real local cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import store
from runtime import task, wait_on
from store import LocalCluster
from store.collections import ArrayBlock, DictShard, ShardedArray, StorageDict, plan_rebalance, shard_of, spread
from store.errors import AliasExists, BackendNotFound, BackendUnavailable, ConfigurationError, InvalidKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pids() -> dict[str, int]:
    return {b.backend_id: b.pid for b in store.backends() if b.up}


def _object_count() -> int:
    """Objects held by all backends, as their heartbeats (1 s apart) last reported."""
    time.sleep(2.5)
    return sum(b.objects for b in store.backends())


# -- pure parts: placement, rebalancing plans, key hashing ---------------------------------


def test_spread_alternates_hosts_before_backends_of_one_host():
    backends = [("a1", "hostA"), ("a2", "hostA"), ("b1", "hostB"), ("a3", "hostA")]
    assert spread(6, backends) == ["a1", "b1", "a2", "a3", "a1", "b1"]
    assert spread(3, [("x", "h")]) == ["x", "x", "x"]
    with pytest.raises(ConfigurationError):
        spread(0, backends)
    with pytest.raises(ConfigurationError):
        spread(2, [])


def test_plan_rebalance_evens_bytes_and_empties_excluded_backends():
    # Four equal shards on one backend, a second joins: two move.
    moves = plan_rebalance([("a", 10)] * 4, ["a", "b"])
    assert len(moves) == 2 and all(t == "b" for _, t in moves)
    # Already even: nothing moves.
    assert plan_rebalance([("a", 10), ("b", 10)], ["a", "b"]) == []
    # A backend that is leaving gives all its shards away.
    assert dict(plan_rebalance([("a", 5), ("gone", 5), ("gone", 5)], ["a", "b"])) == {1: "b", 2: "a"}
    # Uneven sizes: the result is never worse than before.
    shards = [("a", 100), ("a", 1), ("a", 1), ("b", 1)]
    moves = dict(plan_rebalance(shards, ["a", "b", "c"]))
    owners = [moves.get(i, o) for i, (o, _) in enumerate(shards)]
    load = {b: sum(s for (_, s), o in zip(shards, owners) if o == b) for b in "abc"}
    assert max(load.values()) == 100


def test_shard_of_is_the_same_in_every_process_and_equal_keys_agree():
    keys = ["alpha", b"raw", 7, (1, "x", None), 2.5, -3]
    here = [shard_of(k, 16) for k in keys]
    code = (
        "from store.collections import shard_of; "
        "print([shard_of(k, 16) for k in ['alpha', b'raw', 7, (1, 'x', None), 2.5, -3]])"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(here)
    assert shard_of(1, 8) == shard_of(1.0, 8) == shard_of(True, 8) == shard_of(np.int64(1), 8)
    with pytest.raises(InvalidKey):
        shard_of(["a", "list"], 8)
    with pytest.raises(InvalidKey):
        shard_of(object(), 8)


# -- ShardedArray ------------------------------------------------------------------------------


@pytest.mark.both_transports
def test_from_numpy_places_blocks_over_backends_and_round_trips(cluster):
    x = np.random.default_rng(0).normal(size=(1001, 5)).astype(np.float32)
    a = ShardedArray.from_numpy(x, shards=4)
    assert a.shape == x.shape and a.dtype == x.dtype and len(a) == 1001 and a.nshards == 4
    assert a.nbytes == x.nbytes
    parts = a.partitions()
    assert {p.backend for p in parts} == set(cluster.backends)  # spread over both
    assert [p.backend for p in parts] == a.locations()
    assert parts[0].start == 0 and parts[-1].stop == 1001
    hosts = {b.backend_id: b.host for b in store.backends()}
    assert all(p.host == hosts[p.backend] and p.host for p in parts)
    assert all(isinstance(b, ArrayBlock) for b in a.split())
    np.testing.assert_array_equal(a.to_numpy(), x)
    np.testing.assert_array_equal(np.asarray(a), x)
    a.delete()


@pytest.mark.both_transports
def test_indexing_matches_numpy(cluster):
    x = np.arange(997 * 3, dtype=np.int64).reshape(997, 3)
    a = ShardedArray.from_numpy(x, block_rows=100)
    assert a.nshards == 10
    rng = np.random.default_rng(1)
    cases = [
        0,
        996,
        -1,
        -997,
        np.int64(5),
        slice(None),
        slice(10, 20),
        slice(95, 305),
        slice(None, None, 7),
        slice(3, 990, 101),
        slice(None, None, -1),
        slice(900, 10, -13),
        slice(50, 50),
        slice(2000, 3000),
        (slice(100, 400), 1),
        (7, 2),
        (slice(None, None, 3), slice(0, 2)),
    ]
    for _ in range(20):
        lo, hi = sorted(rng.integers(-997, 997, size=2))
        cases.append(slice(int(lo), int(hi), int(rng.integers(1, 50))))
    for idx in cases:
        np.testing.assert_array_equal(a[idx], x[idx], err_msg=str(idx))
    with pytest.raises(IndexError):
        a[997]
    with pytest.raises(InvalidKey):
        a[[1, 2]]
    with pytest.raises(InvalidKey):
        a["rows"]
    a.delete()


@task(returns=1)
def _where(block):
    return os.getpid(), len(block.data)


@pytest.mark.both_transports
def test_map_blocks_and_reduce_run_next_to_each_block(cluster):
    x = np.random.default_rng(2).normal(size=(4000, 8))
    a = ShardedArray.from_numpy(x, shards=4)
    pids = _pids()
    futures = a.map_blocks(lambda b, k: (os.getpid(), float(b.sum()) * k), 2.0)
    got = wait_on(futures)
    for part, f, (pid, s) in zip(a.partitions(), futures, got):
        assert f.backend == part.backend and pid == pids[part.backend]
        assert s == pytest.approx(2.0 * x[part.start : part.stop].sum())
    # A user task given a block from split() is placed by locality too.
    for part in a.partitions():
        f = _where(part.shard)
        assert f.result() == (pids[part.backend], part.stop - part.start)
    np.testing.assert_allclose(wait_on(a.reduce(np.add)), x.sum(axis=0))
    assert wait_on(a.reduce(max, chunk=np.max)) == pytest.approx(x.max())
    assert wait_on(a.reduce(lambda p, q: p + q, chunk=lambda b: len(b), initial=10)) == 4010
    a.delete()


@pytest.mark.both_transports
def test_update_blocks_changes_blocks_in_place(cluster):
    x = np.arange(600, dtype=np.float64).reshape(200, 3)
    a = ShardedArray.from_numpy(x, shards=3)
    wait_on(a.update_blocks(np.multiply, 3.0, out=None))  # returns a new block
    np.testing.assert_array_equal(a.to_numpy(), x * 3)

    def in_place(b):
        b += 1

    wait_on(a.update_blocks(in_place))
    np.testing.assert_array_equal(a.to_numpy(), x * 3 + 1)
    # A block may not change its shape: the manifest records its rows.
    futures = a.update_blocks(lambda b: b[:10])
    for f in futures:
        with pytest.raises(ConfigurationError):
            f.result()
    np.testing.assert_array_equal(a.to_numpy(), x * 3 + 1)
    a.delete()


@pytest.mark.both_transports
def test_from_iterable_consumes_chunks_lazily(cluster):
    consumed = []

    def chunks():
        for i in range(25):
            consumed.append(i)
            yield np.full((13, 4), i, dtype=np.int32)

    a = ShardedArray.from_iterable(chunks(), block_rows=50)
    assert a.shape == (325, 4) and a.dtype == np.int32
    assert a.nshards == 7  # six of 50 rows, one of 25
    expected = np.repeat(np.arange(25, dtype=np.int32), 13)[:, None].repeat(4, axis=1)
    np.testing.assert_array_equal(a.to_numpy(), expected)
    assert {p.backend for p in a.partitions()} == set(cluster.backends)
    with pytest.raises(ConfigurationError):
        ShardedArray.from_iterable([np.ones((2, 3)), np.ones((2, 4))], block_rows=10)
    with pytest.raises(ConfigurationError):
        ShardedArray.from_iterable([], block_rows=10)
    a.delete()


def _rows(lo, hi, width):
    return np.arange(lo, hi, dtype=np.float32)[:, None] * np.ones(width, np.float32) + os.getpid()


@pytest.mark.both_transports
def test_from_function_makes_each_block_on_its_backend(cluster):
    a = ShardedArray.from_function(_rows, 1000, 4, args=(3,))
    pids = _pids()
    assert a.shape == (1000, 3)
    data = a.to_numpy()
    for p in a.partitions():
        # Each block was made by a process of the backend that holds it, not by this one.
        expected = _rows(p.start, p.stop, 3) - os.getpid() + pids[p.backend]
        np.testing.assert_array_equal(data[p.start : p.stop], expected)
    # The blocks were empty when first weighed for locality: later tasks still follow them.
    assert wait_on(a.map_blocks(lambda b: os.getpid())) == [pids[p.backend] for p in a.partitions()]
    with pytest.raises(ConfigurationError):
        ShardedArray.from_function(lambda lo, hi: np.zeros(3), 100, 2)
    a.delete()


@pytest.mark.both_transports
def test_from_numpy_reads_a_memmap_block_by_block(cluster, tmp_path):
    path = tmp_path / "x.f32"
    m = np.memmap(path, dtype=np.float32, mode="w+", shape=(5000, 16))
    m[:] = np.arange(5000 * 16, dtype=np.float32).reshape(5000, 16)
    m.flush()
    src = np.memmap(path, dtype=np.float32, mode="r", shape=(5000, 16))
    a = ShardedArray.from_numpy(src, shards=5)
    np.testing.assert_array_equal(a[4990:], np.asarray(src[4990:]))
    np.testing.assert_array_equal(a.to_numpy(), np.asarray(src))
    a.delete()


@pytest.mark.slow
@pytest.mark.both_transports
def test_bad_input_and_all_or_nothing_creation(cluster):
    x = np.zeros((10, 2))
    with pytest.raises(ConfigurationError):
        ShardedArray.from_numpy(x, shards=0)
    with pytest.raises(ConfigurationError):
        ShardedArray.from_numpy(x, shards=2, block_rows=5)
    with pytest.raises(ConfigurationError):
        ShardedArray.from_numpy(np.float64(3.0), shards=2)
    with pytest.raises(BackendNotFound):
        ShardedArray.from_numpy(x, shards=2, placement=["no-such-backend"])
    with pytest.raises(ConfigurationError):
        ShardedArray.from_numpy(x, shards=2, placement=lambda n, up: [up[0].backend_id])
    a = ShardedArray.from_numpy(x, shards=2, alias="taken")
    before = _object_count()
    with pytest.raises(AliasExists):
        ShardedArray.from_numpy(x, shards=3, alias="taken")
    assert _object_count() == before  # the blocks of the failed one are gone
    with pytest.raises(ConfigurationError):
        StorageDict.load("taken")  # an array is not a dict
    a.delete()


@pytest.mark.both_transports
def test_placement_by_list_and_by_function(cluster):
    b0, b1 = cluster.backends
    a = ShardedArray.from_numpy(np.zeros((40, 1)), shards=4, placement=[b1])
    assert set(a.locations()) == {b1}
    a.delete()
    a = ShardedArray.from_numpy(np.zeros((40, 1)), shards=3, placement=lambda n, up: [b0] * (n - 1) + [b1])
    assert a.locations() == [b0, b0, b1]
    a.delete()


@task(returns=1)
def _shape_of(arr):
    return arr.shape, float(arr[0:2].sum())


@pytest.mark.both_transports
def test_a_handle_travels_into_tasks(cluster):
    a = ShardedArray.from_numpy(np.ones((30, 2)), shards=2)
    assert wait_on(_shape_of(a)) == ((30, 2), 4.0)
    a.delete()


# -- StorageDict ---------------------------------------------------------------------------


@pytest.mark.both_transports
def test_storage_dict_behaves_like_a_dict(cluster):
    d = StorageDict(shards=4)
    ref: dict = {}
    rng = np.random.default_rng(3)
    for step in range(300):
        k = int(rng.integers(0, 60)) if step % 3 else f"key{int(rng.integers(0, 30))}"
        op = rng.integers(0, 3)
        if op == 0 or k not in ref:
            d[k] = ref[k] = step
        elif op == 1:
            assert d[k] == ref[k]
        else:
            del d[k]
            del ref[k]
    assert len(d) == len(ref)
    assert d.to_dict() == ref
    assert dict(d.items()) == ref and sorted(d.values()) == sorted(ref.values())
    assert set(d) == set(ref) and set(d.keys()) == set(ref)
    assert ("missing" in d) is False and d.get("missing", 9) == 9
    with pytest.raises(KeyError):
        d["missing"]
    with pytest.raises(KeyError):
        del d["missing"]
    with pytest.raises(InvalidKey):
        d[["a"]] = 1
    some = list(ref)[:5]
    assert d.get_many(some + ["nope"], default=-1) == [ref[k] for k in some] + [-1]
    d.update({"x": 1}, y=2)
    assert d["x"] == 1 and d["y"] == 2 and d.pop("x") == 1 and "x" not in d
    d.clear()
    assert len(d) == 0 and d.to_dict() == {}
    # Each key lives on the shard its hash names, and the shards are spread.
    assert {p.backend for p in d.partitions()} == set(cluster.backends)
    assert all(isinstance(s, DictShard) for s in d.split())
    d.delete()


@pytest.mark.both_transports
def test_storage_dict_from_iterable_in_batches_and_work_per_shard(cluster):
    pairs = ((f"w{i}", i) for i in range(5000))
    d = StorageDict.from_iterable(pairs, shards=3, batch=128, alias="words")
    assert len(d) == 5000 and d["w4999"] == 4999
    sizes = [s.size() for s in d.split()]
    assert sum(sizes) == 5000 and min(sizes) > 1000  # the hash spreads keys
    pids = _pids()
    futures = d.map_blocks(lambda shard: (os.getpid(), len(shard)))
    for part, f in zip(d.partitions(), futures):
        assert f.result() == (pids[part.backend], part.shard.size())
    assert wait_on(d.reduce(lambda p, q: p + q)) == sum(range(5000))
    assert wait_on(d.reduce(max, chunk=lambda shard: max(shard.values()))) == 4999
    again = StorageDict.load("words")
    assert again.getID() == d.getID() and again["w7"] == 7
    with pytest.raises(ValueError):
        wait_on(StorageDict(shards=2).reduce(lambda p, q: p + q))
    d.delete()


# -- rebalance, locality of slices, restarts (clusters of their own) ------------------------


@pytest.mark.slow
def test_rebalance_moves_blocks_to_a_backend_that_joined(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        x = np.arange(8000, dtype=np.float64).reshape(1000, 8)
        a = ShardedArray.from_numpy(x, shards=4, alias="grow")
        d = StorageDict.from_iterable(((i, i * i) for i in range(400)), shards=4, alias="sq")
        assert set(a.locations()) == {c.backends[0]}
        c.add_backend()
        c.add_backend()
        moves = a.rebalance()
        assert len(moves) == 2 and {m[2] for m in moves} == set(c.backends[1:])
        counts = {b: a.locations().count(b) for b in c.backends}
        assert sorted(counts.values()) == [1, 1, 2]
        assert a.rebalance() == []  # already even
        np.testing.assert_array_equal(a.to_numpy(), x)
        # Tasks follow the blocks to their new backends.
        pids = _pids()
        for part, (pid, _) in zip(a.partitions(), wait_on(a.map_blocks(lambda b: (os.getpid(), 0)))):
            assert pid == pids[part.backend]
        # A handle opened elsewhere sees the new owners in the manifest.
        assert ShardedArray.load("grow").locations() == a.locations()
        assert [p.backend for p in ShardedArray.load("grow").partitions()] == a.locations()
        d.rebalance()
        assert len(set(d.locations())) == 3 and d[20] == 400 and len(d) == 400
        # Before a backend leaves: rebalance onto the others.
        keep = c.backends[:2]
        a.rebalance(keep)
        assert set(a.locations()) <= set(keep)
        np.testing.assert_array_equal(a.to_numpy(), x)


@pytest.mark.slow
def test_a_slice_fetches_only_the_blocks_it_touches(tmp_path):
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c")) as c:
        c.client.settings = c.client.settings.replace(reconnect_timeout=1.0)
        b0, b1 = c.backends
        x = np.arange(4000, dtype=np.int64).reshape(1000, 4)
        a = ShardedArray.from_numpy(x, shards=4, placement=[b0, b0, b1, b1])
        c.process_of(b1).stop()  # rows 500-999 are unreachable now
        np.testing.assert_array_equal(a[:500], x[:500])
        np.testing.assert_array_equal(a[10:480:7, 2], x[10:480:7, 2])
        np.testing.assert_array_equal(a[499], x[499])
        with pytest.raises(BackendUnavailable):
            a[400:600]
        c.process_of(b1).start()
        np.testing.assert_array_equal(a[400:600], x[400:600])


@pytest.mark.slow
def test_collections_survive_a_kill_and_restart_of_every_backend(tmp_path):
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c")) as c:
        x = np.random.default_rng(4).normal(size=(3000, 7))
        a = ShardedArray.from_numpy(x, shards=4, alias="kept")
        g = ShardedArray.from_function(_rows, 500, 2, args=(2,), alias="made")
        made = g.to_numpy()
        d = StorageDict.from_iterable({f"k{i}": [i] * 3 for i in range(300)}, shards=3, alias="kept-dict")
        d["late"] = "set after creation"
        wait_on(a.update_blocks(np.negative))
        before = a.locations()
        for b in c.backends:
            c.restart(b, kill=False)
        a2 = ShardedArray.load("kept")
        assert a2.getID() == a.getID() and a2.locations() == before
        np.testing.assert_array_equal(a2.to_numpy(), -x)
        np.testing.assert_array_equal(ShardedArray.load("made").to_numpy(), made)
        d2 = StorageDict.load("kept-dict")
        assert len(d2) == 301 and d2["k299"] == [299] * 3 and d2["late"] == "set after creation"
        # And after kill -9: every acknowledged write is in the redo log.
        d2["after"] = 1
        for b in c.backends:
            c.restart(b, kill=True)
        assert StorageDict.load("kept-dict")["after"] == 1
        np.testing.assert_array_equal(ShardedArray.load("kept")[:100], -x[:100])
