"""What observability costs a call: metrics (and tracing) on versus off, in one run.

One cluster, one Redis, backends that differ only in their observability
settings: metrics off (``CLAYPOT_METRICS_PORT=-1``), metrics on (the default),
and, when OpenTelemetry is installed, metrics and tracing on. The same
read-only method call (the cheapest call, so the largest relative cost) and a
changing call are timed against each, in interleaved rounds so that drift of a
shared machine falls on every variant alike (one call to each in turn). Besides the end-to-end ratios, the
hooks a call runs are timed in-process, which gives their cost without the
noise of a round trip. Prints one JSON document.

    python bench/bench_observability.py [--calls 400] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Counter, emit, machine  # noqa: E402
from store import LocalCluster, metrics  # noqa: E402
from store._ops.cluster import BackendProcess  # noqa: E402


def hook_cost_ns(n: int = 200_000) -> dict:
    """ns one call spends in the metrics hooks (one counter and one histogram update)."""
    metrics.enable()
    try:
        started = time.perf_counter()
        for _ in range(n):
            metrics.call_done("method", True, 0.0005)
        on = (time.perf_counter() - started) / n * 1e9
    finally:
        metrics.disable()
    started = time.perf_counter()
    for _ in range(n):
        metrics.call_done("method", True, 0.0005)
    off = (time.perf_counter() - started) / n * 1e9
    return {"metrics_on_ns": round(on, 1), "metrics_off_ns": round(off, 1)}


def tracing_available() -> bool:
    try:
        import opentelemetry.sdk  # noqa: F401

        return True
    except ImportError:
        return False


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=400, help="calls per variant per round")
    p.add_argument("--rounds", type=int, default=10)
    a = p.parse_args()

    variants = {"off": {"CLAYPOT_METRICS_PORT": "-1"}, "metrics": {}}
    if tracing_available():
        variants["metrics+tracing"] = {"CLAYPOT_TRACING": "1"}
    with LocalCluster(backends=1, backend_env=variants["off"]) as c:
        procs = {"off": c.processes[0]}
        for name, env in variants.items():
            if name != "off":
                bp = BackendProcess(os.path.join(c.data_dir, f"backend-{name}"), c.redis_url, c.token, env=env).start()
                c.processes.append(bp)  # stopped with the cluster
                procs[name] = bp
        counters = {}
        for name, proc in procs.items():
            obj = Counter()
            obj.make_persistent(backend=proc.backend_id)
            for _ in range(200):  # warm channels, caches and the log
                obj.get()
                obj.incr()
            counters[name] = obj
        samples = {name: {"get": [], "incr": []} for name in procs}
        order = list(counters.items())
        for r in range(a.rounds):
            for method in ("get", "incr"):
                fns = [(name, getattr(obj, method)) for name, obj in order]
                # One call to each variant in turn: load from other processes on the
                # machine falls on all of them alike.
                for _ in range(a.calls):
                    for name, fn in fns:
                        t = time.perf_counter()
                        fn()
                        samples[name][method].append((time.perf_counter() - t) * 1e6)
            order.reverse()
        addresses = {
            name: next(b.metrics_address for b in c.client.backends() if b.backend_id == proc.backend_id)
            for name, proc in procs.items()
        }

    result = {
        "calls_per_variant": a.calls * a.rounds,
        "variants": {},
        "hooks": hook_cost_ns(),
        "metrics_addresses": addresses,
        "machine": machine(),
    }
    for name, by_method in samples.items():
        result["variants"][name] = {
            m: {"p50_us": round(statistics.median(s), 1), "mean_us": round(statistics.fmean(s), 1)}
            for m, s in by_method.items()
        }
    off = result["variants"]["off"]
    ratios = {}
    for name in result["variants"]:
        if name == "off":
            continue
        for m in ("get", "incr"):
            ratios[f"{name}/off {m} p50"] = round(result["variants"][name][m]["p50_us"] / off[m]["p50_us"], 3)
    result["ratios"] = ratios
    # The hooks' own share of the cheapest call: what metrics must keep under 5%.
    hook_us = (result["hooks"]["metrics_on_ns"] - result["hooks"]["metrics_off_ns"]) / 1000
    result["metrics_hook_share_of_get"] = round(hook_us / off["get"]["p50_us"], 4)
    result["metrics_under_5_percent"] = (
        result["metrics_hook_share_of_get"] < 0.05 and ratios["metrics/off get p50"] < 1.05
    )
    emit(result)


if __name__ == "__main__":
    main()
