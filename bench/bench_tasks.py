"""Task runtime benchmark: throughput, latency, and locality of a 64 MiB argument.

    python bench/bench_tasks.py [--tasks 2000] [--latency 300] [--big-mib 64]

Starts a local cluster of 2 backends and prints one JSON document:

- ``throughput``: tiny tasks submitted in one batch, then waited for, in
  tasks/s; beside it a ``concurrent.futures`` thread pool running the same
  function in this process (the floor of any task system: no RPC at all).
- ``latency``: one task at a time (submit, wait), p50/p99 in ms; beside it the
  thread pool's submit-and-wait, and a bare ``run_task`` RPC (the runtime's
  own cost is the difference).
- ``big_argument``: a task over a 64 MiB array run on the backend that holds
  it (chosen by the runtime) versus the same function sent to the other
  backend, which must fetch the array; and an empty task for reference.
- ``dask`` (when ``dask[distributed]`` is installed, otherwise the reason it
  was skipped): the cluster runs with ``dask=True``, so each backend hosts a
  Dask worker and one Dask scheduler serves the run. The same 64 MiB task on
  Dask with the array scattered to the owner's worker (``client.scatter``,
  then a task on it), interleaved with the claypot task on the owning backend,
  and their ratio; the claypot task sent through the Dask executor
  (``runtime.use_executor("dask")``); tiny-task latency of a bare Dask submit
  and of a claypot task through Dask, and a burst of tiny tasks through the
  Dask executor, for reference.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime._core  # noqa: E402
from bench.common import timed as timed_us  # noqa: E402
import store  # noqa: E402
from runtime import task, wait_on  # noqa: E402
from store import LocalCluster, StorageObject  # noqa: E402


class Block(StorageObject):
    def __init__(self, data):
        self.data = data


def tiny(x):
    return x


def touch(b):
    # Reads the array the way real work would start, without doing the work:
    # the cost measured is getting at the data, not summing it.
    return float(b.data[-1])


def touch_array(a):
    # The Dask twin of touch(): the scattered array is the argument itself.
    return float(a[-1])


def empty():
    return None


def ms(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {
        "p50_ms": round(1000 * statistics.median(samples), 3),
        "p99_ms": round(1000 * samples[min(len(samples) - 1, int(0.99 * len(samples)))], 3),
        "mean_ms": round(1000 * statistics.fmean(samples), 3),
        "n": len(samples),
    }


def timed(fn, n: int, warmup: int = 10) -> list[float]:
    """Seconds each of ``n`` calls took (bench.common.timed gives µs)."""
    return [us / 1e6 for us in timed_us(fn, n, warmup)]


def bench_throughput(n: int) -> dict:
    tiny_task = task(returns=1)(tiny)
    wait_on([tiny_task(i) for i in range(100)])  # ship the function, warm the pool
    executor = runtime._core.current().executor
    rpcs = executor.rpcs
    t = time.perf_counter()
    futures = [tiny_task(i) for i in range(n)]
    submitted = time.perf_counter() - t
    assert wait_on(futures) == list(range(n))
    runtime_s = time.perf_counter() - t
    with ThreadPoolExecutor(max_workers=16) as pool:
        t = time.perf_counter()
        assert [f.result() for f in [pool.submit(tiny, i) for i in range(n)]] == list(range(n))
        pool_s = time.perf_counter() - t
    return {
        "tasks": n,
        "rpcs": executor.rpcs - rpcs,
        "claypot_tasks_per_s": round(n / runtime_s),
        "claypot_submit_per_s": round(n / submitted),
        "thread_pool_tasks_per_s": round(n / pool_s),
    }


def bench_latency(n: int) -> dict:
    tiny_task = task(returns=1)(tiny)
    client = store.client()
    key = client.register_code(tiny)
    backend = sorted(b.backend_id for b in store.backends() if b.up)[0]
    with ThreadPoolExecutor(max_workers=1) as pool:
        return {
            "claypot_task": ms(timed(lambda: wait_on(tiny_task(1)), n)),
            "bare_run_task_rpc": ms(timed(lambda: client.run_task(backend, key, (1,), {}, []), n)),
            "thread_pool": ms(timed(lambda: pool.submit(tiny, 1).result(), n)),
        }


def bench_big(mib: int, n: int) -> dict:
    ids = sorted(b.backend_id for b in store.backends() if b.up)
    owner, other = ids[0], ids[1]
    block = Block(np.ones(mib * 2**20 // 8))
    t = time.perf_counter()
    block.make_persistent(backend=owner)
    persist_s = time.perf_counter() - t
    # A big object is checkpointed behind the acknowledgement (write-behind); let that
    # finish so it does not weigh on the first runs.
    time.sleep(3)
    touch_task = task(returns=1)(touch)
    empty_task = task(returns=1)(empty)
    f = touch_task(block)
    assert wait_on(f) == 1.0 and f.backend == owner
    # Interleaved, so background work on the machine (the new object's checkpoint,
    # other processes) weighs on both series alike.
    local, empty_s = [], []
    for i in range(n + 3):
        a = timed(lambda: wait_on(touch_task(block)), 1, warmup=0)
        b = timed(lambda: wait_on(empty_task()), 1, warmup=0)
        if i >= 3:
            local += a
            empty_s += b
    client = store.client()
    key = client.register_code(touch)
    # The same function forced onto the other backend: its proxy must fetch the array.
    remote = timed(lambda: client.run_task(other, key, (block,), {}, []), max(3, n // 10), warmup=1)
    return {
        "array_mib": mib,
        "persist_s": round(persist_s, 3),
        "on_owner": ms(local),
        "on_other_backend": ms(remote),
        "empty_task": ms(empty_s),
    }


def bench_dask(cluster: LocalCluster, mib: int, n: int, n_latency: int, n_burst: int) -> dict:
    try:
        from distributed import Client
    except ImportError:
        return {"skipped": "dask[distributed] is not installed"}
    owner = sorted(b.backend_id for b in store.backends() if b.up)[0]
    block = Block(np.ones(mib * 2**20 // 8))
    block.make_persistent(backend=owner)
    time.sleep(3)  # let the write-behind checkpoint of the new big object finish
    touch_task = task(returns=1)(touch)
    tiny_task = task(returns=1)(tiny)
    f = touch_task(block)
    assert wait_on(f) == 1.0 and f.backend == owner
    out: dict = {"array_mib": mib, "workers": "hosted by the claypot backends"}
    from store.certs import dask_security

    # The cluster's scheduler speaks tls:// only (see store.backend._service.server.check_listen).
    with Client(cluster.dask_scheduler, set_as_default=False, security=dask_security(cluster.dask_tls_dir)) as dc:
        arr = np.ones(mib * 2**20 // 8)
        t = time.perf_counter()
        [scattered] = dc.scatter([arr], workers=[owner])
        out["scatter_s"] = round(time.perf_counter() - t, 3)

        def dask_touch():
            assert dc.submit(touch_array, scattered, workers=[owner], pure=False).result() == 1.0

        def claypot_touch():
            assert wait_on(touch_task(block)) == 1.0

        dask_touch()
        # Interleaved, so background work on the machine weighs on both series alike.
        on_dask, on_claypot = [], []
        for i in range(n + 3):
            a = timed(dask_touch, 1, warmup=0)
            b = timed(claypot_touch, 1, warmup=0)
            if i >= 3:
                on_dask += a
                on_claypot += b
        out["task_on_scattered_array"] = ms(on_dask)
        out["claypot_task_on_owner"] = ms(on_claypot)
        out["dask_over_claypot_p50"] = round(statistics.median(on_dask) / statistics.median(on_claypot), 2)
        # A function of the script travels by value with every Dask task; an
        # importable one (operator.pos) by name: both, since Dask's cost differs.
        out["tiny_task_latency"] = ms(timed(lambda: dc.submit(tiny, 1, pure=False).result(), n_latency, warmup=10))
        out["tiny_task_latency_importable_fn"] = ms(
            timed(lambda: dc.submit(operator.pos, 1, pure=False).result(), n_latency, warmup=10)
        )
        scattered.release()  # frees the worker's copy before the next measurements
    # The runtime's own tasks, sent through Dask to the backends' hosted workers.
    runtime.use_executor("dask")
    try:
        f = touch_task(block)
        assert wait_on(f) == 1.0 and f.backend == owner
        via = {
            "task_on_owner": ms(timed(lambda: wait_on(touch_task(block)), n, warmup=3)),
            "tiny_task_latency": ms(timed(lambda: wait_on(tiny_task(1)), n_latency, warmup=10)),
        }
        t = time.perf_counter()
        assert wait_on([tiny_task(i) for i in range(n_burst)]) == list(range(n_burst))
        via["burst"] = {"tasks": n_burst, "tasks_per_s": round(n_burst / (time.perf_counter() - t))}
        out["claypot_via_dask_executor"] = via
    finally:
        runtime.use_executor(None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--latency", type=int, default=300)
    parser.add_argument("--big-mib", type=int, default=64)
    parser.add_argument("--big-runs", type=int, default=30)
    args = parser.parse_args()
    started = time.perf_counter()
    result = {"cpus": os.cpu_count()}
    try:
        import distributed  # noqa: F401

        with_dask = True
    except ImportError:
        with_dask = False
    # One cluster for the whole run; with Dask its backends also host Dask workers,
    # so both systems run their tasks in the same processes.
    with LocalCluster(backends=2, dask=with_dask) as cluster:
        result["throughput"] = bench_throughput(args.tasks)
        result["latency"] = bench_latency(args.latency)
        result["big_argument"] = bench_big(args.big_mib, args.big_runs)
        result["dask"] = bench_dask(cluster, args.big_mib, args.big_runs, args.latency, args.tasks // 2)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
