"""What durability costs, and how fast a backend stops and restarts.

Prints one JSON document:

- ``policies``: for ``sync``, ``async`` and ``none`` (one backend each, in
  one cluster, measured in interleaved rounds): sequential method calls that
  change their object,
  the same from 4 client threads (group commit shares fsyncs between them),
  read-only calls, and single-object ``make_persistent``; each rate with its
  ratio to ``none``.
- ``restart``: a backend holding ``--objects`` small objects (100,000 by
  default, created with ``make_persistent_many`` in batches of 1000):
  seconds for a graceful stop, for a start after it, for a start after
  ``kill -9``, and for the first call answered after each start.
- ``fsync_append_us``: what one small fsync'd append costs on this disk now.
- ``log_fsync``: one ~100-byte record made durable through ``Storage.write``,
  p50/p99 µs, next to a bare append plus fdatasync (and a bare write into
  reserved space plus fdatasync) in the same run, with the ratio.

Run: ``python bench/bench_durability.py [--objects N] [--calls N] [--only policies|restart|log]``.
Targets (issue 3): restart with 100k objects under 5 s, stop under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import store  # noqa: E402
from store import LocalCluster, StorageObject, readonly  # noqa: E402
from store._ops.cluster import BackendProcess  # noqa: E402


class Counter(StorageObject):
    """A counter: ``incr`` changes it (logged), ``peek`` is read-only."""

    def __init__(self):
        self.value = 0

    def incr(self):
        self.value += 1
        return self.value

    @readonly
    def peek(self):
        return self.value


class Item(StorageObject):
    """A small object (the restart test holds many of them)."""

    def __init__(self, n):
        self.n = n
        self.name = f"item-{n}"


def _rate(n: int, fn) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def _threaded_rate(threads: int, per_thread: int, fn) -> float:
    barrier = threading.Barrier(threads + 1)

    def run():
        barrier.wait()
        for _ in range(per_thread):
            fn()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return threads * per_thread / (time.perf_counter() - start)


def bench_policies(calls: int, root: str, rounds: int = 5) -> dict:
    """Call and make_persistent rates of three backends, one per policy, in one cluster.

    The policies are measured in interleaved rounds (median kept), so load
    from elsewhere on the machine hits them alike instead of skewing
    whichever policy happened to run during it.
    """
    policies = ("none", "async", "sync")
    with LocalCluster(backends=1, data_dir=os.path.join(root, "policies"), durability="none") as cl:
        ids = {"none": cl.backends[0]}
        for i, pol in enumerate(policies[1:], start=1):
            proc = BackendProcess(
                os.path.join(cl.data_dir, f"backend-{i}"), cl.redis_url, cl.token, extra_args=["--durability", pol]
            ).start()
            cl.processes.append(proc)
            ids[pol] = proc.backend_id
        counters, pools = {}, {}
        for pol in policies:
            counters[pol] = Counter()
            counters[pol].make_persistent(backend=ids[pol])
            pools[pol] = [Counter() for _ in range(4)]
            store.make_persistent_many(pools[pol], backend=ids[pol])
            for _ in range(200):  # warm up channels and code caches
                counters[pol].incr()
        samples = {pol: {} for pol in policies}
        per_round = max(calls // rounds, 50)
        for _ in range(rounds):
            for pol in policies:
                c = counters[pol]
                figures = {
                    "call_per_s": _rate(per_round, c.incr),
                    # 4 threads, 4 objects: concurrent writers share fsyncs (group commit)
                    "call_4threads_per_s": _threaded_rate_objects(pools[pol], per_round // 4),
                    "readonly_call_per_s": _rate(per_round, c.peek),
                    "make_persistent_per_s": _rate(per_round // 4, lambda: Counter().make_persistent(backend=ids[pol])),
                }
                for key, value in figures.items():
                    samples[pol].setdefault(key, []).append(value)
        for pol in policies:
            assert counters[pol].peek() == 200 + rounds * per_round
    return {pol: {k: statistics.median(v) for k, v in samples[pol].items()} for pol in policies}


def _threaded_rate_objects(objs, per_thread: int) -> float:
    it = iter(objs)
    lock = threading.Lock()
    local = threading.local()

    def call():
        obj = getattr(local, "obj", None)
        if obj is None:
            with lock:
                obj = local.obj = next(it)
        obj.incr()

    return _threaded_rate(len(objs), per_thread, call)


def bench_restart(objects: int, root: str) -> dict:
    """Stop and restart times of a backend holding ``objects`` small objects."""
    with LocalCluster(backends=1, data_dir=os.path.join(root, "restart")) as cl:
        bid = cl.backends[0]
        proc = cl.process_of(bid)
        t0 = time.perf_counter()
        items = []
        for i in range(0, objects, 1000):
            batch = [Item(n) for n in range(i, min(objects, i + 1000))]
            store.make_persistent_many(batch)
            items.append(batch[0])
        create = time.perf_counter() - t0
        wal = _wal_bytes(proc.data_dir)

        stop = proc.stop()
        start_after_stop, first_call_after_stop = _start(proc, items[-1])
        count_after_stop = _objects(bid)

        proc.kill()
        start_after_kill, first_call_after_kill = _start(proc, items[len(items) // 2])
        count_after_kill = _objects(bid)
        assert count_after_stop == count_after_kill == objects, (count_after_stop, count_after_kill)
        stop_again = proc.stop()
        start_clean, _ = _start(proc, items[0])
        return {
            "objects": objects,
            "create_s": round(create, 3),
            "create_per_s": round(objects / create),
            "log_bytes_at_stop": wal,
            "graceful_stop_s": round(stop, 3),
            "start_after_stop_s": round(start_after_stop, 3),
            "first_call_after_stop_s": round(first_call_after_stop, 3),
            "start_after_kill9_s": round(start_after_kill, 3),
            "first_call_after_kill9_s": round(first_call_after_kill, 3),
            "graceful_stop_after_restart_s": round(stop_again, 3),
            "start_after_second_stop_s": round(start_clean, 3),
            "objects_after_restart": count_after_kill,
        }


def _start(proc, probe) -> tuple[float, float]:
    """Seconds until the backend serves (ready file written), and until ``probe`` answers."""
    t0 = time.perf_counter()
    proc.start(timeout=120)
    ready = time.perf_counter() - t0
    probe.n  # first call: loads the object lazily from storage
    return ready, time.perf_counter() - t0


def _objects(backend_id: str) -> int:
    deadline = time.monotonic() + 10
    while True:
        info = [b for b in store.backends() if b.backend_id == backend_id][0]
        if info.objects or time.monotonic() > deadline:
            return info.objects
        time.sleep(0.2)


def _wal_bytes(data_dir: str) -> int:
    from store.backend._storage.storage import log_bytes

    return log_bytes(data_dir)  # records only: the open segment's reserved space left out


def _fsync_cost(root: str, n: int = 200) -> float:
    """Median microseconds of a small append plus fsync on this disk, right now.

    The sync policy pays about one of these per acknowledged write (less
    under concurrency): read its ratios against this figure, which varies a
    lot on a shared machine.
    """
    path = os.path.join(root, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 200)
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times) * 1e6


def _percentiles(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_us": round(s[len(s) // 2], 1), "p99_us": round(s[int(len(s) * 0.99)], 1), "n": len(s)}


def bench_log_fsync(root: str, rounds: int = 6, per_round: int = 400) -> dict:
    """The log's own durable write against the bare fsync'd append it is built on.

    ``storage_write``: one ~100-byte record at a time through
    ``Storage.write(..., durable=True)`` (encode, write under the lock, group
    commit's fdatasync); ``bare_append``: 100 bytes appended to a growing file
    plus fdatasync (bench_calls' ``fdatasync`` floor); ``bare_reserved``: 100
    bytes written into posix_fallocate'd space plus fdatasync. Interleaved
    rounds, so load elsewhere on the machine hits all three alike.
    """
    from store.backend._storage.storage import Record, Storage, encode

    st = Storage(os.path.join(root, "log-bench"), "sync", checkpoint_interval=3600)
    st.start()
    payload = b"p" * 100
    record_bytes = len(encode(Record("0" * 32, "bench:Rec", "", payload)))
    append_path = os.path.join(root, "append-probe")
    reserved_path = os.path.join(root, "reserved-probe")
    append_fd = os.open(append_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    reserved_fd = os.open(reserved_path, os.O_WRONLY | os.O_CREAT, 0o600)
    reserved = hasattr(os, "posix_fallocate")
    if reserved:
        os.posix_fallocate(reserved_fd, 0, 64 << 20)
        os.fsync(reserved_fd)
    samples: dict[str, list[float]] = {"storage_write": [], "bare_append": [], "bare_reserved": []}
    n = 0
    try:
        for _ in range(rounds):
            for _ in range(per_round):
                n += 1
                t = time.perf_counter()
                os.write(append_fd, payload)
                os.fdatasync(append_fd)
                samples["bare_append"].append((time.perf_counter() - t) * 1e6)
                if reserved:
                    t = time.perf_counter()
                    os.write(reserved_fd, payload)
                    os.fdatasync(reserved_fd)
                    samples["bare_reserved"].append((time.perf_counter() - t) * 1e6)
                rec = Record(f"{n:032x}", "bench:Rec", "", payload)
                t = time.perf_counter()
                st.write(rec, durable=True)
                samples["storage_write"].append((time.perf_counter() - t) * 1e6)
    finally:
        st.close()
        for fd, path in ((append_fd, append_path), (reserved_fd, reserved_path)):
            os.close(fd)
            os.unlink(path)
    out: dict = {k: _percentiles(v) for k, v in samples.items() if v}
    out["record_bytes"] = record_bytes
    base = out["bare_append"]
    out["storage_write_over_bare_append_p50"] = round(out["storage_write"]["p50_us"] / base["p50_us"], 3)
    out["storage_write_over_bare_append_p99"] = round(out["storage_write"]["p99_us"] / base["p99_us"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=100_000)
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--only", choices=["policies", "restart", "log"])
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="claypot-bench-")
    try:
        result: dict = {"fsync_append_us": round(_fsync_cost(root), 1)}
        result["log_fsync"] = bench_log_fsync(root)
        if a.only == "log":
            print(json.dumps(result, indent=2))
            return
        if a.only != "restart":
            policies = bench_policies(a.calls, root)
            base = policies["none"]
            for pol, figures in policies.items():
                for key in list(figures):
                    figures[key] = round(figures[key], 1)
                    figures[key.replace("_per_s", "_vs_none")] = round(figures[key] / base[key], 3)
            result["policies"] = {k: policies[k] for k in ("sync", "async", "none")}
        if a.only != "policies":
            result["restart"] = bench_restart(a.objects, root)
        result["targets"] = {"restart_s": 5.0, "stop_s": 1.0}
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
