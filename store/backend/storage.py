"""A backend's storage directory: redo log plus per-object checkpoints.

Layout::

    <data_dir>/backend.id          stable identity of the backend
    <data_dir>/wal/<seq>.log       redo log segments (records below)
    <data_dir>/objects/ab/<id>.obj one checkpoint per object (ab = first 2 hex digits)
    <data_dir>/quarantine/         checkpoints found torn or corrupt

Writing an object's new state appends one record to the open log segment;
under the ``sync`` policy the caller is acknowledged only after an fsync,
and concurrent writers share one fsync (group commit). A background thread
writes checkpoints of the objects the log changed (temp file, fsync, rename,
fsync of the directory) and then deletes the log segments they cover. On
start the log is replayed, so everything acknowledged comes back after a
``kill -9``; a torn record at the log's tail (a write that was never
acknowledged) is cut off.

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

from ..errors import ObjectCorrupt, ObjectNotFound

log = logging.getLogger("claypot.storage")

_MAGIC = b"CPv1"
_PREFIX = struct.Struct("<4sIQI")
_SEGMENT_LIMIT = 64 * 1024 * 1024


@dataclass
class Record:
    """One object's stored state: class, alias, pickle stream and buffers."""
    object_id: str
    class_key: str = ""
    alias: str = ""
    payload: bytes | memoryview = b""
    buffers: list = field(default_factory=list)
    deleted: bool = False

    def size(self) -> int:
        return len(self.payload) + sum(memoryview(b).nbytes for b in self.buffers)


