"""Data-parallel training side by side: claypot, Dask and Ray, same data, same workers, one run.

    python bench/bench_training.py [--gib 4] [--shards 4] [--features 127] [--epochs 6]
                                   [--workers 2] [--driver-gib 1]
                                   [--out bench/results/training.json]

The workload is full-batch gradient descent for logistic regression over a
float32 matrix of ``--gib`` GiB, rows [x | label], cut into ``--shards``
row blocks. Every system:

- makes each block *on a worker* with the same function (:func:`make_block`),
  so no system pays for shipping the data set from this process, and the
  data is identical everywhere;
- runs one warm-up epoch, then ``--epochs`` timed ones: per epoch, the
  gradient and loss of each block where the block is held, summed here, and
  one update of the weights here. The weights are a few hundred bytes, so
  what separates the systems is how each gets at its blocks.

Then (``--driver-gib``) each system loads an array that this process holds,
in ``--shards`` blocks, the way its users would: claypot
``ShardedArray.from_numpy``, Dask ``da.from_array(...).persist()``, Ray
``ray.put`` per block; one gradient over it is checked against numpy's. That
is where moving data separates them.

Systems (``--workers`` processes each):

- **claypot**: a LocalCluster of backends (durability ``none``: the others
  keep nothing on disk either); the data is a ``ShardedArray`` made with
  ``from_function``; an epoch is ``x.map_blocks(gradient, w)``: one task per
  block, run inside the backend process that holds it, over the live array.
- **dask**: ``distributed.LocalCluster`` with worker processes of 2 threads;
  the data is a ``dask.array`` of the same blocks, ``persist()``-ed; an epoch
  is the dask.array expression of the same gradient, computed.
- **ray**: ``ray.init(num_cpus=workers)``; each block is a task's result (so
  it lives in Ray's shared-memory object store); an epoch is one task per
  block. Ray is not a dependency of claypot: if ``import ray`` fails, the
  JSON says so and the run goes on without it.

The machine is shared, so its load changes while the benchmark runs. All
three systems are started and hold their data at once, and the timed epochs
are *interleaved*: epoch k of each system runs back to back (in an order that
rotates), so a burst of outside load falls on all of them alike. The other
phases (making data, loading the driver's array) run one system at a time.

Memory: the peak, over the run, of the proportional set size (PSS: shared
memory such as Ray's object store or claypot's same-host segments counted
once) summed over each system's own processes (the process tree under each
of this process's children it started), sampled every 0.2 s; this process
is reported apart. ``epochs_per_s`` is one over the median epoch (the
mean and the fastest are given too): the median shrugs off a burst of
outside load that hit one epoch. Ratios are claypot's speed over each other's (above 1:
claypot is faster) and their peak memory over claypot's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
GEN_ROWS = 1 << 16  # rows generated at a time while making a block


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
    loss = float((np.logaddexp(0.0, z) - y * z).sum())  # log(1 + e^z) - y z, stably
    return g.astype(np.float64), loss, len(y)


def _claypot_block(lo: int, hi: int, rows_per_block: int, features: int) -> np.ndarray:
    return make_block(lo // rows_per_block, hi - lo, features)


def _sum(parts):
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


# -- memory sampling ---------------------------------------------------------------------------


class PeakMemory:
    """Peak PSS per group of processes: each group is the trees under some of our children."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.me = psutil.Process()
        self.groups: dict[int, str] = {}  # pid of a child of ours -> group
        self.peaks: dict[str, int] = {}
        self._top: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def assign(self, name: str) -> None:
        """Our children not yet in a group (and everything they start later) form ``name``."""
        with self._lock:
            for p in self.me.children():
                self.groups.setdefault(p.pid, name)
            self.peaks.setdefault(name, 0)

    def _group(self, p: psutil.Process) -> str:
        top = self._top.get(p.pid)
        if top is None:
            top, q = p.pid, p
            try:
                while q.ppid() != self.me.pid:
                    q = q.parent()
                    if q is None:
                        break
                    top = q.pid
            except psutil.Error:
                pass
            self._top[p.pid] = top
        return self.groups.get(top, "other")

    def sample(self) -> dict[str, int]:
        sums: dict[str, int] = {}
        for p in [self.me] + self.me.children(recursive=True):
            try:
                pss = p.memory_full_info().pss
            except psutil.Error:
                continue
            name = "driver" if p.pid == self.me.pid else self._group(p)
            sums[name] = sums.get(name, 0) + pss
        with self._lock:
            for name, v in sums.items():
                self.peaks[name] = max(self.peaks.get(name, 0), v)
        return sums

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def gib(self, name: str) -> float:
        return round(self.peaks.get(name, 0) / 2**30, 2)


