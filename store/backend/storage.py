"""A backend's storage directory: redo log plus per-object checkpoints.

Layout::

    <data_dir>/backend.id          stable identity of the backend
    <data_dir>/wal/<seq>.log       redo log segments (records below)
    <data_dir>/objects/ab/<id>.obj one checkpoint per object (ab = first 2 hex digits)
    <data_dir>/quarantine/         checkpoints found torn or corrupt

Writing an object's new state appends one record to the open log segment;
under the ``sync`` policy the caller is acknowledged only after an fsync,
and concurrent writers share one fsync (group commit); under ``async`` a
flusher thread fsyncs the log every ``flush_interval``. Every
``checkpoint_interval`` (or when the log outgrows a segment) a background
thread writes checkpoints of the objects the log changed (temp file, fsync,
rename, fsync of the directory) and then deletes the log segments they
cover; write-behind objects (too big for the log) are checkpointed from
their live state every ``flush_interval``. On start the log is replayed, so
everything acknowledged comes back after a ``kill -9``; a torn record at
the log's tail (a write that was never acknowledged) is cut off. A
checkpoint file that fails its checksum quarantines that one object.

Record and checkpoint format: ``MAGIC, u32 header length, u64 body length,
u32 crc32`` then a pickled header dict and the body blobs (pickle stream
and out-of-band buffers, back to back). The crc covers header and body.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Callable

from ..errors import DeadlineExceeded, ObjectCorrupt, ObjectNotFound

log = logging.getLogger("claypot.storage")

_MAGIC = b"CPv1"
_PREFIX = struct.Struct("<4sIQI")
_SEGMENT_LIMIT = 64 * 1024 * 1024
_ABSENT = object()
_QUARANTINED = ("its stored state is torn or corrupt (checksum mismatch); "
                "the file is kept in quarantine/")
_CHECKPOINT_BATCH = 128  # checkpoint files written (and fsync'd) together


class _Abandoned(Exception):
    """A checkpoint batch given up because the backend is stopping."""


@dataclass
class Record:
    """One object's stored state: class, alias, pickle stream and buffers."""
    object_id: str
    class_key: str = ""
    alias: str = ""
    payload: bytes | memoryview = b""
    buffers: list = field(default_factory=list)
    deleted: bool = False
    # A log-only marker: "the checkpoint file now holds a newer state than the
    # records logged before me" (written after a direct or write-behind checkpoint).
    checkpointed: bool = False

    def size(self) -> int:
        return len(self.payload) + sum(memoryview(b).nbytes for b in self.buffers)


def encode(rec: Record) -> list:
    """The record as a list of byte blobs ready for writev."""
    sizes = [memoryview(b).nbytes for b in rec.buffers]
    header = pickle.dumps({"id": rec.object_id, "class": rec.class_key, "alias": rec.alias,
                           "deleted": rec.deleted, "ckpt": rec.checkpointed,
                           "payload": len(rec.payload),
                           "buffers": sizes}, protocol=5)
    body = [rec.payload] + [memoryview(b).cast("B") for b in rec.buffers]
    crc = zlib.crc32(header)
    for part in body:
        crc = zlib.crc32(part, crc)
    body_len = sum(memoryview(p).nbytes for p in body)
    return [_PREFIX.pack(_MAGIC, len(header), body_len, crc), header] + body


def decode(data: memoryview, offset: int = 0) -> tuple[Record, int] | None:
    """Parse one record at ``offset`` of ``data``; None when torn or corrupt.

    Buffers are memoryviews into ``data`` (no copy).
    """
    if len(data) - offset < _PREFIX.size:
        return None
    magic, hlen, blen, crc = _PREFIX.unpack_from(data, offset)
    start = offset + _PREFIX.size
    end = start + hlen + blen
    if magic != _MAGIC or end > len(data):
        return None
    if zlib.crc32(data[start:end]) != crc:
        return None
    try:
        head = pickle.loads(data[start:start + hlen])
    except Exception:
        return None
    pos = start + hlen
    payload = data[pos:pos + head["payload"]]
    pos += head["payload"]
    buffers = []
    for n in head["buffers"]:
        buffers.append(data[pos:pos + n])
        pos += n
    rec = Record(head["id"], head["class"], head["alias"], payload, buffers, head["deleted"],
                 head.get("ckpt", False))
    return rec, end


