"""Objects shared by the lifecycle tests (importable by backends through PYTHONPATH)."""

from __future__ import annotations

import os
import time

import numpy as np

from runtime import INOUT, task
from store import StorageObject, readonly


class Counter(StorageObject):
    def __init__(self, value: int = 0):
        self.value = value

    def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value

    def slow_incr(self, delay: float, by: int = 1) -> int:
        time.sleep(delay)
        self.value += by
        return self.value

    def incr_then_fail(self, by: int = 1) -> None:
        self.value += by
        raise ValueError("failed after changing the object")

    @readonly
    def get(self) -> int:
        return self.value

    def move_myself(self, backend_id: str) -> None:
        self.move(backend_id)

    def delete_myself(self) -> None:
        self.delete_persistent()


class Array(StorageObject):
    """A numpy array: over the out-of-band threshold, and over big_object when asked."""

    def __init__(self, n: int, fill: float = 0.0):
        self.data = np.full(n, fill, dtype=np.float64)

    def fill(self, value: float) -> None:
        self.data[:] = value

    def fill_slowly(self, value: float, seconds: float) -> None:
        """Half the array now, the rest after ``seconds``: a call in progress, half done."""
        half = len(self.data) // 2
        self.data[:half] = value
        time.sleep(seconds)
        self.data[half:] = value

    def fill_then_fail(self, value: float) -> None:
        self.data[: len(self.data) // 2] = value
        raise RuntimeError("failed half way")

    @readonly
    def values(self) -> list:
        """The distinct values in the array (cheap to compare)."""
        return sorted(float(v) for v in np.unique(self.data))

    @readonly
    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(self.data.tobytes()).hexdigest()


class SlowState(StorageObject):
    """Pickling or unpickling it takes ``delay`` seconds (a slow spill or load)."""

    def __init__(self, nbytes: int, delay: float):
        self.blob = bytes(nbytes)
        self.delay = delay

    def __getstate__(self):
        if os.environ.get("CLAYPOT_SLOW_STATE") == "1":
            time.sleep(self.delay)
        return dict(self.__dict__)

    def __setstate__(self, state):
        if os.environ.get("CLAYPOT_SLOW_STATE") == "1":
            time.sleep(state["delay"])
        self.__dict__.update(state)

    @readonly
    def touch(self) -> int:
        return len(self.blob)

    def poke(self) -> None:
        """A change (its bytes stay the same size)."""
        self.blob = bytes(len(self.blob))


class Items(StorageObject):
    def __init__(self):
        self.items: list = []

    def add(self, x) -> None:
        self.items.append(x)


@task(log=INOUT, time_out=0.5, on_failure="RETRY", retries=1)
def append_slow_first(log, marker_dir: str):
    """Appends 'once'; its first attempt runs past the time_out, later ones do not."""
    marker = os.path.join(marker_dir, "attempts")
    with open(marker, "a") as f:
        f.write("x")
    with open(marker) as f:
        attempt = len(f.read())
    log.add("once")
    if attempt == 1:
        time.sleep(1.5)


@task(returns=1)
def slow_value(x, seconds: float):
    time.sleep(seconds)
    return x


class Grow(StorageObject):
    """Small until ``grow`` makes it big (over a small big_object)."""

    def __init__(self):
        self.data = b"small"
        self.tag = 0

    def grow(self, n: int) -> None:
        self.data = np.ones(n, dtype=np.uint8)

    def settag(self, t: int) -> None:
        self.tag = t

    def slow(self, delay: float) -> None:
        time.sleep(delay)
        self.tag += 1000

    @readonly
    def info(self) -> tuple:
        return self.tag, len(self.data)


class DelayedState(StorageObject):
    """Unpickling it on a backend takes its ``delay`` seconds (a slow persist or move)."""

    def __init__(self, delay: float = 0.0):
        self.value = 0
        self.delay = delay

    def __setstate__(self, state):
        time.sleep(state.get("delay", 0))
        self.__dict__.update(state)

    def setdelay(self, delay: float) -> None:
        self.delay = delay

    def incr(self) -> int:
        self.value += 1
        return self.value

    @readonly
    def get(self) -> int:
        return self.value


class Sticky(StorageObject):
    def __init__(self):
        self.value = 0

    def incr_and_keep_lock(self) -> None:
        import threading

        self.value += 1
        self.guard = threading.Lock()  # the new state cannot be pickled

    @readonly
    def get(self) -> int:
        return self.value
