"""What keeps same-host copies at one memcpy: page tables filled ahead, mappings reused.

Counted, not timed: the minor page faults a backend takes for a copy-on-write
into its ready spare, the mapping a client keeps of a segment it filled (and
drops once the file is gone), and the big-record O_DIRECT write that goes
from a page-aligned buffer's own memory. See store/_client/shm.py,
store/backend/_storage/segments.py and store/backend/_storage/direct.py.
"""

from __future__ import annotations

import gc
import mmap
import os
import time

import numpy as np
import pytest

from store import LocalCluster, StorageObject
from store._client import shm
from store.backend._storage import direct, storage

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")]

MiB = 1 << 20


class Slab(StorageObject):
    def __init__(self, data):
        self.data = data

    def bump(self):
        self.data += 1.0


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s")
        time.sleep(0.05)


def minflt(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_a_change_after_a_read_copies_into_a_mapped_spare_without_a_fault_per_page(tmp_path):
    size = 64 * MiB
    pages = size // mmap.PAGESIZE
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), durability="none") as c:
        s = Slab(np.zeros(size // 8))
        s.make_persistent()
        s.bump()  # the backend's mapping is populated
        bid = s.get_location()
        view = s.data  # leased: the next change copies aside
        # The lease readied a spare, mapped with its page tables filled, off the path.
        wait_for(lambda: c.client.shm_report(bid)["pool_bytes"] >= size)
        time.sleep(0.3)
        pid = c.processes[0].pid
        before = minflt(pid)
        s.bump()
        faults = minflt(pid) - before
        assert c.client.shm_report(bid)["relocations"] == 1
        # Mapping the copy then would take a fault per page of a cleared file (16384
        # here), or one per 16 pages of a written one (1024, the kernel maps around
        # a fault); into the ready spare the copy takes none, and the call itself a
        # handful.
        assert faults < pages // 32, faults
        assert view[0] == 1.0 and view[-1] == 1.0  # the reader's snapshot, untouched
        assert s.data[0] == 2.0 and s.data[-1] == 2.0
        del view


def _filled() -> set:
    with shm._fills_lock:
        return set(shm._fills)


def test_a_put_into_a_reused_segment_fills_it_through_the_kept_mapping(tmp_path):
    size = 16 * MiB
    shm.forget_fills()
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), durability="none") as c:
        first = Slab(np.full(size // 8 + 17, 1.0))  # a size of its own
        first.make_persistent()
        bid = first.get_location()
        first.delete_persistent()  # its segment is free, in the pool
        wait_for(lambda: c.client.shm_report(bid)["pool_segments"] >= 1)
        second = Slab(np.full(size // 8 + 17, 2.0))
        second.make_persistent()  # claims it, maps it once, keeps that
        kept = _filled()
        assert len(kept) == 1
        second.delete_persistent()
        wait_for(lambda: c.client.shm_report(bid)["pool_segments"] >= 1)
        third = Slab(np.full(size // 8 + 17, 3.0))
        third.make_persistent()  # the same file, through the same mapping
        assert _filled() == kept
        assert np.array_equal(third.data, np.full(size // 8 + 17, 3.0))
        del third
        gc.collect()
    # The backend stopped and unlinked its segments: the client's mapping would be all
    # that keeps those pages, so it goes too.
    wait_for(lambda: not _filled(), timeout=10.0)
    inodes = {ino for _, ino in kept}
    with open("/proc/self/maps") as f:
        assert not [line for line in f if len(line.split()) > 4 and int(line.split()[4]) in inodes]


def _direct_ok(directory: str) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(os.path.join(directory, "probe"), os.O_WRONLY | os.O_CREAT | flag, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(os.path.join(directory, "probe"))
    return True


@pytest.mark.parametrize("layout", ["aligned", "mixed", "unaligned"])
def test_a_big_record_written_from_its_own_memory_decodes_byte_for_byte(tmp_path, layout):
    if not _direct_ok(str(tmp_path)):
        pytest.skip("this filesystem refuses O_DIRECT")
    big = mmap.mmap(-1, direct.CHUNK * 2 + 3 * 4096 + 100)  # page-aligned, odd tail
    big[:] = np.random.default_rng(1).integers(0, 255, len(big), dtype=np.uint8).tobytes()
    odd = memoryview(big)[7 : direct.CHUNK + 7]  # not page-aligned
    parts = {"aligned": [big], "mixed": [b"x" * 100, odd, big], "unaligned": [odd]}[layout]
    rec = storage.Record("obj", "k#1", "alias", b"payload", list(parts))
    rec.lsn = 9
    path = str(tmp_path / "record")
    header = storage.record_header(rec)
    assert direct.write(path, storage._PREFIX, storage._MAGIC, header, [rec.payload] + list(parts), os.fsync)
    with open(path, "rb") as f:
        data = f.read()
    got, end = storage.decode(memoryview(data))
    assert end == len(data)
    assert (got.object_id, got.class_key, got.alias, got.lsn) == ("obj", "k#1", "alias", 9)
    assert bytes(got.payload) == b"payload"
    assert [bytes(b) for b in got.buffers] == [bytes(memoryview(p).cast("B")) for p in parts]
    hlen = storage._PREFIX.unpack_from(data, 0)[1]
    if layout == "aligned":  # the header padded so that the buffer starts on a page
        assert (storage._PREFIX.size + hlen + len(b"payload")) % 4096 == 0
    elif layout == "unaligned":
        assert hlen == len(header)  # nothing to align: the header as encode writes it
    del got, odd, parts, rec
    gc.collect()
