"""Executors: how a ready task is actually run.

- :class:`RemoteExecutor` sends tasks to their backends with ``run_task``
  RPCs from a thread pool, so many tasks are in flight while the caller goes
  on submitting. The function itself was registered once (by value) and
  travels as its code key.
- :class:`InlineExecutor` runs the function in the calling thread, for
  plain ``python`` with no cluster (and inside a backend, where a task that
  calls another task runs it in place).

Lanes and batches. Each backend has ``slots`` lanes: at most that many RPCs
in flight to it, which is how many of this process's tasks it runs at once.
A task is sent as soon as a lane is free, alone, so a lone task pays one RPC
and nothing more. Tasks that arrive while every lane is busy wait; when lanes
free up, the waiting tasks are shared out among them, several per RPC (run
one after another on the backend by :func:`run_batch`). So a burst of tiny
tasks costs a few RPCs, not one each, with no timer to wait for: batching
happens only when the backend is already busy. Only tasks that change no
object, have no ``time_out`` and take one slot are batched; the others always
travel alone, so locks and time limits stay per task.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from store.errors import ConfigurationError, RemoteError, TaskTimeout

Done = Callable[[Any, BaseException | None], None]

MAX_BATCH = 64  # tasks per RPC: enough to amortise the call, small enough to keep results flowing


@dataclass
class Job:
    """One attempt of one task, as the executor sees it."""

    backend: str | None
    fn: Callable
    prepare: Callable[[], tuple[tuple, dict]]  # the arguments, futures resolved
    mutates: list[str]
    time_out: float
    units: int
    done: Done
    on_start: Callable[[], None] = field(default=lambda: None)
    key: str = ""  # the task's name across its retries (a backend applies it at most once)

    @property
    def batchable(self) -> bool:
        return not self.mutates and not self.time_out and self.units == 1


def run_batch(items: list) -> list:
    """Runs inside a backend: each (code key, args, kwargs) in turn; (ok, value) each.

    An error stays with its task: it is returned, not raised, so one failing
    task does not fail the others of its batch.
    """
    import cloudpickle

    from store import tracing
    from store.hooks import local_backend

    backend = local_backend()
    if backend is None:
        raise ConfigurationError("a batch of tasks runs inside a backend only")
    out = []
    for key, args, kwargs in items:
        try:
            with tracing.span(f"task {key}"):  # each task of the batch, under the batch's span
                out.append((True, backend.code(key)(*args, **kwargs)))
        except Exception as exc:
            exc.add_note("remote traceback (in a batch of tasks):\n" + traceback.format_exc())
            try:
                cloudpickle.dumps(exc)
                out.append((False, exc))
            except Exception:
                out.append(
                    (False, RemoteError(f"{type(exc).__name__}: {exc}", type(exc).__qualname__, traceback.format_exc()))
                )
    return out


class _Lanes:
    __slots__ = ("free", "queue")

    def __init__(self, slots: int):
        self.free = slots
        self.queue: deque[Job] = deque()


class CodeKeys:
    """Function -> registry key, shipping each function by value once (any executor)."""

    def __init__(self, client):
        self.client = client
        self._keys: dict[int, tuple[object, str]] = {}
        self._register_lock = threading.Lock()

    def key(self, fn: Callable[..., Any]) -> str:
        """The registry key of ``fn``, shipping it on first use only."""
        hit = self._keys.get(id(fn))
        if hit is not None and hit[0] is fn:
            return hit[1]
        # One registration per function even when many pool threads start its
        # first tasks at once: the others wait for it rather than ship it again.
        with self._register_lock:
            hit = self._keys.get(id(fn))
            if hit is not None and hit[0] is fn:
                return hit[1]
            key = self.client.register_code(fn)
            self._keys[id(fn)] = (fn, key)
            return key


class RemoteExecutor:
    """Runs tasks on backends through a client (see the module docstring)."""

    def __init__(self, client: Any, slots: int, workers: int) -> None:
        self.client = client
        self.slots = slots
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="claypot-task")
        self._codes = CodeKeys(client)
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lanes] = {}
        self.slots_for: Callable[[str], int] | None = None  # per-backend lanes, if declared
        self.rpcs = 0  # RPCs sent, for tests and benchmarks
        self.batched = 0  # tasks that travelled in a batch of two or more

    def code_key(self, fn: Callable[..., Any]) -> str:
        """The registry key of ``fn``, shipping it on first use only."""
        return self._codes.key(fn)

    def submit(self, job: Job) -> None:
        """Queue ``job`` for its backend and send what the free lanes allow."""
        with self._lock:
            lanes = self._lanes.get(job.backend)
            if lanes is None:
                n = self.slots_for(job.backend) if self.slots_for is not None else self.slots
                lanes = self._lanes[job.backend] = _Lanes(max(1, n))
            lanes.queue.append(job)
            sends = self._take(lanes)
        for jobs, units in sends:
            self._pool.submit(self._send, job.backend, jobs, units)

    def _take(self, lanes: _Lanes) -> list[tuple[list[Job], int]]:
        """Groups of jobs to send now, each with the lanes it holds (lock held)."""
        sends = []
        q = lanes.queue
        while q and lanes.free > 0:
            head = q[0]
            if head.units > 1:
                if lanes.free < head.units:
                    break  # it waits for enough lanes; those behind it wait too (FIFO)
                q.popleft()
                lanes.free -= head.units
                sends.append(([head], head.units))
                continue
            if not head.batchable:
                q.popleft()
                lanes.free -= 1
                sends.append(([head], 1))
                continue
            run = 0
            for j in q:
                if not j.batchable or run == MAX_BATCH * lanes.free:
                    break
                run += 1
            size = min(MAX_BATCH, max(1, math.ceil(run / lanes.free)))
            batch = [q.popleft() for _ in range(size)]
            lanes.free -= 1
            sends.append((batch, 1))
        return sends

    def _send(self, backend: str, jobs: list[Job], units: int) -> None:
        try:
            ready = []
            for job in jobs:
                try:
                    job.on_start()
                    ready.append((job, job.prepare(), self.code_key(job.fn)))
                except BaseException as exc:
                    job.done(None, exc)
            if len(ready) == 1:
                job, (args, kwargs), key = ready[0]
                self.rpcs += 1
                try:
                    result = self.client.run_task(
                        backend, key, args, kwargs, job.mutates, job.time_out, task_key=job.key or None
                    )
                except BaseException as exc:  # the task's own error, or the store's
                    job.done(None, exc)
                else:
                    job.done(result, None)
            elif ready:
                self.rpcs += 1
                self.batched += len(ready)
                items = [(key, args, kwargs) for _, (args, kwargs), key in ready]
                try:
                    outcomes = self.client.run_task(backend, self.code_key(run_batch), (items,), {}, [])
                except BaseException as exc:
                    for job, _, _ in ready:
                        job.done(None, exc)
                else:
                    for (job, _, _), (ok, value) in zip(ready, outcomes):
                        job.done(value, None) if ok else job.done(None, value)
        finally:
            with self._lock:
                lanes = self._lanes[backend]
                lanes.free += units
                sends = self._take(lanes)
            for more, n in sends:
                self._pool.submit(self._send, backend, more, n)

    def shutdown(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


class InlineExecutor:
    """Runs tasks in the calling thread (see the module docstring)."""

    def submit(self, job: Job) -> None:
        started = time.monotonic()
        try:
            args, kwargs = job.prepare()
            result = job.fn(*args, **kwargs)
        except BaseException as exc:
            job.done(None, exc)
            return
        elapsed = time.monotonic() - started
        # A thread cannot be stopped from outside: the time limit is checked afterwards.
        if job.time_out and elapsed > job.time_out:
            job.done(
                None,
                TaskTimeout(f"task {job.fn.__qualname__} ran {elapsed:.2f}s, over its time_out of {job.time_out}s"),
            )
            return
        job.done(result, None)

    def shutdown(self, wait: bool = False) -> None:
        return None
