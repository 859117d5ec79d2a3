"""Segments a backend keeps in /dev/shm, and the leases same-host readers hold on them.

A same-host ``make_persistent`` leaves an object's large buffers in the
segments the client wrote (or built them in, see ``store.empty``): the
backend takes each file over (:func:`store.shm.keep`) and the object's arrays
are a *private* mapping of it. So:

- A same-host read of such a buffer costs no copy: the reply names the
  segment and an offset, the reader maps it read-only, and holds a lease.
- The file is never written after it was taken over: a changing method's
  in-place writes land in the backend's private pages (the kernel copies
  each page on its first write: copy-on-write at page granularity, costing
  at most one memcpy of what the method changes), so a reader's view is the
  state it was given, whole, for as long as it keeps it.
- Before a changing (non-``@readonly``) method, a task that may change the
  object, a move or a delete, the heap reports the object here: its segments
  stop being handed out (they no longer describe the object), and each is
  unlinked as soon as no lease holds it. Reads then get a copy, as before.
- A lease ends when the reader's view is garbage collected (the reader
  returns it, :meth:`Segments.release`) or the reader process dies (its PID
  is checked on a timer, :meth:`Segments.sweep`; a PID reused by a younger
  process counts as dead).
- Leased bytes are bounded by ``limit``: past it, reads get copies. Leased
  segments that no live object uses any more are memory the heap does not
  count, so they are reported to the lifecycle as extra resident bytes
  (``on_stale_bytes``), and spilling makes room for them.

A backend killed with ``kill -9`` leaves its segments behind; they carry its
PID in their names, so the next start's orphan sweep removes them
(:func:`store.shm.remove_orphans`). A restart never reads them: objects come
back from the storage directory.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .. import shm


@dataclass
class Lease:
    """A reader's hold on one segment."""

    segment: str
    pid: int
    started: float   # the reader process's start time, to tell a reused PID


@dataclass
class Segment:
    """A file in /dev/shm that holds one buffer of one persisted object."""

    name: str
    size: int
    start: int                       # address of the backend's private mapping
    region: weakref.ref              # the mapping: dead once the object dropped it
    object_id: str = ""              # "" until the persist that brought it committed
    current: bool = True             # still the object's state (no change since)
    leases: set[str] = field(default_factory=set)


class Segments:
    """The segments of one backend and their leases (see the module docstring)."""

    def __init__(self, limit: int, on_stale_bytes: Callable[[int], None] | None = None):
        self.limit = limit
        self.on_stale_bytes = on_stale_bytes
        self._mu = threading.Lock()
        self._segments: dict[str, Segment] = {}
        self._by_object: dict[str, list[str]] = {}
        self._leases: dict[str, Lease] = {}
        self._starts: list[tuple[int, int, str]] = []   # (start, end, name), for lookups
        self._reported_stale = 0

    # -- taking segments over ------------------------------------------------------------
    def keep(self, names: Sequence[str], sizes: Sequence[int]) -> tuple[list, list[str]]:
        """Take a persist's segments over; returns (buffers, kept names)."""
        kept = shm.keep(names, sizes)
        buffers, mine = [], []
        with self._mu:
            for name, region in kept:
                if region is None:
                    buffers.append(bytearray())
                    continue
                start = shm.buffer_address(region)
                if start is None:   # numpy absent: an ordinary private buffer, never leased
                    buffers.append(memoryview(region))
                    shm.discard([name])
                    continue
                seg = Segment(name, len(region), start, weakref.ref(region))
                self._segments[name] = seg
                self._starts.append((start, start + seg.size, name))
                buffers.append(memoryview(region))
                mine.append(name)
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
        """The persist failed: forget its segments."""
        with self._mu:
            for name in names:
                seg = self._segments.get(name)
                if seg is not None:
                    seg.current = False
            drop = self._collect_locked()
        self._finish(drop)

    def changing(self, object_id: str) -> None:
        """``object_id`` may change (or leave): its segments no longer describe it."""
        with self._mu:
            names = self._by_object.pop(object_id, None)
            if not names:
                return
            for name in names:
                seg = self._segments.get(name)
                if seg is not None:
                    seg.current = False
            drop = self._collect_locked()
        self._finish(drop)

    # -- leases ----------------------------------------------------------------------------
    def lease(self, buffers: Sequence, pid: int) -> list[tuple[str, int, str]] | None:
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
            found = []
            for start, nbytes in addresses:
                seg = self._find_locked(start, nbytes)
                if seg is None:
                    return None
                found.append((seg, start - seg.start))
            extra = sum(seg.size for seg in {s.name: s for s, _ in found}.values()
                        if not seg.leases)
            if self.leased_bytes_locked() + extra > self.limit:
                return None
            out = []
            for seg, offset in found:
                lease_id = uuid.uuid4().hex
                self._leases[lease_id] = Lease(seg.name, pid, started)
                seg.leases.add(lease_id)
                out.append((seg.name, offset, lease_id))
            return out

    def _find_locked(self, start: int, nbytes: int) -> Segment | None:
        for lo, hi, name in self._starts:
            if lo <= start and start + nbytes <= hi:
                seg = self._segments.get(name)
                # A dead mapping's addresses may belong to a new one: never trust them.
                if seg is None or not seg.current or seg.region() is None:
                    return None
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
        # longer the object's state either.
        with self._mu:
            for seg in self._segments.values():
                if seg.current and seg.region() is None:
                    seg.current = False
        return self.release(dead) if dead else self.release([])

    # -- bookkeeping -------------------------------------------------------------------------
    def leased_bytes_locked(self) -> int:
        return sum(seg.size for seg in self._segments.values() if seg.leases)

    def _collect_locked(self) -> list[str]:
        """Segments neither current nor leased: forget them (their files go)."""
        drop = [name for name, seg in self._segments.items()
                if not seg.current and not seg.leases]
        for name in drop:
            seg = self._segments.pop(name)
            names = self._by_object.get(seg.object_id)
            if names and name in names:
                names.remove(name)
        if drop:
            gone = set(drop)
            self._starts = [t for t in self._starts if t[2] not in gone]
        return drop

    def _finish(self, drop: list[str]) -> None:
        shm.discard(drop)
        if self.on_stale_bytes is None:
            return
        stale = self.stats()["stale_leased_bytes"]
        if stale != self._reported_stale:
            self._reported_stale = stale
            self.on_stale_bytes(stale)

    def stats(self) -> dict:
        """Bytes and counts of segments and leases (reported by the Leases RPC)."""
        with self._mu:
            return {
                "segments": len(self._segments),
                "segment_bytes": sum(s.size for s in self._segments.values()),
                "leases": len(self._leases),
                "leased_bytes": self.leased_bytes_locked(),
                "stale_leased_bytes": sum(s.size for s in self._segments.values()
                                          if s.leases and not s.current),
                "limit": self.limit,
            }

    def close(self) -> None:
        """The backend stops: unlink every segment (readers keep their mappings)."""
        with self._mu:
            names = list(self._segments)
            self._segments.clear()
            self._by_object.clear()
            self._leases.clear()
            self._starts = []
        shm.discard(names)


def _process_start(pid: int) -> float | None:
    """A process's start time (None if it does not exist): PID plus this names one process."""
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0 if os.path.exists(f"/proc/{pid}") else None
