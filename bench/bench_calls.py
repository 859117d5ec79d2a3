"""Method calls, make_persistent and concurrency, each beside its yardstick in the same run.

Yardsticks, measured in the same run: a bare grpcio unary echo
(bench/echo_server.py, a separate process, same payload size, same number of
server threads) alone, from 8 threads and from 4 processes; a bare echo over an
abstract Unix socket in the same process (the local lane's floor: no gRPC, a
length prefix, a thread per connection) alone and from 8 threads; one
fdatasync of a small append on this disk; and, when an interpreter with dataClay is given
(``--dataclay-python`` or ``CLAYPOT_DATACLAY_PYTHON``, see bench_dataclay.py),
dataClay 4.3.1 on this machine. Reported:

- latencies (p50/p99) of read-only, changing and attribute calls and of
  get_by_alias, with their ratio to the bare echo;
- make_persistent of one small object per call, of batches, from 4 threads;
  the one-at-a-time rate against the floor of one RPC plus one fdatasync in
  series (``floor_per_s``) and against dataClay's;
- a changing call under ``sync`` against the echo plus one fdatasync;
- 8 callers changing 8 objects under ``sync``: rate against one caller, and
  the average number of records each fsync made durable (group commit);
- read-only calls from 8 threads and from 4 processes against the echo at the
  same concurrency, and the 8-thread rate against dataClay's;
- what the servicer's error boundary adds to an RPC (in-process, a decorated
  no-op against the bare one), as a share of the read-only call;
- the CPU each call costs the caller and the server (``cpu_per_call``, user +
  system, all threads) for the echo, a read-only call, a changing call and a
  make_persistent: unlike latency, it hardly moves with the machine's load;
- ``grpc_path``: the same read-only and changing calls, one-at-a-time
  make_persistent and 8 reading threads from a client with the local lane off
  (``local_lane=False``: every call over gRPC), so the lane's gain is measured
  in the same run (``lane_over_grpc_*``).

The claypot figures are on the default path: a client on the backends' host
sends its unary calls over their local lane (store/_wire/lane.py).

Prints one JSON document; ``ratios`` holds what bench/compare.py watches.

    python bench/bench_calls.py [--calls 3000] [--durability sync]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import store  # noqa: E402
from bench.common import Counter, emit, machine, percentiles, throughput, timed  # noqa: E402
from store import LocalCluster  # noqa: E402


SOCKET_ECHO = f"claypot-bench-echo-{os.getpid()}"


def start_echo(workers: int):
    port_file = os.path.join(tempfile.mkdtemp(prefix="echo-"), "port")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_server", port_file, str(workers), "", SOCKET_ECHO],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    deadline = time.monotonic() + 20
    while not os.path.exists(port_file):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("echo server did not start")
        time.sleep(0.02)
    with open(port_file) as f:
        return proc, int(f.read())


class SocketEcho:
    """The local lane's yardstick: a bare length-prefixed echo over an abstract Unix
    socket (bench/echo_server.py), one connection per calling thread."""

    def __init__(self, name: str):
        self.name = "\0" + name
        self.local = threading.local()

    def call(self, payload: bytes) -> bytes:
        sock = getattr(self.local, "sock", None)
        if sock is None:
            sock = self.local.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(self.name)
        sock.sendall(len(payload).to_bytes(4, "little") + payload)
        n = int.from_bytes(_recv_exact(sock, 4), "little")
        return _recv_exact(sock, n)


def _recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError("the echo closed the connection")
        data += more
    return data


def grpc_path(cluster, a, objs_owner: str, objects: int) -> dict:
    """The same calls from a client with the local lane off (every call over gRPC)."""
    from store._client.client import Client
    from store._model.objects import dispatching

    client = Client(cluster.address, cluster.token, settings=store.Settings.from_env(local_lane=False))
    try:
        with dispatching(client):
            c = Counter()
            c.make_persistent(backend=objs_owner)
            out = {
                "method_call_readonly": percentiles(timed(c.get, a.calls)),
                "method_call_mutating": percentiles(timed(c.incr, a.calls)),
            }
            batch = [Counter(i) for i in range(objects)]
            t = time.perf_counter()
            for o in batch:
                o.make_persistent(backend=objs_owner)
            out["make_persistent_per_s"] = round(objects / (time.perf_counter() - t))
            mine = [Counter() for _ in range(8)]
            for o in mine:
                o.make_persistent(backend=objs_owner)

            def on_grpc(fn):
                # A new thread starts without this context's dispatcher: set it per call.
                def call():
                    with dispatching(client):
                        return fn()

                return call

            out["readonly_threads_8_per_s"] = round(throughput([on_grpc(o.get) for o in mine], a.seconds))
        return out
    finally:
        client.close()


def boundary_cost_ns(n: int = 200_000) -> dict:
    """ns the servicer's error boundary (store.backend._service.boundary) adds to one RPC.

    The same no-op RPC method with and without ``@replies``, called in-process,
    so the round trip's noise is not in the figure; and the memory blocks still
    held after ``n`` wrapped calls (the boundary must keep nothing per call).
    """
    from store.backend._service.boundary import replies
    from store._wire.generated import claypot_pb2 as pb

    class Servicer:
        def plain(self, request, context):
            return request

        wrapped = replies(pb.Status)(plain)

    s, request = Servicer(), pb.Status()

    def per_call_ns(fn) -> float:
        for _ in range(1000):
            fn(request, None)
        t = time.perf_counter()
        for _ in range(n):
            fn(request, None)
        return (time.perf_counter() - t) / n * 1e9

    plain = min(per_call_ns(s.plain) for _ in range(3))
    wrapped = min(per_call_ns(s.wrapped) for _ in range(3))
    blocks = sys.getallocatedblocks()
    for _ in range(n):
        s.wrapped(request, None)
    held = sys.getallocatedblocks() - blocks
    return {
        "plain_ns": round(plain, 1),
        "wrapped_ns": round(wrapped, 1),
        "added_ns": round(wrapped - plain, 1),
        "blocks_held_after_calls": held,
        "calls": n,
    }


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` used so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU per call of this process (the caller) and of a server process.

    Wall time on a shared 2-core machine moves with everybody else's load;
    the CPU a call costs on each side moves much less, so it shows the fixed
    per-call cost of claypot's own code against the bare echo's even when
    the latencies are noisy.
    """

    def __init__(self, server_pid: int):
        self.pid = server_pid

    def __enter__(self):
        self.client0, self.server0 = time.process_time(), process_cpu_s(self.pid)
        return self

    def __exit__(self, *exc):
        self.client = time.process_time() - self.client0
        self.server = process_cpu_s(self.pid) - self.server0

    def per_call(self, calls: int) -> dict:
        return {
            "client_us": round(self.client / calls * 1e6, 1),
            "server_us": round(self.server / calls * 1e6, 1),
            "total_us": round((self.client + self.server) / calls * 1e6, 1),
        }


