"""Code-quality rules no linter holds: every public function of store and runtime is
annotated, parameters and return.

Public: a function or method whose name has no leading underscore, defined at
the top of a module of ``store`` or ``runtime`` (store._wire.generated excepted) or in
a public class there. mypy enforces the same per module where a module is
complete (pyproject's [tool.mypy] overrides); this test holds every module to
it for the public names, read the way a user's tools read them (inspect).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types

import store
import runtime

# Modules that need an optional extra to import: still checked when it is installed.
OPTIONAL = {
    "store.dashboard": "starlette",
    "runtime._dask_executor": "distributed",
    "store.backend._service.dask_worker": "distributed",
}


def _modules() -> list[types.ModuleType]:
    out = []
    for pkg in (store, runtime):
        out.append(pkg)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            # Generated code is not ours; a __main__ runs its program when imported.
            if info.name.startswith("store._wire.generated") or info.name.endswith(".__main__"):
                continue
            try:
                out.append(importlib.import_module(info.name))
            except ImportError as exc:
                if info.name in OPTIONAL and OPTIONAL[info.name] in str(exc):
                    continue
                raise
    return out


def _unwrapped(obj):
    """The function behind a decorator (functools.wraps, click commands, properties)."""
    callback = getattr(obj, "callback", None)  # a click command
    if callable(callback) and not isinstance(obj, (type, types.FunctionType)):
        obj = callback
    return inspect.unwrap(obj) if isinstance(obj, types.FunctionType) else obj


def _missing(fn: types.FunctionType, bound: bool) -> list[str]:
    """Names of ``fn``'s unannotated parameters, and "return" if its return is not."""
    params = list(inspect.signature(fn).parameters.values())
    if bound and params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        params = params[1:]  # self or cls
    out = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    if "return" not in fn.__annotations__:
        out.append("return")
    return out


def public_functions() -> list[tuple[str, types.FunctionType, bool]]:
    """(qualified name, function, bound) of every public function and method."""
    seen: set[int] = set()
    out = []

    def add(qualname: str, fn, bound: bool) -> None:
        fn = _unwrapped(fn)
        # A lambda (a default value, a property made in one line) takes no annotations.
        if isinstance(fn, types.FunctionType) and fn.__name__ != "<lambda>" and id(fn) not in seen:
            seen.add(id(fn))
            out.append((qualname, fn, bound))

    for mod in _modules():
        for name, obj in vars(mod).items():
            obj = _unwrapped(obj)
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if isinstance(obj, type):
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    where = f"{mod.__name__}.{obj.__qualname__}.{attr}"
                    if isinstance(member, staticmethod):
                        add(where, member.__func__, False)
                    elif isinstance(member, classmethod):
                        add(where, member.__func__, True)
                    elif isinstance(member, property):
                        for part in (member.fget, member.fset):
                            if part is not None:
                                add(where, part, True)
                    elif isinstance(member, types.FunctionType) and member.__qualname__.startswith(
                        obj.__qualname__ + "."
                    ):
                        add(where, member, True)
                    elif hasattr(member, "func") and isinstance(member.func, types.FunctionType):
                        add(where, member.func, True)  # functools.cached_property
            elif getattr(obj, "__qualname__", None) == name:
                add(f"{mod.__name__}.{name}", obj, False)
    return out


def test_every_public_function_is_annotated():
    functions = public_functions()
    # Hundreds of them: a walk that found a handful would be checking nothing.
    assert len(functions) > 500, len(functions)
    missing = {q: m for q, fn, bound in functions if (m := _missing(fn, bound))}
    assert not missing, "public functions without annotations:\n" + "\n".join(
        f"  {q}: {', '.join(m)}" for q, m in sorted(missing.items())
    )


def test_the_walk_sees_methods_decorators_and_commands():
    """The walk reaches what a plain dir() would miss, so the rule has no blind spot."""
    names = {q for q, _, _ in public_functions()}
    assert "store.backend._service.server.BackendServicer.Call" in names  # under @replies
    assert "store.backend._service.polyglot.PolyglotServicer.GetArray" in names  # under @aborts
    assert "store._ops.cli.up" in names  # a click command
    assert "store._client.client.Client.read_cache" in names  # cached_property
    assert "runtime._decorators.task" in names


def test_a_missing_annotation_is_reported():
    def f(self, a: int, b, *args, c: str = "", **kw) -> None:
        pass

    def g(x: int):
        return x

    assert _missing(f, bound=True) == ["b", "args", "kw"]
    assert _missing(g, bound=False) == ["return"]
