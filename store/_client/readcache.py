"""Same-host attribute reads without a round trip, while the object has not changed.

A backend may answer a same-host read of a large array attribute with a
leased view *and* a change word: a slot of a small shared-memory table it
keeps, and the word's value when the read began (see
:mod:`store.backend._storage.versions`). This process remembers (object, attribute)
-> (that view, the slot, the word). The next read of the same attribute
returns a new array over the same view, with no RPC, when all of these hold:

- the word in the backend's table is still the remembered one (no change of
  the object started since, it was not deleted, moved or given replicas);
- the table is still the backend's current one: its header says it serves,
  its file is still in /dev/shm, and its backend process is alive (a
  restarted backend uses a new table, and its objects may have come back
  older, from disk);
- this process still holds the view somewhere (an array from an earlier read
  is alive), so its lease holds: the cache keeps only weak references, and
  never keeps a lease, or the backend's memory, for itself.

Such a read is linearizable: it returns the state of the last change that
ended before it, and a change that starts later is ordered after it. Only
plain attribute reads (``obj.attr``) whose value is one numpy array qualify;
the backend decides which (methods, properties and containers never do).
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from store._client import shm

_MAX_ENTRIES = 4096


@dataclass
class _Table:
    words: memoryview  # the table as 64-bit words, mapped read-only
    path: str
    inode: int
    pid: int


@dataclass
class _Entry:
    table: _Table
    slot: int
    word: int
    payload: bytes
    views: list  # (weak reference to a leased mapping, offset, size) per buffer


class ReadCache:
    """Views this process may hand out again while their objects stay unchanged."""

    def __init__(self):
        self._mu = threading.Lock()
        self._tables: dict[str, _Table] = {}
        self._entries: dict[tuple[str, str], _Entry] = {}
        self.reused = 0  # reads answered here, without an RPC

    def remember(
        self,
        key: tuple[str, str],
        table: str,
        slot: int,
        word: int,
        pid: int,
        payload: bytes,
        views: list[memoryview],
        offsets: list[int],
    ) -> None:
        """Keep a read's leased views under ``key`` (object id, attribute).

        ``views[i]`` is ``offsets[i]`` bytes into its mapping (``views[i].obj``),
        whose life is the lease's.
        """
        if not slot or not views:
            return
        try:
            mapped = self._table(table, pid)
            if slot >= len(mapped.words):
                return
            if len(offsets) != len(views):
                return
            refs = [(weakref.ref(v.obj), off, v.nbytes) for v, off in zip(views, offsets)]
        except (OSError, ValueError, TypeError):
            return  # no reuse; the read itself went through
        except Exception:  # a malformed name (ProtocolError): likewise
            return
        with self._mu:
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = _Entry(mapped, slot, word, bytes(payload), refs)

    def _table(self, name: str, pid: int) -> _Table:
        with self._mu:
            known = self._tables.get(name)
        if known is not None:
            return known
        path = os.path.join(shm.SHM_DIR, name)
        size = os.stat(path).st_size
        view = shm.map_readonly(name, 0, size - size % 8)
        table = _Table(view.cast("Q"), path, os.stat(path).st_ino, pid)
        with self._mu:
            # Tables of backends that stopped are dropped as new ones come.
            for old in [n for n, t in self._tables.items() if not _serving(t)]:
                del self._tables[old]
            return self._tables.setdefault(name, table)

    def get(self, key: tuple[str, str], loads: Callable[[bytes, list], Any]) -> tuple[bool, Any]:
        """(True, value) when the read may be answered here, else (False, None)."""
        with self._mu:
            entry = self._entries.get(key)
        if entry is None:
            return False, None
        regions = [r() for r, _, _ in entry.views]
        if any(m is None for m in regions) or entry.table.words[entry.slot] != entry.word or not _serving(entry.table):
            with self._mu:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            return False, None
        # The word held when checked: the read is ordered there. The views show the
        # state at that word whatever happens next (a change copies them aside first).
        views = [memoryview(m)[off : off + size] for m, (_, off, size) in zip(regions, entry.views)]
        value = loads(entry.payload, views)
        self.reused += 1
        return True, value

    def forget(self, key: tuple[str, str]) -> None:
        """Drop ``key`` (this process changed the object, or read it another way)."""
        with self._mu:
            self._entries.pop(key, None)


def _serving(table: _Table) -> bool:
    """Whether the table's backend still serves with it (see the module docstring)."""
    if table.words[0] != 1:
        return False
    try:
        if os.stat(table.path).st_ino != table.inode:
            return False
        os.kill(table.pid, 0)
    except PermissionError:
        return True  # a process of another user: alive
    except OSError:
        return False
    return True
