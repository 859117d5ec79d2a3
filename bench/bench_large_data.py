"""Large numpy values through claypot, beside a bare grpcio stream and memcpy.

Run: ``python -m bench.bench_large_data [--quick]``. Prints one JSON document.

First values of 64 KiB, 256 KiB, 1 MiB and 4 MiB against a bare grpcio unary
call carrying the same bytes (see ``measure_value``). Then, for 1 MiB, 64 MiB
and 1 GiB uint8 arrays, it measures, in the same run:

- ``memcpy``: ``np.copyto`` of the array into a preallocated one (the physical limit);
- ``bare_push`` / ``bare_pull``: the same bytes through a bare grpcio client
  stream / server stream to ``bench/echo_server.py`` (raw bytes, no protobuf),
  cut into the same chunk size claypot uses. The receiving end only counts
  the bytes: this is the transport alone, the ceiling claypot is held to
  (claypot also lands every byte in the receiver's buffer);
- ``bare_landed_*``: the same bare streams with the receiver copying every
  chunk into one buffer allocated as claypot's are: what any receiver that
  keeps the data pays; the gap between it and claypot is claypot's own cost;
- ``persist``: ``make_persistent`` of an object holding the array, on claypot's
  default path for a backend on the same host (buffers through /dev/shm);
- ``read``: reading the array back (an attribute read), the same way;
- ``round_trip``: 2 x size / (persist + read) beside the bare equivalent;
- ``stream_*``: the same with shared memory off: the chunked gRPC stream that
  claypot uses between hosts.

Then ``sum()`` of a 256 MiB float64 array run as a method next to the data
versus pulling the array to the client and summing there; and bare push
throughput by chunk size over TCP and a Unix socket (to judge those options).

The cluster runs with durability ``none`` so the figures are the data path's,
not the disk's: a durable (``sync``) make_persistent of a big object also
writes and fsyncs a checkpoint before it is acknowledged, which is bounded by
the disk (measured separately as ``disk_fsync_MBps``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

from bench.common import machine
from bench.echo_server import landing_buffer
import store  # noqa: E402
from store import LocalCluster, StorageObject
from store.config import Settings
from store._model.objects import readonly

MiB = 1 << 20
KiB = 1 << 10
VALUE_SIZES = [64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]


class Holder(StorageObject):
    """An object holding one array; the unit every figure here moves."""

    def __init__(self, data):
        self.data = data

    @readonly
    def echo(self, value):
        """The argument back: a call carrying the same bytes each way."""
        return value

    @readonly
    def total(self):
        """sum() next to the data."""
        return float(self.data.sum())


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


class Echo:
    """The bare echo server process (TCP loopback and a Unix socket), stopped by PID."""

    OPTIONS = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="claypot-echo-")
        port_file = os.path.join(self.dir, "port")
        self.socket = os.path.join(self.dir, "echo.sock")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.echo_server", port_file, "16", self.socket],
            cwd=root,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(port_file):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("echo server did not start")
            time.sleep(0.02)
        with open(port_file) as f:
            port = int(f.read())
        self.channels = {
            "tcp": grpc.insecure_channel(f"127.0.0.1:{port}", options=self.OPTIONS),
            "unix": grpc.insecure_channel("unix:" + self.socket, options=self.OPTIONS),
        }

    def push(self, array: np.ndarray, chunk: int, transport: str = "tcp", land: bool = False) -> None:
        """A client stream of the array's bytes, one ``tobytes()`` per chunk.

        With ``land`` the server copies them into a buffer (StreamLand).
        """
        view = memoryview(array).cast("B")
        stream = self.channels[transport].stream_unary("/bench.Echo/StreamLand" if land else "/bench.Echo/Stream")

        def chunks():
            if land:
                yield view.nbytes.to_bytes(8, "little")
            for start in range(0, view.nbytes, chunk):
                yield view[start : start + chunk].tobytes()

        got = int.from_bytes(stream(chunks(), timeout=120), "little")
        assert got == view.nbytes, (got, view.nbytes)

    def pull(self, nbytes: int, chunk: int, transport: str = "tcp", land: bool = False) -> None:
        """A server stream of nbytes, counted (the transport alone) or, with ``land``,
        copied into a buffer allocated as claypot allocates its receive buffers."""
        stream = self.channels[transport].unary_stream("/bench.Echo/Pull")
        request = nbytes.to_bytes(8, "little") + chunk.to_bytes(8, "little")
        target = None
        if land:
            target = landing_buffer(nbytes)
        got = 0
        for piece in stream(request, timeout=120):
            if target is not None:
                target[got : got + len(piece)] = piece
            got += len(piece)
        assert got == nbytes, (got, nbytes)

    def unary(self, method: str, request: bytes) -> bytes:
        """One bare unary call (``Unary`` echo, ``Sink`` push or ``Give`` pull)."""
        return self.channels["tcp"].unary_unary("/bench.Echo/" + method)(request, timeout=60)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _disk_fsync_rate(directory: str, nbytes: int = 64 * MiB) -> float:
    path = os.path.join(directory, "fsync-probe")
    data = np.ones(nbytes, np.uint8)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        f.write(memoryview(data))
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t
    os.unlink(path)
    return _mbps(nbytes, elapsed)


def _memcpy_seconds(array: np.ndarray, repeat: int) -> float:
    """Best time of a numpy copy into an already-touched buffer (memory bandwidth)."""
    target = np.empty_like(array)
    return _best(lambda: np.copyto(target, array), max(repeat, 2))


def measure_size(cluster, echo: Echo, nbytes: int, repeat: int, chunk: int) -> dict:
    """All figures for one array size.

    The bare and claypot runs are interleaved, round by round, and the best
    of each is kept: the machine is shared, and interleaving makes both see
    the same background load.
    """
    rng = np.random.default_rng(nbytes)
    array = rng.integers(0, 255, nbytes, dtype=np.uint8)
    memcpy = _memcpy_seconds(array, repeat)
    backend = cluster.backends[0]
    times = {
        "bare_push": [],
        "bare_pull": [],
        "persist": [],
        "read": [],
        "persist_stream": [],
        "read_stream": [],
        "bare_push_landed": [],
        "bare_pull_landed": [],
    }
    client = store.client()
    default = client.settings
    for _ in range(repeat):
        times["bare_push"].append(_best(lambda: echo.push(array, chunk), 1))
        times["bare_pull"].append(_best(lambda: echo.pull(nbytes, chunk), 1))
        times["bare_push_landed"].append(_best(lambda: echo.push(array, chunk, land=True), 1))
        times["bare_pull_landed"].append(_best(lambda: echo.pull(nbytes, chunk, land=True), 1))
        # claypot's default (same host: /dev/shm), then the gRPC stream it uses across hosts.
        for suffix, settings in (("", default), ("_stream", default.replace(shm=False))):
            client.settings = settings
            obj = Holder(array)
            t = time.perf_counter()
            obj.make_persistent(backend=backend)
            times["persist" + suffix].append(time.perf_counter() - t)
            t = time.perf_counter()
            back = obj.data
            times["read" + suffix].append(time.perf_counter() - t)
            assert back.nbytes == nbytes and back[-1] == array[-1]
            del back
            obj.delete_persistent()
        client.settings = default
    bare_push, bare_pull, persist, read = (min(times[k]) for k in ("bare_push", "bare_pull", "persist", "read"))
    persist_stream, read_stream = min(times["persist_stream"]), min(times["read_stream"])
    stream_rt = 2 * nbytes / (persist_stream + read_stream)
    push_landed, pull_landed = min(times["bare_push_landed"]), min(times["bare_pull_landed"])
    landed_rt = 2 * nbytes / (push_landed + pull_landed)
    bare_rt = 2 * nbytes / (bare_push + bare_pull)
    claypot_rt = 2 * nbytes / (persist + read)
    return {
        "bytes": nbytes,
        "memcpy_MBps": _mbps(nbytes, memcpy),
        "bare_push_MBps": _mbps(nbytes, bare_push),
        "bare_pull_MBps": _mbps(nbytes, bare_pull),
        "persist_MBps": _mbps(nbytes, persist),
        "read_MBps": _mbps(nbytes, read),
        "persist_s": round(persist, 4),
        "read_s": round(read, 4),
        "round_trip_MBps": round(claypot_rt / 1e6, 1),
        "bare_round_trip_MBps": round(bare_rt / 1e6, 1),
        "persist_vs_bare": round(bare_push / persist, 3),
        "read_vs_bare": round(bare_pull / read, 3),
        "round_trip_vs_bare": round(claypot_rt / bare_rt, 3),
        "bare_landed_push_MBps": _mbps(nbytes, push_landed),
        "bare_landed_pull_MBps": _mbps(nbytes, pull_landed),
        "bare_landed_round_trip_MBps": round(landed_rt / 1e6, 1),
        "round_trip_vs_bare_landed": round(claypot_rt / landed_rt, 3),
        "round_trip_vs_memcpy": round(claypot_rt / (nbytes / memcpy), 3),
        "stream_persist_MBps": _mbps(nbytes, persist_stream),
        "stream_read_MBps": _mbps(nbytes, read_stream),
        "stream_round_trip_MBps": round(stream_rt / 1e6, 1),
        "stream_round_trip_vs_bare": round(stream_rt / bare_rt, 3),
        "stream_round_trip_vs_bare_landed": round(stream_rt / landed_rt, 3),
    }


def measure_value(cluster, echo: Echo, nbytes: int, repeat: int) -> dict:
    """A value of 64 KiB to 4 MiB against a bare unary call carrying the same bytes.

    - ``call``: a method that returns its array argument (the bytes cross each
      way in one call) against the bare ``Unary`` echo of the same bytes (the
      client sends ``tobytes()`` and views the reply with ``np.frombuffer``);
    - ``persist`` / ``read``: ``make_persistent`` of an object holding the array
      and reading it back, against a bare unary push (``Sink``) and pull
      (``Give``) of the same bytes; the persist carries a small object's
      fixed cost (an id, a directory entry) on top of the bytes.

    Claypot runs on its default path (same host: the size picks inline or /dev/shm).
    Rounds are interleaved and the best of each is kept.
    """
    array = np.random.default_rng(nbytes).integers(0, 255, nbytes, dtype=np.uint8)
    backend = cluster.backends[0]
    holder = Holder(np.zeros(1, np.uint8))
    holder.make_persistent(backend=backend)
    size_request = nbytes.to_bytes(8, "little")
    times: dict[str, list] = {k: [] for k in ("bare_echo", "call", "bare_push", "bare_pull", "persist", "read")}

    def bare_echo():
        back = np.frombuffer(echo.unary("Unary", array.tobytes()), np.uint8)
        assert back.nbytes == nbytes

    def call():
        back = holder.echo(array)
        assert back.nbytes == nbytes

    for _ in range(repeat):
        times["bare_echo"].append(_best(bare_echo, 3))
        times["call"].append(_best(call, 3))
        times["bare_push"].append(_best(lambda: echo.unary("Sink", array.tobytes()), 3))
        times["bare_pull"].append(_best(lambda: np.frombuffer(echo.unary("Give", size_request), np.uint8), 3))
        for _ in range(3):
            obj = Holder(array)
            t = time.perf_counter()
            obj.make_persistent(backend=backend)
            times["persist"].append(time.perf_counter() - t)
            t = time.perf_counter()
            back = obj.data
            times["read"].append(time.perf_counter() - t)
            assert back.nbytes == nbytes and back[-1] == array[-1]
            del back
            obj.delete_persistent()
    holder.delete_persistent()
    best = {k: min(v) for k, v in times.items()}
    return {
        "bytes": nbytes,
        "bare_echo_s": round(best["bare_echo"], 6),
        "call_echo_s": round(best["call"], 6),
        "call_vs_bare_echo": round(best["bare_echo"] / best["call"], 3),
        "bare_push_s": round(best["bare_push"], 6),
        "persist_s": round(best["persist"], 6),
        "persist_vs_bare_push": round(best["bare_push"] / best["persist"], 3),
        "bare_pull_s": round(best["bare_pull"], 6),
        "read_s": round(best["read"], 6),
        "read_vs_bare_pull": round(best["bare_pull"] / best["read"], 3),
        "round_trip_vs_bare_unary": round(
            (best["bare_push"] + best["bare_pull"]) / (best["persist"] + best["read"]), 3
        ),
    }


def measure_sum(cluster, nbytes: int, repeat: int) -> dict:
    """sum() next to the data versus pulling the array and summing on the client."""
    array = np.random.default_rng(1).random(nbytes // 8)
    obj = Holder(array)
    obj.make_persistent(backend=cluster.backends[0])
    expected = float(array.sum())
    del array
    remote = _best(lambda: obj.total(), repeat)
    pulled = _best(lambda: float(obj.data.sum()), repeat)
    assert abs(obj.total() - expected) <= 1e-6 * abs(expected)
    obj.delete_persistent()
    return {
        "bytes": nbytes,
        "next_to_data_s": round(remote, 5),
        "pull_then_sum_s": round(pulled, 5),
        "speedup": round(pulled / remote, 1),
    }


def measure_transports(echo: Echo, nbytes: int = 256 * MiB) -> list[dict]:
    """Bare push throughput by chunk size over TCP loopback and a Unix socket.

    These decide whether bigger chunks or a Unix socket would be worth it.
    """
    array = np.random.default_rng(2).integers(0, 255, nbytes, dtype=np.uint8)
    out = []
    for transport, chunk in [
        ("tcp", 1 * MiB),
        ("tcp", 4 * MiB),
        ("tcp", 8 * MiB),
        ("tcp", 15 * MiB),
        ("unix", 4 * MiB),
        ("unix", 15 * MiB),
    ]:
        seconds = _best(lambda: echo.push(array, chunk, transport), 2)
        out.append({"transport": transport, "chunk": chunk, "push_MBps": _mbps(nbytes, seconds)})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 MiB and 64 MiB only, one repeat")
    a = p.parse_args(argv)
    started = time.perf_counter()
    settings = Settings.from_env()
    sizes = [(1 * MiB, 7), (64 * MiB, 4)] + ([] if a.quick else [(1024 * MiB, 3)])
    out = {
        "machine": machine(grpcio=grpc.__version__, numpy=np.__version__),
        "chunk_size": settings.chunk_size,
        "inline_limit": settings.inline_limit,
        "durability": "none",
        "values": [],
        "sizes": [],
        "sum": None,
    }
    echo = Echo()
    try:
        with LocalCluster(backends=1, durability="none") as cluster:
            out["disk_fsync_MBps"] = _disk_fsync_rate(cluster.data_dir)
            for nbytes in VALUE_SIZES:
                out["values"].append(measure_value(cluster, echo, nbytes, 2 if a.quick else 5))
            for nbytes, repeat in sizes:
                out["sizes"].append(measure_size(cluster, echo, nbytes, 1 if a.quick else repeat, settings.chunk_size))
            out["sum"] = measure_sum(cluster, (64 if a.quick else 256) * MiB, 3)
        out["bare_transports_256MiB"] = measure_transports(echo, (64 if a.quick else 256) * MiB)
    finally:
        echo.close()
    big = out["sizes"][-1]
    out["targets"] = {
        "round_trip_GBps>=1": big["round_trip_MBps"] >= 1000,
        "round_trip_vs_bare>=0.8": big["round_trip_vs_bare"] >= 0.8,
        "round_trip_vs_bare_landed>=0.8": big["round_trip_vs_bare_landed"] >= 0.8,
        "stream_round_trip_vs_bare_landed>=0.8": big["stream_round_trip_vs_bare_landed"] >= 0.8,
        "sum_speedup>=10": out["sum"]["speedup"] >= 10,
        "values_call_vs_bare_echo>=0.8": all(v["call_vs_bare_echo"] >= 0.8 for v in out["values"]),
    }
    out["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
