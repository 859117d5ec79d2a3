"""An executor that runs tasks on Dask distributed, pinned to the backends' own workers.

For clusters larger than a handful of nodes Dask's scheduler can carry the
task traffic: each backend started with ``--dask-scheduler`` hosts a Dask
worker in its own process, named after its backend id (see
:mod:`store.backend._service.dask_worker`). This executor keeps everything else of the
runtime: the dependency graph, the locality choice of
:class:`runtime._scheduler.Scheduler` and the failure policies stay in
:mod:`runtime._core`; only the last step, running a ready task on the chosen
backend, goes through Dask (``workers=[backend_id]``, never elsewhere).

Select it with ``runtime.use_executor("dask")`` or ``CLAYPOT_EXECUTOR=dask``;
the scheduler address comes from ``use_executor(..., scheduler=...)``, else
the connection's settings (``CLAYPOT_DASK_SCHEDULER``, set for you by
``LocalCluster(dask=True)``).

Values travel as claypot pickles inside Dask's own: arguments are pickled by
the store's client (new StorageObjects among them become persistent on the
chosen backend, as with the default executor) and unpickled in the backend
with its heap's context; results come back the same way. Large buffers stay
out of band in both layers, so an array is not copied into a pickle stream.
"""

from __future__ import annotations

from typing import Any
import logging
import pickle
import queue
import threading
import uuid

from store.errors import ConfigurationError

from runtime._executor import CodeKeys, Job

log = logging.getLogger("claypot.runtime")

CONNECT_TIMEOUT = 30.0  # seconds to reach the Dask scheduler


class Packed:
    """A value already pickled by claypot (payload and out-of-band buffers).

    Dask pickles it with protocol 5, so the buffers travel as PickleBuffers,
    out of band, and the payload (small: references and metadata) is the
    only part pickled twice.
    """

    __slots__ = ("payload", "buffers")

    def __init__(self, payload: bytes, buffers: list):
        self.payload = payload
        self.buffers = buffers

    def __reduce__(self):
        return Packed, (self.payload, [pickle.PickleBuffer(b) for b in self.buffers])


def run_pinned(
    code_key: str, packed: Packed, mutates: list[str], timeout: float, chain: str, task_key: str = ""
) -> Packed:
    """Runs inside a backend's Dask worker: one task, exactly as a ``run_task`` RPC would.

    The function comes from the backend's code cache (shipped once, by the
    store), the arguments are unpickled with the heap's context (proxies to
    local objects are in-process), INOUT objects are locked and stored
    afterwards by the heap, and the result is pickled with the heap's context
    (new objects it returns stay on this backend).
    """
    from store.hooks import current_chain, dumps, loads, local_backend, set_chain

    heap = local_backend()
    if heap is None:
        raise ConfigurationError(
            "this Dask worker is not hosted by a claypot backend (start backends with --dask-scheduler)"
        )
    fn = heap.code(code_key)
    args, kwargs = loads(packed.payload, packed.buffers, heap.unpickle_context())
    # The chain id makes nested calls from this task re-enter the locks it holds.
    previous = current_chain()
    set_chain(chain)
    try:
        result = heap.run_task(fn, args, kwargs, mutates, chain, timeout, task_key=task_key)
        payload, buffers = dumps(result, heap.pickle_context(chain))
    finally:
        set_chain(previous)
    return Packed(payload, buffers)


def scheduler_address(client: Any, scheduler: str | None = None) -> str:
    """The Dask scheduler to use: ``scheduler``, else the connection's settings."""
    address = scheduler or getattr(getattr(client, "settings", None), "dask_scheduler", "")
    if not address:
        raise ConfigurationError(
            "the dask executor needs a Dask scheduler: LocalCluster(dask=True), "
            "CLAYPOT_DASK_SCHEDULER=tcp://host:port, or use_executor('dask', scheduler=...)"
        )
    return address


