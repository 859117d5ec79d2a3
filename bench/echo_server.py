"""A bare grpcio echo server: the yardstick claypot's calls are measured against.

Run as a process: ``python -m bench.echo_server PORT_FILE [workers] [aio]``. It serves
``/bench.Echo/Unary`` (bytes in, same bytes out) and ``/bench.Echo/Stream``
(a client stream of chunks; replies with the byte count), using generic handlers
so it needs no generated code.
"""

import sys
from concurrent import futures

import grpc

OPTIONS = [("grpc.max_send_message_length", 16 << 20),
           ("grpc.max_receive_message_length", 16 << 20)]


def _unary(request, context):
    return request


def _stream(request_iterator, context):
    n = 0
    for chunk in request_iterator:
        n += len(chunk)
    return n.to_bytes(8, "little")


def serve(port_file: str, workers: int = 16) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=OPTIONS)
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.stream_unary_rpc_method_handler(_stream),
    })
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    import os
    os.replace(port_file + ".tmp", port_file)
    server.wait_for_termination()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16)
