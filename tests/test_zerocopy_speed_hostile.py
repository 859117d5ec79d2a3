"""Hostile review of the zero-copy speed changes (issue 19): ready spares and the
background teardown of copy-on-write, the client's kept mappings of filled segments,
and the O_DIRECT write of big sync records.

Real processes only: LocalCluster backends on loopback, clients in child processes.
A test whose comment says FAILED broke on the reviewed tree; the others are probes
that passed.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import store
from chaos import restart_backend
from hostilelib import backend_pid, own_cluster, wait_for
from store import StorageObject
from store._client import shm
from test_zerocopy import Grid

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")]

MiB = 1 << 20
N = 4 * MiB  # float64: 32 MiB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}:{TESTS}"}


class Pair(StorageObject):
    """Holds an array it may share with another object on its backend."""

    def __init__(self, data):
        self.data = data

    def take(self, other):
        self.data = other.data  # a local call: the same array, by reference

    def bump(self, k=1.0):
        self.data += k

    def bump_half(self, second):
        half = self.data.size // 2
        if second:
            self.data[half:] += 1.0
        else:
            self.data[:half] += 1.0

    def fail_midway(self):
        self.data += 100.0
        raise ValueError("midway")

    def head(self):
        return float(self.data[0])


def shm_entries(*pids: int) -> set[str]:
    """Segments in /dev/shm named by these processes (others' tests share /dev/shm)."""
    marks = tuple(f"{shm.PREFIX}{p}-" for p in pids)
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(marks)}


