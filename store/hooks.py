"""The store's hooks for a task runtime: everything the package ``runtime`` uses.

A task runtime needs more of the store than an application does: it orders
tasks by the objects they read and write, asks where an object lives, runs
code inside the backend that holds an object, and moves values as bytes. This
module is that surface, documented and stable, so that a runtime never reads
the store's private modules or fields (an import-linter contract in
pyproject.toml holds ``runtime`` to it).

Driver side (any process with a connection):

- :func:`current_client` / :func:`on_client_change`: the connection this
  process's objects use, and a listener for when it changes;
- :func:`owner_of`: the backend a persistent object lives on, as last known;
- :func:`new_version` / :func:`consolidate_version`: versions of an object
  for tasks that change it (PyCOMPSs-style renaming);
- :func:`dumps` / :func:`loads`, :func:`current_chain` / :func:`set_chain`:
  values as claypot's wire bytes, and the call chain that lets nested calls
  re-enter the locks their caller holds;
- :func:`normalise_resource`, :data:`NUMERIC_RESOURCES`,
  :data:`LIST_RESOURCES`: the resource names constraints may use.

Backend side (code running inside a backend: a task, a batch of tasks, a Dask
worker the backend hosts): :func:`local_backend` gives a narrow view of the
backend this code runs in (:class:`BackendHooks`), or None elsewhere;
:func:`backend_gateway` gives the address and token its child processes use
to reach the cluster.
"""

from __future__ import annotations

from typing import Any, Callable

from store._client.client import current_chain, set_chain
from store._model import objectops as _objectops
from store._model import objects as _objects
from store._util import resources as _resources
from store._wire.serialization import dumps, loads

__all__ = [
    "BackendHooks",
    "LIST_RESOURCES",
    "NUMERIC_RESOURCES",
    "backend_gateway",
    "consolidate_version",
    "current_chain",
    "current_client",
    "dumps",
    "loads",
    "local_backend",
    "new_version",
    "normalise_resource",
    "on_client_change",
    "owner_of",
    "set_chain",
]

#: Resource names whose values are numbers (summed and compared).
NUMERIC_RESOURCES = _resources.NUMERIC
#: Resource names whose values are lists (matched by membership).
LIST_RESOURCES = _resources.LISTS


def normalise_resource(name: str, value: Any) -> tuple[str, Any]:
    """A constraint's (name, value) in canonical form; ConfigurationError if unknown."""
    key, val = _resources.normalise(name, value)
    return key, val


def current_client() -> Any | None:
    """The client (dispatcher) this process's objects use, or None before ``store.connect``."""
    return _objects.get_dispatcher() if _objects.has_dispatcher() else None


def on_client_change(listener: Callable[[Any], None]) -> None:
    """Call ``listener(client_or_None)`` whenever the process's connection changes."""
    _objects.on_dispatcher_change(listener)


def owner_of(obj: Any) -> str:
    """The backend id ``obj`` was last known to live on ("" when not known here)."""
    return str(obj.__dict__.get(_objects._OWNER, "") or "")


def new_version(client: Any, obj: Any) -> Any:
    """A new version of persistent ``obj`` for a task that changes it (see store._model.objectops)."""
    return _objectops.new_version(client, obj)


def consolidate_version(client: Any, version: Any) -> None:
    """Make ``version`` the object's current state, once its task committed."""
    _objectops.consolidate_version(client, version)


class BackendHooks:
    """What code running inside a backend may ask of it.

    A narrow view over the backend's heap: the classes and functions it has
    loaded, the stored size of its objects, running a task under the object
    locks and rollback rules of a method call, and the pickling contexts
    under which values leave it (new objects in a result stay on it).
    """

    __slots__ = ("_heap",)

    def __init__(self, heap: Any) -> None:
        self._heap = heap

    def code(self, key: str) -> Any:
        """The function or class registered under code ``key`` (loaded on first use)."""
        return self._heap.code.get(key)

    def sizes(self, object_ids: list[str]) -> list[int]:
        """Bytes of each object's last stored state here (0 if unknown)."""
        return list(self._heap.sizes(object_ids))

    def run_task(
        self,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        mutates: list[str],
        chain: str,
        timeout: float | None,
        task_key: str = "",
    ) -> Any:
        """Run ``fn`` as a task: the objects in ``mutates`` locked, changed atomically, logged."""
        return self._heap.run_task(fn, args, kwargs, mutates, chain, timeout, task_key=task_key)

    def pickle_context(self, chain: str) -> Any:
        """The context for values leaving this backend (objects it creates stay here)."""
        return self._heap.pickle_context(chain)

    def unpickle_context(self) -> Any:
        """The context for values arriving here (references to local objects resolve in place)."""
        return self._heap.unpickle_context()


def local_backend() -> BackendHooks | None:
    """The backend this code runs inside, or None in a process that is not a backend."""
    client = current_client()
    heap = getattr(client, "local", None)
    return BackendHooks(heap) if heap is not None else None


def backend_gateway() -> tuple[str, str] | None:
    """(address, token) a child process of this backend uses to reach the cluster, or None."""
    client = current_client()
    gateway = getattr(client, "gateway", "") if client is not None else ""
    if not gateway:
        return None
    return gateway, getattr(client, "token", "") or ""
