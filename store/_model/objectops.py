"""Operations on persistent objects built from calls and tasks: versions,
recursive moves, the references of an object, and proxies by class name.

Each runs through the ordinary call path (one object's lock, its log, its
re-routing after a move), so it inherits the store's durability and needs no
backend support of its own beyond the task runner.

Versions
    ``new_version(obj, backend=None)`` copies the object's state (as its
    ``__getstate__`` gives it) into a new object of the same class, on
    ``backend`` or the original's backend; the copy records which object it
    is a version of. ``consolidate_version(version)`` writes the version's
    state into that object (and into every version between them), deletes
    the version, and turns the version's proxy into a proxy of the original,
    which keeps its id and aliases. The record of the original travels inside
    the version's state under ``VERSION_KEY``: a class whose ``__getstate__``
    drops unknown keys loses it once the version leaves memory, and
    consolidating then raises NotAVersion (documented in the README).

Stubs
    ``stub_class("module.Class")`` builds a proxy class for a class registered
    in the cluster that this process cannot import: its method and property
    names are asked from a backend, which holds the class.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from store._model import objects as objmod
from store.errors import ClassNotFound, NotAVersion, NotPersistent

VERSION_KEY = "__claypot_version_of__"


# -- run on a backend (tasks) ----------------------------------------------------------


def _state_of(obj) -> Any:
    """Task: the state of ``obj`` as its ``__getstate__`` gives it (a remote call when
    the object lives elsewhere, a plain call on its own backend)."""
    return objmod.get_dispatcher().call(obj, objmod.METHOD, "__getstate__", (), {})


def _replace_state(obj, state) -> None:
    """Task: give ``obj`` exactly ``state`` (under its lock, logged like any change)."""
    objmod.get_dispatcher().call(obj, objmod.METHOD, "__setstate__", (state,), {})


def _version_of(obj) -> str:
    """Task: the id of the object ``obj`` is a version of ("" for none)."""
    state = _state_of(obj)
    return state.get(VERSION_KEY, "") if isinstance(state, dict) else ""


def _references(obj) -> list[tuple[str, str, str]]:
    """Task: (id, class key, owner) of each persistent object ``obj``'s state names."""
    return references_in(_state_of(obj))


def _class_members(name: str) -> tuple[str, dict[str, str]]:
    """Task: (code key, {member: "method" | "readonly" | "property"}) of a registered class."""
    heap = objmod.get_dispatcher().local
    if heap is None:
        raise ClassNotFound("class metadata is read on a backend")
    key = resolve_class_name(heap.directory.code_keys(), name)
    cls = heap.code.get(key)
    kinds: dict[str, str] = {}
    for member in getattr(cls, "_dc_properties", ()):
        kinds[member] = "property"  # a dataClay-style annotated attribute
    api = [k for k in cls.__mro__ if k.__module__.split(".")[0] == "store"]
    for member, value in objmod.remote_members(cls).items():
        if any(vars(k).get(member) is value for k in api):
            continue  # claypot's own API (a compatibility base class): runs in the caller
        if isinstance(value, property):
            kinds[member] = "property"
        else:
            kinds[member] = "readonly" if getattr(value, "__claypot_readonly__", False) else "method"
    return key, kinds


def _construct(key: str, args: tuple, kwargs: dict):
    """Task: a new object of the registered class ``key``, made here; it is returned as a
    reference, which makes it persistent on this backend."""
    heap = objmod.get_dispatcher().local
    if heap is None:
        raise ClassNotFound("objects of a stub class are made on a backend")
    return heap.code.get(key)(*args, **kwargs)


# -- helpers ---------------------------------------------------------------------------------


def references_in(value: Any) -> list[tuple[str, str, str]]:
    """(id, class key, owner) of each persistent object reachable in ``value``, once each.

    Walks ``value`` with a pickler that stops at every StorageObject (its
    state is not followed: that is the object's own business) and keeps
    large buffers out of band, so nothing big is copied.
    """
    found: dict[str, tuple[str, str, str]] = {}

    class Walker(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, objmod.StorageObject):
                oid = obj.getID()
                if oid is None:
                    raise NotPersistent(f"{type(obj).__name__} object is not persistent")
                found.setdefault(oid, (oid, obj.__dict__.get(objmod._KEY, ""), obj.__dict__.get(objmod._OWNER, "")))
                return oid
            return None

    Walker(io.BytesIO(), protocol=5, buffer_callback=lambda _buf: False).dump(value)
    return list(found.values())


def resolve_class_name(keys: list[str], name: str) -> str:
    """The registry key of ``name``: a key, "module.Class", "module:Class" or "Class"."""
    if name in keys:
        return name
    wanted = {name}
    if ":" not in name and "." in name:
        module, _, qual = name.rpartition(".")
        wanted.add(f"{module}:{qual}")
    matches = sorted(
        {k for k in keys if k.split("#", 1)[0] in wanted or k.split("#", 1)[0].split(":", 1)[-1] in wanted}
    )
    if not matches:
        raise ClassNotFound(f"no class {name!r} in the cluster's code registry")
    if len(matches) > 1:
        raise ClassNotFound(
            f"class name {name!r} matches {len(matches)} registered versions; pass one key: {', '.join(matches)}"
        )
    return matches[0]


def _run(client, backend_id: str, fn, *args, mutates: list[str] | None = None):
    return client.run_task(backend_id, client.register_code(fn), args, {}, mutates or [])


def _owner(client, proxy) -> str:
    oid = proxy.getID()
    if oid is None:
        raise NotPersistent(f"{type(proxy).__name__} object is not persistent")
    return proxy.__dict__.get(objmod._OWNER) or client.locate(proxy)