def fdatasync_us(directory: str, n: int = 400) -> dict:
    """One small append made durable with fdatasync, as the log's group commit does it."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"x" * 100)
            os.fdatasync(fd)
            samples.append((time.perf_counter() - t) * 1e6)
    finally:
        os.close(fd)
        os.unlink(path)
    return percentiles(samples)


_PROCESS_CALLER = r"""
import sys, time
mode, target, token, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if mode == "echo":
    import grpc
    unary = grpc.insecure_channel(target).unary_unary("/bench.Echo/Unary")
    payload = b"x" * 90
    call = lambda: unary(payload, timeout=10)
else:
    import store
    from store.errors import BackendUnavailable
    deadline = time.monotonic() + 30
    while True:  # processes starting together on a busy machine may miss the first probe
        try:
            store.connect(target, token)
            break
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    call = store.get_by_alias(mode).get
for _ in range(100):
    call()
print("ready", flush=True)
sys.stdin.readline()
n, stop = 0, time.perf_counter() + seconds
while time.perf_counter() < stop:
    call()
    n += 1
print(n, flush=True)
"""


def run_processes(modes: list[str], target: str, token: str, seconds: float) -> float:
    """Calls per second of one process per entry of ``modes``, all started together."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_CALLER, m, target, token, str(seconds)],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for m in modes
    ]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a calling process did not start")
        for p in procs:  # go: all at once
            p.stdin.write("\n")
            p.stdin.flush()
        return sum(int(p.stdout.readline()) for p in procs) / seconds
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)


