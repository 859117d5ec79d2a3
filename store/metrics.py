"""Prometheus metrics of a backend.

The core reports what happens through a few module functions
(:func:`call_done`, :func:`fsync_done`, :func:`checkpoint_done`,
:func:`stream_done`, :func:`shm_done`, :func:`task_done`); each is one
attribute check when metrics are off, and one counter or histogram update
when they are on. Levels (objects resident / spilled, bytes in memory and
on disk, tasks running) are not tracked on the hot path at all: a collector
reads them from the backend when Prometheus scrapes.

The metrics are served over HTTP on a port of their own
(``CLAYPOT_METRICS_PORT``): by default an ephemeral port on a loopback
backend, and off on a backend that listens on a network unless a port (or
``CLAYPOT_METRICS_HOST``) is configured, since the page tells anyone who
reaches it what the backend holds. ``-1`` turns them off.

Every name starts with ``claypot_``:

==============================================  =======================================
``claypot_calls_total{kind,outcome}``            calls served, by kind and ok / error
``claypot_call_seconds{kind}``                   histogram of call latency
``claypot_objects{state}``                       objects here: total, resident, spilled
``claypot_memory_bytes{what}``                   rss of the process; resident object bytes
``claypot_disk_bytes``                           bytes in the storage dir
``claypot_evictions_total``                      objects spilled to disk to free memory
``claypot_fsync_seconds``                        histogram of log fsync latency
``claypot_group_commit_records``                 histogram of log records per fsync
``claypot_checkpoints_total`` / ``_seconds``     checkpoints written and their duration
``claypot_stream_bytes_total{direction}``        bytes streamed in / out
``claypot_streams_total{direction}``             streams received / sent
``claypot_shm_transfers_total{direction}``       values passed through /dev/shm
``claypot_shm_bytes_total{direction}``           bytes passed through /dev/shm
``claypot_tasks{state}``                         tasks queued and running now
``claypot_tasks_total{outcome}``                 tasks done / failed
==============================================  =======================================
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("claypot.metrics")

_LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_FSYNC_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
_DISK_SCAN_EVERY = 5.0  # seconds: walking a big storage dir at each scrape would cost


class _Instruments:
    """The metric objects of one process, in a registry of their own."""

    def __init__(self, source):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.calls = Counter("claypot_calls", "Calls served, by kind and outcome", ["kind", "outcome"], registry=r)
        self.call_seconds = Histogram(
            "claypot_call_seconds", "Latency of calls served", ["kind"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.fsync = Histogram("claypot_fsync_seconds", "Latency of a log fsync", buckets=_FSYNC_BUCKETS, registry=r)
        self.batch = Histogram(
            "claypot_group_commit_records", "Log records made durable by one fsync", buckets=_BATCH_BUCKETS, registry=r
        )
        self.checkpoints = Counter("claypot_checkpoints", "Checkpoints written", registry=r)
        self.checkpoint_seconds = Histogram(
            "claypot_checkpoint_seconds", "Duration of a checkpoint", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.checkpointed = Counter("claypot_checkpointed_objects", "Objects written by checkpoints", registry=r)
        self.stream_bytes = Counter("claypot_stream_bytes", "Bytes of values streamed", ["direction"], registry=r)
        self.streams = Counter("claypot_streams", "Values streamed", ["direction"], registry=r)
        self.shm = Counter("claypot_shm_transfers", "Values passed through /dev/shm", ["direction"], registry=r)
        self.shm_bytes = Counter("claypot_shm_bytes", "Bytes passed through /dev/shm", ["direction"], registry=r)
        self.tasks = Counter("claypot_tasks", "Tasks finished, by outcome", ["outcome"], registry=r)
        self.queued = 0  # tasks received, not yet running
        self._queued_lock = threading.Lock()
        # Children looked up once: .labels() costs a dict lookup and a lock per call.
        self._call_children: dict[tuple[str, str], tuple] = {}
        if source is not None:
            r.register(_LevelCollector(source, self))

    def call_children(self, kind: str, outcome: str) -> tuple:
        key = (kind, outcome)
        pair = self._call_children.get(key)
        if pair is None:
            pair = (self.calls.labels(kind, outcome), self.call_seconds.labels(kind))
            self._call_children[key] = pair
        return pair


class _LevelCollector:
    """Reads levels (objects, bytes, tasks) from the backend at scrape time."""

    def __init__(self, backend: Any, instruments: _Instruments) -> None:
        self.b = backend
        self.i = instruments
        self._disk = (0.0, 0)

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        heap = self.b.heap
        total = heap.count()
        resident = heap.resident_count()
        objects = GaugeMetricFamily("claypot_objects", "Objects held by this backend", labels=["state"])
        objects.add_metric(["total"], total)
        objects.add_metric(["resident"], resident)
        objects.add_metric(["spilled"], max(0, total - resident))
        yield objects
        memory = GaugeMetricFamily("claypot_memory_bytes", "Memory of this backend", labels=["what"])
        memory.add_metric(["objects"], heap.resident_bytes)
        try:
            import psutil

            memory.add_metric(["rss"], psutil.Process().memory_info().rss)
        except Exception:  # psutil cannot read /proc: report what is known
            pass
        yield memory
        yield GaugeMetricFamily("claypot_disk_bytes", "Bytes in the storage dir", value=self._disk_bytes())
        yield CounterMetricFamily("claypot_evictions", "Objects spilled to free memory", value=heap.evictions)
        tasks = GaugeMetricFamily("claypot_tasks_now", "Tasks queued and running now", labels=["state"])
        tasks.add_metric(["queued"], max(0, self.i.queued))
        tasks.add_metric(["running"], heap.running_tasks)
        yield tasks
        yield GaugeMetricFamily("claypot_up", "1 while the backend serves", value=1)

    def _disk_bytes(self) -> int:
        at, value = self._disk
        now = time.monotonic()
        if now - at < _DISK_SCAN_EVERY:
            return value
        total = 0
        for root, _, files in os.walk(self.b.storage.root):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except OSError:
                    pass  # removed by the checkpointer while walking
        # The open log segment's file includes space reserved ahead of its records:
        # counted as the records it holds, not as its file size.
        total = max(0, total - self.b.storage.unused_reservation())
        self._disk = (now, total)
        return total


_m: _Instruments | None = None  # None: metrics are off (every hook returns at once)
_server = None


def enabled() -> bool:
    """Whether this process records metrics."""
    return _m is not None


def enable(source: Any = None) -> None:
    """Record metrics in this process (``source``: a backend whose levels are reported)."""
    global _m
    if _m is None:
        _m = _Instruments(source)


def disable() -> None:
    """Stop recording and serving metrics in this process."""
    global _m, _server
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None
    _m = None


def registry() -> Any:
    """The registry holding this process's metrics (None when metrics are off)."""
    return None if _m is None else _m.registry