def fds(pid: int) -> int:
    """Files in /dev/shm a process holds open (sockets and pipes come and go)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(shm.SHM_DIR)
        except OSError:
            continue
    return n


def test_puts_in_a_row_through_kept_mappings_never_overwrite_an_object(tmp_path):
    with own_cluster(tmp_path, 1, "none"):
        objs = []
        for k in range(12):
            g = Grid(np.full(N, float(k)))
            g.make_persistent()
            objs.append(g)
            if k % 3 == 2:  # frees a segment for the next put
                objs[k - 1].delete_persistent()
                objs[k - 1] = None
        for k, g in enumerate(objs):
            if g is None:
                continue
            v = g.data
            assert float(v.min()) == float(k) == float(v.max()), (k, float(v.min()))


def test_many_copy_on_writes_in_a_row_keep_every_view_and_leak_nothing(tmp_path):
    with own_cluster(tmp_path, 1, "none") as c:
        g = Grid(np.zeros(N))
        g.make_persistent()
        pid = backend_pid(c, g.get_location())
        views = []
        for k in range(6):  # warm up
            views.append(g.data)
            g.bump()
        del views
        gc.collect()
        time.sleep(1.5)
        base_fd, base_shm = fds(pid), len(shm_entries(pid, os.getpid()))
        held = []
        for k in range(40):
            v = g.data
            held.append((v, float(k + 6)))
            g.bump()
            if len(held) > 3:
                held.pop(0)
            for view, want in held:
                assert float(view.min()) == want == float(view.max()), (k, want)
        assert g.head() == 46.0
        del held, v, view
        gc.collect()
        time.sleep(2.5)
        c.client.shm_report(g.get_location())
        assert fds(pid) <= base_fd + 2, (base_fd, fds(pid))
        assert len(shm_entries(pid, os.getpid())) <= base_shm + 2, (base_shm, shm_entries(pid))


def test_two_objects_sharing_an_array_changed_at_once_leave_reads_current(tmp_path):
    # FAILED before the fix: both changes found the shared segment leased and each
    # copied it aside; the second copy, taken while the first change was writing, was
    # swapped in over it, and the first change was lost.
    with own_cluster(tmp_path, 1, "none"):
        a = Pair(np.zeros(N))
        a.make_persistent()
        b = Pair(np.zeros(10))
        b.make_persistent()
        b.take(a)
        for k in range(15):
            view = a.data  # leased: both changes want a copy aside
            errs = []

            def change(o):
                try:
                    o.bump_half(o is b)  # each its own half: no race of theirs
                except Exception as exc:  # noqa: BLE001
                    errs.append(exc)

            ts = [threading.Thread(target=change, args=(o,)) for o in (a, b)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            assert not errs, errs
            assert float(view.min()) == float(k) == float(view.max())
            now = a.data
            assert float(now.min()) == float(k + 1) == float(now.max()), (
                f"round {k}: a change lost: {float(now.min())}..{float(now.max())}"
            )
            del view, now


def test_a_change_that_raises_after_a_read_rolls_back_and_keeps_the_view(tmp_path):
    with own_cluster(tmp_path, 1, "sync"):
        a = Pair(np.zeros(N))
        a.make_persistent()
        for k in range(5):
            view = a.data
            with pytest.raises(Exception):
                a.fail_midway()
            assert float(view.max()) == float(k) == float(view.min())
            got = a.data
            assert float(got.min()) == float(got.max()), (float(got.min()), float(got.max()))
            a.bump(1.0)
            del view, got


_SYNC_PUT = r"""
import sys, numpy as np, store
from test_zerocopy import Grid
store.connect(sys.argv[1], sys.argv[2])
a = np.arange(%d, dtype=np.float64)
g = Grid(a)
g.make_persistent(alias=sys.argv[3])
a[:] = -1.0                              # the user's memory changes after the return
z = store.zeros(%d)
z[:] = 5.0
h = Grid(z)
h.make_persistent(alias=sys.argv[3] + "-z")
z[:] = -2.0
print("done", g.get_location(), flush=True)
"""


def test_a_sync_put_of_a_big_object_survives_kill_9_exactly(tmp_path):
    n = 9 * MiB  # 72 MiB: a big record, written with O_DIRECT
    with own_cluster(tmp_path, 1, "sync") as c:
        for round_ in range(2):
            alias = f"speed-sync-{round_}"
            script = tmp_path / "put.py"
            script.write_text(_SYNC_PUT % (n, n))
            r = subprocess.run(
                [sys.executable, str(script), c.address, c.token, alias],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=ENV,
                timeout=120,
            )
            assert r.stdout.startswith("done"), (r.stdout, r.stderr[-800:])
            bid = r.stdout.split()[1]
            old = backend_pid(c, bid)
            view = store.get_by_alias(alias).data  # leased: the backend readies a spare
            wait_for(
                lambda: [n for n in shm_entries(old) if f"-{shm.SPARE_MARK}" in n], timeout=10, what="a spare made"
            )
            restart_backend(c, bid, kill=True)
            del view
            wait_for(lambda: not shm_entries(old), timeout=10, what="the killed backend's segments and spares removed")
            back = store.get_by_alias(alias).data
            assert np.array_equal(back, np.arange(n, dtype=np.float64))
            z = store.get_by_alias(alias + "-z").data
            assert float(z.min()) == 5.0 == float(z.max())


_PUTTER = r"""
import sys, numpy as np, store
from test_zerocopy import Grid
store.connect(sys.argv[1], sys.argv[2])
me = int(sys.argv[3])
n = %d
objs = {}
for k in range(10):
    value = float(me * 100 + k)
    g = Grid(np.full(n + me * 512, value))       # two sizes: each claims the other's too
    g.make_persistent()
    objs[k] = g
    if k %% 2:
        objs.pop(k - 1).delete_persistent()       # its segment goes back to the pool
    for j, o in objs.items():
        v = o.data
        want = float(me * 100 + j)
        if not (float(v.min()) == want == float(v.max())):
            print("overwritten", j, float(v.min()), float(v.max()), flush=True)
            sys.exit(1)
        del v
