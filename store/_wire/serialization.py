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

from collections.abc import Sequence
import collections
import functools
import hashlib
import io
import pickle
import sys
import threading
import traceback
from typing import Any, Callable

import cloudpickle

from store.errors import ClassNotFound, SerializationError

OUT_OF_BAND_MIN = 64 * 1024
_local = threading.local()


def _file_copied(f):
    # cloudpickle stores an open file as a copy of what it can read now (an
    # in-memory StringIO when loaded): never the file itself. Say so.
    import warnings

    warnings.warn(
        f"the open file {getattr(f, 'name', f)!r} is stored as a copy of its "
        f"contents (an in-memory StringIO when loaded), not as the file; store "
        f"its path instead, and open it in the method that needs it",
        UserWarning,
        stacklevel=2,
    )
    return _FILE_REDUCE(f)


_FILE_REDUCE = cloudpickle.Pickler.dispatch_table[io.TextIOWrapper]


class _Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler, warning about values it silently changes (open files)."""

    dispatch_table = collections.ChainMap({io.TextIOWrapper: _file_copied}, cloudpickle.Pickler.dispatch_table)


def _culprit(value: Any, path: str = "", depth: int = 4) -> str | None:
    """Where in ``value`` the part that cannot be pickled is, as ``.attr[key]...``.

    Only run after pickling failed, so it may pickle parts again.
    """
    if depth == 0:
        return None
    if isinstance(value, dict):
        children = [(f"[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = [(f"[{i}]", v) for i, v in enumerate(value)]
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        children = [(f".{k}", v) for k, v in vars(value).items()]
    else:
        return None
    for name, child in children:
        try:
            cloudpickle.dumps(child, protocol=5)
        except Exception:
            deeper = _culprit(child, path + name, depth - 1)
            return deeper or f"{path + name} (a {type(child).__name__})"
    return None


class PickleContext:
    """What a dumps() call needs to know: how to reference StorageObjects.

    ``new_object(obj)`` is called for each StorageObject that is not yet
    persistent; it must give the object an id (and owner) and return its ref.
    """

    def __init__(self, new_object: Callable[[Any], tuple] | None = None):
        self._new_object = new_object

    def reference_new(self, obj: Any) -> tuple:
        if self._new_object is None:
            from store.errors import NotPersistent

            raise NotPersistent(f"{type(obj).__name__} object is not persistent and cannot be referenced here")
        return self._new_object(obj)


class UnpickleContext:
    """What a loads() call needs: how to turn a reference into an object."""

    def __init__(self, load_ref: Callable[[str, str, str], Any]):
        self.load_ref = load_ref


def current_pickle_context() -> PickleContext | None:
    return getattr(_local, "pickle_ctx", None)


def current_unpickle_context() -> UnpickleContext | None:
    return getattr(_local, "unpickle_ctx", None)


# Values made only of these (exact types, not subclasses) pickle to the same bytes
# with the C pickler alone: none can hold a StorageObject, a function, a class or
# an out-of-band buffer (bytes always travel in band).
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes})
_PLAIN_PARTS = 128  # parts the check looks at before it gives up (a big value's
#                     pickling costs far more than the full pickler's set-up)
_NOT_PLAIN, _ATOMS_ONLY, _WITH_ARRAYS = 0, 1, 2


def _numpy_array_type() -> type | None:
    """numpy.ndarray once numpy is imported (claypot never imports it itself)."""
    np = sys.modules.get("numpy")
    return getattr(np, "ndarray", None)


def _plain_dtype(dt: Any) -> bool:
    """True if ``dt`` is one of numpy's own dtypes, with no object fields and no metadata.

    The C pickler would pickle anything else in a dtype by reference (a class in a
    dtype's metadata or a ``numpy.void`` subclass from a user's script), where
    cloudpickle's pickler sends it by value: such arrays take the full pickler.
    """
    if dt.hasobject or dt.metadata is not None or dt.type.__module__ != "numpy":
        return False
    if dt.fields is not None:
        return all(_plain_dtype(f[0]) for f in dt.fields.values())
    if dt.subdtype is not None:
        return _plain_dtype(dt.subdtype[0])
    return True


def _plain(value: Any) -> int:
    """How ``value`` may be pickled without cloudpickle's Python-level pickler.

    ``_ATOMS_ONLY``: a few atoms, alone or in tuples, lists and dicts.
    ``_WITH_ARRAYS``: the same, with numpy arrays (exact ``ndarray`` of a plain
    dtype, see :func:`_plain_dtype`) among them: numpy's own reduction, which
    cloudpickle uses too, gives the same stream and the same out-of-band
    buffers with the C pickler.
    ``_NOT_PLAIN``: anything else (an object, a function, a subclass, a big value).
    """
    todo, left, kind, ndarray = [value], _PLAIN_PARTS, _ATOMS_ONLY, None
    while todo:
        v = todo.pop()
        t = type(v)
        if t in _ATOMS:
            continue
        if t is tuple or t is list:
            left -= 1 + len(v)
            if left < 0:
                return _NOT_PLAIN
            todo.extend(v)
        elif t is dict:
            left -= 1 + 2 * len(v)
            if left < 0:
                return _NOT_PLAIN
            todo.extend(v.keys())
            todo.extend(v.values())
        else:
            if ndarray is None:
                ndarray = _numpy_array_type()
            if ndarray is None or t is not ndarray or not _plain_dtype(v.dtype):
                return _NOT_PLAIN
            left -= 1
            kind = _WITH_ARRAYS
    return kind


def dumps(value: Any, ctx: PickleContext | None = None) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``value``; returns the stream and its out-of-band buffers."""
    plain = _ATOMS_ONLY if type(value) in _ATOMS else _plain(value)
    # Call arguments, small results, simple object states and plain numpy arrays:
    # a per-call cloudpickle pickler (its set-up and a Python callback for every
    # object) measured three times the cost of the C pickler here, for the same bytes.
    if plain == _ATOMS_ONLY:
        try:
            return pickle.dumps(value, protocol=5), []
        except RecursionError as exc:
            raise SerializationError(f"value is too deeply nested to pickle: {exc}") from None
    buffers: list[pickle.PickleBuffer] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes >= OUT_OF_BAND_MIN:
            buffers.append(buf)
            return False
        return True

    if plain == _WITH_ARRAYS:
        try:
            return pickle.dumps(value, protocol=5, buffer_callback=keep_out_of_band), buffers
        except RecursionError as exc:
            raise SerializationError(f"value is too deeply nested to pickle: {exc}") from None
        except Exception:
            buffers.clear()  # an odd array numpy cannot reduce: the full pickler says why

    previous = getattr(_local, "pickle_ctx", None)
    _local.pickle_ctx = ctx
    try:
        out = io.BytesIO()
        _Pickler(out, protocol=5, buffer_callback=keep_out_of_band).dump(value)
        return out.getvalue(), buffers
    except SerializationError:
        raise
    except RecursionError as exc:
        raise SerializationError(f"value is too deeply nested to pickle: {exc}") from None
    except Exception as exc:
        from store.errors import ClaypotError

        if isinstance(exc, ClaypotError):
            raise
        where = None
        try:
            where = _culprit(value)
        except Exception:
            pass  # looking for the culprit is a courtesy; the error stands without it
        if where is not None:
            raise SerializationError(f"cannot pickle {where} of a {type(value).__name__}: {exc}") from exc
        raise SerializationError(f"cannot pickle value of type {type(value).__name__}: {exc}") from exc
    finally:
        _local.pickle_ctx = previous


