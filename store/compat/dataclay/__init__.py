"""dataClay 4's public API on claypot.

An application written for dataClay runs on a claypot cluster after one
import change (``from store.compat.dataclay import ...``), or none at all
when the shim path entry is enabled (see :mod:`store.compat`)::

    from dataclay import Client, DataClayObject, activemethod

    class Employee(DataClayObject):
        name: str
        salary: float

        def __init__(self, name, salary):
            self.name, self.salary = name, salary

        @activemethod
        def get_payroll(self, hours):
            return self.salary * hours

    with Client(host="127.0.0.1", port=6867):
        e = Employee("John", 1000.0)
        e.make_persistent("CEO")
        e.get_payroll(50)            # runs on the backend that holds e

dataClay's semantics carry over: annotated class attributes are the
object's persistent properties (reads and writes go to its backend);
methods decorated with :func:`activemethod` run on the backend; other
methods and attributes stay in the client. Errors are dataClay's
(:mod:`.exceptions`), and every call has an ``a_`` twin for asyncio.
What does not carry over is listed in the README ("Coming from dataClay").
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import uuid as _uuid
from typing import Any

import store
from store import errors as _err
from store._model import objects as _obj
from store._model import objectops as _ops

from . import exceptions
from .exceptions import (
    AliasAlreadyExistError,
    AliasDoesNotExistError,
    BackendDoesNotExistError,
    ObjectIsNotVersionError,
    ObjectNotFound,
    ObjectNotRegisteredError,
)

__version__ = "4.3.1"  # the dataClay API this layer mirrors

DEFAULT_PORT = 6867

# The classes of this module that make up the API; filled in at the end of the module.
_COMPAT_BASES: tuple = ()
_BASE_NAMES = frozenset({"DataClayObject", "AlienDataClayObject", "StubDataClayObject"})


# -- errors -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _as_dataclay(alias: str | None = None, object_id: Any = None):
    """Raise claypot's errors as the dataClay exceptions an application catches."""
    try:
        yield
    except _err.AliasNotFound as exc:
        raise AliasDoesNotExistError(alias or "?") from exc
    except _err.AliasExists as exc:
        raise AliasAlreadyExistError(alias or "?") from exc
    except _err.NotAVersion as exc:
        raise ObjectIsNotVersionError(object_id) from exc
    except _err.NotPersistent as exc:
        raise ObjectNotRegisteredError(object_id) from exc
    except _err.BackendNotFound as exc:
        raise BackendDoesNotExistError(exc.args[0] if exc.args else "?") from exc
    except _err.ObjectNotFound as exc:
        if isinstance(exc, _err.ObjectMoved):
            raise
        raise ObjectNotFound(object_id) from exc


def _id(value) -> str:
    """An object or backend id as claypot spells it (a UUID becomes its hex form)."""
    if isinstance(value, _uuid.UUID):
        return value.hex
    return str(value)


async def _in_thread(fn, *args, **kwargs):
    # The calls are blocking gRPC: run them off the event loop's thread.
    return await asyncio.to_thread(fn, *args, **kwargs)


# -- client -----------------------------------------------------------------------------------


