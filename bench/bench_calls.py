"""Method-call round trip, make_persistent rate and get_by_alias latency.

Each figure sits beside a bare grpcio unary echo measured in the same run
(bench/echo_server.py, a separate process, same payload size), so the ratio
shows what claypot adds on top of one gRPC call. Prints one JSON document.

    python bench/bench_calls.py [--calls 3000] [--durability sync]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import store  # noqa: E402
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


def percentiles(samples_us: list[float]) -> dict:
    s = sorted(samples_us)
    return {"p50_us": round(s[len(s) // 2], 1), "p99_us": round(s[int(len(s) * 0.99)], 1),
            "mean_us": round(statistics.fmean(s), 1)}


def timed(fn, n: int, warmup: int = 200) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def start_echo(workers: int):
    port_file = os.path.join(tempfile.mkdtemp(prefix="echo-"), "port")
    proc = subprocess.Popen([sys.executable, "-m", "bench.echo_server", port_file, str(workers)],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    deadline = time.monotonic() + 20
    while not os.path.exists(port_file):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("echo server did not start")
        time.sleep(0.02)
    with open(port_file) as f:
        return proc, int(f.read())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--objects", type=int, default=2000)
    p.add_argument("--durability", default="sync")
    a = p.parse_args()
    settings = store.Settings.from_env()
    echo, port = start_echo(settings.server_threads)
    result: dict = {"bench": "calls", "durability": a.durability, "cpus": os.cpu_count()}
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        unary = channel.unary_unary("/bench.Echo/Unary")
        # A claypot call request for incr() is about 90 bytes; echo the same size.
        payload = b"x" * 90
        echo_us = timed(lambda: unary(payload, timeout=10), a.calls)
        result["bare_grpc_unary"] = percentiles(echo_us)
        with LocalCluster(backends=2, durability=a.durability) as cluster:
            c = Counter()
            c.make_persistent(alias="bench-counter", backend=cluster.backends[0])
            result["method_call_readonly"] = percentiles(timed(c.get, a.calls))
            result["method_call_mutating"] = percentiles(timed(c.incr, a.calls))
            result["attribute_read"] = percentiles(timed(lambda: c.value, a.calls))
            result["get_by_alias"] = percentiles(
                timed(lambda: store.get_by_alias("bench-counter"), a.calls // 2))
            # make_persistent: one object per call, then batches, then 4 threads.
            objs = [Counter(i) for i in range(a.objects)]
            t = time.perf_counter()
            for o in objs:
                o.make_persistent(backend=cluster.backends[1])
            single = a.objects / (time.perf_counter() - t)
            objs = [Counter(i) for i in range(a.objects * 10)]
            t = time.perf_counter()
            for i in range(0, len(objs), 500):
                store.make_persistent_many(objs[i:i + 500], backend=cluster.backends[1])
            batched = len(objs) / (time.perf_counter() - t)
            objs = [Counter(i) for i in range(a.objects)]

            def worker(chunk):
                for o in chunk:
                    o.make_persistent(backend=cluster.backends[1])
            threads = [threading.Thread(target=worker, args=(objs[i::4],)) for i in range(4)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            threaded = a.objects / (time.perf_counter() - t)
            result["make_persistent_per_s"] = {"one_at_a_time": round(single),
                                               "batched_500": round(batched),
                                               "four_threads": round(threaded)}
        bare = result["bare_grpc_unary"]["p50_us"]
        result["ratio_to_bare_grpc_p50"] = {
            k: round(result[k]["p50_us"] / bare, 2)
            for k in ("method_call_readonly", "method_call_mutating", "attribute_read",
                      "get_by_alias")}
        result["targets"] = {"method_call_within_1.5x_bare": result["ratio_to_bare_grpc_p50"][
            "method_call_readonly"] <= 1.5, "make_persistent_5000_per_s": batched >= 5000}
    finally:
        echo.kill()
        echo.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
