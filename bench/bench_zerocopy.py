"""Same-host numpy through claypot's shared memory, beside Ray's object store and memcpy.

Run: ``python -m bench.bench_zerocopy [--quick]``. Prints one JSON document.

For 64 MiB and 1 GiB float64 arrays (``--quick``: 64 and 256 MiB), in one run:

- ``memcpy``: ``np.copyto`` into a preallocated array, one thread (claypot's big
  copies use up to four, as Ray's store does, so a put may beat it);
- claypot, durability ``none`` (only the transfer counts):
  - ``put_fresh``: ``make_persistent`` of an object holding an ordinary array
    into a backend with no free segment (one write into new shared memory);
  - ``put``: the same once an earlier object was deleted (its segment is free
    and reused: one memcpy), as Ray's reused-memory figure;
  - ``put_shm``: the same with an array built by ``store.empty`` (no copy);
  - ``get``: reading the attribute again while an earlier read's view is held
    and the object is unchanged: answered in this process, no RPC
    (store/_client/readcache.py), as Ray's ``get``;
  - ``get_rpc``: a read with no earlier view held (its lease returned, the
    spare the first lease readies made): one RPC, a new lease, a read-only
    view mapped (no copy);
  - ``change_after_read``: a method that adds 1 to the whole array, right after
    a read, against the same method once no reader holds its pages
    (``change_again``): the difference (``cow_copy``) is what copy-on-write
    costs, beside a memcpy of the array. Right after the first read the
    segment's spare is still being made (its pages cleared by the kernel);
    ``change_after_read_spare`` is the same once it is ready (a copy into
    pages that exist and that the backend mapped ahead, as a later read and
    change would find it; best of three), with the backend's minor page
    faults during it (``change_after_read_spare_faults``) and its copy over a
    memcpy timed just before it (``cow_copy_spare_vs_adjacent_memcpy``);
- claypot, durability ``sync``: ``put`` of the same array (on disk before it
  returns; into a fresh backend, so it includes ``put_fresh``'s transfer) and
  ``sync_put_reused`` (into reused shared memory, as ``put``: a memcpy and the
  durable write), beside
  a dd-like direct write (O_DIRECT, 16 MiB blocks, fsync) of as many bytes into
  the same directory: the disk's sequential speed; and the checkpoint write
  alone (``checkpoint_write``: the O_DIRECT path a big object takes under
  ``sync``) beside the buffered write it replaced;
- Ray, when it is importable (``pip install ray``; the ``bench`` extra):
  ``ray.put`` into a fresh store and into memory it used before, and
  ``ray.get`` (a read-only view). Absent, the JSON says so.

Ratios compare each claypot figure with its counterpart.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import tempfile
import time

import numpy as np

import store
from bench.common import machine
from store import LocalCluster, StorageObject
from store._model.objects import readonly

MiB = 1 << 20


class Block(StorageObject):
    """One array, and the methods the figures need."""

    def __init__(self, data):
        self.data = data

    def add_one(self):
        self.data += 1.0

    @readonly
    def first(self):
        return float(self.data[0])


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def _memcpy_seconds(src: np.ndarray) -> float:
    """np.copyto into an array allocated once (warm after the first of three)."""
    dst = np.empty_like(src)
    return _best(lambda: np.copyto(dst, src), 3)


def _direct_write_rate(directory: str, nbytes: int) -> float:
    """dd if=/dev/zero bs=16M oflag=direct conv=fsync, in Python: the disk's sequential rate."""
    block = 16 * MiB
    buf = mmap.mmap(-1, block)
    buf.write(b"\1" * block)
    path = os.path.join(directory, "dd-probe")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0)
    fd = os.open(path, flags, 0o600)
    try:
        t = time.perf_counter()
        for off in range(0, nbytes, block):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
        return _mbps(nbytes, time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
        buf.close()


def claypot_figures(nbytes: int, src: np.ndarray, repeat: int) -> dict:
    out: dict = {}
    with LocalCluster(backends=1, durability="none") as cluster:

        def put():
            b = Block(src)
            b.make_persistent()
            return b

        warm = Block(np.ones(1024))  # class registered, host identity known
        warm.make_persistent()
        t = time.perf_counter()
        first = put()  # no free segment yet: fresh pages
        out["put_fresh_s"] = round(time.perf_counter() - t, 4)
        out["put_fresh_MBps"] = _mbps(nbytes, out["put_fresh_s"])
        blocks = [first]

        def timed_put():
            # As with Ray's reused store memory: the previous object is gone, and its
            # segment is free for this one.
            blocks.pop().delete_persistent()
            t = time.perf_counter()
            blocks.append(put())
            return time.perf_counter() - t

        out["put_s"] = round(min(timed_put() for _ in range(repeat)), 4)
        out["put_MBps"] = _mbps(nbytes, out["put_s"])
        b = blocks[-1]

        made = []

        def timed_put_shm():
            a = made.pop()
            x = Block(a)
            t = time.perf_counter()
            x.make_persistent()
            dt = time.perf_counter() - t
            x.delete_persistent()
            return dt

        shm_times = []
        for _ in range(repeat):
            a = store.empty(src.shape, src.dtype)
            np.copyto(a, src)  # the user builds the array in shared memory
            made.append(a)
            shm_times.append(timed_put_shm())
            del a
        out["put_shm_s"] = round(min(shm_times), 5)
        out["put_shm_MBps"] = _mbps(nbytes, out["put_shm_s"])

        views = []

        def get():
            views.append(b.data)

        out["get_s"] = round(_best(get, repeat * 2), 5)
        assert not views[-1].flags.writeable, "the read was not a leased view"
        views.clear()
        gc.collect()
        cache = store.client().__dict__.get("read_cache")
        out["get_reused_reads"] = cache.reused if cache is not None else 0

        client = store.client()
        bid = b.get_location()
        deadline = time.monotonic() + 30  # the first lease's spare made (in the background)
        while client.shm_report(bid)["pool_bytes"] < nbytes and time.monotonic() < deadline:
            time.sleep(0.05)
        rpc_times = []
        for _ in range(repeat * 2):
            gc.collect()  # no earlier view held: a new lease by RPC
            client.lease_returns.flush()  # and its lease returned: one RPC in flight
            t = time.perf_counter()
            v = b.data
            rpc_times.append(time.perf_counter() - t)
            del v
        out["get_rpc_s"] = round(min(rpc_times), 5)

        view = b.data
        out["change_after_read_s"] = round(_best(b.add_one, 1), 4)
        out["change_again_s"] = round(_best(b.add_one, 1), 4)
        out["view_unchanged"] = bool(view[0] == src[0])
        del view
        out["cow_copy_s"] = round(max(0.0, out["change_after_read_s"] - out["change_again_s"]), 4)
        pid = cluster.processes[0].pid

        scratch = [np.empty_like(src)]
        np.copyto(scratch[0], src)

        def spare_cycle() -> tuple[float, float, int, float]:
            gc.collect()
            client.lease_returns.flush()
            deadline = time.monotonic() + 30  # the old copy's lease back: the pool holds it
            while client.shm_report(bid)["pool_bytes"] < nbytes and time.monotonic() < deadline:
                time.sleep(0.05)
            view = b.data
            deadline = time.monotonic() + 30  # the spare is ready (mapped, off the path)
            while client.shm_report(bid)["pool_bytes"] < nbytes and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            t = time.perf_counter()  # a memcpy beside it, on the machine as it is now
            np.copyto(scratch[0], src)
            memcpy = time.perf_counter() - t
            faults = _minflt(pid)
            t = time.perf_counter()
            b.add_one()
            after_read = time.perf_counter() - t
            faults = _minflt(pid) - faults
            time.sleep(0.2)  # the old mapping's teardown, in the background
            t = time.perf_counter()
            b.add_one()
            again = time.perf_counter() - t
            del view
            return after_read, again, faults, memcpy

        cycles = [spare_cycle() for _ in range(repeat)]
        scratch.clear()
        # Each cycle's copy aside over the memcpy timed just before it (the machine is
        # shared: its memory bandwidth changes from one second to the next).
        out["cow_copy_spare_vs_adjacent_memcpy"] = round(min(max(0.0, a - b) / m for a, b, _, m in cycles), 2)
        out["change_after_read_spare_s"] = round(min(c[0] for c in cycles), 4)
        out["change_again_2_s"] = round(min(c[1] for c in cycles), 4)
        out["change_after_read_spare_faults"] = min(c[2] for c in cycles)
        out["cow_copy_spare_s"] = round(max(0.0, out["change_after_read_spare_s"] - out["change_again_2_s"]), 4)
        b.delete_persistent()
    return out


def _minflt(pid: int) -> int:
    """Minor page faults of process ``pid`` so far (field 10 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def sync_figures(nbytes: int, src: np.ndarray) -> dict:
    data_dir = tempfile.mkdtemp(prefix="claypot-bench-", dir=os.environ.get("BENCH_DISK_DIR"))
    out: dict = {}
    with LocalCluster(backends=1, durability="sync", data_dir=data_dir):
        warm = Block(np.ones(1024))
        warm.make_persistent()
        b = Block(src)
        t = time.perf_counter()
        b.make_persistent()
        out["sync_put_s"] = round(time.perf_counter() - t, 4)
        out["sync_put_MBps"] = _mbps(nbytes, out["sync_put_s"])
        b.delete_persistent()
        # Into reused shared memory (the deleted object's segment is free), as `put`:
        # the memcpy and the durable write.
        times = []
        for _ in range(2):
            b = Block(src)
            t = time.perf_counter()
            b.make_persistent()
            times.append(time.perf_counter() - t)
            b.delete_persistent()
        out["sync_put_reused_s"] = round(min(times), 4)
        out["sync_put_reused_MBps"] = _mbps(nbytes, out["sync_put_reused_s"])
        out["dd_direct_MBps"] = _direct_write_rate(data_dir, nbytes)
        out["sync_put_vs_dd_direct"] = round(out["sync_put_MBps"] / out["dd_direct_MBps"], 3)
        out["sync_put_reused_vs_dd_direct"] = round(out["sync_put_reused_MBps"] / out["dd_direct_MBps"], 3)
        # The backend's own sync write of this record (storage.write_checkpoint's O_DIRECT
        # path), alone, from a page-aligned buffer as a kept segment is, beside the old
        # one (encode into one buffer, write, fsync).
        from store.backend._storage import direct, storage

        aligned = mmap.mmap(-1, nbytes)
        np.copyto(np.frombuffer(aligned, dtype=src.dtype), src)
        rec = storage.Record("bench", "k#1", "", b"p", [memoryview(aligned)])
        rec.lsn = 1
        path = os.path.join(data_dir, "ckpt-probe")
        t = time.perf_counter()
        direct.write(
            path,
            storage._PREFIX,
            storage._MAGIC,
            storage.record_header(rec),
            [rec.payload] + list(rec.buffers),
            os.fsync,
        )
        out["checkpoint_write_MBps"] = _mbps(nbytes, time.perf_counter() - t)
        os.unlink(path)
        t = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        storage._write_all(fd, [storage.encode(rec)])
        os.fsync(fd)
        os.close(fd)
        out["checkpoint_write_buffered_MBps"] = _mbps(nbytes, time.perf_counter() - t)
        os.unlink(path)
        out["checkpoint_write_vs_dd_direct"] = round(out["checkpoint_write_MBps"] / out["dd_direct_MBps"], 3)
        out["checksum"] = "isal" if direct.crc32 is not __import__("zlib").crc32 else "zlib"
    return out


def ray_figures(nbytes: int, src: np.ndarray, repeat: int) -> dict:
    import ray

    out: dict = {}
    ray.init(
        num_cpus=1,
        object_store_memory=max(3 * nbytes, 256 * MiB),
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        t = time.perf_counter()
        ref = ray.put(src)
        out["ray_put_fresh_s"] = round(time.perf_counter() - t, 4)
        del ref
        refs = []

        def put():
            refs.append(ray.put(src))
            if len(refs) > 1:
                del refs[0]  # its memory goes back to the store for the next put

        out["ray_put_reused_s"] = round(_best(put, repeat + 1), 4)
        views = []

        def get():
            views.append(ray.get(refs[-1]))

        out["ray_get_s"] = round(_best(get, repeat * 2), 5)
        views.clear()
        refs.clear()
    finally:
        ray.shutdown()
    out["ray_put_fresh_MBps"] = _mbps(nbytes, out["ray_put_fresh_s"])
    out["ray_put_reused_MBps"] = _mbps(nbytes, out["ray_put_reused_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [64 * MiB, 256 * MiB] if args.quick else [64 * MiB, 1024 * MiB]
    repeat = 3
    import importlib.util

    have_ray = importlib.util.find_spec("ray") is not None
    import psutil

    result: dict = {
        "machine": machine(numpy=np.__version__, memory_GiB=round(psutil.virtual_memory().total / 2**30, 1)),
        "ray": ("present: " + __import__("ray").__version__)
        if have_ray
        else "absent (pip install ray, or the bench extra): no Ray figures",
        "sizes": [],
    }
    for nbytes in sizes:
        src = np.random.default_rng(0).random(nbytes // 8)
        row: dict = {"bytes": nbytes}
        row["memcpy_s"] = round(_memcpy_seconds(src), 4)
        row["memcpy_MBps"] = _mbps(nbytes, row["memcpy_s"])
        row.update(claypot_figures(nbytes, src, repeat))
        row["cow_copy_vs_memcpy"] = round(row["cow_copy_s"] / row["memcpy_s"], 2)
        row["cow_copy_spare_vs_memcpy"] = round(row["cow_copy_spare_s"] / row["memcpy_s"], 2)
        row["put_vs_memcpy"] = round(row["put_MBps"] / row["memcpy_MBps"], 3)
        row.update(sync_figures(nbytes, src))
        if have_ray:
            row.update(ray_figures(nbytes, src, repeat))
            row["get_vs_ray_get"] = round(row["get_s"] / row["ray_get_s"], 2)
            row["get_rpc_vs_ray_get"] = round(row["get_rpc_s"] / row["ray_get_s"], 2)
            row["put_vs_ray_put_reused"] = round(row["put_MBps"] / row["ray_put_reused_MBps"], 3)
            row["put_shm_vs_ray_put_reused"] = round(row["put_shm_MBps"] / row["ray_put_reused_MBps"], 3)
            row["put_vs_ray_put_fresh"] = round(row["put_MBps"] / row["ray_put_fresh_MBps"], 3)
        result["sizes"].append(row)
        del src
        gc.collect()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
