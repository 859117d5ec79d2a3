"""A long soak of the randomized fault-injection test (tests/faults.py).

Runs seeded sequences of random operations with concurrent clients and
kill -9 of backends at random points against a real cluster, checks the
cluster against a model of the acknowledged operations after every round,
and prints one JSON document: sequences, operations, acknowledged and
open-outcome operations, kills, restarts, checks and violations (with the
first few described).

Run: ``python bench/soak_lifecycle.py [--seconds 90] [--seed 1] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("CLAYPOT_VALIDATE", "1")

from faults import CLUSTER_ENV, Stats, run_sequence  # noqa: E402
from store import LocalCluster  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="rounds per sequence")
    p.add_argument("--ops", type=int, default=30, help="operations per worker per round")
    a = p.parse_args()
    stats = Stats()
    started = time.monotonic()
    seed = a.seed
    with tempfile.TemporaryDirectory(prefix="claypot-soak-") as tmp:
        while time.monotonic() - started < a.seconds:
            with LocalCluster(backends=2, data_dir=os.path.join(tmp, f"s{seed}"), backend_env=CLUSTER_ENV) as c:
                run_sequence(c, seed, a.rounds, a.ops, a.workers, stats)
            seed += 1
    out = {
        "bench": "soak_lifecycle",
        "seconds": round(time.monotonic() - started, 1),
        "first_seed": a.seed,
        "workers": a.workers,
        **stats.as_dict(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