def loads(payload: bytes | memoryview, buffers: Sequence = (), ctx: UnpickleContext | None = None) -> Any:
    """Unpickle a value produced by :func:`dumps`."""
    previous = getattr(_local, "unpickle_ctx", None)
    _local.unpickle_ctx = ctx
    try:
        if buffers and _READONLY_BUFFER in (payload if isinstance(payload, (bytes, bytearray)) else bytes(payload)):
            return _WritableUnpickler(io.BytesIO(payload), buffers=buffers).load()
        return pickle.loads(payload, buffers=buffers)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ClassNotFound(f"cannot load a class or function the value needs: {exc}") from exc
    except Exception as exc:
        from store.errors import ClaypotError

        if isinstance(exc, ClaypotError):
            raise
        raise SerializationError(f"cannot unpickle value: {type(exc).__name__}: {exc}") from exc
    finally:
        _local.unpickle_ctx = previous


# NEXT_BUFFER then READONLY_BUFFER: an out-of-band buffer pickled from read-only memory
# (say a leased view of a same-host read).
_READONLY_BUFFER = pickle.NEXT_BUFFER + pickle.READONLY_BUFFER


class _WritableUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays over writable received buffers as writable arrays.

    Pickle marks a buffer read-only when the sender's memory was (a leased
    view is): the array rebuilt from it would be read-only in the receiver
    too, although the receiver's buffer is its own writable copy, and every
    changing method of an object stored from it would fail. Buffers the
    receiver cannot write (its own leased views) stay read-only.
    """

    def find_class(self, module, name):
        found = super().find_class(module, name)
        if name == "_frombuffer" and module.startswith("numpy"):
            return functools.partial(_frombuffer_writable, found)
        return found


def _frombuffer_writable(rebuild, buf, *args):
    try:
        view = memoryview(buf)
        if view.readonly and view.obj is not None and view.c_contiguous:
            whole = memoryview(view.obj)
            if not whole.readonly and whole.c_contiguous and whole.nbytes:
                import numpy as np

                whole = whole.cast("B")
                offset = (
                    (np.frombuffer(view.cast("B"), np.uint8).ctypes.data - np.frombuffer(whole, np.uint8).ctypes.data)
                    if view.nbytes
                    else 0
                )
                if 0 <= offset and offset + view.nbytes <= whole.nbytes:
                    buf = whole[offset : offset + view.nbytes]
    except (TypeError, ValueError):
        pass  # not a plain buffer: rebuilt as pickled
    return rebuild(buf, *args)


def buffer_sizes(buffers: Sequence) -> list[int]:
    return [memoryview(b).nbytes for b in buffers]


def value_size(payload: bytes, buffers: Sequence) -> int:
    return len(payload) + sum(buffer_sizes(buffers))


# -- code shipped by value ---------------------------------------------------

_code_lock = threading.Lock()
_code_cache: dict[Any, tuple[str, bytes]] = {}


def code_key_and_bytes(obj: Any) -> tuple[str, bytes]:
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


def remember_code(key: str, obj: Any) -> None:
    """Record that ``obj`` is the code behind ``key`` (so it is not re-pickled)."""
    with _code_lock:
        _code_cache.setdefault(obj, (key, b""))


def import_by_key(key: str) -> Any:
    """Import the class or function behind a code key ('module:qualname[#digest]') by name."""
    import importlib

    name = key.split("#", 1)[0]
    module, _, qualname = name.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except Exception as exc:
        raise ClassNotFound(
            f"class or function {name!r} was not shipped to the cluster and cannot be imported on the backend: {exc}"
        ) from None


def _is_installed(module: Any) -> bool:
    """True for stdlib, site-packages and claypot's own modules: import them by name."""
    name = module.__name__.split(".")[0]
    if name in ("store", "runtime") or name in sys_builtin_names():
        return True
    path = getattr(module, "__file__", None) or ""
    return "site-packages" in path or "dist-packages" in path or path == "" or path.startswith(_stdlib_prefix())


