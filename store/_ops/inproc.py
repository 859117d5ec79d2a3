"""A cluster whose backends are served in this process: one embedded Redis, N backends, no sockets between them.

    from store._ops.inproc import InProcessCluster

    with InProcessCluster(backends=2) as cluster:     # embedded redis-server + 2 backends here
        c = Counter(5)
        c.make_persistent(backend=cluster.backends[1])
        assert c.incr(2) == 7

Each backend is a real :class:`store.backend._service.server.Backend` (its heap, its
storage dir in the cluster's data dir, registration and heartbeats in the
real Redis directory) built without a gRPC server; clients reach it through
:class:`store._client.transport.InProcessTransport`, which serializes every request
and reply as the wire would, runs the backend's interceptors (the token
check) and honours deadlines. It starts in well under a second, which is
what it is for: behaviour tests that need no process boundary. What does need
one (``kill -9``, shared memory between processes, several hosts) keeps
using :class:`store.LocalCluster`.

Limits: backends share this process's memory and modules (a class is not
shipped by value, its module is imported); shared-memory transfers are off
(``shm=False``) so values always travel as bytes; Prometheus metrics are not
served; the task runtime's worker threads that a backend starts see this
process's dispatcher, not the backend's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from store._ops.cluster import RedisProcess
from store.config import Settings
from store.errors import ConfigurationError
from store._util.security import new_secret
from store._client.transport import InProcessNetwork, InProcessTransport

if TYPE_CHECKING:
    from store._client.client import Client


class InProcessCluster:
    """An embedded Redis and ``backends`` backends served in this process.

    Use as a context manager: on enter it starts everything and (with
    ``connect=True``) connects this process to it, as ``store.connect``
    would; on exit it stops what it started. ``settings`` are extra
    :class:`store.config.Settings` fields for every backend and the client
    (``durability="none"``, ``memory_limit=...``).
    """

    def __init__(
        self, backends: int = 2, data_dir: str | None = None, token: str | None = None, connect: bool = True, **settings
    ):
        if backends < 1:
            raise ConfigurationError("a cluster needs at least one backend")
        self._n = backends
        self._tmp: str | None = None if data_dir else tempfile.mkdtemp(prefix="claypot-inproc-")
        self.data_dir: str = os.path.abspath(data_dir or self._tmp or "")
        self.token = token or new_secret()
        self._connect = connect
        self._settings = settings
        self.network = InProcessNetwork()
        self.redis: RedisProcess | None = None
        self.servers: list = []  # store.backend._service.server.Backend, in start order
        self.client: Client | None = None

    @property
    def redis_url(self) -> str:
        return self.redis.url if self.redis else ""

    @property
    def address(self) -> str:
        """Address of the first backend (meaningful to this cluster's transports only)."""
        return self.servers[0].address

    @property
    def backends(self) -> list[str]:
        """Backend ids, in start order."""
        return [b.backend_id for b in self.servers]

    def transport(self) -> InProcessTransport:
        """A new transport to this cluster's backends, for a client of one's own."""
        return InProcessTransport(self.network)

    def settings(self, **overrides: Any) -> Settings:
        """The settings of this cluster's clients (and, with a data dir, its backends)."""
        base: dict[str, Any] = dict(
            token=self.token, redis=self.redis_url, shm=False, shm_leases=False, metrics_port=-1, address=""
        )
        base.update(self._settings)
        base.update(overrides)
        return Settings.from_env(**base)

    def start(self) -> "InProcessCluster":
        from store.backend._service.server import Backend

        try:
            os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
            self.redis = RedisProcess(
                os.path.join(self.data_dir, "redis"), password=new_secret(), die_with_parent=True
            ).start()
            for i in range(self._n):
                address = f"inproc-{i}:{i + 1}"
                settings = self.settings(data_dir=os.path.join(self.data_dir, f"backend-{i}"), advertise=address)
                backend = Backend(settings, transport=self.transport())
                backend.start()
                self.servers.append(backend)
                self.network.serve(
                    address, backend.servicer, backend.interceptors, backend.client, threads=settings.server_threads
                )
            if self._connect:
                from store._api import api

                self.client = api.connect(
                    self.address, self.token, transport=self.transport(), settings=self.settings()
                )
        except BaseException:
            self.stop()
            raise
        return self

    def connect_client(self) -> "Client":
        """A new client of this cluster (not installed as this process's connection)."""
        from store._client.client import Client

        client = Client(self.address, self.token, self.settings(), transport=self.transport())
        client.probe()
        return client

    def validate(self) -> None:
        """Every backend checks its lifecycle invariants (AssertionError if one is broken)."""
        client = self.client or self.connect_client()
        try:
            for backend_id in self.backends:
                client.validate_backend(backend_id)
        finally:
            if client is not self.client:
                client.close()

    def stop(self) -> None:
        """Disconnect (if this process is connected here) and stop every backend, then Redis."""
        if self.client is not None:
            from store._api import api

            api.disconnect(self.client)
            self.client = None
        for backend in reversed(self.servers):
            self.network.stop(backend.address)
            backend.stop()
            backend.client.close()
        self.servers = []
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "InProcessCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["InProcessCluster"]
