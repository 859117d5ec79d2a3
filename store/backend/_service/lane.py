"""The backend's end of the local lane: unary RPCs from same-host clients without gRPC.

:class:`LaneServer` listens on the abstract Unix socket named after the
backend's advertised address (:func:`store._wire.lane.socket_name`). One
thread at a time, the *owner*, runs an event loop over every connection:
it waits in epoll, reads each ready connection's bytes (never blocking on
one), and once a whole request frame is in, runs the servicer's handler
behind the same interceptors as the gRPC server (the token check) with a
``grpc.ServicerContext`` carrying the call's metadata and deadline, so the
servicer cannot tell the paths apart. Streams, and every call when the
backend serves TLS, stay on gRPC.

Why one thread. Python runs one thread at a time per process; a thread per
connection only adds GIL hand-offs between them, each a futex wait and a
context switch (about 8 per changing call at 8 callers, measured with
``perf``), and those cost the backend more CPU than the calls. One owner
thread serves the same calls with almost none.

Group commit. On the owner, a changing call's log record is written but not
fsync'd (``storage.deferring``): the owner answers every request that is
ready, looks once more (without waiting) for requests that came in
meanwhile and answers those too, then makes them all durable with one fsync
(``settle``), then sends their replies. No reply, read-only ones included,
leaves before the state it saw is durable; if that fsync fails, every reply
of the batch is the storage's error instead. Replies are written without
blocking; the rest of one its client is slow to read goes out as it reads.

Calls that take long. A call may run for a long time or wait (a method
that sleeps, a nested call to another backend that calls back here). A
watchdog hands the loop to a new owner thread when the owner has been in
one call (or one batch's fsync) for ``HANDOFF_AFTER`` seconds; the old
owner finishes its call, makes its reply durable and sends it, then ends.
So a long call holds up the others for a few milliseconds at most, and
every long call in flight has a thread of its own.

Limits: at most ``max_connections`` connections at once (a client past it is
told the lane is full and uses gRPC); a connection idle for ``IDLE_CLOSE``
seconds is closed (clients stop reusing theirs sooner, see
:mod:`store._client.lane`); bytes that are not a valid frame close the
connection and touch nothing else; a request without the token is refused
on its first bytes, the rest of its frame read and dropped unheld, and its
connection closed.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import struct
import threading
import time
from typing import Any, Callable

import grpc

from store._client.transport import HandlerTable, _CallDetails, _Context, serve_unary
from store._wire import lane as frames
from store._wire.generated import claypot_pb2 as pb
from store.backend._service.boundary import error_reply
from store.backend._storage import storage as storage_mod
from store.errors import ProtocolError

log = logging.getLogger("claypot.lane")

IDLE_CLOSE = 120.0  # seconds a connection may wait for its next request
HANDOFF_AFTER = 0.005  # seconds in one call before the loop moves to a new owner thread
_SERVICE_DESC = pb.DESCRIPTOR.services_by_name["Backend"]
_SERVICE = _SERVICE_DESC.full_name
_TIMEVAL = struct.Struct("@ll")  # struct timeval
_READ = 256 * 1024  # bytes asked of one recv
_ARM = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
_ARM_WRITE = select.EPOLLOUT | select.EPOLLONESHOT  # the rest of a reply, as the client reads
_SWEEP_EVERY = 1.0  # seconds between two looks for idle connections


class _Conn:
    """One client connection and the frame it is reading."""

    __slots__ = ("sock", "fd", "buf", "length", "head", "drop", "last", "busy", "out")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.length = 0  # body length of the frame being read (0: its 4-byte head not in yet)
        self.head: tuple | None = None  # (method, timeout, metadata, at) once admitted
        self.drop = 0  # bytes of a refused frame still to read and drop before closing
        self.last = time.monotonic()  # last request or reply
        self.busy = False  # a request of it is being answered (its reply not sent yet)
        self.out: memoryview | None = None  # the rest of a reply its client is slow to read


class _Owner:
    """What the watchdog reads of one owner thread: since when it is in one call."""

    __slots__ = ("since",)

    def __init__(self) -> None:
        self.since = 0.0


class LaneServer:
    """Serves ``table``'s unary RPCs on the local lane of the backend advertised at ``address``.

    ``settle`` makes durable every change the handlers logged without an
    fsync on this server's threads (the backend's ``Storage.settle``); it
    runs before a batch of replies is sent.
    """

    def __init__(
        self,
        address: str,
        table: HandlerTable,
        max_connections: int,
        admits: Callable[[str, Any], bool] | None = None,
        settle: Callable[[], None] | None = None,
    ):
        self.address = address
        self.table = table
        self.max_connections = max_connections
        # (method path, metadata) -> whether the token check lets the call in; asked
        # before the request bytes are read, so a refused caller cannot make this
        # process hold them (the interceptors still run on every admitted call).
        self.admits = admits
        self.settle = settle
        self._listener: socket.socket | None = None
        self._epoll: Any = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self._stopped = False
        self._busy = 0  # calls being answered, replies not yet sent
        self._idle = threading.Condition(self._lock)
        self._ready: collections.deque[int] = collections.deque()  # fds epoll reported: bytes, or room for a reply
        self._outbox: list[tuple[_Conn, bytes, str]] = []  # answered, waiting for settle
        self._outbox_lock = threading.Lock()
        self._gen = 0  # which owner thread runs the loop
        self._owner = _Owner()
        self._active = threading.Event()  # the loop has work: the watchdog looks
        self._swept = time.monotonic()

    # -- life ---------------------------------------------------------------------------
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
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        threading.Thread(target=self._accept_loop, args=(sock,), name="lane-accept", daemon=True).start()
        threading.Thread(target=self._watchdog, name="lane-watchdog", daemon=True).start()
        self._new_owner()
        return True

    def stop(self, grace: float = 1.0) -> None:
        """Stop listening and end every connection once its call in flight (if any) is
        answered; wait up to ``grace`` seconds for those calls, as gRPC's stop does."""
        with self._lock:
            self._stopped = True
            conns = list(self._conns.values())
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self._listener.close()
        for conn in conns:
            if not conn.busy:
                self._forget(conn)
        self._poke()
        self._active.set()
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout=grace)

    def connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._conns)

    # -- connections ---------------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                if self._stopped:
                    return
                # Out of file descriptors or memory for a moment: callers wait in the
                # backlog (or, past their greeting's deadline, use gRPC) meanwhile.
                log.warning("local lane: accept failed: %s", exc)
                time.sleep(0.05)
                continue
            conn = _Conn(sock)
            with self._lock:
                served = not self._stopped and len(self._conns) < self.max_connections
                if served:
                    self._conns[conn.fd] = conn
            try:
                # A blocking socket: reads never wait (MSG_DONTWAIT, only once epoll says
                # there are bytes), and a reply's write is bounded by the kernel
                # (SO_SNDTIMEO), which costs no poll() per write as a Python timeout does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(int(IDLE_CLOSE), 0))
                sock.sendall(frames.GREETING + (frames.SERVED if served else frames.FULL))
            except OSError:
                served = False
            if not served:
                self._forget(conn)
                continue
            try:
                self._epoll.register(conn.fd, _ARM)
            except (OSError, ValueError):
                self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            mine = self._conns.get(conn.fd) is conn
            if mine:
                del self._conns[conn.fd]
        if mine:
            # Only the first forget unregisters: by a second one the fd may belong
            # to a new connection (it is unregistered before its close, so not before).
            try:
                self._epoll.unregister(conn.fd)
            except (OSError, ValueError, AttributeError):
                pass
        conn.sock.close()

    def _rearm(self, conn: _Conn) -> None:
        """Let epoll report ``conn`` again (one-shot: one owner reads it at a time)."""
        try:
            self._epoll.modify(conn.fd, _ARM)
        except (OSError, ValueError):
            self._forget(conn)

    def _poke(self) -> None:
        """Wake the owner from its epoll wait."""
        try:
            assert self._wake_w is not None
            self._wake_w.send(b"x", socket.MSG_DONTWAIT)
        except (OSError, AssertionError):
            pass

    # -- the loop ------------------------------------------------------------------------
    def _new_owner(self) -> None:
        me = _Owner()
        with self._lock:
            self._gen += 1
            gen = self._gen
            # Named the owner here, not when its thread first runs: a late start of an
            # older owner must not make the watchdog time a thread that has ended.
            self._owner = me
        threading.Thread(target=self._run, args=(gen, me), name="lane", daemon=True).start()

    def _run(self, gen: int, me: _Owner) -> None:
        storage_mod.deferring(True)
        try:
            while gen == self._gen:
                if self._ready:
                    try:
                        fd = self._ready.popleft()
                    except IndexError:  # an owner being replaced took it
                        continue
                    self._read(fd, me)
                    continue
                if self._outbox and self._collect(0):
                    # Requests that came in while these were answered join their fsync.
                    continue
                self._flush(me)
                if self._stopped and self._busy == 0:
                    return
                if gen != self._gen:
                    break
                self._wait_for_events()
        except BaseException:  # whatever ends this thread must not end the loop
            log.exception("local lane: the event loop failed; a new owner takes it")
            if gen == self._gen and not self._stopped:
                time.sleep(0.01)  # a fault that repeats must not spin up threads in a tight loop
                self._new_owner()
        finally:
            # Not the owner any more (a long call) or stopping: what this thread
            # answered goes out now, durable first.
            self._flush(me)
            storage_mod.deferring(False)
            if self._ready:
                self._poke()  # connections this thread took from epoll: the owner reads them now

    def _wait_for_events(self) -> None:
        now = time.monotonic()
        if now - self._swept >= _SWEEP_EVERY:
            self._swept = now
            self._close_idle(now)
        self._collect(_SWEEP_EVERY)

    def _collect(self, timeout: float) -> bool:
        """Queue the connections epoll reports readable within ``timeout`` seconds."""
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            return False
        wake = self._wake_r.fileno() if self._wake_r is not None else -1
        for fd, _ in events:
            if fd == wake:
                try:
                    while self._wake_r.recv(4096, socket.MSG_DONTWAIT):  # type: ignore[union-attr]
                        pass
                except OSError:
                    pass
            else:
                self._ready.append(fd)
        if events and not self._active.is_set():
            self._active.set()
        return bool(self._ready)

    def _close_idle(self, now: float) -> None:
        with self._lock:
            idle = [c for c in self._conns.values() if (not c.busy or c.out is not None) and now - c.last > IDLE_CLOSE]
        for conn in idle:
            if conn.out is not None:  # its client stopped reading its reply
                conn.out = None
                self._done(conn)
            self._forget(conn)

    def _read(self, fd: int, me: _Owner) -> None:
        """Read what ``fd`` has; answer its request once the whole frame is in."""
        conn = self._conns.get(fd)
        if conn is not None and conn.out is not None:
            self._write_more(conn)
            return
        if conn is None or conn.busy:
            # Gone, or answered on another thread right now: its rearm after the reply
            # reports any bytes it sent meanwhile.
            return
        try:
            data = conn.sock.recv(_READ, socket.MSG_DONTWAIT)
        except BlockingIOError:
            self._rearm(conn)
            return
        except OSError:
            self._forget(conn)
            return
        if not data:  # the client went away
            self._forget(conn)
            return
        try:
            request = self._take(conn, data)
        except ProtocolError as exc:
            log.warning("local lane: closing a connection that sent a bad frame: %s", exc)
            self._forget(conn)
            return
        except OSError:
            self._forget(conn)
            return
        if request is None:
            self._rearm(conn)  # the rest of the frame is still on its way
            return
        method, timeout, metadata, body = request
        with self._lock:
            self._busy += 1
        conn.busy = True
        self._enter(me)
        try:
            answer = self._answer(method, timeout, metadata, body)
        except BaseException:
            # Its reply will never come: close it so its caller learns now, not at its deadline.
            self._done(conn)
            self._forget(conn)
            raise
        finally:
            me.since = 0.0
        with self._outbox_lock:
            self._outbox.append((conn, answer, method))

    def _enter(self, me: _Owner) -> None:
        """The owner starts a call (or a flush) the watchdog must time."""
        me.since = time.monotonic()
        # After since is set: the watchdog clears the event, then looks at since
        # again, so at least one of the two sees the other (no lost wake-up that
        # would leave a long call holding the loop, and a nested call back into
        # this backend waiting for its deadline).
        if not self._active.is_set():
            self._active.set()

    def _take(self, conn: _Conn, data: bytes) -> tuple | None:
        """Add ``data`` to the frame ``conn`` is reading; the request once it is whole.

        The token is checked as soon as the first ``HEAD_LIMIT`` bytes are in,
        before the rest is held; a refused frame is read and dropped, then the
        connection closed, so its caller reads the refusal, not a broken pipe.
        """
        if conn.drop:
            conn.drop -= len(data)
            if conn.drop <= 0:
                raise OSError("refused frame dropped")
            return None
        buf = conn.buf
        buf += data
        if not conn.length:
            if len(buf) < 4:
                return None
            conn.length = frames.frame_length(bytes(buf[:4]))
        length = conn.length
        have = len(buf) - 4
        if have > length:
            # A client sends its next request only after the reply to this one.
            raise ProtocolError("lane frame: bytes past the end of a request")
        if conn.head is None:
            if have < min(length, frames.HEAD_LIMIT):
                return None
            method, timeout, metadata, at = frames.parse_request_head(
                memoryview(buf)[4 : 4 + min(length, frames.HEAD_LIMIT)]
            )
            if not self._admitted(conn, method, metadata):
                conn.buf = bytearray()
                conn.drop = length - have
                if conn.drop <= 0:
                    raise OSError("refused frame dropped")
                return None
            conn.head = (method, timeout, metadata, at)
        if have < length:
            return None
        method, timeout, metadata, at = conn.head
        conn.buf, conn.length, conn.head = bytearray(), 0, None
        return method, timeout, metadata, memoryview(buf)[4 + at :]

    def _admitted(self, conn: _Conn, method: str, metadata: tuple) -> bool:
        if self.admits is None:
            return True
        if self.admits(f"/{_SERVICE}/{method}", metadata):
            return True
        code = grpc.StatusCode.UNAUTHENTICATED.value[0]
        refusal = b"".join(frames.error_frame(code, "wrong or missing claypot token", ()))
        # Never waiting for room: the owner sends it, and a client that left its last
        # reply unread can keep its socket full for as long as the send timeout.
        try:
            sent = conn.sock.send(refusal, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(refusal):
            raise OSError("no room for the refusal: its client does not read its replies")
        return False

    def _answer(self, method: str, timeout: float | None, metadata: tuple, request: memoryview) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        context = _Context(metadata, deadline, self.address, outcome=False)
        try:
            handler = self.table.handler(_CallDetails(f"/{_SERVICE}/{method}", context.invocation_metadata()))
            if handler is None or handler.request_streaming or handler.response_streaming:
                return b"".join(frames.error_frame(grpc.StatusCode.UNIMPLEMENTED.value[0], "Method not found!", ()))
            try:
                reply = serve_unary(handler, request, context, method)
            except BaseException as exc:
                # serve_unary turns an Exception into its status; a method that raises
                # SystemExit (a BaseException) fails its own call, as any other error
                # does, instead of ending the thread that serves every connection.
                log.error("local lane: call %s raised %r", method, exc)
                code = grpc.StatusCode.UNKNOWN.value[0]
                return b"".join(frames.error_frame(code, f"Exception calling application: {exc!r}", ()))
        finally:
            context._end()
        if reply is not None:
            return b"".join(frames.ok_frame(reply))
        return b"".join(frames.error_frame(context._code.value[0], context._details or "", context._trailing))

    def _flush(self, me: _Owner) -> None:
        """Make what the answered calls changed durable (one fsync), then send their replies."""
        with self._outbox_lock:
            batch, self._outbox = self._outbox, []
        if not batch:
            return
        self._enter(me)
        failed: BaseException | None = None
        try:
            if self.settle is not None:
                self.settle()
        except Exception as exc:
            failed = exc
            log.error("local lane: making a batch of %d calls durable failed: %s", len(batch), exc)
        try:
            for conn, answer, method in batch:
                if failed is not None:
                    answer = _failure_frame(method, failed)
                try:
                    sent = conn.sock.send(answer, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._done(conn)
                    self._forget(conn)
                    continue
                if sent < len(answer):
                    # More than the socket holds (a large reply, or a client that stopped
                    # reading): the loop sends the rest as the client reads it (EPOLLOUT),
                    # so that neither the loop nor the other replies wait for it.
                    conn.last = time.monotonic()  # before out: the idle sweep reads out, then last
                    conn.out = memoryview(answer)[sent:]
                    self._arm_write(conn)
                    continue
                self._replied(conn)
        finally:
            me.since = 0.0

    def _arm_write(self, conn: _Conn) -> None:
        try:
            self._epoll.modify(conn.fd, _ARM_WRITE)
        except (OSError, ValueError):
            self._done(conn)
            self._forget(conn)

    def _write_more(self, conn: _Conn) -> None:
        """Send more of a reply its client is reading slowly (epoll said there is room)."""
        out = conn.out
        assert out is not None
        try:
            sent = conn.sock.send(out, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            conn.out = None
            self._done(conn)
            self._forget(conn)
            return
        if sent < len(out):
            if sent:
                conn.out = out[sent:]
                conn.last = time.monotonic()
            self._arm_write(conn)
            return
        conn.out = None
        self._replied(conn)

    def _replied(self, conn: _Conn) -> None:
        conn.last = time.monotonic()
        self._done(conn)
        if self._stopped:
            self._forget(conn)
        else:
            self._rearm(conn)

    def _done(self, conn: _Conn) -> None:
        conn.busy = False
        with self._idle:
            self._busy -= 1
            if self._stopped:  # stop() waits for the calls in flight (under this lock)
                self._idle.notify_all()

    # -- the watchdog --------------------------------------------------------------------
    def _watchdog(self) -> None:
        """Hand the loop to a new owner when the owner is stuck in one call; sleeps
        while the lane is idle."""
        while not self._stopped:
            self._active.wait()
            time.sleep(HANDOFF_AFTER)
            if self._stopped:
                return
            owner = self._owner
            since = owner.since
            if since and time.monotonic() - since >= HANDOFF_AFTER:
                owner.since = 0.0  # one hand-off per stuck call
                self._new_owner()
            elif not since and not self._ready:
                self._active.clear()  # the next epoll wake-up with events sets it again
                if self._owner.since or self._ready:  # began meanwhile (see _enter)
                    self._active.set()


def _failure_frame(method: str, exc: BaseException) -> bytes:
    """The reply a call gets when the fsync meant to make it durable failed."""
    desc = _SERVICE_DESC.methods_by_name.get(method)
    reply_cls = getattr(pb, desc.output_type.name, None) if desc is not None else None
    if reply_cls is not None and "error" in reply_cls.DESCRIPTOR.fields_by_name:
        return b"".join(frames.ok_frame(error_reply(reply_cls, exc, method).SerializeToString()))
    return b"".join(frames.error_frame(grpc.StatusCode.INTERNAL.value[0], str(exc), ()))
