"""Train a small neural network on real data: scikit-learn's bundled handwritten digits.

The 1,797 8x8 images ship inside scikit-learn (``sklearn.datasets.load_digits``,
no download). Training and test rows become two
:class:`store.collections.ShardedArray`\\ s spread over the backends; the model
(a one-hidden-layer MLP in numpy) is one persistent object. Each epoch is
synchronous data-parallel gradient descent: one task per block computes the
gradient where the block lives, one task averages them into the model (INOUT).
Accuracy on the held-out rows is counted where those blocks live too.

    pip install scikit-learn
    python examples/digits_training.py

Prints ``key=value`` lines (accuracy, time); with no cluster address it starts
a local one.
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

CLASSES = 10


def load(seed: int = 0, test_fraction: float = 0.2):
    """(train, test) arrays of rows [64 pixels scaled to 0..1 | label], shuffled once."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = np.column_stack([digits.data / 16.0, digits.target]).astype(np.float32)
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    cut = int(len(rows) * (1 - test_fraction))
    return rows[:cut], rows[cut:]


class MLP(StorageObject):
    """Weights of softmax(relu(x @ w1 + b1) @ w2 + b2)."""

    def __init__(self, features: int, hidden: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.params = [
            (rng.normal(size=(features, hidden)) * np.sqrt(2.0 / features)).astype(np.float32),
            np.zeros(hidden, np.float32),
            (rng.normal(size=(hidden, CLASSES)) * np.sqrt(1.0 / hidden)).astype(np.float32),
            np.zeros(CLASSES, np.float32),
        ]
        self.velocity = [np.zeros_like(p) for p in self.params]

    @readonly
    def weights(self) -> list:
        return self.params


def forward(params, x):
    w1, b1, w2, b2 = params
    h = np.maximum(x @ w1 + b1, 0.0)
    logits = h @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return h, p


@task(returns=1)
def gradient(block, model):
    """Cross-entropy gradients over one block, computed where the block lives."""
    params = model.weights()
    data = block.data
    x, y = data[:, :-1], data[:, -1].astype(np.int64)
    h, p = forward(params, x)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    d = p.copy()
    d[np.arange(n), y] -= 1.0
    d /= n
    gw2, gb2 = h.T @ d, d.sum(axis=0)
    dh = (d @ params[2].T) * (h > 0)
    gw1, gb1 = x.T @ dh, dh.sum(axis=0)
    return [gw1, gb1, gw2, gb2], loss, n, os.getpid()


@task(model=INOUT, grads=COLLECTION_IN, returns=1)
def apply(model, grads, lr, momentum):
    """Average the blocks' gradients (weighted by rows) into the model, with momentum."""
    total = sum(g[2] for g in grads)
    for i in range(len(model.params)):
        step = sum(g[0][i] * g[2] for g in grads) / total
        model.velocity[i] = momentum * model.velocity[i] - lr * step
        model.params[i] = model.params[i] + model.velocity[i]
    return sum(g[1] * g[2] for g in grads) / total


def correct(data, params):
    """Rows of one block the model classifies right, and rows (a map_blocks function)."""
    _, p = forward(params, data[:, :-1])
    return int((p.argmax(axis=1) == data[:, -1].astype(np.int64)).sum()), len(data)


def train(epochs: int = 60, hidden: int = 32, lr: float = 0.5, momentum: float = 0.9, shards: int = 4) -> dict:
    train_rows, test_rows = load()
    started = time.perf_counter()
    train_set = ShardedArray.from_numpy(train_rows, shards=shards)
    test_set = ShardedArray.from_numpy(test_rows, shards=2)
    owners = [p.backend for p in train_set.partitions()]
    model = MLP(train_rows.shape[1] - 1, hidden)
    model.make_persistent(backend=owners[0])
    t0 = time.perf_counter()
    losses, every = [], []
    for _ in range(epochs):
        grads = [gradient(block, model) for block in train_set.split()]
        losses.append(apply(model, grads, lr, momentum))
        every.append(grads)
    losses = wait_on(losses)
    train_seconds = time.perf_counter() - t0
    pids = {b.backend_id: b.pid for b in store.backends() if b.up}
    local = all(g.backend == o and g.result()[3] == pids[o] for grads in every for o, g in zip(owners, grads))
    params = model.weights()
    right = wait_on(test_set.map_blocks(correct, params))
    train_right = wait_on(train_set.map_blocks(correct, params))
    result = {
        "dataset": "sklearn.datasets.load_digits",
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "shards": train_set.nshards,
        "epochs": epochs,
        "initial_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
        "train_accuracy": round(sum(r for r, _ in train_right) / len(train_rows), 4),
        "test_accuracy": round(sum(r for r, _ in right) / len(test_rows), 4),
        "train_seconds": round(train_seconds, 3),
        "epochs_per_second": round(epochs / train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 3),
        "gradients_ran_where_shards_live": local,
    }
    train_set.delete()
    test_set.delete()
    model.delete_persistent()
    return result


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
