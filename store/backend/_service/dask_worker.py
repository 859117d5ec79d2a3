"""A Dask worker hosted inside a backend process (the optional ``dask`` extra).

With ``--dask-scheduler tcp://HOST:PORT`` (``CLAYPOT_DASK_SCHEDULER``) a
backend joins that Dask scheduler as a worker named after its backend id, so
Dask tasks can be pinned to it with ``workers=[backend_id]``. The worker runs
its tasks in this process's threads, where the store's dispatcher is the
backend's own client: a proxy to an object of this backend is an in-process
call, so a task pinned here reads its persistent arguments without a copy.

The worker lives on an asyncio loop of its own, in a daemon thread, so the
backend's gRPC server and Dask share the process without sharing a loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from store.errors import ConfigurationError

log = logging.getLogger("claypot.backend")

# Threads of the hosted worker, and the "units" resource it offers: as many as a
# client's runtime runs at once on one backend by default (Settings.task_slots).
DEFAULT_THREADS = 8
START_TIMEOUT = 30.0


class HostedDaskWorker:
    """A ``distributed.Worker`` on its own event loop thread (see the module docstring)."""

    def __init__(
        self, scheduler: str, name: str, host: str = "127.0.0.1", nthreads: int | None = None, tls_dir: str = ""
    ):
        self.scheduler = scheduler
        self.tls_dir = tls_dir
        self.name = name
        self.host = host
        self.nthreads = nthreads or DEFAULT_THREADS
        self.address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = START_TIMEOUT) -> "HostedDaskWorker":
        """Start the worker and return once the scheduler has registered it."""
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ConfigurationError("--dask-scheduler needs Dask: pip install 'claypot[dask]'") from None
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # reported to start(), which raises it
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="dask-worker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise ConfigurationError(f"the Dask worker did not join {self.scheduler} within {timeout:.0f}s")
        if failure:
            raise ConfigurationError(f"the Dask worker could not join {self.scheduler}: {failure[0]!r}") from failure[0]
        log.info("Dask worker %s (%s) joined %s", self.name, self.address, self.scheduler)
        return self

    async def _open(self) -> None:
        from distributed import Worker

        from store.certs import dask_security

        tls = {}
        if self.tls_dir:
            # The worker runs whatever the scheduler sends, in this backend: it
            # only talks TLS, to peers holding the cluster's certificate.
            tls = {"security": dask_security(self.tls_dir), "protocol": "tls"}
        # memory_limit=0: the backend's heap has its own memory budget; Dask
        # spilling or pausing this process would fight it.
        # "units" mirrors the runtime's computing_units, so a multi-unit task
        # holds as many of the worker's threads as it declares.
        self._worker = await Worker(
            self.scheduler,
            name=self.name,
            host=self.host,
            nthreads=self.nthreads,
            memory_limit=0,
            resources={"units": self.nthreads},
            dashboard=False,
            validate=False,
            **tls,
        )
        self.address = self._worker.address

    def stop(self, timeout: float = 10.0) -> None:
        """Leave the scheduler and stop the loop thread (waits at most ``timeout`` seconds)."""
        loop, worker = self._loop, self._worker
        if loop is None or loop.is_closed():
            return
        if worker is not None:
            try:
                asyncio.run_coroutine_threadsafe(worker.close(timeout=timeout / 2), loop).result(timeout)
            except Exception as exc:  # the scheduler may be gone already
                log.debug("closing the Dask worker: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
