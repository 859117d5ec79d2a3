"""Many calls in flight: the asyncio API from one event loop against blocking calls
from threads and one after another, in the same run. Also how soon a cancelled
call frees its object. Prints one JSON document.

    python bench/bench_aio.py [--calls 4000] [--threads 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import store  # noqa: E402
from store import LocalCluster, StorageObject, readonly  # noqa: E402


class Counter(StorageObject):
    def __init__(self):
        self.value = 0

    @readonly
    def get(self):
        return self.value

    def spin(self, seconds):
        self.value = -1
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.005)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=4000)
    p.add_argument("--threads", type=int, default=16)
    a = p.parse_args()
    with LocalCluster(backends=2):
        objs = [Counter() for _ in range(8)]
        for o in objs:
            o.make_persistent()
        n = a.calls
        for o in objs:  # warm up channels and caches, both APIs
            o.get()
        asyncio.run(_gather([o.get.aio for o in objs]))

        t = time.perf_counter()
        for i in range(n):
            objs[i % 8].get()
        sequential = n / (time.perf_counter() - t)

        with ThreadPoolExecutor(a.threads) as pool:
            t = time.perf_counter()
            list(pool.map(lambda i: objs[i % 8].get(), range(n)))
            threaded = n / (time.perf_counter() - t)

        async def many():
            t = time.perf_counter()
            await asyncio.gather(*(objs[i % 8].get.aio() for i in range(n)))
            return n / (time.perf_counter() - t)

        aio_rate = asyncio.run(many())

        # Cancel: a client deadline of 0.5 s on a method that would run 60 s; how long
        # until the next call on the same object answers.
        c = store.client()
        saved = c.settings
        c.settings = saved.replace(call_timeout=0.5)
        target = objs[0]
        t = time.perf_counter()
        try:
            target.spin(60)
        except store.errors.DeadlineExceeded:
            pass
        c.settings = saved
        target.get()
        freed_after = time.perf_counter() - t - 0.5

    print(
        json.dumps(
            {
                "calls": n,
                "threads": a.threads,
                "sequential_calls_per_s": round(sequential),
                "threads_calls_per_s": round(threaded),
                "aio_one_loop_calls_per_s": round(aio_rate),
                "aio_vs_sequential": round(aio_rate / sequential, 2),
                "aio_vs_threads": round(aio_rate / threaded, 2),
                "cancelled_call_frees_object_s": round(freed_after, 3),
            },
            indent=2,
        )
    )


async def _gather(fns):
    await asyncio.gather(*(f() for f in fns))


if __name__ == "__main__":
    main()