def _next_record(data: memoryview, offset: int) -> int | None:
    """Offset of the next record after a bad one at ``offset`` that decodes, else None."""
    raw = data.obj if isinstance(data.obj, bytes) else bytes(data)
    pos = raw.find(_MAGIC, offset + 1)
    while pos != -1:
        if decode(data, pos) is not None:
            return pos
        pos = raw.find(_MAGIC, pos + 1)
    return None


def _write_all(fd: int, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    while views:
        written = os.writev(fd, views[:1024])
        while written:
            if written >= views[0].nbytes:
                written -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, parts: list, sync: bool = True, before_rename=None) -> None:
    """Write ``parts`` to ``path`` atomically: temp file, fsync, rename, fsync dir.

    ``before_rename``, if given, is a context manager held around the rename.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, parts)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    if before_rename is None:
        os.replace(tmp, path)
    else:
        with before_rename:
            os.replace(tmp, path)
    if sync:
        fsync_dir(os.path.dirname(path))


def read_header(path: str) -> dict | None:
    """The header of a checkpoint file (id, class, alias, sizes), without reading its body.

    None when the file is missing or its header is unreadable. The body's
    checksum is not verified here: a corrupt body is found on first access.
    """
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                return None
            magic, hlen, _, _ = _PREFIX.unpack(prefix)
            if magic != _MAGIC or hlen > 1 << 20:
                return None
            head = pickle.loads(f.read(hlen))
    except (OSError, pickle.UnpicklingError, EOFError, ValueError):
        return None
    return head if isinstance(head, dict) and "id" in head else None


def read_backend_id(root: str) -> str | None:
    """The identity kept in a storage dir, or None if it has none."""
    try:
        with open(os.path.join(root, "backend.id")) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def scan_storage_dir(root: str):
    """Yield (object_id, class_key, alias) of every object in a storage dir, changing nothing.

    For ``claypot repair``, which may run while the dir's backend is up:
    unlike opening a :class:`Storage`, it neither cuts a torn log tail nor
    creates a log segment. Files are read first, then the log, whose
    records are newer (except "checkpointed" markers, which defer to the file).
    """
    found: dict[str, tuple[str, str] | None] = {}
    base = os.path.join(root, "objects")
    if os.path.isdir(base):
        for sub in os.scandir(base):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.endswith(".obj"):
                    head = read_header(entry.path)
                    if head is not None and head["id"] == entry.name[:-4]:
                        found[head["id"]] = (head["class"], head["alias"])
    wal = os.path.join(root, "wal")
    names = sorted(n for n in os.listdir(wal) if n.endswith(".log")) if os.path.isdir(wal) else []
    for name in names:
        with open(os.path.join(wal, name), "rb") as f:
            data = memoryview(f.read())
        offset = 0
        while offset < len(data):
            parsed = decode(data, offset)
            if parsed is None:
                offset = _next_record(data, offset)
                if offset is None:
                    break  # a torn tail (or a record being written right now)
                continue
            rec, offset = parsed
            if rec.deleted:
                found[rec.object_id] = None
            elif not rec.checkpointed:
                found[rec.object_id] = (rec.class_key, rec.alias)
    for oid, value in found.items():
        if value is not None:
            yield oid, value[0], value[1]


class _Sequenced:
    """Held around a direct write's rename: orders it against background checkpoints."""

    def __init__(self, storage: "Storage", object_id: str):
        self._storage = storage
        self._object_id = object_id

    def __enter__(self):
        self._storage._rename_lock.acquire()
        self._storage._direct_seq += 1
        self._storage._direct_writes[self._object_id] = self._storage._direct_seq

    def __exit__(self, *exc):
        self._storage._rename_lock.release()


