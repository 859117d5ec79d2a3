"""Data-parallel training side by side: claypot, Dask and Ray, same data, same workers, one run.

    python bench/bench_training.py [--gib 4] [--shards 4] [--features 127] [--epochs 5]
                                   [--workers 2] [--out bench/results/training.json]

The workload is full-batch gradient descent for logistic regression over a
float32 matrix of ``--gib`` GiB, rows [x | label], cut into ``--shards``
row blocks. Every system:

- makes each block *on a worker* with the same function (:func:`make_block`),
  so no system pays for shipping the data set from this process, and the
  data is identical everywhere;
- runs ``--epochs`` epochs (after one warm-up epoch, not timed): per epoch,
  the gradient and loss of each block where the block is held, summed here,
  and one update of the weights here. The weights are a few hundred bytes,
  so what separates the systems is how each gets at the blocks.

Systems:

- **claypot**: a LocalCluster of ``--workers`` backends (durability ``none``,
  as the others keep nothing on disk); the data is a
  :class:`store.collections.ShardedArray` made with ``from_function``; an
  epoch is ``x.map_blocks(gradient, w)``: one task per block, run inside the
  backend process that holds it, over the live array.
- **dask**: ``distributed.LocalCluster`` with ``--workers`` worker processes
  of 2 threads; the data is a ``dask.array`` built from the same blocks and
  ``persist()``-ed; an epoch is the dask.array expression of the same
  gradient, computed.
- **ray**: ``ray.init(num_cpus=--workers)``; each block is the result of a
  task (so it lives in Ray's shared-memory object store); an epoch is one
  task per block (``ray.get`` of their results). Ray is not a dependency of
  claypot: if ``import ray`` fails, the JSON says so and the run goes on.

Then (``--driver-gib``, 1 by default) each system loads an array that this
process holds, in ``--shards`` blocks, the way its users would: claypot
``ShardedArray.from_numpy``, Dask ``da.from_array(...).persist()``, Ray
``ray.put`` per block; and one gradient over it is checked against numpy's.
That is where moving data separates them.

Measured per system: seconds to make the data, epochs per second, and the
peak memory of this process and all its child processes (the workers), as the
sum of their proportional set sizes (PSS: shared memory, such as Ray's object
store or claypot's same-host segments, counted once), sampled every 0.2 s.
Ratios are claypot's epochs/s over each other's, and their peak memory over
claypot's. The systems run one after another; each is shut down before the
next starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time

# One BLAS thread per worker thread in every system: the workers already use both cores,
# and oversubscribed BLAS threads would make the comparison a test of the OS scheduler.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEED = 11
GEN_ROWS = 1 << 16      # rows generated at a time while making a block


def make_block(index: int, rows: int, features: int, seed: int = SEED) -> np.ndarray:
    """Block ``index``: ``rows`` rows [x (features) | label], the same in every process."""
    true_w = np.random.default_rng(seed).standard_normal(features).astype(np.float32)
    rng = np.random.default_rng([seed, index])
    out = np.empty((rows, features + 1), np.float32)
    for lo in range(0, rows, GEN_ROWS):
        hi = min(rows, lo + GEN_ROWS)
        x = rng.standard_normal((hi - lo, features), dtype=np.float32)
        out[lo:hi, :features] = x
        noise = rng.standard_normal(hi - lo, dtype=np.float32)
        out[lo:hi, features] = (x @ true_w + noise > 0).astype(np.float32)
    return out


def gradient(block: np.ndarray, w: np.ndarray):
    """(gradient sum, loss sum, rows) of logistic regression over one block."""
    x, y = block[:, :-1], block[:, -1]
    z = x @ w
    p = 1.0 / (1.0 + np.exp(-z))
    g = x.T @ (p - y)
    # log(1 + e^z) - y z, computed stably
    loss = float((np.logaddexp(0.0, z) - y * z).sum())
    return g.astype(np.float64), loss, len(y)


def _claypot_block(lo: int, hi: int, rows_per_block: int, features: int) -> np.ndarray:
    return make_block(lo // rows_per_block, hi - lo, features)


# -- memory sampling ---------------------------------------------------------------------------

class PeakMemory:
    """Samples the PSS of this process and every descendant; keeps the peak of their sum."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def _epochs(step, epochs: int, lr: float, features: int, rows: int):
    """Run one warm-up and ``epochs`` timed epochs; (seconds, final mean loss, weights)."""
    w = np.zeros(features, np.float32)
    g, loss = step(w)
    w = (w - lr * g / rows).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(epochs):
        g, loss = step(w)
        w = (w - lr * g / rows).astype(np.float32)
    return time.perf_counter() - t0, loss / rows, w


