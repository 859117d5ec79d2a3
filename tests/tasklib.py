"""Objects and tasks shared by the runtime tests (default executor and Dask)."""

from __future__ import annotations

import time

from runtime import INOUT, task
from store import StorageObject


class Block(StorageObject):
    def __init__(self, data):
        self.data = data


class Log(StorageObject):
    def __init__(self):
        self.items = []

    def add(self, x):
        self.items.append(x)


@task(returns=1)
def block_sum(b):
    return float(b.data.sum())


@task(b=INOUT)
def scale(b, factor):
    b.data *= factor


@task(returns=1)
def add(x, y):
    return x + y


@task(returns=1)
def inc(x):
    return x + 1


@task(log=INOUT)
def append(log, x, pause=0.0):
    time.sleep(pause)
    log.add(x)


@task(returns=1)
def snapshot(log):
    return list(log.items)
