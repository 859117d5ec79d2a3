"""A bare grpcio echo server: the yardstick claypot's calls are measured against.

Run as a process: ``python -m bench.echo_server PORT_FILE [workers] [UNIX_SOCKET] [SOCKET_ECHO]``.
It listens on an ephemeral loopback TCP port (written to PORT_FILE) and, when
given a path, also on that Unix-domain socket. With SOCKET_ECHO (a name) it
also runs the yardstick of claypot's local lane: a bare echo on the abstract
Unix socket of that name, without gRPC (a u32 length, then the bytes; one
thread per connection, blocking reads and writes). It serves,
with generic handlers and no serializers (raw bytes, no generated code):

- ``/bench.Echo/Unary``: bytes in, the same bytes out;
- ``/bench.Echo/Sink``: bytes in, their count (u64) out: a unary push;
- ``/bench.Echo/Give``: a size (u64) in, that many bytes out: a unary pull,
  cut from a buffer kept per size as ``Pull`` does;
- ``/bench.Echo/Stream``: a client stream of chunks; replies with the byte count;
- ``/bench.Echo/StreamLand``: like Stream, but the first message is the total
  size (u64) and every chunk is copied into a buffer of that size, allocated
  as claypot allocates its receive buffers (private, pre-populated mmap): a
  bare receiver that lands the data;
- ``/bench.Echo/Pull``: a request ``(total, chunk)`` as two little-endian u64;
  replies with a server stream of ``total`` bytes in ``chunk``-sized pieces, cut
  from a buffer allocated (and touched) once per size, as a server holding an
  array in memory would send it.
"""

import mmap
import os
import socket
import sys
import threading
from concurrent import futures

import grpc

OPTIONS = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]


def _unary(request, context):
    return request


def _sink(request, context):
    return len(request).to_bytes(8, "little")


def _give(request, context):
    total = int.from_bytes(request[:8], "little")
    return _source(total).tobytes()


def _stream(request_iterator, context):
    n = 0
    for chunk in request_iterator:
        n += len(chunk)
    return n.to_bytes(8, "little")


def landing_buffer(nbytes: int) -> memoryview:
    """A receive buffer made the way claypot makes its own (private, pre-populated mmap)."""
    if not nbytes:
        return memoryview(bytearray(0))
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(-1, nbytes, flags=flags))


def _stream_land(request_iterator, context):
    total = int.from_bytes(next(request_iterator), "little")
    target = landing_buffer(total)
    n = 0
    for chunk in request_iterator:
        target[n : n + len(chunk)] = chunk
        n += len(chunk)
    return n.to_bytes(8, "little")


_sources: dict[int, memoryview] = {}


def _source(total: int) -> memoryview:
    source = _sources.get(total)
    if source is None:
        source = _sources[total] = memoryview(bytearray(total))
    return source


def _pull(request, context):
    total = int.from_bytes(request[:8], "little")
    chunk = int.from_bytes(request[8:16], "little")
    # Content does not matter to the transport; the buffer exists so every
    # piece is a real slice copied out of memory, like a streamed array. It is
    # kept across calls so its allocation is not timed as transport.
    source = _source(total)
    for start in range(0, total, chunk):
        yield source[start : start + chunk].tobytes()


def _socket_echo_connection(conn) -> None:
    with conn:
        while True:
            head = _recv_exact(conn, 4)
            if head is None:
                return
            body = _recv_exact(conn, int.from_bytes(head, "little"))
            if body is None:
                return
            conn.sendall(head + body)


def _recv_exact(conn, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            return None
        data += more
    return data


def serve_socket_echo(name: str) -> None:
    """A bare length-prefixed echo on the abstract Unix socket ``name``, one thread per connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(64)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_socket_echo_connection, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def serve(port_file: str, workers: int = 16, unix_socket: str | None = None, socket_echo: str | None = None) -> None:
    """Serve on an ephemeral loopback port (and ``unix_socket``); write the port to ``port_file``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Sink": grpc.unary_unary_rpc_method_handler(_sink),
            "Give": grpc.unary_unary_rpc_method_handler(_give),
            "Stream": grpc.stream_unary_rpc_method_handler(_stream),
            "StreamLand": grpc.stream_unary_rpc_method_handler(_stream_land),
            "Pull": grpc.unary_stream_rpc_method_handler(_pull),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    if unix_socket:
        server.add_insecure_port("unix:" + unix_socket)
    server.start()
    if socket_echo:
        serve_socket_echo(socket_echo)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    server.wait_for_termination()


if __name__ == "__main__":
    serve(
        sys.argv[1],
        int(sys.argv[2]) if len(sys.argv) > 2 else 16,
        sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None,
        sys.argv[4] if len(sys.argv) > 4 else None,
    )