class Client:
    """A session with a claypot cluster, as dataClay's ``Client``.

    ``host``/``port`` name any backend (default ``DC_HOST``/``DC_PORT``, else
    ``CLAYPOT_ADDRESS``, else the cluster ``claypot up`` started). ``token``
    is the cluster token (default ``CLAYPOT_TOKEN``); dataClay's
    ``username``, ``password`` and ``dataset`` are accepted and not used:
    claypot authenticates with the token and has one namespace of aliases.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | str | None = None,
        username: str | None = None,
        password: str | None = None,
        dataset: str | None = None,
        local_backend: str | None = None,
        proxy_host: str | None = None,
        proxy_port: int | str | None = None,
        token: str | None = None,
    ):
        host = host or os.environ.get("DC_HOST")
        port = port or os.environ.get("DC_PORT")
        if port and not host:
            host = "127.0.0.1"
        self.address = f"{host}:{port or DEFAULT_PORT}" if host else None
        self.token = token
        self.dataset = dataset or os.environ.get("DC_DATASET") or exceptions.DEFAULT_DATASET
        self.username = username
        self.local_backend = local_backend
        self.is_active = False
        self._client = None

    def start(self) -> None:
        """Connect this process (idempotent)."""
        if self.is_active:
            return
        self._client = store.connect(self.address, self.token)
        self.is_active = True

    def stop(self) -> None:
        """Disconnect (idempotent)."""
        if not self.is_active:
            return
        store.disconnect(self._client)
        self._client = None
        self.is_active = False

    def get_backends(self) -> dict[str, Any]:
        """The backends that are up: an ordered mapping backend id -> handle."""
        return store.get_backends()

    async def a_get_backends(self) -> dict[str, Any]:
        return await _in_thread(self.get_backends)

    def __enter__(self) -> "Client":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    async def __aenter__(self) -> "Client":
        await _in_thread(self.start)
        return self

    async def __aexit__(self, *exc) -> None:
        await _in_thread(self.stop)


# -- objects ----------------------------------------------------------------------------------


def activemethod(func: Any) -> Any:
    """Mark a method to run on the object's backend once the object is persistent.

    Methods without it run in the caller's process (reading and writing the
    object's annotated properties remotely), as in dataClay.
    """
    func._dc_activemethod = True
    return func


class _HybridMethod:
    """A method that works on the class and on an instance (dataClay's delete_alias)."""

    def __init__(self, fn):
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj, cls):
        target = obj if obj is not None else cls
        return self.fn.__get__(target, cls)


def _annotations(klass) -> dict:
    try:
        return inspect.get_annotations(klass)
    except Exception:  # an annotation that does not evaluate: names still count
        return dict(klass.__dict__.get("__annotations__", {}))


