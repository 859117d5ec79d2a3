"""Segments a backend keeps in /dev/shm, and the leases same-host readers hold on them.

A same-host ``make_persistent`` leaves an object's large buffers in the
segments the client wrote (or built them in, see ``store.empty``): the
backend takes each file over (:func:`store._client.shm.keep`) and maps it shared, so
the object's arrays *are* the file. So:

- A same-host read of such a buffer costs no copy: the reply names the
  segment and an offset, the reader maps it read-only, and holds a lease.
- Copy-on-write at method granularity: before a changing (non-``@readonly``)
  method or a task that may change the object runs, each of its segments
  that a reader leases is copied to a new segment and the object's memory
  moved onto the copy at the same address (:func:`store._client.shm.relocate`): the
  method changes the copy, the readers keep the old file, which nobody
  writes any more, whole. One memcpy of the leased buffers; none at all when
  nobody leases them (the method writes the file in place, which stays the
  object's state, so the next read is zero-copy again).
- While such a call runs, the object's segments (and any other segment its
  arrays live in) are not leased (a reader would see it half done): the read
  waits for the call's end (``lease_wait``), then leases.
- A move or a delete ends the segments' tie to the object; each file is
  unlinked as soon as no lease holds it.
- A lease ends when the reader's view is garbage collected (the reader
  returns it, :meth:`Segments.release`) or the reader process dies (its PID
  is checked on a timer, :meth:`Segments.sweep`; a PID reused by a younger
  process counts as dead). A segment handed over by its creator
  (``store.empty``) starts with a lease of the creator, whose own (now
  copy-on-write) mapping must not see the object change either; when that
  lease cannot be held (over the limit, or a creator this backend cannot
  watch), the backend keeps a private copy instead.
- Leased bytes are bounded by ``limit``: past it, reads get copies. Leased
  segments that no live object uses any more are memory the heap does not
  count, so they are reported to the lifecycle as extra resident bytes
  (``on_stale_bytes``), and spilling makes room for them.

A backend killed with ``kill -9`` leaves its segments behind; they carry its
PID and PID namespace in their names, so the next start's orphan sweep removes
them at once
(:func:`store._client.shm.remove_orphans`). A restart never reads them: objects come
back from the storage directory.
"""

from __future__ import annotations

import os
import threading
import types
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from store._client import shm
from store.errors import ProtocolError


@dataclass
class Lease:
    """A reader's hold on one segment."""

    segment: str
    pid: int
    started: float  # the reader process's start time, to tell a reused PID


@dataclass
class Segment:
    """A file in /dev/shm that holds one buffer of one persisted object."""

    name: str
    size: int
    start: int  # address of the backend's private mapping
    region: weakref.ref  # the mapping: dead once the object dropped it
    object_id: str = ""  # "" until the persist that brought it committed
    current: bool = True  # still the object's memory
    mapped: bool = True  # the backend maps it (false once copied aside)
    reuse: bool = True  # new data may go into it once nobody maps it
    leases: set[str] = field(default_factory=set)