print("ok", flush=True)
"""


def test_two_clients_putting_and_deleting_never_overwrite_each_other(tmp_path):
    with own_cluster(tmp_path, 1, "none") as c:
        script = tmp_path / "putter.py"
        script.write_text(_PUTTER % N)
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), c.address, c.token, str(me)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=ENV,
            )
            for me in (1, 2)
        ]
        outs = [p.communicate(timeout=240) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0 and out.startswith("ok"), (out, err[-800:])


def mapped_segments(pid: int) -> list[str]:
    """The claypot segments a process maps (deleted files included)."""
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split(None, 5)[5].strip() for line in f if "/dev/shm/claypot" in line})


def test_delete_and_move_racing_spare_preparation_leak_nothing(tmp_path):
    with own_cluster(tmp_path, 2, "none") as c:
        ids = [p.backend_id for p in c.processes]
        pids = [backend_pid(c, b) for b in ids]
        base = {p: fds(p) for p in pids}
        before = shm_entries(os.getpid(), *pids)  # the backends' change-word tables
        for k in range(12):
            g = Grid(np.full(N, float(k)))
            g.make_persistent(backend=ids[0])
            v = g.data  # first lease: a spare is being made
            if k % 2:
                g.move(ids[1])
                g.bump()
                assert g.head() == k + 1.0
            g.delete_persistent()  # while the spare may still be made
            assert float(v.min()) == float(k) == float(v.max())
            del v
        gc.collect()

        def settled():
            left = shm_entries(os.getpid(), *pids) - before
            pooled = sum(c.client.shm_report(b)["pool_segments"] for b in ids)
            segs = sum(c.client.shm_report(b)["segments"] for b in ids)
            return (left, pooled) if segs == 0 and len(left) == pooled else None

        try:
            left, pooled = wait_for(settled, timeout=10, what="only pooled segments left")
        except AssertionError:
            raise AssertionError(
                (shm_entries(os.getpid(), *pids) - before, [c.client.shm_report(b) for b in ids])
            ) from None
        for p in pids:
            # A move's sender fills the target's free segments like any client, and
            # keeps its mappings of up to four (files the target keeps or pools).
            assert fds(p) <= base[p] + shm._FILLS_MAX, (base[p], shm_files_held(p))
            wait_for(
                lambda: not [m for m in mapped_segments(p) + shm_files_held(p) if m.endswith("(deleted)")],
                timeout=5,
                what=f"backend {p} lets go of unlinked segments",
            )


def test_kept_client_mappings_go_once_the_backend_unlinks_their_files(tmp_path):
    with own_cluster(tmp_path, 1, "none"):
        objs = []
        for k in range(6):
            g = Grid(np.full(N, float(k)))
            g.make_persistent()
            objs.append(g)
            if k % 2:
                objs[-2].delete_persistent()  # the next put claims its segment
        held = [f for f in shm_files_held(os.getpid())]
        assert held, "no kept mapping: the put did not go through a reused segment"
    # The cluster stopped: every segment is unlinked; the kept mappings must follow.
    wait_for(
        lambda: not [f for f in shm_files_held(os.getpid()) if f.endswith("(deleted)")],
        timeout=5,
        what="kept mappings of unlinked segments dropped",
    )


def shm_files_held(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{shm.SHM_DIR}/{shm.PREFIX}"):
            out.append(target)
    return out


_FORKER = r"""
import os, sys, time, numpy as np, store
from store import shm
from test_zerocopy import Grid
N = %d
store.connect(sys.argv[1], sys.argv[2])
a = Grid(np.full(N, 1.0))
a.make_persistent()
for _ in range(2):                  # the second put fills a free segment: a kept mapping
    b = Grid(np.full(N, 2.0))
    b.make_persistent()
    b.delete_persistent()           # its segment back in the backend's pool
    time.sleep(0.3)
