"""Same-host transfer of large buffers through shared memory (/dev/shm).

When a client and a backend run on one machine (they have the same host
identity, see ``host_id``), a large value's out-of-band buffers need not cross a
socket: the sender writes each buffer into a new segment in /dev/shm and
sends only the segment names; the receiver maps them, unlinks them, and the
mapping *is* the received buffer (a numpy array unpickled from it uses it
in place). A 1 GiB buffer then costs one copy into the segment instead of
gRPC's chunked stream (measured here: about 2 GB/s against about 1 GB/s).

Segments are created with mode 0600 under random names that start with the
creator's PID. The receiver opens a segment without following symlinks and
maps it only if it is a regular file of this user with mode 0600 (another
local user cannot hand it a file of their own, nor a link to one of ours),
and unlinks it as soon as it is mapped. A sender whose call failed unlinks
what it created; a backend unlinks result segments that no client picked up
within ``RESULT_TTL`` seconds (on a timer), and at start removes segments
whose creator died without cleaning up (``kill -9``).
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import stat
import threading
import time
import uuid
from typing import Any, Sequence

from store.errors import ProtocolError

SHM_DIR = "/dev/shm"
PREFIX = "claypot-"
RESULT_TTL = 120.0
_WRITE_SLICE = 64 << 20


class Unavailable(OSError):
    """Shared memory could not take the value (no /dev/shm, or it is full): stream it."""


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True where /dev/shm exists and is writable (Linux). Asked once per process:
    every call on the hot path consults it."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


@functools.lru_cache(maxsize=4)
def host_id(override: str = "") -> str:
    """This process's host identity: two processes with equal ids share /dev/shm.

    Derived from the kernel's boot id (one per machine and boot), the network
    namespace and the device of /dev/shm, so two containers (or two network
    namespaces standing in for hosts) on one machine count as different hosts,
    while every process of one host agrees, whatever address they use for each
    other. ``override`` (``CLAYPOT_HOST_ID``) replaces it.
    """
    if override:
        return override
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
            break
        except OSError:
            continue
    for path in ("/proc/self/ns/net", SHM_DIR):
        try:
            st = os.stat(path)
            parts.append(f"{st.st_dev}:{st.st_ino}")
        except OSError:
            parts.append("-")
    if not parts or parts[0] in ("-", ""):
        parts.insert(0, uuid.uuid4().hex)  # unknown machine: share nothing with anyone
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=256)
def is_local_address(address: str) -> bool:
    """True for loopback addresses: the fallback test of sameness for a peer that
    does not tell its host id."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("localhost", "::1")


def _path(name: str) -> str:
    if not name.startswith(PREFIX) or len(name) > 100 or not name[len(PREFIX) :].replace("-", "").isalnum():
        raise ProtocolError(f"not a claypot shared-memory segment: {name[:120]!r}")
    return os.path.join(SHM_DIR, name)


def _new_name() -> str:
    # The creator's PID in the name lets a later sweep tell orphans (creator
    # gone) from segments still in flight.
    return f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}"


FREE_MARK = "free"
KEPT_MARK = "kept"
SPARE_MARK = "spare"


def kept_name() -> str:
    """A name for a segment a backend keeps as an object's memory: no transfer is in
    flight under it, so an orphan sweep removes it as soon as its keeper is dead."""
    return f"{PREFIX}{os.getpid()}-{KEPT_MARK}{pid_namespace()}n{uuid.uuid4().hex}"


def spare_name() -> str:
    """A name for a spare a backend readies for its own copy-on-write: like a kept
    segment's (no client claims it), and told apart from the objects' memory."""
    return f"{PREFIX}{os.getpid()}-{SPARE_MARK}{pid_namespace()}n{uuid.uuid4().hex}"


def _settled(name: str) -> bool:
    """A kept, spare or free segment of a keeper in this PID namespace: its PID tells
    all."""
    rest = name[len(PREFIX) :].split("-", 1)[-1]
    if rest.startswith(FREE_MARK):
        return True
    mark = KEPT_MARK if rest.startswith(KEPT_MARK) else SPARE_MARK if rest.startswith(SPARE_MARK) else ""
    if not mark:
        return False
    ns = rest[len(mark) :].split("n", 1)[0]
    return ns.isdigit() and int(ns) == pid_namespace()