# -- the three systems -----------------------------------------------------------------------


class Claypot:
    name = "claypot"

    def start(self, a):
        from store import LocalCluster

        self.cluster = LocalCluster(backends=a.workers, durability="none").start()

    def make_data(self, a):
        from store.collections import ShardedArray

        self.x = ShardedArray.from_function(
            _claypot_block, a.rows_per_block * a.shards, a.shards, args=(a.rows_per_block, a.features)
        )
        return {"backends_used": len({p.backend for p in self.x.partitions()})}

    def step(self, w):
        from runtime import wait_on

        return _sum(wait_on(self.x.map_blocks(gradient, w)))

    def drop_data(self):
        self.x.delete()

    def ingest(self, arr, shards, w):
        from runtime import wait_on
        from store.collections import ShardedArray

        t0 = time.perf_counter()
        y = ShardedArray.from_numpy(arr, shards=shards)
        seconds = time.perf_counter() - t0
        g, _ = _sum(wait_on(y.map_blocks(gradient, w)))
        y.delete()
        return seconds, g

    def stop(self):
        self.cluster.stop()


class Dask:
    name = "dask"

    def start(self, a):
        import dask
        from distributed import Client, LocalCluster

        self.version = dask.__version__
        self.cluster = LocalCluster(
            n_workers=a.workers, threads_per_worker=2, processes=True, memory_limit=0, dashboard_address=None
        )
        self.client = Client(self.cluster)

    def make_data(self, a):
        import dask
        import dask.array as da
        from distributed import wait

        blocks = [
            da.from_delayed(
                dask.delayed(make_block)(i, a.rows_per_block, a.features),
                shape=(a.rows_per_block, a.features + 1),
                dtype=np.float32,
            )
            for i in range(a.shards)
        ]
        self.data = da.concatenate(blocks, axis=0).persist()
        wait(self.data)
        return {"version": self.version}

    @staticmethod
    def _gradient(data, w):
        import dask
        import dask.array as da

        x, y = data[:, :-1], data[:, -1]
        z = x @ w
        p = 1.0 / (1.0 + da.exp(-z))
        g, loss = dask.compute(x.T @ (p - y), (da.logaddexp(0.0, z) - y * z).sum())
        return g.astype(np.float64), float(loss)

    def step(self, w):
        return self._gradient(self.data, w)

    def drop_data(self):
        del self.data

    def ingest(self, arr, shards, w):
        import dask.array as da
        from distributed import wait

        t0 = time.perf_counter()
        d = da.from_array(arr, chunks=(len(arr) // shards, arr.shape[1])).persist()
        wait(d)
        seconds = time.perf_counter() - t0
        g, _ = self._gradient(d, w)
        del d
        return seconds, g

    def stop(self):
        self.client.close()
        self.cluster.close()


class Ray:
    name = "ray"

    def start(self, a):
        import ray

        self.ray = ray
        ray.init(
            num_cpus=a.workers,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=int((a.gib + a.driver_gib + 1) * 2**30),
        )
        self.make = ray.remote(make_block)
        self.grad = ray.remote(gradient)

    def make_data(self, a):
        self.refs = [self.make.remote(i, a.rows_per_block, a.features) for i in range(a.shards)]
        self.ray.wait(self.refs, num_returns=len(self.refs), fetch_local=False)
        return {"version": self.ray.__version__}

    def step(self, w):
        w_ref = self.ray.put(w)
        return _sum(self.ray.get([self.grad.remote(r, w_ref) for r in self.refs]))

    def drop_data(self):
        del self.refs

    def ingest(self, arr, shards, w):
        t0 = time.perf_counter()
        n = len(arr)
        cuts = [n * i // shards for i in range(shards + 1)]
        refs = [self.ray.put(arr[lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
        seconds = time.perf_counter() - t0
        w_ref = self.ray.put(w)
        g, _ = _sum(self.ray.get([self.grad.remote(r, w_ref) for r in refs]))
        del refs
        return seconds, g

    def stop(self):
        self.ray.shutdown()


# -- the run ---------------------------------------------------------------------------------


def run(a, result: dict) -> None:
    systems = []
    for cls in (Claypot, Dask, Ray):
        if cls.name not in a.systems:
            continue
        try:
            __import__({"claypot": "store", "dask": "distributed", "ray": "ray"}[cls.name])
        except ImportError as exc:
            result[cls.name] = {"skipped": f"{cls.name} is not installed here ({exc})"}
            continue
        systems.append(cls())
    rows = a.rows_per_block * a.shards
    with PeakMemory() as mem:
        for s in systems:
            t0 = time.perf_counter()
            s.start(a)
            mem.assign(s.name)
            result[s.name] = {"start_seconds": round(time.perf_counter() - t0, 2)}
        try:
            for s in systems:
                t0 = time.perf_counter()
                result[s.name].update(s.make_data(a))
                result[s.name]["make_data_seconds"] = round(time.perf_counter() - t0, 2)
                print(f"{s.name}: data made in {result[s.name]['make_data_seconds']} s", file=sys.stderr, flush=True)
            # Warm-up epoch (not timed), then the timed epochs, interleaved.
            ws = {}
            for s in systems:
                w = np.zeros(a.features, np.float32)
                g, _ = s.step(w)
                ws[s.name] = (w - a.lr * g / rows).astype(np.float32)
            spent = {s.name: [] for s in systems}
            losses = {}
            for epoch in range(a.epochs):
                k = epoch % len(systems)
                for s in systems[k:] + systems[:k]:
                    t0 = time.perf_counter()
                    g, loss = s.step(ws[s.name])
                    ws[s.name] = (ws[s.name] - a.lr * g / rows).astype(np.float32)
                    spent[s.name].append(time.perf_counter() - t0)
                    losses[s.name] = loss / rows
            for s in systems:
                t = spent[s.name]
                median = statistics.median(t)
                result[s.name].update(
                    {
                        "epochs": a.epochs,
                        "epoch_seconds_mean": round(sum(t) / len(t), 3),
                        "epoch_seconds_median": round(median, 3),
                        "epoch_seconds_min": round(min(t), 3),
                        "epochs_per_s": round(1 / median, 3),
                        "final_loss": round(losses[s.name], 5),
                    }
                )
                s.drop_data()
            if a.driver is not None:
                w = ws[systems[0].name] if systems else np.zeros(a.features, np.float32)
                expected = gradient(a.driver, w)[0]
                for s in systems:
                    seconds, g = s.ingest(a.driver, a.shards, w)
                    result[s.name]["ingest_seconds"] = round(seconds, 2)
                    result[s.name]["ingest_gib_per_s"] = round(a.driver.nbytes / 2**30 / seconds, 2)
                    result[s.name]["ingested_gradient_ok"] = bool(np.allclose(g, expected, rtol=1e-3, atol=1e-2))
        finally:
            for s in reversed(systems):
                try:
                    s.stop()
                except Exception as exc:  # report it, and still stop the others
                    result[s.name]["stop_error"] = repr(exc)
    for s in systems:
        result[s.name]["peak_memory_gib"] = mem.gib(s.name)
    result["driver_peak_memory_gib"] = mem.gib("driver")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=4.0, help="size of the data set (float32)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--features", type=int, default=127)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workers", type=int, default=2, help="processes per system")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument(
        "--driver-gib", type=float, default=1.0, help="also time loading an array this process holds (0: skip)"
    )
    p.add_argument("--systems", default="claypot,dask,ray")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "training.json")
    )
    a = p.parse_args()
    a.systems = a.systems.split(",")
    row_bytes = (a.features + 1) * 4
    a.rows_per_block = int(a.gib * 2**30 / row_bytes / a.shards)
    started = time.perf_counter()
    result: dict = {
        "workload": "logistic regression, full-batch gradient descent, one task per block",
        "data": {
            "gib": round(a.rows_per_block * a.shards * row_bytes / 2**30, 3),
            "rows": a.rows_per_block * a.shards,
            "features": a.features,
            "dtype": "float32",
            "shards": a.shards,
        },
        "workers": a.workers,
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    a.driver = None
    if a.driver_gib > 0:
        per = int(a.driver_gib * 2**30 / row_bytes / a.shards)
        a.driver = np.concatenate([make_block(1000 + i, per, a.features) for i in range(a.shards)])
        result["driver_array_gib"] = round(a.driver.nbytes / 2**30, 3)
    run(a, result)
    ours = result.get("claypot", {})
    ratios = {}
    for other in ("dask", "ray"):
        theirs = result.get(other, {})
        if "epochs_per_s" not in ours or "epochs_per_s" not in theirs:
            continue
        ratios[f"claypot_vs_{other}_epochs_per_s"] = round(ours["epochs_per_s"] / theirs["epochs_per_s"], 2)
        ratios[f"claypot_vs_{other}_make_data_speed"] = round(
            theirs["make_data_seconds"] / ours["make_data_seconds"], 2
        )
        if "ingest_seconds" in ours and "ingest_seconds" in theirs:
            ratios[f"claypot_vs_{other}_ingest_speed"] = round(theirs["ingest_seconds"] / ours["ingest_seconds"], 2)
        ratios[f"{other}_vs_claypot_peak_memory"] = round(theirs["peak_memory_gib"] / ours["peak_memory_gib"], 2)
    result["ratios"] = ratios
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
