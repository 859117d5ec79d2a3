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
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.common import Counter, emit, latency, throughput  # noqa: E402
from store import LocalCluster  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1500)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--out", default=os.path.join(HERE, "results", "replicas.json"))
    a = p.parse_args()
    out: dict = {"bench": "replicas", "durability": "sync", "backends": 3, "threads": a.threads}
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
                "incr_per_s": round(throughput([o.incr for o in objs], a.seconds), 1),
            }
        base = changing["replicas=0"]
        for n in (1, 2):
            row = changing[f"replicas={n}"]
            row["latency_ratio_vs_0"] = round(row["incr_latency"]["p50_us"] / base["incr_latency"]["p50_us"], 2)
            row["throughput_ratio_vs_0"] = round(row["incr_per_s"] / base["incr_per_s"], 2)
        out["changing_calls"] = changing
        shared = Counter()
        shared.make_persistent(replicas=2)
        on_primary = round(throughput([shared.get] * a.threads, a.seconds), 1)
        shared.call_on_replica()
        spread = round(throughput([shared.get] * a.threads, a.seconds), 1)
        out["reads_of_one_object"] = {
            "primary_only_per_s": on_primary,
            "spread_over_2_replicas_per_s": spread,
            "ratio": round(spread / on_primary, 2),
            "note": "the client caches the replica set for 1 s; 2 cores shared by every "
            "process of the cluster and the clients",
        }
    emit(out, a.out)


if __name__ == "__main__":
    main()
