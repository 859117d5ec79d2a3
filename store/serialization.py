"""Pickling values for the wire and the disk.

Values are pickled once, with pickle protocol 5: buffers of 64 KiB or more
(numpy arrays, bytearrays, anything exporting PickleBuffer) stay out of band,
so a large array is never copied into the pickle stream. cloudpickle's
pickler is used so functions and classes defined in a user's script travel
by value.

A StorageObject inside a value travels as a reference. Its ``__reduce_ex__``
asks the active :class:`PickleContext` (a thread-local, set by :func:`dumps`)
for the reference, which lets the context collect objects that are not yet
persistent and make them persistent together with their holder. On the way
back, :func:`loads` sets an :class:`UnpickleContext` that turns references
into proxies.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
import traceback
from typing import Any, Callable

import cloudpickle

from .errors import ClassNotFound, SerializationError

OUT_OF_BAND_MIN = 64 * 1024
_local = threading.local()


class PickleContext:
    """What a dumps() call needs to know: how to reference StorageObjects.

    ``new_object(obj)`` is called for each StorageObject that is not yet
    persistent; it must give the object an id (and owner) and return its ref.
    """

    def __init__(self, new_object: Callable[[Any], tuple] | None = None):
        self._new_object = new_object

    def reference_new(self, obj) -> tuple:
        if self._new_object is None:
            from .errors import NotPersistent
            raise NotPersistent(
                f"{type(obj).__name__} object is not persistent and cannot be referenced here")
        return self._new_object(obj)


class UnpickleContext:
    """What a loads() call needs: how to turn a reference into an object."""

    def __init__(self, load_ref: Callable[[str, str, str], Any]):
        self.load_ref = load_ref


def current_pickle_context() -> PickleContext | None:
    return getattr(_local, "pickle_ctx", None)


def current_unpickle_context() -> UnpickleContext | None:
    return getattr(_local, "unpickle_ctx", None)


def dumps(value: Any, ctx: PickleContext | None = None) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``value``; returns the stream and its out-of-band buffers."""
    buffers: list[pickle.PickleBuffer] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes >= OUT_OF_BAND_MIN:
            buffers.append(buf)
            return False
        return True

    previous = getattr(_local, "pickle_ctx", None)
    _local.pickle_ctx = ctx
    try:
        out = io.BytesIO()
        cloudpickle.Pickler(out, protocol=5, buffer_callback=keep_out_of_band).dump(value)
        return out.getvalue(), buffers
    except SerializationError:
        raise
    except RecursionError as exc:
        raise SerializationError(f"value is too deeply nested to pickle: {exc}") from None
    except Exception as exc:
        from .errors import ClaypotError
        if isinstance(exc, ClaypotError):
            raise
        raise SerializationError(
            f"cannot pickle value of type {type(value).__name__}: {exc}") from exc
    finally:
        _local.pickle_ctx = previous


def loads(payload: bytes | memoryview, buffers=(), ctx: UnpickleContext | None = None) -> Any:
    """Unpickle a value produced by :func:`dumps`."""
    previous = getattr(_local, "unpickle_ctx", None)
    _local.unpickle_ctx = ctx
    try:
        return pickle.loads(payload, buffers=buffers)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ClassNotFound(f"cannot load a class or function the value needs: {exc}") from exc
    except Exception as exc:
        from .errors import ClaypotError
        if isinstance(exc, ClaypotError):
            raise
        raise SerializationError(f"cannot unpickle value: {type(exc).__name__}: {exc}") from exc
    finally:
        _local.unpickle_ctx = previous


def buffer_sizes(buffers) -> list[int]:
    return [memoryview(b).nbytes for b in buffers]


def value_size(payload: bytes, buffers) -> int:
    return len(payload) + sum(buffer_sizes(buffers))


# -- code shipped by value ---------------------------------------------------

_code_lock = threading.Lock()
_code_cache: dict[Any, tuple[str, bytes]] = {}


def code_key_and_bytes(obj) -> tuple[str, bytes]:
    """A stable key and the by-value pickle of a class or function.

    The key names the object and a digest of its code, so a changed class
    gets a new key while objects made with the old one keep theirs.
    """
    with _code_lock:
        hit = _code_cache.get(obj)
        if hit is not None:
            return hit
    module = getattr(obj, "__module__", "__main__")
    by_value_module = None
    import sys
    mod = sys.modules.get(module)
    if module != "__main__" and mod is not None and not _is_installed(mod):
        by_value_module = mod
    try:
        if by_value_module is not None:
            with _code_lock:
                cloudpickle.register_pickle_by_value(by_value_module)
                try:
                    code = cloudpickle.dumps(obj, protocol=5)
                finally:
                    cloudpickle.unregister_pickle_by_value(by_value_module)
        else:
            code = cloudpickle.dumps(obj, protocol=5)
    except Exception as exc:
        raise SerializationError(f"cannot ship {obj!r} by value: {exc}") from exc
    digest = hashlib.blake2b(code, digest_size=8).hexdigest()
    key = f"{module}:{obj.__qualname__}#{digest}"
    with _code_lock:
        _code_cache[obj] = (key, code)
    return key, code


def remember_code(key: str, obj) -> None:
    """Record that ``obj`` is the code behind ``key`` (so it is not re-pickled)."""
    with _code_lock:
        _code_cache.setdefault(obj, (key, b""))


def _is_installed(module) -> bool:
    """True for stdlib, site-packages and claypot's own modules: import them by name."""
    name = module.__name__.split(".")[0]
    if name in ("store", "runtime") or name in sys_builtin_names():
        return True
    path = getattr(module, "__file__", None) or ""
    return "site-packages" in path or "dist-packages" in path or path == "" \
        or path.startswith(_stdlib_prefix())


def sys_builtin_names():
    import sys
    return sys.builtin_module_names


def _stdlib_prefix() -> str:
    import sysconfig
    return sysconfig.get_paths()["stdlib"]


def load_code(code: bytes):
    """Rebuild a class or function shipped by value."""
    try:
        return pickle.loads(code)
    except Exception as exc:
        raise ClassNotFound(f"cannot load shipped code: {type(exc).__name__}: {exc}") from exc


# -- exceptions ----------------------------------------------------------------

def dump_exception(exc: BaseException) -> tuple[str, str, bytes]:
    """(qualified type, formatted traceback, pickled exception or b'')."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    qualname = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        pickled = cloudpickle.dumps(exc.with_traceback(None), protocol=5)
        pickle.loads(pickled)  # an exception that pickles but cannot be rebuilt is useless
    except Exception:
        pickled = b""
    return qualname, tb, pickled
