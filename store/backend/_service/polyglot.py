"""The backend's services for clients in other languages.

* :class:`PolyglotServicer`, mixed into the Backend servicer: GetArray,
  SetArray, CreateObject and DeleteObject. Each decodes its request, calls the
  backend's own client (which routes to the object's owner, or runs the call
  in-process when the object is here), and encodes the answer. A failure ends
  the call with the gRPC status of :data:`store._wire.polyglot.STATUS_BY_CODE` and
  the error code in trailing metadata (:func:`store.backend._service.boundary.aborts`).
* :class:`StandardServices`: ``grpc.health.v1`` (answered without a token,
  SERVING or NOT_SERVING only) and server reflection (behind the token, like
  every other service).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from store._model import objects as objmod
from store._wire import polyglot, wire
from store.errors import ClassNotFound, ConfigurationError, ProtocolError
from store._wire.generated import claypot_pb2 as pb
from store.backend._service.boundary import aborts

if TYPE_CHECKING:
    from store.config import Settings
    from store.backend._service.server import Backend

SERVICE_NAME = "claypot.v1.Backend"

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
"""Methods answered without a token: health says SERVING or NOT_SERVING and nothing else."""


class StandardServices:
    """Health checking and reflection on one backend's gRPC server.

    Health starts NOT_SERVING; the backend calls :meth:`serving` once it is
    registered and serving, ``serving(False)`` while it republishes its
    objects after Redis lost them, and :meth:`draining` when it stops.
    """

    def __init__(self, server: grpc.Server):
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.serving(False)

    def serving(self, ok: bool) -> None:
        """Report SERVING (True) or NOT_SERVING, for the server and the claypot service."""
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self._health.set(name, status)

    def draining(self) -> None:
        """NOT_SERVING from now on, whatever is set later (the server is stopping)."""
        self._health.enter_graceful_shutdown()


def _json_args(args_json: str, kwargs_json: str) -> tuple[tuple, dict]:
    try:
        args = json.loads(args_json) if args_json else []
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except ValueError as exc:
        raise ProtocolError(f"arguments are not valid JSON: {exc}") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ProtocolError("args_json must be a JSON array and kwargs_json a JSON object")
    return tuple(args), kwargs


class PolyglotServicer:
    """Cross-language RPCs of the Backend service (mixed into its servicer).

    Needs ``self.b`` (the Backend) and ``self.settings``.
    """

    b: Backend
    settings: Settings

    def _object_id(self, request) -> str:
        which = request.WhichOneof("target")
        if which == "alias":
            return self.b.directory.resolve_alias(request.alias)
        if which == "object_id" and request.object_id:
            return request.object_id
        raise ProtocolError("the request names no object (set object_id or alias)")

    def _proxy(self, object_id: str):
        entry = self.b.directory.lookup(object_id)
        cls = self.b.client.class_for_key(entry.class_key)
        return objmod.make_proxy(cls, object_id, entry.class_key, entry.backend_id)

    @aborts
    def GetArray(self, request: pb.GetArrayRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        # Not a generator: the array is fetched and described inside the error
        # boundary, before gRPC takes the first frame.
        proxy = self._proxy(self._object_id(request))
        if request.kind not in (pb.METHOD, pb.GET_ATTR):
            raise ProtocolError("GetArray supports METHOD and GET_ATTR")
        if not request.name:
            raise ProtocolError("GetArray needs a name (attribute or method)")
        args: tuple = ()
        kwargs: dict = {}
        if request.kind != pb.GET_ATTR:
            args, kwargs = _json_args(request.args_json, request.kwargs_json)
        result = self.b.client.call(proxy, request.kind, request.name, args, kwargs)
        what = f"{request.name}{'()' if request.kind == pb.METHOD else ''}"
        header, array = polyglot.describe_array(result, what, self.settings.inline_limit)
        # GetArrayResponse's fields share Chunk's numbers (1 header, 2 data), so
        # the raw framing of wire.chunk_stream sends the bytes straight from the
        # array's memory.
        return wire.chunk_stream(
            header.SerializeToString(), [array] if header.chunked else [], self.settings.chunk_size
        )

    @aborts
    def SetArray(
        self, request_iterator: Iterator[pb.SetArrayRequest], context: grpc.ServicerContext
    ) -> pb.SetArrayResponse:
        first = next(request_iterator, None)
        if first is None:
            raise ProtocolError("empty SetArray stream")
        kind, body = wire.decode_chunk(first)
        if kind != "header":
            raise ProtocolError("SetArray must start with a header")
        try:
            header = pb.SetArrayHeader.FromString(bytes(body))
        except (DecodeError, ValueError, TypeError) as exc:
            raise ProtocolError(f"malformed SetArray header: {exc}") from None
        if not header.name:
            raise ProtocolError("SetArray needs the attribute name")
        nbytes = polyglot.expected_nbytes(header.array, self.b.max_value_size)
        object_id = self._object_id(header)
        proxy = self._proxy(object_id)
        if header.array.chunked:
            data = self._receive(request_iterator, nbytes)
        else:
            if next(request_iterator, None) is not None:
                raise ProtocolError("data chunks after an inline SetArray header")
            data = header.array.data
        array = polyglot.array_from_bytes(header.array, data)
        self.b.client.call(proxy, pb.SET_ATTR, header.name, (array,), {})
        return pb.SetArrayResponse(ref=self._ref(proxy))

    def _receive(self, chunks, nbytes: int):
        """The data chunks of a SetArray, landed in one buffer the way every
        streamed value is (receive budget, pages mapped ahead of the data)."""
        # One streamed "value" whose only blob is the array's bytes.
        assembler = wire.Assembler([pb.Value(buffer_sizes=[nbytes])], self.b.max_value_size)
        try:
            for chunk in chunks:
                kind, body = wire.decode_chunk(chunk)
                if kind != "data":
                    raise ProtocolError("a second header inside a SetArray stream")
                assembler.feed(body)
            ((data, _),) = assembler.finish()
            return data
        finally:
            assembler.close()

    @aborts
    def CreateObject(self, request: pb.CreateObjectRequest, context: grpc.ServicerContext) -> pb.CreateObjectResponse:
        key = self._class_key(request.class_name)
        cls = self.b.client.class_for_key(key)
        if not (isinstance(cls, type) and issubclass(cls, objmod.StorageObject)):
            raise ClassNotFound(f"{key} is not a StorageObject class")
        args, kwargs = _json_args(request.args_json, request.kwargs_json)
        target = request.backend_id or self.b.backend_id
        alias = request.alias or None
        if alias is not None and "|" in alias:
            raise ConfigurationError("an alias is a non-empty string without '|'")
        obj = cls(*args, **kwargs)
        if target != self.b.backend_id:
            self.b.client.make_persistent([obj], alias=alias, backend=target)
            return pb.CreateObjectResponse(ref=self._ref(obj))
        # Here: straight into the heap (the client only persists to other
        # backends), with the StorageObjects the new one references.
        items, _ = self.b.client._collect([obj], target)
        self.b.heap.persist(
            [
                (oid, key, payload, buffers, (alias or "") if i == 0 else "")
                for i, (_, oid, key, payload, buffers) in enumerate(items)
            ]
        )
        _, oid, key, _, _ = items[0]
        return pb.CreateObjectResponse(ref=pb.ObjectRef(object_id=oid, class_key=key, backend_id=target))

    @aborts
    def DeleteObject(self, request: pb.DeleteObjectRequest, context: grpc.ServicerContext) -> pb.DeleteObjectResponse:
        proxy = self._proxy(self._object_id(request))
        self.b.client.delete_persistent(proxy)
        return pb.DeleteObjectResponse()

    @staticmethod
    def _ref(obj) -> pb.ObjectRef:
        d = obj.__dict__
        return pb.ObjectRef(object_id=d[objmod._ID], class_key=d[objmod._KEY], backend_id=d[objmod._OWNER])

    def _class_key(self, name: str) -> str:
        """A registry key from a key, "module:Qualname" or "Qualname" (exactly one match)."""
        if not name:
            raise ConfigurationError("CreateObject needs a class_name")
        keys = self.b.directory.code_keys()
        if name in keys:
            return name
        matches = sorted(
            {k for k in keys if k.split("#", 1)[0] == name or k.split("#", 1)[0].split(":", 1)[-1] == name}
        )
        if not matches:
            raise ClassNotFound(f"no class {name!r} in the cluster's code registry")
        if len(matches) > 1:
            raise ClassNotFound(
                f"class name {name!r} matches {len(matches)} registered versions; pass one key: {', '.join(matches)}"
            )
        return matches[0]


__all__ = ["OPEN_METHODS", "PolyglotServicer", "StandardServices"]