class DataClayObject(_obj.StorageObject):
    """Base class of dataClay objects: annotated attributes persist, ``@activemethod``
    methods run remotely (see the module docstring)."""

    _dc_properties: frozenset = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("__claypot_proxy__"):
            return
        names: set[str] = set()
        for klass in cls.__mro__:
            if (
                klass is object
                or klass is _obj.StorageObject
                or (klass.__module__ == __name__ and klass.__qualname__ in _BASE_NAMES)
            ):
                continue
            names.update(n for n in _annotations(klass) if not n.startswith("_dc_"))
        cls._dc_properties = frozenset(names)

    # -- what persists and what runs where --------------------------------------------------
    def __getstate__(self):
        props = type(self)._dc_properties
        return {k: v for k, v in self.__dict__.items() if k in props or k == _ops.VERSION_KEY}

    @classmethod
    def __claypot_proxy_namespace__(cls, ns: dict, members: dict) -> None:
        for name, value in members.items():
            if any(vars(base).get(name) is value for base in _COMPAT_BASES):
                ns.pop(name, None)  # the compatibility API itself runs here
            elif isinstance(value, property) or not getattr(value, "_dc_activemethod", False):
                ns[name] = value  # not an active method: runs in the caller
        for prop in cls._dc_properties:
            ns[prop] = _obj.remote_attribute(prop)
        ns["__setattr__"] = object.__setattr__  # properties are descriptors; the rest is local
        ns["__delattr__"] = object.__delattr__
        ns["__getattr__"] = _local_getattr

    # -- identity -----------------------------------------------------------------------------
    @property
    def is_registered(self) -> bool:
        """Whether the object is persistent (dataClay's name)."""
        return self.is_persistent

    @property
    def backends(self) -> set:
        """The backends that hold the object (one: claypot has no replicas yet)."""
        owner = self.__dict__.get(_obj._OWNER)
        return {owner} if owner else set()

    @property
    def _dc_master_backend_id(self):
        return self.__dict__.get(_obj._OWNER)

    def sync(self) -> None:
        """Fetch the object's metadata (its current backend) from the cluster."""
        if not self.is_persistent:
            raise ObjectNotRegisteredError(None)
        with _as_dataclay(object_id=self.getID()):
            _obj.get_dispatcher().locate(self)

    # -- persistence --------------------------------------------------------------------------
    def make_persistent(self, alias: str | None = None, backend_id: Any = None, recursive: bool = True) -> None:
        """Store the object (and the dataClay objects it references) on a backend.

        On an object that is already persistent, ``backend_id`` moves it and
        ``alias`` adds an alias, as in dataClay. ``recursive=False`` is
        accepted; referenced objects go along anyway (a persistent object
        cannot reference one that lives only in a client).
        """
        if self.is_persistent:
            if backend_id is not None:
                self.move(backend_id)
            if alias:
                self.add_alias(alias)
            return
        volatile = {
            k: v
            for k, v in self.__dict__.items()
            if k not in type(self)._dc_properties and not k.startswith(_obj._PREFIX)
        }
        with _as_dataclay(alias=alias):
            _obj.get_dispatcher().make_persistent([self], alias, _id(backend_id) if backend_id is not None else None)
        self.__dict__.update(volatile)  # dataClay keeps what does not persist in the client

    def dc_put(self, alias: str, backend_id: Any = None) -> None:
        """make_persistent with a required alias (dataClay's object-store style)."""
        if not alias:
            raise AttributeError("dc_put needs an alias")
        self.make_persistent(alias, backend_id)

    @classmethod
    def get_by_id(cls, object_id: Any) -> Any:
        """The persistent object with this id (its one proxy in this process)."""
        oid = _id(object_id)
        with _as_dataclay(object_id=oid):
            return _obj.get_dispatcher().get_by_id(oid)

    @classmethod
    def get_by_alias(cls, alias: str, dataset_name: str | None = None) -> Any:
        """The persistent object with this alias. Raises AliasDoesNotExistError."""
        with _as_dataclay(alias=alias):
            return _obj.get_dispatcher().get_by_alias(alias)

    def add_alias(self, alias: str) -> None:
        """One more alias for this object. Raises AliasAlreadyExistError."""
        with _as_dataclay(alias=alias, object_id=self.getID()):
            super().add_alias(alias)

    def get_aliases(self) -> set[str]:
        """Every alias of this object."""
        with _as_dataclay(object_id=self.getID()):
            return super().get_aliases()

    @_HybridMethod
    def delete_alias(cls_or_self: Any, alias: str, dataset_name: str | None = None) -> None:
        """Remove an alias (on the class, like dataClay, or on an instance); removing one
        that does not exist does nothing."""
        try:
            _obj.get_dispatcher().delete_alias(alias)
        except _err.AliasNotFound:
            pass

    def move(self, backend_id: Any, recursive: bool = False, remotes: bool = True) -> None:
        """Move the object to ``backend_id``; with ``recursive``, what it references too
        (with ``remotes=False``, only what lives on the object's current backend)."""
        target = _id(backend_id)
        if not self.is_persistent:
            self.make_persistent(backend_id=target)
            return
        with _as_dataclay(object_id=self.getID()):
            if not recursive:
                _obj.get_dispatcher().move(self, target)
            elif remotes:
                _ops.move_recursive(_obj.get_dispatcher(), self, target)
            else:
                client = _obj.get_dispatcher()
                here = client.locate(self)
                for obj in _ops.reachable(client, self):
                    if client.locate(obj) == here:
                        client.move(obj, target)

    def new_version(self, backend_id: Any = None, recursive: bool = False) -> Any:
        """A persistent copy to change in isolation; ``consolidate_version`` writes it back."""
        with _as_dataclay(object_id=self.getID()):
            if not self.is_persistent:
                raise _err.NotPersistent("not persistent")
            return _ops.new_version(_obj.get_dispatcher(), self, _id(backend_id) if backend_id is not None else None)

    def consolidate_version(self) -> None:
        """Write this version into its original (which keeps its id and aliases)."""
        with _as_dataclay(object_id=self.getID()):
            if not self.is_persistent:
                raise _err.NotPersistent("not persistent")
            _ops.consolidate_version(_obj.get_dispatcher(), self)

    def new_replica(self, backend_id: Any = None, recursive: bool = True, remotes: bool = True) -> None:
        """One more replica of this object (and, with ``recursive``, of every persistent
        object reachable from it), on ``backend_id`` or on a backend of another host.

        Unlike dataClay's copies, claypot's replicas are consistent: the primary
        ships every change to them before acknowledging it, changing calls
        always run on the primary, and a replica takes over when the primary is
        lost (README "Replicas"). ``remotes`` is accepted for compatibility.
        """
        with _as_dataclay(object_id=self.getID()):
            if not self.is_persistent:
                raise _err.NotPersistent("not persistent")
            client = _obj.get_dispatcher()
            target = _id(backend_id) if backend_id is not None else None
            objs = list(_ops.reachable(client, self)) if recursive else [self]
            for obj in objs:
                client.add_replica(obj, target)

    # -- properties as a dict; get / put / update -----------------------------------------------
    def get_properties(self) -> dict[str, Any]:
        """The object's persistent properties and their values."""
        if not self.is_persistent:
            return {k: v for k, v in self.__dict__.items() if k in type(self)._dc_properties}
        client = _obj.get_dispatcher()
        with _as_dataclay(object_id=self.getID()):
            state = _ops._run(client, client.locate(self), _ops._state_of, self)
        return {k: v for k, v in state.items() if k in type(self)._dc_properties}

    def dc_update_properties(self, new_properties: dict[str, Any]) -> None:
        """Set several properties."""
        for name, value in new_properties.items():
            setattr(self, name, value)

    def dc_clone(self, recursive: bool = False) -> Any:
        """A local (not persistent) copy of the object's properties."""
        cls = _obj.real_class(self)
        clone = cls.__new__(cls)
        clone.__dict__.update(self.get_properties())
        return clone

    @classmethod
    def dc_clone_by_alias(cls, alias: str, recursive: bool = False) -> Any:
        return cls.get_by_alias(alias).dc_clone(recursive)

    def dc_update(self, from_object: Any) -> None:
        """Copy ``from_object``'s properties into this object."""
        self.dc_update_properties(from_object.get_properties())

    @classmethod
    def dc_update_by_alias(cls, alias: str, from_object: Any) -> None:
        cls.get_by_alias(alias).dc_update(from_object)

    # COMPSs storage API names (store.compat.compss)
    makePersistent = make_persistent
    getByID = get_by_id

    # -- asyncio twins --------------------------------------------------------------------------
    async def a_make_persistent(self, alias: str | None = None, backend_id: Any = None, recursive: bool = True) -> None:
        return await _in_thread(self.make_persistent, alias, backend_id, recursive)

    @classmethod
    async def a_get_by_id(cls, object_id: Any) -> Any:
        return await _in_thread(cls.get_by_id, object_id)

    @classmethod
    async def a_get_by_alias(cls, alias: str, dataset_name: str | None = None) -> Any:
        return await _in_thread(cls.get_by_alias, alias, dataset_name)

    async def a_add_alias(self, alias: str) -> None:
        return await _in_thread(self.add_alias, alias)

    async def a_get_aliases(self) -> Any:
        return await _in_thread(self.get_aliases)

    @_HybridMethod
    async def a_delete_alias(cls_or_self: Any, alias: str, dataset_name: str | None = None) -> None:
        return await _in_thread(cls_or_self.delete_alias, alias, dataset_name)

    async def a_move(self, backend_id: Any, recursive: bool = False, remotes: bool = True) -> None:
        return await _in_thread(self.move, backend_id, recursive, remotes)

    async def a_new_version(self, backend_id: Any = None, recursive: bool = False) -> Any:
        return await _in_thread(self.new_version, backend_id, recursive)

    async def a_consolidate_version(self) -> None:
        return await _in_thread(self.consolidate_version)

    async def a_new_replica(self, backend_id: Any = None, recursive: bool = True, remotes: bool = True) -> None:
        return await _in_thread(self.new_replica, backend_id, recursive, remotes)

    async def a_sync(self) -> None:
        return await _in_thread(self.sync)

    async def a_get_properties(self) -> Any:
        return await _in_thread(self.get_properties)

    async def a_dc_update_properties(self, new_properties: Any) -> None:
        return await _in_thread(self.dc_update_properties, new_properties)


