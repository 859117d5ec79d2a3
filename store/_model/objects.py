"""StorageObject, the base class of persistent objects, and its proxies.

An object that is not persistent is a plain Python object. ``make_persistent``
ships its state to a backend and turns the local instance into a *proxy*: its
class becomes a generated subclass whose methods, attribute reads and writes
are calls to the owning backend. The backend holds the real instance (of the
user's class itself, so code running there pays nothing for being persistent).

Anything that dispatches proxy operations (the client in an application, the
backend's local dispatcher inside a backend) implements :class:`Dispatcher`
and is installed with :func:`set_dispatcher`.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Any, Callable, Iterator, Protocol

from store.errors import AlreadyPersistent, ClassNotFound, ConfigurationError, NotPersistent
from store._wire.serialization import current_pickle_context, current_unpickle_context

_ID = "_claypot_id"
_KEY = "_claypot_class_key"
_OWNER = "_claypot_backend"
_PREFIX = "_claypot_"

METHOD, GET_ATTR, SET_ATTR, DEL_ATTR = 0, 1, 2, 3


class Dispatcher(Protocol):
    def call(self, proxy: StorageObject, kind: int, name: str, args: tuple, kwargs: dict) -> Any: ...
    def make_persistent(self, objs: list, alias: str | None, backend: str | None) -> None: ...
    def delete_persistent(self, proxy: StorageObject) -> None: ...
    def move(self, proxy: StorageObject, backend_id: str) -> None: ...
    def locate(self, proxy: StorageObject) -> str: ...
    def get_by_alias(self, alias: str) -> None: ...
    def get_by_id(self, object_id: str) -> None: ...
    def class_for_key(self, key: str) -> type: ...
    def upgrade_class(self, proxy: StorageObject, cls: type) -> None: ...


_dispatcher: Dispatcher | None = None
# A backend embedded in another process (store._ops.inproc) cannot install itself
# process-wide: the process's own client is there already. Its servicer calls
# run with the backend's dispatcher in this context variable instead, which
# wins over the process-wide one while it is set (see dispatching()).
_local_dispatcher: contextvars.ContextVar[Dispatcher | None] = contextvars.ContextVar(
    "claypot_dispatcher", default=None
)
_listeners: list[Callable[[Dispatcher | None], None]] = []


def set_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Install what proxies in this process call through (None to disconnect)."""
    global _dispatcher
    changed = dispatcher is not _dispatcher
    _dispatcher = dispatcher
    if changed:
        for listener in list(_listeners):
            listener(dispatcher)


def on_dispatcher_change(listener: Callable[[Dispatcher | None], None]) -> None:
    """Call ``listener(new)`` whenever this process connects elsewhere or disconnects.

    The task runtime uses it to settle the futures of the old connection.
    """
    _listeners.append(listener)


@contextlib.contextmanager
def dispatching(dispatcher: Dispatcher) -> Iterator[None]:
    """Make proxies in the current context (this thread, this task) call through ``dispatcher``.

    What a backend embedded in another process uses while it serves a call:
    code running there reaches other objects as the backend would, while the
    rest of the process keeps the dispatcher :func:`set_dispatcher` installed.
    A backend in a process of its own never needs it.
    """
    token = _local_dispatcher.set(dispatcher)
    try:
        yield
    finally:
        _local_dispatcher.reset(token)


def get_dispatcher() -> Dispatcher:
    """What proxies call through here: the context's (see :func:`dispatching`), else the process's."""
    local = _local_dispatcher.get()
    if local is not None:
        return local
    if _dispatcher is None:
        raise ConfigurationError("not connected to a claypot cluster: call store.connect() or use store.LocalCluster()")
    return _dispatcher


def has_dispatcher() -> bool:
    """Whether :func:`get_dispatcher` has something to return."""
    return _local_dispatcher.get() is not None or _dispatcher is not None


def readonly(method: Any) -> Any:
    """Declare that a method does not change its object.

    A read-only method's call is never logged nor checkpointed, which keeps
    reads as cheap as the ``none`` durability policy. Declaring a method that
    does change its object read-only loses that change on a crash.
    """
    method.__claypot_readonly__ = True
    return method


