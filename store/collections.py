"""Sharded collections: a persistent dict and a numpy array, cut into shards over backends.

    from store.collections import ShardedArray, StorageDict

    x = ShardedArray.from_numpy(big, shards=4, alias="train")  # one block per shard
    sums = x.map_blocks(np.sum)          # futures: one task next to each block
    total = x.reduce(np.add).result()    # column sums, partial sums made where blocks live
    head = x[:1000]                      # fetches only the blocks rows 0-999 live in
    x.rebalance()                        # after backends joined: blocks move to them

    d = StorageDict.from_iterable(pairs, shards=8, alias="index")
    d["k"] = v; d["k"]; len(d)

Each shard is a persistent object of its own (:class:`ArrayBlock`,
:class:`DictShard`) placed on a backend by a placement policy; a small
persistent *manifest* lists them in order, under the collection's alias. So a
collection survives restarts like any object and is reopened with
``ShardedArray.load(alias)`` / ``StorageDict.load(alias)``.

The collection classes themselves (:class:`ShardedArray`, :class:`StorageDict`)
are plain client-side handles over the manifest: their methods run in the
caller's process and turn into one call or task per shard, so that work on a
shard runs inside the backend that holds it.

``map_blocks`` and ``reduce`` are :mod:`runtime` tasks (they return its
futures); the runtime is imported when they are first used, so the store's
lower layers never depend on it at import time.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from store._api import api
from store._model import objects as objmod
from .errors import BackendNotFound, ConfigurationError, InvalidKey
from store._model.objects import StorageObject, readonly

try:  # numpy is an optional extra; only ShardedArray needs it
    import numpy as np
except ImportError:  # pragma: no cover - exercised only without the extra
    np = None  # type: ignore[assignment]

__all__ = [
    "ShardedArray",
    "StorageDict",
    "ArrayBlock",
    "DictShard",
    "Partition",
    "spread",
    "plan_rebalance",
    "shard_of",
]

TRANSFER_THREADS = 4  # blocks sent or fetched at once by one handle
DICT_BATCH = 10_000  # pairs buffered per shard by StorageDict.from_iterable


class _NoValue:
    """Marks "no partial result" (an empty shard) in reductions; travels by reference."""


# -- shard objects -------------------------------------------------------------------------


class ArrayBlock(StorageObject):
    """One block of a :class:`ShardedArray`: rows ``data`` (a numpy array) on one backend.

    Tasks that receive a block see ``block.data`` as the live array in the
    backend's memory (no copy).
    """

    def __init__(self, data=None):
        self.data = data

    @readonly
    def read(self, index: Any = None) -> Any:
        """The block, or ``data[index]`` (a contiguous copy), computed where it lives."""
        if index is None:
            return self.data
        return np.ascontiguousarray(self.data[index])

    @readonly
    def info(self) -> tuple[int, tuple, str]:
        """(rows, shape after the first axis, dtype string)."""
        return _array_info(self.data)


class DictShard(StorageObject):
    """One shard of a :class:`StorageDict`: a plain dict ``data`` on one backend."""

    def __init__(self):
        self.data: dict = {}

    @readonly
    def lookup(self, keys: list) -> list:
        """(found, value) for each key."""
        d = self.data
        return [(True, d[k]) if k in d else (False, None) for k in keys]

    @readonly
    def size(self) -> int:
        """Number of keys."""
        return len(self.data)

    @readonly
    def keys_list(self) -> list:
        """Every key, as a list."""
        return list(self.data)

    @readonly
    def items_list(self) -> list:
        """Every (key, value), as a list."""
        return list(self.data.items())

    def store_items(self, pairs: list) -> None:
        """Set each (key, value)."""
        self.data.update(pairs)

    def clear_all(self) -> None:
        """Drop every key."""
        self.data = {}

    def remove(self, key: Any) -> bool:
        """Delete ``key``; False if it was not there."""
        return self.data.pop(key, _NoValue) is not _NoValue


class _Manifest(StorageObject):
    """The persistent record of a collection: its kind, its shards in order, and metadata."""

    def __init__(self, kind: str, parts: list, meta: dict):
        self.kind = kind
        self.parts = parts
        self.meta = meta

    @readonly
    def describe(self) -> tuple[str, list, dict]:
        """(kind, shards, metadata)."""
        return self.kind, self.parts, self.meta

    def set_parts(self, parts: list, meta: dict) -> None:
        """Record the shards again (after a move, so their owners are current)."""
        self.parts = parts
        self.meta = meta


def _array_info(a) -> tuple[int, tuple, str]:
    if a is None:
        return 0, (), ""
    return int(a.shape[0]), tuple(int(n) for n in a.shape[1:]), a.dtype.str


# -- placement (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """One shard of a collection and where it is: for scheduling work next to it."""

    index: int
    shard: StorageObject  # ArrayBlock or DictShard (a proxy)
    backend: str  # id of the backend holding it
    host: str  # that backend's host
    start: int = 0  # first row (ShardedArray); 0 for a StorageDict
    stop: int = 0  # one past the last row (ShardedArray); 0 for a StorageDict


def spread(n: int, backends: Sequence[tuple[str, str]]) -> list[str]:
    """The default placement: a backend id for each of ``n`` shards.

    ``backends`` are (backend id, host) pairs. Shards go round robin over
    hosts first, then over the backends of each host, so neighbouring shards
    land on different machines where there are several.
    """
    if n < 1:
        raise ConfigurationError(f"a collection needs at least one shard, not {n}")
    if not backends:
        raise ConfigurationError("no backend is up to place shards on")
    by_host: dict[str, list[str]] = {}
    for backend_id, host in sorted(backends):
        by_host.setdefault(host, []).append(backend_id)
    hosts = sorted(by_host)
    order = []
    for i in range(max(len(v) for v in by_host.values())):
        order.extend(by_host[h][i] for h in hosts if i < len(by_host[h]))
    return [order[i % len(order)] for i in range(n)]


def plan_rebalance(shards: Sequence[tuple[str, int]], backends: Sequence[str]) -> list[tuple[int, str]]:
    """Moves (shard index, target backend) that even out bytes per backend.

    ``shards`` are (owner, bytes) in order. Greedy: while the fullest backend
    has a shard whose move to the emptiest one lowers the larger of the two
    loads, move the shard closest to half their difference. Shards on
    backends not in ``backends`` (gone, or excluded) are moved first.
    """
    if not backends:
        raise ConfigurationError("rebalance needs at least one backend")
    owners = [o for o, _ in shards]
    sizes = [max(1, int(s)) for _, s in shards]
    load = {b: 0 for b in backends}
    moves: dict[int, str] = {}
    for i, (owner, size) in enumerate(zip(owners, sizes)):
        if owner not in load:
            target = min(load, key=lambda b: (load[b], b))
            owners[i] = target
            moves[i] = target
        load[owners[i]] += size
    for _ in range(len(shards) * len(backends) + 1):
        src = max(load, key=lambda b: (load[b], b))
        dst = min(load, key=lambda b: (load[b], b))
        gap = load[src] - load[dst]
        candidates = [i for i, o in enumerate(owners) if o == src and sizes[i] < gap]
        if not candidates:
            break
        i = min(candidates, key=lambda i: (abs(sizes[i] - gap / 2), i))
        owners[i] = dst
        moves[i] = dst
        load[src] -= sizes[i]
        load[dst] += sizes[i]
    return sorted(moves.items())


def _key_bytes(key) -> bytes:
    """A canonical encoding of a key: equal keys (1, 1.0, True) encode alike in every process."""
    if key is None:
        return b"N"
    if isinstance(key, (bool, int)):
        return b"i" + str(int(key)).encode()
    if isinstance(key, float):
        if key.is_integer():
            return b"i" + str(int(key)).encode()
        return b"f" + repr(key).encode()
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"b" + key
    if isinstance(key, tuple):
        parts = [_key_bytes(k) for k in key]
        return b"t" + b"".join(len(p).to_bytes(4, "little") + p for p in parts)
    if hasattr(key, "__index__") and not isinstance(key, (list, dict, set)):
        return b"i" + str(key.__index__()).encode()  # numpy integers
    raise InvalidKey(
        f"a StorageDict key must be None, bool, int, float, str, bytes or a "
        f"tuple of those, not {type(key).__name__}: Python's own hash of other "
        f"types differs between processes, so shards could not agree on it"
    )


def shard_of(key: Any, shards: int) -> int:
    """Index of the shard that holds ``key`` among ``shards`` (the same in every process)."""
    digest = hashlib.blake2b(_key_bytes(key), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


# -- helpers shared by both collections ---------------------------------------------------


def _up_backends() -> list[api.BackendStatus]:
    return [b for b in api.backends() if b.up]


def _place(n: int, placement) -> list[str]:
    """Backend ids for ``n`` shards under ``placement`` (None, a list of ids, or a callable)."""
    up = _up_backends()
    known = {b.backend_id for b in up}
    if placement is None:
        targets = spread(n, [(b.backend_id, b.host) for b in up])
    elif callable(placement):
        targets = list(placement(n, up))
    elif isinstance(placement, (list, tuple)) and placement:
        targets = [placement[i % len(placement)] for i in range(n)]
    else:
        raise ConfigurationError(
            "placement must be None, a non-empty list of backend ids, or a function (n, backends) -> backend ids"
        )
    if len(targets) != n:
        raise ConfigurationError(f"placement gave {len(targets)} backends for {n} shards")
    for t in targets:
        if t not in known:
            raise BackendNotFound(f"placement chose backend {t!r}, which is not up")
    return targets


def _owner(obj) -> str:
    return obj.__dict__.get(objmod._OWNER, "")


def _parallel(fn, items: Sequence, threads: int = TRANSFER_THREADS) -> list:
    """fn over items on a few threads (each item is a network call), results in order."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="claypot-collection") as pool:
        return list(pool.map(fn, items))