class Segments:
    """The segments of one backend and their leases (see the module docstring)."""

    def __init__(self, limit: int, on_stale_bytes: Callable[[int], None] | None = None, pool_limit: int = 0):
        self.limit = limit
        # Free segments kept for reuse (their pages exist: a copy into one runs at
        # memory speed), up to pool_limit bytes, oldest dropped first. Same-host
        # clients claim them for puts (store._client.shm.claim_free), this backend for copies.
        self.pool_limit = pool_limit
        self._pool: list[tuple[str, int]] = []
        # Spares this backend made and mapped (name -> address): their page tables are
        # filled, so a copy into one costs one memcpy (see _prepare_spare).
        self._mapped: dict[str, int] = {}
        self.on_stale_bytes = on_stale_bytes
        self._mu = threading.Lock()
        self._segments: dict[str, Segment] = {}
        self._by_object: dict[str, list[str]] = {}
        self._leases: dict[str, Lease] = {}
        self._starts: list[tuple[int, int, str]] = []  # (start, end, name), for lookups
        self._busy: dict[str, int] = {}  # object id -> changing calls running on it
        # object id -> address ranges of the arrays a changing call on it may write
        # (an array of another object's segment, passed to it by reference, included)
        self._busy_ranges: dict[str, list[tuple[int, int]]] = {}
        self._idle = threading.Condition(self._mu)
        self._moving = threading.Lock()  # one relocation at a time (see _move_aside)
        self.lease_wait = 30.0  # how long a read waits for a changing call to end
        self._reported_stale = 0
        self.relocations = 0
        self._preparing = 0  # bytes of spare segments being made (see _prepare_spare)
        self._spare_done = threading.Condition(self._mu)
        self._closed = False
        # Change words for same-host readers that reuse a view (store.backend._storage.versions);
        # None when leases are off or the table cannot be made.
        self.versions = None
        if limit:
            from store.backend._storage.versions import Versions

            try:
                self.versions = Versions()
            except (OSError, ValueError):
                self.versions = None

    # -- taking segments over ------------------------------------------------------------
    def keep(
        self, names: Sequence[str], sizes: Sequence[int], creator_leases: Sequence[str] = ()
    ) -> tuple[list, list[str]]:
        """Take a persist's segments over; returns (buffers, kept names).

        ``creator_leases[i]`` (if given and not empty) is a lease the segment's
        creator keeps on segment i: it still maps it (see ``store.empty``).
        """
        creators = [shm.creator_pid(n) for n in names]
        copy = []
        with self._mu:
            for name in names:
                if name in self._segments:
                    shm.discard([n for n in names if n not in self._segments])
                    raise ProtocolError(f"shared-memory segment {name} is kept already")
            budget = self.limit - self.leased_bytes_locked()
        for i, (name, size) in enumerate(zip(names, sizes)):
            lease_id = creator_leases[i] if i < len(creator_leases) else ""
            # The creator still maps the file: the backend may share it only under a
            # lease of the creator it can watch (a process of this PID namespace that
            # maps it) and within the lease limit; otherwise it keeps a private copy,
            # which nothing the backend does can show to the creator.
            private = bool(lease_id) and (size > budget or not creators[i] or not shm.maps_segment(creators[i], name))
            if lease_id and not private:
                budget -= size
            copy.append(private)
        kept = shm.keep(names, sizes, copy)
        buffers, mine = [], []
        with self._mu:
            for i, (name, region) in enumerate(kept):
                if region is None:
                    buffers.append(bytearray())
                    continue
                if isinstance(region, bytearray):  # read into ordinary memory
                    buffers.append(region)
                    continue
                start = shm.buffer_address(region)
                if start is None:  # numpy absent: an ordinary private buffer, never leased
                    buffers.append(memoryview(region))
                    shm.discard([name])
                    continue
                seg = Segment(name, len(region), start, weakref.ref(region))
                self._segments[name] = seg
                self._starts.append((start, start + seg.size, name))
                buffers.append(memoryview(region))
                mine.append(name)
                lease_id = creator_leases[i] if i < len(creator_leases) else ""
                if lease_id and creators[i]:
                    # Whatever happens to the creator, its lease is sweepable: an unknown
                    # PID is a dead one.
                    started = _process_start(creators[i])
                    self._leases[lease_id] = Lease(name, creators[i], started or 0.0)
                    seg.leases.add(lease_id)
        return buffers, mine

    def bind(self, object_id: str, names: Sequence[str]) -> None:
        """The persist committed: these segments hold ``object_id``'s buffers."""
        with self._mu:
            for name in names:
                seg = self._segments.get(name)
                if seg is not None:
                    seg.object_id = object_id
                    self._by_object.setdefault(object_id, []).append(name)

    def abandon(self, names: Sequence[str]) -> None:
        """The persist failed: forget its segments (and the creator's leases on them: its
        client tracks a lease only once the persist succeeded)."""
        with self._mu:
            for name in names:
                seg = self._segments.get(name)
                if seg is not None:
                    seg.current = False
                    for lease_id in seg.leases:
                        self._leases.pop(lease_id, None)
                        seg.reuse = False  # the creator's private mapping reads its pages
                    seg.leases.clear()
            drop = self._collect_locked()
        self._finish(drop)

    def changing(self, object_id: str, obj: Any = None) -> None:
        """A call that may change ``object_id`` starts (its lock is held).

        Leased segments move aside first (see the module docstring): the
        object's own and any other one its arrays (``obj``, the live object)
        live in, since a local call may have handed it another object's array.
        Until :meth:`changed`, none of those segments is leased.
        """
        ranges = _array_ranges(obj) if obj is not None and self._segments else []
        with self._mu:
            self._busy[object_id] = self._busy.get(object_id, 0) + 1
            if ranges:
                self._busy_ranges.setdefault(object_id, []).extend(ranges)
            names = set(self._by_object.get(object_id, ()))
            for lo, hi, name in self._starts:
                if any(lo < b and a < hi for a, b in ranges):
                    names.add(name)
            if self.versions is not None:
                self.versions.changing_locked(object_id, names)
            leased = [
                self._segments[n]
                for n in names
                if n in self._segments and self._segments[n].leases and self._segments[n].current
            ]
        for seg in leased:
            with self._moving:
                self._move_aside(object_id, seg)
        if leased:
            self._finish([])  # the old files are now extra memory: report it

    def _move_aside(self, object_id: str, seg: Segment) -> None:
        """Relocate one leased segment (``_moving`` held).

        Two changing calls may find the same segment leased (two objects
        sharing an array): the one that comes second must not copy it again,
        since the first call's method may be writing the copy already (a copy
        taken then, swapped in, would lose those writes). So each relocation is
        alone, and a segment that stopped being current meanwhile is left be.
        """
        with self._mu:
            if not seg.current or not seg.leases:
                return
        region = seg.region()
        if region is None:
            return
        try:
            fresh = shm.relocate(region, *self._take_free(seg.size))
        except shm.Unavailable as exc:
            # No room for a copy: the method must not write into what readers map.
            from store.errors import ObjectBusy

            self.changed(object_id)
            raise ObjectBusy(
                f"object {object_id} is leased by readers and no copy of "
                f"it fits in shared memory ({exc}); retry once they let go"
            )
        with self._mu:
            self.relocations += 1
            seg.current = False
            seg.mapped = False
            owner = seg.object_id  # another object's, for an array shared with it
            moved = Segment(fresh, seg.size, seg.start, seg.region, owner)
            self._segments[fresh] = moved
            self._starts = [t for t in self._starts if t[2] != seg.name]
            self._starts.append((seg.start, seg.start + seg.size, fresh))
            if owner:
                owned = self._by_object.setdefault(owner, [])
                if seg.name in owned:
                    owned.remove(seg.name)
                owned.append(fresh)

    def changed(self, object_id: str) -> None:
        """The call that :meth:`changing` announced is over."""
        with self._mu:
            n = self._busy.get(object_id, 0) - 1
            if n > 0:
                self._busy[object_id] = n
            else:
                self._busy.pop(object_id, None)
                self._busy_ranges.pop(object_id, None)
            if self.versions is not None:
                self.versions.changed_locked(object_id)
            self._idle.notify_all()

    def gone(self, object_id: str) -> None:
        """``object_id`` moved or was deleted: its segments are no longer its memory."""
        with self._mu:
            if self.versions is not None:
                self.versions.gone_locked(object_id)
            names = self._by_object.pop(object_id, None)
            if not names:
                return
            for name in names:
                seg = self._segments.get(name)
                if seg is not None:
                    seg.current = False
            drop = self._collect_locked()
        self._finish(drop)

    # -- change words ----------------------------------------------------------------------
    def version(self, object_id: str) -> tuple[int, int]:
        """``object_id``'s (slot, word) before a read that may be reused; (0, 0) if none."""
        if self.versions is None:
            return 0, 0
        with self._mu:
            return self.versions.open_locked(object_id)

    def reusable(self, object_id: str, slot: int, word: int, names: Sequence[str]) -> bool:
        """Whether views of ``names``, leased for a read that began at ``word``, show the
        object's state at ``word`` (no change started since): then readers may reuse them
        while the word stays ``word``."""
        if self.versions is None:
            return False
        with self._mu:
            return self.versions.valid_locked(object_id, slot, word, names)

    def retire(self, object_id: str) -> None:
        """Readers must stop reusing views of ``object_id`` (it gained replicas)."""
        if self.versions is not None:
            with self._mu:
                self.versions.gone_locked(object_id)

    # -- leases ----------------------------------------------------------------------------
    def lease(self, buffers: Sequence, pid: int, wait: bool = True) -> list[tuple[str, int, str]] | None:
        """Leases on the segments holding each of ``buffers``, for reader ``pid``.

        Returns (segment, offset, lease id) per buffer, or None (all or none)
        when a buffer is not in a current segment or the leases would pass
        the limit: the caller then copies.
        """
        if not self._segments or pid <= 0:
            return None
        addresses = []
        for buf in buffers:
            start = shm.buffer_address(buf)
            if start is None:
                return None
            addresses.append((start, memoryview(buf).nbytes))
        started = _process_start(pid)
        if started is None:
            return None
        with self._mu:
            # A changing call on the object runs: wait for its end (a lease taken now
            # would show it half done, a copy taken now would be torn).
            got: list = []

            def settled() -> bool:
                got[:] = [self._found_locked(addresses)]
                return got[0] is not None

            if not self._idle.wait_for(settled, self.lease_wait if wait else 0):
                return None
            found = got[0]
            if not found:
                return None
            extra = sum(seg.size for seg in {s.name: s for s, _ in found}.values() if not seg.leases)
            if self.leased_bytes_locked() + extra > self.limit:
                return None
            out = []
            first = [seg for seg in {s.name: s for s, _ in found}.values() if not seg.leases]
            for seg, offset in found:
                lease_id = uuid.uuid4().hex
                self._leases[lease_id] = Lease(seg.name, pid, started)
                seg.leases.add(lease_id)
                out.append((seg.name, offset, lease_id))
        for seg in first:
            self._prepare_spare(seg.size)
        return out

    def _prepare_spare(self, size: int) -> None:
        """Make a free segment of ``size`` bytes in the background, if none is ready.

        A change of a leased segment copies it aside (:meth:`changing`); into
        fresh memory that costs four to five times a memcpy (the kernel
        allocates and clears every page), into a free segment whose pages
        exist about two (a memcpy, and a fault per 4 KiB page to map them),
        into a spare whose pages are allocated and mapped already, one. So
        the first lease of a segment readies such a spare for it, off the
        change's path, within ``pool_limit``. Its name is not a free one: a
        same-host client looking for a free segment to put into leaves it
        alone.
        """
        with self._mu:
            if self._closed or size > self.pool_limit or any(sz >= size and n in self._mapped for n, sz in self._pool):
                return
            # A free segment that fits is mapped rather than a new one made.
            free = [(n, sz) for n, sz in self._pool if sz >= size]
            reuse = min(free, key=lambda t: t[1]) if free else None
            if reuse is not None:
                self._pool.remove(reuse)
                size = reuse[1]
            elif sum(sz for _, sz in self._pool) + self._preparing + size > self.pool_limit:
                return
            self._preparing += size

        def make() -> None:
            name = shm.spare_name()
            path = os.path.join(shm.SHM_DIR, name)
            kept = False
            addr = 0
            try:
                try:
                    if reuse is None:
                        raise FileNotFoundError
                    # Renamed to a spare's name: a client looking for a free segment
                    # cannot claim it any more (or claimed it first: then make one).
                    os.rename(os.path.join(shm.SHM_DIR, reuse[0]), path)
                except OSError:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                    try:
                        os.posix_fallocate(fd, 0, size)  # the pages, allocated and cleared
                    finally:
                        os.close(fd)
                try:
                    addr = shm.premap(name)  # and their page tables filled
                except (OSError, ProtocolError):
                    addr = 0  # unmapped, the spare still saves clearing its pages
                with self._mu:
                    if not self._closed:
                        self._pool.append((name, size))
                        if addr:
                            self._mapped[name] = addr
                        kept = True
            except OSError:
                pass  # /dev/shm full: the change copies into new memory, as before
            finally:
                with self._mu:
                    self._preparing -= size
                    self._spare_done.notify_all()
                if not kept:
                    if addr:
                        shm.unmap(addr, size)
                    shm.discard([name])

        threading.Thread(target=make, name="claypot-spare", daemon=True).start()

    def _found_locked(self, addresses) -> list | None:
        """(segment, offset) per buffer; [] when one is in no current segment; None while
        a changing call may write one of them."""
        found = []
        for start, nbytes in addresses:
            seg = self._find_locked(start, nbytes)
            if seg is None:
                return []
            if self._busy.get(seg.object_id) or any(
                lo < seg.start + seg.size and seg.start < hi
                for ranges in self._busy_ranges.values()
                for lo, hi in ranges
            ):
                return None
            found.append((seg, start - seg.start))
        return found

    def _find_locked(self, start: int, nbytes: int) -> Segment | None:
        for lo, hi, name in self._starts:
            if lo <= start and start + nbytes <= hi:
                seg = self._segments.get(name)
                # A dead mapping's addresses may belong to a new one: never trust them.
                if seg is None or not seg.current or seg.region() is None:
                    continue  # an old tie of this address range; a current one may follow
                return seg
        return None

    def release(self, lease_ids: Sequence[str]) -> int:
        """End leases (the reader's views are gone); returns how many were held."""
        with self._mu:
            n = 0
            for lease_id in lease_ids:
                lease = self._leases.pop(lease_id, None)
                if lease is None:
                    continue
                n += 1
                seg = self._segments.get(lease.segment)
                if seg is not None:
                    seg.leases.discard(lease_id)
            drop = self._collect_locked()
        self._finish(drop)
        return n

    def sweep(self) -> int:
        """End the leases of readers that died; returns how many ended."""
        with self._mu:
            by_pid: dict[tuple[int, float], list[str]] = {}
            for lease_id, lease in self._leases.items():
                by_pid.setdefault((lease.pid, lease.started), []).append(lease_id)
        dead = []
        for (pid, started), ids in by_pid.items():
            if _process_start(pid) != started:
                dead += ids
        # Mappings whose object dropped them (spilled, rolled back, replaced) are no
        # longer the object's state either. Free segments a client claimed are gone.
        with self._mu:
            for seg in self._segments.values():
                if seg.current and seg.region() is None:
                    seg.current = False
            self._prune_pool_locked()
        return self.release(dead) if dead else self.release([])

    # -- bookkeeping -------------------------------------------------------------------------
    def leased_bytes_locked(self) -> int:
        return sum(seg.size for seg in self._segments.values() if seg.leases)

    def _collect_locked(self) -> list[tuple[str, int, bool]]:
        """Segments neither current nor leased: forget them.

        Returns (name, size, reusable) for each: reusable when nobody maps
        it any more (no lease, and this backend copied it aside or dropped
        the object that used it), so new data may go into it.
        """
        # One this backend still maps (an array of the dropped object lives on
        # somewhere, say in a log record not yet checkpointed) is unlinked: its
        # memory goes with that array, and no new data may go into it.
        drop = [name for name, seg in self._segments.items() if not seg.current and not seg.leases]
        out = []
        for name in drop:
            seg = self._segments.pop(name)
            names = self._by_object.get(seg.object_id)
            if names and name in names:
                names.remove(name)
            out.append((name, seg.size, seg.reuse and (not seg.mapped or seg.region() is None)))
        if drop:
            gone = set(drop)
            self._starts = [t for t in self._starts if t[2] not in gone]
        return out

    def _take_free(self, size: int) -> tuple[str, int]:
        """A free segment of at least ``size`` bytes and where it is mapped (0: it is
        not), or ("", 0): a mapped spare first, else the smallest that fits."""
        with self._mu:
            # A spare being made for this segment (its first lease started it): waiting
            # for it costs less than clearing new pages here as well.
            self._spare_done.wait_for(
                lambda: any(sz >= size for _, sz in self._pool) or self._preparing < size, timeout=30.0
            )
            fits = [(n, sz) for n, sz in self._pool if sz >= size]
            if not fits:
                return "", 0
            best = min(fits, key=lambda t: (t[0] not in self._mapped, t[1]))
            self._pool.remove(best)
            return best[0], self._mapped.pop(best[0], 0)

    def _keep_free(self, dropped: list[tuple[str, int, bool]]) -> list[str]:
        """Put reusable dropped segments in the pool; returns the names to unlink."""
        unlink = []
        for name, size, reusable in dropped:
            if not reusable or size > self.pool_limit:
                unlink.append(name)
                continue
            free = shm.free_name()
            try:
                os.rename(os.path.join(shm.SHM_DIR, name), os.path.join(shm.SHM_DIR, free))
            except OSError:
                continue
            with self._mu:
                self._pool.append((free, size))
                total = sum(sz for _, sz in self._pool)
                while total > self.pool_limit and self._pool:
                    old, sz = self._pool.pop(0)
                    total -= sz
                    unlink.append(old)
                    self._unmap_locked(old, sz)
        return unlink

    def _finish(self, drop: list[tuple[str, int, bool]]) -> None:
        shm.discard(self._keep_free(drop) if drop else [])
        if self.on_stale_bytes is None:
            return
        stale = self.stats()["stale_leased_bytes"]
        if stale != self._reported_stale:
            self._reported_stale = stale
            self.on_stale_bytes(stale)

    def _prune_pool_locked(self) -> None:
        # Free segments a client claimed since (renamed away) are not ours any more.
        keep = []
        for n, sz in self._pool:
            if os.path.exists(os.path.join(shm.SHM_DIR, n)):
                keep.append((n, sz))
            else:
                self._unmap_locked(n, sz)
        self._pool = keep

    def _unmap_locked(self, name: str, size: int) -> None:
        """``name`` leaves the pool: drop this backend's mapping of it, if any."""
        addr = self._mapped.pop(name, 0)
        if addr:
            shm.unmap_later(addr, size)

    def stats(self) -> dict:
        """Bytes and counts of segments and leases (reported by the Leases RPC)."""
        with self._mu:
            self._prune_pool_locked()
            return {
                "segments": len(self._segments),
                "segment_bytes": sum(s.size for s in self._segments.values()),
                "leases": len(self._leases),
                "leased_bytes": self.leased_bytes_locked(),
                "stale_leased_bytes": sum(s.size for s in self._segments.values() if s.leases and not s.current),
                "limit": self.limit,
                "relocations": self.relocations,
                "pool_bytes": sum(sz for _, sz in self._pool),
                "pool_segments": len(self._pool),
            }

    def close(self) -> None:
        """The backend stops: unlink every segment (readers keep their mappings)."""
        with self._mu:
            self._closed = True
            names = list(self._segments) + [n for n, _ in self._pool]
            for n, sz in self._pool:
                self._unmap_locked(n, sz)
            self._pool.clear()
            self._segments.clear()
            self._by_object.clear()
            self._leases.clear()
            self._starts = []
        shm.discard(names)
        if self.versions is not None:
            self.versions.close()


