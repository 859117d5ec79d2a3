"""Hostile review of same-host zero-copy (issue 19): leases, copy-on-write, store.empty.

Real processes only: LocalCluster backends on loopback, readers/creators in child
processes (some in their own PID or mount namespace, which needs root). A test
marked FAILS failed on the branch as reviewed; its comment names the guarantee it
broke and why (all pass since the fixes).
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

import store
from chaos import restart_backend
from hostilelib import backend_pid, own_cluster, wait_for
from store._client import shm
from store import StorageObject
from test_zerocopy import Grid


class Giver(StorageObject):
    def __init__(self, data):
        self.data = data

    def give(self, other):
        other.data = self.data  # a local call on the same backend: by reference


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")]

MiB = 1 << 20
N = 4 * MiB  # float64: 32 MiB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}:{TESTS}"}


def shm_files_held(pid: int) -> list[str]:
    """Files in /dev/shm a process still holds open (fds) or mapped, deleted or not."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/claypot"):
            out.append(target)
    return out


# -- leaks ----------------------------------------------------------------------------------


def test_store_zeros_segment_is_unlinked_when_the_array_is_collected():
    # FAILS: shm._made keeps made -> region alive, so the finalizer never runs; every
    # store.zeros/empty array stays in /dev/shm (and mapped) until the process exits.
    a = store.zeros(N)
    name = shm.made_segment(a).name
    assert os.path.exists(os.path.join(shm.SHM_DIR, name))
    del a
    gc.collect()
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name)), "store.zeros segment outlives its array"


def test_relocated_segment_is_not_pinned_by_the_backend(cluster):
    # FAILS: keep() maps with mmap.mmap(fd) which dup()s the fd of the ORIGINAL file;
    # relocate() mremaps a copy over the address but the mmap object still holds that
    # fd, so after the reader lets go the old (unlinked) file's pages stay allocated in
    # /dev/shm for the object's whole life, and shm_report does not count them.
    g = Grid(np.arange(N, dtype=np.float64))
    g.make_persistent()
    pid = backend_pid(cluster, g.get_location())
    view = g.data
    g.bump()  # leased: moved aside, one relocation
    del view
    gc.collect()
    r = cluster.client.shm_report(g.get_location())
    assert r["leases"] == 0 and r["stale_leased_bytes"] == 0
    deleted = [f for f in shm_files_held(pid) if f.endswith("(deleted)")]
    assert deleted == [], f"backend pins unlinked segments: {deleted}"
    g.delete_persistent()


def test_creator_lease_ends_when_the_handed_over_array_is_collected(cluster):
    # FAILS: the creator's lease is tracked on made.region, which shm._made keeps alive
    # forever: after the array is gone and the object changed, its old 32 MiB segment
    # stays leased (stale) until the creator process exits, and counts against the
    # backend's memory limit (spills other objects).
    z = store.zeros(N)
    z[:] = 3.0
    g = Grid(z)
    g.make_persistent()
    del z
    gc.collect()
    g.bump()  # creator's lease forces a copy aside
    assert g.head() == 4.0
    r = wait_for(
        lambda: (lambda r: r if r["stale_leased_bytes"] == 0 else None)(cluster.client.shm_report(g.get_location())),
        timeout=5,
    )
    assert r["stale_leased_bytes"] == 0
    g.delete_persistent()


def test_creator_leases_are_bounded_by_the_lease_limit(tmp_path):
    # FAILS: Segments.keep() adds the creator's lease without checking `limit`, so
    # store.zeros puts lease any amount of /dev/shm ("bounded" is only true for reads).
    with own_cluster(tmp_path, 1, "none", env={"CLAYPOT_SHM_LEASE_LIMIT": "48MiB"}) as c:
        objs = []
        for k in range(3):
            z = store.zeros(N)
            z[:] = k
            objs.append(Grid(z))
            objs[-1].make_persistent()
        r = c.client.shm_report(objs[0].get_location())
        assert r["leased_bytes"] <= r["limit"], r