def _delete_quietly(objs) -> None:
    for o in objs:
        try:
            o.delete_persistent()
        except Exception:  # cleaning up after a failure: the first error is the one to report
            pass


def _hosts() -> dict[str, str]:
    return {b.backend_id: b.host for b in api.backends()}


class _Collection:
    """What both collections share: the manifest, shards, placement, tasks, rebalance."""

    _kind = ""

    def __init__(self, manifest: _Manifest):
        kind, parts, meta = manifest.describe()
        if kind != self._kind:
            raise ConfigurationError(f"object {manifest.getID()} is a {kind or 'non'}-collection, not a {self._kind}")
        self._manifest = manifest
        self._parts: list = list(parts)
        self._meta: dict = dict(meta)

    @classmethod
    def load(cls, alias: str):
        """Reopen the collection persisted under ``alias`` (raises AliasNotFound)."""
        return cls(api.get_by_alias(alias))

    @classmethod
    def get_by_id(cls, object_id: str):
        """Reopen the collection whose manifest has this id."""
        return cls(api.get_by_id(object_id))

    def getID(self) -> str:
        """Id of the collection's manifest (stable across restarts and moves)."""
        return self._manifest.getID()

    def __reduce__(self):
        return (type(self), (self._manifest,))

    @property
    def nshards(self) -> int:
        """Number of shards (blocks of an array, shards of a dict)."""
        return len(self._parts)

    def split(self) -> list:
        """The shards in order (ArrayBlock / DictShard proxies), to pass to tasks.

        A task given a shard runs on the backend that holds it, where the
        shard is the live object.
        """
        return list(self._parts)

    def partitions(self) -> list[Partition]:
        """Each shard with its backend and host (and row range for arrays)."""
        hosts = _hosts()
        out = []
        for i, part in enumerate(self._parts):
            owner = _owner(part)
            start, stop = self._rows(i)
            out.append(Partition(i, part, owner, hosts.get(owner, ""), start, stop))
        return out

    def _rows(self, i: int) -> tuple[int, int]:
        return 0, 0

    def locations(self) -> list[str]:
        """Backend id of each shard, asked from the directory now."""
        return _parallel(lambda p: p.get_location(), self._parts)

    def refresh(self) -> None:
        """Re-read the manifest and the shards' current owners (after others moved them)."""
        _, parts, meta = self._manifest.describe()
        self._parts, self._meta = list(parts), dict(meta)
        self.locations()

    def _shard_bytes(self) -> list[int]:
        return [1] * len(self._parts)

    def rebalance(self, backends: Sequence[str] | None = None) -> list[tuple[int, str, str]]:
        """Move shards so that each backend (all up ones, or ``backends``) holds a fair share.

        Run it after backends join (or before some leave: pass the ones to
        keep). Each move is ``StorageObject.move``: id and alias stay. Returns
        the moves made as (shard index, from, to).
        """
        targets = list(backends) if backends is not None else sorted(b.backend_id for b in _up_backends())
        owners = self.locations()
        plan = plan_rebalance(list(zip(owners, self._shard_bytes())), targets)
        moves = [(i, owners[i], dst) for i, dst in plan]
        _parallel(lambda m: self._parts[m[0]].move(m[2]), moves, threads=2)
        if moves:
            self._manifest.set_parts(self._parts, self._meta)
        return moves

    def delete(self) -> None:
        """Delete the shards and the manifest (and its alias)."""
        _parallel(lambda p: p.delete_persistent(), self._parts)
        self._manifest.delete_persistent()
        self._parts = []

    def _submit_each(self, task_fn, *args) -> list:
        return [task_fn(part, *args) for part in self._parts]

    def _reduce(self, fn, chunk, initial):
        t = _tasks()
        partials = self._submit_each(t.reduce_part, fn, chunk)
        return t.combine(partials, fn, initial)


