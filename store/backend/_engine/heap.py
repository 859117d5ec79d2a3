"""The heap: a backend's live objects and everything done to them.

No gRPC here: the servicer decodes a request, calls the heap, and encodes
what it returns. Every rule about an object's life (which state it is in,
what a transition must write, publish or drop) lives in the pure
:mod:`.lifecycle` core; the heap reports events to it under one short mutex
and carries out the instructions it returns outside that mutex.

- Every object has a lock that is re-entrant per *call chain* (not per
  thread), so a call that goes A -> B -> A across backends finds A's lock
  already held by its own chain and proceeds instead of deadlocking.
- A call is admitted by the lifecycle, and admitted again once it holds the
  object's lock: a call queued behind a move or delete is refused with
  ``ObjectMoved`` (the client follows it) or ``ObjectNotFound``, and never
  runs on the orphaned instance.
- Methods are atomic: after the outermost call of a chain on an object
  returns, its state is pickled and compared (by digest) with what was last
  stored, and only a real change is logged (read-only methods skip this).
  A method that raises leaves its object in its last acknowledged state:
  small objects are rebuilt from the stored bytes; objects over
  ``big_object`` keep their in-place changes, which are checkpointed before
  the exception returns, so memory and disk agree.
- Objects over ``big_object`` are not re-pickled after every call: they are
  marked dirty and checkpointed in the background (write-behind, within
  ``flush_interval``).
- Disk I/O (loads, spills, checkpoints) happens under the object's own lock
  only, never under the mutex every call needs.
- With a memory limit, the least recently used objects are written out and
  dropped from memory, and loaded back on their next use.
"""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable

from store._model import objects as objmod
from store.errors import (
    ClassNotFound,
    DeadlineExceeded,
    NotPersistent,
    ObjectBusy,
    ObjectMoved,
    ObjectNotFound,
    ProtocolError,
    TaskTimeout,
    ValueTooLarge,
)
from store._model.objects import DEL_ATTR, GET_ATTR, METHOD, SET_ATTR, StorageObject
from store._wire.serialization import PickleContext, UnpickleContext, dumps, import_by_key, loads
from store.backend._engine import cancel
from store.backend._core import lifecycle as lc
from store.backend._core.lifecycle import Lifecycle, State
from store.backend._core.replication import CallLedger
from store.backend._storage import storage as storage_mod
from store.backend._storage.storage import Record, Storage

log = logging.getLogger("claypot.heap")

_SNAPSHOT_LOCK_WAIT = 1.0  # seconds the checkpointer waits for a busy object's lock
_TASK_LEDGER = 4096  # finished INOUT task attempts remembered (for retries)
_KEPT_RESULT = 64 * 1024  # bytes of a changing call's result kept for its retries
_NOT_KEPT = (None, [])  # ledger entry of a call whose result was too large or unpicklable


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

    @property
    def owner(self) -> str | None:
        return self._owner

    @property
    def depth(self) -> int:
        return self._depth


class Entry:
    """The live side of one object; ``obj`` is None unless it is resident."""

    __slots__ = ("object_id", "obj", "class_key", "alias", "lock", "digest", "moved_in", "verified")

    def __init__(self, object_id: str, class_key: str, alias: str):
        self.object_id = object_id
        self.obj: Any = None
        self.class_key = class_key
        self.alias = alias
        self.lock = ChainLock()
        self.digest = b""
        self.moved_in = False  # arrived by a move (see storage.Record.moved_in)
        self.verified = False  # the directory was seen to name this backend as its owner

    def record(self, payload: bytes, buffers: list) -> Record:
        """A storage record of this object's state."""
        return Record(self.object_id, self.class_key, self.alias, payload, buffers, moved_in=self.moved_in)


def digest_of(payload: bytes | memoryview, buffers: Sequence) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(payload)
    for b in buffers:
        h.update(b)
    return h.digest()


def _nbytes(payload, buffers) -> int:
    return len(payload) + sum(memoryview(b).nbytes for b in buffers)


class CodeCache:
    """Classes and task functions by code key: memory, this backend's disk, the registry,
    then import.

    Code found in the registry is remembered as bytes, so that storing an
    object can keep its class's code in the storage dir too.
    """

    def __init__(self, fetch: Callable[[str], bytes | None], storage: Storage | None = None):
        self._fetch = fetch
        self._storage = storage
        self._cache: dict[str, Any] = {}
        self._raw: dict[str, bytes] = {}
        self._saved: set[str] = set()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            code = self._storage.load_code(key) if self._storage is not None else None
            if code:
                self._saved.add(key)
            else:
                try:
                    code = self._fetch(key)
                except Exception:
                    code = None  # the registry is unreachable: try an import
            if code:
                from store._wire.serialization import load_code, remember_code

                obj = load_code(code)
                remember_code(key, obj)
                self._raw[key] = bytes(code)
            else:
                obj = import_by_key(key)
            self._cache[key] = obj
            return obj

    def put(self, key: str, obj: Any, code: bytes | None = None) -> None:
        self._cache[key] = obj
        if code:
            self._raw[key] = bytes(code)

    def keep_on_disk(self, key: str) -> None:
        """Store the code of ``key`` in the storage dir (once), if it came by value."""
        if self._storage is None or key in self._saved:
            return
        code = self._raw.get(key)
        if code is None:
            try:
                code = self._fetch(key)
            except Exception:
                code = None
        if code:
            self._storage.save_code(key, code)
            self._saved.add(key)