def encode(rec: Record) -> list:
    """The record as a list of byte blobs ready for writev."""
    sizes = [memoryview(b).nbytes for b in rec.buffers]
    header = pickle.dumps({"id": rec.object_id, "class": rec.class_key, "alias": rec.alias,
                           "deleted": rec.deleted, "payload": len(rec.payload),
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
    rec = Record(head["id"], head["class"], head["alias"], payload, buffers, head["deleted"])
    return rec, end


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


def atomic_write(path: str, parts: list, sync: bool = True) -> None:
    """Write ``parts`` to ``path`` atomically: temp file, fsync, rename, fsync dir."""
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
    os.replace(tmp, path)
    if sync:
        fsync_dir(os.path.dirname(path))


class Storage:
    """The storage directory of one backend (see the module docstring).

    ``policy``: ``sync`` (fsync before acknowledging), ``async`` (log written
    at once, fsync'd every ``flush_interval``) or ``none`` (nothing written
    but spilled objects; scratch data). ``snapshot(id)`` is called by the
    checkpointer for write-behind objects to get their current state.
    """

    def __init__(self, root: str, policy: str = "sync", flush_interval: float = 1.0,
                 snapshot: Callable[[str], Record | None] | None = None):
        self.root = root
        self.policy = policy
        self.flush_interval = flush_interval
        self.snapshot = snapshot
        for sub in ("wal", "objects", "quarantine"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        self.backend_id = self._load_identity()
        self._lock = threading.Lock()          # log appends and the pending map
        self._sync_lock = threading.Lock()     # one fsync at a time (group commit)
        self._written = 0                      # records appended
        self._synced = 0                       # records known durable
        self._pending: dict[str, Record | None] = {}  # logged, not yet checkpointed (None: snapshot)
        self._inflight: dict[str, Record | None] = {}  # being checkpointed right now
        self._corrupt: dict[str, str] = {}
        self._segment_seq = 0
        self._fd = -1
        self._segment_bytes = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._checkpointer: threading.Thread | None = None
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
                    log.warning("log %s: torn record at byte %d, cut off", path, offset)
                    with open(path, "r+b") as f:
                        f.truncate(offset)
                        os.fsync(f.fileno())
                    break
                rec, offset = parsed
                rec.payload = bytes(rec.payload)
                rec.buffers = [bytearray(b) for b in rec.buffers]
                self._pending[rec.object_id] = rec
                count += 1
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

    def object_ids(self) -> set[str]:
        """Every object stored here (checkpointed or only logged), deleted ones excluded."""
        ids = set()
        base = os.path.join(self.root, "objects")
        for sub in os.scandir(base):
            if sub.is_dir():
                for entry in os.scandir(sub.path):
                    if entry.name.endswith(".obj"):
                        ids.add(entry.name[:-4])
        with self._lock:
            for oid, rec in self._pending.items():
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
        """Write-behind: checkpoint the object's state (taken by snapshot()) soon."""
        if self.policy == "none":
            return
        with self._lock:
            if object_id not in self._pending:
                self._pending[object_id] = None
        self._wake.set()

    def write_checkpoint(self, rec: Record) -> None:
        """Write a checkpoint now, bypassing the log (big objects, spills)."""
        path = self._object_path(rec.object_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, encode(rec), sync=self.policy != "none")
        with self._lock:
            if self._pending.get(rec.object_id) is rec:
                del self._pending[rec.object_id]

    def _sync(self, ticket: int) -> None:
        with self._sync_lock:
            if self._synced >= ticket:
                return  # someone else's fsync covered our record
            with self._lock:
                target, fd = self._written, self._fd
            os.fsync(fd)
            self._synced = max(self._synced, target)

    def delete(self, object_id: str) -> None:
        """Log the deletion of an object; its checkpoint is removed by the checkpointer."""
        self.write(Record(object_id, deleted=True))
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
        reason = "its stored state is torn or corrupt (checksum mismatch); file quarantined"
        self._corrupt[object_id] = reason
        try:
            os.replace(path, os.path.join(self.root, "quarantine", os.path.basename(path)))
        except OSError:
            pass
        log.error("object %s: %s", object_id, reason)

    def scan_headers(self):
        """Yield (object_id, class_key, alias) of every stored object (for repair)."""
        for oid in self.object_ids():
            try:
                rec = self.read(oid)
            except (ObjectCorrupt, ObjectNotFound):
                continue
            yield oid, rec.class_key, rec.alias

    # -- checkpointing ------------------------------------------------------------
    def start(self) -> None:
        if self._checkpointer is None:
            self._checkpointer = threading.Thread(target=self._run, name="checkpointer",
                                                  daemon=True)
            self._checkpointer.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self.checkpoint()
            except Exception:
                log.exception("checkpoint failed; will retry")
                time.sleep(0.2)

    def checkpoint(self) -> int:
        """Checkpoint everything logged so far and trim the log. Returns objects written."""
        if self.policy == "none":
            return 0
        with self._lock:
            if not self._pending:
                return 0
            # Rotate: records after this point go to a new segment and stay pending.
            old_segments = [s for s in self._segments() if s <= self._segment_seq]
            self._segment_seq += 1
            old_fd = self._fd
            self._fd = -1
            pending, self._pending = self._pending, {}
            self._inflight = pending
            written_before = self._written
            path = self._segment_path(self._segment_seq)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._segment_bytes = 0
        with self._sync_lock:
            os.fsync(old_fd)
            os.close(old_fd)
            self._synced = max(self._synced, written_before)
        fsync_dir(os.path.join(self.root, "wal"))
        count = 0
        touched_dirs = set()
        for oid, rec in pending.items():
            if rec is None:
                rec = self.snapshot(oid) if self.snapshot else None
                if rec is None:
                    continue
            target = self._object_path(oid)
            if rec.deleted:
                self._remove_checkpoint(oid)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                atomic_write(target, encode(rec), sync=True)
                count += 1
            touched_dirs.add(os.path.dirname(target))
        for d in touched_dirs:
            if os.path.isdir(d):
                fsync_dir(d)
        for seq in old_segments:
            try:
                os.unlink(self._segment_path(seq))
            except FileNotFoundError:
                pass
        with self._lock:
            self._inflight = {}
        return count

    def flush_log(self) -> None:
        """fsync the open log segment (the async policy's periodic flush)."""
        with self._lock:
            ticket = self._written
        if ticket > self._synced:
            self._sync(ticket)

    def close(self) -> None:
        """Stop the checkpointer; the log already holds everything acknowledged."""
        self._stop.set()
        self._wake.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5)
        if self.policy != "none":
            self.flush_log()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)
