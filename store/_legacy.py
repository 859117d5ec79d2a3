"""The module names of the flat layout, kept working.

Modules moved into private packages (``store.client`` is now
``store._client.client``). Old names are still imported by applications, and
pickles made by older versions name classes and functions by module path
(``store.objects.load_reference``), so each old name resolves to the very same
module object as its new one: ``import store.client``,
``from store.backend.heap import Heap``, ``pickle.loads`` and monkeypatching
``store.client.X`` all reach one module. ``python -m store.cli`` (an old name)
runs the moved module.

One meta-path finder does it, installed when this module is imported (by
``store/__init__.py``, before anything else; ``runtime`` imports ``store``
first, so its old names work too); the table below is the whole mapping.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# Old dotted name -> new dotted name. A name maps its whole subtree
# (store.generated.claypot_pb2 follows store.generated).
MOVED: dict[str, str] = {
    "store.addresses": "store._util.addresses",
    "store.resources": "store._util.resources",
    "store.security": "store._util.security",
    "store.generated": "store._wire.generated",
    "store.wire": "store._wire.wire",
    "store.serialization": "store._wire.serialization",
    "store.transfers": "store._wire.transfers",
    "store.polyglot": "store._wire.polyglot",
    "store.objects": "store._model.objects",
    "store.objectops": "store._model.objectops",
    "store.client": "store._client.client",
    # Short names for the transport seam and the in-process cluster, as
    # contributors first met them.
    "store.transport": "store._client.transport",
    "store.inproc": "store._ops.inproc",
    "store.retry": "store._client.retry",
    "store.shm": "store._client.shm",
    "store.leases": "store._client.leases",
    "store.readcache": "store._client.readcache",
    "store.api": "store._api.api",
    "store.alien": "store._api.alien",
    "store.directory": "store._directory.directory",
    "store.replica_set": "store._directory.replica_set",
    "store.backend.lifecycle": "store.backend._core.lifecycle",
    "store.backend.replication": "store.backend._core.replication",
    "store.backend.storage": "store.backend._storage.storage",
    "store.backend.direct": "store.backend._storage.direct",
    "store.backend.segments": "store.backend._storage.segments",
    "store.backend.versions": "store.backend._storage.versions",
    "store.backend.heap": "store.backend._engine.heap",
    "store.backend.cancel": "store.backend._engine.cancel",
    "store.backend.replicas": "store.backend._engine.replicas",
    "store.backend.server": "store.backend._service.server",
    "store.backend.guards": "store.backend._service.guards",
    "store.backend.polyglot": "store.backend._service.polyglot",
    "store.backend.dask_worker": "store.backend._service.dask_worker",
    "store.cli": "store._ops.cli",
    "store.cluster": "store._ops.cluster",
    "store.demo": "store._ops.demo",
    "store.status_table": "store._ops.status_table",
    "store.lifeline": "store._ops.lifeline",
    "runtime.core": "runtime._core",
    "runtime.decorators": "runtime._decorators",
    "runtime.directions": "runtime._directions",
    "runtime.futures": "runtime._futures",
    "runtime.executor": "runtime._executor",
    "runtime.dask_executor": "runtime._dask_executor",
    "runtime.files": "runtime._files",
    "runtime.graph": "runtime._graph",
    "runtime.scheduler": "runtime._scheduler",
    "runtime.sizes": "runtime._sizes",
    "runtime.resources": "runtime._resources",
    "runtime.progress": "runtime._progress",
}


def new_name(old: str) -> str | None:
    """The current dotted name of the old module ``old``, or None if it did not move."""
    if old in MOVED:
        return MOVED[old]
    head, _, tail = old.rpartition(".")
    while head:
        if head in MOVED:
            return MOVED[head] + "." + old[len(head) + 1 :]
        head, _, _ = head.rpartition(".")
    return None


class _AliasLoader(importlib.abc.Loader):
    """Hands back the already-imported module under its old name."""

    def __init__(self, target: types.ModuleType) -> None:
        self.target = target
        self.spec = target.__spec__

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.target

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system stamped the alias spec on the module; the module
        # keeps its own (reload, pickling by reference and runpy read it).
        module.__spec__ = self.spec

    # runpy (``python -m store.cli``) asks the loader for the code to run.
    def get_code(self, fullname: str) -> types.CodeType | None:
        spec = self.spec
        if spec is None:
            return None
        get_code = getattr(spec.loader, "get_code", None)
        return get_code(spec.name) if get_code is not None else None

    def is_package(self, fullname: str) -> bool:
        return hasattr(self.target, "__path__")


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds old module names and maps them onto the moved modules."""

    def find_spec(
        self, fullname: str, path: object = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        moved = new_name(fullname)
        if moved is None:
            return None
        module = importlib.import_module(moved)
        parent = sys.modules.get(fullname.rpartition(".")[0])
        leaf = fullname.rpartition(".")[2]
        if (
            parent is not None
            and type(parent) is types.ModuleType
            and not isinstance(parent.__dict__.get(leaf, module), types.ModuleType)
        ):
            # The old name is also a function of the parent (store.client()).
            parent.__class__ = _Surface
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(module), is_package=hasattr(module, "__path__"))


class _Surface(types.ModuleType):
    """A package whose attribute is named like one of its old submodules.

    Importing a submodule sets it as an attribute of its parent. Two old
    module names are also functions of the public surface (``store.client()``,
    ``runtime.progress()``); importing them by their old name must not
    replace the function, exactly as before the move.
    """

    def __setattr__(self, name: str, value: object) -> None:
        current = self.__dict__.get(name)
        if (
            isinstance(value, types.ModuleType)
            and current is not None
            and not isinstance(current, types.ModuleType)
            and f"{self.__name__}.{name}" in MOVED
        ):
            return
        super().__setattr__(name, value)


_FINDER = _AliasFinder()


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once).

    First, so that an old name under a moved package (store.generated.x) is
    never found a second time by the path finder as a new module.
    """
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)


install()
