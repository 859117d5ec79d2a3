"""A claypot cluster for the Node client's tests: started by test/*.test.js.

Starts an embedded Redis and two backends, makes a few objects persistent on
the second backend (their classes reach the cluster's code registry by value),
prints one JSON line (gateway address, token, backend ids) and runs until its
standard input closes. Run it with the Python that has claypot installed.
"""

import json
import sys

import numpy as np

from store import LocalCluster, StorageObject


class Counter(StorageObject):
    """A counter, and JSON values of every kind."""

    def __init__(self, start=0, label="counter"):
        self.value = start
        self.label = label

    def incr(self, by=1):
        self.value += by
        return self.value

    def explain(self):
        return {"value": self.value, "label": self.label, "tags": ["a", "b"], "ok": True}

    def fail(self, why):
        raise ValueError(f"refused: {why}")


class Field(StorageObject):
    """numpy arrays of several dtypes, byte orders and sizes."""

    def __init__(self, n):
        self.samples = np.arange(n, dtype=np.float64) * 0.5
        self.counts = np.arange(12, dtype=np.int64).reshape(3, 4) - 6
        self.big_endian = np.arange(5, dtype=">i4") * 1000
        self.grid = np.arange(6, dtype=np.float32).reshape(2, 3)
        self.flags = np.array([True, False, True])
        self.name = "field"

    def scaled(self, k, offset=0.0):
        return self.samples * k + offset

    def describe(self, attr):
        """What numpy sees in an attribute: checks a write from another language."""
        a = getattr(self, attr)
        return {"dtype": a.dtype.name, "shape": list(a.shape), "native": a.dtype.isnative,
                "sum": float(np.asarray(a, dtype=np.float64).sum()),
                "first": a.flat[0].item() if a.size else None,
                "last": a.flat[-1].item() if a.size else None}


def main():
    with LocalCluster(backends=2) as cluster:
        gateway, owner = cluster.backends
        Counter(5).make_persistent(alias="counter", backend=owner)
        Field(1_000_000).make_persistent(alias="field", backend=owner)   # 8 MB of float64
        address = next(b.address for b in cluster.client.backends() if b.backend_id == gateway)
        print(json.dumps({"address": address, "token": cluster.token,
                          "gateway": gateway, "owner": owner}), flush=True)
        sys.stdin.read()  # until the test closes our stdin (or dies)


if __name__ == "__main__":
    main()
