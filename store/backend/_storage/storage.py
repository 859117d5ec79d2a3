"""A backend's storage directory: redo log plus per-object checkpoints.

Layout::

    <data_dir>/backend.id          stable identity of the backend
    <data_dir>/boot                how many times this dir was opened (high bits of every LSN)
    <data_dir>/wal/<seq>.log       redo log segments (records below)
    <data_dir>/objects/ab/<id>.obj one checkpoint per object (ab = first 2 hex digits)
    <data_dir>/code/<sha>.code     code of the classes stored here (restarts need no Redis)
    <data_dir>/quarantine/         checkpoints found torn or corrupt

Writing an object's new state encodes it once into a private blob (a copy,
never a view of the live object), appends the blob to the open log segment
and keeps it in memory as the object's pending state. The segment is written
from offset 0 into space reserved ahead of the write position (see
:mod:`.logspace`: a group commit's fdatasync then has no file growth to
commit); a retired or closed segment is truncated to its records, and after
a crash replay cuts the open segment's unused, zeroed reservation without a
warning, keeping the warning for a torn record. Under ``sync`` the
caller is acknowledged only after an fsync, and concurrent writers share one
fsync (group commit); under ``async`` a flusher thread fsyncs every
``flush_interval``. Every ``checkpoint_interval`` (or when the log outgrows a
segment) a background thread writes the pending blobs as checkpoint files
(temp file, fsync, rename, fsync of the directory) and deletes the log
segments they cover: what is checkpointed is byte for byte what was logged
and acknowledged. Write-behind objects (too big for the log) are
checkpointed from a snapshot the heap takes under the object's lock.

Ordering: every record carries a log sequence number (LSN), ``boot << 40 |
counter``, where ``boot`` grows by one each time the directory is opened,
so an LSN from a later run is larger than any from an earlier one. A
checkpoint file is installed (renamed into place) or removed only if its
LSN is larger than that of the file it replaces, checked at the rename
under one lock: a stale state never overwrites or deletes a newer one,
whichever path (log checkpoint, spill, write-behind, move, delete) wrote it.
Recovery replays the log keeping the highest LSN per object, then lets a
checkpoint file whose LSN is higher win over the logged record.

An fsync that fails stops the storage: the error is kept and every later
write raises :class:`~store.errors.StorageFailed` (after a failed fsync the
kernel may have dropped the dirty pages, so retrying could acknowledge data
that is not on disk).

Record and checkpoint format: ``MAGIC, u32 header length, u64 body length,
u32 crc32`` then a pickled header dict and the body blobs (pickle stream
and out-of-band buffers, back to back). The crc covers header and body.
"""

from __future__ import annotations

from collections.abc import Iterator
import hashlib
import itertools
import logging
import os
import pickle
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from store import metrics, tracing
from store.errors import DeadlineExceeded, ObjectCorrupt, ObjectNotFound, StorageFailed
from store.backend._storage import direct, logspace

log = logging.getLogger("claypot.storage")

_MAGIC = b"CPv1"
_PREFIX = struct.Struct("<4sIQI")
_SEGMENT_LIMIT = 64 * 1024 * 1024
_ABSENT = object()
_DIRTY = None  # a pending entry that is a write-behind mark rather than a logged blob
_QUARANTINED = "its stored state is torn or corrupt (checksum mismatch); the file is kept in quarantine/"
_CHECKPOINT_BATCH = 128  # checkpoint files written (and fsync'd) together
_BOOT_SHIFT = 40


_deferring = threading.local()


def deferring(on: bool) -> None:
    """Whether this thread answers calls in batches made durable by one :meth:`Storage.settle`
    before any reply leaves (the local lane's event loop).

    On such a thread the state a changing method call logs is written without
    its fsync (``Storage.write(defer=True)``). Only that: a persist, a delete,
    an alias or a move tells the directory about the change once it is
    stored, so it is fsync'd before, as on every other thread.
    """
    _deferring.on = on


def is_deferring() -> bool:
    """This thread defers durability (see :func:`deferring`)."""
    return getattr(_deferring, "on", False)


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
    lsn: int = 0
    # Arrived by a move: until the directory names this backend, a copy that the
    # directory does not know is a leftover of a move that never committed.
    moved_in: bool = False

    def size(self) -> int:
        return len(self.payload) + sum(memoryview(b).nbytes for b in self.buffers)


@dataclass
class _Logged:
    """A pending record: its LSN and its encoded bytes (private, as logged)."""

    lsn: int
    blob: bytearray
    deleted: bool
    class_key: str
    alias: str
    moved_in: bool = False


def record_header(rec: Record) -> bytes:
    """The pickled header of a record (what :func:`encode` puts after the prefix)."""
    sizes = [memoryview(b).nbytes for b in rec.buffers]
    return pickle.dumps(
        {
            "id": rec.object_id,
            "class": rec.class_key,
            "alias": rec.alias,
            "deleted": rec.deleted,
            "lsn": rec.lsn,
            "moved": rec.moved_in,
            "payload": len(rec.payload),
            "buffers": sizes,
        },
        protocol=5,
    )


