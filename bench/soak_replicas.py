"""A soak of replica failover (tests/replicalib.py): seeded rounds, one primary lost each.

Each round starts a 3-backend cluster (heartbeat TTL 2 s), makes a counter
with ``replicas=1``, runs concurrent clients changing and reading it, and at
a seeded random moment kills its primary (kill -9) or freezes it (SIGSTOP,
healed later: a partition). Every round's history goes through the
linearizability checker. Prints one JSON document (also written to
bench/results/soak_replicas.json): operations, failovers, lost updates and
duplicate executions (both must be 0), violations, and the measured
failover time (the longest client call that overlapped the loss).

Run: ``python bench/soak_replicas.py [--seconds 100] [--seed 1]``.
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

from replicalib import ENV, TTL, RoundStats, run_round  # noqa: E402

os.environ.update(ENV)  # this process's client uses the cluster's heartbeat TTL

from store import LocalCluster  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--ops", type=int, default=40, help="operations per client per round")
    p.add_argument("--out", default=os.path.join(HERE, "results", "soak_replicas.json"))
    a = p.parse_args()
    stats = RoundStats()
    started = time.monotonic()
    seed = a.seed
    rounds = {"kill": 0, "partition": 0}
    with tempfile.TemporaryDirectory(prefix="claypot-soak-replicas-") as tmp:
        while time.monotonic() - started < a.seconds:
            fault = "kill" if seed % 2 else "partition"
            with LocalCluster(backends=3, data_dir=os.path.join(tmp, f"s{seed}"), backend_env=ENV) as c:
                run_round(c, seed, stats, a.clients, a.ops, fault)
            rounds[fault] += 1
            seed += 1
    out = {
        "bench": "soak_replicas",
        "seconds": round(time.monotonic() - started, 1),
        "first_seed": a.seed,
        "rounds": rounds,
        "clients": a.clients,
        "heartbeat_ttl": TTL,
        **stats.as_dict(),
        "failover_within_two_ttls": bool(stats.failover_seconds) and max(stats.failover_seconds) < 2 * TTL,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
