"""Old module names (the flat layout's store.client, store.backend.heap, runtime.core, ...)
still import, as the very same module objects (store/_legacy.py).

Applications import them, and pickles written by older versions name classes
and functions by these module paths. Each check that depends on a fresh
interpreter (what an old name does on first import) runs in a subprocess.
"""

import importlib
import pickle
import subprocess
import sys
import textwrap

import pytest

import store
from store import _legacy


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("old", sorted(_legacy.MOVED))
def test_old_name_is_the_new_module(old):
    new = importlib.import_module(_legacy.MOVED[old])
    assert importlib.import_module(old) is new
    assert sys.modules[old] is new
    # The module keeps its own identity: name and spec are the new ones.
    assert new.__name__ == _legacy.MOVED[old]
    assert new.__spec__.name == _legacy.MOVED[old]


def test_every_old_name_in_a_fresh_interpreter():
    out = _run(f"""
        import importlib, sys
        names = {sorted(_legacy.MOVED)!r}
        for old in names:
            mod = importlib.import_module(old)
            assert mod.__name__ != old and sys.modules[old] is mod, old
        print(len(names))
    """)
    assert int(out) == len(_legacy.MOVED)


def test_names_under_a_moved_package_are_not_loaded_twice():
    from store._wire.generated import claypot_pb2
    import store.generated.claypot_pb2 as old  # protobuf refuses a second registration

    assert old is claypot_pb2
    assert _legacy.new_name("store.generated.claypot_pb2_grpc") == "store._wire.generated.claypot_pb2_grpc"
    assert _legacy.new_name("store.errors") is None
    assert _legacy.new_name("store.clientele") is None


def test_from_old_module_import_gives_the_same_objects():
    from store.backend.heap import Heap
    from store.client import Client
    from store.objects import StorageObject
    from runtime.core import current
    from store._client.client import Client as NewClient
    from store.backend._engine.heap import Heap as NewHeap
    from runtime._core import current as new_current

    assert Client is NewClient and Heap is NewHeap and current is new_current
    assert StorageObject is store.StorageObject


def test_monkeypatching_an_old_name_reaches_the_moved_module(monkeypatch):
    import store.backend._storage.storage as new

    monkeypatch.setattr("store.backend.storage.read_backend_id", lambda path: "patched")
    assert new.read_backend_id("/nowhere") == "patched"
    # store.client by its old module name (store.client the attribute is the function
    # store.client(), as before the move, so the module comes from the import system).
    old = importlib.import_module("store.client")
    marker = object()
    monkeypatch.setattr(old, "CHANNEL_OPTIONS", marker)
    import store._client.client as moved

    assert moved.CHANNEL_OPTIONS is marker
    from store.client import CHANNEL_OPTIONS

    assert CHANNEL_OPTIONS is marker


def test_old_names_that_are_also_functions_stay_functions():
    # store.client() and runtime.progress() are functions of the public surface;
    # importing the old module names must not replace them (as before the move).
    out = _run("""
        import store, runtime
        client, progress = store.client, runtime.progress
        import store.client
        import runtime.progress
        from store.client import Client
        assert store.client is client and callable(store.client), store.client
        assert runtime.progress is progress, runtime.progress
        assert Client.__module__ == "store._client.client"
        print("ok")
    """)
    assert out.strip() == "ok"


def test_old_name_imported_first_in_a_process():
    # `import runtime.core` before anything else: runtime imports store, which
    # installs the finder, before the submodule is looked up.
    out = _run("""
        import runtime.core
        import sys
        assert sys.modules["runtime.core"] is sys.modules["runtime._core"]
        from store.backend.lifecycle import Lifecycle
        print(Lifecycle.__module__)
    """)
    assert out.strip() == "store.backend._core.lifecycle"


def test_pickles_that_name_old_module_paths_load():
    from store._model.objects import load_reference
    from store.backend._core.lifecycle import State

    # Written by an older version: a function and a class by their old module path.
    assert pickle.loads(b"cstore.objects\nload_reference\n.") is load_reference
    assert pickle.loads(b"cstore.backend.lifecycle\nState\n.") is State


@pytest.mark.parametrize("protocol", [0, 2, 4, pickle.HIGHEST_PROTOCOL])
def test_instances_round_trip_and_load_from_old_paths(protocol):
    from store._api.alien import Alien
    from store._directory.replica_set import ReplicaSet
    from store.backend._core.lifecycle import State

    for value in (ReplicaSet(3, "b1", ("b2", "b3"), 2), State.SPILLED, Alien):
        data = pickle.dumps(value, protocol=protocol)
        assert pickle.loads(data) == value
        # The same pickle as an older version wrote it (the module path is
        # plain text only in protocol 0; the others length-prefix it).
        module = value.__module__ if isinstance(value, type) else type(value).__module__
        old_module = next(o for o, n in _legacy.MOVED.items() if n == module)
        if protocol == 0:
            old = data.replace(module.encode(), old_module.encode())
            assert old != data
            assert pickle.loads(old) == value
        else:
            old = pickle.dumps(value, protocol=0).replace(module.encode(), old_module.encode())
            assert pickle.loads(pickle.dumps(pickle.loads(old), protocol=protocol)) == value


def test_python_m_with_an_old_name_runs_the_moved_module():
    proc = subprocess.run([sys.executable, "-m", "store.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: claypot" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "store.backend", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--data-dir" in proc.stdout
