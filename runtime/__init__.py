"""claypot's task runtime, in the style of PyCOMPSs.

    from runtime import task, wait_on, barrier, INOUT

    @task(returns=1)
    def block_sum(b):              # runs on the backend that holds b
        return float(b.data.sum())

    @task(b=INOUT)
    def scale(b, factor):
        b.data *= factor

    scale(block, 2.0)              # returns at once
    total = wait_on(block_sum(block))   # waits for scale, then block_sum

Calls of a ``@task`` function return :class:`Future` objects at once.
Dependencies follow from the arguments (futures, and persistent objects by
direction); each task runs on the backend holding most of its persistent
arguments, inside that backend's process. With no cluster connected, tasks
run inline, so the same script runs under plain ``python``.

Tasks reach backends by ``run_task`` RPCs by default; ``use_executor("dask")``
(or ``CLAYPOT_EXECUTOR=dask``) submits them to Dask distributed instead,
pinned to Dask workers hosted by the chosen backends (see
:mod:`runtime._dask_executor`).
"""

from __future__ import annotations

import os
from typing import Any

from store import StorageObject as _StorageObject

from runtime._core import current, use_executor
from runtime._decorators import TaskFunction, binary, constraint, implement, mpi, task
from runtime._directions import (
    COLLECTION_IN,
    COLLECTION_INOUT,
    DIRECTORY_IN,
    DIRECTORY_INOUT,
    DIRECTORY_OUT,
    FILE_IN,
    FILE_INOUT,
    FILE_OUT,
    FILE_OUT_STDERR,
    FILE_OUT_STDOUT,
    IN,
    INOUT,
    OUT,
    Direction,
    OnFailure,
)
from runtime._futures import Future
from runtime._progress import ProgressReport, progress

__all__ = [
    "task",
    "constraint",
    "implement",
    "binary",
    "mpi",
    "wait_on",
    "barrier",
    "Future",
    "TaskFunction",
    "IN",
    "INOUT",
    "OUT",
    "COLLECTION_IN",
    "COLLECTION_INOUT",
    "FILE_IN",
    "FILE_OUT",
    "FILE_INOUT",
    "FILE_OUT_STDOUT",
    "FILE_OUT_STDERR",
    "DIRECTORY_IN",
    "DIRECTORY_OUT",
    "DIRECTORY_INOUT",
    "Direction",
    "OnFailure",
    "use_executor",
    "wait_on_file",
    "open_file",
    "progress",
    "ProgressReport",
]


def wait_on(obj: Any, timeout: float | None = None, progress: bool = False) -> Any:
    """Wait for ``obj`` and return its value.

    A Future gives its task's value (or raises the task's error); a list or
    tuple gives the same shape with each item waited on; a persistent object
    is returned once every pending task that uses it has finished. Anything
    else is returned as is. ``progress=True`` shows a bar of the futures in
    ``obj`` while they run (see :func:`runtime.progress`).
    """
    if progress:
        from runtime._progress import progress as show

        show(obj, timeout)
    if isinstance(obj, Future):
        return obj.result(timeout)
    if isinstance(obj, list):
        return [wait_on(x, timeout) for x in obj]
    if isinstance(obj, tuple):
        return tuple(wait_on(x, timeout) for x in obj)
    if isinstance(obj, _StorageObject) and obj.is_persistent:
        for f in current().futures_using(obj.getID()):
            f.exception(timeout)
    return obj


def barrier(timeout: float | None = None) -> None:
    """Wait until every task submitted so far has finished.

    Raises TaskError (caused by the first error) if a task with
    ``on_failure="FAIL"`` (or ``RETRY``, retries spent) failed since the last
    barrier.
    """
    current().barrier(timeout)


def wait_on_file(path: str | os.PathLike, timeout: float | None = None) -> str:
    """Wait for the tasks that write ``path``, put its last version there, return the path.

    PyCOMPSs calls it ``compss_wait_on_file``.
    """
    return current().wait_on_file(path, timeout)


def open_file(path: str | os.PathLike, mode: str = "r", timeout: float | None = None) -> Any:
    """``open()`` the last version of ``path`` once its writers finished (``compss_open``)."""
    return open(wait_on_file(path, timeout), mode)


compss_wait_on = wait_on
compss_barrier = barrier
compss_wait_on_file = wait_on_file
compss_open = open_file
