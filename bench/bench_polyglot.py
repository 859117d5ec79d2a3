"""Arrays to other languages: typed arrays beside JSON and beside the Python client.

Run: ``python -m bench.bench_polyglot [--quick]``. Prints one JSON document.

In one run, against a local cluster (durability ``none``, two backends):

- ``typed_vs_json``: a 1 MiB float64 array (131,072 values) read by a bare
  gRPC client as a TypedArray (GetArray) versus as JSON (CallJson of a method
  returning ``.tolist()``), the two ways another language can get it;
- ``typed_vs_python``: a 64 MiB float64 array read with GetArray (from the
  owner, and through the other backend, which forwards) versus the Python
  client's own attribute read over the gRPC stream (``CLAYPOT_SHM=0``: other
  languages cannot use /dev/shm), so the ratio is the typed-array path's cost
  against claypot's native one;
- ``node`` / ``cpp``: the same 64 MiB read by the Node client library and the
  C++ example program (when they are installed / built), timed inside each
  program so process start-up is not counted for Node and is for C++;
- ``node_via_gateway`` / ``node_direct_from_gateway``: Node connected to the
  other backend, reading through it or with ``direct: true`` (to the owner).

Best of N runs each; MB/s are 10^6 bytes per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

os.environ["CLAYPOT_SHM"] = "0"  # before store reads its settings

import grpc  # noqa: E402
import numpy as np  # noqa: E402

import store  # noqa: E402
from store import LocalCluster, StorageObject  # noqa: E402
from store._wire.generated import claypot_pb2 as pb  # noqa: E402
from store._wire.generated import claypot_pb2_grpc as pb_grpc  # noqa: E402

MiB = 1 << 20
ROOT = os.path.join(os.path.dirname(__file__), "..")


class Samples(StorageObject):
    """One float64 array, readable as an array or as a JSON list."""

    def __init__(self, n):
        self.data = np.random.default_rng(0).standard_normal(n)

    def as_list(self):
        return self.data.tolist()

    def size(self):
        return int(self.data.size)


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _mbps(nbytes, seconds):
    return round(nbytes / seconds / 1e6, 1)


def _get_array(stub, md, alias):
    parts = list(
        stub.GetArray(pb.GetArrayRequest(alias=alias, kind=pb.GET_ATTR, name="data"), metadata=md, timeout=120)
    )
    head = parts[0].array
    data = bytearray(head.nbytes)
    if head.chunked:
        at = 0
        for p in parts[1:]:
            data[at : at + len(p.data)] = p.data
            at += len(p.data)
    else:
        data[:] = head.data
    return np.frombuffer(data, dtype=head.dtype)


def _node(address, token, alias, repeat, direct=False):
    node = shutil.which("node")
    lib = os.path.join(ROOT, "clients", "node")
    if node is None or not os.path.isdir(os.path.join(lib, "node_modules", "@grpc")):
        return {"skipped": "node or clients/node/node_modules missing"}
    script = f"""
const claypot = require({json.dumps(lib)});
(async () => {{
  const c = await claypot.connect({json.dumps(address)},
    {{ token: {json.dumps(token)}, direct: {json.dumps(direct)} }});
  await c.getArray({json.dumps(alias)}, 'data');  // routes and connections, once
  let best = Infinity, n = 0;
  for (let i = 0; i < {repeat}; i++) {{
    const t = process.hrtime.bigint();
    const a = await c.getArray({json.dumps(alias)}, 'data');
    best = Math.min(best, Number(process.hrtime.bigint() - t) / 1e9);
    n = a.data.byteLength;
  }}
  c.close();
  console.log(JSON.stringify({{ seconds: best, nbytes: n }}));
}})().catch((e) => {{ console.error(e); process.exit(1); }});
"""
    proc = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"error": proc.stderr[-500:]}
    out = json.loads(proc.stdout)
    return {"seconds": round(out["seconds"], 4), "MBps": _mbps(out["nbytes"], out["seconds"])}


def _cpp(address, token, alias, repeat):
    exe = os.path.join(ROOT, "clients", "cpp", "build", "claypot_example")
    if not os.path.exists(exe):
        return {"skipped": "clients/cpp/build/claypot_example is not built"}
    env = dict(os.environ, CLAYPOT_TOKEN=token)
    seconds = _best(
        lambda: subprocess.run(
            [exe, address, alias, "size", "[]", "data"], env=env, check=True, capture_output=True, timeout=300
        ),
        repeat,
    )
    return {"seconds_with_process_start": round(seconds, 4), "MBps": _mbps(64 * MiB, seconds)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    repeat = 3 if args.quick else 5
    out = {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0], "repeat": repeat}
    with LocalCluster(backends=2, durability="none") as cluster:
        gateway, owner = cluster.backends
        addr = {b.backend_id: b.address for b in store.backends()}
        md = [("claypot-token", cluster.token)]
        opts = [("grpc.max_receive_message_length", 64 * MiB)]
        small = Samples(MiB // 8)
        small.make_persistent(alias="bench-small", backend=owner)
        big = Samples(64 * MiB // 8)
        big.make_persistent(alias="bench-big", backend=owner)
        with (
            grpc.insecure_channel(addr[owner], options=opts) as direct_ch,
            grpc.insecure_channel(addr[gateway], options=opts) as gateway_ch,
        ):
            direct, via = pb_grpc.BackendStub(direct_ch), pb_grpc.BackendStub(gateway_ch)

            def json_read():
                reply = direct.CallJson(
                    pb.JsonCallRequest(alias="bench-small", kind=pb.METHOD, name="as_list"), metadata=md, timeout=60
                )
                return np.array(json.loads(reply.result_json))

            assert np.array_equal(json_read(), _get_array(direct, md, "bench-small"))
            t_typed = _best(lambda: _get_array(direct, md, "bench-small"), repeat * 4)
            t_json = _best(json_read, repeat * 4)
            out["typed_vs_json"] = {
                "nbytes": MiB,
                "typed_ms": round(t_typed * 1e3, 2),
                "json_ms": round(t_json * 1e3, 2),
                "json_over_typed": round(t_json / t_typed, 1),
            }

            assert np.array_equal(_get_array(direct, md, "bench-big"), big.data)
            t_direct = _best(lambda: _get_array(direct, md, "bench-big"), repeat)
            t_via = _best(lambda: _get_array(via, md, "bench-big"), repeat)
            t_python = _best(lambda: big.data, repeat)
            out["typed_vs_python"] = {
                "nbytes": 64 * MiB,
                "getarray_direct_MBps": _mbps(64 * MiB, t_direct),
                "getarray_via_gateway_MBps": _mbps(64 * MiB, t_via),
                "python_client_read_MBps": _mbps(64 * MiB, t_python),
                "direct_over_python_time": round(t_direct / t_python, 2),
                "gateway_over_direct_time": round(t_via / t_direct, 2),
            }
        out["node"] = _node(addr[owner], cluster.token, "bench-big", repeat)
        # Connected to the other backend: through it, or straight to the owner.
        out["node_via_gateway"] = _node(addr[gateway], cluster.token, "bench-big", repeat)
        out["node_direct_from_gateway"] = _node(addr[gateway], cluster.token, "bench-big", repeat, direct=True)
        out["cpp"] = _cpp(addr[owner], cluster.token, "bench-big", repeat)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
