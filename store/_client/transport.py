"""How a client reaches backends: the :class:`Transport` seam.

The client never opens a connection itself; it asks its transport for the
stubs of a backend address and calls them exactly as it would call gRPC's
generated stubs (``stub.Call(request, timeout=..., metadata=...)``), catching
``grpc.RpcError``. Two transports exist:

- :class:`GrpcTransport`, the default: one gRPC channel per address, with the
  channel options, TLS and reconnect policy of a real deployment.
- :class:`InProcessTransport`: backends served in this very process
  (:class:`store._ops.inproc.InProcessCluster`), reached with no socket. It keeps
  what the wire guarantees: every request and reply is serialized to bytes and
  parsed again on the other side (no object is shared between caller and
  backend), the server's interceptors run (the token check), deadlines end the
  wait with ``DEADLINE_EXCEEDED``, errors arrive as ``grpc.RpcError`` with the
  status the servicer set (so the client turns them into the same
  ``store.errors`` exceptions), and metadata travels both ways.

A backend served in process runs its calls on a thread pool of its own with
its dispatcher set for the call's context (:func:`store._model.objects.dispatching`),
so methods running there reach other objects as they would in a backend process.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, Awaitable, Callable, Iterable, Iterator, Protocol, runtime_checkable

import grpc

from store._wire import wire
from store._util.addresses import check_address
from store.config import Settings
from store._wire.generated import claypot_pb2 as pb
from store._wire.generated import claypot_pb2_grpc as pb_grpc

log = logging.getLogger("claypot.transport")

MAX_MESSAGE = 16 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 20000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 50),
]

_SERVICE = pb.DESCRIPTOR.services_by_name["Backend"]
_METHODS = {m.name: m for m in _SERVICE.methods}


@runtime_checkable
class Transport(Protocol):
    """What a :class:`store._client.client.Client` needs to talk to backends.

    ``stub(address)`` returns an object with one callable per RPC of the
    Backend service, called like gRPC's generated stub methods (``request``,
    ``timeout=``, ``metadata=``; unary ones also have ``.future(...)``) and
    raising ``grpc.RpcError`` on failure. ``streams(address)`` returns the
    chunk-framed streaming RPCs (:class:`store._wire.wire.StreamStub`'s shape).
    ``aio_stub(address)`` opens the asyncio twin of ``stub`` for the running
    event loop (raising ``grpc.aio.AioRpcError``) and returns it with a
    coroutine function that closes it; the caller keeps both (one per loop). ``drop(address)`` ends every call
    in flight to that address (the client gives up on a backend whose host is
    gone); ``close()`` releases everything.
    """

    def check_address(self, address: str, source: str = "address") -> str: ...

    def stub(self, address: str) -> Any: ...

    def streams(self, address: str) -> Any: ...

    def aio_stub(self, address: str) -> tuple[Any, Callable[[], Awaitable[None]]]: ...

    def drop(self, address: str) -> None: ...

    def close(self) -> None: ...


# -- gRPC --------------------------------------------------------------------------


class GrpcTransport:
    """Backends over gRPC channels: one channel per address, TLS when ``settings.tls_ca``.

    ``settings`` may be a callable returning the current settings (a client's,
    which callers may replace): each new channel reads them when it opens.
    """

    def __init__(self, settings: Settings | Callable[[], Settings]):
        self._settings = settings
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, Any, wire.StreamStub]] = {}
        self._lane: Any = None  # a store._client.lane.LaneClient once a channel may use it

    @property
    def settings(self) -> Settings:
        return self._settings() if callable(self._settings) else self._settings

    def check_address(self, address: str, source: str = "address") -> str:
        return check_address(address, source)

    def _open(self, address: str):
        hit = self._channels.get(address)
        if hit is not None:
            return hit
        with self._lock:
            hit = self._channels.get(address)
            if hit is None:
                if self.settings.tls_ca:
                    creds = grpc.ssl_channel_credentials(root_certificates=self.settings.read_pem("tls_ca"))
                    channel = grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
                else:
                    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                stub: Any = pb_grpc.BackendStub(channel)
                if self.settings.local_lane and not self.settings.tls_ca:
                    if self._lane is None:
                        from store._client.lane import LaneClient

                        self._lane = LaneClient()
                    stub = _LaneStub(stub, self._lane, address)
                    # The channel connects anyway, in the background: a call the lane
                    # cannot take finds it ready, and gRPC channels opened elsewhere in
                    # this process to the same address share its connection, as they
                    # did when every call went through it. Started by asking its state
                    # (try_to_connect), not by grpc.channel_ready_future, whose
                    # connectivity-watch thread made gRPC's fork handlers crash forked
                    # children (SIGSEGV) about 1 fork in 8 (tests/test_lane_hostile.py).
                    connect = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
                    if connect is not None:
                        connect(True)
                hit = (channel, stub, wire.StreamStub(channel))
                self._channels[address] = hit
            return hit

    def stub(self, address: str) -> Any:
        """The unary and streaming RPCs of the Backend service at ``address`` (the
        unary ones over the local lane when the backend is on this host)."""
        return self._open(address)[1]

    def streams(self, address: str) -> wire.StreamStub:
        return self._open(address)[2]

    def aio_stub(self, address: str) -> tuple[pb_grpc.BackendStub, Callable[[], Awaitable[None]]]:
        # grpc.aio channels belong to the loop that made them: one per caller.
        if self.settings.tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=self.settings.read_pem("tls_ca"))
            channel = grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return pb_grpc.BackendStub(channel), channel.close

    def drop(self, address: str) -> None:
        with self._lock:
            hit = self._channels.pop(address, None)
        if hit is not None:
            hit[0].close()
        if self._lane is not None:
            self._lane.drop(address)

    def close(self) -> None:
        with self._lock:
            hits = list(self._channels.values())
            self._channels.clear()
        for channel, _, _ in hits:
            channel.close()
        if self._lane is not None:
            self._lane.close()


class _LaneStub:
    """A Backend stub whose unary RPCs try the local lane before the gRPC channel."""

    def __init__(self, stub: pb_grpc.BackendStub, lane: Any, address: str):
        self._stub, self._lane, self._address = stub, lane, address

    def __getattr__(self, name: str):
        found = getattr(self._stub, name)
        method = _METHODS.get(name)
        if method is not None and not (method.client_streaming or method.server_streaming):
            found = _LaneMethod(found, self._lane, self._address, name, getattr(pb, method.output_type.name))
        self.__dict__[name] = found
        return found


class _LaneMethod:
    """One unary RPC: over the lane when it takes the call, else over gRPC."""

    __slots__ = ("_grpc", "_lane", "_address", "_name", "_reply")

    def __init__(self, grpc_method, lane, address: str, name: str, reply_type):
        self._grpc, self._lane, self._address, self._name, self._reply = grpc_method, lane, address, name, reply_type

    def __call__(self, request, timeout=None, metadata=None, **options):
        if not options:  # wait_for_ready, compression, credentials: gRPC's own
            data = self._lane.call(self._address, self._name, request.SerializeToString(), timeout, metadata)
            if data is not None:
                return self._reply.FromString(data)
        return self._grpc(request, timeout=timeout, metadata=metadata, **options)

    def __getattr__(self, name: str):  # .future, .with_call: gRPC's
        return getattr(self._grpc, name)


# -- in process ----------------------------------------------------------------------


class InProcessRpcError(grpc.RpcError, grpc.Call):
    """A failed in-process call, shaped like the error a gRPC stub raises."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing

    def initial_metadata(self) -> tuple:
        return ()

    def debug_error_string(self) -> str:
        return f"in-process: {self._code.name}: {self._details}"

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        return False


class _Aborted(Exception):
    """Raised inside a servicer by ``context.abort`` (gRPC raises its own)."""


_Metadatum = collections.namedtuple("_Metadatum", ("key", "value"))
_CallDetails = collections.namedtuple("_CallDetails", ("method", "invocation_metadata"))


class _Context(grpc.ServicerContext):
    """The servicer's view of one in-process call: metadata, deadline, status."""

    def __init__(self, metadata, deadline: float | None, address: str):
        self._metadata = tuple(_Metadatum(k, v) for k, v in (metadata or ()))
        self._deadline = deadline
        self._address = address
        self._code = grpc.StatusCode.OK
        self._details = ""
        self._trailing: tuple = ()
        self._cancelled = False
        self._done = False
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        # Settles with the serialized reply, or with the error the caller gets.
        self._outcome: concurrent.futures.Future = concurrent.futures.Future()

    # What servicers ask.
    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return "inproc:caller"

    def peer_identities(self):
        return None

    def peer_identity_key(self):
        return None

    def auth_context(self) -> dict:
        return {}

    def is_active(self) -> bool:
        return not (self._cancelled or self._done or self.time_remaining() == 0.0)

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        with self._lock:
            if self._done or self._cancelled:
                return False
            self._callbacks.append(callback)
            return True

    def cancel(self) -> None:
        self._end(cancelled=True)

    def set_code(self, code) -> None:
        self._code = code

    def set_details(self, details) -> None:
        self._details = details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def set_trailing_metadata(self, trailing_metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self):
        return self._trailing

    def send_initial_metadata(self, initial_metadata) -> None:
        pass

    def set_compression(self, compression) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass

    def abort(self, code, details):
        self._code, self._details = code, details
        raise _Aborted(details)

    def abort_with_status(self, status):
        self.set_trailing_metadata(status.trailing_metadata)
        self.abort(status.code, status.details)

    # What the transport does.
    def _end(self, cancelled: bool = False) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            self._cancelled = self._cancelled or cancelled
            callbacks, self._callbacks = self._callbacks, []
        if cancelled:
            _settle(self._outcome, error=self._error() or InProcessRpcError(grpc.StatusCode.CANCELLED, "Cancelled"))
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a callback's failure must not end the transport's thread
                log.exception("in-process call: a context callback failed")

    def _error(self) -> InProcessRpcError | None:
        if self._code == grpc.StatusCode.OK or self._code is None:
            return None
        return InProcessRpcError(self._code, self._details or "", self._trailing)


def _copy(data) -> bytes:
    """Bytes that share nothing with the sender's objects."""
    return data if isinstance(data, bytes) else bytes(data)


class HandlerTable:
    """A Backend servicer's RPC handlers behind its server interceptors, found by
    method path as a ``grpc.Server`` finds them (for servers that are not gRPC's:
    the in-process transport, the local lane)."""

    def __init__(self, servicer, interceptors: list):
        self.handlers: list = []
        wire.add_servicer(servicer, self)  # collects the handlers, as a grpc.Server would
        self.interceptors = list(interceptors)
        chain = self._lookup
        for interceptor in reversed(self.interceptors):
            chain = (lambda inner, icp: lambda d: icp.intercept_service(inner, d))(chain, interceptor)
        self._chain = chain

    # The one method of grpc.Server that wire.add_servicer needs.
    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        self.handlers.extend(handlers)

    def _lookup(self, details):
        for generic in self.handlers:
            found = generic.service(details)
            if found is not None:
                return found
        return None

    def handler(self, details: Any) -> Any:
        """The handler a call with these ``details`` (method, metadata) gets, or None."""
        return self._chain(details)


def serve_unary(handler: Any, request: bytes | memoryview, context: _Context, name: str) -> bytes | None:
    """Run a unary-unary ``handler`` on ``request`` bytes as a gRPC server would.

    Returns the serialized reply, or None with the context's code and details
    saying why (the servicer's abort, an exception, a request that does not parse).
    """
    deserialize = handler.request_deserializer
    try:
        arg = deserialize(request) if deserialize is not None else request
    except Exception:
        context._code, context._details = grpc.StatusCode.INTERNAL, "Exception deserializing request!"
        return None
    try:
        result = handler.unary_unary(arg, context)
    except _Aborted:
        return None
    except Exception as exc:
        if context._code == grpc.StatusCode.OK:
            log.exception("call %s failed", name)
            context._code = grpc.StatusCode.UNKNOWN
            context._details = f"Exception calling application: {exc}"
        return None
    if context._error() is not None:
        return None
    if result is None:
        context._code, context._details = grpc.StatusCode.INTERNAL, f"{name} returned nothing"
        return None
    serialize = handler.response_serializer
    return serialize(result) if serialize is not None else result


class _Served:
    """One backend served in process: its handlers behind its interceptors, its thread pool."""

    def __init__(self, address: str, servicer, interceptors: list, dispatcher, threads: int):
        self.address = address
        self.dispatcher = dispatcher
        self.table = HandlerTable(servicer, interceptors)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"inproc-{address}")
        self.closed = False

    def handler(self, details: _CallDetails):
        return self.table.handler(details)

    def run(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        from store._model import objects as objmod

        def serve():
            with objmod.dispatching(self.dispatcher):
                return fn()

        if self.closed:
            raise InProcessRpcError(
                grpc.StatusCode.UNAVAILABLE, f"failed to connect to all addresses; {self.address} is stopped"
            )
        try:
            return self.pool.submit(serve)
        except RuntimeError:  # the pool shut down between the check and the submit
            raise InProcessRpcError(
                grpc.StatusCode.UNAVAILABLE, f"failed to connect to all addresses; {self.address} is stopped"
            ) from None


class InProcessNetwork:
    """The backends served in this process, by address (what in-process transports reach)."""

    def __init__(self) -> None:
        self._served: dict[str, _Served] = {}
        self._lock = threading.Lock()

    def serve(self, address: str, servicer: Any, interceptors: list, dispatcher: Any, threads: int = 16) -> None:
        """Serve ``servicer`` at ``address``: its calls run behind ``interceptors``
        with ``dispatcher`` as the context's dispatcher (see store._model.objects.dispatching)."""
        with self._lock:
            if address in self._served:
                raise ValueError(f"{address} is served already")
            self._served[address] = _Served(address, servicer, interceptors, dispatcher, threads)

    def stop(self, address: str, grace: float = 1.0) -> None:
        """Stop serving ``address``: new calls fail as on a refused connection."""
        with self._lock:
            served = self._served.pop(address, None)
        if served is not None:
            served.closed = True
            served.pool.shutdown(wait=True, cancel_futures=True)

    def addresses(self) -> list[str]:
        return list(self._served)

    def find(self, address: str) -> _Served:
        served = self._served.get(address)
        if served is None or served.closed:
            raise InProcessRpcError(
                grpc.StatusCode.UNAVAILABLE,
                f"failed to connect to all addresses; nothing serves {address} in this process",
            )
        return served


class _Call:
    """One RPC of the Backend service at one address, called in process."""

    def __init__(
        self, transport: "InProcessTransport", address: str, name: str, request_serializer, response_deserializer
    ):
        self.transport, self.address, self.name = transport, address, name
        self.serialize = request_serializer
        self.deserialize = response_deserializer
        method = _METHODS[name]
        self.path = f"/{_SERVICE.full_name}/{name}"
        self.client_streaming = method.client_streaming
        self.server_streaming = method.server_streaming

    def _start(self, request, timeout, metadata, replies: queue.Queue | None = None):
        """Run the handler on the backend's pool; returns its context, whose
        ``_outcome`` settles with the serialized reply (or the call's error)."""
        self.transport._check_open()
        served = self.transport.network.find(self.address)
        deadline = None if timeout is None else time.monotonic() + timeout
        context = _Context(metadata, deadline, self.address)
        handler = served.handler(_CallDetails(self.path, context.invocation_metadata()))
        if handler is None:
            raise InProcessRpcError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        deserialize = handler.request_deserializer or (lambda b: b)
        if self.client_streaming:
            frames = (_copy(self.serialize(m)) for m in request)
            arg: Any = (deserialize(f) for f in frames)
            behaviour = handler.stream_stream if self.server_streaming else handler.stream_unary
        else:
            arg = deserialize(_copy(self.serialize(request)))
            behaviour = handler.unary_stream if self.server_streaming else handler.unary_unary
        serialize = handler.response_serializer or (lambda m: m)

        def run():
            reply = None
            try:
                result = behaviour(arg, context)
                if replies is None:
                    reply = _copy(serialize(result)) if result is not None else None
                else:
                    for message in result or ():
                        if not _offer(replies, _copy(serialize(message)), context):
                            break
            except _Aborted:
                pass
            except Exception as exc:
                if context._code == grpc.StatusCode.OK:
                    log.exception("in-process call %s failed", self.name)
                    context._code = grpc.StatusCode.UNKNOWN
                    context._details = f"Exception calling application: {exc}"
            error = context._error()
            if error is not None:
                _settle(context._outcome, error=error)
            elif reply is None and replies is None:
                _settle(
                    context._outcome, error=InProcessRpcError(grpc.StatusCode.INTERNAL, f"{self.name} returned nothing")
                )
            else:
                _settle(context._outcome, reply)
            if replies is not None:
                _offer(replies, _END, context)

        self.transport._track(self.address, context)
        try:
            served.run(run)
        except BaseException:
            self.transport._untrack(self.address, context)
            raise
        return context

    def _wait(self, context: _Context):
        try:
            return context._outcome.result(timeout=context.time_remaining())
        except concurrent.futures.TimeoutError:
            context._end(cancelled=True)
            raise InProcessRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except concurrent.futures.CancelledError:
            raise InProcessRpcError(grpc.StatusCode.UNAVAILABLE, "the backend stopped") from None
        finally:
            self.transport._untrack(self.address, context)

    def __call__(self, request, timeout=None, metadata=None, **_ignored):
        if self.server_streaming:
            replies: queue.Queue = queue.Queue(maxsize=4)
            context = self._start(request, timeout, metadata, replies)
            return self._receive(context, replies)
        context = self._start(request, timeout, metadata)
        try:
            data = self._wait(context)
        finally:
            context._end()
        return self.deserialize(data) if self.deserialize is not None else data

    def future(self, request, timeout=None, metadata=None, **_ignored) -> concurrent.futures.Future:
        """The call, answered on a thread (like a gRPC stub's ``.future``)."""
        out: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                out.set_result(self(request, timeout=timeout, metadata=metadata))
            except BaseException as exc:
                out.set_exception(exc)

        threading.Thread(target=run, name=f"inproc-future-{self.name}", daemon=True).start()
        return out

    def _receive(self, context: _Context, replies: queue.Queue) -> Iterator:
        """The replies of a server-streaming call, as they come, then its status."""
        try:
            while True:
                remaining = context.time_remaining()
                try:
                    item = replies.get(timeout=0.25 if remaining is None else min(remaining, 0.25))
                except queue.Empty:
                    if context._done and context._outcome.done():
                        self._wait(context)  # ended from outside (a dropped connection)
                        return
                    if remaining is not None and remaining <= 0.25:
                        context._end(cancelled=True)
                        raise InProcessRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
                    continue
                if item is _END:
                    self._wait(context)  # raises the call's error, if it failed
                    return
                yield self.deserialize(item) if self.deserialize is not None else item
        finally:
            self.transport._untrack(self.address, context)
            context._end(cancelled=not context._outcome.done())


_END = object()


def _offer(replies: queue.Queue, item, context: _Context) -> bool:
    """Put ``item`` for the receiver; False once the call ended (nobody will take it)."""
    while True:
        try:
            replies.put(item, timeout=0.1)
            return True
        except queue.Full:
            if context._done:
                return False


def _settle(outcome: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            outcome.set_exception(error)
        else:
            outcome.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass  # ended first (deadline, cancel, a dropped connection)


class _Stub:
    """Every RPC of the Backend service at one address, as attributes."""

    def __init__(self, transport: "InProcessTransport", address: str, raw_streams: bool):
        self._transport, self._address, self._raw = transport, address, raw_streams

    def __getattr__(self, name: str) -> _Call:
        method = _METHODS.get(name)
        if method is None:
            raise AttributeError(name)
        request_type = getattr(pb, method.input_type.name)
        reply_type = getattr(pb, method.output_type.name)
        if self._raw and method.client_streaming:
            serialize = wire._serialize_chunk
        else:
            serialize = request_type.SerializeToString
        deserialize = None if (self._raw and method.server_streaming) else reply_type.FromString
        call = _Call(self._transport, self._address, name, serialize, deserialize)
        self.__dict__[name] = call
        return call


class _AioStub:
    """The asyncio twin of an in-process stub: each call awaits a worker thread."""

    def __init__(self, stub: _Stub):
        self._stub = stub

    def __getattr__(self, name: str):
        call = getattr(self._stub, name)

        async def invoke(request, timeout=None, metadata=None, **_ignored):
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(None, lambda: call(request, timeout=timeout, metadata=metadata))
            except InProcessRpcError as err:
                raise grpc.aio.AioRpcError(
                    err.code(), grpc.aio.Metadata(), grpc.aio.Metadata(*err.trailing_metadata()), err.details()
                ) from None

        return invoke


class InProcessTransport:
    """Backends served in this process (an :class:`InProcessNetwork`), reached without sockets.

    One per client, like a client's channels; closing it ends nothing on the
    backends. See the module docstring for what it keeps of the wire.
    """

    def __init__(self, network: InProcessNetwork):
        self.network = network
        self._closed = False
        self._stubs: dict[str, _Stub] = {}
        self._streams: dict[str, _Stub] = {}
        self._inflight: dict[str, set] = {}
        self._lock = threading.Lock()

    def check_address(self, address: str, source: str = "address") -> str:
        from store.errors import ConfigurationError

        text = (address or "").strip()
        if not text:
            raise ConfigurationError(f"{source}: empty address")
        return text

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("Cannot invoke RPC on closed channel!")

    def stub(self, address: str) -> _Stub:
        hit = self._stubs.get(address)
        if hit is None:
            hit = self._stubs[address] = _Stub(self, address, raw_streams=False)
        return hit

    def streams(self, address: str) -> _Stub:
        hit = self._streams.get(address)
        if hit is None:
            hit = self._streams[address] = _Stub(self, address, raw_streams=True)
        return hit

    def aio_stub(self, address: str) -> tuple[_AioStub, Callable[[], Awaitable[None]]]:
        async def close() -> None:
            return None

        return _AioStub(self.stub(address)), close

    def _track(self, address: str, context: _Context) -> None:
        with self._lock:
            self._inflight.setdefault(address, set()).add(context)

    def _untrack(self, address: str, context: _Context) -> None:
        with self._lock:
            self._inflight.get(address, set()).discard(context)

    def drop(self, address: str) -> None:
        """End the calls in flight to ``address`` (they fail as on a broken connection)."""
        with self._lock:
            contexts = list(self._inflight.pop(address, ()))
        for context in contexts:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("the connection was closed")
            context._end(cancelled=True)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            addresses = list(self._inflight)
        for address in addresses:
            self.drop(address)


def for_settings(settings: Settings | Callable[[], Settings], transport: Transport | None = None) -> Transport:
    """``transport`` if given, else gRPC channels configured by ``settings`` (or what it returns)."""
    return transport if transport is not None else GrpcTransport(settings)


__all__ = [
    "Transport",
    "GrpcTransport",
    "InProcessTransport",
    "InProcessNetwork",
    "InProcessRpcError",
    "CHANNEL_OPTIONS",
    "for_settings",
]
