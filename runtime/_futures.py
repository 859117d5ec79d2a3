"""Futures: the value of a task that may not have run yet."""

from __future__ import annotations

import threading
from typing import Any, Callable

_PENDING, _DONE = 0, 1


class Future:
    """The result of one task call, available once the task has run.

    A future can be passed to other tasks (they wait for it and receive its
    value) or given to :func:`runtime.wait_on`. After the task finished,
    ``backend`` is the id of the backend it ran on (``None`` when it ran
    inline, with no cluster connected) and ``attempts`` how many times it ran.
    """

    __slots__ = (
        "task_id",
        "task_name",
        "index",
        "backend",
        "attempts",
        "_state",
        "_value",
        "_error",
        "_cond",
        "_callbacks",
        "__weakref__",
    )

    def __init__(self, task_id: int, task_name: str, index: int | None = None):
        self.task_id = task_id
        self.task_name = task_name
        self.index = index  # position in the task's results, for returns > 1
        self.backend: str | None = None
        self.attempts = 0
        self._state = _PENDING
        self._value: Any = None
        self._error: BaseException | None = None
        self._cond = threading.Condition(threading.Lock())
        self._callbacks: list[Callable[["Future"], None]] = []

    def __repr__(self) -> str:
        state = "pending" if self._state == _PENDING else ("failed" if self._error is not None else "done")
        where = f" on {self.backend[:8]}" if self.backend else ""
        return f"<Future {self.task_name}#{self.task_id} {state}{where}>"

    def __reduce__(self):
        raise TypeError(
            f"a Future ({self.task_name}#{self.task_id}) cannot be sent as part of a value: "
            f"pass it to a task as an argument of its own or inside a COLLECTION_IN/"
            f"COLLECTION_INOUT argument, or wait_on() it first"
        )

    def done(self) -> bool:
        """True once the task finished (ran, failed or was cancelled)."""
        return self._state == _DONE

    def failed(self) -> bool:
        """True once the task finished with an error (or was cancelled)."""
        return self._state == _DONE and self._error is not None

    def _wait(self, timeout: float | None) -> None:
        if self._state == _DONE:
            return
        with self._cond:
            if not self._cond.wait_for(lambda: self._state == _DONE, timeout):
                raise TimeoutError(f"task {self.task_name}#{self.task_id} did not finish within {timeout}s")

    def result(self, timeout: float | None = None) -> Any:
        """The task's value; raises the task's error if it failed."""
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's error, or None if it succeeded."""
        self._wait(timeout)
        return self._error

    def cancel(self) -> bool:
        """Cancel the task: a task still waiting never runs; a running one is stopped on
        its backend (CallCancelled raised inside it, its INOUT objects rolled back).

        The future, and those of tasks that depend on it, fail with TaskCancelled.
        Returns False if the task had already finished.
        """
        if self._state == _DONE:
            return False
        from runtime._core import current

        return current().cancel(self)

    def cancelled(self) -> bool:
        """True if the task ended by a cancel (its own, or a failed predecessor's)."""
        from store.errors import TaskCancelled

        return self._state == _DONE and isinstance(self._error, TaskCancelled)

    def add_done_callback(self, fn: Callable[["Future"], None]) -> None:
        """Call ``fn(self)`` when the task finishes (at once if it already has)."""
        with self._cond:
            if self._state != _DONE:
                self._callbacks.append(fn)
                return
        fn(self)

    # -- set by the runtime only ---------------------------------------------------
    def _finish(
        self, value: Any = None, error: BaseException | None = None, backend: str | None = None, attempts: int = 0
    ) -> bool:
        """Complete the future once; later calls (a late reply after a timeout) are ignored."""
        with self._cond:
            if self._state == _DONE:
                return False
            self._value, self._error = value, error
            self.backend, self.attempts = backend, attempts
            self._state = _DONE
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for fn in callbacks:
            fn(self)
        return True
