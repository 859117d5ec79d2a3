"""A parameter server on claypot: one persistent model, workers next to each data shard.

The training set is a :class:`store.collections.ShardedArray` made *on the
backends* (``from_function``: no row passes through this process); the model
is one persistent object, :class:`ParameterServer`. Two ways to train it:

- **synchronous**: each step, one task per shard computes the gradient of its
  block where the block lives (reading the model), then one task averages them
  into the model, declared ``INOUT``: the next step's gradient tasks wait for
  it, so every gradient sees the same weights.
- **asynchronous** (Hogwild-style SGD): one long task per shard loops on
  minibatches of its block: ``pull()`` the weights, compute a gradient, and
  ``push()`` it. Each push runs under the model's lock, so updates never tear,
  but workers do not wait for one another: a push may be computed on weights
  that others updated since (its *staleness* is reported). The model is an
  IN argument here on purpose: declaring it INOUT would make the runtime run
  the workers one after another.

    python examples/parameter_server.py

Prints ``key=value`` lines; with no cluster address it starts a local one.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import store  # noqa: E402
from runtime import COLLECTION_IN, INOUT, task, wait_on  # noqa: E402
from store import LocalCluster, StorageObject, readonly  # noqa: E402
from store.collections import ShardedArray  # noqa: E402

FEATURES = 20
SEED = 7


def make_rows(lo: int, hi: int, features: int, seed: int) -> np.ndarray:
    """Rows lo..hi of a linear regression set, [x | y], the same wherever they are made."""
    true_w = np.random.default_rng(seed).normal(size=features)
    rng = np.random.default_rng([seed, lo])
    x = rng.normal(size=(hi - lo, features))
    y = x @ true_w + 0.5 + rng.normal(scale=0.05, size=hi - lo)
    return np.column_stack([x, y]).astype(np.float64)


class ParameterServer(StorageObject):
    """The shared model: y = x @ w + b, with a version counted by pushes."""

    def __init__(self, features: int):
        self.w = np.zeros(features)
        self.b = 0.0
        self.version = 0

    @readonly
    def pull(self) -> tuple[np.ndarray, float, int]:
        """The current weights, bias and version."""
        return self.w, self.b, self.version

    def push(self, gw: np.ndarray, gb: float, lr: float, seen: int) -> int:
        """Apply one gradient computed on version ``seen``; returns its staleness."""
        self.w = self.w - lr * gw
        self.b = self.b - lr * gb
        self.version += 1
        return self.version - 1 - seen


def _gradient(data: np.ndarray, w: np.ndarray, b: float):
    x, y = data[:, :-1], data[:, -1]
    err = x @ w + b - y
    return 2.0 * x.T @ err / len(y), 2.0 * float(err.mean()), float((err**2).mean())


@task(returns=1)
def shard_gradient(block, model):
    """Full gradient over one block, where it lives (the block's array is not copied)."""
    w, b, _ = model.pull()
    gw, gb, loss = _gradient(block.data, w, b)
    return gw, gb, loss, len(block.data), os.getpid()


@task(model=INOUT, grads=COLLECTION_IN, returns=1)
def apply_mean(model, grads, lr):
    """Average the blocks' gradients (weighted by rows) into the model; the mean loss."""
    n = sum(g[3] for g in grads)
    model.w = model.w - lr * sum(g[0] * g[3] for g in grads) / n
    model.b = model.b - lr * sum(g[1] * g[3] for g in grads) / n
    model.version += 1
    return sum(g[2] * g[3] for g in grads) / n


@task(returns=1)
def async_worker(block, model, steps, batch, lr, seed):
    """Hogwild SGD on one block: pull, minibatch gradient, push; ``steps`` times."""
    rng = np.random.default_rng(seed)
    data = block.data
    stale = []
    for _ in range(steps):
        w, b, seen = model.pull()
        rows = data[rng.integers(0, len(data), size=batch)]
        gw, gb, _ = _gradient(rows, w, b)
        stale.append(model.push(gw, gb, lr, seen))
    return os.getpid(), max(stale), float(np.mean(stale))


def block_loss(data, w, b):
    """Sum of squared errors and rows of one block (a map_blocks function)."""
    x, y = data[:, :-1], data[:, -1]
    err = x @ w + b - y
    return float((err**2).sum()), len(y)


def loss_of(data: ShardedArray, model: ParameterServer) -> float:
    w, b, _ = model.pull()
    parts = wait_on(data.map_blocks(block_loss, w, b))
    return sum(s for s, _ in parts) / sum(n for _, n in parts)


def train(
    rows: int = 40_000, shards: int = 4, sync_steps: int = 40, async_steps: int = 150, lr: float = 0.1, batch: int = 64
) -> dict:
    data = ShardedArray.from_function(make_rows, rows, shards, args=(FEATURES, SEED))
    pids = {b.backend_id: b.pid for b in store.backends() if b.up}
    owners = [p.backend for p in data.partitions()]
    out: dict = {"rows": rows, "shards": shards, "backends": len(set(owners))}

    # Synchronous: every step sees the same weights everywhere.
    model = ParameterServer(FEATURES)
    model.make_persistent(backend=owners[0])
    out["initial_loss"] = loss_of(data, model)
    t0 = time.perf_counter()
    every = []
    for _ in range(sync_steps):
        grads = [shard_gradient(block, model) for block in data.split()]
        apply_mean(model, grads, lr)
        every.append(grads)
    wait_on(model)  # returns once every task that uses the model has finished
    local = all(
        g.backend == owner and g.result()[4] == pids[owner] for grads in every for owner, g in zip(owners, grads)
    )
    out["sync_final_loss"] = loss_of(data, model)
    out["sync_seconds"] = round(time.perf_counter() - t0, 3)
    out["sync_steps"] = sync_steps
    out["sync_version"] = model.version

    # Asynchronous: the workers push as they go.
    model = ParameterServer(FEATURES)
    model.make_persistent(backend=owners[0])
    t0 = time.perf_counter()
    workers = [async_worker(block, model, async_steps, batch, lr * 0.2, i) for i, block in enumerate(data.split())]
    results = wait_on(workers)
    out["async_seconds"] = round(time.perf_counter() - t0, 3)
    out["async_final_loss"] = loss_of(data, model)
    out["async_pushes"] = model.version
    out["async_max_staleness"] = max(r[1] for r in results)
    out["async_mean_staleness"] = round(float(np.mean([r[2] for r in results])), 3)
    for owner, f, r in zip(owners, workers, results):
        local &= f.backend == owner and r[0] == pids[owner]
    out["gradients_ran_where_shards_live"] = local
    data.delete()
    return out


def main() -> None:
    if os.environ.get("CLAYPOT_ADDRESS"):
        store.connect()
        result = train()
    else:
        with LocalCluster(backends=2):
            result = train()
    for k, v in result.items():
        print(f"{k}={v}")


if __name__ == "__main__":
    main()
