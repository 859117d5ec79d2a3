"""The digits example with a TensorFlow/Keras model: data-parallel training next to the shards.

Same data and shape as ``digits_training.py``: scikit-learn's bundled digits
in a :class:`store.collections.ShardedArray`, the model's weights in one
persistent object. The model is a ``keras.Sequential``; each backend builds it
once (per process) and, each epoch, a task per block loads the current
weights into it and computes the gradients of the block's loss with
``tf.GradientTape`` where the block lives. One task averages them into the
weights (INOUT) with momentum. Weights travel as numpy arrays, so the store
needs nothing TensorFlow-specific.

    pip install tensorflow-cpu scikit-learn
    python examples/digits_keras.py

Prints ``key=value`` lines (accuracy, time); with no cluster address it starts
a local one.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out

import store  # noqa: E402
from runtime import COLLECTION_IN, INOUT, task, wait_on  # noqa: E402
from store import LocalCluster, StorageObject, readonly  # noqa: E402
from store.collections import ShardedArray  # noqa: E402

FEATURES, HIDDEN, CLASSES = 64, 32, 10


def load(seed: int = 0, test_fraction: float = 0.2):
    """(train, test) arrays of rows [64 pixels scaled to 0..1 | label], shuffled once."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = np.column_stack([digits.data / 16.0, digits.target]).astype(np.float32)
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    cut = int(len(rows) * (1 - test_fraction))
    return rows[:cut], rows[cut:]


def keras_model():
    """This process's Keras model (built once: backends run many tasks)."""
    import tensorflow as tf

    # The task functions are shipped by value, so their module globals are new on each
    # call; the tensorflow module lives as long as the backend process does.
    model = getattr(tf, "_claypot_digits_model", None)
    if model is None:
        model = tf.keras.Sequential(
            [
                tf.keras.Input(shape=(FEATURES,)),
                tf.keras.layers.Dense(HIDDEN, activation="relu"),
                tf.keras.layers.Dense(CLASSES),
            ]
        )
        tf._claypot_digits_model = model
    return model


class Weights(StorageObject):
    """The Keras model's weights, as numpy arrays (kernel, bias of each Dense layer)."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.params = [
            (rng.normal(size=(FEATURES, HIDDEN)) * np.sqrt(2.0 / FEATURES)).astype(np.float32),
            np.zeros(HIDDEN, np.float32),
            (rng.normal(size=(HIDDEN, CLASSES)) * np.sqrt(1.0 / HIDDEN)).astype(np.float32),
            np.zeros(CLASSES, np.float32),
        ]
        self.velocity = [np.zeros_like(p) for p in self.params]

    @readonly
    def weights(self) -> list:
        return self.params


@task(returns=1)
def gradient(block, weights):
    """Loss and gradients of the Keras model over one block, where the block lives."""
    import tensorflow as tf

    model = keras_model()
    model.set_weights(weights.weights())
    data = block.data  # the block's live array
    x = tf.constant(data[:, :-1])
    y = tf.constant(data[:, -1].astype(np.int64))
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    return [g.numpy() for g in grads], float(loss), len(data), os.getpid()


@task(weights=INOUT, grads=COLLECTION_IN, returns=1)
def apply(weights, grads, lr, momentum):
    """Average the blocks' gradients (weighted by rows) into the weights, with momentum."""
    total = sum(g[2] for g in grads)
    for i in range(len(weights.params)):
        step = sum(g[0][i] * g[2] for g in grads) / total
        weights.velocity[i] = momentum * weights.velocity[i] - lr * step
        weights.params[i] = weights.params[i] + weights.velocity[i]
    return sum(g[1] * g[2] for g in grads) / total


def correct(data, params):
    """Rows of one block the Keras model classifies right, and rows (a map_blocks function)."""
    model = keras_model()
    model.set_weights(params)
    logits = model(data[:, :-1], training=False).numpy()
    return int((logits.argmax(axis=1) == data[:, -1].astype(np.int64)).sum()), len(data)


def train(epochs: int = 60, lr: float = 0.5, momentum: float = 0.9, shards: int = 4) -> dict:
    train_rows, test_rows = load()
    started = time.perf_counter()
    train_set = ShardedArray.from_numpy(train_rows, shards=shards)
    test_set = ShardedArray.from_numpy(test_rows, shards=2)
    owners = [p.backend for p in train_set.partitions()]
    weights = Weights()
    weights.make_persistent(backend=owners[0])
    # The first epoch imports TensorFlow in each backend: time it apart from the rest.
    wait_on([gradient(block, weights) for block in train_set.split()])
    t0 = time.perf_counter()
    losses, every = [], []
    for _ in range(epochs):
        grads = [gradient(block, weights) for block in train_set.split()]
        losses.append(apply(weights, grads, lr, momentum))
        every.append(grads)
    losses = wait_on(losses)
    train_seconds = time.perf_counter() - t0
    pids = {b.backend_id: b.pid for b in store.backends() if b.up}
    local = all(g.backend == o and g.result()[3] == pids[o] for grads in every for o, g in zip(owners, grads))
    params = weights.weights()
    right = wait_on(test_set.map_blocks(correct, params))
    result = {
        "dataset": "sklearn.datasets.load_digits",
        "model": "keras.Sequential",
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "shards": train_set.nshards,
        "epochs": epochs,
        "initial_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
        "test_accuracy": round(sum(r for r, _ in right) / len(test_rows), 4),
        "train_seconds": round(train_seconds, 3),
        "epochs_per_second": round(epochs / train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 3),
        "gradients_ran_where_shards_live": local,
    }
    train_set.delete()
    test_set.delete()
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