def group_commit_counts(backend_id: str) -> tuple[float, float]:
    """(records, fsyncs) the backend's group commits made durable so far (its metrics)."""
    import urllib.request

    address = next(b.metrics_address for b in store.backends() if b.backend_id == backend_id)
    if not address:
        return 0.0, 0.0
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("claypot_group_commit_records_sum"):
            total = float(line.split()[-1])
        elif line.startswith("claypot_group_commit_records_count"):
            count = float(line.split()[-1])
    return total, count


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--objects", type=int, default=2000)
    p.add_argument("--durability", default="sync")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each concurrent phase")
    p.add_argument(
        "--dataclay-python",
        default=os.environ.get("CLAYPOT_DATACLAY_PYTHON", ""),
        help="an interpreter with dataclay installed (see bench_dataclay.py)",
    )
    a = p.parse_args()
    settings = store.Settings.from_env()
    echo, port = start_echo(settings.server_threads)
    result: dict = {"bench": "calls", "durability": a.durability, **machine()}
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        unary = channel.unary_unary("/bench.Echo/Unary")
        # A claypot call request for incr() is about 90 bytes; echo the same size.
        payload = b"x" * 90

        def echo_call():
            return unary(payload, timeout=10)

        cpu: dict = {}
        timed(echo_call, 0)  # warm up outside the meter: it counts steady calls only
        with CpuMeter(echo.pid) as m:
            echo_us = timed(echo_call, a.calls, warmup=0)
        cpu["bare_echo"] = m.per_call(a.calls)
        result["bare_grpc_unary"] = percentiles(echo_us)
        sock_echo = SocketEcho(SOCKET_ECHO)

        def socket_echo_call():
            return sock_echo.call(payload)

        timed(socket_echo_call, 0)
        with CpuMeter(echo.pid) as m:
            result["bare_socket_echo"] = percentiles(timed(socket_echo_call, a.calls, warmup=0))
        cpu["bare_socket_echo"] = m.per_call(a.calls)
        with LocalCluster(backends=2, durability=a.durability) as cluster:
            result["fdatasync"] = fdatasync_us(cluster.data_dir)
            c = Counter()
            c.make_persistent(alias="bench-counter", backend=cluster.backends[0])
            pids = [p.pid for p in cluster.processes]
            timed(c.get, 0)
            with CpuMeter(pids[0]) as m:
                result["method_call_readonly"] = percentiles(timed(c.get, a.calls, warmup=0))
            cpu["readonly_call"] = m.per_call(a.calls)
            timed(c.incr, 0)
            with CpuMeter(pids[0]) as m:
                result["method_call_mutating"] = percentiles(timed(c.incr, a.calls, warmup=0))
            cpu["changing_call"] = m.per_call(a.calls)
            result["attribute_read"] = percentiles(timed(lambda: c.value, a.calls))
            result["get_by_alias"] = percentiles(timed(lambda: store.get_by_alias("bench-counter"), a.calls // 2))
            # make_persistent: one object per call, then batches, then 4 threads.
            for i in range(200):
                Counter(i).make_persistent(backend=cluster.backends[1])
            objs = [Counter(i) for i in range(a.objects)]
            t = time.perf_counter()
            with CpuMeter(pids[1]) as m:
                for o in objs:
                    o.make_persistent(backend=cluster.backends[1])
            single = a.objects / (time.perf_counter() - t)
            cpu["make_persistent"] = m.per_call(a.objects)
            result["cpu_per_call"] = cpu
            objs = [Counter(i) for i in range(a.objects * 10)]
            t = time.perf_counter()
            for i in range(0, len(objs), 500):
                store.make_persistent_many(objs[i : i + 500], backend=cluster.backends[1])
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
            floor_us = result["bare_grpc_unary"]["p50_us"] + result["fdatasync"]["p50_us"]
            result["make_persistent_per_s"] = {
                "one_at_a_time": round(single),
                "batched_500": round(batched),
                "four_threads": round(threaded),
                "floor_per_s": round(1e6 / floor_us),
            }

            # Changing calls under the durability policy: one caller, then 8 on 8 objects.
            owner = cluster.backends[0]
            mine = [Counter() for _ in range(8)]
            for k, o in enumerate(mine):
                o.make_persistent(alias=f"bench-c{k}", backend=owner)
            # One caller and eight, in alternating pairs: this machine's speed drifts
            # within a run by more than the ratio's margin, so each pair is measured
            # side by side and the medians are reported (with every pair's ratio).
            ones, eights, pairs = [], [], []
            for _ in range(3):
                ones.append(throughput([mine[0].incr], a.seconds / 2))
                b8 = group_commit_counts(owner)
                eights.append(throughput([o.incr for o in mine], a.seconds / 2))
                a8 = group_commit_counts(owner)
                pairs.append((eights[-1] / ones[-1], a8[0] - b8[0], a8[1] - b8[1]))
            one, eight = statistics.median(ones), statistics.median(eights)
            records, fsyncs = sum(p[1] for p in pairs), sum(p[2] for p in pairs)
            result["changing_calls_per_s"] = {
                "one_caller": round(one),
                "eight_callers": round(eight),
                "avg_group_size": round(records / fsyncs, 2) if fsyncs else None,
                "pair_ratios": [round(p[0], 2) for p in pairs],
            }

            # Read-only calls at the same concurrency as the echo: 8 threads, 4 processes.
            echo8 = throughput([echo_call] * 8, a.seconds)
            socket_echo8 = throughput([socket_echo_call] * 8, a.seconds)
            calls8 = throughput([o.get for o in mine], a.seconds)
            echo4p = run_processes(["echo"] * 4, f"127.0.0.1:{port}", "", a.seconds)
            calls4p = run_processes([f"bench-c{k}" for k in range(4)], cluster.address, cluster.token, a.seconds)
            result["readonly_calls_per_s"] = {
                "threads_8": round(calls8),
                "bare_echo_threads_8": round(echo8),
                "bare_socket_echo_threads_8": round(socket_echo8),
                "processes_4": round(calls4p),
                "bare_echo_processes_4": round(echo4p),
            }
            result["grpc_path"] = grpc_path(cluster, a, cluster.backends[1], a.objects // 2)
    finally:
        echo.kill()
        echo.wait()
    if a.dataclay_python:
        from bench.bench_dataclay import run as run_dataclay

        result["dataclay"] = run_dataclay(a.dataclay_python, a.objects, a.calls // 2, a.seconds)
    else:
        result["dataclay"] = {"available": False}

    bare = result["bare_grpc_unary"]["p50_us"]
    result["ratio_to_bare_grpc_p50"] = {
        k: round(result[k]["p50_us"] / bare, 2)
        for k in ("method_call_readonly", "method_call_mutating", "attribute_read", "get_by_alias")
    }
    mp, cc, ro = (result["make_persistent_per_s"], result["changing_calls_per_s"], result["readonly_calls_per_s"])
    ratios = {
        "readonly_call_over_echo_p50": result["ratio_to_bare_grpc_p50"]["method_call_readonly"],
        "mutating_call_over_echo_plus_fdatasync_p50": round(result["method_call_mutating"]["p50_us"] / floor_us, 2),
        "make_persistent_over_floor": round(mp["one_at_a_time"] / mp["floor_per_s"], 2),
        "eight_changing_callers_over_one": round(cc["eight_callers"] / cc["one_caller"], 2),
        "threads_8_over_echo": round(ro["threads_8"] / ro["bare_echo_threads_8"], 2),
        "processes_4_over_echo": round(ro["processes_4"] / ro["bare_echo_processes_4"], 2),
        "readonly_call_cpu_over_echo": round(cpu["readonly_call"]["total_us"] / cpu["bare_echo"]["total_us"], 2),
        "readonly_call_over_socket_echo_p50": round(
            result["method_call_readonly"]["p50_us"] / result["bare_socket_echo"]["p50_us"], 2
        ),
        "threads_8_over_socket_echo": round(ro["threads_8"] / ro["bare_socket_echo_threads_8"], 2),
        "lane_over_grpc_readonly_p50": round(
            result["grpc_path"]["method_call_readonly"]["p50_us"] / result["method_call_readonly"]["p50_us"], 2
        ),
        "lane_over_grpc_make_persistent": round(mp["one_at_a_time"] / result["grpc_path"]["make_persistent_per_s"], 2),
        "changing_call_cpu_over_echo": round(cpu["changing_call"]["total_us"] / cpu["bare_echo"]["total_us"], 2),
    }
    dc = result["dataclay"]
    if dc.get("available"):
        ratios["make_persistent_over_dataclay"] = round(mp["one_at_a_time"] / dc["make_persistent_per_s"], 2)
        ratios["threads_8_over_dataclay"] = round(ro["threads_8"] / dc["threads_8_calls_per_s"], 2)
    result["error_boundary"] = boundary_cost_ns()
    ratios["error_boundary_share_of_readonly_call"] = round(
        result["error_boundary"]["added_ns"] / 1000 / result["method_call_readonly"]["p50_us"], 5
    )
    result["ratios"] = ratios
    result["targets"] = {
        "method_call_within_1.5x_bare": ratios["readonly_call_over_echo_p50"] <= 1.5,
        "make_persistent_5000_per_s_batched": batched >= 5000,
        "make_persistent_1500_per_s": mp["one_at_a_time"] >= 1500,
        "mutating_call_within_echo_plus_fdatasync_plus_10pct": ratios["mutating_call_over_echo_plus_fdatasync_p50"]
        <= 1.10,
        "eight_changing_callers_3x_one": ratios["eight_changing_callers_over_one"] >= 3.0,
        "threads_8_at_least_0.8_echo": ratios["threads_8_over_echo"] >= 0.8,
        "processes_4_at_least_0.8_echo": ratios["processes_4_over_echo"] >= 0.8,
    }
    if dc.get("available"):
        result["targets"]["make_persistent_2x_dataclay"] = ratios["make_persistent_over_dataclay"] >= 2.0
        result["targets"]["threads_8_2x_dataclay"] = ratios["threads_8_over_dataclay"] >= 2.0
    emit(result)


if __name__ == "__main__":
    main()