def _array_ranges(obj, limit: int = 2000) -> list[tuple[int, int]]:
    """Address ranges of the numpy arrays (their whole base memory) reachable from
    ``obj``'s attributes and the containers in them (up to ``limit`` values)."""
    np = shm._numpy()
    if np is None:
        return []
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    todo = [obj]
    while todo and len(seen) < limit:
        value = todo.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, np.ndarray):
            base = value
            while isinstance(base.base, np.ndarray):
                base = base.base
            if base.nbytes:
                lo = base.__array_interface__["data"][0]
                out.append((lo, lo + base.nbytes))
        elif isinstance(value, dict):
            todo += value.values()
        elif isinstance(value, (list, tuple, set, frozenset)):
            todo += value
        elif not isinstance(value, _OPAQUE):
            try:  # never through __getattr__: a proxy's would make a remote call
                attrs = object.__getattribute__(value, "__dict__")
            except (AttributeError, TypeError):
                continue
            if isinstance(attrs, dict):
                todo += attrs.values()
    return out


# Values whose attributes are no object's state (a module's would be walked whole).
_OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    str,
    bytes,
    int,
    float,
)


def _process_start(pid: int) -> float | None:
    """A process's start time (None if it does not exist): PID plus this names one process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0 if os.path.exists(f"/proc/{pid}") else None
