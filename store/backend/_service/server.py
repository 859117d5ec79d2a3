"""The backend process: a gRPC server over the heap.

The servicer is thin: each RPC decodes its request, calls the heap (or the
directory), and encodes the answer. Errors travel inside replies (an
``Error`` message), so a user exception keeps its type; gRPC status codes
are left for transport problems and the token check. The cross-language
RPCs, health checking and reflection live in :mod:`store.backend._service.polyglot`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc

from store import logs, metrics, tracing
from store._model import objects as objmod
from store._client import shm
from store._wire import wire
from store._client.client import CHANNEL_OPTIONS, TOKEN_HEADER, Client, set_chain
from store.config import Settings, parse_memory_limit
from store._directory.directory import Directory, split_aliases
from store.errors import (
    ClaypotError,
    ConfigurationError,
    ObjectNotFound,
    ProtocolError,
    SerializationError,
    ValueTooLarge,
)
from store._wire.generated import claypot_pb2 as pb
from store._wire.generated import claypot_pb2_grpc as pb_grpc
from store._util.ids import fresh_id
from store._util.security import is_loopback_host, token_matches
from store._wire.serialization import dumps, loads
from store.backend._engine import cancel
from store.backend._service.boundary import error_reply, replies, replies_json
from store.backend._service.guards import StreamIdleGuard, check_name
from store.backend._service.lane import LaneServer
from store._client.transport import HandlerTable
from store.backend._engine.heap import CodeCache, Heap
from store.backend._storage.segments import Segments
from store.backend._service.polyglot import OPEN_METHODS, PolyglotServicer, StandardServices
from store.backend._engine.replicas import Replicator
from store.backend._storage.storage import Storage

log = logging.getLogger("claypot.backend")

_OPEN_METHODS = {"/claypot.v1.Backend/Ping"} | OPEN_METHODS
_KIND_NAMES = {v: k.lower() for k, v in pb.CallKind.items()}  # metric labels


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call but Ping whose metadata lacks the cluster token.

    It runs before the request is deserialized, so no byte of an
    unauthenticated call is ever unpickled.
    """

    def __init__(self, token: str):
        self._token = token

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing claypot token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_unary_rpc_method_handler(deny)
        self._deny_unary_stream = grpc.unary_stream_rpc_method_handler(deny)
        self._deny_stream_stream = grpc.stream_stream_rpc_method_handler(deny)

    def admits(self, method: str, metadata: Any) -> bool:
        """Whether a call of ``method`` (its full path) with ``metadata`` may run."""
        return not self._token or method in _OPEN_METHODS or carries_token(metadata, self._token)

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        if self.admits(details.method, details.invocation_metadata):
            return continuation(details)
        # The refusal must have the method's shape (unary or streaming on each
        # side); looking the handler up deserializes nothing.
        handler = continuation(details)
        if handler is None:
            return self._deny_unary
        if handler.request_streaming and handler.response_streaming:
            return self._deny_stream_stream
        if handler.request_streaming:
            return self._deny_stream
        if handler.response_streaming:
            return self._deny_unary_stream
        return self._deny_unary


def carries_token(metadata: Iterable[tuple[str, Any]] | None, token: str) -> bool:
    """True if the call's metadata holds ``token`` (compared in constant time)."""
    for key, value in metadata or ():
        if key == TOKEN_HEADER and token_matches(token, value):
            return True
    return False


def _check_items(items) -> None:
    """Identifiers of objects to persist: checked before anything is stored."""
    for oid, key, _, _, alias in items:
        check_name("object id", oid)
        check_name("class key", key)
        # A moved or republished object carries all its aliases, joined by "|".
        for one in alias.split("|") if alias else [""]:
            check_name("alias", one, allow_empty=not alias)


def _served_span(request: pb.CallRequest, context, streamed: bool = False):
    """The span of a call or task served here (a no-op unless tracing is on)."""
    kind = _KIND_NAMES.get(request.kind, "call")
    return tracing.server_span(
        f"{kind} {request.name}",
        context,
        object_id=request.object_id,
        call_id=request.call_id,
        streamed=streamed or None,
    )


class PendingResults:
    """Large results waiting to be fetched as a stream (kept at most ``ttl`` seconds)."""

    def __init__(self, ttl: float = 120.0):
        self._items: dict[str, tuple[float, bytes, list]] = {}
        self._lock = threading.Lock()
        self.ttl = ttl

    def put(self, payload: bytes, buffers: list) -> str:
        handle = uuid.uuid4().hex
        now = time.monotonic()
        with self._lock:
            for key in [k for k, v in self._items.items() if now - v[0] > self.ttl]:
                del self._items[key]
            self._items[handle] = (now, payload, buffers)
        return handle

    def sweep(self) -> int:
        """Drop results older than the TTL; returns how many."""
        now = time.monotonic()
        with self._lock:
            expired = [k for k, v in self._items.items() if now - v[0] > self.ttl]
            for key in expired:
                del self._items[key]
        return len(expired)

    def take(self, handle: str) -> tuple[bytes, list]:
        with self._lock:
            item = self._items.pop(handle, None)
        if item is None:
            raise ObjectNotFound("unknown or expired result handle")
        return item[1], item[2]


_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def advertised_address(host: str, port: int) -> str:
    """The address to register for a backend listening on ``host:port``.

    A wildcard host is no address to call: use the address this machine (or
    container) reaches others from, i.e. the source address of its route to
    the outside (a UDP connect picks it and sends nothing), else what its
    hostname resolves to.
    """
    if host not in _WILDCARDS:
        return f"{host}:{port}"
    ip = ""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never actually sent to
            ip = s.getsockname()[0]
    except OSError:
        pass
    if not ip or ip == "0.0.0.0":
        try:
            ip = socket.gethostbyname(socket.gethostname())
        except OSError:
            ip = "127.0.0.1"
    return f"{ip}:{port}"