assert shm._fills, "no kept mapping to inherit"
pid = os.fork()
if pid == 0:                        # the child inherits the parent's kept mappings
    try:
        store.connect(sys.argv[1], sys.argv[2])
        Grid(np.full(N, 3.0)).make_persistent(alias="speed-forked")
        os._exit(0)
    except BaseException as exc:
        print("child", repr(exc), flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
d = Grid(np.full(N, 4.0))
d.make_persistent()
for o, want in ((a, 1.0), (d, 4.0), (store.get_by_alias("speed-forked"), 3.0)):
    v = o.data
    print(float(v.min()), float(v.max()), want, flush=True)
print("status", status, flush=True)
"""


def test_a_forked_child_and_its_parent_put_after_the_fork_without_overwriting(tmp_path):
    # Forked in a fresh interpreter: forking this test process (gRPC threads) is unsafe.
    with own_cluster(tmp_path, 1, "none") as c:
        script = tmp_path / "forker.py"
        script.write_text(_FORKER % N)
        r = subprocess.run(
            [sys.executable, str(script), c.address, c.token],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=ENV,
            timeout=120,
        )
        lines = r.stdout.splitlines()
        assert lines[-1:] == ["status 0"], (r.stdout, r.stderr[-800:])
        for line in lines[:-1]:
            lo, hi, want = line.split()
            assert lo == hi == want, r.stdout


_FORK_IDLE = r"""
import os, sys, time, numpy as np, store
from store import shm
from test_zerocopy import Grid
N = %d
store.connect(sys.argv[1], sys.argv[2])
for _ in range(2):                  # the second put fills a free segment: a kept mapping
    b = Grid(np.full(N, 2.0))
    b.make_persistent()
    b.delete_persistent()
    time.sleep(0.3)
assert shm._fills, "no kept mapping to inherit"
pid = os.fork()
if pid == 0:                        # a worker that never puts anything
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)                # the test reads the parent's output to its end
    os.dup2(null, 2)
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
"""


def test_a_forked_child_that_never_puts_does_not_pin_unlinked_segments(tmp_path):
    # FAILED before the fix. A parent that put big arrays forks workers (a multiprocessing pool): each child
    # inherits the kept mappings (and their open files), but no watcher runs in it.
    # Once the backend unlinks those files, the children must not keep their pages.
    child = 0
    try:
        with own_cluster(tmp_path, 1, "none") as c:
            script = tmp_path / "idle.py"
            script.write_text(_FORK_IDLE % N)
            r = subprocess.run(
                [sys.executable, str(script), c.address, c.token],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=ENV,
                timeout=120,
            )
            assert r.returncode == 0, (r.stdout, r.stderr[-800:])
            child = int(r.stdout.split()[0])
        # The cluster stopped: its segments are unlinked.
        wait_for(
            lambda: not [f for f in shm_files_held(child) if f.endswith("(deleted)")],
            timeout=5,
            what="the idle child's inherited mappings dropped",
        )
    finally:
        if child:
            try:
                os.kill(child, 9)
            except ProcessLookupError:
                pass


def test_a_big_record_written_while_a_sharing_object_changes_its_array_loads_after_kill_9(tmp_path):
    # FAILED before the fix (ObjectCorrupt). A big object's checkpoint goes to the disk
    # from its own memory (O_DIRECT) while a
    # checksum thread reads the same memory; another object holding the same array (a
    # local call passed it by reference) changes it meanwhile. The record must still
    # load after a crash (a torn state is what two unsynchronised writers get; a record
    # whose checksum fails is an object lost).
    n = 9 * MiB  # 72 MiB: big, written with O_DIRECT
    with own_cluster(tmp_path, 1, "sync") as c:
        a = Pair(np.zeros(n))
        a.make_persistent(alias="speed-shared-a")
        b = Pair(np.zeros(10))
        b.make_persistent(alias="speed-shared-b")
        b.take(a)
        stop = threading.Event()

        def loop(o, second):
            while not stop.is_set():
                o.bump_half(second)

        ts = [threading.Thread(target=loop, args=(o, s)) for o, s in ((a, False), (b, True))]
        for t in ts:
            t.start()
        time.sleep(5)  # several write-behind checkpoints
        stop.set()
        for t in ts:
            t.join(60)
        restart_backend(c, a.get_location(), kill=True)
        for alias in ("speed-shared-a", "speed-shared-b"):
            d = store.get_by_alias(alias).data  # ObjectCorrupt before the fix
            assert d.shape == (n,)
