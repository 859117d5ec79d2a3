"""The public surface is pinned: what `store` and `runtime` export, and which modules are public.

A change here is a change of the public API: deliberate, reviewed, and noted
in the README. Internal modules live in private packages (``store._client``,
``store.backend._engine``, ...; see ARCHITECTURE.md).
"""

import importlib
import os

import runtime
import store
from test_packaging import STORE_API

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The store's names are pinned once, with the error names, in test_packaging.
STORE_ALL = sorted(STORE_API)

RUNTIME_ALL = [
    "COLLECTION_IN",
    "COLLECTION_INOUT",
    "DIRECTORY_IN",
    "DIRECTORY_INOUT",
    "DIRECTORY_OUT",
    "Direction",
    "FILE_IN",
    "FILE_INOUT",
    "FILE_OUT",
    "FILE_OUT_STDERR",
    "FILE_OUT_STDOUT",
    "Future",
    "IN",
    "INOUT",
    "OUT",
    "OnFailure",
    "ProgressReport",
    "TaskFunction",
    "barrier",
    "binary",
    "constraint",
    "implement",
    "mpi",
    "open_file",
    "progress",
    "task",
    "use_executor",
    "wait_on",
    "wait_on_file",
]

# Modules users import by name (the README documents each), and entry points
# run with `python -m`. Everything else is private: an underscore in its path.
PUBLIC_MODULES = [
    "runtime",
    "runtime.elastic",
    "runtime.mpi_rank",
    "store",
    "store.aio",
    "store.backend",
    "store.certs",
    "store.collections",
    "store.compat",
    "store.compat.compss",
    "store.compat.dataclay",
    "store.compat.dataclay.exceptions",
    "store.compat.shim",
    "store.compat.shim.dataclay",
    "store.compat.shim.dataclay.exceptions",
    "store.compat.shim.storage",
    "store.compat.shim.storage.api",
    "store.config",
    "store.dashboard",
    "store.elastic",
    "store.errors",
    "store.hooks",
    "store.logs",
    "store.metrics",
    "store.slurm",
    "store.tracing",
]


def _modules() -> list[str]:
    """Dotted names of every module and package under store/ and runtime/, from the files."""
    names = []
    for top in ("store", "runtime"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, ROOT).split(os.sep)
            for f in sorted(filenames):
                if not f.endswith(".py") or f == "__main__.py":
                    continue
                names.append(".".join(rel if f == "__init__.py" else rel + [f[:-3]]))
    return sorted(names)


def test_store_exports_exactly_the_pinned_names():
    assert sorted(store.__all__) == STORE_ALL
    assert len(set(store.__all__)) == len(store.__all__)


def test_runtime_exports_exactly_the_pinned_names():
    assert sorted(runtime.__all__) == RUNTIME_ALL
    assert len(set(runtime.__all__)) == len(runtime.__all__)


def test_every_exported_name_is_there():
    for package in (store, runtime):
        for name in package.__all__:
            value = getattr(package, name)
            assert value is not None, f"{package.__name__}.{name}"
            # `from store import *` hands out the same objects.
            namespace: dict = {}
            exec(f"from {package.__name__} import {name}", namespace)
            assert namespace[name] is value


def test_exported_callables_and_classes_have_docstrings():
    for package in (store, runtime):
        for name in package.__all__:
            value = getattr(package, name)
            if callable(value) and not isinstance(value, type(store)):
                assert (getattr(value, "__doc__", None) or "").strip(), f"{package.__name__}.{name}"


def test_no_public_module_beyond_the_list():
    public = [m for m in _modules() if not any(part.startswith("_") for part in m.split("."))]
    assert public == sorted(PUBLIC_MODULES)


def test_private_modules_exist_and_import():
    private = [m for m in _modules() if any(part.startswith("_") for part in m.split("."))]
    # The layers of ARCHITECTURE.md, each a private package with modules in it.
    for package in (
        "store._api",
        "store._client",
        "store._directory",
        "store._model",
        "store._ops",
        "store._util",
        "store._wire",
        "store.backend._core",
        "store.backend._engine",
        "store.backend._service",
        "store.backend._storage",
    ):
        assert package in private
        assert any(m.startswith(package + ".") for m in private), package
    for name in private:
        if name.startswith("store._wire.generated") or name.endswith("dask_worker") or name.endswith("_dask_executor"):
            continue  # generated code, and modules of the optional dask extra
        assert importlib.import_module(name).__name__ == name


def test_runtime_reaches_the_store_only_through_public_modules():
    """The task runtime imports store.hooks and other public modules, never a private one."""
    import ast
    import pathlib

    import runtime

    offenders = []
    for path in pathlib.Path(runtime.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "store" and any(p.startswith("_") for p in parts[1:]):
                    offenders.append(f"{path.name}:{node.lineno} {name}")
    assert not offenders, offenders
    import store.hooks

    assert set(store.hooks.__all__) >= {"local_backend", "owner_of", "current_client", "dumps", "loads"}