# -- split brain: the creator's private mapping must never see the object change -----------

_NS_CREATOR = r"""
import sys, time, store
from test_zerocopy import Grid
store.connect(sys.argv[1], sys.argv[2])
import os
z = store.zeros(%d)
z[:] = 7.0
g = Grid(z)
g.make_persistent(alias="zc-hostile-ns")
print("persisted", os.getpid(), flush=True)
sys.stdin.readline()          # the test changes the object meanwhile
print("seen", float(z[0]), float(z[-1]), flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_creator_in_another_pid_namespace_never_sees_the_object_change(tmp_path):
    # FAILS (split brain): hand_over() gives a store.zeros segment to the backend even
    # when the creator is in another PID namespace (readers are checked, creators are
    # not). The backend reads the creator's PID from the segment's name; in its own
    # namespace that PID is nobody, so the sweep ends the creator's lease within a
    # second, the next changing method writes the file in place, and the creator's
    # MAP_PRIVATE array (pages it has not rewritten since) shows the new state.
    free = next(p for p in range(20000, 32000) if not psutil.pid_exists(p))
    with own_cluster(tmp_path, 1, "none") as c:
        script = tmp_path / "creator.py"
        script.write_text(_NS_CREATOR % N)
        cmd = [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "sh",
            "-c",
            f"echo {free - 1} > /proc/sys/kernel/ns_last_pid; {sys.executable} {script} {c.address} {c.token}",
        ]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        try:
            line = proc.stdout.readline()
            assert line.startswith("persisted"), line
            time.sleep(2.5)  # a few lease sweeps
            g = store.get_by_alias("zc-hostile-ns")
            g.bump(1.0)
            assert g.head() == 8.0
            proc.stdin.write("\n")
            proc.stdin.flush()
            seen = proc.stdout.readline().split()
            assert seen[0] == "seen", seen
            assert float(seen[1]) == 7.0 and float(seen[2]) == 7.0, f"creator's own array changed under it: {seen}"
        finally:
            proc.kill()
            proc.wait(10)
            proc.stdin.close()
            proc.stdout.close()


# -- torn reads -----------------------------------------------------------------------------


def test_same_host_read_racing_a_writer_is_never_torn(cluster):
    # FAILS (documented as a caveat, but issue 19 says readers are never torn): while a
    # changing method runs the backend refuses the lease (Segments._busy) and the
    # server copies the live array after the object's lock was released, so a
    # same-host reader gets a copy that is half old, half new.
    g = Grid(np.zeros(N))
    g.make_persistent()
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            g.bump()

    t = threading.Thread(target=writer)
    t.start()
    torn = []
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not torn:
            v = g.data
            lo, hi = float(v.min()), float(v.max())
            if lo != hi:
                torn.append((lo, hi, v.flags.writeable))
            del v
    finally:
        stop.set()
        t.join(60)
    assert not torn, f"torn same-host read: min/max/copy {torn[0]}"
    g.delete_persistent()


# -- /dev/shm full ------------------------------------------------------------------------------

_SMALL_SHM_CLIENT = r"""
import store, numpy as np
try:
    a = store.zeros(%d)            # more than the tmpfs holds
    a[:] = 1.0
    print("ok", float(a.sum()))
except Exception as exc:
    print("refused", type(exc).__name__)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_store_zeros_larger_than_shm_free_space_never_sigbus(tmp_path):
    # FAILS (crash): make_array() only ftruncate()s a sparse tmpfs file; writing pages
    # that tmpfs cannot back kills the process with SIGBUS instead of a typed error or a
    # fallback to ordinary memory (posix_fallocate the segment, fall back on ENOSPC).
    script = tmp_path / "c.py"
    script.write_text(_SMALL_SHM_CLIENT % N)
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=8m tmpfs /dev/shm && exec {sys.executable} {script}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=120,
    )
    assert r.returncode != -signal.SIGBUS and r.returncode == 0, (
        f"rc={r.returncode} (SIGBUS={signal.SIGBUS}) {r.stdout} {r.stderr[-500:]}"
    )
    assert r.stdout.startswith(("ok", "refused")), r.stdout