def _local_getattr(self, name):
    # dataClay: an attribute that is not a property lives in the client only.
    raise AttributeError(
        f"{type(self).__qualname__!r} object has no attribute {name!r} "
        f"(only annotated attributes are stored with the object)"
    )


# -- alien objects ----------------------------------------------------------------------------

_ALIEN_DUNDERS = ("__len__", "__getitem__", "__setitem__", "__delitem__", "__contains__", "__str__")


class AlienDataClayObject(DataClayObject):
    """Any picklable value as a dataClay object: ``AlienDataClayObject(value)``.

    The result's type is ``AlienDataClayObject[module.Type]``; once persistent,
    the value's public methods (and len, indexing, ``in``, str) run on the
    backend, and its attributes are read there.
    """

    _dc_base_object: Any
    _types: dict = {}

    def __new__(cls, value=None, *args, **kwargs):
        if cls is not AlienDataClayObject:
            return super().__new__(cls)
        obj = object.__new__(cls[type(value)])
        obj.__dict__["_dc_base_object"] = value
        return obj

    def __init__(self, value=None):
        pass  # the value was taken in __new__

    def __class_getitem__(cls, base: type) -> type:
        hit = AlienDataClayObject._types.get(base)
        if hit is not None:
            return hit
        ns: dict[str, Any] = {
            "__module__": __name__,
            "__qualname__": f"AlienDataClayObject[{base.__module__}.{base.__qualname__}]",
        }
        for name in dir(base):
            member = getattr(base, name, None)
            if not callable(member) or (name.startswith("_") and name not in _ALIEN_DUNDERS):
                continue
            ns[name] = activemethod(_delegate(name))
        alien = type(ns["__qualname__"], (AlienDataClayObject,), ns)
        return AlienDataClayObject._types.setdefault(base, alien)

    def __getstate__(self):
        return {"_dc_base_object": self.__dict__.get("_dc_base_object")}

    @activemethod
    def _dc_get(self, name):
        return getattr(self.__dict__["_dc_base_object"], name)

    @activemethod
    def _dc_value(self):
        return self.__dict__["_dc_base_object"]

    def __iter__(self):
        return iter(self._dc_value())

    @classmethod
    def __claypot_proxy_namespace__(cls, ns: dict, members: dict) -> None:
        DataClayObject.__claypot_proxy_namespace__.__func__(cls, ns, members)
        ns.pop("_dc_base_object", None)
        ns["_dc_get"] = _obj.remote_method("_dc_get")
        ns["_dc_value"] = _obj.remote_method("_dc_value")
        ns["__getattr__"] = _alien_getattr

    def __getattr__(self, name):
        if name.startswith("__") or name == "_dc_base_object":
            raise AttributeError(name)
        return getattr(self.__dict__["_dc_base_object"], name)


