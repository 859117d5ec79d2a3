"""The client's end of the local lane: unary RPCs to a same-host backend without gRPC.

:class:`LaneClient` is used by :class:`store._client.transport.GrpcTransport`:
its stubs try the lane first for the unary Backend RPCs and fall back to the
gRPC channel when the lane cannot take the call before anything is sent (no
backend of that address on this host's network namespace, its lane full or
held by another user, the request larger than a frame). Streams, the asyncio API and TLS always use gRPC.
See :mod:`store._wire.lane` for the frames and why the lane exists.

Each thread keeps one connection per backend address and uses it for one call
at a time (blocking send, blocking receive): no thread hand-off on either side.
A call the thread makes while its own call waits on that connection (from a
signal handler) goes over gRPC, so it never reads the other call's reply.
Failures keep gRPC's meaning, so the client's retry rules stay right:

- a request that could not be sent whole raises ``UNAVAILABLE`` with details
  starting "failed to connect" (the call did not run: safe to retry);
- a connection that breaks after the request was sent raises ``UNAVAILABLE``
  (the call may have run);
- no reply within the deadline raises ``DEADLINE_EXCEEDED`` and the connection
  is closed (a late reply must never be read as the next call's);
- an error status from the backend arrives with its code, details and
  trailing metadata, like a gRPC stub's ``RpcError``.

A connection idle for longer than ``IDLE_REUSE`` seconds is replaced rather
than reused, so the backend's own idle close (``store.backend._service.lane``,
a longer time) never races a request. A forked child never uses its parent's
connections.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
import weakref
from typing import Any, Iterable

import grpc

from store._wire import lane as frames
from store._client.transport import InProcessRpcError
from store.errors import ProtocolError

log = logging.getLogger("claypot.lane")

IDLE_REUSE = 20.0  # seconds; the backend closes idle connections after lane.IDLE_CLOSE
RETRY_ABSENT = 2.0  # seconds before an address with no lane is tried again
_CONNECT_TIMEOUT = 1.0
_JOIN_LIMIT = 256 * 1024  # frames up to this are joined and sent in one write

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_generation = 0  # bumped in a forked child: connections of an older generation are the parent's


def _after_fork() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_after_fork)


class LaneError(InProcessRpcError):
    """A lane call that failed, shaped like the ``grpc.RpcError`` a stub raises."""

    def debug_error_string(self) -> str:
        return f"local lane: {self.code().name}: {self.details()}"


class _Connection:
    __slots__ = ("sock", "poll", "used", "busy", "__weakref__")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        # Closed when this connection is dropped, also when the thread that owned it
        # ends: a finalizer, not __del__, so that a reference cycle the connection
        # sits in (a traceback's frames) cannot let the socket be collected first.
        weakref.finalize(self, sock.close)
        self.poll = select.poll()
        self.poll.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        self.used = time.monotonic()
        # True while a call waits on it: a call the same thread makes meanwhile
        # (from a signal handler) must not take it, or it would read that reply.
        self.busy = False

    def reusable(self, now: float) -> bool:
        # The backend sends nothing between calls: anything readable is its close.
        return now - self.used < IDLE_REUSE and not self.poll.poll(0)


class LaneClient:
    """Same-host unary calls over the local lane, one connection per thread and address."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._generation = _generation
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: dict[str, weakref.WeakSet] = {}  # address -> its connections' sockets
        self._absent: dict[str, float] = {}  # address -> when to try its lane again
        self._closed = False

    def _connections(self) -> dict:
        if self._generation != _generation:
            self._reset()  # a forked child: the parent's sockets are not ours to use
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def call(
        self,
        address: str,
        method: str,
        request: bytes,
        timeout: float | None,
        metadata: Iterable[tuple[str, Any]] | None,
    ) -> memoryview | None:
        """The reply bytes of ``method`` at ``address``, or None if the lane cannot
        take the call (nothing was sent: use gRPC). Raises :class:`LaneError`."""
        if self._closed:
            return None
        if timeout is not None and timeout <= 0:
            # As gRPC: a deadline already past ends the call before anything is sent.
            raise LaneError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        conns = self._connections()
        conn = conns.get(address)
        if conn is not None and conn.busy:
            return None  # this thread's own call in flight holds it: gRPC takes this one
        now = time.monotonic()
        if conn is not None and not conn.reusable(now):
            self._close(address, conn)
            conns.pop(address, None)
            conn = None
        if conn is None:
            conn = self._connect(address, now, timeout)
            if conn is None:
                return None
            conns[address] = conn
        try:
            parts = frames.request_frame(method, timeout, metadata, request)
        except ProtocolError:
            return None  # larger than a frame: gRPC gives its own size error
        return self._exchange(address, conn, parts, timeout)

    def _connect(self, address: str, now: float, timeout: float | None) -> _Connection | None:
        if self._absent.get(address, 0.0) > now:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_CONNECT_TIMEOUT if timeout is None else min(_CONNECT_TIMEOUT, max(timeout, 0.001)))
            sock.connect(frames.socket_name(address))
            # Not even the greeting is read from a process of another user (a squatter
            # on the name must never get this client's token).
            greeting = (
                frames.recv_exact(sock, len(frames.GREETING) + 1, allow_eof=True) if _trusted(sock, address) else None
            )
        except OSError:
            greeting = None
        except BaseException:  # an interrupt: the socket is nobody's yet
            sock.close()
            raise
        if greeting is None or greeting[:-1] != frames.GREETING or greeting[-1:] != frames.SERVED:
            sock.close()
            # No lane here, or it is full: gRPC for a while, then look again.
            self._absent[address] = now + RETRY_ABSENT
            return None
        with self._lock:
            self._open.setdefault(address, weakref.WeakSet()).add(sock)
        return _Connection(sock)

    def _exchange(self, address: str, conn: _Connection, parts: list, timeout: float | None) -> memoryview:
        conn.busy = True
        try:
            return self._send_and_receive(address, conn, parts, timeout)
        finally:
            conn.busy = False

    def _send_and_receive(self, address: str, conn: _Connection, parts: list, timeout: float | None) -> memoryview:
        sock = conn.sock
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            sock.settimeout(timeout)
            if sum(len(p) for p in parts) <= _JOIN_LIMIT:
                sock.sendall(b"".join(parts))
            else:
                for part in parts:
                    sock.sendall(part)
        except socket.timeout:
            self._drop_own(address, conn)
            raise LaneError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except OSError as exc:
            # Not sent whole: the backend cannot have run it.
            self._drop_own(address, conn)
            raise LaneError(
                grpc.StatusCode.UNAVAILABLE, f"failed to connect to the backend's local lane (request not sent: {exc})"
            ) from None
        except BaseException:
            self._drop_own(address, conn)  # part of a frame may be out: the connection is spoilt
            raise
        try:
            if deadline is not None:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
            body = frames.read_reply(sock)
            if body is None:
                raise ConnectionError("the backend closed the connection")
            code, reply, details, trailing = frames.parse_reply(body)
        except socket.timeout:
            self._drop_own(address, conn)
            raise LaneError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except ProtocolError as exc:
            self._drop_own(address, conn)
            raise LaneError(grpc.StatusCode.INTERNAL, str(exc)) from None
        except OSError as exc:
            self._drop_own(address, conn)
            raise LaneError(
                grpc.StatusCode.UNAVAILABLE, f"local lane: the connection broke during the call ({exc})"
            ) from None
        except BaseException:
            # A KeyboardInterrupt mid-call: its reply would come later on this
            # connection, where the next call (the Cancel that follows) would read it.
            self._drop_own(address, conn)
            raise
        conn.used = time.monotonic()
        if code == frames.OK:
            assert reply is not None
            return reply
        raise LaneError(_CODES.get(code, grpc.StatusCode.UNKNOWN), details, trailing)

    def _drop_own(self, address: str, conn: _Connection) -> None:
        conns = self._connections()
        if conns.get(address) is conn:
            del conns[address]
        self._close(address, conn)

    def _close(self, address: str, conn: _Connection) -> None:
        with self._lock:
            group = self._open.get(address)
            if group is not None:
                group.discard(conn.sock)
        conn.sock.close()

    def drop(self, address: str, close: bool = False) -> None:
        """End the lane calls in flight to ``address`` (they fail as on a broken connection)."""
        if self._generation != _generation:
            self._reset()
            return
        with self._lock:
            socks = list(self._open.pop(address, ()))
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
            except OSError:
                pass
            if close:
                sock.close()  # else its thread closes it when it next looks

    def close(self) -> None:
        """End every lane connection; later calls go to gRPC (whose closed channel refuses them)."""
        self._closed = True
        with self._lock:
            addresses = list(self._open)
        for address in addresses:
            self.drop(address, close=True)


def _trusted(sock: socket.socket, address: str) -> bool:
    """Whether the process listening on this lane may be sent this process's token
    (:func:`store._wire.lane.trusted_peer`: root, or this process's own user)."""
    if frames.trusted_peer(sock):
        return True
    log.warning("the local lane of %s is held by another user: its calls use gRPC", address)
    return False