def encode(rec: Record) -> bytearray:
    """The record as one contiguous, private blob (the bytes are copied here)."""
    sizes = [memoryview(b).nbytes for b in rec.buffers]
    header = record_header(rec)
    body_len = len(rec.payload) + sum(sizes)
    blob = bytearray(_PREFIX.size + len(header) + body_len)
    view = memoryview(blob)
    pos = _PREFIX.size
    view[pos : pos + len(header)] = header
    pos += len(header)
    for part in [rec.payload] + list(rec.buffers):
        m = memoryview(part).cast("B")
        view[pos : pos + m.nbytes] = m
        pos += m.nbytes
    # The checksum is taken over the copy, so it always matches the bytes written.
    crc = zlib.crc32(view[_PREFIX.size :])
    _PREFIX.pack_into(blob, 0, _MAGIC, len(header), body_len, crc)
    return blob


def _decode_head(data: memoryview, offset: int) -> tuple[dict, int, int] | None:
    """(header dict, body start, record end) of the record at ``offset``; None when torn
    or corrupt (the checksum covers header and body)."""
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
        head = pickle.loads(data[start : start + hlen])
    except Exception:
        return None
    return head, start + hlen, end


def decode(data: memoryview, offset: int = 0) -> tuple[Record, int] | None:
    """Parse one record at ``offset`` of ``data``; None when torn or corrupt.

    Buffers are memoryviews into ``data`` (no copy).
    """
    parsed = _decode_head(data, offset)
    if parsed is None:
        return None
    head, pos, end = parsed
    payload = data[pos : pos + head["payload"]]
    pos += head["payload"]
    buffers = []
    for n in head["buffers"]:
        buffers.append(data[pos : pos + n])
        pos += n
    rec = Record(
        head["id"],
        head["class"],
        head["alias"],
        payload,
        buffers,
        head["deleted"],
        head.get("lsn", 0),
        head.get("moved", False),
    )
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


def _cut_reservation(fd: int, length: int) -> None:
    """Truncate a segment that is done being written to its records (before its fsync)."""
    try:
        if os.fstat(fd).st_size > length:
            os.ftruncate(fd, length)
    except OSError as exc:
        # Its reserved tail stays: replay knows it (zeros) and cuts it at the next start.
        log.warning("log segment: truncating to its records failed: %s", exc)


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


