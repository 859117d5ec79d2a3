"""What the security checks cost: token check, idle-stream guard, directory signatures.

Two gRPC echo servers run in this process, identical but for their
interceptors: one with a token check written the old way (``==``), one with
claypot's (constant-time ``TokenInterceptor`` plus ``StreamIdleGuard``).
Rounds alternate between them so drift in the machine's load hits both.
Also timed: sealing and opening a code-registry entry and a backend record
(HMAC-SHA256), which backends do on each registry write and read.

    python -m bench.bench_security        # prints JSON
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent import futures

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from store.backend._service.guards import StreamIdleGuard  # noqa: E402
from store.backend._service.server import TokenInterceptor  # noqa: E402
from store._util.security import DirectoryKeys  # noqa: E402

TOKEN = "t" * 48
OPTIONS = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]


class EqualityToken(grpc.ServerInterceptor):
    """The check before: plain ``==`` on the metadata value."""

    def __init__(self, token):
        self._token = token

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        for key, value in details.invocation_metadata:
            if key == "claypot-token" and value == self._token:
                return continuation(details)
        return self._deny


def _server(interceptors):
    def unary(request, context):
        return request

    def stream(request_iterator, context):
        n = 0
        for chunk in request_iterator:
            n += len(chunk)
        return n.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Unary": grpc.unary_unary_rpc_method_handler(unary), "Stream": grpc.stream_unary_rpc_method_handler(stream)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors, options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)


def _unary_us(channel, n: int) -> list[float]:
    call = channel.unary_unary("/bench.Echo/Unary")
    meta = [("claypot-token", TOKEN)]
    payload = b"x" * 90
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call(payload, metadata=meta, timeout=10)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def _stream_mbs(channel, total: int, chunk: int) -> float:
    call = channel.stream_unary("/bench.Echo/Stream")
    block = b"\0" * chunk
    t0 = time.perf_counter()
    call(iter([block] * (total // chunk)), metadata=[("claypot-token", TOKEN)], timeout=60)
    return total / (time.perf_counter() - t0) / 1e6


def _micro_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    before, ch_before = _server([EqualityToken(TOKEN)])
    after, ch_after = _server([TokenInterceptor(TOKEN), StreamIdleGuard(10.0)])
    try:
        _unary_us(ch_before, 200), _unary_us(ch_after, 200)  # warm up both
        unary = {"before": [], "after": []}
        streams = {"before": [], "after": []}
        for _ in range(5):
            unary["before"] += _unary_us(ch_before, 600)
            unary["after"] += _unary_us(ch_after, 600)
            streams["before"].append(_stream_mbs(ch_before, 64 << 20, 4 << 20))
            streams["after"].append(_stream_mbs(ch_after, 64 << 20, 4 << 20))
    finally:
        ch_before.close(), ch_after.close()
        before.stop(0), after.stop(0)

    keys = DirectoryKeys.from_token(TOKEN)
    code = os.urandom(20_000)
    sealed = keys.seal_code("mod:Class#digest", code)
    record = {
        "address": "127.0.0.1:40000",
        "host": "h",
        "pid": 1,
        "objects": 10,
        "memory_bytes": 1 << 30,
        "started": time.time(),
    }
    stored = keys.seal_backend("b" * 32, record)

    def p(xs, q):
        return round(statistics.quantiles(xs, n=100)[q - 1], 1)

    u_b, u_a = p(unary["before"], 50), p(unary["after"], 50)
    s_b, s_a = statistics.median(streams["before"]), statistics.median(streams["after"])
    print(
        json.dumps(
            {
                "bench": "security",
                "cpus": os.cpu_count(),
                "unary_echo_us": {
                    "equality_token_check": {"p50": u_b, "p99": p(unary["before"], 99)},
                    "constant_time_check_and_stream_guard": {"p50": u_a, "p99": p(unary["after"], 99)},
                    "ratio_p50": round(u_a / u_b, 3),
                },
                "stream_64MiB_MBps": {
                    "equality_token_check": round(s_b),
                    "with_stream_guard": round(s_a),
                    "ratio": round(s_a / s_b, 3),
                },
                "code_entry_20KB_us": {
                    "seal": round(_micro_us(lambda: keys.seal_code("mod:Class#digest", code), 2000), 2),
                    "open": round(_micro_us(lambda: keys.open_code("mod:Class#digest", sealed), 2000), 2),
                },
                "backend_record_us": {
                    "seal": round(_micro_us(lambda: keys.seal_backend("b" * 32, record), 5000), 2),
                    "open": round(_micro_us(lambda: keys.open_backend("b" * 32, stored), 5000), 2),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