def _fresh_instance(proxy):
    cls = objmod.real_class(proxy)
    if getattr(cls, "__claypot_stub__", None):
        raise ClassNotFound(
            f"{cls.__qualname__} is a stub (no local code): new_version needs the class in this process"
        )
    return cls.__new__(cls)


# -- versions -------------------------------------------------------------------------------


def new_version(client: Any, proxy: objmod.StorageObject, backend: str | None = None) -> Any:
    """A new object holding a copy of ``proxy``'s state, that records it is its version."""
    owner = _owner(client, proxy)
    state = _run(client, owner, _state_of, proxy)
    version = _fresh_instance(proxy)
    version.__setstate__(state)
    if isinstance(state, dict):
        version.__dict__[VERSION_KEY] = proxy.getID()
    client.make_persistent([version], None, backend or owner)
    version.__dict__["_claypot_version_of"] = proxy.getID()
    return version


def version_of(client: Any, proxy: objmod.StorageObject) -> str:
    """Id of the object ``proxy`` is a version of; NotAVersion if it is none."""
    oid = proxy.__dict__.get("_claypot_version_of")
    if not oid:
        oid = _run(client, _owner(client, proxy), _version_of, proxy)
    if not oid:
        raise NotAVersion(f"Object {proxy.getID()} is not a version!")
    return oid


def consolidate_version(client: Any, proxy: objmod.StorageObject) -> None:
    """Write a version's state into the object it is a version of (and the versions
    between them); delete the version; ``proxy`` then stands for the original."""
    parent = version_of(client, proxy)
    state = _run(client, _owner(client, proxy), _state_of, proxy)
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if k != VERSION_KEY}
    chain = []
    while parent:
        target = client.get_by_id(parent)
        chain.append(target)
        try:
            parent = version_of(client, target)
        except NotAVersion:
            parent = ""
    for target in chain:
        target_state = state
        if target is not chain[-1] and isinstance(state, dict):
            # An intermediate version stays a version of its own parent.
            target_state = dict(state, **{VERSION_KEY: version_of(client, target)})
        owner = _owner(client, target)
        _run(client, owner, _replace_state, target, target_state, mutates=[target.getID()])
    client.delete_persistent(proxy)
    original = chain[-1]
    d = proxy.__dict__
    d.pop("_claypot_version_of", None)
    d[objmod._ID] = original.getID()
    d[objmod._OWNER] = original.__dict__.get(objmod._OWNER, "")


# -- recursive move ---------------------------------------------------------------------------


def reachable(client: Any, proxy: objmod.StorageObject) -> list:
    """``proxy`` and every persistent object reachable from it (cycles followed once)."""
    seen = {proxy.getID(): proxy}
    queue = [proxy]
    while queue:
        obj = queue.pop()
        for oid, key, owner in _run(client, _owner(client, obj), _references, obj):
            if oid not in seen:
                ref = client.get_by_id(oid)
                seen[oid] = ref
                queue.append(ref)
    return list(seen.values())


def move_recursive(client: Any, proxy: objmod.StorageObject, backend_id: str) -> int:
    """Move ``proxy`` and everything reachable from it to ``backend_id``; returns how many
    objects moved (those already there stay)."""
    moved = 0
    for obj in reachable(client, proxy):
        if client.locate(obj) != backend_id:
            client.move(obj, backend_id)
            moved += 1
    proxy.__dict__[objmod._OWNER] = backend_id
    return moved


# -- stubs --------------------------------------------------------------------------------------


def _stub_placeholder(name: str, readonly: bool):
    def method(self, *args, **kwargs):
        raise NotPersistent(
            f"{name}: a stub class has no local code; get an object with get_by_alias or get_by_id and call it there"
        )

    method.__name__ = name
    if readonly:
        method.__claypot_readonly__ = True
    method._dc_activemethod = True  # remote under dataClay semantics too
    return method


def stub_class(client: Any, name: str, base: type | None = None) -> type:
    """A class standing for the registered class ``name`` whose proxies call the cluster.

    ``name`` is "module.Class", "module:Class", "Class" or a registry key.
    The members come from a backend; the class is cached per key, and
    ``client.class_for_key`` returns it for objects of that class.
    """
    backend = client._choose_backend()
    key, kinds = _run(client, backend, _class_members, name)
    base = base or objmod.StorageObject
    cached = client._classes.get(key)
    if cached is not None and isinstance(cached, type) and issubclass(cached, base):
        return cached
    module, _, qual = key.split("#", 1)[0].partition(":")

    def __new__(cls, *args, **kwargs):
        # A stub has no code here: the object is made on a backend, and this is its proxy.
        return _run(client, client._choose_backend(), _construct, key, args, kwargs)

    def __init__(self, *args, **kwargs):
        pass  # the constructor ran on the backend

    ns: dict[str, Any] = {
        "__module__": module,
        "__qualname__": qual,
        "__claypot_stub__": key,
        "__new__": __new__,
        "__init__": __init__,
    }
    annotations: dict[str, Any] = {}
    for member, kind in kinds.items():
        if kind != "property":
            ns[member] = _stub_placeholder(member, kind == "readonly")
        elif base is objmod.StorageObject:
            ns[member] = property(lambda self: None, lambda self, value: None)
        else:
            annotations[member] = Any  # a base with dataClay semantics: a remote property
    ns["__annotations__"] = annotations
    stub = type(qual.rpartition(".")[2], (base,), ns)
    client._classes[key] = stub
    return stub