def sys_builtin_names() -> Sequence[str]:
    import sys

    return sys.builtin_module_names


def _stdlib_prefix() -> str:
    import sysconfig

    return sysconfig.get_paths()["stdlib"]


def load_code(code: bytes) -> Any:
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


_DYNAMIC_FRAME = None


def _codes_of(obj: Any, out: list) -> None:
    """Code objects of a shipped function or class (methods, properties, nested code)."""
    import types

    if isinstance(obj, type):
        for value in vars(obj).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                for f in (value.fget, value.fset, value.fdel):
                    if f is not None:
                        _codes_of(f, out)
            elif isinstance(value, types.FunctionType):
                _codes_of(value, out)
        return
    code = getattr(obj, "__code__", None)
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:
        c = stack.pop()
        out.append(c)
        stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]


def annotate_remote_traceback(text: str) -> str:
    """A remote traceback with its ``<dynamic-code>`` frames pointed back at their source.

    Code shipped by value loses its file name on the way (cloudpickle keeps
    payloads deterministic that way). This process shipped it, so it knows
    which of its functions has that name and line, and where its source is
    (a notebook cell included: IPython keeps cells in linecache).
    """
    global _DYNAMIC_FRAME
    if "<dynamic-code>" not in text:
        return text
    import linecache
    import re

    if _DYNAMIC_FRAME is None:
        _DYNAMIC_FRAME = re.compile(r'^(\s*)File "<dynamic-code>", line (\d+), in (.+)$')
    with _code_lock:
        shipped = list(_code_cache)
    codes: list = []
    for obj in shipped:
        _codes_of(obj, codes)
    out = []
    for line in text.splitlines():
        m = _DYNAMIC_FRAME.match(line)
        if m is None:
            out.append(line)
            continue
        indent, number, name = m.group(1), int(m.group(2)), m.group(3)
        found = next((c for c in codes if c.co_name == name and any(ln == number for _, _, ln in c.co_lines())), None)
        if found is None:
            out.append(line)
            continue
        out.append(f'{indent}File "{found.co_filename}", line {number}, in {name}')
        source = linecache.getline(found.co_filename, number).strip()
        if source:
            out.append(f"{indent}  {source}")
    return "\n".join(out)