def _new_manifest(kind: str, parts: list, meta: dict, alias: str | None) -> _Manifest:
    m = _Manifest(kind, parts, meta)
    try:
        m.make_persistent(alias=alias, backend=_owner(parts[0]) or None)
    except BaseException:
        _delete_quietly(parts)
        raise
    return m


# -- tasks (module functions: backends import them by name) -------------------------------


def _fill_block(block, fn, lo, hi, args, kwargs):
    data = fn(lo, hi, *args, **kwargs)
    data = np.ascontiguousarray(data)
    if data.ndim == 0 or data.shape[0] != hi - lo:
        raise ConfigurationError(f"from_function: fn({lo}, {hi}) gave shape {data.shape}, expected {hi - lo} rows")
    block.data = data
    return _array_info(data)


def _map_block(block, fn, args, kwargs):
    return fn(block.data, *args, **kwargs)


def _update_block(block, fn, args, kwargs):
    before = block.data
    out = fn(before, *args, **kwargs)
    if out is not None and out is not before:
        out = np.asarray(out)
        if out.shape != before.shape or out.dtype != before.dtype:
            # The manifest records each block's rows, shape and dtype: they must not change.
            raise ConfigurationError(
                f"update_blocks: a block of shape {before.shape} "
                f"{before.dtype} became {out.shape} {out.dtype}; use "
                f"map_blocks and build a new array instead"
            )
        block.data = np.ascontiguousarray(out)