class BackendServicer(PolyglotServicer, pb_grpc.BackendServicer):
    """Thin gRPC layer over a Backend."""

    def __init__(self, backend: "Backend"):
        self.b = backend
        self.heap = backend.heap
        self.directory = backend.directory
        self.settings = backend.settings
        self.pending = PendingResults(self.settings.result_ttl)
        self.outbox = shm.Outbox(self.settings.result_ttl)
        self._alias_lock = threading.Lock()  # see AddAlias

    # -- identity and directory ---------------------------------------------------
    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        # Anyone may ask whether the backend serves; only token holders learn
        # which backend it is, on which host, with which PID.
        token = self.settings.token
        if token and not carries_token(context.invocation_metadata(), token):
            return pb.PingReply(status="serving")
        return pb.PingReply(
            backend_id=self.b.backend_id,
            address=self.b.address,
            host=self.b.host,
            pid=os.getpid(),
            status="serving",
            host_id=self.b.host_id,
        )

    @replies(pb.ResolveReply)
    def Resolve(self, request: pb.ResolveRequest, context: grpc.ServicerContext) -> pb.ResolveReply:
        if request.WhichOneof("key") == "alias":
            oid, entry = self.directory.lookup_alias(check_name("alias", request.alias))
        else:
            oid = check_name("object id", request.object_id)
            entry = self.directory.lookup(oid)
        rset = self.directory.replica_set(oid)
        return pb.ResolveReply(
            ref=pb.ObjectRef(
                object_id=oid,
                class_key=entry.class_key,
                backend_id=entry.backend_id,
                aliases=entry.aliases,
                replicas=rset.replicas if rset else (),
                epoch=rset.epoch if rset else 0,
            )
        )

    def ListBackends(self, request: pb.ListBackendsRequest, context: grpc.ServicerContext) -> pb.ListBackendsReply:
        infos = []
        for b in self.directory.backends():
            infos.append(
                pb.BackendInfo(
                    backend_id=b["backend_id"],
                    address=b.get("address", ""),
                    host=b.get("host", ""),
                    pid=b.get("pid", 0),
                    up=b["up"],
                    objects=b.get("objects", 0),
                    memory_bytes=b.get("memory_bytes", 0),
                    resident_objects=b.get("resident_objects", 0),
                    running_tasks=b.get("running_tasks", 0),
                    host_id=b.get("host_id", ""),
                    stopped=bool(b.get("stopped")) and not b["up"],
                    metrics_address=b.get("metrics_address", ""),
                    resources_json=json.dumps(b.get("resources") or {}, sort_keys=True),
                )
            )
        return pb.ListBackendsReply(backends=infos)

    @replies(pb.Status)
    def RegisterCode(self, request: pb.RegisterCodeRequest, context: grpc.ServicerContext) -> pb.Status:
        self.directory.put_code(check_name("code key", request.key), request.code)
        return pb.Status()

    @replies(pb.GetCodeReply)
    def GetCode(self, request: pb.GetCodeRequest, context: grpc.ServicerContext) -> pb.GetCodeReply:
        code = self.directory.get_code(check_name("code key", request.key))
        if code is None:
            raise ObjectNotFound(f"no code {request.key}")
        return pb.GetCodeReply(code=code)

    @replies(pb.Status)
    def SetAlias(self, request: pb.AliasRequest, context: grpc.ServicerContext) -> pb.Status:
        self.directory.set_alias(check_name("alias", request.alias), check_name("object id", request.object_id))
        if self.heap.has(request.object_id):
            self.heap.set_alias(request.object_id, request.alias)
        return pb.Status()

    @replies(pb.Status)
    def DeleteAlias(self, request: pb.AliasRequest, context: grpc.ServicerContext) -> pb.Status:
        with self._alias_lock:
            oid, kept = self.directory.remove_alias(check_name("alias", request.alias))
            if self.heap.has(oid):
                self.heap.set_alias(oid, kept)
        return pb.Status()

    @replies(pb.Status)
    def AddAlias(self, request: pb.AliasRequest, context: grpc.ServicerContext) -> pb.Status:
        # The directory change and the stored alias field change together under
        # one lock, so two alias changes to one object cannot store their lists
        # in the opposite order from the directory's.
        oid = check_name("object id", request.object_id)
        with self._alias_lock:
            joined = self.directory.add_alias(check_name("alias", request.alias), oid)
            if self.heap.has(oid):
                self.heap.set_alias(oid, joined)
        return pb.Status()

    # -- objects --------------------------------------------------------------------
    @replies(pb.Status)
    def Persist(self, request: pb.PersistRequest, context: grpc.ServicerContext) -> pb.Status:
        started = time.perf_counter()
        kept: list[tuple[str, list[str]]] = []
        ok = False
        try:
            items = []
            for o in request.objects:
                # Kept even with reader leases off: the sender of a store.empty array
                # maps it still, and must not see the object change (see .segments).
                if o.state.shm and shm.buffer_address(b"x") is not None:
                    buffers, names = self._kept_buffers(o.state)
                    kept.append((o.object_id, names))
                else:
                    buffers = self._buffers(o.state)
                items.append((o.object_id, o.class_key, o.state.payload, buffers, o.alias))
            _check_items(items)

            def persist() -> None:
                self.heap.persist(items, adopt=request.adopt)
                for oid, names in kept:
                    self.b.segments.bind(oid, names)

            self._persist_new(items, request.replicas, persist)
            ok = True
            return pb.Status()
        finally:
            if not ok:  # the segments taken over go back: nothing holds them now
                self.b.segments.abandon([n for _, names in kept for n in names])
            metrics.call_done("persist", ok, time.perf_counter() - started)

    def _kept_buffers(self, value: pb.Value) -> tuple[list, list[str]]:
        """A persisted value's segments, taken over and mapped private (see .segments)."""
        sizes = list(value.buffer_sizes)
        limit = self.b.max_value_size
        if limit and sum(sizes) > limit:
            shm.discard(list(value.shm))
            raise ValueTooLarge(f"value of {sum(sizes)} bytes exceeds the limit of {limit} bytes (max_value_size)")
        metrics.shm_done("in", sum(sizes))
        return self.b.segments.keep(list(value.shm), sizes, list(value.leases))

    def PersistStream(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.Status:
        with tracing.server_span("stream persist", context):
            return self._persist_stream(request_iterator, context)

    @replies(pb.Status)
    def _persist_stream(self, request_iterator, context):
        started = time.perf_counter()
        ok = False
        try:
            header, values = wire.receive_stream(request_iterator, pb.PersistRequest, self.b.max_value_size)
            if metrics.enabled():
                metrics.stream_done("in", sum(wire.total_size(p, b) for p, b in values))
            streamed = iter(values)
            items = []
            for o in header.objects:
                if o.state.payload:
                    payload, buffers = o.state.payload, wire.writable(o.state.buffers)
                else:
                    payload, buffers = next(streamed)
                items.append((o.object_id, o.class_key, payload, buffers, o.alias))
            _check_items(items)
            self._persist_new(items, header.replicas, lambda: self.heap.persist(items, adopt=header.adopt))
            ok = True
            return pb.Status()
        finally:
            metrics.call_done("persist", ok, time.perf_counter() - started)

    def _persist_new(self, items: list, factor: int, persist) -> None:
        """Persist new objects; with a factor, their replicas take the state before the
        objects are published (nothing is acknowledged by the primary alone)."""
        if factor <= 0:
            persist()
            return
        self.b.replicator.create(items, factor, persist)

    @replies(pb.AddReplicaResponse)
    def AddReplica(self, request: pb.AddReplicaRequest, context: grpc.ServicerContext) -> pb.AddReplicaResponse:
        oid = check_name("object id", request.object_id)
        self.heap.admit(oid)
        # Readers stop reusing views: a replica taking over would change the object
        # without this backend's change words knowing (before, and after for reads
        # that began meanwhile).
        self.b.segments.retire(oid)
        where = self.b.replicator.add(oid, request.backend_id)
        self.b.segments.retire(oid)
        return pb.AddReplicaResponse(backend_id=where)

    @replies(pb.ReplicateResponse)
    def Replicate(self, request: pb.ReplicateRequest, context: grpc.ServicerContext) -> pb.ReplicateResponse:
        check_name("object id", request.object_id)
        return self.b.replicator.apply(request)

    @replies(pb.CallReply)
    def Call(self, request: pb.CallRequest, context: grpc.ServicerContext) -> pb.CallReply:
        buffers = self._buffers(request.args)
        if not tracing.enabled():
            return self._call(request, request.args.payload, buffers)
        with _served_span(request, context):
            return self._call(request, request.args.payload, buffers)

    def _buffers(self, value: pb.Value) -> list:
        """A Value's out-of-band buffers: inline, or mapped from /dev/shm (same host)."""
        if not value.shm:
            return wire.writable(value.buffers)
        sizes = list(value.buffer_sizes)
        limit = self.b.max_value_size
        if limit and sum(sizes) > limit:
            shm.discard(list(value.shm))
            raise ValueTooLarge(f"value of {sum(sizes)} bytes exceeds the limit of {limit} bytes (max_value_size)")
        metrics.shm_done("in", sum(sizes))
        return shm.attach(list(value.shm), sizes)

    @replies(pb.CallReply)
    def CallStream(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.CallReply:
        header, values = wire.receive_stream(request_iterator, pb.CallRequest, self.b.max_value_size)
        payload, buffers = values[0] if values else (header.args.payload, [])
        metrics.stream_done("in", wire.total_size(payload, buffers))
        with _served_span(header, context, streamed=True):
            return self._call(header, payload, buffers)

    def _call(self, request: pb.CallRequest, payload, buffers) -> pb.CallReply:
        # A caller that names no chain gets one of its own: an empty id shared by
        # every such caller would let their calls into one object at once.
        chain = request.chain_id or "anon:" + fresh_id()
        set_chain(chain)
        started = time.perf_counter()
        ok = False
        if logs.json_on:
            logs.set_call(request.object_id, request.call_id)
        cancel.set_current(request.call_id or None)
        try:
            check_name("object id", request.object_id, allow_empty=request.kind == pb.TASK)
            check_name("name", request.name)
            version = (0, 0)
            if request.kind == pb.TASK:
                result = self.b.run_task(request, payload, buffers, chain)
            elif (
                request.on_replica
                and request.kind in (pb.METHOD, pb.GET_ATTR)
                and self.b.replicator.has_copy(request.object_id)
            ):
                args, kwargs = loads(payload, buffers, self.heap.unpickle_context()) if payload else ((), {})
                result = self.b.replicator.read(request.object_id, request.kind, request.name, args, kwargs)
            else:
                # Refused before its arguments are unpickled: not here, or moved away.
                self.heap.admit(request.object_id)
                self.b.replicator.check_serving(request.object_id)
                ctx = self.heap.unpickle_context()
                if request.kind == pb.SET_ATTR:
                    args, kwargs = (loads(payload, buffers, ctx),), {}
                elif payload:
                    args, kwargs = loads(payload, buffers, ctx)
                else:
                    args, kwargs = (), {}
                version = self._version_before(request)
                result = self.heap.invoke(
                    request.object_id, request.kind, request.name, args, kwargs, chain, call_id=request.call_id
                )
            pid = request.reader_pid if request.reader_pid_ns == shm.pid_namespace() else 0
            # A call nested in a changing call of the same chain (a callback) must not
            # wait for that call's end: it would wait for itself.
            nested = self.heap.held_by(request.object_id, chain)
            reply = self._reply(result, chain, request.accept_shm, pid, not nested)
            if version[0] and reply.result.leases and pid:
                self._offer_reuse(reply, request, result, version)
            ok = True
            return reply
        except Exception as exc:
            # Answered inside the call's span; the user's exception is no backend fault.
            return error_reply(pb.CallReply, exc, "Call", user_code=True)
        finally:
            set_chain(None)
            if logs.json_on:
                logs.set_call("", "")
            metrics.call_done(_KIND_NAMES.get(request.kind, "other"), ok, time.perf_counter() - started)
            cancel.set_current(None)

    def _version_before(self, request: pb.CallRequest) -> tuple[int, int]:
        """The change word of an object whose attribute a same-host reader reads, taken
        before the read (store.backend._storage.versions); (0, 0) when the read is not reusable."""
        if (
            request.kind != pb.GET_ATTR
            or not request.accept_shm
            or not request.reader_pid
            or request.reader_pid_ns != shm.pid_namespace()
            or self.b.segments.versions is None
            or self.b.replicator.replicated(request.object_id)
        ):
            return 0, 0
        # Only for a loaded object whose attribute is a large array already: a slot
        # is not spent on every small attribute read.
        obj = self.heap.loaded(request.object_id)
        np = shm._numpy()
        value = getattr(obj, "__dict__", {}).get(request.name) if obj is not None else None
        if np is None or value is None or type(value) is not np.ndarray or value.nbytes <= self.settings.inline_limit:
            return 0, 0
        return self.b.segments.version(request.object_id)

    def _offer_reuse(self, reply: pb.CallReply, request: pb.CallRequest, result, version: tuple[int, int]) -> None:
        """Let the reader reuse this leased view while the object's change word holds.

        Only when the value is the attribute itself (the object's own state, not
        something a property or __getattr__ computed) and one numpy array (no
        container whose parts other objects may share and change).
        """
        obj = self.heap.loaded(request.object_id)
        np = shm._numpy()
        versions = self.b.segments.versions
        if (
            obj is None
            or np is None
            or versions is None
            or type(result) is not np.ndarray
            or getattr(obj, "__dict__", {}).get(request.name) is not result
            or self.b.replicator.replicated(request.object_id)
        ):
            return
        slot, word = version
        if self.b.segments.reusable(request.object_id, slot, word, list(reply.result.shm)):
            reply.version_table = versions.name
            reply.version_slot = slot
            reply.version_word = word
            reply.version_pid = os.getpid()

    def _reply(
        self, result, chain: str, accept_shm: bool = False, reader_pid: int = 0, wait: bool = True
    ) -> pb.CallReply:
        if result is None:
            return pb.CallReply()
        payload, buffers = dumps(result, self.heap.pickle_context(chain))
        size = wire.total_size(payload, buffers)
        small = size <= self.settings.inline_limit
        # Same-host readers get buffers of shm_min bytes or more through /dev/shm
        # even when they would fit inline (see README, Performance).
        if small and not (accept_shm and buffers and size >= self.settings.shm_min):
            return pb.CallReply(result=wire.inline_value(payload, buffers))
        if accept_shm and self.settings.shm and shm.available() and len(payload) <= self.settings.inline_limit:
            leased = self.b.segments.lease([b.raw() for b in buffers], reader_pid, wait) if reader_pid else None
            if leased is not None:
                # Zero copies: the reader maps the backend's own segments read-only.
                metrics.shm_done("out", size)
                return pb.CallReply(
                    result=pb.Value(
                        payload=payload,
                        shm=[name for name, _, _ in leased],
                        buffer_sizes=[memoryview(b).nbytes for b in buffers],
                        shm_offsets=[offset for _, offset, _ in leased],
                        leases=[lease for _, _, lease in leased],
                    )
                )
            try:
                names = self.outbox.export(buffers)
                metrics.shm_done("out", size)
                return pb.CallReply(
                    result=pb.Value(payload=payload, shm=names, buffer_sizes=[memoryview(b).nbytes for b in buffers])
                )
            except shm.Unavailable:
                pass  # /dev/shm full: the result goes inline or streams instead
        if small:
            return pb.CallReply(result=wire.inline_value(payload, buffers))
        return pb.CallReply(result_handle=self.pending.put(payload, buffers), result_size=size)

    @replies(pb.UpgradeClassResponse)
    def UpgradeClass(self, request: pb.UpgradeClassRequest, context: grpc.ServicerContext) -> pb.UpgradeClassResponse:
        self.heap.upgrade_class(
            check_name("object id", request.object_id),
            check_name("class key", request.class_key),
            request.chain_id or "anon:" + uuid.uuid4().hex,
        )
        return pb.UpgradeClassResponse()

    @replies(pb.LeasesResponse)
    def Leases(self, request: pb.LeasesRequest, context: grpc.ServicerContext) -> pb.LeasesResponse:
        self.b.segments.release(list(request.release))
        return pb.LeasesResponse(**self.b.segments.stats())

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        return pb.CancelResponse(found=cancel.cancel(request.call_id))

    def FetchResult(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk | bytes]:
        try:
            payload, buffers = self.pending.take(request.result_handle)
        except ObjectNotFound as exc:  # the only failure: the stream's header says so
            yield pb.Chunk(header=error_reply(pb.CallReply, exc).SerializeToString())
            return
        value, blobs = wire.streamed_value(payload, buffers)
        size = wire.total_size(payload, buffers)
        metrics.stream_done("out", size)
        with tracing.server_span("stream result", context, bytes=size):
            yield from wire.chunk_stream(
                pb.CallReply(result=value).SerializeToString(), blobs, self.settings.chunk_size
            )

    @replies(pb.Status)
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.Status:
        try:
            # A replicated object is deleted only by its primary while its lease holds.
            self.b.replicator.check_serving(request.object_id)
            self.heap.delete(request.object_id, request.chain_id)
            self.b.replicator.deleted(request.object_id)
            return pb.Status()
        except ObjectNotFound:
            self._forget_dangling(request.object_id)
            raise

    def _forget_dangling(self, object_id: str) -> None:
        """A directory entry naming this backend for an object it does not hold is what a
        delete interrupted between its storage write and its directory write left: the
        object is gone, so the entry (and its alias) go too."""
        try:
            if not self.heap.has(object_id) and self.directory.lookup(object_id).backend_id == self.b.backend_id:
                self.directory.forget(object_id, owner=self.b.backend_id)
        except ClaypotError:
            pass

    @replies(pb.Status)
    def Move(self, request: pb.MoveRequest, context: grpc.ServicerContext) -> pb.Status:
        self.b.move(request.object_id, request.target_backend_id, request.chain_id)
        return pb.Status()

    def Validate(self, request: pb.ValidateRequest, context: grpc.ServicerContext) -> pb.Status:
        try:
            self.heap.validate()
            return pb.Status()
        except AssertionError as exc:
            return error_reply(pb.Status, ProtocolError(f"lifecycle invariant broken: {exc}"))

    @replies(pb.Status)
    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.Status:
        self.b.storage.flush_dirty()
        self.b.storage.checkpoint()
        return pb.Status()

    # -- other languages ---------------------------------------------------------------
    @replies_json
    def CallJson(self, request: pb.JsonCallRequest, context: grpc.ServicerContext) -> pb.JsonCallReply:
        if request.WhichOneof("target") == "alias":
            oid = self.directory.resolve_alias(check_name("alias", request.alias))
        else:
            oid = check_name("object id", request.object_id)
        entry = self.directory.lookup(oid)
        kwargs: dict
        try:
            if request.kind == pb.SET_ATTR:
                args, kwargs = (json.loads(request.args_json),), {}
            else:
                args = tuple(json.loads(request.args_json)) if request.args_json else ()
                kwargs = json.loads(request.kwargs_json) if request.kwargs_json else {}
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"arguments are not valid JSON: {exc}") from None
        if request.kind not in (pb.METHOD, pb.GET_ATTR, pb.SET_ATTR):
            raise ProtocolError("CallJson supports METHOD, GET_ATTR and SET_ATTR")
        check_public_name(request.name)
        proxy = objmod.make_proxy(self.b.client.class_for_key(entry.class_key), oid, entry.class_key, entry.backend_id)
        result = self.b.client.call(proxy, request.kind, request.name, args, kwargs)
        try:
            text = json.dumps(result)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"result is not JSON-encodable: {exc}") from None
        return pb.JsonCallReply(result_json=text)


