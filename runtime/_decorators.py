"""``@task``, ``@constraint``, ``@implement``, ``@binary`` and ``@mpi``: functions become tasks.

The decorators other than ``@task`` may sit above or below it, as in
PyCOMPSs; below, they mark the plain function and ``@task`` picks the marks up.
"""

from __future__ import annotations

from collections.abc import Iterator
import functools
import inspect
from typing import Any, Callable


from runtime._directions import Direction, OnFailure

_CONSTRAINTS = "__claypot_constraints__"
_PROGRAM = "__claypot_program__"
_IMPLEMENTS = "__claypot_implements__"

# (source_class, method) -> the task functions declared as their implementations.
_ALTERNATIVES: dict[tuple[str, str], list["TaskFunction"]] = {}


class TaskFunction:
    """A function decorated with ``@task``. Calling it submits a task and returns a Future.

    The undecorated function is ``fn``; it is what runs on the backend.
    """

    def __init__(
        self,
        fn: Callable,
        returns: Any = 1,
        on_failure: str = "FAIL",
        time_out: float = 0.0,
        retries: int = 1,
        directions: dict | None = None,
        versions: bool = False,
    ):
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
                raise TypeError(
                    f"@task: direction of {name!r} must be one of {', '.join(x.value for x in Direction)}, not {d!r}"
                )
            self.directions[name] = d
        self.versions = bool(versions)
        self.computing_units, self.memory_bytes = 1, 0
        self.constraints: dict = {}
        self.program: dict | None = None
        self._runner: Any = None  # a files.TaskRunner, made on first use
        cons = getattr(fn, _CONSTRAINTS, None)
        if cons:
            self._constrain(**cons)
        prog = getattr(fn, _PROGRAM, None)
        if prog:
            self._set_program(prog)
        impl = getattr(fn, _IMPLEMENTS, None)
        if impl:
            _register_alternative(self, *impl)

    def _constrain(self, **kwargs: Any) -> None:
        from runtime._resources import constraints

        cons = constraints(**kwargs)
        units = cons.get("computing_units", 1)
        if units < 1 or units != int(units):
            raise ValueError(f"computing_units must be an integer >= 1, not {units!r}")
        self.computing_units = int(units)
        self.memory_bytes = int(cons.get("memory_size", 0) * 2**30)
        self.constraints = cons

    def _set_program(self, program: dict) -> None:
        self.program = dict(program)
        self._runner = None

    @property
    def file_params(self) -> dict[str, Direction]:
        """Parameters with a FILE direction."""
        return {n: d for n, d in self.directions.items() if d.file}

    @property
    def runner(self) -> Any:
        """What runs on the backend: the function, or a runner that handles files/programs."""
        if not self.file_params and self.program is None:
            return self.fn
        if self._runner is None:
            from runtime._files import TaskRunner

            # One runner per task function, so its code is shipped to backends once.
            self._runner = TaskRunner(self.fn, self.file_params, self.program)
        return self._runner

    def alternatives(self) -> list["TaskFunction"]:
        """This task and the ``@implement`` implementations declared for it."""
        out = [self]
        mod, name = self.fn.__module__ or "", self.fn.__name__
        owner = self.fn.__qualname__.rsplit(".", 1)[0] if "." in self.fn.__qualname__ else ""
        for (source, method), impls in list(_ALTERNATIVES.items()):
            if method != name:
                continue
            candidates = {mod, f"{mod}.{owner}" if owner else mod, owner}
            if source in candidates or mod.endswith("." + source) or mod.rsplit(".", 1)[-1] == source:
                out.extend(i for i in impls if i is not self)
        return out

    def __call__(self, *args, **kwargs):
        from runtime._core import current

        return current().submit(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<task {self.__qualname__}>"

    def __reduce__(self):
        # A task function that refers to another task is shipped with it; the
        # copy on the backend rebuilds the wrapper from the plain function.
        return (
            _rebuild,
            (
                self.fn,
                self.returns,
                self.on_failure.value,
                self.time_out,
                self.retries,
                self.directions,
                (self.computing_units, self.memory_bytes, self.constraints, self.program),
                self.versions,
            ),
        )

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
            raise TypeError(f"{self.__qualname__}() takes {len(names)} positional arguments but {n} were given")
        return names

    def bind(self, args: tuple, kwargs: dict) -> Iterator[tuple[Any, Direction]]:
        """(value, direction) of every argument of one call."""
        d = self.directions
        for value, name in zip(args, self.positional_names(len(args))):
            yield value, d.get(name, Direction.IN)
        for name, value in kwargs.items():
            yield value, d.get(name, Direction.IN)


def _rebuild(fn, returns, on_failure, time_out, retries, directions, demand, versions=False):
    t = TaskFunction(fn, returns, on_failure, time_out, retries, directions, versions)
    t.computing_units, t.memory_bytes, t.constraints, t.program = demand
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


def task(
    fn: Callable | None = None,
    *,
    returns: Any = 1,
    on_failure: str = "FAIL",
    time_out: float = 0.0,
    retries: int = 1,
    versions: bool = False,
    **directions: Any,
) -> Any:
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


def constraint(
    computing_units: int | str | None = None, memory_size: float | None = None, **resources: Any
) -> Callable[[Callable[..., Any]], Any]:
    """Declare what a task needs: it runs only on a backend whose resources meet it.

    Names are PyCOMPSs' (``computing_units``/``computingUnits``,
    ``memory_size``/``MemorySize`` in GiB, ``processor_type``/``ProcessorType``,
    ``processor_performance``, ``processor_architecture``, ``gpus``,
    ``app_software``, or any label a backend declares); see
    :mod:`runtime._resources` for how each is matched. ``computing_units``
    slots and ``memory_size`` GiB are also held by the task while it runs:
    tasks that do not fit wait for their backend. A task that no backend can
    ever run fails at the call with ConfigurationError. Above or below ``@task``.
    """
    cons = dict(resources)
    if computing_units is not None:
        cons["computing_units"] = computing_units
    if memory_size is not None:
        cons["memory_size"] = memory_size

    def wrap(f):
        if isinstance(f, TaskFunction):
            f._constrain(**cons)
            return f
        setattr(f, _CONSTRAINTS, cons)
        return f

    return wrap


def implement(source_class: str, method: str) -> Callable[[Callable[..., Any]], Any]:
    """Declare this task as another implementation of task ``source_class.method``.

    ``source_class`` is the module (or class) of the original task and
    ``method`` its name. Implementations share the original's parameters,
    directions and ``returns`` (the original's are used for every call). Each call of the original then runs one of its
    implementations: one whose ``@constraint`` a backend meets, preferring
    the backend that holds the call's data, then the least loaded.
    """
    if not source_class or not method:
        raise ValueError("@implement needs source_class and method")

    def wrap(f):
        if isinstance(f, TaskFunction):
            _register_alternative(f, source_class, method)
            return f
        setattr(f, _IMPLEMENTS, (source_class, method))
        return f

    return wrap


def _register_alternative(t: "TaskFunction", source_class: str, method: str) -> None:
    impls = _ALTERNATIVES.setdefault((source_class, method), [])
    # Re-running a module's decorators replaces its earlier implementation.
    impls[:] = [i for i in impls if i.__qualname__ != t.__qualname__ or i.fn.__module__ != t.fn.__module__]
    impls.append(t)


def _program_decorator(program: dict) -> Callable[[Any], Any]:
    def wrap(f):
        if isinstance(f, TaskFunction):
            f._set_program(program)
            return f
        setattr(f, _PROGRAM, program)
        return f

    return wrap


def binary(
    binary: str, args: str = "", working_dir: str = "", fail_by_exit_value: bool = True
) -> Callable[[Callable[..., Any]], Any]:
    """Run an executable as the task (the function's body is not run).

    Its arguments are the task's parameters in order (``FILE_*`` ones as
    local paths on the backend), or ``args="--in {{src}} -n {{n}}"`` to place
    them by name; ``FILE_OUT_STDOUT``/``FILE_OUT_STDERR`` parameters receive
    its streams. A non-zero exit code fails the task (TaskError, then its
    ``on_failure`` policy applies) unless ``fail_by_exit_value=False``; the
    task's value is the exit code.
    """
    if not binary:
        raise ValueError("@binary needs binary=")
    return _program_decorator(
        {
            "kind": "binary",
            "binary": binary,
            "args": args,
            "working_dir": working_dir,
            "fail_by_exit_value": fail_by_exit_value,
        }
    )


def mpi(
    binary: str = "",
    runner: str = "mpirun",
    processes: int = 1,
    args: str = "",
    working_dir: str = "",
    flags: str = "",
    fail_by_exit_value: bool = True,
) -> Callable[[Callable[..., Any]], Any]:
    """Run an MPI program as the task: ``runner -np processes binary args...``.

    ``runner`` is ``mpirun`` (Open MPI; as root it adds ``--allow-run-as-root``,
    and always ``--oversubscribe`` so more ranks than cores run) or ``srun``.
    Arguments, streams and exit codes as for :func:`binary`.

    Without ``binary`` the decorated Python function itself runs on every
    rank, under mpi4py (which the backends need): the task's value is the
    list of the ranks' results, in rank order; a rank that raises fails the
    task with its exception.
    """
    if int(processes) < 1:
        raise ValueError("processes must be >= 1")
    if not binary:
        return _program_decorator(
            {
                "kind": "mpi_python",
                "runner": runner,
                "processes": int(processes),
                "working_dir": working_dir,
                "flags": flags,
            }
        )
    return _program_decorator(
        {
            "kind": "mpi",
            "binary": binary,
            "runner": runner,
            "processes": int(processes),
            "args": args,
            "working_dir": working_dir,
            "flags": flags,
            "fail_by_exit_value": fail_by_exit_value,
        }
    )
