"""The README's first example: a counter that lives on a backend.

python examples/quickstart.py
"""

import os

import store
from store import LocalCluster, StorageObject, readonly


class Counter(StorageObject):
    def __init__(self, start=0):
        self.value = start

    def incr(self, by=1):
        self.value += by
        return self.value

    @readonly
    def where(self):
        return os.getpid()


def main() -> None:
    with LocalCluster(backends=2) as cluster:
        c = Counter(5)
        c.make_persistent(alias="c1", backend=cluster.backends[1])
        print("incr(2) ->", c.incr(2), "in backend pid", c.where(), "| this pid", os.getpid())
        c.value = 10
        same = Counter.get_by_alias("c1")
        print("get_by_alias('c1').incr() ->", same.incr())
        print("location:", c.get_location()[:8], "hosts:", store.get_locations(c.getID()))


if __name__ == "__main__":
    main()