class Storage:
    """The storage directory of one backend (see the module docstring).

    ``policy``: ``sync`` (fsync before acknowledging), ``async`` (log written
    at once, fsync'd every ``flush_interval``) or ``none`` (nothing written
    but spilled objects; scratch data). ``checkpoint_live(id)`` is called by
    the checkpointer for write-behind objects: it writes the object's current
    state with write_checkpoint() while holding the object's lock.
    """

    def __init__(self, root: str, policy: str = "sync", flush_interval: float = 1.0,
                 checkpoint_live: Callable[[str], bool] | None = None,
                 checkpoint_interval: float = 10.0):
        self.root = root
        self.policy = policy
        self.flush_interval = flush_interval
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_live = checkpoint_live
        # Renames of checkpoint files are ordered: a direct write (spill, big
        # object) records a sequence number, and a background checkpoint staged
        # before it must not rename its older file over the newer one.
        self._rename_lock = threading.Lock()
        self._direct_seq = 0
        self._direct_writes: dict[str, int] = {}
        for sub in ("wal", "objects", "quarantine"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        self.backend_id = self._load_identity()
        self._lock = threading.Lock()          # log appends and the pending map
        self._sync_lock = threading.Lock()     # one fsync at a time (group commit)
        self._written = 0                      # records appended
        self._synced = 0                       # records known durable
        # Logged, not yet checkpointed; None marks a write-behind object (snapshot it).
        self._pending: dict[str, Record | None] = {}
        self._inflight: dict[str, Record | None] = {}  # being checkpointed right now
        self._corrupt: dict[str, str] = {}
        self._segment_seq = 0
        self._fd = -1
        self._segment_bytes = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._checkpointer: threading.Thread | None = None
        for name in os.listdir(os.path.join(root, "quarantine")):
            if name.endswith(".obj"):  # stays an error across restarts, not a vanished object
                self._corrupt[name[:-4]] = _QUARANTINED
        self.recovered = self._recover()

    # -- identity ---------------------------------------------------------------
    def _load_identity(self) -> str:
        path = os.path.join(self.root, "backend.id")
        try:
            with open(path) as f:
                ident = f.read().strip()
            if ident:
                return ident
        except FileNotFoundError:
            pass
        ident = uuid.uuid4().hex
        atomic_write(path, [ident.encode()])
        return ident

    # -- paths --------------------------------------------------------------------
    def _object_path(self, object_id: str) -> str:
        return os.path.join(self.root, "objects", object_id[:2], object_id + ".obj")

    def _segments(self) -> list[int]:
        out = []
        for name in os.listdir(os.path.join(self.root, "wal")):
            if name.endswith(".log"):
                try:
                    out.append(int(name[:-4]))
                except ValueError:
                    pass
        return sorted(out)

    def _segment_path(self, seq: int) -> str:
        return os.path.join(self.root, "wal", f"{seq:012d}.log")

    # -- recovery -----------------------------------------------------------------
    def _recover(self) -> int:
        """Replay log segments into the pending map; returns records replayed."""
        count = 0
        segments = self._segments()
        for seq in segments:
            path = self._segment_path(seq)
            with open(path, "rb") as f:
                data = memoryview(f.read())
            offset = 0
            while offset < len(data):
                parsed = decode(data, offset)
                if parsed is None:
                    resume = _next_record(data, offset)
                    if resume is None:
                        log.warning("log %s: torn record at byte %d, cut off", path, offset)
                        with open(path, "r+b") as f:
                            f.truncate(offset)
                            os.fsync(f.fileno())
                        break
                    # Valid records follow: damage inside the log, not a torn tail.
                    # Cutting there would drop acknowledged records; skip only the bad one.
                    log.error("log %s: corrupt record at byte %d skipped (%d bytes)", path,
                              offset, resume - offset)
                    offset = resume
                    continue
                rec, offset = parsed
                count += 1
                if rec.checkpointed:
                    self._pending.pop(rec.object_id, None)
                    continue
                rec.payload = bytes(rec.payload)
                rec.buffers = [bytearray(b) for b in rec.buffers]
                self._pending[rec.object_id] = rec
        self._segment_seq = (segments[-1] + 1) if segments else 1
        self._open_segment()
        return count

    def _open_segment(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = self._segment_path(self._segment_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fsync_dir(os.path.join(self.root, "wal"))
        self._segment_bytes = 0

    def object_ids(self, at_start: bool = False) -> set[str]:
        """Every object stored here (checkpointed, only logged, or quarantined), deleted ones
        excluded.

        ``at_start`` (before the checkpointer runs): also delete the temp files
        of checkpoints a crash interrupted, in the same pass over the files.
        """
        ids = set(self._corrupt)
        base = os.path.join(self.root, "objects")
        for sub in os.scandir(base):
            if sub.is_dir():
                for entry in os.scandir(sub.path):
                    if entry.name.endswith(".obj"):
                        ids.add(entry.name[:-4])
                    elif at_start and ".obj.tmp-" in entry.name:
                        os.unlink(entry.path)
        with self._lock:
            logged = dict(self._inflight)  # being checkpointed: files may not exist yet
            logged.update(self._pending)
        for oid, rec in logged.items():
            if rec is not None and rec.deleted:
                ids.discard(oid)
            else:
                ids.add(oid)
        return ids

    # -- writing ------------------------------------------------------------------
    def write(self, rec: Record, durable: bool = True) -> None:
        """Log ``rec``; with ``durable`` under the sync policy, return once fsync'd."""
        if self.policy == "none":
            with self._lock:
                self._pending.pop(rec.object_id, None)
            return
        parts = encode(rec)
        with self._lock:
            _write_all(self._fd, parts)
            self._written += 1
            ticket = self._written
            self._segment_bytes += sum(memoryview(p).nbytes for p in parts)
            self._pending[rec.object_id] = rec
            rotate = self._segment_bytes > _SEGMENT_LIMIT
        if durable and self.policy == "sync":
            self._sync(ticket)
        if rotate:
            self._wake.set()

    def mark_dirty(self, object_id: str) -> None:
        """Write-behind: checkpoint the object's live state (checkpoint_live()) soon."""
        if self.policy == "none":
            return
        with self._lock:
            # Even over a logged record: the snapshot will be newer than that record.
            self._pending[object_id] = None
        # No wake-up: repeated updates of a big object coalesce into one checkpoint
        # per flush interval instead of rewriting it after every call.

    def write_checkpoint(self, rec: Record, clear_dirty: bool = False) -> None:
        """Write a checkpoint now, bypassing the log (big objects, spills).

        The caller holds the object's lock, so ``rec`` is its newest state:
        any state logged for it is older. With ``clear_dirty`` (the state was
        taken from the live object) a write-behind mark set before is settled.
        """
        path = self._object_path(rec.object_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, encode(rec), sync=self.policy != "none",
                     before_rename=_Sequenced(self, rec.object_id))
        if clear_dirty:
            with self._lock:
                if self._pending.get(rec.object_id, _ABSENT) is None:
                    del self._pending[rec.object_id]
        self._mark_checkpointed(rec.object_id, supersedes_logged=True)

    def is_dirty(self, object_id: str) -> bool:
        """True while a write-behind object has changes not yet in its checkpoint."""
        with self._lock:
            return (self._pending.get(object_id, False) is None
                    or self._inflight.get(object_id, False) is None)

    def _mark_checkpointed(self, object_id: str, supersedes_logged: bool) -> None:
        """Log that the checkpoint file of ``object_id`` is newer than its earlier records.

        Without it, a restart would replay an older logged state of the object
        over the newer file (the log wins over files during recovery). With
        ``supersedes_logged`` false, a state logged meanwhile is newer than
        the file and keeps winning: no marker then.
        """
        if self.policy == "none":
            return
        with self._lock:
            current = self._pending.get(object_id, _ABSENT)
            if current is not _ABSENT and current is not None:
                if not supersedes_logged:
                    return
                del self._pending[object_id]
            if self._fd < 0:
                return
            parts = encode(Record(object_id, checkpointed=True))
            _write_all(self._fd, parts)
            self._written += 1
            self._segment_bytes += sum(memoryview(p).nbytes for p in parts)

    def _sync(self, ticket: int) -> None:
        with self._sync_lock:
            if self._synced >= ticket:
                return  # someone else's fsync covered our record
            with self._lock:
                target, fd = self._written, self._fd
            if fd < 0:
                return  # closed: close() flushed it
            # fdatasync flushes the appended bytes and the new file size (what
            # replay needs) but skips timestamps: measured ~20% cheaper here.
            os.fdatasync(fd)
            self._synced = max(self._synced, target)

    def delete(self, object_id: str) -> None:
        """Log the deletion of an object; its checkpoint is removed by the checkpointer."""
        self.write(Record(object_id, deleted=True))
        if self._corrupt.pop(object_id, None) is not None:
            try:  # deleting a quarantined object is how a user clears it
                os.unlink(os.path.join(self.root, "quarantine", object_id + ".obj"))
            except FileNotFoundError:
                pass
        if self.policy == "none":
            self._remove_checkpoint(object_id)

    def _remove_checkpoint(self, object_id: str) -> None:
        try:
            os.unlink(self._object_path(object_id))
        except FileNotFoundError:
            pass

    # -- reading ------------------------------------------------------------------
    def read(self, object_id: str) -> Record:
        """The latest stored state of an object (buffers are writable, no extra copy)."""
        if object_id in self._corrupt:
            raise ObjectCorrupt(f"object {object_id}: {self._corrupt[object_id]}")
        with self._lock:
            rec = self._pending.get(object_id) or self._inflight.get(object_id)
        if rec is not None:
            if rec.deleted:
                raise ObjectNotFound(f"object {object_id} was deleted")
            return rec
        path = self._object_path(object_id)
        try:
            size = os.path.getsize(path)
            data = bytearray(size)
            with open(path, "rb", buffering=0) as f:
                view = memoryview(data)
                got = 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except FileNotFoundError:
            raise ObjectNotFound(f"object {object_id} is not stored on this backend") from None
        parsed = decode(memoryview(data)) if got == size else None
        if parsed is None or parsed[0].object_id != object_id:
            self._quarantine(object_id, path)
            raise ObjectCorrupt(f"object {object_id}: {self._corrupt[object_id]}")
        return parsed[0]

    def _quarantine(self, object_id: str, path: str) -> None:
        reason = _QUARANTINED
        self._corrupt[object_id] = reason
        try:
            os.replace(path, os.path.join(self.root, "quarantine", os.path.basename(path)))
        except OSError:
            pass
        log.error("object %s: %s", object_id, reason)

    def scan_headers(self):
        """Yield (object_id, class_key, alias) of every stored object (to republish).

        Logged states come from memory; for the others only each file's
        header is read, not its body: republishing 100,000 objects must not
        read every byte of them.
        """
        with self._lock:
            logged = dict(self._inflight)
            logged.update(self._pending)
        for oid in self.object_ids():
            rec = logged.get(oid)
            if rec is not None:
                if not rec.deleted:
                    yield oid, rec.class_key, rec.alias
                continue
            if oid in self._corrupt:
                continue
            head = read_header(self._object_path(oid))
            if head is not None:
                yield oid, head["class"], head["alias"]

    # -- checkpointing ------------------------------------------------------------
    def start(self) -> None:
        """Start the background checkpointer (and, under ``async``, the log flusher)."""
        if self._checkpointer is None:
            self._checkpointer = threading.Thread(target=self._run, name="checkpointer",
                                                  daemon=True)
            self._checkpointer.start()
            if self.policy == "async":
                # Its own thread: a long checkpoint must not stretch the window of
                # un-fsync'd log past flush_interval.
                threading.Thread(target=self._flush_loop, name="log-flusher",
                                 daemon=True).start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush_log()
            except OSError:
                log.exception("log flush failed; will retry")

    def _run(self) -> None:
        """Every flush_interval: write-behind objects; every checkpoint_interval (or
        when the log outgrew a segment): a full checkpoint that trims the log.

        Checkpointing logged records rarely is what keeps durability cheap:
        an object changed a thousand times between checkpoints is written
        once, and the checkpointer's fsyncs stay off the calls' group commits.
        """
        last_full = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(min(self.flush_interval, self.checkpoint_interval))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if (time.monotonic() - last_full >= self.checkpoint_interval
                        or self._segment_bytes > _SEGMENT_LIMIT):
                    self.checkpoint(self._stop)
                    last_full = time.monotonic()
                else:
                    self.flush_dirty(self._stop)
            except Exception:
                log.exception("checkpoint failed; will retry")
                time.sleep(0.2)

    def flush_dirty(self, stop: threading.Event | None = None) -> int:
        """Checkpoint the write-behind objects changed since their last checkpoint."""
        with self._lock:
            dirty = [(oid, None) for oid, rec in self._pending.items() if rec is None]
            for oid, _ in dirty:
                del self._pending[oid]
                # Still dirty while being written: a spill meanwhile must write the
                # object itself (is_dirty), or its change would be dropped with it.
                self._inflight[oid] = None
        if not dirty:
            return 0
        try:
            return self._write_checkpoints(dirty, stop)
        except BaseException:
            with self._lock:  # not written: still dirty
                for oid, _ in dirty:
                    self._pending.setdefault(oid, None)
            if stop is not None and stop.is_set():
                return 0
            raise
        finally:
            with self._lock:
                for oid, _ in dirty:
                    self._inflight.pop(oid, None)

    def checkpoint(self, stop: threading.Event | None = None) -> int:
        """Checkpoint everything logged so far and trim the log. Returns objects written.

        When ``stop`` is set midway (a graceful stop), the objects not yet
        written go back to the pending map and the log is not trimmed: it
        still covers them, so stopping never waits for a long checkpoint.
        """
        if self.policy == "none":
            return 0
        # _sync_lock first: a writer's group-commit fsync must not mark records of
        # the segment being retired as durable before that segment is fsync'd.
        with self._sync_lock:
            with self._lock:
                if not self._pending:
                    return 0
                # Rotate: records after this point go to a new segment and stay pending.
                old_segments = [s for s in self._segments() if s <= self._segment_seq]
                self._segment_seq += 1
                old_fd = self._fd
                pending, self._pending = self._pending, {}
                self._inflight = pending
                written_before = self._written
                self._fd = os.open(self._segment_path(self._segment_seq),
                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self._segment_bytes = 0
            os.fsync(old_fd)
            os.close(old_fd)
            self._synced = max(self._synced, written_before)
        fsync_dir(os.path.join(self.root, "wal"))
        items = list(pending.items())
        done = count = 0
        try:
            for i in range(0, len(items), _CHECKPOINT_BATCH):
                batch = items[i:i + _CHECKPOINT_BATCH]
                count += self._write_checkpoints(batch, stop)
                done += len(batch)
        except _Abandoned:
            pass
        finally:
            with self._lock:
                for oid, rec in items[done:]:
                    # Not written: keep it pending unless a newer state was logged meanwhile.
                    self._pending.setdefault(oid, rec)
                self._inflight = {}
        if done < len(items):
            return count
        for seq in old_segments:
            try:
                os.unlink(self._segment_path(seq))
            except FileNotFoundError:
                pass
        return count

    def _write_checkpoints(self, batch: list, stop: threading.Event | None = None) -> int:
        """Write one batch of checkpoints: all files first, then one fsync each, then renames.

        Writing every file before the first fsync lets the file system commit
        them together; each file is still durable before its rename, and each
        directory is fsync'd once per batch, after its renames. Raises
        _Abandoned (leaving no file changed) as soon as ``stop`` is set.
        """
        staged = []  # (fd, temp path, final path, object id, direct-write seq when staged)
        written_live = 0
        dirs = set()
        try:
            for oid, rec in batch:
                if stop is not None and stop.is_set():
                    raise _Abandoned()
                if rec is None:
                    # A write-behind object: written from its live state, under its lock.
                    try:
                        if self.checkpoint_live is not None and self.checkpoint_live(oid):
                            written_live += 1
                    except DeadlineExceeded:
                        with self._lock:  # busy in a long call: stays dirty, next round
                            self._pending.setdefault(oid, None)
                    continue
                target = self._object_path(oid)
                if rec.deleted:
                    self._remove_checkpoint(oid)
                    dirs.add(os.path.dirname(target))
                    continue
                d = os.path.dirname(target)
                if d not in dirs:
                    os.makedirs(d, exist_ok=True)
                    dirs.add(d)
                tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with self._rename_lock:
                    seq = self._direct_writes.get(oid, 0)
                staged.append((fd, tmp, target, oid, seq))
                _write_all(fd, encode(rec))
            for fd, *_ in staged:
                if stop is not None and stop.is_set():
                    raise _Abandoned()
                os.fdatasync(fd)
        except BaseException:
            for fd, tmp, *_ in staged:
                os.close(fd)
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            raise
        for fd, tmp, target, oid, seq in staged:
            os.close(fd)
            with self._rename_lock:
                if self._direct_writes.get(oid, 0) == seq:
                    os.replace(tmp, target)
                    continue
            # A direct write landed a newer state meanwhile: keep it.
            os.unlink(tmp)
        for d in dirs:
            if os.path.isdir(d):
                fsync_dir(d)
        return len(staged) + written_live

    def flush_log(self) -> None:
        """fsync the open log segment (the async policy's periodic flush)."""
        with self._lock:
            ticket = self._written
        if ticket > self._synced:
            self._sync(ticket)

    def close(self) -> None:
        """Stop the checkpointer and close the log: a graceful stop.

        It is fast because the log already holds everything acknowledged: a
        checkpoint in progress is abandoned between batches (its log is kept),
        and only write-behind objects (big ones changed in place since their
        last checkpoint) are written now, since the log does not hold them.
        """
        self._stop.set()
        self._wake.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        if self.policy != "none":
            self.flush_dirty()
            self.flush_log()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)