def _sum(parts):
    g = sum(p[0] for p in parts)
    loss = sum(p[1] for p in parts)
    return g, loss


# -- the three systems -----------------------------------------------------------------------

def run_claypot(a) -> dict:
    from runtime import wait_on
    from store import LocalCluster
    from store.collections import ShardedArray
    rows = a.rows_per_block * a.shards
    out: dict = {}
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        with LocalCluster(backends=a.workers, durability="none"):
            out["start_seconds"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            x = ShardedArray.from_function(_claypot_block, rows, a.shards,
                                           args=(a.rows_per_block, a.features))
            out["make_data_seconds"] = round(time.perf_counter() - t0, 2)
            out["backends_used"] = len(set(p.backend for p in x.partitions()))

            def step(w):
                return _sum(wait_on(x.map_blocks(gradient, w)))
            seconds, loss, w = _epochs(step, a.epochs, a.lr, a.features, rows)
            x.delete()
            if a.driver is not None:
                t0 = time.perf_counter()
                y = ShardedArray.from_numpy(a.driver, shards=a.shards)
                out["ingest_seconds"] = round(time.perf_counter() - t0, 2)
                out["ingest_gib_per_s"] = round(a.driver.nbytes / 2**30 / (time.perf_counter()
                                                                           - t0), 2)
                g, _ = _sum(wait_on(y.map_blocks(gradient, w)))
                out["ingested_gradient_ok"] = bool(np.allclose(g, a.driver_gradient(w),
                                                               rtol=1e-3))
                y.delete()
    out.update(_result(a, seconds, loss, mem.peak))
    return out


def run_dask(a) -> dict:
    try:
        import dask
        import dask.array as da
        from distributed import Client, LocalCluster, wait
    except ImportError as exc:
        return {"skipped": f"dask[distributed] is not installed: {exc}"}
    rows = a.rows_per_block * a.shards
    out: dict = {"version": dask.__version__}
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        with LocalCluster(n_workers=a.workers, threads_per_worker=2, processes=True,
                          memory_limit=0, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            out["start_seconds"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            blocks = [da.from_delayed(dask.delayed(make_block)(i, a.rows_per_block, a.features),
                                      shape=(a.rows_per_block, a.features + 1),
                                      dtype=np.float32) for i in range(a.shards)]
            data = da.concatenate(blocks, axis=0).persist()
            wait(data)
            out["make_data_seconds"] = round(time.perf_counter() - t0, 2)
            x, y = data[:, :-1], data[:, -1]

            def step(w):
                z = x @ w
                p = 1.0 / (1.0 + da.exp(-z))
                g = x.T @ (p - y)
                loss = (da.logaddexp(0.0, z) - y * z).sum()
                g, loss = dask.compute(g, loss)
                return g.astype(np.float64), float(loss)
            seconds, loss, w = _epochs(step, a.epochs, a.lr, a.features, rows)
            del data, x, y
            if a.driver is not None:
                t0 = time.perf_counter()
                d = da.from_array(a.driver, chunks=(len(a.driver) // a.shards,
                                                    a.features + 1)).persist()
                wait(d)
                out["ingest_seconds"] = round(time.perf_counter() - t0, 2)
                out["ingest_gib_per_s"] = round(a.driver.nbytes / 2**30 / (time.perf_counter()
                                                                           - t0), 2)
                g = (d[:, :-1].T @ (1.0 / (1.0 + da.exp(-(d[:, :-1] @ w))) - d[:, -1])).compute()
                out["ingested_gradient_ok"] = bool(np.allclose(g, a.driver_gradient(w),
                                                               rtol=1e-3))
                del d
            client.close()
    out.update(_result(a, seconds, loss, mem.peak))
    return out


def run_ray(a) -> dict:
    try:
        import ray
    except ImportError as exc:
        return {"skipped": f"ray is not installed here ({exc}); pip install ray to compare"}
    rows = a.rows_per_block * a.shards
    out: dict = {"version": ray.__version__}
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        ray.init(num_cpus=a.workers, include_dashboard=False, log_to_driver=False,
                 object_store_memory=int((a.gib + 1.5) * 2**30))
        try:
            out["start_seconds"] = round(time.perf_counter() - t0, 2)
            make = ray.remote(make_block)
            grad = ray.remote(gradient)
            t0 = time.perf_counter()
            refs = [make.remote(i, a.rows_per_block, a.features) for i in range(a.shards)]
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
            out["make_data_seconds"] = round(time.perf_counter() - t0, 2)

            def step(w):
                w_ref = ray.put(w)
                return _sum(ray.get([grad.remote(r, w_ref) for r in refs]))
            seconds, loss, w = _epochs(step, a.epochs, a.lr, a.features, rows)
            del refs
            if a.driver is not None:
                t0 = time.perf_counter()
                n = len(a.driver)
                cuts = [n * i // a.shards for i in range(a.shards + 1)]
                drefs = [ray.put(a.driver[lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
                out["ingest_seconds"] = round(time.perf_counter() - t0, 2)
                out["ingest_gib_per_s"] = round(a.driver.nbytes / 2**30 / (time.perf_counter()
                                                                           - t0), 2)
                g, _ = _sum(ray.get([grad.remote(r, ray.put(w)) for r in drefs]))
                out["ingested_gradient_ok"] = bool(np.allclose(g, a.driver_gradient(w),
                                                               rtol=1e-3))
                del drefs
        finally:
            ray.shutdown()
    out.update(_result(a, seconds, loss, mem.peak))
    return out


def _result(a, seconds: float, loss: float, peak: int) -> dict:
    return {"epochs": a.epochs, "epoch_seconds": round(seconds / a.epochs, 3),
            "epochs_per_s": round(a.epochs / seconds, 3), "final_loss": round(loss, 5),
            "peak_memory_gib": round(peak / 2**30, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=4.0, help="size of the data set (float32)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--features", type=int, default=127)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="processes per system")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--driver-gib", type=float, default=1.0,
                   help="also time loading an array of this size held by this process "
                        "(0: skip)")
    p.add_argument("--systems", default="claypot,dask,ray")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "training.json"))
    a = p.parse_args()
    row_bytes = (a.features + 1) * 4
    a.rows_per_block = int(a.gib * 2**30 / row_bytes / a.shards)
    result: dict = {
        "workload": "logistic regression, full-batch gradient descent, one task per block",
        "data": {"gib": round(a.rows_per_block * a.shards * row_bytes / 2**30, 3),
                 "rows": a.rows_per_block * a.shards, "features": a.features,
                 "dtype": "float32", "shards": a.shards},
        "workers": a.workers, "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "numpy": np.__version__,
        "baseline_memory_gib": round(PeakMemory().sample() / 2**30, 2),
    }
    a.driver = None
    if a.driver_gib > 0:
        per = int(a.driver_gib * 2**30 / row_bytes / a.shards)
        a.driver = np.concatenate([make_block(1000 + i, per, a.features)
                                   for i in range(a.shards)])
        result["driver_array_gib"] = round(a.driver.nbytes / 2**30, 3)

        def driver_gradient(w, _cache={}):
            key = w.tobytes()
            if key not in _cache:
                _cache[key] = gradient(a.driver, w)[0]
            return _cache[key]
        a.driver_gradient = driver_gradient
    runners = {"claypot": run_claypot, "dask": run_dask, "ray": run_ray}
    started = time.perf_counter()
    for name in a.systems.split(","):
        t0 = time.perf_counter()
        try:
            result[name] = runners[name](a)
        except Exception as exc:  # one system failing must not lose the others' figures
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        result[name]["wall_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {result[name]}", file=sys.stderr, flush=True)
    ours = result.get("claypot", {})
    ratios = {}
    for other in ("dask", "ray"):
        theirs = result.get(other, {})
        if "epochs_per_s" in ours and "epochs_per_s" in theirs:
            ratios[f"claypot_vs_{other}_epochs_per_s"] = round(
                ours["epochs_per_s"] / theirs["epochs_per_s"], 2)
            ratios[f"{other}_vs_claypot_peak_memory"] = round(
                theirs["peak_memory_gib"] / ours["peak_memory_gib"], 2)
            ratios[f"claypot_vs_{other}_make_data"] = round(
                theirs["make_data_seconds"] / ours["make_data_seconds"], 2)
            if "ingest_seconds" in ours and "ingest_seconds" in theirs:
                ratios[f"claypot_vs_{other}_ingest"] = round(
                    theirs["ingest_seconds"] / ours["ingest_seconds"], 2)
    result["ratios"] = ratios
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