def _map_shard(shard, fn, args, kwargs):
    return fn(shard.data, *args, **kwargs)


def _reduce_part(part, fn, chunk):
    data = part.data
    if isinstance(part, DictShard) or isinstance(data, dict):
        values = list(data.values())
        if chunk is not None:
            return chunk(data)
        return functools.reduce(fn, values) if values else _NoValue
    if chunk is not None:
        return chunk(data)
    if len(data) == 0:
        return _NoValue
    if np is not None and isinstance(fn, np.ufunc):
        return fn.reduce(data, axis=0)
    return functools.reduce(fn, data)


def _combine(partials, fn, initial):
    values = [p for p in partials if p is not _NoValue]
    if initial is not _NoValue:
        values.insert(0, initial)
    if not values:
        raise ValueError("reduce of an empty collection with no initial value")
    return functools.reduce(fn, values)


def _forget_sizes(object_ids: list[str]) -> None:
    from runtime import _core as core

    sizes = getattr(core.current(), "sizes", None)
    if sizes is not None:
        sizes.forget(object_ids)


@functools.cache
def _tasks():
    """The collections' task functions (built on first use: the runtime sits above the store)."""
    from types import SimpleNamespace

    from runtime import COLLECTION_IN, INOUT, task

    return SimpleNamespace(
        fill=task(block=INOUT, returns=1)(_fill_block),
        map=task(returns=1)(_map_block),
        update=task(block=INOUT, returns=1)(_update_block),
        map_shard=task(returns=1)(_map_shard),
        reduce_part=task(returns=1)(_reduce_part),
        combine=task(partials=COLLECTION_IN, returns=1)(_combine),
    )


# -- ShardedArray --------------------------------------------------------------------------


def _need_numpy() -> None:
    if np is None:
        raise ConfigurationError("ShardedArray needs numpy: pip install 'claypot[numpy]'")