class StorageObject:
    """Base class of objects that can live on a claypot backend.

    Subclass it, create instances as usual, then ``make_persistent()``. From
    then on every method defined by the subclass (public, private, and the
    dunders it defines) runs on the owning backend, and attribute reads and
    writes go there too.
    """

    # -- identity ------------------------------------------------------------
    def getID(self) -> str | None:
        """The object id, or None while the object is not persistent."""
        return self.__dict__.get(_ID)

    @property
    def is_persistent(self) -> bool:
        return self.__dict__.get(_ID) is not None

    # -- lifecycle -------------------------------------------------------------
    def make_persistent(
        self, alias: str | None = None, backend: str | None = None, replicas: int | None = None
    ) -> None:
        """Place this object on a backend (any, or ``backend`` by id), under ``alias``.

        StorageObjects it references that are not persistent go with it, to
        the same backend. Afterwards this instance is a proxy. ``replicas``
        keeps that many synchronous replicas of it on other backends (other
        hosts first); default: the class's ``claypot_replicas``, else the
        cluster's ``CLAYPOT_REPLICAS`` (README "Replicas").
        """
        if self.__dict__.get(_ID) is not None:
            raise AlreadyPersistent(f"object {self.getID()} is already persistent")
        if replicas is None:
            get_dispatcher().make_persistent([self], alias, backend)
        else:
            get_dispatcher().make_persistent([self], alias, backend, replicas=replicas)

    def add_replica(self, backend_id: str | None = None) -> str:
        """Keep one more synchronous replica of this object (on ``backend_id``, or on a
        backend of another host); returns the backend that holds it."""
        _require_persistent(self)
        return get_dispatcher().add_replica(self, backend_id)

    def call_on_replica(self, enabled: bool = True) -> StorageObject:
        """Let read-only calls and attribute reads on this proxy run on a replica.

        Changing calls still go to the primary. A replica answers with a state
        at most ``heartbeat_ttl`` seconds behind the primary's acknowledged one
        (README "Replicas"); an object without replicas is read on its owner.
        Returns the proxy, so ``obj.call_on_replica().value`` reads.
        """
        _require_persistent(self)
        self.__dict__[_PREFIX + "on_replica"] = bool(enabled)
        return self

    def delete_persistent(self) -> None:
        """Delete the object from the store (and its alias). The proxy becomes unusable."""
        _require_persistent(self)
        get_dispatcher().delete_persistent(self)

    def get_location(self) -> str:
        """Id of the backend that holds the object."""
        _require_persistent(self)
        return get_dispatcher().locate(self)

    def move(self, backend_id: str, recursive: bool = False) -> None:
        """Move the object to another backend; its id and aliases stay the same.

        With ``recursive``, every persistent object reachable from it (references
        of references, cycles followed once) moves too.
        """
        _require_persistent(self)
        if recursive:
            from store._model.objectops import move_recursive

            move_recursive(get_dispatcher(), self, backend_id)
        else:
            get_dispatcher().move(self, backend_id)

    # -- aliases and versions ------------------------------------------------------
    def add_alias(self, alias: str) -> None:
        """Give the object one more alias (it keeps the others). Raises AliasExists."""
        _require_persistent(self)
        get_dispatcher().add_alias(self, alias)

    def get_aliases(self) -> set[str]:
        """Every alias of the object."""
        _require_persistent(self)
        return set(get_dispatcher().get_aliases(self))

    def delete_alias(self, alias: str) -> None:
        """Remove one of the object's aliases. Raises AliasNotFound if it has no such alias."""
        _require_persistent(self)
        if alias not in get_dispatcher().get_aliases(self):
            from store.errors import AliasNotFound

            raise AliasNotFound(f"object {self.getID()} has no alias {alias!r}")
        get_dispatcher().delete_alias(alias)

    def new_version(self, backend: str | None = None) -> Any:
        """A persistent copy of this object that can change in isolation (see
        store._model.objectops); ``consolidate_version()`` writes it back."""
        _require_persistent(self)
        from store._model.objectops import new_version

        return new_version(get_dispatcher(), self, backend)

    def consolidate_version(self) -> None:
        """Write this version into the object it is a version of, and delete the version;
        this proxy then stands for the original. Raises NotAVersion for other objects."""
        _require_persistent(self)
        from store._model.objectops import consolidate_version

        consolidate_version(get_dispatcher(), self)

    def upgrade_class(self, cls: type | None = None) -> None:
        """Run this object with the current definition of its class from now on.

        After a notebook cell redefines a class, new objects use the new code,
        and existing ones keep the version they were made with until upgraded.
        ``cls`` defaults to what the class's name is bound to now in its module
        (``__main__`` in a notebook). The state is kept as it is: a new version
        that expects other attributes must cope with the old ones.
        """
        _require_persistent(self)
        if cls is None:
            import sys

            real = real_class(self)
            cls = sys.modules.get(real.__module__)
            for part in real.__qualname__.split("."):
                cls = getattr(cls, part, None)
            if not isinstance(cls, type):
                raise ClassNotFound(
                    f"no class {real.__qualname__} in module {real.__module__} "
                    f"to upgrade to: pass it, obj.upgrade_class(NewClass)"
                )
        get_dispatcher().upgrade_class(self, cls)

    # COMPSs storage API names
    makePersistent = make_persistent
    deletePersistent = delete_persistent

    @classmethod
    def get_by_alias(cls, alias: str) -> Any:
        """The persistent object with this alias (a proxy)."""
        return get_dispatcher().get_by_alias(alias)

    @classmethod
    def get_by_id(cls, object_id: str) -> Any:
        """The persistent object with this id (a proxy)."""
        return get_dispatcher().get_by_id(object_id)

    getByID = get_by_id

    # -- pickling --------------------------------------------------------------
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith(_PREFIX)}

    def __setstate__(self, state):
        # Replaces the state (keeping claypot's identity fields), so writing a
        # version back into its original drops attributes the version dropped.
        d = self.__dict__
        for key in [k for k in d if not k.startswith(_PREFIX)]:
            del d[key]
        d.update(state)

    def __reduce_ex__(self, protocol):
        oid = self.__dict__.get(_ID)
        if oid is None:
            ctx = current_pickle_context()
            if ctx is None:  # plain pickle outside claypot: an ordinary copy by value
                return object.__reduce_ex__(self, protocol)
            oid, key, owner = ctx.reference_new(self)
        else:
            key, owner = self.__dict__.get(_KEY, ""), self.__dict__.get(_OWNER, "")
        return (load_reference, (oid, key, owner))