class DaskExecutor:
    """Runs ready tasks on the chosen backend's hosted Dask worker (see the module docstring)."""

    def __init__(self, client: Any, scheduler: str) -> None:
        try:
            from distributed import Client as DaskClient
        except ImportError:
            raise ConfigurationError("the dask executor needs Dask: pip install 'claypot[dask]'") from None
        self.client = client
        self.scheduler = scheduler
        # set_as_default=False: this client serves the runtime only; a user's own
        # dask code keeps whatever default client it had.
        tls_dir = getattr(getattr(client, "settings", None), "dask_tls_dir", "")
        security = None
        if scheduler.startswith("tls://") and not tls_dir:
            raise ConfigurationError(
                f"the Dask scheduler {scheduler} requires the cluster's certificates: set "
                f"CLAYPOT_DASK_TLS_DIR to the directory holding ca.pem, node.pem, node.key"
            )
        if tls_dir:
            from store.certs import dask_security

            security = dask_security(tls_dir)
        self.dask = DaskClient(scheduler, set_as_default=False, timeout=CONNECT_TIMEOUT, security=security)
        self._codes = CodeKeys(client)
        self._names: set[str] = set()
        self._names_lock = threading.Lock()
        self.submitted = 0  # tasks handed to Dask, for tests and benchmarks
        # Arguments are pickled (and new objects among them persisted, an RPC) on
        # the sender thread, not under the runtime's lock that submit() is called with.
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        # Finished Dask futures wait here for the collector, which fetches their
        # results together: asking for each result alone costs a scheduler round
        # trip per task and, measured, cut throughput about sixfold.
        self._finished_q: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="claypot-dask-send", daemon=True)
        self._collector = threading.Thread(target=self._collect, name="claypot-dask-results", daemon=True)
        self._sender.start()
        self._collector.start()

    def worker_names(self, refresh: bool = False) -> set[str]:
        """Names of the workers on the scheduler (backend ids, for hosted workers)."""
        with self._names_lock:
            if refresh or not self._names:
                info = self.dask.scheduler_info(n_workers=-1)
                self._names = {str(w.get("name")) for w in info.get("workers", {}).values()}
            return set(self._names)

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the sender thread, which hands it to Dask."""
        self._jobs.put(job)

    def _send_loop(self) -> None:
        """Send queued jobs; all those queued meanwhile go in one Dask graph update per group."""
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            stop = False
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            try:
                self._send(jobs)
            except Exception:  # a bug must not stop the thread every later task needs
                log.exception("sending tasks to Dask failed")
            if stop:
                return

    def _send(self, jobs: list[Job]) -> None:
        # (backend, units) -> the jobs and their run_pinned arguments, column by column.
        groups: dict[tuple[str, int], tuple[list, list[list]]] = {}
        for job in jobs:
            try:
                if job.backend not in self.worker_names() and job.backend not in self.worker_names(refresh=True):
                    raise ConfigurationError(
                        f"backend {job.backend} hosts no Dask worker on {self.scheduler} "
                        f"(start it with --dask-scheduler {self.scheduler})"
                    )
                job.on_start()
                args, kwargs = job.prepare()
                code_key = self._codes.key(job.fn)
                # The store's client pickles the arguments: new StorageObjects among
                # them become persistent on the backend that will run the task.
                payload, buffers = self.client.encode_args((args, kwargs), job.backend)
            except BaseException as exc:
                job.done(None, exc)
                continue
            name = getattr(job.fn, "__name__", "task")
            group = groups.setdefault((job.backend, job.units), ([], [[], [], [], [], [], [], []]))
            group[0].append(job)
            for column, value in zip(
                group[1],
                (
                    code_key,
                    Packed(payload, buffers),
                    list(job.mutates),
                    job.time_out,
                    uuid.uuid4().hex,
                    job.key,
                    f"{name}-{uuid.uuid4().hex}",
                ),
            ):
                column.append(value)
        for (backend, units), (group_jobs, columns) in groups.items():
            *arguments, keys = columns
            try:
                # One map per group: a burst of tasks is one graph update, where a
                # submit each measured about ten times slower to hand over.
                futures = self.dask.map(
                    run_pinned,
                    *arguments,
                    key=keys,
                    pure=False,
                    workers=[backend],
                    allow_other_workers=False,
                    resources={"units": units},
                )
            except BaseException as exc:
                for job in group_jobs:
                    job.done(None, exc)
                continue
            self.submitted += len(futures)
            for job, future in zip(group_jobs, futures):
                future.add_done_callback(lambda f, job=job: self._finished_q.put((job, f)))

    def _collect(self) -> None:
        """Settle finished tasks, fetching the results of all that are ready in one gather."""
        while True:
            first = self._finished_q.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    item = self._finished_q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._finished_q.put(None)  # stop after this batch
                    break
                batch.append(item)
            try:
                self._settle(batch)
            except Exception:  # a bug must not stop the thread every later result needs
                log.exception("settling Dask results failed")

    def _settle(self, batch: list) -> None:
        ok = [(job, f) for job, f in batch if f.status == "finished"]
        values: list | None = None
        if ok:
            try:
                values = self.dask.gather([f for _, f in ok])
            except Exception as exc:  # e.g. a worker lost meanwhile: each on its own below
                log.debug("gathering %d results failed, fetching one by one: %r", len(ok), exc)
        if values is not None:
            for (job, future), packed in zip(ok, values):
                self._outcome(job, future, packed)
        for job, future in batch:
            if values is None or future.status != "finished":
                self._outcome(job, future, None)

    @staticmethod
    def _outcome(job: Job, future: Any, packed: Packed | None) -> None:
        from store.hooks import loads

        try:
            if packed is None:
                if future.status == "finished":
                    packed = future.result()
                else:
                    error = future.exception()
                    raise (
                        error if error is not None else RuntimeError(f"Dask task {future.key} ended as {future.status}")
                    )
            value = loads(packed.payload, packed.buffers)
        except BaseException as exc:
            job.done(None, exc)
        else:
            job.done(value, None)
        finally:
            # Frees the result on the worker now rather than when the future is collected.
            future.release()

    def shutdown(self, wait: bool = False) -> None:
        self._jobs.put(None)
        self._finished_q.put(None)
        if wait:
            self._sender.join()
            self._collector.join()
        try:
            self.dask.close(timeout=5)
        except Exception as exc:  # the scheduler may be gone already
            log.debug("closing the Dask client: %r", exc)