class ShardedArray(_Collection):
    """A numpy array cut along its first axis into blocks, each a persistent object.

    Build one with :meth:`from_numpy`, :meth:`from_iterable` or
    :meth:`from_function`; reopen it with :meth:`load`. ``shape``,
    ``dtype``, ``len()``, ``x[i]``, ``x[a:b]`` (also with a step and further
    indices, ``x[a:b, 3]``), :meth:`to_numpy`; :meth:`map_blocks`,
    :meth:`update_blocks` and :meth:`reduce` run next to each block.
    """

    _kind = "array"

    def __init__(self, manifest):
        _need_numpy()
        super().__init__(manifest)
        self._starts: list[int] = list(self._meta["starts"])
        self.dtype = np.dtype(self._meta["dtype"])
        self._tail: tuple = tuple(self._meta["tail"])

    # -- building ------------------------------------------------------------------------
    @classmethod
    def from_numpy(
        cls,
        x: Any,
        shards: int | None = None,
        *,
        block_rows: int | None = None,
        alias: str | None = None,
        placement: Any = None,
    ) -> "ShardedArray":
        """Cut ``x`` into ``shards`` blocks (default: one per backend up) and persist each.

        ``x`` is anything with ``shape``, ``dtype`` and slicing on its first
        axis: a numpy array (its blocks are sent as views, not copied first),
        a ``np.memmap`` or an HDF5 dataset (read one block at a time, so the
        whole never sits in this process). Blocks go to their backends a few
        at a time, in parallel.
        """
        _need_numpy()
        rows = int(x.shape[0]) if getattr(x, "shape", ()) else 0
        if not getattr(x, "shape", ()):
            raise ConfigurationError("from_numpy needs an array with at least one axis")
        n = _block_count(rows, shards, block_rows)
        bounds = _bounds(rows, n)
        targets = _place(n, placement)
        made: list = []

        def send(i):
            lo, hi = bounds[i]
            block = ArrayBlock(np.ascontiguousarray(x[lo:hi]))
            block.make_persistent(backend=targets[i])
            made.append(block)
            return block

        try:
            blocks = _parallel(send, range(n))
        except BaseException:
            _delete_quietly(made)
            raise
        dtype = np.dtype(x.dtype)
        return cls._finish(blocks, [lo for lo, _ in bounds] + [rows], tuple(x.shape[1:]), dtype, alias)

    @classmethod
    def from_iterable(
        cls, chunks: Iterable, *, block_rows: int, alias: str | None = None, placement: Any = None
    ) -> "ShardedArray":
        """Build from an iterable of chunks (arrays of rows), ``block_rows`` rows a block.

        Chunks are consumed lazily and each full block is sent while the next
        is being read, so memory holds about two blocks, whatever the total.
        Blocks go round robin over the placement's backends.
        """
        _need_numpy()
        if block_rows is None or block_rows < 1:
            raise ConfigurationError("from_iterable needs block_rows >= 1")
        up = _up_backends()
        cycle = itertools.cycle(_place(len(up), placement))
        blocks: list = []
        pending: list = []
        state = {"tail": None, "dtype": None}

        def send(data, target):
            block = ArrayBlock(data)
            block.make_persistent(backend=target)
            return block

        def check(a):
            if state["tail"] is None:
                state["tail"], state["dtype"] = a.shape[1:], a.dtype
            elif a.shape[1:] != state["tail"]:
                raise ConfigurationError(
                    f"from_iterable: a chunk of shape {a.shape} does not match rows of shape {state['tail']}"
                )

        buf: list = []
        have = 0
        starts = [0]
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claypot-collection")
        try:

            def flush(final: bool):
                nonlocal buf, have
                while have >= block_rows or (final and have):
                    whole = np.concatenate(buf) if len(buf) > 1 else buf[0]
                    take = min(block_rows, have)
                    data = np.ascontiguousarray(whole[:take])
                    rest = whole[take:]
                    buf, have = ([rest] if len(rest) else []), have - take
                    if pending:
                        blocks.append(pending.pop().result())  # at most one send in flight
                    starts.append(starts[-1] + take)
                    pending.append(pool.submit(send, data, next(cycle)))

            for chunk in chunks:
                a = np.asarray(chunk)
                if a.ndim == 0:
                    raise ConfigurationError("from_iterable: each chunk is an array of rows, not a scalar")
                check(a)
                if state["dtype"] is not None and a.dtype != state["dtype"]:
                    a = a.astype(state["dtype"])
                buf.append(a)
                have += len(a)
                flush(False)
            flush(True)
            if pending:
                blocks.append(pending.pop().result())
        except BaseException:
            for p in pending:
                try:
                    blocks.append(p.result())
                except BaseException:
                    pass
            _delete_quietly(blocks)
            raise
        finally:
            pool.shutdown(wait=True)
        if not blocks:
            raise ConfigurationError("from_iterable: the iterable gave no rows")
        return cls._finish(blocks, starts, tuple(state["tail"]), np.dtype(state["dtype"]), alias)

    @classmethod
    def from_function(
        cls,
        fn: Callable,
        rows: int,
        shards: int | None = None,
        *,
        args: tuple = (),
        kwargs: dict | None = None,
        alias: str | None = None,
        placement: Any = None,
    ) -> "ShardedArray":
        """Make each block where it will live: a task runs ``fn(lo, hi, *args)`` on its backend.

        ``fn`` returns rows ``lo`` to ``hi`` (an array with ``hi - lo`` rows);
        no data passes through this process, so the array may be far larger
        than it could hold (generate, or read each block from shared storage).
        """
        _need_numpy()
        n = _block_count(rows, shards, None)
        bounds = _bounds(rows, n)
        targets = _place(n, placement)
        blocks = []
        try:
            for target in targets:
                b = ArrayBlock(None)
                b.make_persistent(backend=target)
                blocks.append(b)
            t = _tasks()
            futures = [t.fill(b, fn, lo, hi, tuple(args), dict(kwargs or {})) for b, (lo, hi) in zip(blocks, bounds)]
            infos = [f.result() for f in futures]
            # The blocks were empty when the runtime first weighed them for locality.
            _forget_sizes([b.getID() for b in blocks])
        except BaseException:
            _delete_quietly(blocks)
            raise
        tails = {info[1] for info in infos}
        dtypes = {info[2] for info in infos}
        if len(tails) > 1 or len(dtypes) > 1:
            _delete_quietly(blocks)
            raise ConfigurationError(
                f"from_function: blocks disagree on row shape or dtype ({sorted(tails)}, {sorted(dtypes)})"
            )
        return cls._finish(blocks, [lo for lo, _ in bounds] + [rows], infos[0][1], np.dtype(infos[0][2]), alias)

    @classmethod
    def _finish(cls, blocks, starts, tail, dtype, alias) -> "ShardedArray":
        meta = {"starts": list(starts), "tail": list(tail), "dtype": dtype.str}
        return cls(_new_manifest(cls._kind, blocks, meta, alias))

    # -- shape -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        """Rows, then the blocks' other dimensions."""
        return (self._starts[-1],) + self._tail

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return 1 + len(self._tail)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array (over every block)."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"<ShardedArray shape={self.shape} dtype={self.dtype} blocks={self.nshards} id={self.getID()}>"

    def _rows(self, i: int) -> tuple[int, int]:
        return self._starts[i], self._starts[i + 1]

    def _row_bytes(self) -> int:
        return int(np.prod(self._tail, dtype=np.int64)) * self.dtype.itemsize

    def _shard_bytes(self) -> list[int]:
        rb = self._row_bytes()
        return [(self._starts[i + 1] - self._starts[i]) * rb for i in range(self.nshards)]

    # -- reading -----------------------------------------------------------------------------
    def to_numpy(self) -> "np.ndarray":
        """The whole array in this process (blocks fetched in parallel into one array)."""
        out = np.empty(self.shape, self.dtype)

        def fetch(i):
            lo, hi = self._rows(i)
            if hi > lo:
                out[lo:hi] = self._parts[i].read()

        _parallel(fetch, range(self.nshards))
        return out

    def __array__(self, dtype=None, copy=None):
        a = self.to_numpy()
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, index):
        """Rows by int or slice (any step), optionally with more indices for the other axes.

        Only the blocks holding the selected rows are asked, each for just its
        part (further indices are applied where the block lives).
        """
        first, rest = (index[0], tuple(index[1:])) if isinstance(index, tuple) and index else (index, ())
        if any(r is Ellipsis for r in rest) or first is Ellipsis:
            raise InvalidKey("ShardedArray indexing does not take Ellipsis")
        n = len(self)
        if isinstance(first, slice):
            rng = range(*first.indices(n))
            if rng.step < 0:
                return self._take_range(rng[::-1], rest)[::-1]
            return self._take_range(rng, rest)
        if hasattr(first, "__index__") and not isinstance(first, bool):
            i = first.__index__()
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"index {first} is out of bounds for axis 0 with size {n}")
            b = bisect.bisect_right(self._starts, i) - 1
            return self._parts[b].read((i - self._starts[b],) + rest)
        raise InvalidKey(f"a ShardedArray takes an int or a slice on its first axis, not {type(first).__name__}")

    def _take_range(self, rng: range, rest: tuple):
        pieces = []
        if len(rng):
            start, stop, step = rng.start, rng[-1] + 1, rng.step
            first_b = bisect.bisect_right(self._starts, start) - 1
            for b in range(first_b, self.nshards):
                bs, be = self._rows(b)
                if bs >= stop:
                    break
                lo = max(start, bs)
                r0 = start + math.ceil((lo - start) / step) * step
                hi = min(stop, be)
                if r0 >= hi:
                    continue
                pieces.append((b, slice(r0 - bs, hi - bs, step)))
        if not pieces:
            return np.empty((0,) + self._tail, self.dtype)[(slice(None),) + rest]
        got = _parallel(lambda p: self._parts[p[0]].read((p[1],) + rest), pieces)
        return got[0] if len(got) == 1 else np.concatenate(got, axis=0)

    # -- work next to the blocks ---------------------------------------------------------------
    def map_blocks(self, fn: Callable, *args: Any, **kwargs: Any) -> list:
        """One task per block, run where the block lives: ``fn(block_array, *args, **kwargs)``.

        Returns the tasks' futures, in block order (``runtime.wait_on`` them).
        """
        return self._submit_each(_tasks().map, fn, args, kwargs)

    def update_blocks(self, fn: Callable, *args: Any, **kwargs: Any) -> list:
        """Change each block in place, where it lives: ``fn(block_array, ...)`` may modify
        the array and return None, or return the new block (same number of rows).

        The tasks write their block (INOUT), so later tasks on it wait for them.
        Returns futures, in block order.
        """
        return self._submit_each(_tasks().update, fn, args, kwargs)

    def reduce(self, fn: Callable, *, chunk: Callable | None = None, initial: Any = _NoValue) -> Any:
        """Fold the array with ``fn``; returns one future.

        Each block is first reduced where it lives, by ``chunk(block_array)``
        if given, else ``fn.reduce(block, axis=0)`` for a numpy ufunc (so
        ``x.reduce(np.add)`` sums columns), else ``functools.reduce(fn, rows)``.
        Then one task folds the partial results with ``fn`` (after ``initial``).
        """
        return self._reduce(fn, chunk, initial)