class _TaskLedger:
    """Attempts of tasks that change objects, by task key: a retry never applies twice.

    A retry of a task whose earlier attempt is still running here waits for
    it; if that attempt committed, the retry returns its result instead of
    running again; if it failed (and was rolled back), the retry runs.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._items: OrderedDict[str, list] = OrderedDict()  # key -> [event, done, result]

    def begin(self, key: str, timeout: float | None):
        """(True, None) to run the attempt, or (False, result) of a committed one."""
        while True:
            with self._lock:
                item = self._items.get(key)
                if item is None or (item[0].is_set() and not item[1]):
                    self._items[key] = [threading.Event(), False, None]
                    while len(self._items) > _TASK_LEDGER:
                        self._items.popitem(last=False)
                    return True, None
                event = item[0]
                if event.is_set():
                    return False, item[2]
            if not event.wait(timeout):
                raise DeadlineExceeded("timed out waiting for an earlier attempt of this task")

    def end(self, key: str, committed: bool, result=None) -> None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                item[1], item[2] = committed, (result if committed else None)
                item[0].set()


class Heap:
    """The live objects of one backend (see the module docstring)."""

    def __init__(
        self,
        backend_id: str,
        storage: Storage,
        code: CodeCache,
        directory,
        big_object: int = 64 * 1024 * 1024,
        memory_budget: int = 0,
        lock_timeout: float | None = None,
    ):
        self.backend_id = backend_id
        self.storage = storage
        self.code = code
        self.directory = directory
        self.big_object = big_object
        self.memory_budget = memory_budget
        self.lock_timeout = lock_timeout
        self.life = Lifecycle(memory_budget)
        self._mu = threading.Lock()  # guards self.life and self._entries; never held for I/O
        self._entries: dict[str, Entry] = {}
        self.life.stored_at_start(storage.object_ids(at_start=True))
        self._tasks = _TaskLedger()
        self._persisting: dict[str, threading.Event] = {}  # ids a persist is storing now
        # Ids claimed in the directory while their fsync ran, fsync'd since: the next
        # claim takes them out of the directory's set of unsynced claims.
        self._settled_claims: list[str] = []
        self.running_tasks = 0
        self.evictions = 0
        self.remote_call: Callable | None = None  # set by the server: calls other backends
        self.on_change: Callable[[], None] | None = None  # the object count changed
        # Shared-memory segments readers lease (see .segments): told, under the object's
        # lock, before and after a call that may change an object (a changing method,
        # an INOUT task), and when an object moves or is deleted.
        self.before_change: Callable[[str], None] | None = None
        self.change_done: Callable[[str], None] | None = None
        self.on_gone: Callable[[str], None] | None = None
        # Set by the server when replication is on: replicate(entry, payload, buffers, call)
        # sends a new state to the object's replicas before it is logged here, and raises
        # (the call is rolled back) unless every replica has it (store.backend._engine.replicas).
        self.replicate: Callable | None = None
        # Recent changing calls with their results, by call id: a retry returns the first
        # result instead of running again (the replicas receive them with each state).
        self.calls = CallLedger()
        # Check the lifecycle's invariants after every transition (tests set it).
        self.validate_each = os.environ.get("CLAYPOT_VALIDATE", "") not in ("", "0")
        storage.checkpoint_live = self._checkpoint_live
        if memory_budget:
            _release_big_frees_to_os()

    # -- lookup ----------------------------------------------------------------
    def count(self) -> int:
        with self._mu:
            return self.life.count()

    def resident_count(self) -> int:
        return self.life.resident_count()

    @property
    def resident_bytes(self) -> int:
        return self.life.resident_bytes

    def has(self, object_id: str) -> bool:
        """Whether the object lives here (live, spilled or being loaded or moved)."""
        with self._mu:
            return self.life.present(object_id)

    def loaded(self, object_id: str) -> Any:
        """The object's live instance if it is in memory now, else None (no lock taken:
        for a look at its state, such as whether an attribute is a large array)."""
        entry = self._entries.get(object_id)
        return None if entry is None else entry.obj

    def held_by(self, object_id: str, chain: str) -> bool:
        """Whether a call of ``chain`` holds the object's lock now (a nested call)."""
        entry = self._entries.get(object_id)
        return entry is not None and bool(chain) and entry.lock.owner == chain

    def admit(self, object_id: str) -> None:
        """Raise ObjectNotFound / ObjectMoved unless the object lives here."""
        with self._mu:
            self.life.admit(object_id, self.backend_id)

    def sizes(self, object_ids: list[str]) -> list[int]:
        """Bytes of each object's state as last measured (0 if unknown or not here)."""
        with self._mu:
            out = []
            for oid in object_ids:
                life = self.life.get(oid)
                out.append(life.size if life is not None else 0)
            return out

    def largest(self, n: int = 10) -> list[dict]:
        """The ``n`` largest objects here by last measured size (for the dashboard)."""
        import heapq

        with self._mu:
            lives = heapq.nlargest(
                n,
                (life for oid, life in self.life._lives.items() if self.life.present(oid)),
                key=lambda life: life.size,
            )
            out = []
            for life in lives:
                entry = self._entries.get(life.object_id)
                out.append(
                    {
                        "object_id": life.object_id,
                        "bytes": life.size,
                        "state": life.state.name.lower(),
                        "class_key": entry.class_key if entry else "",
                        "alias": entry.alias if entry else "",
                    }
                )
            return out

    def state_of(self, object_id: str) -> State | None:
        with self._mu:
            life = self.life.get(object_id)
            return life.state if life is not None else None

    def _entry(self, object_id: str) -> Entry:
        with self._mu:
            self.life.admit(object_id, self.backend_id)
            entry = self._entries.get(object_id)
            if entry is None:
                entry = self._entries[object_id] = Entry(object_id, "", "")
            return entry

    def _acquire(self, object_id: str, chain: str, load: bool = True, verify: bool = True) -> Entry:
        """The object's entry, locked by ``chain`` and admitted again under the lock.

        Loads the object if it is spilled (under its own lock only).
        """
        entry = self._entry(object_id)
        entry.lock.acquire(chain, self.lock_timeout)
        try:
            with self._mu:
                life = self.life.admit(object_id, self.backend_id)  # moved/deleted meanwhile?
                if self._entries.get(object_id) is not entry:
                    raise ObjectNotFound(f"object {object_id} is not on backend {self.backend_id[:8]}")
                self.life.touch(object_id)
                spilled = life.state is State.SPILLED
            if spilled and load:
                self._load(entry)
            if verify and entry.moved_in and not entry.verified:
                self._verify_owner(entry)
        except BaseException:
            entry.lock.release()
            raise
        return entry

    def _verify_owner(self, entry: Entry) -> None:
        """Serve a copy that came by a move only once the directory names this backend.

        Until the move commits (the source updates the directory), the copy is
        not the object: a call that reached it early is sent to the owner the
        directory names. If the directory cannot be asked, the call goes ahead.
        """
        try:
            owner = self.directory.lookup(entry.object_id).backend_id
        except Exception:  # unknown (a wiped directory being republished) or unreachable
            return
        if owner != self.backend_id:
            raise ObjectMoved(
                f"object {entry.object_id} is owned by {owner[:8]}: this copy's move has not committed", owner
            )
        entry.verified = True

    def _load(self, entry: Entry) -> None:
        """Bring a spilled object back into memory (caller holds its lock)."""
        oid = entry.object_id
        with self._mu:
            self.life.load_started(oid)
        try:
            rec = self.storage.read(oid)
            obj = self._build(oid, rec.class_key, rec.payload, rec.buffers)
        except BaseException:
            with self._mu:
                self.life.load_failed(oid)
            raise
        size = rec.size()
        big = size > self.big_object
        with self._mu:
            entry.obj = obj
            entry.class_key, entry.alias = rec.class_key, rec.alias
            entry.moved_in = rec.moved_in
            entry.digest = b"" if big else digest_of(rec.payload, rec.buffers)
            todo = self.life.loaded(oid, size, big)
            self._validate_locked()
        self._perform(todo)

    def _build(self, object_id: str, class_key: str, payload, buffers):
        cls = self.code.get(class_key)
        obj = cls.__new__(cls)
        obj.__setstate__(loads(payload, buffers, self.unpickle_context()))
        objmod.attach_identity(obj, object_id, class_key, self.backend_id)
        return obj

    def pickle_result(self, result: Any, chain: str) -> tuple:
        """A call's result as (payload, buffers of bytes) for the call ledger.

        Results over 64 KiB, or that cannot be pickled, are not kept: a retry of
        their call gets ValueTooLarge instead of a second run.
        """
        if result is None:
            return (b"", [])
        try:
            payload, buffers = dumps(result, self.pickle_context(chain))
        except Exception:
            return _NOT_KEPT  # the reply will say why, as before
        if len(payload) + sum(memoryview(b).nbytes for b in buffers) > _KEPT_RESULT:
            return _NOT_KEPT
        return (bytes(payload), [bytes(memoryview(b)) for b in buffers])

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

        All or none: an unknown class, a bad pickle or a taken alias stores
        nothing. Storage first, then the directory: every object is durable
        before any other process can find it. Idempotent by id: a retried
        persist whose objects are already here succeeds without storing them
        twice. With ``adopt`` the ids are already in the directory (a move).
        """
        # A retry that arrives while its first attempt is still storing the same ids waits
        # for it, then finds them stored (idempotent) instead of storing them again.
        waits = []
        with self._mu:
            for oid, *_ in items:
                ev = self._persisting.get(oid)
                if ev is not None:
                    waits.append(ev)
        for ev in waits:
            ev.wait(self.lock_timeout or 60.0)
        mine = []
        with self._mu:
            for oid, *_ in items:
                if oid not in self._persisting:
                    self._persisting[oid] = threading.Event()
                    mine.append(oid)
        try:
            self._persist(items, adopt)
        finally:
            with self._mu:
                for oid in mine:
                    self._persisting.pop(oid).set()

    def _persist(self, items: list, adopt: bool) -> None:
        built = []
        ctx = self.unpickle_context()
        retried = []
        for oid, key, payload, buffers, alias in items:
            if self.has(oid):
                if adopt:
                    self._drop_stale_copy(oid)
                else:
                    retried.append((oid, self.backend_id, key, alias))
                    continue
            cls = self.code.get(key)
            if not (isinstance(cls, type) and issubclass(cls, StorageObject)):
                raise ClassNotFound(f"{key} is not a StorageObject class")
            obj = cls.__new__(cls)
            obj.__setstate__(loads(payload, buffers, ctx))
            objmod.attach_identity(obj, oid, key, self.backend_id)
            built.append((oid, key, payload, buffers, alias or "", obj))
        for key in {b[1] for b in built}:
            self.code.keep_on_disk(key)
        lsns = []
        try:
            for oid, key, payload, buffers, alias, obj in built:
                rec = Record(oid, key, alias, payload, buffers, moved_in=adopt)
                if rec.size() > self.big_object:
                    if self.storage.policy == "none":
                        lsns.append(0)  # under "none" big objects are written only if spilled
                    else:
                        lsns.append(self.storage.write_checkpoint(rec))
                else:
                    lsns.append(self.storage.write(rec, durable=False))
            if adopt:
                self.storage.sync()  # one fsync acknowledges the whole batch
            else:
                self._claim_while_syncing(
                    [(oid, self.backend_id, key, alias) for oid, key, _, _, alias, _ in built] + retried
                )
        except BaseException:
            for oid, *_ in built:  # nobody was told of them: take them back out
                try:
                    self.storage.delete(oid, durable=False)
                except Exception:
                    pass
            raise
        todo = []
        with self._mu:
            for (oid, key, payload, buffers, alias, obj), lsn in zip(built, lsns):
                if self.life.present(oid):
                    continue  # a concurrent retry of the same persist got here first
                size = _nbytes(payload, buffers)
                big = size > self.big_object
                entry = self._entries.get(oid)
                if entry is None:
                    entry = self._entries[oid] = Entry(oid, key, alias)
                entry.obj, entry.class_key, entry.alias = obj, key, alias
                entry.moved_in = adopt
                entry.digest = b"" if big else digest_of(payload, buffers)
                todo += self.life.persisted(oid, lsn, size, big)
            self._validate_locked()
        if built:
            self._changed()
        self._perform(todo)

    def _claim_while_syncing(self, entries: list) -> None:
        """Claim ``entries`` in the directory while their records are fsync'd: the
        claim is sent to Redis, the batch fsync'd, then Redis's reply read, so
        the fsync and the directory's round trip overlap.

        The call succeeds only if both do. An entry claimed before its fsync
        finished is noted in the directory's set of unsynced claims: if the
        fsync fails its entries are taken back out here, and if the process
        dies first, the restart's reconcile forgets those whose storage is
        missing. Either way no entry outlives the call without stored state.
        """
        if self.storage.policy != "sync" or not entries:
            self.storage.sync()  # a no-op unless there is something to make durable
            self.directory.claim(entries)
            return
        with self._mu:
            settled, self._settled_claims = self._settled_claims, []
        finish = self.directory.claim_unsynced_send(entries, self.backend_id, settled)
        try:
            self.storage.sync()  # one fsync acknowledges the whole batch
        except BaseException:
            try:
                finish()
            except Exception:
                pass  # not claimed: nothing to take back
            else:
                for oid, *_ in entries:
                    if self.has(oid):
                        continue  # stored and acknowledged before: a retry's entry
                    try:
                        self.directory.forget(oid)
                    except Exception:
                        pass  # the set of unsynced claims still names it: reconcile
            raise
        try:
            finish()
        except BaseException:
            with self._mu:  # perhaps not taken out of the set: the next claim does it
                self._settled_claims += settled
            raise
        with self._mu:
            self._settled_claims += [oid for oid, *_ in entries]

    def _drop_stale_copy(self, object_id: str) -> None:
        """A move is bringing ``object_id`` here while a copy is already stored.

        That copy is what an earlier move left behind when it failed before
        its directory update (the commit point): if the directory says the
        object lives elsewhere, the copy is stale and is replaced.
        """
        entry = self.directory.lookup(object_id)
        if entry.backend_id == self.backend_id:
            raise ProtocolError(f"object {object_id} is already stored on this backend")
        self.delete(object_id, forget=False)

    def adopt_local(self, obj: Any, chain: str) -> tuple[str, str, str]:
        """Make a StorageObject created inside this backend persistent here.

        The instance itself becomes a local proxy, so whoever holds it goes
        through the heap (locks, logging) from now on.
        """
        from store._wire.serialization import code_key_and_bytes

        key, code = code_key_and_bytes(objmod.real_class(obj))
        if self.directory is not None and code and not self.directory.has_code(key):
            self.directory.put_code(key, code)
        self.code.put(key, objmod.real_class(obj), code)
        oid = uuid.uuid4().hex
        cls = type(obj)
        real = cls.__new__(cls)
        real.__dict__.update(obj.__dict__)
        payload, buffers = dumps(real.__getstate__(), self.pickle_context(chain))
        self.persist([(oid, key, payload, buffers, "")])
        objmod.turn_into_proxy(obj, oid, key, self.backend_id)
        return oid, key, self.backend_id

    # -- calls ---------------------------------------------------------------------
    def invoke(
        self, object_id: str, kind: int, name: str, args: tuple, kwargs: dict, chain: str, call_id: str = ""
    ) -> Any:
        """Run a method or attribute access on a live object, under its lock.

        A changing call with a ``call_id`` that already changed the object
        (a retry, here or on a replica promoted since) returns the recorded
        result instead of running again.

        What it returns is durable: a change the local lane logged and has not
        fsync'd yet (see storage.deferring) may be what this call saw, so a
        call served elsewhere waits for that fsync before it answers.
        """
        try:
            return self._invoke(object_id, kind, name, args, kwargs, chain, call_id)
        finally:
            # Also when the call raised: its error may describe the state it saw.
            if self.storage.unsettled() and not storage_mod.is_deferring():
                self.storage.settle()

    def _invoke(
        self, object_id: str, kind: int, name: str, args: tuple, kwargs: dict, chain: str, call_id: str = ""
    ) -> Any:
        entry = self._acquire(object_id, chain)
        # Only the outermost call of a chain on this object stores or rolls back:
        # a nested call (A -> B -> A) is part of the outer one.
        outermost = entry.lock.depth == 1
        announced = False
        try:
            if call_id and outermost and kind != GET_ATTR:
                hit = self.calls.lookup(object_id, call_id)
                if hit is not None:
                    if hit[0] is None:
                        raise ValueTooLarge(
                            f"call {call_id} on {object_id} already ran; its result was not "
                            f"kept for retries (over {_KEPT_RESULT} bytes, or unpicklable)"
                        )
                    return loads(hit[0], hit[1], self.unpickle_context()) if hit[0] else None
            obj = entry.obj
            if kind == GET_ATTR:
                return getattr(obj, name)
            if kind == METHOD:
                fn = getattr(obj, name)
                changes = not getattr(fn, "__claypot_readonly__", False)
            elif kind == SET_ATTR:
                value = args[0]
                fn, args, kwargs, changes = (lambda: setattr(obj, name, value)), (), {}, True
            elif kind == DEL_ATTR:
                fn, args, kwargs, changes = (lambda: delattr(obj, name)), (), {}, True
            else:
                raise ValueError(f"unknown call kind {kind}")
            if changes and self.before_change is not None:
                self.before_change(object_id)
                announced = True
            try:
                with cancel.armed(f"method {name}"):  # Cancel RPC (store.backend._engine.cancel)
                    result = fn(*args, **kwargs)
            except BaseException:
                if changes and outermost:
                    self._rollback(entry, chain)
                raise
            if changes and outermost:
                try:
                    self._after_change(
                        entry, chain, check=kind == METHOD, call=[call_id, result, None] if call_id else None
                    )
                except BaseException:
                    # Not stored (unpicklable state, a failed disk): not applied in memory
                    # either.
                    self._rollback(entry, chain)
                    raise
            return result
        finally:
            if announced and self.change_done is not None:
                self.change_done(object_id)
            entry.lock.release()

    def upgrade_class(self, object_id: str, class_key: str, chain: str) -> None:
        """Give a live object another version of its class (same qualified name).

        The state is kept as it is; the object's record is stored with the new
        class key, so a restart loads it with the new code.
        """
        cls = self.code.get(class_key)
        entry = self._acquire(object_id, chain)
        try:
            old = objmod.real_class(type(entry.obj))
            if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ClassNotFound(
                    f"object {object_id} is a {old.__qualname__}, not a "
                    f"{cls.__qualname__}: upgrade_class takes a new version "
                    f"of the same class"
                )
            entry.obj.__class__ = cls
            entry.class_key = class_key
            entry.obj.__dict__[objmod._KEY] = class_key
            self._after_change(entry, chain, check=False)
        finally:
            entry.lock.release()
        self.directory.claim([(object_id, self.backend_id, class_key, entry.alias)])

    def run_task(
        self,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        mutates: list[str],
        chain: str,
        timeout: float = 0.0,
        task_key: str = "",
    ) -> Any:
        """Run a task function here; objects it may change (INOUT) are locked and logged.

        Atomic like a method: if the function raises, or runs past its
        ``timeout``, its INOUT objects go back to their last acknowledged
        state and nothing is stored. With a ``task_key`` (stable across the
        retries of one task), a retry never applies the task twice.
        """
        local = [oid for oid in sorted(set(mutates)) if self.has(oid)]
        ledger = bool(task_key and local)
        if ledger:
            run, result = self._tasks.begin(task_key, self.lock_timeout)
            if not run:
                return result
        entries: list[tuple[Entry, bool]] = []
        announced: list[str] = []
        committed = False
        self.running_tasks += 1
        started = time.monotonic()
        try:
            for oid in local:
                entry = self._acquire(oid, chain)
                entries.append((entry, entry.lock.depth == 1))
                if self.before_change is not None:
                    self.before_change(oid)
                    announced.append(oid)
            try:
                # Cancel RPC and time_out both stop the function (store.backend._engine.cancel).
                with cancel.armed(f"task {getattr(fn, '__qualname__', fn)}", timeout):
                    result = fn(*args, **kwargs)
                elapsed = time.monotonic() - started
                if timeout and elapsed > timeout:
                    raise TaskTimeout(
                        f"task {getattr(fn, '__qualname__', fn)} ran "
                        f"{elapsed:.2f}s, over its time_out of {timeout}s; "
                        f"its changes were rolled back"
                    )
            except BaseException:
                for entry, outermost in entries:
                    if outermost:
                        self._rollback(entry, chain)
                raise
            try:
                for entry, outermost in entries:
                    if outermost:
                        self._after_change(entry, chain, check=True)
            except BaseException:
                for entry, outermost in entries:
                    if outermost:
                        self._rollback(entry, chain)
                raise
            committed = True
            return result
        finally:
            self.running_tasks -= 1
            if self.change_done is not None:
                for oid in announced:
                    self.change_done(oid)
            for entry, _ in entries:
                entry.lock.release()
            if ledger:
                self._tasks.end(task_key, committed, result if committed else None)

    def _after_change(self, entry: Entry, chain: str, check: bool, call=None) -> None:
        """Store the object's new state if it changed (caller holds its lock).

        ``call`` is [call id, result, pickled result or None] of the changing
        call that made the change, recorded (and replicated) with the state.
        """
        oid = entry.object_id
        with self._mu:
            life = self.life.get(oid)
            if life is None or life.state is not State.LIVE:
                return  # the call moved or deleted its own object: nothing to store here
            big = life.big
        if self.storage.policy == "none":
            return
        if big:
            todo = self.life_event(lambda: self.life.call_finished(oid, True, life.size, True))
            self._perform(todo, entry=entry)
            if call is not None:
                # Kept in the ledger (shipped at the next checkpoint) so a retry runs once.
                self.calls.record(oid, call[0], self.pickle_result(call[1], "ledger"))
            return
        payload, buffers = dumps(entry.obj.__getstate__(), self.pickle_context(chain))
        size = _nbytes(payload, buffers)
        big = size > self.big_object
        digest = b"" if big else digest_of(payload, buffers)
        if check and not big and digest == entry.digest:
            return
        todo = self.life_event(lambda: self.life.call_finished(oid, True, size, big))
        self._perform(todo, entry=entry, state=(payload, buffers, digest), call=call)

    def _rollback(self, entry: Entry, chain: str) -> None:
        """Put an object whose call raised back in its last acknowledged state."""
        oid = entry.object_id
        todo = self.life_event(lambda: self.life.call_failed(oid))
        try:
            self._perform(todo, entry=entry)
        except Exception:
            # Never leave the half-changed instance in memory: drop it, so the next
            # call loads the last acknowledged state from disk.
            log.exception("object %s: rollback after a failed call failed; dropping the live instance", oid)
            with self._mu:
                life = self.life.get(oid)
                if life is not None and life.state is State.LIVE:
                    self.life.spilled(oid)
                    entry.obj = None

    def life_event(self, event: Callable[[], list]) -> list:
        """Report one event to the lifecycle core; returns its instructions."""
        with self._mu:
            todo = event()
            self._validate_locked()
        return todo

    def _checkpoint_live(self, object_id: str) -> bool:
        """Write a write-behind object's checkpoint from a snapshot taken under its lock.

        Returns False when the object is gone or spilled (a spill writes the
        object itself first).
        """
        with self._mu:
            entry = self._entries.get(object_id)
            life = self.life.get(object_id)
            if entry is None or life is None or life.state is not State.LIVE:
                return False
        # Bounded wait: a long method holding the lock must not stall the checkpointer
        # (or a graceful stop); the storage keeps the object dirty and retries.
        entry.lock.acquire("checkpointer:" + object_id, _SNAPSHOT_LOCK_WAIT)
        try:
            if entry.obj is None or self.state_of(object_id) is not State.LIVE:
                return False
            self._write_snapshot(entry, "checkpoint", clear_dirty=True)
            return True
        finally:
            entry.lock.release()

    def _write_snapshot(self, entry: Entry, chain: str, clear_dirty: bool = False) -> int:
        """Pickle the live object and write it straight to its checkpoint (lock held).

        A replicated object over ``big_object`` ships its state to its replicas
        here, at its checkpoint (write-behind), not at every change.
        """
        payload, buffers = dumps(entry.obj.__getstate__(), self.pickle_context(chain))
        if self.replicate is not None:
            self.replicate(entry, payload, buffers, None)
        lsn = self.storage.write_checkpoint(
            entry.record(payload, [b.raw() if hasattr(b, "raw") else b for b in buffers]), clear_dirty=clear_dirty
        )
        with self._mu:
            self.life.logged(entry.object_id, lsn)
        return lsn

    # -- performing instructions ----------------------------------------------------------
    def _perform(self, todo: list, entry: Entry | None = None, state=None, call=None) -> None:
        """Carry out the lifecycle's instructions, in order (see lifecycle)."""
        for ins in todo:
            if isinstance(ins, lc.Spill):
                self._spill(ins.object_id)
            elif isinstance(ins, lc.LogState):
                payload, buffers, digest = state
                if call is not None and call[2] is None:
                    call[2] = self.pickle_result(call[1], "ledger")
                if self.replicate is not None:
                    # Replicas first: a state they refuse is never logged here, so the
                    # rollback that follows finds the last acknowledged one.
                    self.replicate(entry, payload, buffers, call)
                # On the lane's loop the fsync is the batch's (storage.deferring): the
                # reply waits for it, as does a call served elsewhere that reads this
                # state (invoke); nothing tells the directory about it.
                lsn = self.storage.write(entry.record(payload, buffers), defer=storage_mod.is_deferring())
                if call is not None:
                    self.calls.record(entry.object_id, call[0], call[2])
                entry.digest = digest
                self._perform(self.life_event(lambda: self.life.logged(entry.object_id, lsn)))
            elif isinstance(ins, lc.MarkDirty):
                entry.digest = b""
                self.storage.mark_dirty(ins.object_id)
            elif isinstance(ins, lc.WriteCheckpoint):
                self._write_snapshot(entry, "rollback", clear_dirty=True)
            elif isinstance(ins, lc.Restore):
                if self.storage.policy == "none":
                    continue  # nothing stored to go back to (documented)
                rec = self.storage.read(ins.object_id)
                obj = self._build(ins.object_id, rec.class_key, rec.payload, rec.buffers)
                with self._mu:
                    entry.obj = obj
                    entry.digest = digest_of(rec.payload, rec.buffers)
            else:
                raise AssertionError(f"unexpected instruction {ins!r}")

    # -- state out ---------------------------------------------------------------------
    def set_alias(self, object_id: str, alias: str, chain: str = "alias") -> None:
        """Record the object's alias in its stored state (for repair)."""
        entry = self._acquire(object_id, chain)
        try:
            entry.alias = alias
            if self.storage.policy == "none":
                return
            with self._mu:
                big = self.life.get(object_id).big
            if big:
                # Straight to its checkpoint: a big object's state never goes in the log.
                self._write_snapshot(entry, chain)
            else:
                payload, buffers = dumps(entry.obj.__getstate__(), self.pickle_context(chain))
                lsn = self.storage.write(entry.record(payload, buffers))
                self.life_event(lambda: self.life.logged(object_id, lsn))
        finally:
            entry.lock.release()

    def move(self, object_id: str, target: str, chain: str, send: Callable[[str, str, str, bytes, list], None]) -> None:
        """Move an object to backend ``target``: its state there, the directory, then here.

        ``send(target, class_key, alias, payload, buffers)`` stores the state
        on the target (durably). Calls that queued on the object meanwhile
        are refused with ObjectMoved once it is gone, and follow it.
        """
        if target == self.backend_id:
            return
        entry = self._entry(object_id)
        if chain and entry.lock.owner == chain:
            raise ObjectBusy(
                f"object {object_id} cannot be moved from inside one of its own "
                f"methods (the call holds it); move it after the call returns"
            )
        mover = "move:" + uuid.uuid4().hex
        entry = self._acquire(object_id, mover)
        try:
            todo = self.life_event(lambda: self.life.move_requested(object_id, target))
            lsn = 0
            published = False
            try:
                for ins in todo:
                    if isinstance(ins, lc.SendState):
                        payload, buffers = dumps(entry.obj.__getstate__(), self.pickle_context(mover))
                        send(target, entry.class_key, entry.alias, payload, buffers)
                    elif isinstance(ins, lc.PublishMove):
                        self.directory.move(object_id, target)
                        published = True
                    elif isinstance(ins, lc.LogDelete):
                        lsn = self.storage.delete(object_id)
            except BaseException:
                if not published:
                    self.life_event(lambda: self.life.move_failed(object_id))
                    raise
                # The directory already names the target, which holds the state: the
                # move happened; only the local delete record failed (storage stopped).
                self._finish_move(entry, lsn)
                raise
            self._finish_move(entry, lsn)
        finally:
            entry.lock.release()
        self._changed()

    def _finish_move(self, entry: Entry, lsn: int) -> None:
        with self._mu:
            self.life.move_done(entry.object_id, lsn)
            entry.obj = None
            self._validate_locked()
        if self.on_gone is not None:
            self.on_gone(entry.object_id)

    def delete(self, object_id: str, chain: str = "", forget: bool = True) -> None:
        """Delete an object: durably from storage first, then from the directory.

        ``forget=False`` drops only this backend's copy (a stale one, which the
        directory says lives elsewhere) and leaves the directory alone.

        Waits for a call in progress on it (or, from inside one of its own
        methods, goes ahead in that call's chain); calls queued behind it get
        ObjectNotFound, and the call in progress stores nothing after it.
        """
        entry = self._acquire(object_id, chain or "delete:" + uuid.uuid4().hex, load=False, verify=forget)
        try:
            todo = self.life_event(lambda: self.life.delete_requested(object_id))
            lsn = 0
            for ins in todo:
                if isinstance(ins, lc.LogDelete):
                    lsn = self.storage.delete(object_id)
                elif isinstance(ins, lc.Forget) and forget:
                    try:
                        # Only while the directory names this backend: a deposed
                        # primary never removes the entry of the one that took over.
                        self.directory.forget(object_id, owner=self.backend_id)
                    except Exception as exc:
                        # Stored as deleted already; the directory entry left behind only
                        # answers ObjectNotFound from here (repair removes it).
                        log.warning("object %s deleted, directory not updated: %s", object_id, exc)
            with self._mu:
                self.life.delete_done(object_id, lsn)
                entry.obj = None
                self._entries.pop(object_id, None)
                self._validate_locked()
            if self.on_gone is not None:
                self.on_gone(object_id)
        finally:
            entry.lock.release()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- memory ------------------------------------------------------------------------
    def _spill(self, object_id: str) -> None:
        """Write the object out if the disk lacks its latest state, then drop it from memory.

        Small objects under ``sync``/``async`` are already in the log or their
        checkpoint; a big one is written only if it changed since its last
        checkpoint (write-behind); under ``none`` nothing else is on disk.
        try_acquire, not a check of .held: a call may take the lock right
        after such a check and then find its object gone.
        """
        with self._mu:
            entry = self._entries.get(object_id)
        if entry is None or not entry.lock.try_acquire("spill:" + object_id):
            return
        try:
            with self._mu:
                life = self.life.get(object_id)
                if life is None or life.state is not State.LIVE or entry.obj is None:
                    return
                big = life.big
            if self.storage.policy == "none" or (big and self.storage.is_dirty(object_id)):
                self._write_snapshot(entry, "spill", clear_dirty=True)
            with self._mu:
                self.life.spilled(object_id)
                entry.obj = None
                self.evictions += 1
                self._validate_locked()
        finally:
            entry.lock.release()
        _trim_malloc()

    # -- invariants ---------------------------------------------------------------------
    def _validate_locked(self) -> None:
        if self.validate_each:
            self._check_invariants()

    def _check_invariants(self) -> None:
        self.life.validate()
        for oid, entry in self._entries.items():
            life = self.life.get(oid)
            assert life is not None, f"{oid} has a live entry but no lifecycle record"
            resident = life.state in lc.RESIDENT
            assert (entry.obj is not None) == resident, (
                f"{oid} is {life.state.value} but its instance is {'present' if entry.obj is not None else 'absent'}"
            )

    def validate(self) -> None:
        """Check the heap's and the lifecycle's invariants (AssertionError if broken)."""
        with self._mu:
            self._check_invariants()


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


__all__ = ["Heap", "ChainLock", "CodeCache", "Entry", "NotPersistent"]