def read_header(path: str) -> dict | None:
    """The header of a checkpoint file (id, class, alias, lsn, sizes), without its body.

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


def _object_path(root: str, object_id: str) -> str:
    return os.path.join(root, "objects", object_id[:2], object_id + ".obj")


def _checkpoint_ids(root: str) -> set[str]:
    """Ids of the objects with a checkpoint file (one directory scan, no file opened)."""
    ids: set[str] = set()
    base = os.path.join(root, "objects")
    if os.path.isdir(base):
        for sub in os.scandir(base):
            if sub.is_dir():
                for entry in os.scandir(sub.path):
                    if entry.name.endswith(".obj"):
                        ids.add(entry.name[:-4])
    return ids


def _scan_segment(data: memoryview) -> Iterator[tuple[str, int, Any]]:
    """Walk one log segment: yields ``("record", offset, (head, body start, end))`` for each
    record, ``("skip", offset, resume)`` for damage followed by valid records, and at
    most one last item: ``("zeros", offset, None)`` for the unused reservation after the
    last record or ``("torn", offset, None)`` for a record that never completed.
    """
    offset = 0
    while offset < len(data):
        parsed = _decode_head(data, offset)
        if parsed is None:
            if logspace.zeros_from(data, offset):
                # Space reserved ahead of the write position and never written (a
                # record starts with its non-zero magic, so zeros are no record).
                yield "zeros", offset, None
                return
            resume = _next_record(data, offset)
            if resume is None:
                yield "torn", offset, None
                return
            yield "skip", offset, resume
            offset = resume
            continue
        yield "record", offset, parsed
        offset = parsed[2]


def _written_length(data: memoryview) -> int:
    """Bytes of a segment up to its unused reservation (the whole file if it has none)."""
    for kind, offset, _ in _scan_segment(data):
        if kind == "zeros":
            return offset
    return len(data)


def _segment_names(root: str) -> list[str]:
    wal = os.path.join(root, "wal")
    return sorted(n for n in os.listdir(wal) if n.endswith(".log")) if os.path.isdir(wal) else []


def log_bytes(root: str) -> int:
    """Bytes of records in a storage dir's log segments, the unused reserved space excluded.

    What the log holds, as disk-use figures and tests read it: the open
    segment's file is larger (space reserved ahead of its write position).
    """
    total = 0
    for name in _segment_names(root):
        try:
            with open(os.path.join(root, "wal", name), "rb") as f:
                total += _written_length(memoryview(f.read()))
        except FileNotFoundError:
            pass  # trimmed by the checkpointer meanwhile
    return total


def _replay(
    root: str, on_torn=None, checkpoints_win: bool = True
) -> tuple[dict[str, tuple[Record, memoryview]], int, int]:
    """Read every log segment: per object, its highest-LSN record with the record's bytes
    as logged; also the records read and the highest LSN.

    ``on_torn(path, offset, zeros)`` is called for the end of a segment that
    holds no record: a torn record (``zeros`` False) or the unused reserved
    space (``zeros`` True); the caller may cut it. Damage followed by valid
    records skips the bad record only. With ``checkpoints_win`` an object whose
    checkpoint file is newer than its logged record is left out.
    """
    latest: dict[str, tuple[Record, memoryview]] = {}
    count = high = 0
    for name in _segment_names(root):
        path = os.path.join(root, "wal", name)
        try:
            with open(path, "rb") as f:
                data = memoryview(f.read())
        except FileNotFoundError:
            continue  # trimmed by a live backend's checkpoint (a scan retries: see scan_storage_dir)
        for kind, offset, found in _scan_segment(data):
            if kind in ("zeros", "torn"):
                if on_torn is not None:
                    on_torn(path, offset, kind == "zeros")
                break
            if kind == "skip":
                # Valid records follow: damage inside the log, not a torn tail.
                # Cutting there would drop acknowledged records; skip only the bad one.
                log.error("log %s: corrupt record at byte %d skipped (%d bytes)", path, offset, found - offset)
                continue
            head, _, end = found
            count += 1
            lsn = head.get("lsn", 0)
            if lsn > high:
                high = lsn
            oid = head["id"]
            old = latest.get(oid)
            if old is None or lsn >= old[0].lsn:
                # Only the header is decoded here: replay needs no payload.
                latest[oid] = (
                    Record(
                        oid,
                        head["class"],
                        head["alias"],
                        deleted=head["deleted"],
                        lsn=lsn,
                        moved_in=head.get("moved", False),
                    ),
                    data[offset:end],
                )
    # A checkpoint file written after the logged record (a spill, a write-behind
    # object, a move back in) is newer: it wins.
    for oid in _checkpoint_ids(root).intersection(latest) if checkpoints_win else ():
        head = read_header(_object_path(root, oid))
        if head is not None and head.get("lsn", 0) >= latest[oid][0].lsn:
            del latest[oid]
    return latest, count, high


# Scans of a live dir whose log was trimmed under them before one is given up.
_SCAN_TRIES = 20


def scan_storage_dir(root: str) -> Iterator[tuple[str, str, str]]:
    """Yield (object_id, class_key, alias) of every object in a storage dir, changing nothing.

    For ``claypot repair``, which may run while the dir's backend is up:
    unlike opening a :class:`Storage`, it neither cuts a torn log tail nor
    creates a log segment. A live backend's checkpoint may write an object's
    file after the scan looked for it and trim the segment that held it before
    the scan read the log: when a segment listed at the start is gone at the
    end, the scan starts again.
    """
    for _ in range(_SCAN_TRIES):
        names = _segment_names(root)
        found = _scan_once(root)
        if all(os.path.exists(os.path.join(root, "wal", n)) for n in names):
            yield from found
            return
    raise DeadlineExceeded(
        f"{root}: its log was trimmed under each of {_SCAN_TRIES} scans (a backend checkpointing "
        f"without pause); scan again, or stop its backend first"
    )


def _scan_once(root: str) -> list[tuple[str, str, str]]:
    # Per object, the newest of its checkpoint file and its logged record, by LSN:
    # a live backend writes files and trims the log meanwhile, so neither the files
    # read first nor the log read next is the whole truth.
    found: dict[str, tuple[int, tuple[str, str] | None]] = {}
    base = os.path.join(root, "objects")
    if os.path.isdir(base):
        for sub in os.scandir(base):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.endswith(".obj"):
                    head = read_header(entry.path)
                    if head is not None and head["id"] == entry.name[:-4]:
                        found[head["id"]] = (head.get("lsn", 0), (head["class"], head["alias"]))
    latest, _, _ = _replay(root, checkpoints_win=False)
    for oid, (rec, _) in latest.items():
        if oid not in found or rec.lsn >= found[oid][0]:
            found[oid] = (rec.lsn, None if rec.deleted else (rec.class_key, rec.alias))
    return [(oid, value[0], value[1]) for oid, (_, value) in found.items() if value is not None]


class Storage:
    """The storage directory of one backend (see the module docstring).

    ``policy``: ``sync`` (fsync before acknowledging), ``async`` (log written
    at once, fsync'd every ``flush_interval``) or ``none`` (nothing written
    but spilled objects; scratch data). ``checkpoint_live(id)`` is called by
    the checkpointer for write-behind objects: it snapshots the object under
    its lock and writes it with write_checkpoint().
    """

    def __init__(
        self,
        root: str,
        policy: str = "sync",
        flush_interval: float = 1.0,
        checkpoint_live: Callable[[str], bool] | None = None,
        checkpoint_interval: float = 10.0,
    ):
        self.root = root
        self.policy = policy
        self.flush_interval = flush_interval
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_live = checkpoint_live
        self.failed: BaseException | None = None
        for sub in ("wal", "objects", "quarantine", "code"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        fsync_dir(root)
        self.backend_id = self._load_identity()
        self._boot = self._next_boot()
        self._counter = itertools.count(1)
        # LSN of the checkpoint file of each object this run wrote or removed;
        # files from earlier runs have smaller LSNs than any of this run.
        self._rename_lock = threading.Lock()
        self._file_lsn: dict[str, int] = {}
        self._lock = threading.Lock()  # log appends and the pending map
        self._sync_lock = threading.Lock()  # one fsync at a time (group commit)
        self._written = 0  # records appended
        self._synced = 0  # records known durable
        self._deferred = 0  # last record appended on a deferring thread (see settle())
        # Logged, not yet checkpointed; _DIRTY marks a write-behind object (snapshot it).
        self._pending: dict[str, _Logged | None] = {}
        self._inflight: dict[str, _Logged | None] = {}  # being checkpointed right now
        self._corrupt: dict[str, str] = {}
        self._segment_seq = 0
        self._fd = -1
        self._segment_bytes = 0  # written length of the open segment (its write position)
        # End of the space reserved in the open segment (see .logspace); writes past
        # it grow the file like appends. Off for good where the file system cannot
        # reserve space, and for the segment where reserving failed otherwise.
        self._reserved = 0
        self._reserving = policy != "none"
        self._reserve_off_seq = 0
        self._reserve_wake = threading.Event()
        self._reserver: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._code_lock = threading.Lock()
        self._unsnapshot = False  # a write-behind object this checkpoint could not snapshot
        # One checkpoint (or write-behind flush) at a time: two at once would each trim
        # log segments whose records the other has not written yet.
        self._checkpoint_lock = threading.Lock()
        for name in os.listdir(os.path.join(root, "quarantine")):
            if name.endswith(".obj"):  # stays an error across restarts, not a vanished object
                self._corrupt[name[:-4]] = _QUARANTINED
        self.recovered = self._recover()

    # -- identity and sequence numbers ----------------------------------------------
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

    def _next_boot(self) -> int:
        path = os.path.join(self.root, "boot")
        try:
            with open(path) as f:
                boot = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            boot = 0
        boot += 1
        atomic_write(path, [str(boot).encode()])
        return boot

    def next_lsn(self) -> int:
        """A new log sequence number, larger than every one before (this run or earlier)."""
        return (self._boot << _BOOT_SHIFT) | next(self._counter)

    # -- paths --------------------------------------------------------------------
    def _object_path(self, object_id: str) -> str:
        return _object_path(self.root, object_id)

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

        def cut(path, offset, zeros):
            if zeros:
                # Space reserved ahead of the last write, never used: no record was lost.
                log.debug("log %s: unused reserved space from byte %d cut off", path, offset)
            else:
                log.warning("log %s: torn record at byte %d, cut off", path, offset)
            with open(path, "r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())

        latest, count, _ = _replay(self.root, cut)
        for oid, (rec, raw) in latest.items():
            # The record's bytes as logged, copied out so the segment's buffer is freed.
            self._pending[oid] = _Logged(rec.lsn, bytearray(raw), rec.deleted, rec.class_key, rec.alias, rec.moved_in)
        segments = self._segments()
        self._segment_seq = (segments[-1] + 1) if segments else 1
        for seq in segments:
            # Each start opens a segment, and a checkpoint trims segments only when
            # something was logged: without this, every start of a quiet backend (or
            # crash, once its unused reservation is cut) would leave one empty file.
            path = self._segment_path(seq)
            if os.path.getsize(path) == 0:
                os.unlink(path)
        self._open_segment()
        return count

    def _open_segment(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._segment_bytes = self._new_segment(self._segment_seq)
        self._reserved = self._segment_bytes
        fsync_dir(os.path.join(self.root, "wal"))
        self._request_reserve()

    def _new_segment(self, seq: int) -> tuple[int, int]:
        """Open segment ``seq`` for writing: (fd, write position).

        No O_APPEND: records are written at the fd's position, into space
        reserved ahead of it (see .logspace). A segment is always new; were one
        there, writing continues after its end, as an append would.
        """
        fd = os.open(self._segment_path(seq), os.O_WRONLY | os.O_CREAT, 0o600)
        return fd, os.lseek(fd, 0, os.SEEK_END)

    # -- reserved log space -----------------------------------------------------------
    def _reserve_due(self) -> bool:
        """Under self._lock: the open segment's reserved space is running low."""
        return (
            self._reserving
            and self._reserve_off_seq != self._segment_seq
            and self._reserved - self._segment_bytes < logspace.RESERVE_LOW
        )

    def _request_reserve(self) -> None:
        """Reserve more log space: by the reserver thread once started, else right here."""
        if self._reserver is not None:
            self._reserve_wake.set()
        else:
            try:
                self._reserve_ahead()
            except StorageFailed:
                raise
            except Exception:
                log.exception("reserving log space failed; the log appends instead")

    def _reserve_loop(self) -> None:
        while True:
            self._reserve_wake.wait()
            self._reserve_wake.clear()
            if self._stop.is_set():
                return
            try:
                self._reserve_ahead()
            except StorageFailed:
                return
            except Exception:
                log.exception("reserving log space failed; the log appends instead")

    def _reserve_ahead(self) -> None:
        """Reserve the next step of the open segment, then make the reservation durable.

        The fallocate runs under self._lock (a few µs; the segment cannot be
        retired or closed meanwhile, so its file never gains space after it
        was truncated to its records). The fdatasync that follows commits the
        new extents and file size now, on this thread: otherwise the next
        group commit's fdatasync would, at the price of an append.
        """
        with self._lock:
            if self._fd < 0 or not self._reserve_due():
                return
            fd, seq = self._fd, self._segment_seq
            start = max(self._reserved, self._segment_bytes)
            end = self._segment_bytes + logspace.RESERVE_STEP
            try:
                supported = logspace.reserve(fd, start, end - start)
            except OSError as exc:
                # Not a reason to fail a write (a full disk fails the writes
                # themselves): this segment appends from here on.
                self._reserve_off_seq = seq
                log.warning("log segment %d: reserving space failed (%s); appending instead", seq, exc)
                return
            if not supported:
                self._reserving = False
                log.info("the file system cannot reserve log space: the log appends instead")
                return
            self._reserved = end
            synced = os.dup(fd)  # the segment may be retired (its fd closed) during the fsync
        try:
            self._fsync(synced, data_only=True)
        finally:
            os.close(synced)

    def unused_reservation(self) -> int:
        """Bytes reserved in the open log segment and not written yet (disk use leaves them out)."""
        with self._lock:
            return max(0, self._reserved - self._segment_bytes) if self._fd >= 0 else 0

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

    # -- failure --------------------------------------------------------------------
    def _check(self) -> None:
        if self.failed is not None:
            raise StorageFailed(
                f"the storage of backend {self.backend_id[:8]} failed ({self.failed}); it "
                f"acknowledges nothing further: restart the backend"
            ) from None

    def _fsync(self, fd: int, data_only: bool = False) -> None:
        """fsync (or fdatasync) ``fd``; a failure stops the storage (see the module docstring)."""
        try:
            (os.fdatasync if data_only else os.fsync)(fd)
        except OSError as exc:
            self.failed = exc
            log.critical("fsync failed, storage stopped: %s", exc)
            self._check()

    def _fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, d: str) -> None:
        """Create a checkpoint subdirectory durably (its parent fsync'd after the create)."""
        if not os.path.isdir(d):
            os.makedirs(d, exist_ok=True)
            self._fsync_dir(os.path.dirname(d))

    # -- writing ------------------------------------------------------------------
    def write(self, rec: Record, durable: bool = True, defer: bool = False) -> int:
        """Log ``rec`` (a private copy of its bytes); returns its LSN.

        With ``durable`` under the sync policy, returns once it is fsync'd. A
        batch writes with ``durable=False`` and calls :meth:`sync` once. With
        ``defer`` (a changing call on a thread that settles its calls, see
        :func:`deferring`) it returns before the fsync: :meth:`settle` makes
        it durable before the call is answered.
        """
        self._check()
        rec.lsn = self.next_lsn()
        if self.policy == "none":
            with self._lock:
                self._pending.pop(rec.object_id, None)
            return rec.lsn
        blob = encode(rec)
        with self._lock:
            try:
                _write_all(self._fd, [blob])
            except BaseException:
                # A partial write moved the position: the written length follows it,
                # so truncating a retired segment keeps every record after it.
                try:
                    self._segment_bytes = os.lseek(self._fd, 0, os.SEEK_CUR)
                except OSError:
                    pass
                raise
            self._written += 1
            ticket = self._written
            self._segment_bytes += len(blob)
            self._pending[rec.object_id] = _Logged(rec.lsn, blob, rec.deleted, rec.class_key, rec.alias, rec.moved_in)
            rotate = self._segment_bytes > _SEGMENT_LIMIT
            reserve = self._reserve_due()
        if reserve:
            self._request_reserve()  # before the fsync: the reserver works while we wait
        if durable and self.policy == "sync":
            if defer:
                self._note_deferred(ticket)
            else:
                self._sync(ticket)
        if rotate:
            self._wake.set()
        return rec.lsn

    def sync(self) -> None:
        """Make everything logged so far durable (under ``sync``; a no-op otherwise)."""
        self._check()
        if self.policy != "sync":
            return
        with self._lock:
            ticket = self._written
        self._sync(ticket)

    def _note_deferred(self, ticket: int) -> None:
        if ticket > self._deferred:
            with self._lock:
                self._deferred = max(self._deferred, ticket)

    def settle(self) -> None:
        """Make durable every record logged without its fsync on a deferring thread.

        The local lane calls it once per batch of calls, before their replies
        go out; a call served elsewhere calls it before it answers when it may
        have seen such a record (:meth:`unsettled`). Raises StorageFailed if
        the fsync fails.
        """
        ticket = self._deferred
        if ticket > self._synced:
            self._sync(ticket)

    def unsettled(self) -> bool:
        """Some record logged on a deferring thread is not durable yet."""
        return self._deferred > self._synced

    def mark_dirty(self, object_id: str) -> None:
        """Write-behind: checkpoint the object's live state (checkpoint_live()) soon."""
        if self.policy == "none":
            return
        with self._lock:
            # Even over a logged record: the snapshot will be newer than that record.
            self._pending[object_id] = _DIRTY
        # No wake-up: repeated updates of a big object coalesce into one checkpoint
        # per flush interval instead of rewriting it after every call.

    def write_checkpoint(self, rec: Record, clear_dirty: bool = False) -> int:
        """Write a checkpoint now, bypassing the log (big objects, spills); returns its LSN.

        The caller holds the object's lock and ``rec`` is its newest state; it
        gets a new LSN, so any state logged for it before is older (and the
        checkpointer's rename of that older state is refused). With
        ``clear_dirty`` (the state was snapshot from the live object) a
        write-behind mark set before is settled.
        """
        self._check()
        rec.lsn = self.next_lsn()
        path = self._object_path(rec.object_id)
        self._ensure_dir(os.path.dirname(path))
        sync = self.policy != "none"
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        # A big record under sync goes straight to the disk (O_DIRECT, see .direct):
        # no encoded copy, no page-cache writeback before the fsync.
        if not (
            sync
            and rec.size() >= direct.MIN_BYTES
            and direct.write(tmp, _PREFIX, _MAGIC, record_header(rec), [rec.payload] + list(rec.buffers), self._fsync)
        ):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, [encode(rec)])
                if sync:
                    self._fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
        self._install(tmp, path, rec.object_id, rec.lsn)
        if sync:
            self._fsync_dir(os.path.dirname(path))
        with self._lock:
            current = self._pending.get(rec.object_id, _ABSENT)
            if current is _DIRTY and clear_dirty:
                del self._pending[rec.object_id]
            elif isinstance(current, _Logged) and current.lsn < rec.lsn:
                del self._pending[rec.object_id]  # the file is newer than the logged state
        return rec.lsn

    def _install(self, tmp: str, path: str, object_id: str, lsn: int) -> bool:
        """Rename ``tmp`` over ``path`` unless a newer state (or delete) is already there."""
        with self._rename_lock:
            if lsn > self._file_lsn.get(object_id, 0):
                os.replace(tmp, path)
                self._file_lsn[object_id] = lsn
                return True
        os.unlink(tmp)
        return False

    def _remove(self, object_id: str, lsn: int) -> None:
        """Remove the checkpoint of a deleted object, unless a newer state replaced it."""
        with self._rename_lock:
            if lsn > self._file_lsn.get(object_id, 0):
                self._file_lsn[object_id] = lsn
                try:
                    os.unlink(self._object_path(object_id))
                except FileNotFoundError:
                    pass

    def is_dirty(self, object_id: str) -> bool:
        """True while a write-behind object has changes not yet in its checkpoint."""
        with self._lock:
            return self._pending.get(object_id, False) is _DIRTY or self._inflight.get(object_id, False) is _DIRTY

    def _sync(self, ticket: int) -> None:
        with self._sync_lock:
            self._check()
            if self._synced >= ticket:
                return  # someone else's fsync covered our record
            with self._lock:
                target, fd = self._written, self._fd
            if fd < 0:
                return  # closed: close() flushed it
            # fdatasync flushes the written bytes (and the file size, when a write
            # went past the reserved space) but skips timestamps: measured ~20%
            # cheaper here. Inside reserved space it has no size to commit.
            started = time.perf_counter()
            self._fsync(fd, data_only=True)
            metrics.fsync_done(time.perf_counter() - started, target - self._synced)
            self._synced = max(self._synced, target)

    def delete(self, object_id: str, durable: bool = True) -> int:
        """Log the deletion of an object; its checkpoint is removed by the checkpointer."""
        lsn = self.write(Record(object_id, deleted=True), durable)
        if self._corrupt.pop(object_id, None) is not None:
            try:  # deleting a quarantined object is how a user clears it
                os.unlink(os.path.join(self.root, "quarantine", object_id + ".obj"))
            except FileNotFoundError:
                pass
        if self.policy == "none":
            self._remove(object_id, lsn)
        return lsn

    # -- code ---------------------------------------------------------------------
    def _code_path(self, key: str) -> str:
        return os.path.join(self.root, "code", hashlib.sha256(key.encode()).hexdigest() + ".code")

    def save_code(self, key: str, code: bytes) -> None:
        """Keep a class's code with the data, so a restart needs nothing but this dir."""
        path = self._code_path(key)
        if os.path.exists(path):
            return
        with self._code_lock:
            if not os.path.exists(path):
                atomic_write(path, [pickle.dumps((key, bytes(code)), protocol=5)])

    def load_code(self, key: str) -> bytes | None:
        """The code stored here for ``key``, or None."""
        try:
            with open(self._code_path(key), "rb") as f:
                stored_key, code = pickle.loads(f.read())
        except (FileNotFoundError, pickle.UnpicklingError, EOFError, ValueError):
            return None
        return code if stored_key == key else None

    # -- reading ------------------------------------------------------------------
    def read(self, object_id: str) -> Record:
        """The latest stored state of an object, in private writable memory."""
        if object_id in self._corrupt:
            raise ObjectCorrupt(f"object {object_id}: {self._corrupt[object_id]}")
        with self._lock:
            logged = self._pending.get(object_id) or self._inflight.get(object_id)
        with self._rename_lock:
            file_lsn = self._file_lsn.get(object_id, 0)
        if logged is not None and file_lsn > logged.lsn:
            logged = None  # a direct write (spill, big object) is newer than the logged state
        if logged is not None:
            if logged.deleted:
                raise ObjectNotFound(f"object {object_id} was deleted")
            rec, _ = decode(memoryview(logged.blob))
            # Copies: the pending blob is what the checkpointer will write, and a
            # live object built over it would change it in place.
            rec.payload = bytes(rec.payload)
            rec.buffers = [bytearray(b) for b in rec.buffers]
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

    def scan_headers(self) -> Iterator[tuple[str, str, str]]:
        """Yield (object_id, class_key, alias) of every stored object (to republish)."""
        for oid, key, alias, _ in self.scan_entries():
            yield oid, key, alias

    def scan_entries(self) -> Iterator[tuple[str, str, str, bool]]:
        """Yield (object_id, class_key, alias, moved_in) of every stored object.

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
                    yield oid, rec.class_key, rec.alias, rec.moved_in
                continue
            if oid in self._corrupt:
                continue
            head = read_header(self._object_path(oid))
            if head is not None:
                yield oid, head["class"], head["alias"], head.get("moved", False)

    # -- checkpointing ------------------------------------------------------------
    def start(self) -> None:
        """Start the background checkpointer (and, under ``async``, the log flusher)."""
        if self._checkpointer is None:
            self._checkpointer = threading.Thread(target=self._run, name="checkpointer", daemon=True)
            self._checkpointer.start()
            if self._reserving:
                self._reserver = threading.Thread(target=self._reserve_loop, name="log-reserver", daemon=True)
                self._reserver.start()
                self._reserve_wake.set()  # in case the space ran low before the thread existed
            if self.policy == "async":
                # Its own thread: a long checkpoint must not stretch the window of
                # un-fsync'd log past flush_interval.
                threading.Thread(target=self._flush_loop, name="log-flusher", daemon=True).start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush_log()
            except StorageFailed:
                return
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
            if self._stop.is_set() or self.failed is not None:
                break
            try:
                if time.monotonic() - last_full >= self.checkpoint_interval or self._segment_bytes > _SEGMENT_LIMIT:
                    self.checkpoint(self._stop)
                    last_full = time.monotonic()
                else:
                    self.flush_dirty(self._stop)
            except StorageFailed:
                break
            except Exception:
                log.exception("checkpoint failed; will retry")
                time.sleep(0.2)

    def flush_dirty(self, stop: threading.Event | None = None) -> int:
        """Checkpoint the write-behind objects changed since their last checkpoint."""
        with self._checkpoint_lock:
            return self._flush_dirty(stop)

    def _flush_dirty(self, stop: threading.Event | None) -> int:
        with self._lock:
            dirty = [(oid, _DIRTY) for oid, rec in self._pending.items() if rec is _DIRTY]
            for oid, _ in dirty:
                del self._pending[oid]
                # Still dirty while being written: a spill meanwhile must write the
                # object itself (is_dirty), or its change would be dropped with it.
                self._inflight[oid] = _DIRTY
        if not dirty:
            return 0
        try:
            return self._write_checkpoints(dirty, stop)
        except BaseException:
            with self._lock:  # not written: still dirty
                for oid, _ in dirty:
                    self._pending.setdefault(oid, _DIRTY)
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
        with self._checkpoint_lock:
            started = time.perf_counter()
            with tracing.span("checkpoint"):
                written = self._checkpoint(stop)
            metrics.checkpoint_done(time.perf_counter() - started, written)
            return written

    def _checkpoint(self, stop: threading.Event | None) -> int:
        self._check()
        self._unsnapshot = False
        # _sync_lock first: a writer's group-commit fsync must not mark records of
        # the segment being retired as durable before that segment is fsync'd.
        with self._sync_lock:
            with self._lock:
                if not self._pending:
                    return 0
                # Rotate: records after this point go to a new segment and stay pending.
                old_segments = [s for s in self._segments() if s <= self._segment_seq]
                self._segment_seq += 1
                old_fd, old_length = self._fd, self._segment_bytes
                pending, self._pending = self._pending, {}
                self._inflight = dict(pending)
                written_before = self._written
                self._fd, self._segment_bytes = self._new_segment(self._segment_seq)
                self._reserved = self._segment_bytes
            try:
                _cut_reservation(old_fd, old_length)
                self._fsync(old_fd)
            finally:
                os.close(old_fd)
            self._synced = max(self._synced, written_before)
        self._fsync_dir(os.path.join(self.root, "wal"))
        self._request_reserve()
        items = list(pending.items())
        done = count = 0
        try:
            for i in range(0, len(items), _CHECKPOINT_BATCH):
                batch = items[i : i + _CHECKPOINT_BATCH]
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
        if done < len(items) or self._unsnapshot:
            # Not everything the old segments cover is in a checkpoint: keep them (a
            # later checkpoint trims them).
            return count
        for seq in old_segments:
            try:
                os.unlink(self._segment_path(seq))
            except FileNotFoundError:
                pass
        return count

    def _write_checkpoints(self, batch: list, stop: threading.Event | None = None) -> int:
        """Write one batch of checkpoints: all files first, then one fsync each, then renames.

        Each file holds exactly the logged blob. Writing every file before the
        first fsync lets the file system commit them together; each file is
        durable before its rename, the rename is refused if a newer state is
        already in place, and each directory is fsync'd once per batch.
        Raises _Abandoned (leaving no file changed) as soon as ``stop`` is set.
        """
        staged = []  # (fd, temp path, final path, object id, lsn)
        written_live = 0
        dirs = set()  # directories to fsync after the renames
        made = set()  # directories known to exist
        try:
            for oid, rec in batch:
                if stop is not None and stop.is_set():
                    raise _Abandoned()
                if rec is _DIRTY:
                    # A write-behind object: snapshot under its lock, written directly.
                    try:
                        if self.checkpoint_live is not None and self.checkpoint_live(oid):
                            written_live += 1
                        else:
                            # Not snapshot (gone, moving, spilled): an older state of it may
                            # be only in the log, so this checkpoint keeps the log.
                            self._unsnapshot = True
                    except DeadlineExceeded:
                        self._unsnapshot = True
                        with self._lock:  # busy in a long call: stays dirty, next round
                            self._pending.setdefault(oid, _DIRTY)
                    continue
                target = self._object_path(oid)
                d = os.path.dirname(target)
                if rec.deleted:
                    self._remove(oid, rec.lsn)
                    dirs.add(d)
                    continue
                if d not in made:
                    self._ensure_dir(d)
                    made.add(d)
                    dirs.add(d)
                tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                staged.append((fd, tmp, target, oid, rec.lsn))
                _write_all(fd, [rec.blob])
            for fd, *_ in staged:
                if stop is not None and stop.is_set():
                    raise _Abandoned()
                self._fsync(fd, data_only=True)
        except BaseException:
            for fd, tmp, *_ in staged:
                os.close(fd)
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            raise
        for fd, tmp, target, oid, lsn in staged:
            os.close(fd)
            self._install(tmp, target, oid, lsn)
        for d in dirs:
            if os.path.isdir(d):
                self._fsync_dir(d)
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
        self._reserve_wake.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        if self._reserver is not None:
            self._reserver.join()
        if self.policy != "none" and self.failed is None:
            self.flush_dirty()
            self.flush_log()
        with self._sync_lock:
            with self._lock:
                fd, length = self._fd, self._segment_bytes
                self._fd = -1
            if fd < 0:
                return
            try:
                if self.policy != "none" and self.failed is None:
                    # The closed segment keeps its records only, durably: a restart
                    # finds no reserved tail in it.
                    _cut_reservation(fd, length)
                    self._fsync(fd)
            finally:
                os.close(fd)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)
