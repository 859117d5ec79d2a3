"""Data-parallel linear regression with claypot tasks and numpy.

The model's weights live in one persistent object; the training data is cut
into shards that live on two backends. Each step computes a gradient per
shard *on the backend that holds the shard* (no data moves, only the small
gradient comes back), then one task averages them into the weights (INOUT,
so the next step's gradients wait for it).

    python examples/numpy_training.py

Prints ``key=value`` lines; with no cluster address it starts a local one.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import store  # noqa: E402
from runtime import COLLECTION_IN, INOUT, barrier, task, wait_on  # noqa: E402
from store import LocalCluster, StorageObject  # noqa: E402


class Shard(StorageObject):
    """A slice of the training set: features ``x`` and targets ``y``."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = x
        self.y = y


class Weights(StorageObject):
    """The model: weights ``w`` and bias ``b`` of y = x @ w + b."""

    def __init__(self, features: int):
        self.w = np.zeros(features)
        self.b = 0.0


@task(returns=1)
def gradient(shard, weights):
    """Mean squared error gradient and loss over one shard, computed where it lives."""
    w, b = weights.w, weights.b  # a small RPC to the weights' owner
    x, y = shard.x, shard.y  # the shard's live arrays: no copy
    err = x @ w + b - y
    return {
        "gw": 2.0 * x.T @ err / len(y),
        "gb": 2.0 * float(err.mean()),
        "loss": float((err**2).mean()),
        "n": len(y),
        "pid": os.getpid(),
    }


@task(weights=INOUT, grads=COLLECTION_IN, returns=1)
def apply(weights, grads, lr):
    """Average the shards' gradients (weighted by shard size) into the weights."""
    total = sum(g["n"] for g in grads)
    weights.w = weights.w - lr * sum(g["gw"] * g["n"] for g in grads) / total
    weights.b = weights.b - lr * sum(g["gb"] * g["n"] for g in grads) / total
    return sum(g["loss"] * g["n"] for g in grads) / total


def train(
    steps: int = 30, shards_per_backend: int = 2, rows: int = 5_000, features: int = 16, lr: float = 0.1, seed: int = 0
) -> dict:
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=features)
    backends = sorted(b.backend_id for b in store.backends() if b.up)
    pids = {b.backend_id: b.pid for b in store.backends() if b.up}
    shards = []
    for i in range(shards_per_backend * len(backends)):
        x = rng.normal(size=(rows, features))
        y = x @ true_w + 0.5 + rng.normal(scale=0.01, size=rows)
        s = Shard(x, y)
        s.make_persistent(backend=backends[i % len(backends)])
        shards.append(s)
    weights = Weights(features)
    weights.make_persistent(backend=backends[0])

    losses, local = [], True
    for _ in range(steps):
        grads = [gradient(s, weights) for s in shards]
        losses.append(apply(weights, grads, lr))
        # Where each gradient ran is recorded on its future: it must be the shard's owner.
        for s, g in zip(shards, grads):
            owner = s.__dict__["_claypot_backend"]
            local &= wait_on(g)["pid"] == pids[owner] and g.backend == owner
    barrier()
    losses = wait_on(losses)
    return {
        "initial_loss": losses[0],
        "final_loss": losses[-1],
        "steps": steps,
        "shards": len(shards),
        "gradients_ran_where_shards_live": local,
        "weight_error": float(np.abs(weights.w - true_w).max()),
    }


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
