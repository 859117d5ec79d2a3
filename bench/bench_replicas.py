"""Changing-call latency and throughput with replicas=0, 1 and 2, side by side, and
read throughput on the primary alone against reads spread over replicas.

One 3-backend cluster (durability ``sync``: a replica fsyncs what it accepts
before the primary acknowledges). The ratios say what synchronous
replication costs a changing call. Prints one JSON document (also written
to bench/results/replicas.json).

    python bench/bench_replicas.py [--calls 1500] [--seconds 3] [--threads 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from store import LocalCluster, StorageObject, readonly  # noqa: E402


class Counter(StorageObject):
    def __init__(self, value=0):
        self.value = value

    def incr(self, by=1):
        self.value += by
        return self.value

    @readonly
    def get(self):
        return self.value


def latency(fn, n: int) -> dict:
    for _ in range(100):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
    out.sort()
    return {"p50_us": round(out[len(out) // 2], 1), "p99_us": round(out[int(n * 0.99)], 1),
            "mean_us": round(statistics.fmean(out), 1)}


def throughput(make_fn, seconds: float, threads: int) -> float:
    """Calls per second from ``threads`` threads, each with its own callable."""
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def run(i):
        fn = make_fn(i)
        while time.monotonic() < stop:
            fn()
            counts[i] += 1
    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return round(sum(counts) / seconds, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1500)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--out", default=os.path.join(HERE, "results", "replicas.json"))
    a = p.parse_args()
    out: dict = {"bench": "replicas", "durability": "sync", "backends": 3,
                 "threads": a.threads}
    with LocalCluster(backends=3, durability="sync"):
        changing = {}
        for n in (0, 1, 2):
            # One object per thread: throughput is not capped by one object's lock.
            objs = []
            for _ in range(a.threads):
                c = Counter()
                c.make_persistent(replicas=n)
                objs.append(c)
            changing[f"replicas={n}"] = {
                "incr_latency": latency(objs[0].incr, a.calls),
                "incr_per_s": throughput(lambda i, objs=objs: objs[i].incr, a.seconds,
                                         a.threads)}
        base = changing["replicas=0"]
        for n in (1, 2):
            row = changing[f"replicas={n}"]
            row["latency_ratio_vs_0"] = round(row["incr_latency"]["p50_us"]
                                              / base["incr_latency"]["p50_us"], 2)
            row["throughput_ratio_vs_0"] = round(row["incr_per_s"] / base["incr_per_s"], 2)
        out["changing_calls"] = changing
        shared = Counter()
        shared.make_persistent(replicas=2)
        on_primary = throughput(lambda i: shared.get, a.seconds, a.threads)
        shared.call_on_replica()
        spread = throughput(lambda i: shared.get, a.seconds, a.threads)
        out["reads_of_one_object"] = {
            "primary_only_per_s": on_primary, "spread_over_2_replicas_per_s": spread,
            "ratio": round(spread / on_primary, 2),
            "note": "the client caches the replica set for 1 s; 2 cores shared by every "
                    "process of the cluster and the clients"}
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