def _delegate(name: str):
    def method(self, *args, **kwargs):
        return getattr(self.__dict__["_dc_base_object"], name)(*args, **kwargs)

    method.__name__ = name
    return method


def _alien_getattr(self, name):
    if name.startswith("_"):
        raise AttributeError(name)
    return self._dc_get(name)


# -- stubs ------------------------------------------------------------------------------------


class _StubMeta(type):
    def __getitem__(cls, name: str) -> type:
        client = _obj.get_dispatcher()
        with _as_dataclay():
            return _ops.stub_class(client, name, base=StubDataClayObject)


class StubDataClayObject(DataClayObject, metaclass=_StubMeta):
    """``StubDataClayObject["module.Class"]``: a class for objects of a class this
    process does not have; its members come from the cluster. Instances are made
    on a backend (a stub is always remote)."""


_COMPAT_BASES = (DataClayObject, AlienDataClayObject, StubDataClayObject)

for _cls in (DataClayObject, Client):
    for _name, _value in list(vars(_cls).items()):
        if _name.startswith("a_"):
            _fn = _value.__func__ if isinstance(_value, classmethod) else getattr(_value, "fn", _value)
            if not _fn.__doc__:
                _fn.__doc__ = f"Async twin of :meth:`{_name[2:]}` (awaitable; runs off the loop)."
            if isinstance(_value, _HybridMethod):
                _value.__doc__ = _fn.__doc__

StorageObject = DataClayObject

__all__ = [
    "Client",
    "DataClayObject",
    "AlienDataClayObject",
    "StubDataClayObject",
    "activemethod",
    "StorageObject",
    "exceptions",
]
