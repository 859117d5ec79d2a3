"""The one place for claypot's defaults.

Every field can be overridden by an environment variable ``CLAYPOT_<FIELD>``
(upper case) and, for the backend, by a command-line flag of the same name.
The README's configuration table lists them all.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError

MiB = 1024 * 1024
KiB = 1024


@dataclass(frozen=True)
class Settings:
    """claypot settings. Build with ``Settings.from_env(**overrides)``."""

    # Connection
    address: str = ""  # a backend to connect to, host:port
    token: str = ""  # shared secret every call carries
    insecure: bool = False  # backend: allow a non-loopback listen address without a token
    redis: str = ""  # redis:// URL of the directory; empty: embedded
    tls_ca: str = ""  # PEM file of the CA that signed backend certs: clients use TLS
    tls_cert: str = ""  # backend: PEM certificate chain; with tls_key, serve TLS only
    tls_key: str = ""  # backend: PEM private key
    # Deadlines (seconds)
    call_timeout: float = 600.0  # a method call or task
    admin_timeout: float = 10.0  # directory questions, persist of small objects
    reconnect_timeout: float = 10.0  # how long to retry a backend that refuses connections
    stream_min_rate: float = 50 * MiB  # bytes/s a stream must sustain; scales its deadline
    # Data path
    inline_limit: int = 1 * MiB  # values larger than this are streamed
    chunk_size: int = 4 * MiB  # stream chunk size
    shm: bool = True  # large values to a same-host backend go through /dev/shm
    # Same host: values of at least this many bytes go through /dev/shm even when they
    # would fit inline (measured faster from 128-192 KiB; see README, Performance).
    shm_min: int = 128 * KiB
    # Same host: unary calls go over a local socket instead of gRPC (store._wire.lane);
    # never with TLS.
    local_lane: bool = True
    host_id: str = ""  # same-host identity (see store._client.shm.host_id); empty: derived
    # Backend: same-host reads of large buffers are leased read-only views of its own
    # segments (store.backend._storage.segments); leases hold at most this (bytes or fraction of RAM).
    shm_leases: bool = True
    shm_lease_limit: str = "0.25"
    shm_pool: str = "0.1"  # free segments a backend keeps for reuse (bytes or fraction)
    # Backend
    data_dir: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str = ""  # host:port registered for others to reach; empty: host:port
    durability: str = "sync"  # sync | async | none
    flush_interval: float = 1.0  # async: dirty objects are flushed within this
    checkpoint_interval: float = 10.0  # log records are checkpointed (and the log trimmed) this often
    big_object: int = 64 * MiB  # objects larger than this use write-behind checkpoints
    memory_limit: str = ""  # bytes, "512MiB", or a fraction like "0.5"; empty: unlimited
    max_value_size: str = "0.75"  # largest value sent or accepted: bytes or a fraction of RAM
    receive_budget: str = "0.9"  # streamed bytes being received at once, per process (same units)
    result_ttl: float = 120.0  # seconds a large result waits for its client, then dropped
    heartbeat_interval: float = 1.0
    heartbeat_ttl: float = 5.0  # a backend silent this long is shown as down
    replicas: int = 0  # synchronous replicas of each new object (README "Replicas")
    failover_timeout: float = 0.0  # a call on a replicated object retries its failover this
    # long; 0: 3 heartbeat TTLs
    # What this backend offers tasks, for @constraint: "computing_units=4,memory_size=8,
    # processor_type=ARM,gpus=1,zone=edge" (see store._util.resources). Empty: detected only.
    resources: str = ""
    # A directory every backend sees at the same path (a shared filesystem): FILE
    # parameters under it are read and written there instead of travelling.
    shared_dir: str = ""
    server_threads: int = 16  # more threads cost latency (measured); nested calls need one each
    # Observability (store.metrics): Prometheus metrics on a port of their own. 0: an
    # ephemeral port on a loopback backend, none on a network one; -1: off.
    metrics_port: int = 0
    metrics_host: str = ""  # address the metrics listen on; empty: the backend's host
    log_format: str = "text"  # text | json (one object a line)
    tracing: bool = False  # OpenTelemetry spans (the claypot[otel] extra)
    trace_file: str = ""  # backend: append spans here as JSON lines
    # Dask (optional extra): a backend hosts a worker on this scheduler; a client's
    # dask executor submits there. Empty: no Dask.
    dask_scheduler: str = ""
    # Directory with the cluster's ca.pem, node.pem and node.key (store.certs): Dask
    # peers talk TLS with them and require each other's certificate.
    dask_tls_dir: str = ""
    # Task runtime (runtime/): how a client's tasks reach backends, "store" (run_task
    # RPCs) or "dask" (the Dask scheduler above), and how many tasks one backend runs
    # at once for one client (a hosted Dask worker uses it as its thread count).
    executor: str = "store"
    task_slots: int = 8

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then ``CLAYPOT_*`` variables, then explicit overrides."""
        source: Mapping[str, str] = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = source.get("CLAYPOT_" + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if self.durability not in ("sync", "async", "none"):
            raise ConfigurationError(f"durability must be sync, async or none, not {self.durability!r}")
        if self.replicas < 0 or self.failover_timeout < 0:
            raise ConfigurationError("replicas and failover_timeout must be 0 or more")
        if self.log_format not in ("text", "json"):
            raise ConfigurationError(f"log_format must be text or json, not {self.log_format!r}")
        if self.metrics_port < -1 or self.metrics_port > 65535:
            raise ConfigurationError(f"metrics_port must be -1 (off), 0 (ephemeral) or a port, not {self.metrics_port}")
        if self.chunk_size < 64 * 1024 or self.chunk_size > 64 * MiB:
            raise ConfigurationError("chunk_size must be between 64 KiB and 64 MiB")
        if self.shm_min < 0:
            raise ConfigurationError("shm_min must be 0 or more bytes")
        if self.inline_limit > 3 * MiB:
            raise ConfigurationError("inline_limit must stay under gRPC's 4 MiB message limit")
        if self.executor not in ("store", "dask"):
            raise ConfigurationError(f"executor must be store or dask, not {self.executor!r}")
        if self.task_slots < 1:
            raise ConfigurationError(f"task_slots must be at least 1, not {self.task_slots}")
        parse_memory_limit(self.memory_limit)
        from store._util.resources import parse as parse_resources

        parse_resources(self.resources)
        parse_memory_limit(self.max_value_size)
        parse_memory_limit(self.shm_lease_limit)
        parse_memory_limit(self.shm_pool)
        parse_memory_limit(self.receive_budget)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigurationError("TLS needs both tls_cert and tls_key")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigurationError(f"{name}: no such file {path!r}")

    def read_pem(self, name: str) -> bytes:
        """Contents of the PEM file named by setting ``name`` (tls_ca, tls_cert, tls_key)."""
        with open(getattr(self, name), "rb") as f:
            return f.read()

    def max_value_bytes(self) -> int:
        """The largest value (pickle plus buffers) this process sends or accepts; 0: no limit."""
        return _cached_limit(self.max_value_size)

    def receive_budget_bytes(self) -> int:
        """Bytes of streamed values this process receives at once, in total; 0: no limit."""
        return _cached_limit(self.receive_budget)

    def stream_deadline(self, nbytes: int) -> float:
        """Deadline for moving ``nbytes``: the admin timeout plus time at the minimum rate."""
        return self.admin_timeout + nbytes / self.stream_min_rate


def _parse(f: "dataclasses.Field[Any]", raw: str) -> Any:
    kind = (
        f.type
        if isinstance(f.type, type)
        else {"str": str, "int": int, "float": float, "bool": bool}.get(str(f.type), str)
    )
    try:
        if kind is bool:
            return raw.lower() in ("1", "true", "yes", "on")
        return kind(raw)
    except ValueError as exc:
        raise ConfigurationError(f"CLAYPOT_{f.name.upper()}={raw!r}: {exc}") from None


@functools.lru_cache(maxsize=16)
def _cached_limit(text: str) -> int:
    # Checked on every call: the machine's memory size is read once, not per call.
    return parse_memory_limit(text)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 10**6,
    "mb": 10**6,
    "mib": MiB,
    "g": 10**9,
    "gb": 10**9,
    "gib": 1024 * MiB,
}


def parse_memory_limit(text: str, total: int | None = None) -> int:
    """Bytes from '268435456', '256MiB', '2GB' or a fraction of the machine like '0.25'.

    Returns 0 for no limit.
    """
    text = (text or "").strip().lower()
    if not text:
        return 0
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        if 0 < value < 1:
            if total is None:
                import psutil

                total = psutil.virtual_memory().total
            return int(value * total)
        if value >= 1:
            return int(value)
        raise ConfigurationError(f"memory limit must be positive: {text!r}")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = text[len(num) :].strip()
    if unit not in _UNITS or not num:
        raise ConfigurationError(f"cannot read memory limit {text!r} (try 256MiB or 0.25)")
    return int(float(num) * _UNITS[unit])


__all__ = ["Settings", "parse_memory_limit", "MiB"]