# -- durability ---------------------------------------------------------------------------------


def test_big_store_zeros_object_under_sync_is_on_disk_before_make_persistent_returns(tmp_path):
    # Probe (passes): over big_object, handed over without a copy, kill -9 at once.
    with own_cluster(tmp_path, 1, "sync") as c:
        z = store.zeros(9 * MiB)  # 72 MiB > big_object (64 MiB)
        z[:] = np.arange(9 * MiB, dtype=np.float64)
        g = Grid(z)
        g.make_persistent(alias="zc-hostile-big")
        restart_backend(c, g.get_location(), kill=True)
        back = store.get_by_alias("zc-hostile-big").data
        assert np.array_equal(back, np.arange(9 * MiB, dtype=np.float64))


# -- views survive everything ---------------------------------------------------------------


def test_new_version_of_a_same_host_object_can_change(cluster):
    # FAILS (regression): new_version fetches the state to the client, which now gets
    # leased READ-ONLY views; pickle protocol 5 keeps the read-only flag
    # (READONLY_BUFFER), so the version persisted from them holds read-only arrays and
    # every changing method on it raises "ValueError: output array is read-only".
    # consolidate_version does the same to the original. Same for a user who persists
    # what they read: Grid(g.data).make_persistent().
    g = Grid(np.arange(N, dtype=np.float64))
    g.make_persistent()
    ver = g.new_version()
    ver.bump(10.0)
    assert g.head() == 0.0 and ver.head() == 10.0
    ver.consolidate_version()
    g.bump(1.0)
    assert g.head() == 11.0
    h = Grid(g.data)
    h.make_persistent()
    h.bump(1.0)
    assert h.head() == 12.0


def test_views_survive_delete_move_and_spill(tmp_path):
    # Probe: the snapshot stays whole and readable through move, spill, delete.
    want = np.arange(N, dtype=np.float64)
    with own_cluster(tmp_path, 2, "sync", memory_limit="200MiB") as c:
        g = Grid(want.copy())
        g.make_persistent()
        v0 = g.data
        assert not v0.flags.writeable
        other = [p.backend_id for p in c.processes if p.backend_id != g.get_location()][0]
        g.move(other)
        g.bump()
        fill = [Grid(np.full(N, float(k))) for k in range(8)]  # 256 MiB: spills
        for f in fill:
            f.make_persistent(backend=other)
        v1 = g.data
        g.bump()
        assert np.array_equal(v0, want)
        assert np.array_equal(v1, want + 1)
        g.delete_persistent()
        for f in fill:
            f.delete_persistent()
        assert np.array_equal(v0, want) and np.array_equal(v1, want + 1)


def test_bad_inputs_round_trip(cluster):
    # Probe: 0-size, non-contiguous, Fortran-order and object arrays; store.zeros(0).
    arrs = [
        np.zeros(0),
        np.arange(2 * N, dtype=np.float64)[::2],
        np.asfortranarray(np.arange(N, dtype=np.float64).reshape(2048, -1)),
        np.array([{"a": 1}, None] * 10, dtype=object),
        store.zeros(0),
        store.zeros((0, 5)),
    ]
    for a in arrs:
        g = Grid(a)
        g.make_persistent()
        got = g.data
        assert got.shape == a.shape and got.dtype == a.dtype
        if a.dtype != object:
            assert np.array_equal(got, a)
        g.delete_persistent()
    with pytest.raises(ValueError):
        store.zeros((-1, 4))


