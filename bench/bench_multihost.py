"""Calls and large transfers across hosts of the network-namespace test bed.

Run (as root): ``python -m bench.bench_multihost [--quick]``. Prints one JSON document.

Three hosts (tests/netbed.py): Redis on host0, one backend on host1, one on
host2, and a client on host1. In the same run it measures:

- ``call``: p50/p99 of a ``@readonly`` method call from the client to the
  backend on its own host (reached at its network address: the same-host
  baseline) and to the backend on the other host (over the bridge);
- ``transfer``: make_persistent and read back of a 256 MiB float64 array to
  each backend: same host goes through /dev/shm, the other host through the
  chunked gRPC stream;
- the same again with ``tc netem`` adding ``--delay`` ms to every packet that
  leaves a host, when the kernel has netem (otherwise ``netem`` says why not).

Backends run with durability ``none``: these are the network's figures, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import netbed  # noqa: E402

MiB = 1 << 20

SETUP = """
import time, numpy as np, store, hostlib
cl = store.connect({address!r}, {token!r})

def call_latency(box, n):
    box.where()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter(); box.where(); lat.append(time.perf_counter() - t0)
    lat.sort()
    return {{"p50_us": round(lat[len(lat) // 2] * 1e6), "p99_us": round(lat[int(len(lat) * .99)] * 1e6)}}

def transfer(backend, nbytes, rounds):
    arr = np.ones(nbytes // 8)
    best_put = best_get = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        b = hostlib.Box(arr); b.make_persistent(backend=backend)
        put = time.perf_counter() - t0
        t0 = time.perf_counter(); back = b.data; get = time.perf_counter() - t0
        assert back.nbytes == nbytes
        del back
        b.delete_persistent()
        best_put = put if best_put is None else min(best_put, put)
        best_get = get if best_get is None else min(best_get, get)
    return {{"persist_MBps": round(nbytes / best_put / 1e6), "read_MBps": round(nbytes / best_get / 1e6),
            "round_trip_MBps": round(2 * nbytes / (best_put + best_get) / 1e6)}}
"""


def measure(client, local, remote, calls: int, nbytes: int, rounds: int) -> dict:
    out = {
        "call_same_host": client.run(
            f"bl = hostlib.Box(1); bl.make_persistent(backend={local!r})", f"call_latency(bl, {calls})", timeout=300
        ),
        "call_other_host": client.run(
            f"br = hostlib.Box(1); br.make_persistent(backend={remote!r})", f"call_latency(br, {calls})", timeout=300
        ),
        "transfer_same_host": client.run("", f"transfer({local!r}, {nbytes}, {rounds})", timeout=600),
        "transfer_other_host": client.run("", f"transfer({remote!r}, {nbytes}, {rounds})", timeout=600),
    }
    out["call_ratio_other_to_same_host_p50"] = round(
        out["call_other_host"]["p50_us"] / out["call_same_host"]["p50_us"], 2
    )
    out["transfer_ratio_other_to_same_host"] = round(
        out["transfer_other_host"]["round_trip_MBps"] / out["transfer_same_host"]["round_trip_MBps"], 2
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer calls, 64 MiB, one round")
    p.add_argument("--delay", type=float, default=2.0, help="netem delay per packet, ms")
    a = p.parse_args()
    why = netbed.missing()
    if why:
        raise SystemExit(f"bench_multihost: {why}")
    calls, nbytes, rounds = (200, 64 * MiB, 1) if a.quick else (1000, 256 * MiB, 2)
    result = {
        "bench": "multihost",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "calls": calls,
        "transfer_bytes": nbytes,
        "durability": "none",
    }
    with netbed.NetBed(3) as bed:
        h0, h1, h2 = bed.hosts
        token = uuid.uuid4().hex
        redis_url = bed.start_redis(h0)
        env = {"CLAYPOT_DURABILITY": "none"}
        b1 = bed.start_backend(h1, redis_url, token, name="b1", env=env)
        b2 = bed.start_backend(h2, redis_url, token, name="b2", env=env)
        client = bed.agent(h1)
        client.run(SETUP.format(address=b1.address, token=token))
        result["plain"] = measure(client, b1.backend_id, b2.backend_id, calls, nbytes, rounds)
        missing = bed.netem_missing()
        if missing:
            result["netem"] = {"delay_ms": a.delay, "unavailable": missing}
        else:
            for h in bed.hosts:
                bed.netem(h, delay_ms=a.delay)
            netem = measure(client, b1.backend_id, b2.backend_id, min(calls, 300), nbytes, 1)
            netem["delay_ms"] = a.delay
            netem["call_other_host_ratio_to_plain_p50"] = round(
                netem["call_other_host"]["p50_us"] / result["plain"]["call_other_host"]["p50_us"], 2
            )
            result["netem"] = netem
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