def _require_persistent(obj) -> None:
    if obj.__dict__.get(_ID) is None:
        raise NotPersistent(f"{type(obj).__name__} object is not persistent")


def load_reference(object_id: str, class_key: str, backend_id: str) -> Any:
    """Unpickle hook for a reference: a proxy, or whatever the active context makes of it."""
    ctx = current_unpickle_context()
    if ctx is not None:
        return ctx.load_ref(object_id, class_key, backend_id)
    dispatcher = get_dispatcher()
    known = getattr(dispatcher, "proxy_for", None)
    if known is not None:  # one proxy per object in this process (the client's identity map)
        return known(object_id, class_key, backend_id)
    return make_proxy(dispatcher.class_for_key(class_key), object_id, class_key, backend_id)


def attach_identity(obj: Any, object_id: str, class_key: str, backend_id: str) -> None:
    """Mark a real (backend-side) instance with its identity, outside its state."""
    d = obj.__dict__
    d[_ID], d[_KEY], d[_OWNER] = object_id, class_key, backend_id


def make_proxy(cls: type, object_id: str, class_key: str, backend_id: str) -> Any:
    """A new proxy of class ``cls`` for the object ``object_id``."""
    proxy = object.__new__(proxy_class(cls))
    attach_identity(proxy, object_id, class_key, backend_id)
    return proxy


def turn_into_proxy(obj: Any, object_id: str, class_key: str, backend_id: str) -> None:
    """Turn a local instance into a proxy in place: its state now lives elsewhere."""
    cls = type(obj)
    obj.__dict__.clear()
    attach_identity(obj, object_id, class_key, backend_id)
    obj.__class__ = proxy_class(cls)


def is_proxy(obj: Any) -> bool:
    return getattr(type(obj), "__claypot_proxy__", False)


def real_class(obj_or_cls: Any) -> type:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return getattr(cls, "__claypot_real__", cls)


# -- proxy classes ---------------------------------------------------------------

# Dunders that belong to the object model or to pickling, never forwarded.
_LOCAL_DUNDERS = frozenset(
    {
        "__init__",
        "__new__",
        "__init_subclass__",
        "__class_getitem__",
        "__getattr__",
        "__getattribute__",
        "__setattr__",
        "__delattr__",
        "__getstate__",
        "__setstate__",
        "__reduce__",
        "__reduce_ex__",
        "__dict__",
        "__weakref__",
        "__module__",
        "__qualname__",
        "__doc__",
        "__slots__",
        "__annotations__",
        "__classcell__",
        "__firstlineno__",
        "__static_attributes__",
        "__copy__",
        "__deepcopy__",
        "__del__",
        "__set_name__",
        "__subclasshook__",
        "__abstractmethods__",
        "__orig_bases__",
        "__parameters__",
    }
)

_proxy_lock = threading.Lock()
_proxy_classes: dict[type, type] = {}


def remote_members(cls: type) -> dict[str, Any]:
    """Methods and properties of ``cls`` (below StorageObject) that run remotely."""
    members: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass is StorageObject or issubclass(StorageObject, klass):
            continue
        for name, value in vars(klass).items():
            if name in _LOCAL_DUNDERS or (name.startswith(_PREFIX)):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                members.pop(name, None)
                continue
            if isinstance(value, property) or callable(value):
                members[name] = value
            else:
                members.pop(name, None)
    return members


