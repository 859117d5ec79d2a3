"""Persistent values that are not StorageObjects: ``Alien(value)``.

Any picklable value (a numpy array, a dict, a list, a pydantic model) becomes
an object with an id, aliases and a backend::

    from store import Alien
    a = Alien(np.zeros(1000))
    a.make_persistent(alias="weights")
    a.fill(1.0)          # runs on the backend, on the array itself
    a.shape              # read there too
    a.unwrap()           # a copy of the value, here

The type of ``Alien(v)`` is ``Alien[module.Type]``, generated once per wrapped
type, with the wrapped type's public methods (and ``len``, indexing, ``in``,
``str``) as methods; other attributes are read from the value on its backend.
A change made in place by a method is detected and stored like any change.
"""

from __future__ import annotations

from typing import Any

from store._model.objects import StorageObject

# Dunders forwarded to the wrapped value (others belong to the object model).
FORWARDED_DUNDERS = ("__len__", "__getitem__", "__setitem__", "__delitem__", "__contains__", "__str__")

_types: dict[type, type] = {}


class Alien(StorageObject):
    """A StorageObject holding one value of any picklable type (see the module docstring)."""

    def __new__(cls, value=None, *args, **kwargs):
        if cls is not Alien:
            return super().__new__(cls)
        obj = object.__new__(Alien[type(value)])
        obj.__dict__["value"] = value
        return obj

    def __init__(self, value=None):
        pass  # the value was taken by __new__

    def __class_getitem__(cls, base: type) -> type:
        hit = _types.get(base)
        if hit is not None:
            return hit
        name = f"Alien[{base.__module__}.{base.__qualname__}]"
        ns: dict[str, Any] = {"__module__": __name__, "__qualname__": name}
        for attr in dir(base):
            member = getattr(base, attr, None)
            if callable(member) and (not attr.startswith("_") or attr in FORWARDED_DUNDERS):
                ns[attr] = _forward(attr)
        return _types.setdefault(base, type(name, (Alien,), ns))

    def unwrap(self) -> Any:
        """The wrapped value (a copy, when called through a proxy)."""
        return self.__dict__["value"]

    def __iter__(self):
        return iter(self.__dict__["value"])

    @classmethod
    def __claypot_proxy_namespace__(cls, ns: dict, members: dict) -> None:
        # An iterator cannot travel: a proxy iterates over a copy of the value.
        ns["__iter__"] = lambda self: iter(self.unwrap())

    def __getattr__(self, name):
        if name.startswith("__") or name == "value":
            raise AttributeError(name)
        return getattr(self.__dict__["value"], name)


def _forward(name: str) -> Any:
    def method(self, *args, **kwargs):
        return getattr(self.__dict__["value"], name)(*args, **kwargs)

    method.__name__ = name
    return method
