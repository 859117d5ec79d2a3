"""The runtime: turns task calls into graph nodes, dispatches ready ones, settles results.

One :class:`Runtime` serves one connection (or inline mode). It owns the
dependency graph (:mod:`runtime._graph`), the scheduler
(:mod:`runtime._scheduler`) and an executor (:mod:`runtime._executor`), and
holds one lock around the first two. Task outcomes arrive on executor
threads and on time_out timers; both go through :meth:`Runtime._settle`,
which applies the task's failure policy.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from store import elastic as _elastic
from store import StorageObject, hooks
from store.config import Settings
from store.errors import CallInterrupted, ConfigurationError, TaskCancelled, TaskError, TaskTimeout

from runtime._directions import Direction, OnFailure
from runtime._executor import InlineExecutor, Job, RemoteExecutor
from runtime._files import FileResult, FileValue, FileVersions
from runtime._futures import Future
from runtime._graph import TaskGraph
from runtime._scheduler import Demand, Scheduler
from runtime._sizes import SizeCache

log = logging.getLogger("claypot.runtime")

BACKENDS_TTL = 2.0  # seconds a list of live backends is trusted before asking again
MAX_REPORTED = 100  # failures kept for barrier(); the rest are only counted
RECENT_TASKS = 200  # finished tasks kept for snapshot() (the dashboard's task graph)


EXECUTORS = ("store", "dask")
_executor_choice: tuple[str, str | None] | None = None  # set by use_executor()


def executor_choice(settings: Settings | None = None) -> tuple[str, str | None]:
    """(name, Dask scheduler or None): ``use_executor()``'s, else the settings' ``executor``."""
    if _executor_choice is not None:
        return _executor_choice
    return (settings or Settings()).executor, None


def _make_executor(client, slots: int, backends: int):
    name, scheduler = executor_choice(client.settings)
    if name == "dask":
        # Imported here: Dask is an optional extra, needed only when chosen.
        from runtime._dask_executor import DaskExecutor, scheduler_address

        return DaskExecutor(client, scheduler_address(client, scheduler))
    return RemoteExecutor(client, slots, workers=slots * max(2, backends) + 4)


def task_slots(settings: Settings | None = None) -> int:
    """Tasks one backend runs at once for this process (the settings' ``task_slots``)."""
    return (settings or Settings()).task_slots


@dataclass
class Call:
    """One task call: what to run, with what, and where it stands."""

    task_id: int
    defn: Any  # the TaskFunction
    args: tuple
    kwargs: dict
    futures: list[Future]
    after: set[int]
    reads: list[str]
    writes: list[str]
    owners: list[str]
    demand: Demand
    oids: list[str] = field(default_factory=list)  # persistent arguments, as owners
    weights: list[float] | None = None
    backend: str | None = None
    attempt: int = 0
    settled: bool = False
    timer: threading.Timer | None = None
    failed_deps: list[Future] = field(default_factory=list)
    # Task versions (``@task(versions=True)``): the run holds (original, version) pairs
    # and the ids it changes; its commit is a second graph node that writes them back.
    versions: list = field(default_factory=list)
    mutates: list[str] = field(default_factory=list)
    commit_id: int = 0
    commit_of: "Call | None" = None
    values: list | None = None
    deps: tuple = ()  # tasks it waited for when submitted (for the dashboard)
    cancelled: bool = False  # by future.cancel(): never retried
    variants: list = field(default_factory=list)  # this task and its @implement ones
    fn: Any = None  # what runs: the chosen variant's runner
    files: list = field(default_factory=list)  # (param, path, direction, read v, written v)
    submitted: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"{self.defn.__qualname__}#{self.task_id}"


class Runtime:
    """Tasks of one connection (``client``), or inline tasks when ``client`` is None."""

    def __init__(self, client=None):
        self.client = client
        self.inline = client is None
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._session = uuid.uuid4().hex  # task keys are unique across runtimes
        self._graph = TaskGraph()
        self._calls: dict[int, Call] = {}
        self._queues: dict[str, deque[Call]] = {}
        self._failures: list[tuple[str, BaseException]] = []  # first few, for barrier()
        self._failed = 0
        self._outcomes = [0, 0]  # tasks finished: [done, failed]
        self._recent: deque = deque(maxlen=RECENT_TASKS)  # finished, for snapshot()
        self._backends_at = 0.0
        self.pids: dict[str, int] = {}
        self.files = FileVersions()
        slots = task_slots(client.settings if client is not None else None)
        self.scheduler = Scheduler(slots)
        if self.inline:
            self.executor = InlineExecutor()
        else:
            self._refresh_backends(force=True)
            self.sizes = SizeCache(client)
            self.executor = _make_executor(client, slots, len(self.pids))
            if hasattr(self.executor, "slots_for"):
                self.executor.slots_for = self.scheduler.slots_of

    # -- submission ---------------------------------------------------------------------
    def submit(self, defn: Any, args: tuple, kwargs: dict) -> Any:
        """Record a task call and return its future (or a tuple of futures)."""
        task_id = next(self._ids)
        n = defn.returns
        if n > 1:
            futures = [Future(task_id, defn.__qualname__, i) for i in range(n)]
        else:
            futures = [Future(task_id, defn.__qualname__)]
        call = Call(
            task_id, defn, args, kwargs, futures, set(), [], [], [], Demand(defn.computing_units, defn.memory_bytes)
        )
        call.variants = defn.alternatives() if not self.inline else [defn]
        call.fn = defn.runner
        if not self.inline:
            self._check_runnable(call)
        self._scan(call)
        if call.owners:
            call.weights = self.sizes.weights(call.oids, call.owners)
        with self._lock:
            # Checked under the lock: a predecessor fails (and cancels its known
            # successors) only while holding it, so none is missed in between.
            dead = [f for f in call.failed_deps if f.failed()]
            if dead:
                self._cancel(call, dead[0])
            elif not self.inline:
                self._calls[task_id] = call
                if call.defn.versions and call.writes:
                    self._add_versioned(call)
                elif self._graph.add(task_id, call.after, call.reads, call.writes):
                    self._dispatch(call)
                else:
                    call.deps = tuple(self._graph.predecessors(task_id))
        if self.inline and not dead:
            # Outside the lock: tasks that run inline in a backend's threads must not
            # wait for one another.
            self._dispatch(call)
        return tuple(futures) if n > 1 else futures[0]

    def _check_runnable(self, call: Call) -> None:
        """Fail at the call when no backend that is up can run any variant of the task."""
        with self._lock:
            self._refresh_backends()
            first = None
            for v in call.variants:
                try:
                    self.scheduler.check(Demand(v.computing_units, v.memory_bytes), v.constraints)
                    return
                except ConfigurationError as exc:
                    first = first or exc
            if first is not None:
                raise first

    def _scan(self, call: Call) -> None:
        """Find the call's futures, persistent objects and files, by parameter direction."""
        self._scan_files(call)
        for value, direction in call.defn.bind(call.args, call.kwargs):
            items = value if direction.collection and isinstance(value, (list, tuple)) else (value,)
            for item in items:
                if isinstance(item, Future):
                    if not item.done():
                        call.after.add(item.task_id)
                    call.failed_deps.append(item)
                elif isinstance(item, StorageObject) and not self.inline:
                    if not item.is_persistent:
                        # It needs an identity to be ordered and placed: give it one now.
                        item.make_persistent()
                    oid = item.getID()
                    (call.writes if direction.writes else call.reads).append(oid)
                    call.oids.append(oid)
                    call.owners.append(hooks.owner_of(item))

    # -- task versions ----------------------------------------------------------------------------
    def _add_versioned(self, call: Call) -> None:
        """Two graph nodes for a task that changes versions of its INOUT objects: the run
        waits for the objects' last writer only; the commit, which writes the versions
        back, is their writer (after the run and after every earlier reader). Lock held."""
        commit = Call(
            next(self._ids),
            call.defn,
            (),
            {},
            call.futures,
            {call.task_id},
            [],
            list(call.writes),
            [],
            call.demand,
            commit_of=call,
        )
        call.commit_id = commit.task_id
        self._calls[commit.task_id] = commit
        ready = self._graph.add(call.task_id, call.after, call.reads, (), early=call.writes)
        self._graph.add(commit.task_id, (call.task_id,), (), call.writes)
        if ready:
            self._dispatch(call)

    def _prepare_versioned(self, call: Call) -> tuple[tuple, dict]:
        """The call's arguments with each INOUT object replaced by a new version of it
        (made on the object's backend); runs on an executor thread before each attempt."""
        args, kwargs = self._resolve(call)
        self._discard_versions(call)  # a retry starts from fresh versions
        call.mutates.clear()
        writes = set(call.writes)

        def one(x):
            if isinstance(x, StorageObject) and x.getID() in writes:
                version = hooks.new_version(self.client, x)
                call.versions.append((x, version))
                call.mutates.append(version.getID())
                return version
            return x

        def swap(x, direction: Direction):
            if not direction.writes:
                return x
            if direction.collection and isinstance(x, (list, tuple)):
                return type(x)(one(i) for i in x)
            return one(x)

        directions = call.defn.directions
        args = tuple(
            swap(a, directions.get(n, Direction.IN)) for a, n in zip(args, call.defn.positional_names(len(args)))
        )
        kwargs = {k: swap(v, directions.get(k, Direction.IN)) for k, v in kwargs.items()}
        return args, kwargs

    def _discard_versions(self, call: Call) -> None:
        versions, call.versions = call.versions, []
        for _, version in versions:
            try:
                version.delete_persistent()
            except Exception as exc:  # an unused copy: worth a warning, not a failure
                log.warning("task %s: version %s not deleted: %r", call.name, version.getID(), exc)

    def _commit(self, commit: Call) -> None:
        """Write a finished run's versions back (its earlier readers are done), then
        finish the task's futures and release its successors. On its own thread."""
        run = commit.commit_of
        error = None
        try:
            for _, version in run.versions:
                hooks.consolidate_version(self.client, version)
        except BaseException as exc:
            error = exc
        with self._lock:
            if commit.settled:
                return
            commit.settled = True
            if error is None:
                for f, v in zip(run.futures, run.values or []):
                    f._finish(v, None, run.backend, run.attempt)
                ready = self._graph.finish(commit.task_id)
                self._drop(commit.task_id)
                for t in ready:
                    self._dispatch(self._calls[t])
                return
            self._failed += 1
            if len(self._failures) < MAX_REPORTED:
                self._failures.append((run.name, error))
            for f in run.futures:
                f._finish(None, error, run.backend, run.attempt)
            for t in self._graph.cancel_successors(commit.task_id):
                self._cancel(self._calls[t], run.futures[0])
                self._drop(t)
            self._drop(commit.task_id)

    def _scan_files(self, call: Call) -> None:
        params = call.defn.file_params
        if not params or self.inline:
            return  # inline: the task works on the paths themselves, in program order
        named = list(zip(call.defn.positional_names(len(call.args)), call.args))
        named += list(call.kwargs.items())
        for name, value in named:
            direction = params.get(name)
            if direction is None or value is None:
                continue
            path = self.files.canonical(value)
            if direction.directory:
                self.files.directories.add(path)
            if direction.writes:
                old, new = self.files.new_version(path)
                if direction.reads_file:
                    call.reads.append(self.files.key(path, old))
                call.writes.append(self.files.key(path, new))
            else:
                old = new = self.files.read_version(path)
                call.reads.append(self.files.key(path, old))
            call.files.append((name, path, direction, old, new))

    def wait_on_file(self, path: str | os.PathLike, timeout: float | None = None) -> str:
        """Wait for the last task that writes ``path``; leave its version there; the path."""
        p = self.files.canonical(path)
        if not self.inline:
            key = self.files.key(p, self.files.read_version(p))
            for f in self.futures_using(key):
                f.exception(timeout)
        return self.files.final(p)

    # -- dispatch -------------------------------------------------------------------------------
    def _refresh_backends(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._backends_at < BACKENDS_TTL:
            return
        self._backends_at = now
        up = [b for b in self.client.backends() if b.up]
        self.pids = {b.backend_id: b.pid for b in up}
        offers = {}
        for b in up:
            try:
                offers[b.backend_id] = json.loads(getattr(b, "resources_json", "") or "{}")
            except ValueError:
                offers[b.backend_id] = {}
        self.scheduler.set_backends(sorted(self.pids), offers)
        if up and not self.scheduler.memory:
            # Backends on one host share its memory: each gets an equal part for tasks.
            import psutil

            per_host: dict[str, int] = {}
            for b in up:
                per_host[b.host] = per_host.get(b.host, 0) + 1
            self.scheduler.memory = psutil.virtual_memory().total // max(per_host.values())

    def _dispatch(self, call: Call) -> None:
        """Send a ready call to its backend, or queue it there if the backend is full.

        Called with the lock held (remote mode).
        """
        if self.inline:
            self._start(call, None)
            return
        if call.commit_of is not None:
            threading.Thread(target=self._commit, args=(call,), name="claypot-commit", daemon=True).start()
            return
        try:
            self._refresh_backends()
            backend = self._place(call)
        except Exception as exc:  # no backend up, or the directory unreachable
            self._settle(call, call.attempt, None, exc, backend=None)
            return
        if self.scheduler.fits(backend, call.demand):
            self.scheduler.take(backend, call.demand)
            self._start(call, backend)
        else:
            self._queues.setdefault(backend, deque()).append(call)

    def _place(self, call: Call) -> str:
        """Choose the variant (``@implement``) and backend of a ready call.

        Each variant goes to the best backend meeting its constraints; the
        call takes the one whose backend holds most of its data, then the
        least loaded, then the first declared.
        """
        best = None
        for i, v in enumerate(call.variants):
            demand = Demand(v.computing_units, v.memory_bytes)
            among = self.scheduler.eligible(demand, v.constraints)
            if not among:
                continue
            b = self.scheduler.choose(call.owners, call.weights, among=among)
            rank = (
                -self.scheduler.score(b, call.owners, call.weights),
                self.scheduler.load(b) / max(1, self.scheduler.slots_of(b)),
                i,
            )
            if best is None or rank < best[0]:
                best = (rank, b, v, demand)
        if best is None:
            self._check_runnable(call)  # raises the detailed error
            raise LookupError("no backend that is up meets the task's constraints")
        _, backend, variant, demand = best
        call.demand = demand
        call.fn = variant.runner
        return backend

    def _start(self, call: Call, backend: str | None) -> None:
        call.attempt += 1
        call.backend = backend
        attempt = call.attempt

        def on_start():
            # The time limit counts from when the task is sent, not while it waits for a lane.
            if call.defn.time_out and not self.inline:
                with self._lock:
                    if call.settled or attempt != call.attempt:
                        return
                    limit = call.defn.time_out
                    if call.writes:
                        # The backend enforces time_out itself for a task that changes
                        # objects: past it, the task's changes are rolled back and it
                        # fails, so a retry cannot apply it twice. This timer is only
                        # the safety net for a backend that stops answering.
                        limit += max(_WRITE_TASK_GRACE, limit)
                    call.timer = threading.Timer(limit, self._timed_out, (call, attempt))
                    call.timer.daemon = True
                    call.timer.start()

        def done(result, error):
            if backend is not None:
                self._release(backend, call.demand)
            if error is None and call.files:
                try:
                    self._keep_files(call, result if isinstance(result, FileResult) else None)
                    if isinstance(result, FileResult):
                        result = result.value
                except Exception as exc:  # the program's disk is full, say
                    result, error = None, exc
            self._settle(call, attempt, result, error, backend)

        if call.commit_id:
            prepare, mutates = (lambda: self._prepare_versioned(call)), call.mutates
        else:
            prepare = lambda: self._resolve_files(call)  # noqa: E731
            # File keys order tasks here; only object ids are the backend's to lock.
            mutates = [w for w in call.writes if not w.startswith("file:")]
        self.executor.submit(
            Job(
                backend,
                call.fn or call.defn.fn,
                prepare,
                mutates,
                call.defn.time_out,
                call.demand.units,
                done,
                on_start,
                key=f"{self._session}:{call.task_id}",
            )
        )

    def _release(self, backend: str, demand: Demand) -> None:
        with self._lock:
            self.scheduler.release(backend, demand)
            queue = self._queues.get(backend)
            while queue and self.scheduler.fits(backend, queue[0].demand):
                nxt = queue.popleft()
                self.scheduler.take(backend, nxt.demand)
                self._start(nxt, backend)

    def _timed_out(self, call: Call, attempt: int) -> None:
        self._settle(
            call,
            attempt,
            None,
            TaskTimeout(
                f"task {call.name} did not finish within its time_out of {call.defn.time_out}s "
                f"(it may still be running on backend {(call.backend or '')[:8]})"
            ),
            call.backend,
        )

    def _keep_files(self, call: Call, result: FileResult | None) -> None:
        for name, path, direction, _old, new in call.files:
            if not direction.writes:
                continue
            shared = self._shared_version(path, direction, new)
            if shared is not None:
                if os.path.exists(shared):  # written in place on the shared filesystem
                    self.files.adopt(path, new, shared)
            elif result is not None and name in result.outputs:
                self.files.store(path, new, result.outputs[name])

    def _shared_version(self, path: str, direction: Direction, version: int) -> str | None:
        """Where version ``version`` of ``path`` lives on the shared filesystem, if it does."""
        shared = getattr(getattr(self.client, "settings", None), "shared_dir", "")
        if not shared or direction.directory:
            return None
        root = os.path.realpath(shared)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            return None
        if version == 0:
            return path
        return os.path.join(
            root, ".claypot-versions", f"{self._session}-{version}-{abs(hash(path)):x}-{os.path.basename(path)}"
        )

    def _resolve_files(self, call: Call) -> tuple[tuple, dict]:
        """``_resolve``, with FILE parameters as FileValue (the bytes of the version read)."""
        args, kwargs = self._resolve(call)
        if not call.files:
            return args, kwargs
        values = {}
        for name, path, direction, old, new in call.files:
            src = self._shared_version(path, direction, old)
            if src is not None:
                # On the shared filesystem: the task reads (and writes) the versions
                # there; no byte travels with it.
                if old:
                    src = self.files.location(path, old)
                dst = self._shared_version(path, direction, new) if direction.writes else None
                if dst is not None:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                values[name] = FileValue(
                    os.path.basename(path),
                    None,
                    False,
                    shared_in=src if direction.reads_file or not dst else None,
                    shared_out=dst,
                )
                continue
            data = self.files.read(path, old, direction.directory) if direction.reads_file else None
            values[name] = FileValue(os.path.basename(path), data, direction.directory)
        names = call.defn.positional_names(len(args))
        args = tuple(values.get(n, a) for n, a in zip(names, args))
        kwargs = {k: values.get(k, v) for k, v in kwargs.items()}
        return args, kwargs

    @staticmethod
    def _resolve(call: Call) -> tuple[tuple, dict]:
        """The call's arguments with futures replaced by their values (all are done)."""

        def value(x):
            return x.result() if isinstance(x, Future) else x

        def one(x, direction: Direction):
            if direction.collection and isinstance(x, (list, tuple)):
                return type(x)(value(i) for i in x)
            return value(x)

        directions = call.defn.directions
        args = tuple(
            one(a, directions.get(name, Direction.IN))
            for a, name in zip(call.args, call.defn.positional_names(len(call.args)))
        )
        kwargs = {k: one(v, directions.get(k, Direction.IN)) for k, v in call.kwargs.items()}
        return args, kwargs

    # -- outcomes ---------------------------------------------------------------------------------
    def _settle(self, call: Call, attempt: int, result, error: BaseException | None, backend: str | None) -> None:
        """Apply one attempt's outcome: finish, retry, ignore, or fail and cancel successors."""
        with self._lock:
            if call.settled or attempt != call.attempt:
                return  # a late reply from an attempt that timed out or was retried
            if call.timer is not None:
                call.timer.cancel()
                call.timer = None
            policy = call.defn.on_failure
            if (
                error is not None
                and policy is OnFailure.RETRY
                and call.attempt <= call.defn.retries
                and not call.cancelled
                and not (call.writes and isinstance(error, CallInterrupted))
            ):
                # (A task that changes objects and may have run is never run again: its
                # backend may have committed it before the connection broke.)
                log.warning("task %s failed (attempt %d), retrying: %r", call.name, call.attempt, error)
                if self.inline:
                    self._start(call, None)
                else:
                    self._dispatch(call)
                return
            call.settled = True
            if error is not None and policy is OnFailure.IGNORE:
                log.warning("task %s failed, ignored (on_failure=IGNORE): %r", call.name, error)
                error, result = None, None
            if error is None:
                values = self._split(call, result)
                if isinstance(values, BaseException):
                    error = values
            if error is None and call.commit_id:
                # The results wait for the commit: until then the object still holds
                # its old state, and whoever waits on the task must see the new one.
                call.values = values
                ready = self._graph.finish(call.task_id)
                self._drop(call.task_id)
                for t in ready:
                    self._dispatch(self._calls[t])
                return
            if error is not None and call.versions:
                threading.Thread(target=self._discard_versions, args=(call,), daemon=True).start()
            if error is None:
                for f, v in zip(call.futures, values):
                    f._finish(v, None, backend, call.attempt)
                if not self.inline:
                    ready = self._graph.finish(call.task_id)
                    self._drop(call.task_id)
                    for t in ready:
                        self._dispatch(self._calls[t])
                return
            if policy in (OnFailure.FAIL, OnFailure.RETRY):
                self._failed += 1
                if len(self._failures) < MAX_REPORTED:
                    self._failures.append((call.name, error))
            for f in call.futures:
                f._finish(None, error, backend, call.attempt)
            if not self.inline:
                for t in self._graph.cancel_successors(call.task_id):
                    self._cancel(self._calls[t], call.futures[0])
                    self._drop(t)
                self._drop(call.task_id)

    @staticmethod
    def _split(call: Call, result):
        n = call.defn.returns
        if n <= 1:
            return [result]
        if result is None:
            return [None] * n
        try:
            values = list(result)
        except TypeError:
            values = None
        if values is None or len(values) != n:
            return TaskError(
                f"task {call.name} declares returns={n} but returned {type(result).__name__} {result!r:.80}"
            )
        return values

    def cancel(self, future: Future) -> bool:
        """Cancel the task of ``future`` (see Future.cancel); False if it already finished."""
        with self._lock:
            call = self._calls.get(future.task_id)
            if call is None or call.settled or future not in call.futures:
                return False
            call.cancelled = True
            backend, attempt = call.backend, call.attempt
            for queue in self._queues.values():
                if call in queue:
                    queue.remove(call)
        if attempt and backend and not self.inline:
            # Running (or about to): the backend raises CallCancelled inside it.
            self.client.cancel_call(backend, f"{self._session}:{call.task_id}")
        self._settle(
            call,
            attempt,
            None,
            TaskCancelled(f"task {call.name} cancelled by future.cancel(); its changes were rolled back"),
            backend,
        )
        return True

    def _cancel(self, call: Call, because: Future) -> None:
        """Finish a call that will never run because ``because`` failed."""
        call.settled = True
        cause = because.exception()
        err = TaskCancelled(
            f"task {call.name} cancelled: it depends on task "
            f"{because.task_name}#{because.task_id}, which failed with "
            f"{type(cause).__name__}: {cause}"
        )
        err.__cause__ = cause
        for f in call.futures:
            f._finish(None, err, None, 0)

    def _drop(self, task_id: int) -> None:
        call = self._calls.pop(task_id, None)
        if call is not None:
            failed = call.futures[0].failed()
            self._outcomes[failed] += 1
            self._recent.append(
                {
                    "id": task_id,
                    "name": call.name,
                    "backend": call.backend,
                    "state": "failed" if failed else "done",
                    "after": list(call.deps),
                }
            )
        if not self._calls:
            self._idle.notify_all()

    def snapshot(self) -> dict:
        """The task graph as it stands: counts, unfinished tasks and the last finished ones.

        Each task is ``{"id", "name", "state", "backend", "after"}`` with state
        ``waiting`` (for tasks in ``after``), ``queued`` (waiting for a slot on
        its backend), ``running``, ``done`` or ``failed``.
        """
        with self._lock:
            queued = {id(c) for q in self._queues.values() for c in q}
            tasks = list(self._recent)
            for t, call in self._calls.items():
                waiting = self._graph.predecessors(t) if t in self._graph else set()
                state = "waiting" if waiting else "queued" if id(call) in queued or call.backend is None else "running"
                tasks.append(
                    {"id": t, "name": call.name, "backend": call.backend, "state": state, "after": list(call.deps)}
                )
            done, failed = self._outcomes
            return {
                "submitted": done + failed + len(self._calls),
                "done": done,
                "failed": failed,
                "pending": len(self._calls),
                "tasks": tasks,
            }

    # -- synchronisation --------------------------------------------------------------------------
    def futures_using(self, object_id: str) -> list[Future]:
        """Futures of the unfinished tasks that read or write the object."""
        with self._lock:
            return [f for t in self._graph.users(object_id) for f in self._calls[t].futures[:1]]

    def barrier(self, timeout: float | None = None) -> None:
        """Wait until every task submitted so far finished; raise if a FAIL task failed."""
        with self._lock:
            if not self._idle.wait_for(lambda: not self._calls, timeout):
                raise TimeoutError(f"barrier: {len(self._calls)} tasks still running after {timeout}s")
            failures, self._failures = self._failures, []
            failed, self._failed = self._failed, 0
        if failures:
            name, first = failures[0]
            more = f" (and {failed - 1} more)" if failed > 1 else ""
            raise TaskError(f"task {name} failed with {type(first).__name__}: {first}{more}") from first

    def pending(self) -> int:
        """Tasks submitted and not finished yet."""
        with self._lock:
            return len(self._calls)

    def workload(self) -> tuple[int, float]:
        """(tasks not finished, seconds the oldest of them has waited): what autoscaling reads."""
        with self._lock:
            if not self._calls:
                return 0, 0.0
            oldest = min(c.submitted for c in self._calls.values())
            return len(self._calls), time.monotonic() - oldest

    def close(self, reason: str = "its connection was closed or replaced") -> None:
        """Stop sending tasks; every task not finished yet fails with TaskCancelled.

        None is left pending: a task still queued never ran; one already sent
        may or may not have run (like a call that got CallInterrupted).
        """
        self.executor.shutdown(wait=False)
        with self._lock:
            calls = [c for c in self._calls.values() if not c.settled]
            for call in calls:
                call.settled = True
                if call.timer is not None:
                    call.timer.cancel()
                    call.timer = None
                sent = "it may or may not have run" if call.attempt else "it never ran"
                err = TaskCancelled(f"task {call.name} cancelled: the runtime stopped because {reason}; {sent}")
                for f in call.futures:
                    f._finish(None, err, call.backend, call.attempt)
            self._calls.clear()
            self._queues.clear()
            self._idle.notify_all()
        self.files.close()


_WRITE_TASK_GRACE = 5.0  # seconds past time_out before a silent INOUT task is given up
_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def use_executor(name: str | None, scheduler: str | None = None) -> None:
    """Run this process's next tasks with executor ``name``: ``"store"`` or ``"dask"``.

    ``"store"`` (the default) sends tasks to backends with ``run_task`` RPCs;
    ``"dask"`` submits them to Dask distributed, pinned to the chosen
    backend's hosted worker, through the scheduler at ``scheduler`` (default:
    the connection's ``dask_scheduler`` setting). It overrides
    ``CLAYPOT_EXECUTOR``; ``None`` goes back to it. Tasks still pending would
    be orphaned by the switch, so it refuses while there are any
    (``barrier()`` first).
    """
    global _executor_choice, _runtime
    name = name.strip().lower() if name is not None else None
    if name is not None and name not in EXECUTORS:
        raise ConfigurationError(f"executor must be one of {', '.join(EXECUTORS)}, not {name!r}")
    with _runtime_lock:
        rt = _runtime
        if rt is not None and rt.pending():
            raise RuntimeError(f"use_executor: {rt.pending()} tasks are still pending; call barrier() first")
        _executor_choice = (name, scheduler) if name is not None else None
        # The next task builds a runtime with the new executor.
        if rt is not None:
            if not rt.inline:
                rt.close()
            _runtime = None


def _on_dispatcher_change(new) -> None:
    """This process connected elsewhere (or disconnected): end the old runtime's tasks."""
    global _runtime
    with _runtime_lock:
        rt = _runtime
        if rt is not None and not rt.inline and rt.client is not new:
            _runtime = None
        else:
            rt = None
    if rt is not None:
        rt.close("this process reconnected")


hooks.on_client_change(_on_dispatcher_change)


def _on_backend_change(event: str, backend_id: str) -> None:
    """A backend joined (use it for the next ready tasks) or is draining (stop using it)."""
    rt = _runtime
    if rt is None or rt.inline:
        return
    with rt._lock:
        if event == "drain":
            rt.scheduler.exclude(backend_id)
        rt._refresh_backends(force=True)


_elastic.on_change(_on_backend_change)


def current() -> Runtime:
    """The runtime for this process's current connection (inline when there is none).

    Inside a backend (a task that calls a task) the runtime is inline too: the
    inner task runs in place, next to the outer one's data.
    """
    global _runtime
    client = hooks.current_client()
    if client is not None and getattr(client, "local", None) is not None:
        client = None
    rt = _runtime
    if rt is not None and rt.client is client:
        return rt
    with _runtime_lock:
        rt = _runtime
        if rt is None or rt.client is not client:
            if rt is not None and not rt.inline:
                rt.close()
            rt = _runtime = Runtime(client)
        return rt
