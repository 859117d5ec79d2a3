"""Data-parallel training of a small TensorFlow model with claypot tasks.

Same shape as ``numpy_training.py``: the model's weights live in one
persistent object, the data in shards on two backends. Each step, a task per
shard runs *on the backend that holds the shard* and computes the loss and
gradients with ``tf.GradientTape`` over the shard's live arrays; one task
then averages the gradients into the weights (INOUT). Weights are kept as
numpy arrays, so the object store needs nothing TensorFlow-specific.

    pip install tensorflow-cpu
    python examples/tensorflow_training.py

Prints ``key=value`` lines; with no cluster address it starts a local one.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out

import store  # noqa: E402
from runtime import COLLECTION_IN, INOUT, barrier, task, wait_on  # noqa: E402
from store import LocalCluster, StorageObject  # noqa: E402


class Shard(StorageObject):
    """A slice of the training set: features ``x`` and targets ``y`` (float32)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = x
        self.y = y


class Model(StorageObject):
    """An MLP's weights, one hidden layer: y = relu(x @ w1 + b1) @ w2 + b2."""

    def __init__(self, features: int, hidden: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.weights = [
            (rng.normal(size=(features, hidden)) / np.sqrt(features)).astype(np.float32),
            np.zeros(hidden, np.float32),
            (rng.normal(size=(hidden, 1)) / np.sqrt(hidden)).astype(np.float32),
            np.zeros(1, np.float32),
        ]


@task(returns=1)
def gradient(shard, model):
    """Loss and gradients over one shard, computed where the shard lives."""
    import tensorflow as tf

    params = [tf.Variable(w) for w in model.weights]  # a small RPC to the model's owner
    x = tf.constant(shard.x)  # the shard's live array, read in place
    y = tf.constant(shard.y)
    with tf.GradientTape() as tape:
        hidden = tf.nn.relu(x @ params[0] + params[1])
        pred = tf.squeeze(hidden @ params[2] + params[3], axis=1)
        loss = tf.reduce_mean(tf.square(pred - y))
    grads = tape.gradient(loss, params)
    return {"grads": [g.numpy() for g in grads], "loss": float(loss), "n": int(y.shape[0]), "pid": os.getpid()}


@task(model=INOUT, results=COLLECTION_IN, returns=1)
def apply(model, results, lr):
    """Average the shards' gradients into the weights; returns the mean loss before the step."""
    total = sum(r["n"] for r in results)
    model.weights = [w - lr * sum(r["grads"][i] * r["n"] for r in results) / total for i, w in enumerate(model.weights)]
    return sum(r["loss"] * r["n"] for r in results) / total


def train(
    steps: int = 40,
    shards_per_backend: int = 2,
    rows: int = 2_000,
    features: int = 8,
    hidden: int = 16,
    lr: float = 0.05,
    seed: int = 0,
) -> dict:
    rng = np.random.default_rng(seed)
    up = [b for b in store.backends() if b.up]
    backends = sorted(b.backend_id for b in up)
    pids = {b.backend_id: b.pid for b in up}
    w_true = rng.normal(size=features)
    shards = []
    for i in range(shards_per_backend * len(backends)):
        x = rng.normal(size=(rows, features)).astype(np.float32)
        y = (np.sin(x @ w_true) + 0.5 * x[:, 0]).astype(np.float32)
        s = Shard(x, y)
        s.make_persistent(backend=backends[i % len(backends)])
        shards.append(s)
    model = Model(features, hidden, seed)
    model.make_persistent(backend=backends[0])

    losses, local = [], True
    for _ in range(steps):
        results = [gradient(s, model) for s in shards]
        losses.append(apply(model, results, lr))
        for s, r in zip(shards, results):
            owner = s.__dict__["_claypot_backend"]
            local &= wait_on(r)["pid"] == pids[owner] and r.backend == owner
    barrier()
    losses = wait_on(losses)
    return {
        "initial_loss": losses[0],
        "final_loss": losses[-1],
        "steps": steps,
        "shards": len(shards),
        "gradients_ran_where_shards_live": local,
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