def check_public_name(name: str) -> None:
    """Refuse a CallJson target that is not a public method or attribute.

    Cross-language callers reach an object's public API only: no private
    names, no dunders (``__class__``, ``__reduce__``...) and no claypot
    identity fields (``_claypot_*``), which all start with an underscore.
    """
    if not name or not name.isidentifier() or name.startswith("_"):
        raise ProtocolError(f"CallJson reaches public methods and attributes only, not {name[:80]!r}")


def check_listen(settings: Settings) -> None:
    """Refuse to serve a network without a token, unless told so (``--insecure``).

    The same for a hosted Dask worker: it runs whatever its scheduler sends, so
    it joins only a ``tls://`` scheduler with the cluster's certificates.
    """
    if (
        settings.dask_scheduler
        and not (settings.dask_scheduler.startswith("tls://") and settings.dask_tls_dir)
        and not settings.insecure
    ):
        raise ConfigurationError(
            f"refusing to host a Dask worker on {settings.dask_scheduler} without TLS: "
            f"anyone who reaches that scheduler could run code here. Use a tls:// "
            f"scheduler and CLAYPOT_DASK_TLS_DIR (LocalCluster(dask=True) does), or pass "
            f"--insecure to accept that"
        )
    if settings.token:
        return
    if is_loopback_host(settings.host):
        log.warning(
            "serving without a token: any user of this machine can run code in this process (set CLAYPOT_TOKEN)"
        )
        return
    if not settings.insecure:
        raise ConfigurationError(
            f"refusing to listen on {settings.host} without a token: anyone who reaches "
            f"the port could run code here. Set CLAYPOT_TOKEN (or --token), or pass "
            f"--insecure to accept that"
        )
    log.warning(
        "listening on %s WITHOUT a token (--insecure): anyone who reaches this port can run code in this process",
        settings.host,
    )


