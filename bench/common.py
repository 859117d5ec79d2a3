"""What the benches share: a small persistent counter, timing, rates, the machine, output.

A bench imports it as ``from bench.common import ...`` after putting the
repository's root on ``sys.path`` (each bench does so first, to run from a
checkout as ``python bench/bench_x.py``). The counter's class is not
installed on the backends: it travels by value, like a user's class would.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from store import StorageObject, readonly


class Counter(StorageObject):
    """The benches' object: ``incr`` changes it, ``get`` is read-only."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value

    @readonly
    def get(self) -> int:
        return self.value


def timed(fn: Callable[[], Any], n: int, warmup: int = 200) -> list[float]:
    """µs each of ``n`` calls of ``fn`` took, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def percentiles(samples_us: Sequence[float]) -> dict[str, float]:
    """p50, p99 and mean of latencies in µs, rounded to 0.1 µs."""
    s = sorted(samples_us)
    return {
        "p50_us": round(s[len(s) // 2], 1),
        "p99_us": round(s[int(len(s) * 0.99)], 1),
        "mean_us": round(statistics.fmean(s), 1),
    }


def latency(fn: Callable[[], Any], n: int, warmup: int = 100) -> dict[str, float]:
    """Percentiles of ``n`` timed calls of ``fn``."""
    return percentiles(timed(fn, n, warmup))


def throughput(fns: Sequence[Callable[[], Any]], seconds: float) -> float:
    """Calls per second of ``fns`` (one thread each), each called in a loop for ``seconds``.

    A caller that raises stops, and its exception is raised here after the
    others stop: a failing caller must not pass for a slow one.
    """
    counts = [0] * len(fns)
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop(k: int) -> None:
        fn, n = fns[k], 0
        try:
            while not stop.is_set():
                fn()
                n += 1
        except Exception as exc:
            errors.append(exc)
        counts[k] = n

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(fns))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def machine(**extra: Any) -> dict[str, Any]:
    """The machine a run took place on: CPUs, 1-minute load average, Python, and ``extra``.

    The load average says whether the figures came from a busy machine.
    """
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        **extra,
    }


def emit(result: Any, path: str | None = None, indent: int = 2) -> str:
    """Print ``result`` as one JSON document, and write it to ``path`` too if given."""
    text = json.dumps(result, indent=indent)
    print(text, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text


__all__ = ["Counter", "emit", "latency", "machine", "percentiles", "throughput", "timed"]
