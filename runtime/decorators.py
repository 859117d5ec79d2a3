"""``@task`` and ``@constraint``: ordinary functions become tasks."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from .directions import Direction, OnFailure

_CONSTRAINTS = "__claypot_constraints__"


class TaskFunction:
    """A function decorated with ``@task``. Calling it submits a task and returns a Future.

    The undecorated function is ``fn``; it is what runs on the backend.
    """

    def __init__(self, fn: Callable, returns: Any = 1, on_failure: str = "FAIL",
                 time_out: float = 0.0, retries: int = 1, directions: dict | None = None,
                 versions: bool = False):
        if not callable(fn):
            raise TypeError(f"@task needs a function, not {fn!r}")
        self.fn = fn
        functools.update_wrapper(self, fn)
        self.returns = _count_returns(returns)
        self.on_failure = OnFailure.parse(on_failure)
        if time_out is not None and time_out < 0:
            raise ValueError("time_out must be a number of seconds >= 0")
        self.time_out = float(time_out or 0.0)
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.retries = int(retries)
        sig = inspect.signature(fn)
        self._params = list(sig.parameters.values())
        self.directions: dict[str, Direction] = {}
        for name, d in (directions or {}).items():
            if name not in sig.parameters:
                raise TypeError(f"@task: {fn.__qualname__} has no parameter {name!r}")
            if not isinstance(d, Direction):
                raise TypeError(f"@task: direction of {name!r} must be IN, INOUT, OUT, "
                                f"COLLECTION_IN or COLLECTION_INOUT, not {d!r}")
            self.directions[name] = d
        self.versions = bool(versions)
        self.computing_units, self.memory_bytes = 1, 0
        cons = getattr(fn, _CONSTRAINTS, None)
        if cons:
            self._constrain(**cons)

    def _constrain(self, computing_units: int = 1, memory_size: float | None = None) -> None:
        if int(computing_units) < 1:
            raise ValueError("computing_units must be >= 1")
        if memory_size is not None and memory_size < 0:
            raise ValueError("memory_size must be >= 0 (GiB)")
        self.computing_units = int(computing_units)
        self.memory_bytes = int((memory_size or 0) * 2**30)

    def __call__(self, *args, **kwargs):
        from .core import current
        return current().submit(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<task {self.__qualname__}>"

    def __reduce__(self):
        # A task function that refers to another task is shipped with it; the
        # copy on the backend rebuilds the wrapper from the plain function.
        return (_rebuild, (self.fn, self.returns, self.on_failure.value, self.time_out,
                           self.retries, self.directions,
                           (self.computing_units, self.memory_bytes), self.versions))

    # -- argument binding ---------------------------------------------------------------
    def positional_names(self, n: int) -> list[str]:
        """Parameter names of the first ``n`` positional arguments."""
        names = []
        for p in self._params:
            if len(names) == n:
                break
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.append(p.name)
            elif p.kind == p.VAR_POSITIONAL:
                names.extend([p.name] * (n - len(names)))
        if len(names) < n:
            raise TypeError(f"{self.__qualname__}() takes {len(names)} positional arguments "
                            f"but {n} were given")
        return names

    def bind(self, args: tuple, kwargs: dict):
        """(value, direction) of every argument of one call."""
        d = self.directions
        for value, name in zip(args, self.positional_names(len(args))):
            yield value, d.get(name, Direction.IN)
        for name, value in kwargs.items():
            yield value, d.get(name, Direction.IN)


def _rebuild(fn, returns, on_failure, time_out, retries, directions, demand, versions=False):
    t = TaskFunction(fn, returns, on_failure, time_out, retries, directions, versions)
    t.computing_units, t.memory_bytes = demand
    return t


def _count_returns(returns: Any) -> int:
    if returns is None or returns is False:
        return 0
    if isinstance(returns, bool):
        return 1
    if isinstance(returns, int):
        if returns < 0:
            raise ValueError("returns must be >= 0")
        return returns
    if isinstance(returns, (list, tuple)):
        return len(returns)
    return 1  # a type, as in returns=int


def task(fn: Callable | None = None, *, returns: Any = 1, on_failure: str = "FAIL",
         time_out: float = 0.0, retries: int = 1, versions: bool = False, **directions):
    """Make a function a task: calls return a Future at once and run where the data is.

    ``returns``: how many values (1 by default; ``returns=2`` gives a tuple of
    two futures). ``<param>=IN|INOUT|OUT|COLLECTION_IN|COLLECTION_INOUT`` declares
    what the task does with an argument (IN by default). ``on_failure``: FAIL,
    RETRY (``retries`` more attempts), CANCEL_SUCCESSORS or IGNORE.
    ``time_out``: seconds after which the task's future fails with TaskTimeout.
    ``versions``: the task changes new versions of its INOUT objects (see
    ``StorageObject.new_version``), so it runs alongside earlier readers of them
    instead of after; each version is written back once those readers finished,
    before any later task sees the object (PyCOMPSs with dataClay does the same).
    Usable bare (``@task``) or with options (``@task(returns=1)``).
    """
    def wrap(f: Callable) -> TaskFunction:
        return TaskFunction(f, returns, on_failure, time_out, retries, directions, versions)
    if fn is not None:
        return wrap(fn)
    return wrap


def constraint(computing_units: int = 1, memory_size: float | None = None):
    """Declare what a task needs while it runs on a backend.

    ``computing_units`` task slots (of ``CLAYPOT_TASK_SLOTS`` per backend) and
    ``memory_size`` GiB are held by the task while it runs; tasks that do not fit
    wait for their backend. Place it above or below ``@task``.
    """
    def wrap(f):
        if isinstance(f, TaskFunction):
            f._constrain(computing_units, memory_size)
            return f
        setattr(f, _CONSTRAINTS, {"computing_units": computing_units,
                                  "memory_size": memory_size})
        return f
    return wrap
