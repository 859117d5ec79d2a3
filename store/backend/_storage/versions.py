"""Change words: same-host readers reuse a leased view without asking the backend.

A same-host read of a large array attribute returns a leased read-only view
of the backend's segment (:mod:`store.backend._storage.segments`). Reading the same
attribute again would cost a round trip only to learn that nothing changed.
Instead the backend keeps a small shared-memory table of 64-bit words, one
slot per object that same-host readers read this way:

- Word 0 is the table's header: 1 while the backend serves, 0 once it stopped.
- A slot's word takes a new value, never used before in this table, whenever
  a change of its object starts (odd: a change runs), a change ends (even),
  or the object leaves (deleted, moved away, replicated: odd, and the slot
  is given to another object later with yet another value).
- The word is set under the segments' lock, in the same step that marks the
  object busy: a lease taken before that step is copied aside before the
  change writes (copy-on-write), one taken after it waits for the change's
  end. So a view leased while the word read ``v`` (even), with ``v`` still
  the word when the lease was granted, shows the object's state at ``v``.

A reader that finds the word still at ``v`` may hand out that view again:
the read is ordered before any change that starts later, and after every
change that ended before (linearizable). The reader's side is
:mod:`store._client.readcache`. Only plain attribute reads whose value is one numpy
array get a word: a method or a property may compute anything (the time,
other objects' state) and an attribute holding a container may share
mutable parts with other objects, which their changes would not announce
here.

The table's name carries the backend's PID (an orphan sweep after a
``kill -9`` removes it, like any kept segment): a reader checks that the file
it mapped is still there and its backend alive, so a restarted backend's
objects (which may have come back older, from disk) are never read through
an old table.
"""

from __future__ import annotations

from collections.abc import Iterable
import mmap
import os

from store._client import shm

SLOTS = 65536  # objects with a word at once; past it, reads take the round trip


class Versions:
    """The change words of one backend (see the module docstring).

    Every method except :meth:`close` is called with the segments' lock held.
    """

    def __init__(self, slots: int = SLOTS):
        self.name = shm.kept_name()
        path = os.path.join(shm.SHM_DIR, self.name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, 8 * (slots + 1))
            self._map = mmap.mmap(fd, 8 * (slots + 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("Q")
        self._slots = slots
        self._free = list(range(slots, 0, -1))  # slot 0 is the header
        self._slot: dict[str, int] = {}
        self._busy: dict[str, int] = {}
        self._segments: dict[str, set[str]] = {}  # object id -> segments its words cover
        self._clock = 0
        self._words[0] = 1

    def _next(self, odd: bool) -> int:
        self._clock += 1
        return 2 * self._clock + (1 if odd else 0)

    # -- objects -------------------------------------------------------------------------
    def open_locked(self, object_id: str) -> tuple[int, int]:
        """``object_id``'s slot and word, giving it a slot if it has none; (0, 0) if full."""
        slot = self._slot.get(object_id)
        if slot is None:
            if not self._free:
                return 0, 0
            slot = self._free.pop()
            self._slot[object_id] = slot
            self._words[slot] = self._next(bool(self._busy.get(object_id)))
        return slot, self._words[slot]

    def valid_locked(self, object_id: str, slot: int, word: int, names: Iterable[str]) -> bool:
        """Whether a view of ``names`` read while the word was ``word`` may be reused."""
        if not slot or word % 2 or self._slot.get(object_id) != slot or self._words[slot] != word:
            return False
        self._segments.setdefault(object_id, set()).update(names)
        return True

    def changing_locked(self, object_id: str, names: Iterable[str]) -> None:
        """A change of ``object_id`` starts; it may write the segments ``names``.

        Objects whose words cover one of those segments (an array shared by
        reference between two objects) change with it.
        """
        self._busy[object_id] = self._busy.get(object_id, 0) + 1
        touched = {object_id}
        if names:
            names = set(names)
            touched.update(oid for oid, segs in self._segments.items() if segs & names)
        for oid in touched:
            slot = self._slot.get(oid)
            if slot is not None:
                self._words[slot] = self._next(True)

    def changed_locked(self, object_id: str) -> None:
        """The change :meth:`changing_locked` announced is over."""
        n = self._busy.get(object_id, 0) - 1
        if n > 0:
            self._busy[object_id] = n
        else:
            self._busy.pop(object_id, None)
        slot = self._slot.get(object_id)
        if slot is not None:
            self._words[slot] = self._next(n > 0)

    def gone_locked(self, object_id: str) -> None:
        """``object_id`` left (deleted, moved, replicated): its word ends for good."""
        slot = self._slot.pop(object_id, None)
        self._segments.pop(object_id, None)
        if slot is not None:
            self._words[slot] = self._next(True)
            self._free.append(slot)

    def close(self) -> None:
        """The backend stops: readers see the header cleared and the file gone."""
        try:
            self._words[0] = 0
        except ValueError:
            return  # closed already
        self._words.release()
        self._map.close()
        shm.discard([self.name])