class _HandlerSink:
    """Takes the handlers a grpc.Server would serve (an embedded backend has none)."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service_name, handlers) -> None:
        pass


class Backend:
    """One backend: storage, heap, directory registration, gRPC server.

    ``transport`` embeds the backend in a process that serves it itself
    (store._ops.inproc): no gRPC server is made, the backend's address is
    ``settings.advertise``, its own client reaches its peers through
    ``transport``, and it installs no process-wide dispatcher (the process's
    own client keeps that; the embedding server sets the backend's for each
    call it serves, see store._model.objects.dispatching).
    """

    def __init__(self, settings: Settings, transport=None):
        if not settings.data_dir:
            raise ClaypotError("a backend needs a data dir")
        self.embedded = transport is not None
        if not self.embedded:
            check_listen(settings)
        if not settings.redis:
            raise ClaypotError("a backend needs a Redis URL (--redis)")
        self.settings = settings
        self.host = socket.gethostname()
        self.host_id = shm.host_id(settings.host_id)
        from store._util import resources as _resources

        self.resources = _resources.declared(settings.resources)
        self.directory = Directory(settings.redis, timeout=settings.admin_timeout, token=settings.token)
        if self.directory.r.connection_pool.connection_kwargs.get("password") is None:
            # Signatures still keep code and addresses safe; the rest is open to anyone
            # who reaches this Redis.
            log.warning("the directory (%s) has no password", self.directory.url)
        self.directory.wait_ready(settings.admin_timeout)
        self.storage = Storage(
            settings.data_dir,
            settings.durability,
            settings.flush_interval,
            checkpoint_interval=settings.checkpoint_interval,
        )
        self.backend_id = self.storage.backend_id
        self.code = CodeCache(self.directory.get_code, self.storage)
        limit = parse_memory_limit(settings.memory_limit)
        self.memory_limit = limit
        self.max_value_size = settings.max_value_bytes()
        budget = 0
        if limit:
            import psutil

            base = psutil.Process().memory_info().rss
            budget = max(limit - base - 32 * 1024 * 1024, limit // 4)
        self.heap = Heap(
            self.backend_id,
            self.storage,
            self.code,
            self.directory,
            big_object=settings.big_object,
            memory_budget=budget,
        )
        self.segments = Segments(
            parse_memory_limit(settings.shm_lease_limit) if settings.shm_leases else 0,
            # Reported under an object's lock: the spills it asks for run on a thread of
            # their own (each takes its object's lock only if free), not at the next
            # transition, which may be long in coming.
            on_stale_bytes=self._stale_leased_bytes,
            pool_limit=parse_memory_limit(settings.shm_pool),
        )
        # The live object goes along: its arrays may live in another object's segments.
        self.heap.before_change = lambda oid: self.segments.changing(oid, self.heap.loaded(oid))
        self.heap.change_done = self.segments.changed
        self.heap.on_gone = self.segments.gone
        token_check = TokenInterceptor(settings.token)
        self.interceptors = [token_check, StreamIdleGuard(settings.admin_timeout)]
        self.servicer = BackendServicer(self)
        self.lane: LaneServer | None = None
        if self.embedded:
            self.server = None
            self.services = StandardServices(_HandlerSink())  # health kept, served by no one
            self.address = settings.advertise
            self.client = Client.inside_backend(self.heap, self.backend_id, self.address, settings, transport=transport)
            self._init_rest()
            return
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.server_threads, thread_name_prefix="rpc"),
            interceptors=self.interceptors,
            options=CHANNEL_OPTIONS,
        )
        wire.add_servicer(self.servicer, self.server)
        self.services = StandardServices(self.server)  # health (NOT_SERVING until started), reflection
        listen = f"{settings.host}:{settings.port}"
        if settings.tls_cert:
            creds = grpc.ssl_server_credentials([(settings.read_pem("tls_key"), settings.read_pem("tls_cert"))])
            port = self.server.add_secure_port(listen, creds)
        else:
            port = self.server.add_insecure_port(listen)
        if port == 0:
            raise ClaypotError(f"cannot listen on {settings.host}:{settings.port}")
        # A backend listening on 0.0.0.0 (a container) must register an address
        # its peers can reach: --advertise / CLAYPOT_ADVERTISE, else this host's own.
        self.address = settings.advertise or advertised_address(settings.host, port)
        if settings.local_lane and not settings.tls_cert:
            # Same-host clients' unary calls, past gRPC's machinery (store._wire.lane).
            table = HandlerTable(self.servicer, self.interceptors)
            self.lane = LaneServer(
                self.address,
                table,
                max_connections=max(16, 4 * settings.server_threads),
                admits=token_check.admits,
                settle=self.heap.storage.settle,
            )
        self.client = Client.inside_backend(self.heap, self.backend_id, self.address, settings)
        objmod.set_dispatcher(self.client)
        self._init_rest()

    def _init_rest(self) -> None:
        self._stop = threading.Event()
        self._epoch: str | None = None
        self.started = time.time()
        self.dask_worker = None  # a HostedDaskWorker when settings.dask_scheduler is set
        self.replicator = Replicator(self)
        self.metrics_address = ""  # host:port of the Prometheus metrics, once started

    # -- lifecycle ------------------------------------------------------------------
    def _stale_leased_bytes(self, nbytes: int) -> None:
        todo = self.heap.life_event(lambda: self.heap.life.leased(nbytes))
        if todo:
            threading.Thread(target=self.heap._perform, args=(todo,), name="claypot-spill", daemon=True).start()

    def start(self) -> None:
        # Segments left in /dev/shm by processes that died (kill -9) mid-transfer.
        removed = shm.remove_orphans(self.settings.result_ttl)
        if removed:
            log.info("removed %d orphaned shared-memory segment(s)", removed)
        self.storage.start()
        self.metrics_address = metrics.start(self, self.settings)
        tracing.start_backend(self.settings, self.backend_id)
        # The directory and this storage dir agree before the first call is served.
        self._epoch = self.directory.epoch()
        self._primary = self.directory.primary()
        if self._epoch is None:
            self._epoch = self.directory.ensure_epoch()
            self.republish()
        elif self._epoch != self._seen_epoch():
            # The directory was wiped (and rebuilt by others) while this backend was down:
            # publish everything it holds, as a running backend does on a wipe.
            self.republish()
        else:
            self.reconcile()
        self._remember_epoch(self._epoch)
        self.replicator.start()
        if self.server is not None:
            self.server.start()
        if self.lane is not None:
            self.lane.start()
        self._heartbeat()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._replica_loop, name="replicas", daemon=True).start()
        threading.Thread(target=self._sweep_loop, name="sweeper", daemon=True).start()
        if self.settings.dask_scheduler:
            # Joins after the server is up, so a Dask task pinned here finds a serving backend.
            from store.backend._service.dask_worker import HostedDaskWorker

            self.dask_worker = HostedDaskWorker(
                self.settings.dask_scheduler,
                self.backend_id,
                self.settings.host,
                nthreads=self.settings.task_slots,
                tls_dir=self.settings.dask_tls_dir,
            ).start()
        self.services.serving(True)
        log.info("backend %s serving on %s", self.backend_id, self.address)

    def stop(self, grace: float = 1.0) -> None:
        self.services.draining()
        self._stop.set()
        if self.dask_worker is not None:
            self.dask_worker.stop()
        try:
            self.directory.unregister_backend(self.backend_id, self._stats())
        except Exception:
            pass
        if self.lane is not None:
            self.lane.stop(grace)
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
        self.segments.close()
        self.replicator.close()
        self.storage.close()
        metrics.disable()
        tracing.stop_backend()

    def _stats(self) -> dict:
        import psutil

        return {
            "address": self.address,
            "host": self.host,
            "host_id": self.host_id,
            "pid": os.getpid(),
            "started": self.started,
            "objects": self.heap.count(),
            "resident_objects": self.heap.resident_count(),
            "memory_bytes": psutil.Process().memory_info().rss,
            "running_tasks": self.heap.running_tasks,
            "durability": self.settings.durability,
            "metrics_address": self.metrics_address,
            "resources": self.resources,
        }

    def _heartbeat(self) -> None:
        sent = time.monotonic()
        self.directory.register_backend(self.backend_id, self._stats(), self.settings.heartbeat_ttl)
        self.replicator.renewed(sent)  # a stored heartbeat extends the primary's lease

    def _replica_loop(self) -> None:
        """Failover, step-down and repair of replicated objects (store.backend._engine.replicas)."""
        while not self._stop.wait(self.settings.heartbeat_interval):
            try:
                self.replicator.monitor_once()
            except Exception as exc:  # the directory unreachable: try again next round
                log.warning("replica monitor: %s", exc)

    def _heartbeat_loop(self) -> None:
        changed = threading.Event()
        # A persist or delete publishes fresh stats within ~50 ms instead of at
        # the next beat, so `claypot status` right after a change shows it.
        self.heap.on_change = changed.set
        while not self._stop.is_set():
            changed.wait(self.settings.heartbeat_interval)
            if self._stop.wait(0.05):
                break
            changed.clear()
            published = True
            try:
                epoch = self.directory.epoch()
                primary = self.directory.primary()
                if primary != self._primary and primary is not None:
                    # A Sentinel failover: the promoted replica may have missed
                    # the last writes before the old primary was lost.
                    log.warning("directory failed over to %s: republishing", primary)
                    self.republish()
                    self._primary = primary
                if epoch != self._epoch:
                    # Redis lost data (restart without persistence, or a wipe):
                    # publish this backend's part of the directory again.
                    # Epoch after the republish: if it fails midway, the next beat retries.
                    published = False
                    self.services.serving(False)
                    self.republish()
                    self._epoch = self.directory.ensure_epoch()
                    self._remember_epoch(self._epoch)
                    published = True
                self._heartbeat()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            # Health: NOT_SERVING until the directory is whole again, and for good
            # once the storage failed (the backend acknowledges nothing more).
            self.services.serving(published and self.storage.failed is None)

    def _sweep_loop(self) -> None:
        """Expire results no client fetched, on a timer rather than on the next transfer."""
        # At most a second: leases of readers that died (kill -9) end this soon.
        interval = max(0.2, min(1.0, self.settings.result_ttl / 4))
        last_orphan_scan = time.monotonic()
        while not self._stop.wait(interval):
            try:
                self.servicer.pending.sweep()
                self.servicer.outbox.sweep()
                self.segments.sweep()
                if time.monotonic() - last_orphan_scan > max(60.0, self.settings.result_ttl):
                    last_orphan_scan = time.monotonic()
                    shm.remove_orphans(self.settings.result_ttl)
            except Exception as exc:  # never let cleanup kill the thread
                log.warning("result sweep failed: %s", exc)

    def republish(self) -> int:
        """Claim every object stored here, with its alias, in the directory."""
        entries = [(oid, self.backend_id, key, alias) for oid, key, alias in self.storage.scan_headers()]
        for i in range(0, len(entries), 1000):
            self._claim_each(entries[i : i + 1000])
        return len(entries)

    def _epoch_path(self) -> str:
        return os.path.join(self.settings.data_dir, "directory.epoch")

    def _seen_epoch(self) -> str | None:
        """The directory epoch this backend last published to (kept in its storage dir)."""
        try:
            with open(self._epoch_path()) as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def _remember_epoch(self, epoch: str | None) -> None:
        if epoch and epoch != self._seen_epoch():
            from store.backend._storage.storage import atomic_write

            atomic_write(self._epoch_path(), [epoch.encode()])

    def reconcile(self) -> tuple[int, int]:
        """Make the directory and this storage dir agree after a crash; (claimed, dropped).

        Storage is written before the directory, so a crash in between leaves
        an object stored here that the directory does not know: it is
        claimed (with its alias if still free). A copy the directory says
        lives on another backend, or one that came by a move and that the
        directory does not know, is what a move interrupted before it
        committed left behind: the directory is the commit point, so the
        local copy is dropped.
        """
        stored = list(self.storage.scan_entries())
        claimed = dropped = 0
        dropped += self._forget_unsynced({oid for oid, _, _, _ in stored})
        for i in range(0, len(stored), 1000):
            batch = stored[i : i + 1000]
            owners = self.directory.lookup_many([oid for oid, _, _, _ in batch])
            missing = []
            for (oid, key, alias, moved_in), entry in zip(batch, owners):
                if entry is None and not moved_in:
                    missing.append((oid, self.backend_id, key, alias))
                elif entry is None or entry.backend_id != self.backend_id:
                    # Elsewhere, or a copy a move brought that never committed and whose
                    # object was deleted since by its owner: not ours to bring back.
                    try:
                        self.heap.delete(oid, forget=False)
                        dropped += 1
                    except ClaypotError as exc:
                        log.warning("stale copy of %s not dropped: %s", oid, exc)
            if missing:
                self._claim_each(missing)
                claimed += len(missing)
        if claimed or dropped:
            log.warning("reconciled with the directory: %d objects claimed, %d stale copies dropped", claimed, dropped)
        return claimed, dropped

    def _forget_unsynced(self, stored: set) -> int:
        """Forget directory entries claimed while their fsync ran, if the state is not here.

        A persist writes the directory while its records are fsync'd; a crash
        in that window can leave an entry whose state never reached the disk.
        Such entries are in this backend's set of unsynced claims: those still
        naming this backend with nothing stored are removed. Returns how many.
        """
        pending = self.directory.unsynced(self.backend_id)
        forgotten = 0
        for i in range(0, len(pending), 1000):
            batch = pending[i : i + 1000]
            owners = self.directory.lookup_many(batch)
            for oid, entry in zip(batch, owners):
                if oid not in stored and entry is not None and entry.backend_id == self.backend_id:
                    self.directory.forget(oid)
                    forgotten += 1
            self.directory.clear_unsynced(self.backend_id, batch)
        if forgotten:
            log.warning("forgot %d directory entries whose state was not stored before a crash", forgotten)
        return forgotten

    def _claim_each(self, entries: list) -> None:
        try:
            self.directory.claim(entries)
        except ClaypotError:
            for e in entries:  # an alias taken meanwhile: keep the object, drop the alias
                try:
                    self.directory.claim([e])
                except ClaypotError:
                    self.directory.claim([(e[0], e[1], e[2], "")])
                    for alias in split_aliases(e[3]):  # and keep those still free
                        try:
                            self.directory.add_alias(alias, e[0])
                        except ClaypotError:
                            log.warning("alias %r of %s is taken by another object: dropped", alias, e[0])

    # -- operations that span backends ---------------------------------------------------
    def move(self, object_id: str, target: str, chain: str = "") -> None:
        """Move an object to another backend (see Heap.move)."""
        if object_id in self.replicator.sets:
            from store.errors import FeatureUnavailable

            raise FeatureUnavailable(
                f"object {object_id} has replicas: a replicated object "
                f"is not moved (it fails over to a replica instead)"
            )

        def send(to, class_key, alias, payload, buffers):
            self.client.send_states(
                to,
                [pb.PersistObject(object_id=object_id, class_key=class_key, alias=alias)],
                [(payload, buffers)],
                adopt=True,
            )

        self.heap.move(object_id, target, chain, send)

    def run_task(self, request: pb.CallRequest, payload: bytes, buffers: list, chain: str = "") -> Any:
        metrics.task_queued(1)
        queued = True
        ok = False
        try:
            fn = self.code.get(request.name)
            args, kwargs = loads(payload, buffers, self.heap.unpickle_context()) if payload else ((), {})
            metrics.task_queued(-1)
            queued = False
            result = self.heap.run_task(
                fn,
                args,
                kwargs,
                list(request.mutates),
                chain or request.chain_id,
                request.timeout,
                task_key=request.call_id,
            )
            ok = True
            return result
        finally:
            if queued:
                metrics.task_queued(-1)
            metrics.task_done(ok)

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully.

        ``on_ready()`` runs once the server is up and registered.
        """

        def on_term(signum, frame):
            self._stop.set()

        # Handlers first: a SIGTERM that arrives while starting still stops cleanly.
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        self.start()
        if on_ready is not None:
            on_ready()
        while not self._stop.wait(0.5):
            pass
        self.stop()


