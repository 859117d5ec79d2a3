"""The heap: a backend's live objects and everything done to them.

This is the backend's pure core: no gRPC here. The servicer decodes a
request, calls the heap, and encodes what it returns.

- Every object has a lock that is re-entrant per *call chain* (not per
  thread), so a call that goes A -> B -> A across backends finds A's lock
  already held by its own chain and proceeds instead of deadlocking.
- After a call that may have changed its object, the object's state is
  pickled and compared (by digest) with what was last stored: only a real
  change is written. Read-only methods (``@readonly``) and attribute reads
  skip this. Objects larger than ``big_object`` are not re-pickled after
  every call: they are marked dirty and checkpointed in the background
  (write-behind, within ``flush_interval``).
- With a memory limit, the least recently used objects are written out and
  dropped from memory, and loaded back on their next use.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable

from .. import objects as objmod
from ..errors import (ClassNotFound, DeadlineExceeded, NotPersistent, ObjectNotFound,
                      TaskTimeout)
from ..objects import DEL_ATTR, GET_ATTR, METHOD, SET_ATTR, StorageObject
from ..serialization import PickleContext, UnpickleContext, dumps, loads
from .storage import Record, Storage

log = logging.getLogger("claypot.heap")

_SNAPSHOT_LOCK_WAIT = 1.0  # seconds the checkpointer waits for a busy object's lock


class ChainLock:
    """A lock that is re-entrant for one call chain, whatever thread carries it."""

    __slots__ = ("_cond", "_owner", "_depth")

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: str | None = None
        self._depth = 0

    def acquire(self, chain: str, timeout: float | None = None) -> None:
        with self._cond:
            if self._owner == chain:
                self._depth += 1
                return
            if self._owner is not None:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._owner is not None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise DeadlineExceeded("timed out waiting for the object's lock")
                    self._cond.wait(remaining)
            self._owner = chain
            self._depth = 1

    def try_acquire(self, chain: str) -> bool:
        """Take the lock only if it is free right now (never waits)."""
        with self._cond:
            if self._owner is not None:
                return False
            self._owner = chain
            self._depth = 1
            return True

    def release(self) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify()

    @property
    def held(self) -> bool:
        return self._owner is not None


class Entry:
    """Bookkeeping for one object; ``obj`` is None while it is spilled to disk."""

    __slots__ = ("object_id", "obj", "class_key", "alias", "lock", "size", "digest", "big")

    def __init__(self, object_id: str, class_key: str, alias: str):
        self.object_id = object_id
        self.obj: Any = None
        self.class_key = class_key
        self.alias = alias
        self.lock = ChainLock()
        self.size = 0
        self.digest = b""
        self.big = False


def digest_of(payload, buffers) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(payload)
    for b in buffers:
        h.update(b)
    return h.digest()


class CodeCache:
    """Classes and task functions by code key: memory, then the registry, then import."""

    def __init__(self, fetch: Callable[[str], bytes | None]):
        self._fetch = fetch
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: str):
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            code = self._fetch(key)
            if code:
                from ..serialization import load_code, remember_code
                obj = load_code(code)
                remember_code(key, obj)
            else:
                obj = import_by_key(key)
            self._cache[key] = obj
            return obj

    def put(self, key: str, obj) -> None:
        self._cache[key] = obj


def import_by_key(key: str):
    """Import 'module:qualname[#digest]' by name."""
    import importlib
    name = key.split("#", 1)[0]
    module, _, qualname = name.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except Exception as exc:
        raise ClassNotFound(
            f"class or function {name!r} was not shipped to the cluster and cannot be "
            f"imported on the backend: {exc}") from None


class Heap:
    """The live objects of one backend (see the module docstring)."""

    def __init__(self, backend_id: str, storage: Storage, code: CodeCache, directory,
                 big_object: int = 64 * 1024 * 1024, memory_budget: int = 0,
                 lock_timeout: float | None = None):
        self.backend_id = backend_id
        self.storage = storage
        self.code = code
        self.directory = directory
        self.big_object = big_object
        self.memory_budget = memory_budget
        self.lock_timeout = lock_timeout
        self._table: dict[str, Entry] = {}
        self._resident: OrderedDict[str, Entry] = OrderedDict()
        self._resident_bytes = 0
        self._largest = 0  # bytes of the largest object seen: headroom for one arriving
        self._table_lock = threading.RLock()
        self._stored_ids = storage.object_ids(at_start=True)
        self.moved: dict[str, str] = {}  # object id -> backend it moved to
        self.running_tasks = 0
        self.evictions = 0
        self.remote_call: Callable | None = None  # set by the server: calls other backends
        self.on_change: Callable[[], None] | None = None  # the object count changed
        storage.checkpoint_live = self._checkpoint_live
        if memory_budget:
            _release_big_frees_to_os()

    # -- lookup ----------------------------------------------------------------
    def count(self) -> int:
        with self._table_lock:
            return len(self._stored_ids | set(self._table))

    def resident_count(self) -> int:
        return len(self._resident)

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    def has(self, object_id: str) -> bool:
        with self._table_lock:
            return object_id in self._table or object_id in self._stored_ids

    def entry(self, object_id: str) -> Entry:
        """The object's entry with the object in memory (loaded if spilled)."""
        with self._table_lock:
            entry = self._table.get(object_id)
            if entry is None:
                if object_id not in self._stored_ids:
                    raise ObjectNotFound(f"object {object_id} is not on backend {self.backend_id}")
                entry = Entry(object_id, "", "")
                self._table[object_id] = entry
            if entry.obj is not None:
                self._resident.move_to_end(object_id)
                return entry
            rec = self.storage.read(object_id)
            self._load(entry, rec)
        self._enforce_memory()
        return entry

    def _load(self, entry: Entry, rec: Record) -> None:
        cls = self.code.get(rec.class_key)
        obj = cls.__new__(cls)
        obj.__setstate__(loads(rec.payload, rec.buffers, self.unpickle_context()))
        objmod.attach_identity(obj, entry.object_id, rec.class_key, self.backend_id)
        entry.obj = obj
        entry.class_key = rec.class_key
        entry.alias = rec.alias
        entry.size = rec.size()
        entry.big = entry.size > self.big_object
        entry.digest = b"" if entry.big else digest_of(rec.payload, rec.buffers)
        self._resident[entry.object_id] = entry
        self._resident_bytes += entry.size
        self._largest = max(self._largest, entry.size)

    # -- contexts ------------------------------------------------------------------
    def unpickle_context(self) -> UnpickleContext:
        return UnpickleContext(self._load_ref)

    def _load_ref(self, object_id: str, class_key: str, backend_id: str):
        cls = self.code.get(class_key)
        owner = self.backend_id if self.has(object_id) else backend_id
        return objmod.make_proxy(cls, object_id, class_key, owner)

    def pickle_context(self, chain: str) -> PickleContext:
        """Objects first seen here are made persistent on this backend."""
        return PickleContext(lambda obj: self.adopt_local(obj, chain))

    # -- persist ---------------------------------------------------------------------
    def persist(self, items: list[tuple[str, str, Any, list, str]], adopt: bool = False) -> None:
        """Store new objects: (object_id, class_key, payload, buffers, alias) each.

        All or none: an unknown class, a bad pickle or a taken alias stores nothing.
        With ``adopt`` the ids are already in the directory (a move).
        """
        built = []
        ctx = self.unpickle_context()
        for oid, key, payload, buffers, alias in items:
            if self.has(oid) and not adopt:
                raise _duplicate_id(oid)
            cls = self.code.get(key)
            if not (isinstance(cls, type) and issubclass(cls, StorageObject)):
                raise ClassNotFound(f"{key} is not a StorageObject class")
            obj = cls.__new__(cls)
            obj.__setstate__(loads(payload, buffers, ctx))
            objmod.attach_identity(obj, oid, key, self.backend_id)
            built.append((oid, key, payload, buffers, alias, obj))
        if not adopt:
            self.directory.claim([(oid, self.backend_id, key, alias)
                                  for oid, key, _, _, alias, _ in built])
        try:
            for i, (oid, key, payload, buffers, alias, obj) in enumerate(built):
                rec = Record(oid, key, alias or "", payload, buffers)
                if rec.size() > self.big_object:
                    # Under "none" nothing is written on persist, as Storage.write does
                    # for small objects; big ones are written only if spilled.
                    if self.storage.policy != "none":
                        self.storage.write_checkpoint(rec)
                else:
                    self.storage.write(rec, durable=(i == len(built) - 1))
        except BaseException:
            if not adopt:
                for oid, *_ in built:
                    self.directory.forget(oid)
            raise
        with self._table_lock:
            for oid, key, payload, buffers, alias, obj in built:
                entry = Entry(oid, key, alias or "")
                entry.obj = obj
                entry.size = len(payload) + sum(memoryview(b).nbytes for b in buffers)
                entry.big = entry.size > self.big_object
                entry.digest = b"" if entry.big else digest_of(payload, buffers)
                self._table[oid] = entry
                self._stored_ids.add(oid)
                self._resident[oid] = entry
                self._resident_bytes += entry.size
                self._largest = max(self._largest, entry.size)
                self.moved.pop(oid, None)
        self._changed()
        self._enforce_memory()

    def adopt_local(self, obj, chain: str) -> tuple[str, str, str]:
        """Make a StorageObject created inside this backend persistent here.

        The instance itself becomes a local proxy, so whoever holds it goes
        through the heap (locks, logging) from now on.
        """
        from ..serialization import code_key_and_bytes
        key, code = code_key_and_bytes(objmod.real_class(obj))
        if self.directory is not None and code and not self.directory.has_code(key):
            self.directory.put_code(key, code)
        self.code.put(key, objmod.real_class(obj))
        oid = uuid.uuid4().hex
        cls = type(obj)
        real = cls.__new__(cls)
        real.__dict__.update(obj.__dict__)
        payload, buffers = dumps(real.__getstate__(), self.pickle_context(chain))
        self.persist([(oid, key, payload, buffers, "")])
        objmod.turn_into_proxy(obj, oid, key, self.backend_id)
        return oid, key, self.backend_id

    # -- calls ---------------------------------------------------------------------
    def invoke(self, object_id: str, kind: int, name: str, args: tuple, kwargs: dict,
               chain: str) -> Any:
        """Run a method or attribute access on a live object, under its lock."""
        entry = self.entry(object_id)
        entry.lock.acquire(chain, self.lock_timeout)
        try:
            obj = entry.obj
            if obj is None:  # spilled between entry() and the lock
                entry = self.entry(object_id)
                obj = entry.obj
            if kind == METHOD:
                fn = getattr(obj, name)
                result = fn(*args, **kwargs)
                if not getattr(fn, "__claypot_readonly__", False):
                    self._after_change(entry, chain, check=True)
                return result
            if kind == GET_ATTR:
                return getattr(obj, name)
            if kind == SET_ATTR:
                setattr(obj, name, args[0])
                self._after_change(entry, chain, check=False)
                return None
            if kind == DEL_ATTR:
                delattr(obj, name)
                self._after_change(entry, chain, check=False)
                return None
            raise ValueError(f"unknown call kind {kind}")
        finally:
            entry.lock.release()

    def run_task(self, fn, args: tuple, kwargs: dict, mutates: list[str], chain: str,
                 timeout: float = 0.0) -> Any:
        """Run a task function here; objects it may change (INOUT) are locked and logged."""
        entries = []
        for oid in sorted(set(mutates)):
            if self.has(oid):
                entry = self.entry(oid)
                entry.lock.acquire(chain, self.lock_timeout)
                entries.append(entry)
        self.running_tasks += 1
        started = time.monotonic()
        try:
            result = fn(*args, **kwargs)
            if timeout and time.monotonic() - started > timeout:
                raise TaskTimeout(f"task {getattr(fn, '__qualname__', fn)} ran "
                                  f"{time.monotonic() - started:.2f}s, over its time_out "
                                  f"of {timeout}s")
            for entry in entries:
                self._after_change(entry, chain, check=True)
            return result
        finally:
            self.running_tasks -= 1
            for entry in entries:
                entry.lock.release()

    def _after_change(self, entry: Entry, chain: str, check: bool) -> None:
        """Store the object's new state if it changed (see the module docstring)."""
        if self.storage.policy == "none":
            return
        if entry.big:
            self.storage.mark_dirty(entry.object_id)
            return
        payload, buffers = dumps(entry.obj.__getstate__(), self.pickle_context(chain))
        size = len(payload) + sum(memoryview(b).nbytes for b in buffers)
        if size > self.big_object:
            entry.big = True
            entry.digest = b""
            self.storage.mark_dirty(entry.object_id)
        else:
            digest = digest_of(payload, buffers)
            if check and digest == entry.digest:
                return
            entry.digest = digest
            self.storage.write(Record(entry.object_id, entry.class_key, entry.alias,
                                      payload, buffers))
        with self._table_lock:
            if entry.obj is not None and entry.object_id in self._resident:
                self._resident_bytes += size - entry.size
            entry.size = size
            self._largest = max(self._largest, size)
        self._enforce_memory()

    def _checkpoint_live(self, object_id: str) -> bool:
        """Write a write-behind object's checkpoint from its live state, under its lock.

        The file is written while the lock is held, so no newer state (written
        by a spill, or changed by a call) can be overtaken by this one landing
        late. Returns False when the object is gone or spilled (a spill writes
        the object itself first).
        """
        with self._table_lock:
            entry = self._table.get(object_id)
        if entry is None or entry.obj is None:
            return False
        # Bounded wait: a long method holding the lock must not stall the checkpointer
        # (or a graceful stop); the storage keeps the object dirty and retries.
        entry.lock.acquire("checkpointer:" + object_id, _SNAPSHOT_LOCK_WAIT)
        try:
            if entry.obj is None:
                return False
            payload, buffers = dumps(entry.obj.__getstate__(), self.pickle_context("checkpoint"))
            self.storage.write_checkpoint(Record(object_id, entry.class_key, entry.alias,
                                                 payload, [b.raw() for b in buffers]),
                                          clear_dirty=True)
            return True
        finally:
            entry.lock.release()

    # -- state out ---------------------------------------------------------------------
    def export(self, object_id: str, chain: str) -> tuple[str, str, bytes, list]:
        """(class_key, alias, payload, buffers) of an object, for a move."""
        entry = self.entry(object_id)
        payload, buffers = dumps(entry.obj.__getstate__(), self.pickle_context(chain))
        return entry.class_key, entry.alias, payload, buffers

    def set_alias(self, object_id: str, alias: str, chain: str = "alias") -> None:
        """Record the object's alias in its stored state (for repair)."""
        entry = self.entry(object_id)
        entry.lock.acquire(chain, self.lock_timeout)
        try:
            entry.alias = alias
            if self.storage.policy != "none":
                payload, buffers = dumps(entry.obj.__getstate__(), self.pickle_context(chain))
                rec = Record(object_id, entry.class_key, alias, payload, buffers)
                if entry.big:
                    # Straight to its checkpoint: a big object's state never goes in the log.
                    self.storage.write_checkpoint(rec)
                else:
                    self.storage.write(rec)
        finally:
            entry.lock.release()

    def drop(self, object_id: str, moved_to: str | None = None) -> None:
        """Remove an object (deleted, or moved to another backend)."""
        with self._table_lock:
            if not self.has(object_id):
                raise ObjectNotFound(f"object {object_id} is not on backend {self.backend_id}")
            self.storage.delete(object_id)
            entry = self._table.pop(object_id, None)
            self._stored_ids.discard(object_id)
            if entry is not None and self._resident.pop(object_id, None) is not None:
                self._resident_bytes -= entry.size
            if moved_to:
                self.moved[object_id] = moved_to
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- memory ------------------------------------------------------------------------
    def _enforce_memory(self) -> None:
        """Spill least recently used objects until the resident bytes are back under budget.

        Room for one more object as large as the largest seen is kept free,
        since the next value arriving (a persist, or a load from disk) lands
        in memory before anything can be spilled for it. Spilling down to 3/4
        of that (not just under it) makes the next few loads free instead of
        spilling one object per call. The most recently used object is never
        spilled: it is the one being served.
        """
        if not self.memory_budget:
            return
        budget = max(self.memory_budget - self._largest, self.memory_budget // 4)
        if self._resident_bytes <= budget:
            return
        target = int(budget * 0.75)
        spilled = 0
        with self._table_lock:
            for oid in list(self._resident)[:-1]:
                if self._resident_bytes <= target:
                    break
                entry = self._resident[oid]
                # try_acquire, not a check of .held: a call may take the lock right
                # after such a check and then find its object gone.
                if not entry.lock.try_acquire("spill:" + oid):
                    continue
                try:
                    self._spill(entry)
                    spilled += 1
                finally:
                    entry.lock.release()
        if spilled:
            _trim_malloc()

    def _spill(self, entry: Entry) -> None:
        """Write the object out if the disk lacks its latest state, then drop it from memory.

        Small objects under ``sync``/``async`` are already in the log or their
        checkpoint; a big one is written only if it changed since its last
        checkpoint (write-behind); under ``none`` nothing else is on disk.
        """
        if self.storage.policy == "none" or (entry.big and
                                             self.storage.is_dirty(entry.object_id)):
            payload, buffers = dumps(entry.obj.__getstate__(), self.pickle_context("spill"))
            self.storage.write_checkpoint(Record(entry.object_id, entry.class_key, entry.alias,
                                                 payload, buffers))
        entry.obj = None
        del self._resident[entry.object_id]
        self._resident_bytes -= entry.size
        self.evictions += 1


_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            import ctypes
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - raises AttributeError when not glibc
        except (OSError, AttributeError):
            _libc = False
    return _libc


def _trim_malloc() -> None:
    """Give the free memory of every malloc arena back to the OS (after a spill).

    gRPC threads each allocate message slices from their own arena; what
    they free stays in the process unless trimmed, which showed up as
    tens of MiB of RSS over the budget in the memory-limit test.
    """
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def _release_big_frees_to_os() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap.

    By default glibc raises that threshold each time such a block is freed
    (up to 32 MiB), after which stream chunks and unpickled buffers come from
    the heap, and the memory of spilled objects stays in the process as
    fragmented free space: RSS would keep growing past the memory limit even
    though the heap dropped the objects. A fixed threshold returns it at once.
    """
    libc = _glibc()
    if libc:  # else not glibc: its allocator's own policy applies
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)


def _duplicate_id(oid: str):
    from ..errors import ProtocolError
    return ProtocolError(f"object id {oid} is already stored on this backend")


__all__ = ["Heap", "ChainLock", "CodeCache", "Entry", "NotPersistent"]
