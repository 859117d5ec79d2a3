"""Kill, restart and damage the real processes and files of a LocalCluster.

The failure tests use these helpers instead of mocks: every fault here is a
real signal sent to a real PID, a real ``FLUSHALL`` on the real Redis, or real
bytes changed in a real storage file. Each helper waits for the effect to be
visible (process gone, port serving again), so tests do not sleep blindly.

    with LocalCluster(backends=1, data_dir=...) as c:
        bid = c.backends[0]
        kill_backend(c, bid)             # kill -9, nothing flushed
        restart_backend(c, bid)          # same storage dir, same port
        kill_redis(c); start_redis(c)    # same AOF dir, same port
        wipe_redis(c)                    # FLUSHALL: the directory is gone
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import psutil
import redis

from store._ops.cluster import BackendProcess, LocalCluster


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(interval)


def content_hash(value) -> str:
    """A hash of bytes or of a numpy array's bytes (to compare states byte for byte)."""
    return hashlib.sha256(memoryview(value).cast("B")).hexdigest()


# -- backends --------------------------------------------------------------------


def backend(cluster: LocalCluster, backend_id: str) -> BackendProcess:
    """The process of a backend, by id."""
    return cluster.process_of(backend_id)


def kill_backend(cluster: LocalCluster, backend_id: str) -> int:
    """kill -9 a backend and wait until it is gone; returns its PID."""
    proc = backend(cluster, backend_id)
    pid = proc.pid
    proc.kill()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return pid


def stop_backend(cluster: LocalCluster, backend_id: str) -> float:
    """Graceful stop (SIGTERM); returns the seconds it took."""
    return backend(cluster, backend_id).stop()


def start_backend(cluster: LocalCluster, backend_id: str) -> float:
    """Start a stopped backend again on its storage dir and port; returns seconds to serve."""
    start = time.monotonic()
    proc = backend(cluster, backend_id).start()
    assert proc.backend_id == backend_id, "a restarted backend must keep its identity"
    return time.monotonic() - start


def restart_backend(cluster: LocalCluster, backend_id: str, kill: bool = True) -> float:
    """kill -9 (or stop) then start a backend; returns seconds from start to serving."""
    if kill:
        kill_backend(cluster, backend_id)
    else:
        stop_backend(cluster, backend_id)
    return start_backend(cluster, backend_id)


def kill_later(cluster: LocalCluster, backend_id: str, delay: float) -> threading.Thread:
    """kill -9 a backend after ``delay`` seconds, from a thread (to hit a call in flight)."""
    t = threading.Thread(
        target=lambda: (time.sleep(delay), kill_backend(cluster, backend_id)), name="chaos-kill", daemon=True
    )
    t.start()
    return t


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    return psutil.Process(pid).memory_info().rss


class RssSampler:
    """Samples a process's RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        proc = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- Redis -------------------------------------------------------------------------


def redis_client(cluster: LocalCluster) -> redis.Redis:
    """A plain redis-py client on the cluster's Redis (for inspection and wiping)."""
    return redis.Redis.from_url(cluster.redis_url, socket_timeout=5)


def kill_redis(cluster: LocalCluster) -> None:
    """kill -9 the embedded redis-server."""
    cluster.redis.kill()


def start_redis(cluster: LocalCluster) -> None:
    """Start the embedded redis-server again on the same port and AOF directory."""
    cluster.redis.start()


def wipe_redis(cluster: LocalCluster) -> None:
    """FLUSHALL: every directory entry, alias, backend and class registration is gone."""
    r = redis_client(cluster)
    try:
        r.flushall()
    finally:
        r.close()


# -- storage files -------------------------------------------------------------------


def object_file(cluster: LocalCluster, backend_id: str, object_id: str) -> str:
    """Path of an object's checkpoint file in its backend's storage dir."""
    return os.path.join(backend(cluster, backend_id).data_dir, "objects", object_id[:2], object_id + ".obj")


def wal_bytes(cluster: LocalCluster, backend_id: str) -> int:
    """Bytes of records in a backend's redo log segments (reserved space left out)."""
    from store.backend._storage.storage import log_bytes

    return log_bytes(backend(cluster, backend_id).data_dir)


def truncate_file(path: str, keep: float = 0.5) -> None:
    """Cut a file to ``keep`` of its length (a torn write)."""
    size = os.path.getsize(path)
    os.truncate(path, int(size * keep))


def flip_byte(path: str, offset_from_end: int = 1) -> None:
    """Invert one byte near the end of a file (silent corruption: bit rot)."""
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


__all__ = [
    "wait_until",
    "content_hash",
    "backend",
    "kill_backend",
    "stop_backend",
    "start_backend",
    "restart_backend",
    "kill_later",
    "rss",
    "RssSampler",
    "redis_client",
    "kill_redis",
    "start_redis",
    "wipe_redis",
    "object_file",
    "wal_bytes",
    "truncate_file",
    "flip_byte",
]
