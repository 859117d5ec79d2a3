"""The backend's end of the local lane: unary RPCs from same-host clients without gRPC.

:class:`LaneServer` listens on the abstract Unix socket named after the
backend's advertised address (:func:`store._wire.lane.socket_name`) and serves
each connection on a thread of its own: read a request frame, run the
servicer's handler behind the same interceptors as the gRPC server (the token
check), write the reply frame. The handler sees a ``grpc.ServicerContext``
with the call's metadata and deadline, so the servicer cannot tell the paths
apart. Streams, and every call when the backend serves TLS, stay on gRPC.

Limits: at most ``max_connections`` connections at once (a client past it is
told the lane is full and uses gRPC); a connection idle for ``IDLE_CLOSE``
seconds is closed (clients stop reusing theirs sooner, see
:mod:`store._client.lane`); bytes that are not a valid frame close the
connection and touch nothing else; a request without the token is refused
on its first bytes, and its connection closed, the rest read and dropped unheld.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable

import grpc

from store._client.transport import HandlerTable, _CallDetails, _Context, serve_unary
from store._wire import lane as frames
from store._wire.generated import claypot_pb2 as pb
from store.errors import ProtocolError

log = logging.getLogger("claypot.lane")

IDLE_CLOSE = 120.0  # seconds a connection may wait for its next request
_SERVICE = pb.DESCRIPTOR.services_by_name["Backend"].full_name


class LaneServer:
    """Serves ``table``'s unary RPCs on the local lane of the backend advertised at ``address``."""

    def __init__(
        self,
        address: str,
        table: HandlerTable,
        max_connections: int,
        admits: Callable[[str, Any], bool] | None = None,
    ):
        self.address = address
        self.table = table
        self.max_connections = max_connections
        # (method path, metadata) -> whether the token check lets the call in; asked
        # before the request bytes are read, so a refused caller cannot make this
        # process hold them (the interceptors still run on every admitted call).
        self.admits = admits
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopped = False
        self._busy = 0  # calls being answered
        self._idle = threading.Condition(self._lock)

    def start(self) -> bool:
        """Listen; False (and no lane) if another process holds this address's name."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(frames.socket_name(self.address))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            log.warning("no local lane for %s: %s", self.address, exc)
            return False
        self._listener = sock
        threading.Thread(target=self._accept_loop, args=(sock,), name="lane-accept", daemon=True).start()
        return True

    def stop(self, grace: float = 1.0) -> None:
        """Stop listening and end every connection once its call in flight (if any) is
        answered; wait up to ``grace`` seconds for those calls, as gRPC's stop does."""
        with self._lock:
            self._stopped = True
            conns = list(self._conns)
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self._listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RD)  # ends the wait for a next request; a reply still goes out
            except OSError:
                pass
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout=grace)

    def connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._conns)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._stopped:
                    return
                # Out of file descriptors or memory for a moment: callers wait in the
                # backlog (or, past their greeting's deadline, use gRPC) meanwhile.
                log.warning("local lane: accept failed: %s", exc)
                time.sleep(0.05)
                continue
            with self._lock:
                served = not self._stopped and len(self._conns) < self.max_connections
                if served:
                    self._conns.add(conn)
            try:
                conn.sendall(frames.GREETING + (frames.SERVED if served else frames.FULL))
            except OSError:
                served = False
            if not served:
                self._forget(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="lane", daemon=True).start()

    def _forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        # One bound for waiting on the next request and for writing a reply: a client
        # that goes quiet, or never reads, frees this thread after IDLE_CLOSE seconds.
        conn.settimeout(IDLE_CLOSE)
        try:
            while True:
                try:
                    head = frames.read_request_head(conn)
                    if head is None:
                        return
                    length, first = head
                    method, timeout, metadata, at = frames.parse_request_head(first)
                    if not self._admitted(conn, method, metadata):
                        # Its caller may still be sending: drain the rest unheld, so it
                        # reads the refusal rather than a broken connection; then close.
                        frames.skip(conn, length - len(first))
                        return
                    body = frames.read_rest(conn, length, first)
                except (socket.timeout, ConnectionError):
                    return
                with self._lock:
                    self._busy += 1
                try:
                    answer = self._answer(method, timeout, metadata, memoryview(body)[at:])
                finally:
                    with self._idle:
                        self._busy -= 1
                        self._idle.notify_all()
                conn.sendall(answer)
        except ProtocolError as exc:
            log.warning("local lane: closing a connection that sent a bad frame: %s", exc)
        except OSError:
            pass  # the client went away
        finally:
            self._forget(conn)

    def _admitted(self, conn: socket.socket, method: str, metadata: tuple) -> bool:
        if self.admits is None:
            return True
        if self.admits(f"/{_SERVICE}/{method}", metadata):
            return True
        code = grpc.StatusCode.UNAUTHENTICATED.value[0]
        conn.sendall(b"".join(frames.error_frame(code, "wrong or missing claypot token", ())))
        return False

    def _answer(self, method: str, timeout: float | None, metadata: tuple, request: memoryview) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        context = _Context(metadata, deadline, self.address, outcome=False)
        try:
            handler = self.table.handler(_CallDetails(f"/{_SERVICE}/{method}", context.invocation_metadata()))
            if handler is None or handler.request_streaming or handler.response_streaming:
                return b"".join(frames.error_frame(grpc.StatusCode.UNIMPLEMENTED.value[0], "Method not found!", ()))
            reply = serve_unary(handler, request, context, method)
        finally:
            context._end()
        if reply is not None:
            return b"".join(frames.ok_frame(reply))
        return b"".join(frames.error_frame(context._code.value[0], context._details or "", context._trailing))