def _block_count(rows: int, shards: int | None, block_rows: int | None) -> int:
    if shards is not None and block_rows is not None:
        raise ConfigurationError("give shards or block_rows, not both")
    if block_rows is not None:
        if block_rows < 1:
            raise ConfigurationError(f"block_rows must be >= 1, not {block_rows}")
        return max(1, math.ceil(rows / block_rows))
    if shards is None:
        shards = len(_up_backends())
    if shards < 1:
        raise ConfigurationError(f"a collection needs at least one shard, not {shards}")
    return shards


def _bounds(rows: int, n: int) -> list[tuple[int, int]]:
    """n contiguous row ranges covering rows, sizes differing by at most one."""
    cuts = [rows * i // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


# -- StorageDict -----------------------------------------------------------------------------


class StorageDict(_Collection, MutableMapping):
    """A persistent dict whose keys are hashed over shards (:class:`DictShard`) on backends.

    ``StorageDict(shards=N, alias=...)`` makes an empty one; :meth:`from_iterable`
    fills one from pairs in batches; :meth:`load` reopens one. It is a
    ``MutableMapping``: ``d[k]``, ``d[k] = v``, ``del d[k]``, ``k in d``,
    ``len(d)``, iteration, ``items()``, ``update()``. Each single-key
    operation is one call to the key's shard. Keys are None, bool, int,
    float, str, bytes or tuples of those (placed by a hash that every
    process agrees on); values are anything picklable.
    """

    _kind = "dict"

    def __init__(
        self, shards: int | None = None, *, alias: str | None = None, placement=None, _manifest: _Manifest | None = None
    ):
        if _manifest is None:
            n = shards if shards is not None else len(_up_backends())
            targets = _place(n, placement)
            parts: list = []
            try:
                for t in targets:
                    s = DictShard()
                    s.make_persistent(backend=t)
                    parts.append(s)
            except BaseException:
                _delete_quietly(parts)
                raise
            _manifest = _new_manifest(self._kind, parts, {}, alias)
        _Collection.__init__(self, _manifest)

    @classmethod
    def load(cls, alias: str) -> "StorageDict":
        """Reopen the StorageDict persisted under ``alias`` (raises AliasNotFound)."""
        return cls(_manifest=api.get_by_alias(alias))

    @classmethod
    def get_by_id(cls, object_id: str) -> "StorageDict":
        """Reopen the StorageDict whose manifest has this id."""
        return cls(_manifest=api.get_by_id(object_id))

    def __reduce__(self):
        return (_load_dict, (self._manifest,))

    @classmethod
    def from_iterable(
        cls,
        items: Any,
        shards: int | None = None,
        *,
        alias: str | None = None,
        placement: Any = None,
        batch: int = DICT_BATCH,
    ) -> "StorageDict":
        """A new StorageDict filled from a mapping or an iterable of (key, value) pairs.

        Pairs are consumed lazily and sent to their shard ``batch`` at a time,
        so memory holds at most ``batch`` pairs per shard, whatever the total.
        """
        d = cls(shards, alias=alias, placement=placement)
        try:
            d.update(items, batch=batch)
        except BaseException:
            d.delete()
            raise
        return d

    def _shard(self, key):
        return self._parts[shard_of(key, len(self._parts))]

    def __getitem__(self, key):
        found, value = self._shard(key).lookup([key])[0]
        if not found:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        found, value = self._shard(key).lookup([key])[0]
        return value if found else default

    def get_many(self, keys: Iterable, default: Any = None) -> list:
        """Values of many keys (``default`` where missing): one call per shard, in parallel."""
        keys = list(keys)
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(shard_of(k, len(self._parts)), []).append(i)
        out = [default] * len(keys)

        def ask(item):
            s, idx = item
            for i, (found, v) in zip(idx, self._parts[s].lookup([keys[i] for i in idx])):
                if found:
                    out[i] = v

        _parallel(ask, list(groups.items()))
        return out

    def __setitem__(self, key, value) -> None:
        self._shard(key).store_items([(key, value)])

    def __delitem__(self, key) -> None:
        if not self._shard(key).remove(key):
            raise KeyError(key)

    def __contains__(self, key) -> bool:
        return self._shard(key).lookup([key])[0][0]

    def __len__(self) -> int:
        return sum(_parallel(lambda p: p.size(), self._parts))

    def __iter__(self) -> Iterator:
        for part in self._parts:
            yield from part.keys_list()

    # Lists, not views: one call per shard rather than one per key.
    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        """(key, value) pairs, shard by shard."""
        return [kv for part in self._parts for kv in part.items_list()]

    def values(self) -> list[Any]:  # type: ignore[override]
        """Values, shard by shard."""
        return [v for _, v in self.items()]

    def to_dict(self) -> dict:
        """A plain dict of everything (shards fetched in parallel)."""
        out: dict = {}
        for pairs in _parallel(lambda p: p.items_list(), self._parts):
            out.update(pairs)
        return out

    def update(self, other: Any = (), /, batch: int = DICT_BATCH, **kw: Any) -> None:
        """Set many pairs, grouped by shard: one call per ``batch`` pairs per shard."""
        if batch < 1:
            raise ConfigurationError(f"batch must be >= 1, not {batch}")
        pairs = other.items() if hasattr(other, "items") else other
        n = len(self._parts)
        buffers: list[list] = [[] for _ in range(n)]
        for k, v in itertools.chain(pairs, kw.items()):
            s = shard_of(k, n)
            buffers[s].append((k, v))
            if len(buffers[s]) >= batch:
                self._parts[s].store_items(buffers[s])
                buffers[s] = []
        _parallel(lambda s: self._parts[s].store_items(buffers[s]), [s for s in range(n) if buffers[s]])

    def clear(self) -> None:
        """Remove every key (one call per shard)."""
        _parallel(lambda p: p.clear_all(), self._parts)

    def __repr__(self) -> str:
        return f"<StorageDict shards={self.nshards} id={self.getID()}>"

    def _shard_bytes(self) -> list[int]:
        return _parallel(lambda p: p.size(), self._parts)

    def map_blocks(self, fn: Callable, *args: Any, **kwargs: Any) -> list:
        """One task per shard, run where it lives: ``fn(shard_dict, *args, **kwargs)``; futures."""
        return self._submit_each(_tasks().map_shard, fn, args, kwargs)

    def reduce(self, fn: Callable, *, chunk: Callable | None = None, initial: Any = _NoValue) -> Any:
        """Fold the values with ``fn``; one future.

        Each shard is reduced where it lives (``chunk(shard_dict)`` if given,
        else ``functools.reduce(fn, values)``); one task folds the partials.
        """
        return self._reduce(fn, chunk, initial)


def _load_dict(manifest):
    return StorageDict(_manifest=manifest)