def _announce(backend_id: str, message: str) -> None:
    """One line in the backend's log whatever CLAYPOT_LOG says, in the log's format."""
    if logs.json_on:
        line = json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "level": "INFO",
                "logger": "claypot.backend",
                "message": message,
                "backend_id": backend_id,
            }
        )
    else:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``claypot backend``."""
    import argparse

    p = argparse.ArgumentParser(prog="claypot backend", description="Run one claypot backend.")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--redis")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--advertise",
        help="host:port to register for clients and peers (default: --host:port; set it when listening on 0.0.0.0)",
    )
    p.add_argument("--token")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve a non-loopback address without a token (anyone who reaches the port can run code in this process)",
    )
    p.add_argument("--durability", choices=["sync", "async", "none"])
    p.add_argument("--flush-interval", type=float)
    p.add_argument("--memory-limit")
    p.add_argument(
        "--dask-scheduler",
        help="tcp://host:port of a Dask scheduler: host a Dask worker named after this backend in this process",
    )
    p.add_argument(
        "--resources",
        help="what this backend offers tasks, name=value pairs: "
        "computing_units=4,memory_size=8,processor_type=ARM,gpus=1,zone=edge",
    )
    p.add_argument("--ready-file", help="write the address here once serving")
    a = p.parse_args(argv)
    settings = Settings.from_env(
        data_dir=a.data_dir,
        redis=a.redis,
        host=a.host,
        port=a.port,
        advertise=a.advertise,
        token=a.token,
        insecure=a.insecure,
        durability=a.durability,
        flush_interval=a.flush_interval,
        memory_limit=a.memory_limit,
        dask_scheduler=a.dask_scheduler,
        resources=a.resources,
    )
    logs.configure(settings.log_format)
    backend = Backend(settings)
    logs.set_backend_id(backend.backend_id)

    def announce():
        # One line in the log (claypot logs) whatever CLAYPOT_LOG says: who serves where.
        _announce(
            backend.backend_id,
            f"backend {backend.backend_id} serving at "
            f"{backend.address} (pid {os.getpid()}, data in {settings.data_dir})",
        )
        if a.ready_file:  # how a parent process learns the address and id
            tmp = a.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"address": backend.address, "backend_id": backend.backend_id, "pid": os.getpid()}, f)
            os.replace(tmp, a.ready_file)

    backend.serve_forever(announce)
    _announce(backend.backend_id, f"backend {backend.backend_id} stopped")
    # Everything is on disk and closed: skip the interpreter's teardown, which
    # spent up to a second freeing a large heap object by object at each stop.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