def proxy_class(cls: type) -> type:
    """The proxy subclass of ``cls`` (built once per class)."""
    cls = real_class(cls)
    with _proxy_lock:
        hit = _proxy_classes.get(cls)
        if hit is not None:
            return hit
    ns: dict[str, Any] = {
        "__claypot_proxy__": True,
        "__claypot_real__": cls,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    members = remote_members(cls)
    for name, value in members.items():
        if isinstance(value, property):
            ns[name] = _remote_property(name, value)
        else:
            ns[name] = _remote_method(name, getattr(value, "__claypot_readonly__", False))
    if "__eq__" not in members:
        ns["__eq__"] = _proxy_eq
        ns["__hash__"] = _proxy_hash
    if "__repr__" not in members:
        ns["__repr__"] = _proxy_repr
    ns["__getattr__"] = _proxy_getattr
    ns["__setattr__"] = _proxy_setattr
    ns["__delattr__"] = _proxy_delattr
    shape = getattr(cls, "__claypot_proxy_namespace__", None)
    if shape is not None:
        # A base class with its own proxy semantics (store.compat.dataclay) adjusts
        # which members run remotely.
        shape(ns, members)
    proxy = type(cls.__name__, (cls,), ns)
    with _proxy_lock:
        return _proxy_classes.setdefault(cls, proxy)


def remote_method(name: str, is_readonly: bool = False) -> Any:
    """A proxy method that runs ``name`` on the object's backend."""
    return _remote_method(name, is_readonly)


def remote_attribute(name: str) -> property:
    """A proxy property that reads and writes the attribute ``name`` on the object's backend."""

    def fget(self):
        return get_dispatcher().call(self, GET_ATTR, name, (), {})

    def fset(self, value):
        get_dispatcher().call(self, SET_ATTR, name, (value,), {})

    def fdel(self):
        get_dispatcher().call(self, DEL_ATTR, name, (), {})

    return property(fget, fset, fdel)


class _RemoteMethod:
    """A method of a proxy class: calling it runs the method on the object's backend."""

    __slots__ = ("__name__", "__claypot_readonly__")

    def __init__(self, name: str, is_readonly: bool):
        self.__name__ = name
        self.__claypot_readonly__ = is_readonly

    def __get__(self, obj, cls=None):
        return self if obj is None else BoundRemote(obj, self.__name__)


class BoundRemote:
    """A proxy's method, bound: ``obj.incr(2)`` blocks; ``await obj.incr.aio(2)`` does not."""

    __slots__ = ("__self__", "__name__")

    def __init__(self, obj, name: str):
        self.__self__ = obj
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        return get_dispatcher().call(self.__self__, METHOD, self.__name__, args, kwargs)

    def aio(self, *args: Any, **kwargs: Any) -> Any:
        """The same call as a coroutine, on grpc's asyncio channels (see store.aio)."""
        from store import aio

        return aio.client().call(self.__self__, METHOD, self.__name__, args, kwargs)

    def __repr__(self):
        return f"<remote method {self.__name__} of {self.__self__!r}>"


def _remote_method(name: str, is_readonly: bool):
    return _RemoteMethod(name, is_readonly)


def _remote_property(name: str, prop: property):
    def fget(self):
        return get_dispatcher().call(self, GET_ATTR, name, (), {})

    def fset(self, value):
        get_dispatcher().call(self, SET_ATTR, name, (value,), {})

    return property(fget, fset if prop.fset is not None else None, doc=prop.__doc__)


def _proxy_getattr(self, name):
    if name.startswith("__") or name.startswith(_PREFIX):
        raise AttributeError(name)
    return get_dispatcher().call(self, GET_ATTR, name, (), {})


def _proxy_setattr(self, name, value):
    if name.startswith(_PREFIX):
        object.__setattr__(self, name, value)
    else:
        get_dispatcher().call(self, SET_ATTR, name, (value,), {})


def _proxy_delattr(self, name):
    if name.startswith(_PREFIX):
        object.__delattr__(self, name)
    else:
        get_dispatcher().call(self, DEL_ATTR, name, (), {})


def _proxy_eq(self, other):
    if is_proxy(other) or isinstance(other, StorageObject):
        return self.getID() == other.getID()
    return NotImplemented


def _proxy_hash(self):
    return hash(self.getID())


def _proxy_repr(self):
    return f"<{type(self).__qualname__} proxy id={self.getID()} backend={self.__dict__.get(_OWNER, '')[:8]}>"