def serve_address(settings: Settings) -> tuple[str, int] | None:
    """Where a backend with ``settings`` serves its metrics; None: not at all."""
    from store._util.security import is_loopback_host

    port = settings.metrics_port
    if port < 0:
        return None
    host = settings.metrics_host or settings.host
    if port == 0 and not settings.metrics_host and not is_loopback_host(settings.host):
        return None  # a network listener publishes metrics only when told to
    return host, port


def start(backend: Any, settings: Settings) -> str:
    """Start recording and serving the metrics of ``backend``; returns their host:port.

    Returns "" when the settings turn metrics off (see :func:`serve_address`).
    """
    global _server
    where = serve_address(settings)
    if where is None:
        return ""
    from prometheus_client import start_http_server

    enable(backend)
    host, port = where
    try:
        _server, _ = start_http_server(port, addr=host, registry=_m.registry)
    except OSError as exc:
        from .errors import ConfigurationError

        raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc}") from None
    bound = _server.server_port
    if host in ("", "0.0.0.0", "::", "[::]"):
        # Reachable where the backend itself is advertised.
        host = backend.address.rsplit(":", 1)[0]
    return f"{host}:{bound}"


# -- hooks the core calls ----------------------------------------------------------------


def call_done(kind: str, ok: bool, seconds: float) -> None:
    """A call of ``kind`` finished (``ok``: no error) after ``seconds``."""
    m = _m
    if m is None:
        return
    count, hist = m.call_children(kind, "ok" if ok else "error")
    count.inc()
    hist.observe(seconds)


def fsync_done(seconds: float, records: int) -> None:
    """A group commit made ``records`` log records durable with one fsync."""
    m = _m
    if m is None:
        return
    m.fsync.observe(seconds)
    m.batch.observe(records)


def checkpoint_done(seconds: float, objects: int) -> None:
    """A checkpoint wrote ``objects`` objects in ``seconds``."""
    m = _m
    if m is None:
        return
    m.checkpoints.inc()
    m.checkpoint_seconds.observe(seconds)
    m.checkpointed.inc(objects)


def stream_done(direction: str, nbytes: int) -> None:
    """A value of ``nbytes`` was streamed ``in`` or ``out``."""
    m = _m
    if m is None:
        return
    m.streams.labels(direction).inc()
    m.stream_bytes.labels(direction).inc(nbytes)


def shm_done(direction: str, nbytes: int) -> None:
    """A value of ``nbytes`` came ``in`` or went ``out`` through /dev/shm."""
    m = _m
    if m is None:
        return
    m.shm.labels(direction).inc()
    m.shm_bytes.labels(direction).inc(nbytes)


def task_queued(delta: int) -> None:
    """A task arrived (+1) or left the queue to run or fail (-1)."""
    m = _m
    if m is None:
        return
    with m._queued_lock:
        m.queued += delta


def task_done(ok: bool) -> None:
    """A task finished (``ok``) or failed."""
    m = _m
    if m is None:
        return
    m.tasks.labels("done" if ok else "failed").inc()


__all__ = [
    "enabled",
    "enable",
    "disable",
    "registry",
    "serve_address",
    "start",
    "call_done",
    "fsync_done",
    "checkpoint_done",
    "stream_done",
    "shm_done",
    "task_queued",
    "task_done",
]