def free_name() -> str:
    """A name for a free segment that a backend keeps for reuse (see ``claim_free``)."""
    return f"{PREFIX}{os.getpid()}-{FREE_MARK}{uuid.uuid4().hex}"


def claim_free(nbytes: int) -> str:
    """Take a free segment of this user (one a same-host backend keeps for reuse) that
    holds at least ``nbytes``; returns its new name (this process's), or "".

    A rename is the claim: of two processes after one segment, one wins. Its
    pages exist already, so filling it runs at memory speed.
    """
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX) and f"-{FREE_MARK}" in n]
    except OSError:
        return ""
    sized = []
    with _fills_lock:
        mapped = {key for key, fill in _fills.items() if fill.size >= nbytes}
    for n in names:
        try:
            st = os.stat(os.path.join(SHM_DIR, n), follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_size >= nbytes:
            # One this process still maps (it wrote it before) first: no page to map.
            sized.append(((st.st_dev, st.st_ino) not in mapped, st.st_size, n))
    for _, _, n in sorted(sized):
        mine = _new_name()
        try:
            os.rename(os.path.join(SHM_DIR, n), os.path.join(SHM_DIR, mine))
        except OSError:
            continue  # another process claimed it first
        return mine
    return ""


class _Fill:
    """This process's mapping of a segment it filled (see :func:`fill`)."""

    __slots__ = ("region", "fd", "size")

    def __init__(self, region: mmap.mmap, fd: int, size: int):
        self.region, self.fd, self.size = region, fd, size

    def close(self) -> None:
        try:
            self.region.close()
        except BufferError:
            pass  # a copy into it is still running: the mapping goes with the object
        os.close(self.fd)


# Mappings of segments this process filled, by (device, inode): a backend keeps
# the segment, and once it is free again (the object deleted, the file back in
# the backend's pool) the next put claims and fills the same file through the
# same mapping, whose page tables exist: one memcpy, as into a reused store.
# Each holds the file open (its inode cannot be reused); one whose file was
# unlinked is dropped within a second (see _watch_fills): its pages are nobody's
# any more. A forked child drops the ones it inherited (_after_fork_in_child).
_FILLS_MAX = 4
_fills_lock = threading.Lock()
_fills: dict[tuple[int, int], _Fill] = {}
_fills_watch: list[threading.Thread] = []


_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
_COPY_PART = 32 << 20  # the least a thread copies: below that, starting it costs more


def copy(dst: int, src: int, n: int) -> None:
    """memcpy of ``n`` bytes between addresses, split over up to four threads for big
    copies (ctypes releases the GIL while each runs): one core rarely saturates the
    memory bus, so a 1 GiB copy on two free cores takes about two thirds of the time
    (Ray's store copies in parallel too)."""
    import ctypes

    k = min(_COPY_THREADS, n // _COPY_PART)
    if k <= 1:
        ctypes.memmove(dst, src, n)
        return
    step = -(-n // k // mmap.PAGESIZE) * mmap.PAGESIZE
    threads = [
        threading.Thread(target=ctypes.memmove, name="claypot-copy", args=(dst + off, src + off, min(step, n - off)))
        for off in range(step, n, step)
    ]
    for t in threads:
        t.start()
    ctypes.memmove(dst, src, step)
    for t in threads:
        t.join()


def fill(name: str, buf: Any) -> None:
    """Copy ``buf`` into segment ``name`` (cut to its size).

    Through this process's mapping of the file when it filled it before,
    else through a new populated mapping, kept for next time.
    """
    view = memoryview(buf)
    view = view.cast("B") if view.contiguous else memoryview(bytes(buf))
    fd = _open_checked(_path(name), name, os.O_RDWR, None)
    keep = False
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        # Always, even at the same size: ftruncate stamps the file's mtime, which must
        # be newer than its next keeper's start (an orphan sweep's test, remove_orphans).
        os.ftruncate(fd, view.nbytes)
        if not view.nbytes:
            return
        with _fills_lock:
            got = _fills.pop(key, None)
        if got is not None and got.size < view.nbytes:
            got.close()
            got = None
        if got is None:
            region = mmap.mmap(fd, view.nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            got = _Fill(region, fd, view.nbytes)
            keep = True
        dst, src = buffer_address(got.region), buffer_address(view)
        if dst is not None and src is not None:
            copy(dst, src, view.nbytes)
        else:
            got.region[: view.nbytes] = view
        _remember_fill(key, got)
    finally:
        if not keep:
            os.close(fd)


def _remember_fill(key: tuple[int, int], got: _Fill) -> None:
    with _fills_lock:
        _fills[key] = got
        old = []
        while len(_fills) > _FILLS_MAX:
            oldest = next(iter(_fills))
            old.append(_fills.pop(oldest))
        if not _fills_watch:
            _fills_watch.append(threading.Thread(target=_watch_fills, name="claypot-fills", daemon=True))
            _fills_watch[0].start()
    for f in old:
        f.close()


def forget_fills() -> None:
    """Drop every kept mapping of filled segments (their files stay where they are)."""
    with _fills_lock:
        old = list(_fills.values())
        _fills.clear()
    for f in old:
        f.close()


def _watch_fills(period: float = 1.0) -> None:
    """Drop kept mappings whose file was unlinked, every ``period`` seconds, until none
    is left: the mapping would be all that keeps those pages."""
    while True:
        time.sleep(period)
        with _fills_lock:
            gone = [k for k, f in _fills.items() if _unlinked(f.fd)]
            dropped = [_fills.pop(k) for k in gone]
            idle = not _fills
            if idle:
                _fills_watch.clear()  # the next fill starts a new watcher
        for f in dropped:
            f.close()
        if idle:
            return


def _unlinked(fd: int) -> bool:
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return True


def _check_segment(fd: int, name: str, size: int) -> None:
    """Refuse anything but a regular file of this user, mode 0600, of the announced size."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(f"shared-memory segment {name} is not a regular file")
    if st.st_uid != os.getuid():
        raise ProtocolError(f"shared-memory segment {name} belongs to another user")
    if stat.S_IMODE(st.st_mode) != 0o600:
        raise ProtocolError(f"shared-memory segment {name} has mode {stat.S_IMODE(st.st_mode):o}, not 600")
    if st.st_size != size:
        raise ProtocolError(f"shared-memory segment {name} has the wrong size")


def export(buffers: Sequence) -> list[str]:
    """Write each buffer into a new segment; returns their names (all or none)."""
    names: list[str] = []
    try:
        for buf in buffers:
            view = memoryview(buf).cast("B") if memoryview(buf).contiguous else memoryview(bytes(buf))
            name = _new_name()
            fd = os.open(
                os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            names.append(name)
            try:
                os.ftruncate(fd, view.nbytes)
                # pwrite into tmpfs measured 2-3x faster than copying through a mapping.
                offset = 0
                while offset < view.nbytes:
                    offset += os.pwrite(fd, view[offset : offset + _WRITE_SLICE], offset)
            finally:
                os.close(fd)
    except OSError as exc:
        discard(names)
        raise Unavailable(f"cannot write to {SHM_DIR}: {exc}") from exc
    except BaseException:
        discard(names)
        raise
    return names


def attach(names: Sequence[str], sizes: Sequence[int]) -> list[memoryview]:
    """Map and unlink the segments; each mapping is a writable buffer of its size."""
    if len(names) != len(sizes):
        raise ProtocolError("shared-memory segments and buffer sizes do not match")
    out = []
    try:
        for name, size in zip(names, sizes):
            path = _path(name)
            try:
                # O_NOFOLLOW: a symlink planted under a segment's name is refused,
                # never followed to a file of ours.
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                raise ProtocolError(f"shared-memory segment {name} is gone") from None
            except OSError as exc:
                raise ProtocolError(f"shared-memory segment {name} cannot be opened safely: {exc.strerror}") from None
            try:
                _check_segment(fd, name, size)
                region = map_fd(fd, size, True) if size else bytearray()
            finally:
                os.close(fd)
                os.unlink(path)
            out.append(memoryview(region))
    except BaseException:
        discard(names)
        raise
    return out


def discard(names: Sequence[str]) -> None:
    """Unlink segments that may still exist (a failed or abandoned transfer)."""
    for name in names:
        try:
            os.unlink(_path(name))
        except (FileNotFoundError, ProtocolError):
            pass


def remove_orphans(min_age: float = RESULT_TTL) -> int:
    """Unlink this user's segments whose creator is gone; returns how many.

    A segment is an orphan when the PID in its name runs no process, or runs
    one started after the segment was written (the PID was reused), and it is
    older than ``min_age``: by then no receiver can still be about to claim it,
    even one whose creator lives in another PID namespace (where its PID means
    nothing here). Segments of other users are never touched (nor could they
    be: /dev/shm is sticky).
    """
    if not available():
        return 0
    import psutil

    removed = 0
    now = time.time()
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX) :].split("-", 1)[0]
        try:
            st = os.stat(os.path.join(SHM_DIR, name), follow_symlinks=False)
        except OSError:
            continue
        # Kept and free segments are never in flight: only their keeper's life counts.
        # (A keeper in another PID namespace sharing /dev/shm: its PID means nothing
        # here, so its segments wait out min_age like any.)
        settled = _settled(name)
        if st.st_uid != os.getuid() or (now - st.st_mtime < min_age and not settled):
            continue
        orphan = True
        if pid_text.isdigit():
            try:
                orphan = psutil.Process(int(pid_text)).create_time() > st.st_mtime + 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                orphan = True
        if orphan:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
            except OSError:
                pass
    return removed


class Outbox:
    """Result segments handed to clients: unlinked if not picked up within a TTL.

    ``sweep()`` runs on the backend's timer, so an abandoned result does not
    wait for the next large transfer to be cleaned up.
    """

    def __init__(self, ttl: float = RESULT_TTL):
        self.ttl = ttl
        self._lock = threading.Lock()
        self._sent: list[tuple[float, list[str]]] = []

    def export(self, buffers: Sequence) -> list[str]:
        names = export(buffers)
        now = time.monotonic()
        with self._lock:
            self._sent.append((now, names))
        self.sweep()
        return names

    def sweep(self) -> int:
        """Unlink result segments older than the TTL; returns how many groups expired."""
        now = time.monotonic()
        with self._lock:
            expired = [n for t, n in self._sent if now - t > self.ttl]
            self._sent = [(t, n) for t, n in self._sent if now - t <= self.ttl]
        for group in expired:
            discard(group)
        return len(expired)


# -- segments a backend keeps: zero-copy reads --------------------------------------
#
# A persisted object's large buffers stay in the segments the client wrote them
# to: the backend renames each one to a name of its own (so the sender's cleanup
# leaves it alone and an orphan sweep knows its keeper) and maps it shared: the
# file *is* the object's memory. Before the backend changes a buffer that
# readers lease, it moves the object's memory to a copy in a new segment
# (``relocate``: same address, so every reference stays valid), and the old
# file, which nobody writes any more, stays with its readers.


def _open_checked(path: str, name: str, flags: int, size: int | None) -> int:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ProtocolError(f"shared-memory segment {name} is gone") from None
    except OSError as exc:
        raise ProtocolError(f"shared-memory segment {name} cannot be opened safely: {exc.strerror}") from None
    try:
        _check_segment(fd, name, os.fstat(fd).st_size if size is None else size)
    except BaseException:
        os.close(fd)
        raise
    return fd


@functools.lru_cache(maxsize=1)
def pid_namespace() -> int:
    """The inode of this process's PID namespace (0 if unknown): PIDs mean the same
    process only between processes with equal ones."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def maps_segment(pid: int, name: str) -> bool:
    """Whether process ``pid`` (of this PID namespace) maps segment ``name``: only then
    is a lease of that PID the creator's (a creator in another PID namespace, or a
    PID reused, is somebody else here)."""
    needle = f" {os.path.join(SHM_DIR, name)}".encode()
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return any(line.rstrip(b"\n").endswith(needle) for line in f)
    except OSError:
        return False


def creator_pid(name: str) -> int:
    """The PID in a segment's name (0 if there is none)."""
    text = name[len(PREFIX) :].split("-", 1)[0] if name.startswith(PREFIX) else ""
    return int(text) if text.isdigit() else 0


def keep(
    names: Sequence[str], sizes: Sequence[int], copy: Sequence[bool] = ()
) -> list[tuple[str, "mmap.mmap | bytearray | None"]]:
    """Take the segments over: rename each to this process's name, map it shared.

    Returns (new name, mapping) per segment (``None`` for an empty buffer,
    which has no segment worth keeping). A segment whose ``copy[i]`` is true,
    or whose pages /dev/shm cannot back (a sparse file on a full tmpfs: writing
    a hole would kill this process with SIGBUS), is read into ordinary memory
    instead: ("", bytearray). A segment of this process (one it keeps already)
    is refused. All or none: on error the segments are unlinked.
    """
    if len(names) != len(sizes):
        raise ProtocolError("shared-memory segments and buffer sizes do not match")
    out: list = []
    try:
        for i, (name, size) in enumerate(zip(names, sizes)):
            path = _path(name)
            if creator_pid(name) == os.getpid():
                raise ProtocolError(f"shared-memory segment {name} is not the sender's")
            fd = _open_checked(path, name, os.O_RDWR, size)
            try:
                if not size:
                    os.unlink(path)
                    out.append(("", None))
                    continue
                if (i < len(copy) and copy[i]) or not _backed(fd, size):
                    out.append(("", _read_private(fd, size)))
                    os.unlink(path)
                    continue
                region = map_fd(fd, size, True)
                mine = kept_name()
                os.rename(path, os.path.join(SHM_DIR, mine))
                out.append((mine, region))
            finally:
                os.close(fd)
    except BaseException:
        discard(names)
        discard([n for n, _ in out if n])
        raise
    return out


def _backed(fd: int, size: int) -> bool:
    """Whether every page of the file exists (allocating the missing ones): False when
    /dev/shm cannot hold them."""
    if os.fstat(fd).st_blocks * 512 >= size:
        return True
    try:
        os.posix_fallocate(fd, 0, size)
        return True
    except OSError:
        return False


def _read_private(fd: int, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    offset = 0
    while offset < size:
        n = os.preadv(fd, [view[offset : offset + _WRITE_SLICE]], offset)
        if n <= 0:
            break
        offset += n
    return buf


def map_fd(fd: int, size: int, writable: bool) -> mmap.mmap:
    """A shared mapping of ``fd`` that holds no file descriptor of its own.

    ``mmap.mmap(fd)`` keeps a dup of ``fd`` for the mapping's whole life (one
    open file per kept segment or leased view: a process runs out of them). So
    an anonymous ``mmap`` object reserves the addresses (and unmaps them when
    collected) and the file is mapped over them with ``MAP_FIXED``.
    """
    access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
    start = None
    if _numpy() is not None:
        region = mmap.mmap(-1, size, access=access)
        start = buffer_address(region)
    if start is None:
        return mmap.mmap(fd, size, access=access)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    got = _libc().mmap(start, size, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
    if got != start:
        err = __import__("ctypes").get_errno()
        region.close()
        raise OSError(err, f"cannot map a segment: {os.strerror(err)}")
    return region


def map_readonly(name: str, offset: int, size: int) -> memoryview:
    """A read-only view of ``size`` bytes at ``offset`` of a segment another process keeps.

    The segment is not unlinked (its keeper does that once its leases end);
    the mapping stays valid after that, for as long as the view lives.
    """
    path = _path(name)
    fd = _open_checked(path, name, os.O_RDONLY, None)
    try:
        total = os.fstat(fd).st_size
        if offset < 0 or size < 0 or offset + size > total:
            raise ProtocolError(f"shared-memory segment {name} holds {total} bytes, not {size} at offset {offset}")
        region = map_fd(fd, total, False) if total else None
    finally:
        os.close(fd)
    if region is None:
        return memoryview(b"")
    return memoryview(region)[offset : offset + size]


@functools.lru_cache(maxsize=1)
def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def buffer_address(buf: Any) -> int | None:
    """The memory address of a contiguous buffer, or None if it cannot be told.

    Only numpy can tell it for a read-only buffer (numpy is an optional
    dependency: without it, nothing is leased).
    """
    np = _numpy()
    if np is None:
        return None
    try:
        view = memoryview(buf)
        if not view.contiguous or not view.nbytes:
            return None
        return int(np.frombuffer(view.cast("B"), dtype=np.uint8).ctypes.data)
    except (TypeError, ValueError):
        return None


# -- arrays built in shared memory by the client: zero-copy puts ------------------------

_MAP_FIXED = 0x10


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_MAP_FAILED = (1 << 64) - 1
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2


def relocate(region: mmap.mmap, reuse: str = "", mapped: int = 0) -> str:
    """Move ``region``'s memory to a copy in a new segment, at the same address.

    Every array over ``region`` keeps working, now on the copy; the old file
    is no longer mapped here (its readers keep it). The copy goes into
    ``reuse`` (a free segment: its pages exist already, so the copy runs at
    memory speed) or into a new segment. ``mapped`` is the address where
    :func:`premap` mapped ``reuse`` (a spare of this process, named by it):
    then its page tables exist too, and the change costs one memcpy (filling
    a fresh mapping's page tables, one fault per 4 KiB page, measured as
    long as the memcpy itself). Returns the new segment's name.
    """
    import ctypes

    libc = _libc()
    size = len(region)
    start = buffer_address(region)
    if start is None:
        raise Unavailable("numpy is needed to relocate a segment")
    if reuse and mapped:
        return _relocate_premapped(start, size, reuse, mapped)
    fd = -1
    reused = False
    if reuse:  # a free segment (renamed to a name of ours first: a client may claim it)
        name = kept_name()
        try:
            os.rename(os.path.join(SHM_DIR, reuse), os.path.join(SHM_DIR, name))
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            reused = True
        except OSError:
            fd = -1
    if fd < 0:
        name = kept_name()
        try:
            fd = os.open(
                os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_CREAT | os.O_EXCL, 0o600
            )
        except OSError as exc:
            raise Unavailable(f"cannot create a segment in {SHM_DIR}: {exc}") from exc
    try:
        try:
            os.ftruncate(fd, size)
            if not reused:
                # New pages: pwrite allocates and fills them in one pass (measured faster
                # than faulting them in through a mapping).
                view = memoryview(region)
                offset = 0
                while offset < size:
                    offset += os.pwrite(fd, view[offset : offset + _WRITE_SLICE], offset)
                view.release()
        except OSError as exc:
            raise Unavailable(f"cannot copy into {SHM_DIR}: {exc}") from exc
        # Mapped by libc, not by an mmap object: once moved, no Python object owns the
        # temporary address (one would unmap it on collection, whatever lives there then).
        # Populated: the copy and the change about to run touch pages without a fault each.
        got = libc.mmap(
            None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), fd, 0
        )
        if got in (None, _MAP_FAILED):
            raise Unavailable(f"cannot map a copy: {os.strerror(ctypes.get_errno())}")
        if reused:
            copy(got, start, size)  # existing pages: a plain memcpy
        _swap_in(got, start, size)
    except BaseException:
        os.close(fd)
        discard([name])
        raise
    os.close(fd)
    return name


def _relocate_premapped(start: int, size: int, name: str, mapped: int) -> str:
    """:func:`relocate` into a spare that :func:`premap` mapped at ``mapped``."""
    length = _page_up(size)
    try:
        total = os.stat(os.path.join(SHM_DIR, name), follow_symlinks=False).st_size
        length = _page_up(total)  # what premap mapped
        kept = kept_name()  # from now on the object's memory: named as such
        os.rename(os.path.join(SHM_DIR, name), os.path.join(SHM_DIR, kept))
        name = kept
        if total < size:
            raise Unavailable(f"spare segment {name} holds {total} bytes, not {size}")
        if total > size:
            # Bigger than needed: the tail goes (its mapping dropped first, so nothing
            # can touch it past the file's new end).
            if _page_up(size) < length:
                _libc().munmap(mapped + _page_up(size), length - _page_up(size))
                length = _page_up(size)
            os.truncate(os.path.join(SHM_DIR, name), size)
        copy(mapped, start, size)  # pages and page tables exist: one memcpy
        _swap_in(mapped, start, size)
    except BaseException:
        _libc().munmap(mapped, length)
        discard([name])
        raise
    return name


def _page_up(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


_MREMAP_DONTUNMAP = 4


def _swap_in(got: int, start: int, size: int) -> None:
    """Move the mapping at ``got`` to ``start``, replacing what was mapped there.

    Replacing it outright would unmap the old mapping on the change's path
    (tearing down a page-table entry per 4 KiB page: a third of a memcpy).
    So the old mapping's page tables move aside first (MREMAP_DONTUNMAP: the
    range at ``start`` stays mapped, to the same file, and any access in
    between faults in the very same bytes), the new mapping moves in over
    the now empty range, and the old one is unmapped by a background thread.
    """
    import ctypes

    libc = _libc()
    park = _reserve(size)
    if park:
        moved = libc.mremap(start, size, size, _MREMAP_MAYMOVE | _MREMAP_FIXED | _MREMAP_DONTUNMAP, park)
        if moved == park:
            unmap_later(park, size)
        else:  # an older kernel: the move below unmaps the old pages itself
            libc.munmap(park, size)
    moved = libc.mremap(got, size, size, _MREMAP_MAYMOVE | _MREMAP_FIXED, start)
    if moved != start:
        err = ctypes.get_errno()
        libc.munmap(got, size)
        raise Unavailable(f"cannot move a copy in place: {os.strerror(err)}")


_PMD = 2 << 20
_MAP_NORESERVE = 0x4000


def _reserve(size: int) -> int:
    """An address range of ``size`` bytes aligned to 2 MiB (mapped inaccessible), or 0.

    Aligned ranges let mremap move a whole page table (512 pages) at a time."""
    libc = _libc()
    got = libc.mmap(None, size + _PMD, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if got in (None, _MAP_FAILED):
        return 0
    aligned = -(-got // _PMD) * _PMD
    if aligned > got:
        libc.munmap(got, aligned - got)
    end = got + size + _PMD
    if end > aligned + _page_up(size):
        libc.munmap(aligned + _page_up(size), end - aligned - _page_up(size))
    return aligned


def premap(name: str) -> int:
    """Map segment ``name`` (one of this process's, its pages allocated) shared and
    populated at a 2 MiB-aligned address; returns the address.

    Made ahead of need (a spare for copy-on-write): filling a mapping's page
    tables costs a fault per 4 KiB page, about as long as copying the bytes.
    """
    libc = _libc()
    fd = _open_checked(_path(name), name, os.O_RDWR, None)
    try:
        size = os.fstat(fd).st_size
        if not size:
            raise Unavailable(f"segment {name} is empty")
        addr = _reserve(size)
        if not addr:
            raise Unavailable("no address range for a spare segment")
        got = libc.mmap(
            addr,
            size,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_SHARED | _MAP_FIXED | getattr(mmap, "MAP_POPULATE", 0),
            fd,
            0,
        )
        if got != addr:
            libc.munmap(addr, size)
            raise Unavailable("cannot map a spare segment")
        return addr
    finally:
        os.close(fd)


def unmap(addr: int, size: int) -> None:
    """Unmap what :func:`premap` mapped."""
    _libc().munmap(addr, _page_up(size))


def unmap_later(addr: int, size: int) -> None:
    """Unmap in a background thread (tearing down a big mapping takes a while)."""
    threading.Thread(target=unmap, args=(addr, size), name="claypot-unmap", daemon=True).start()


class _Made:
    """A segment this process created for an array (see ``make_array``).

    It holds its mapping weakly: the array's collection must unmap and unlink
    it, and end the lease a backend gave this process on it.
    """

    __slots__ = ("name", "size", "_region", "frozen", "forked", "__weakref__")

    def __init__(self, name: str, size: int, region: mmap.mmap):
        import weakref

        self.name, self.size, self.frozen, self.forked = name, size, False, False
        self._region = weakref.ref(region)

    @property
    def region(self) -> "mmap.mmap | None":
        return self._region()


_made_lock = threading.Lock()
_made: dict[int, "_Made"] = {}  # start address -> segment, while its mapping lives


def _after_fork() -> None:
    # Parent and child now both map every segment of make_array shared: a write in
    # either lands in the file. Handing one over would let the other change the stored
    # object, so from now on these segments are copied like any buffer.
    with _made_lock:
        for made in _made.values():
            made.forked = True


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held the lock at the fork: the child's
    # copy would never be released. The child runs one thread now.
    global _made_lock, _fills_lock
    _made_lock = threading.Lock()
    _fills_lock = threading.Lock()
    _fills_watch.clear()  # the parent's watcher thread is not in the child
    # The parent's kept mappings of filled segments (and their open files) are not the
    # child's to keep: a child that never puts would start no watcher, and would hold
    # those files' pages after their keeper unlinked them, for as long as it lives.
    inherited = list(_fills.values())
    _fills.clear()
    for f in inherited:
        f.close()
    _after_fork()


os.register_at_fork(after_in_parent=_after_fork, after_in_child=_after_fork_in_child)


def make_array(shape: Any, dtype: Any, zero: bool) -> Any:
    """A numpy array whose memory is a new shared-memory segment of this process.

    ``make_persistent`` of an object holding it hands the segment itself to a
    same-host backend (no copy). The file is unlinked when the array is
    garbage collected, unless a backend took it over. Its pages are allocated
    up front: a full /dev/shm raises :class:`Unavailable` here (the caller
    falls back to ordinary memory) instead of killing the process with SIGBUS
    on a later write.
    """
    import weakref

    import numpy as np

    dt = np.dtype(dtype)
    count = 1
    for n in shape if isinstance(shape, (tuple, list)) else (shape,):
        if int(n) < 0:
            raise ValueError(f"negative dimension in shape {shape!r}")
        count *= int(n)
    size = count * dt.itemsize
    if not available() or size == 0:
        return np.zeros(shape, dt) if zero else np.empty(shape, dt)
    try:
        room = os.statvfs(SHM_DIR)
        if size > room.f_bavail * room.f_frsize:
            raise Unavailable(f"{SHM_DIR} has no room for {size} bytes")
    except OSError as exc:
        raise Unavailable(f"cannot size a segment in {SHM_DIR}: {exc}") from exc
    name = _new_name()
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise Unavailable(f"cannot create a segment in {SHM_DIR}: {exc}") from exc
    try:
        os.ftruncate(fd, size)  # a new tmpfs file reads as zeros
        # Pages allocated now, not on first write: a write to a hole that a full tmpfs
        # cannot back kills the process with SIGBUS.
        os.posix_fallocate(fd, 0, size)
        region = map_fd(fd, size, True)
    except OSError as exc:
        os.close(fd)
        discard([name])
        raise Unavailable(f"cannot size a segment in {SHM_DIR}: {exc}") from exc
    os.close(fd)
    arr = np.frombuffer(region, dtype=dt, count=count).reshape(shape)
    made = _Made(name, size, region)
    start = buffer_address(arr)
    with _made_lock:
        _made[start] = made

    def gone(start=start, made=made):
        with _made_lock:
            if _made.get(start) is made:
                del _made[start]
        if not made.frozen:
            discard([made.name])

    weakref.finalize(region, gone)
    return arr


def made_segment(buf: Any) -> "_Made | None":
    """The segment of ``make_array`` that ``buf`` covers exactly, if any."""
    with _made_lock:
        if not _made:
            return None
    start = buffer_address(buf)
    if start is None:
        return None
    with _made_lock:
        made = _made.get(start)
    if (
        made is None
        or made.frozen
        or made.forked
        or made.region is None
        or memoryview(buf).nbytes != made.size
        or not os.path.exists(os.path.join(SHM_DIR, made.name))
    ):
        return None
    return made


def freeze(made: "_Made") -> None:
    """Turn this process's mapping of a segment private (copy-on-write), in place.

    After this, writes through the caller's array land in private pages and
    never in the file, which another process (a backend) now serves from.
    """
    libc = _libc()
    path = _path(made.name)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        start = buffer_address(made.region)
        got = libc.mmap(start, made.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
        if got != start:
            err = __import__("ctypes").get_errno()
            raise Unavailable(f"cannot remap segment {made.name} private: {os.strerror(err)}")
    finally:
        os.close(fd)
    made.frozen = True


def hand_over(buffers: Sequence) -> tuple[list[str], list[str], list["_Made"]]:
    """Segments holding ``buffers`` for a same-host receiver that keeps them.

    A buffer that is exactly an array of :func:`make_array` goes as its own
    segment (frozen first, see :func:`freeze`): no copy, and this process
    keeps a lease on it (its mapping still shows the file's pages). Others are
    written into new segments (:func:`export`). Returns the names, the lease
    per segment ("" for none) and the arrays' segments handed over.
    """
    names: list[str] = []
    leases: list[str] = []
    made_list: list[_Made] = []
    try:
        for buf in buffers:
            made = made_segment(buf)
            if made is not None:
                freeze(made)
                names.append(made.name)
                leases.append(uuid.uuid4().hex)
                made_list.append(made)
                continue
            leases.append("")
            free = claim_free(memoryview(buf).nbytes) if memoryview(buf).nbytes else ""
            if free:
                names.append(free)
                try:
                    fill(free, buf)
                    continue
                except (OSError, ProtocolError):
                    names.pop()
                    discard([free])
            names += export([buf])
    except BaseException:
        discard(names)
        raise
    return names, leases, made_list