def test_store_zeros_of_a_huge_shape_is_refused():
    # FAILS: an 8 TiB store.zeros "succeeds" (a sparse tmpfs file, ftruncate never
    # checks room), handing back an array that SIGBUSes once written past what /dev/shm
    # holds; numpy.zeros of the same raises MemoryError. A shape too big for C longs
    # gives OverflowError rather than ValueError/MemoryError.
    free = os.statvfs(shm.SHM_DIR)
    room = free.f_bavail * free.f_frsize
    from store.errors import ClaypotError

    with pytest.raises((MemoryError, ClaypotError)):
        a = store.zeros(((room + (1 << 40)) // 8,))
        del a


_SMALL_SHM_CLUSTER = r"""
import os, subprocess, sys, time
import numpy as np, store
from store import LocalCluster
from test_zerocopy import Grid
N = %d
with LocalCluster(backends=1, data_dir=sys.argv[1], durability="none") as c:
    creator = (
        "import sys, store\n"
        "from test_zerocopy import Grid\n"
        "store.connect(sys.argv[1], sys.argv[2])\n"
        "z = store.zeros(%%d)\n"
        "z[0] = 1.0\n"              # the rest stays a hole in the tmpfs file
        "Grid(z).make_persistent(alias='zc-sparse')\n" %% N)
    subprocess.run([sys.executable, "-c", creator, c.address, c.token], check=True)
    time.sleep(2.5)                    # the creator is gone: its lease too
    fd = os.open("/dev/shm/filler", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        while os.write(fd, b"x" * (1 << 20)):
            pass
    except OSError:
        pass
    os.close(fd)
    g = store.get_by_alias("zc-sparse")
    try:
        g.bump(1.0)                    # writes every page of the segment
        print("bumped", flush=True)
    except Exception as exc:
        print("refused", type(exc).__name__, flush=True)
    os.unlink("/dev/shm/filler")
    print("alive", c.processes[0].alive(), "rc", c.processes[0].proc.poll(), flush=True)
    print("head", g.head(), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_backend_survives_shm_full_while_changing_a_handed_over_segment(tmp_path):
    # FAILS (backend crash): a store.zeros segment is handed over sparse; once its
    # creator's lease ends, a changing method writes the file in place, and with
    # /dev/shm full the first write to a hole kills the backend with SIGBUS (every
    # object on it is gone until a restart; under durability none, lost).
    script = tmp_path / "s.py"
    # Over big_object (64 MiB): under durability none the backend never reads it, so
    # the holes stay holes (a smaller object is digested, which fills them in).
    script.write_text(_SMALL_SHM_CLUSTER % (9 * MiB))
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=128m tmpfs /dev/shm && exec {sys.executable} {script} {tmp_path / 'c'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )
    out = r.stdout
    assert "alive True" in out, f"rc={r.returncode} out={out!r} err={r.stderr[-800:]}"
    assert ("bumped" in out and "head 2.0" in out) or ("refused" in out and "head 1.0" in out)


def test_many_leased_views_do_not_exhaust_file_descriptors(cluster):
    # FAILS (wrong error): every leased view is an mmap.mmap, which keeps a dup() of the
    # segment's fd for its whole life, so a reader holding a few hundred views (same
    # segment even) hits EMFILE and gets a raw OSError; gRPC and the reader's own files
    # fail too. (The backend's kept segments hold one fd each the same way.) Map with
    # the fd closed right after (ctypes mmap / one shared mapping per segment), or fall
    # back to a copy.
    import resource

    g = Grid(np.ones(300_000))  # 2.4 MB: over the inline limit
    g.make_persistent()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    views = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 150, hard))
    try:
        for _ in range(300):
            views.append(g.data)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(views) == 300 and all(v[0] == 1.0 for v in views)
    del views
    gc.collect()
    g.delete_persistent()


def test_a_killed_backends_segments_are_removed_when_it_restarts(tmp_path):
    # FAILS (leak): kept segments carry the backend's PID, but the start-up orphan
    # sweep skips any segment younger than result_ttl (120 s) and the timer sweep runs
    # every max(60 s, result_ttl): a backend killed right after a 1 GiB put leaves 1 GiB
    # in /dev/shm for minutes after its restart (forever if nothing runs on the host).
    with own_cluster(tmp_path, 1, "sync") as c:
        g = Grid(np.arange(N, dtype=np.float64))
        g.make_persistent(alias="zc-hostile-orphans")
        old = backend_pid(c, g.get_location())
        prefix = f"{shm.PREFIX}{old}-"
        assert any(n.startswith(prefix) for n in os.listdir(shm.SHM_DIR))
        restart_backend(c, g.get_location(), kill=True)
        time.sleep(3)
        left = [n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix)]
        shm.discard(left)  # do not leave them to other tests
        assert left == [], f"dead backend's segments still in /dev/shm: {left}"


def test_a_leased_view_never_changes_through_another_object_sharing_the_array(cluster):
    # FAILS: leases are found by address (Segments._find_locked) and tied to the segment's
    # owner, but copy-on-write runs only for the object being changed (Heap.invoke ->
    # Segments.changing(object_id)). When a method hands its array to another local
    # object (local calls pass arguments by reference), a changing method on that other
    # object writes the leased segment in place: the reader's "snapshot" changes.
    target = cluster.processes[0].backend_id
    a = Giver(np.zeros(N))
    a.make_persistent(backend=target)
    b = Grid(np.zeros(10))
    b.make_persistent(backend=target)
    a.give(b)
    view = a.data
    assert not view.flags.writeable
    b.bump(5.0)
    assert b.head() == 5.0
    assert view[0] == 0.0 and view[-1] == 0.0, f"leased view changed to {view[0]}"


def test_a_failed_zero_copy_put_leaves_no_lease_or_segment(cluster):
    # FAILS (leak): Segments.keep() registers the creator's lease before the persist
    # commits; when it then fails (here: the alias is taken), abandon() marks the
    # segment not current but the creator's lease keeps it, and the client only tracks
    # (and so only ever returns) that lease after a successful Persist. 32 MiB of
    # /dev/shm stays leased, and counted as stale memory, until the creator exits.
    target = cluster.processes[0].backend_id
    first = Grid(np.zeros(10))
    first.make_persistent(alias="zc-hostile-taken", backend=target)
    base = cluster.client.shm_report(target)
    z = store.zeros(N)
    z[:] = 1.0
    with pytest.raises(store.errors.AliasExists):
        Grid(z).make_persistent(alias="zc-hostile-taken", backend=target)
    del z
    gc.collect()
    time.sleep(1.5)
    after = cluster.client.shm_report(target)
    assert (after["segments"], after["leases"], after["leased_bytes"]) == (
        base["segments"],
        base["leases"],
        base["leased_bytes"],
    ), after
    first.delete_persistent()


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.9])
def test_kill_9_during_a_direct_write_leaves_a_whole_state(tmp_path, delay):
    # Probe: a big object under sync is checkpointed with O_DIRECT (store.backend._storage.direct);
    # kill -9 in the middle of the put or of its write-behind checkpoint, restart: the
    # object is absent or whole, and an acknowledged earlier state is never torn.
    from chaos import kill_later, start_backend

    M = 20 * MiB  # 160 MiB
    with own_cluster(tmp_path, 1, "sync") as c:
        bid = c.processes[0].backend_id
        g = Grid(np.ones(M))
        g.make_persistent(alias="zc-hostile-direct-a")
        killer = kill_later(c, bid, delay)
        put_ok = False
        try:
            z = store.zeros(M)
            z[:] = 3.0
            Grid(z).make_persistent(alias="zc-hostile-direct-b")
            put_ok = True
            g.bump(1.0)  # write-behind checkpoint follows
            time.sleep(3)
        except store.errors.ClaypotError:
            pass
        killer.join(30)
        start_backend(c, bid)
        a = store.get_by_alias("zc-hostile-direct-a").data
        assert a[0] in (1.0, 2.0) and (a == a[0]).all(), "torn checkpoint"
        try:
            b = store.get_by_alias("zc-hostile-direct-b").data
        except store.errors.AliasNotFound:
            assert not put_ok, "acknowledged put lost"
        else:
            assert b[0] == 3.0 and (b == 3.0).all()
        del a


def test_a_forked_child_of_the_creator_cannot_write_the_stored_object(cluster):
    # FAILS (stored object changed behind the backend's back): freeze() turns only the
    # creator's own mapping private. A child forked earlier (multiprocessing with fork,
    # a common way to fill a big array) still maps the segment MAP_SHARED, so its writes
    # after make_persistent land in the backend's object and in every reader's leased
    # "snapshot". Not documented (the README speaks of "this process" only). Fix: refuse
    # zero-copy hand-over while the mapping may be shared (madvise(MADV_DONTFORK) at
    # make_array, or map with MAP_PRIVATE semantics in children), or copy.
    z = store.zeros(N)
    z[:] = 1.0
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: numpy only, then exit
        try:
            os.read(go_r, 1)
            z[:] = 9.0
            os.write(done_w, b"x")
        finally:
            os._exit(0)
    try:
        g = Grid(z)
        g.make_persistent()
        view = g.data
        assert not view.flags.writeable and view[0] == 1.0
        os.write(go_w, b"x")
        os.read(done_r, 1)
        assert g.head() == 1.0, "a forked child changed the stored object"
        assert view[0] == 1.0, "a forked child changed a reader's leased view"
    finally:
        os.waitpid(pid, 0)
        for fd in (go_r, go_w, done_r, done_w):
            os.close(fd)


def test_a_persist_cannot_take_over_another_objects_kept_segment(cluster, monkeypatch):
    # FAILS (one object's memory becomes another's): Segments.keep()/shm.keep() take
    # over ANY segment name a same-host Persist names, including one this backend
    # already keeps for a live object. The file is renamed and mapped again, so two
    # objects share memory (a change to one is a change to the other, no
    # copy-on-write, no log record for the victim) and the victim's readers get
    # "segment is gone". keep() must refuse names of its own PID / already kept.
    target = cluster.processes[0].backend_id
    pid = backend_pid(cluster, target)
    before = set(os.listdir(shm.SHM_DIR))
    victim = Grid(np.full(N, 1.0))
    victim.make_persistent(backend=target)
    mine = [n for n in set(os.listdir(shm.SHM_DIR)) - before if n.startswith(f"{shm.PREFIX}{pid}-")]
    assert len(mine) == 1, mine
    real = shm.hand_over
    monkeypatch.setattr(shm, "hand_over", lambda bufs: ([mine[0]], [""], []))
    attacker = Grid(np.zeros(N))
    try:
        attacker.make_persistent(backend=target)
    except store.errors.ClaypotError:
        return  # refused: the fix
    finally:
        monkeypatch.setattr(shm, "hand_over", real)
    attacker.bump(5.0)
    assert victim.head() == 1.0, "another object's put changed the victim"
    view = victim.data
    assert view[0] == 1.0


_PIDNS_READER = r"""
import sys, store
store.connect(sys.argv[1], sys.argv[2])
v = store.get_by_alias("zc-hostile-pidns").data
print("got", v.flags.writeable, float(v[0]), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_a_reader_in_another_pid_namespace_gets_a_copy(cluster, tmp_path):
    # Probe (passes): a PID the backend cannot watch never holds a lease.
    g = Grid(np.full(N, 4.0))
    g.make_persistent(alias="zc-hostile-pidns")
    base = cluster.client.shm_report(g.get_location())
    script = tmp_path / "r.py"
    script.write_text(_PIDNS_READER)
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script), cluster.address, cluster.token],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=120,
    )
    assert r.stdout.split() == ["got", "True", "4.0"], (r.stdout, r.stderr[-500:])
    assert cluster.client.shm_report(g.get_location())["leases"] == base["leases"]
    g.delete_persistent()


def test_leased_views_stay_frozen_under_concurrent_writers(cluster):
    # Probe (passes): readers in threads keep leased views while writers bump, replace
    # the attribute and change it through methods; every leased view stays constant.
    g = Grid(np.zeros(N))
    g.make_persistent()
    stop = threading.Event()
    errors = []

    def writer():
        k = 0
        while not stop.is_set():
            k += 1
            if k % 5 == 0:
                g.data = np.full(N, float(g.head()) + 1.0)
            else:
                g.bump()

    def reader():
        held = []
        while not stop.is_set():
            v = g.data
            if not v.flags.writeable:
                held.append((v, float(v[0])))
            for view, first in held[-4:]:
                if view[0] != first or view[-1] != first or view[N // 2] != first:
                    errors.append((first, float(view[0]), float(view[-1])))
            if len(held) > 8:
                held.pop(0)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(10)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    g.delete_persistent()


_FULL_RELOCATE = r"""
import os, sys
import numpy as np, store
from store import LocalCluster
from test_zerocopy import Grid
with LocalCluster(backends=1, data_dir=sys.argv[1], durability="none") as c:
    g = Grid(np.full(%d, 1.0))
    g.make_persistent()
    view = g.data
    fd = os.open("/dev/shm/filler", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        while os.write(fd, b"x" * (1 << 20)):
            pass
    except OSError:
        pass
    os.close(fd)
    try:
        g.bump(1.0)
        print("bumped", flush=True)
    except store.errors.ObjectBusy:
        print("busy", flush=True)
    print("view", float(view[0]), float(view[-1]), flush=True)
    os.unlink("/dev/shm/filler")
    print("alive", c.processes[0].alive(), "head", g.head(), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_copy_on_write_with_shm_full_is_a_typed_refusal(tmp_path):
    # Probe: a leased object whose copy does not fit: ObjectBusy, the view intact.
    script = tmp_path / "s.py"
    script.write_text(_FULL_RELOCATE % N)
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} {script} {tmp_path / 'c'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )
    lines = r.stdout.splitlines()
    assert lines[:3] == ["busy", "view 1.0 1.0", "alive True head 1.0"], (r.stdout, r.stderr[-800:])


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit")
def test_a_backend_keeping_many_segments_does_not_run_out_of_file_descriptors(tmp_path):
    # FAILS (backend degraded): every kept segment is an mmap.mmap holding a dup() of
    # its fd for the object's life, so a backend's open files grow by one per
    # zero-copy object; at the soft limit (1024 on most systems) persists fail with
    # "cannot be opened safely: Too many open files" and anything else that opens a
    # file (storage, accepted connections) fails too. Close the fd after mmap (map with
    # ctypes as relocate() does), keeping only the mapping.
    with own_cluster(tmp_path, 1, "none") as c:
        bid = c.processes[0].backend_id
        pid = backend_pid(c, bid)
        # headroom of 120 descriptors above what the idle backend uses
        limit = len(os.listdir(f"/proc/{pid}/fd")) + 120
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:"], check=True)
        objs = []
        for k in range(160):
            g = Grid(np.full(160_000, float(k)))  # 1.28 MB: over the inline limit
            g.make_persistent(backend=bid)
            objs.append(g)
        assert objs[-1].head() == 159.0
        assert len(os.listdir(f"/proc/{pid}/fd")) < limit


class Peeker(StorageObject):
    def __init__(self):
        self.n = 0

    def peek(self, grid):
        return float(grid.data[-1])  # a same-host read back into the caller's backend


class Stepper(StorageObject):
    def __init__(self, data):
        self.data = data

    def step(self, peeker):
        self.data += 1.0
        return peeker.peek(self)  # a callback while this changing call runs


def test_a_read_nested_in_its_own_changing_call_does_not_wait_for_it(cluster):
    # Same-host reads wait for a changing call on the object to end (never torn); a
    # read that the changing call itself is waiting for (a callback of its chain)
    # must not, or it would wait for itself until the lease wait runs out.
    ids = [p.backend_id for p in cluster.processes]
    s = Stepper(np.zeros(N))
    s.make_persistent(backend=ids[0])
    p = Peeker()
    p.make_persistent(backend=ids[1])
    view = s.data  # leased: the step copies aside
    started = time.monotonic()
    assert s.step(p) == 1.0
    assert time.monotonic() - started < 10.0
    assert view[-1] == 0.0 and float(s.data[-1]) == 1.0
