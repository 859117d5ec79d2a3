"""The asyncio API: method calls and look-ups as coroutines, on grpc's asyncio channels.

    import store
    store.connect()                          # as for the blocking API
    c = await store.aio.get_by_alias("c")    # a proxy, as store.get_by_alias returns
    await c.incr.aio(2)                      # the method, run on its backend
    await asyncio.gather(*(c.incr.aio(1) for _ in range(1000)))

Every proxy method has an ``.aio`` twin; blocking calls keep working inside a
running event loop (a notebook's), they just block it while they wait.
Calls are gRPC ``grpc.aio`` calls, no thread per call: thousands can be in
flight from one loop. Cancelling the awaiting task (``task.cancel()``,
``asyncio.wait_for`` timing out) sends ``Cancel`` for the call, which stops
the method on the backend and rolls its object back (see
:mod:`store.backend._engine.cancel`).

Limits: arguments and results travel inline, up to ``inline_limit`` (1 MiB by
default) each; a larger value raises ValueTooLarge naming the blocking API,
which streams. Directory metadata (backend addresses, class code) comes from
the blocking client's caches, asked once per backend and class.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from typing import Any

import grpc

from store._model import objects as objmod
from store._wire import wire
from .errors import BackendUnavailable, DeadlineExceeded, ValueTooLarge
from store._wire.generated import claypot_pb2 as pb
from store._wire.generated import claypot_pb2_grpc as pb_grpc
from store._wire.serialization import loads

_MAX_HOPS = 4


class AioClient:
    """Asyncio calls through one event loop, next to a blocking :class:`store._client.client.Client`."""

    def __init__(self, client):
        self.sync = client
        self._stubs: dict[str, pb_grpc.BackendStub] = {}
        self._channels: list = []

    def _stub(self, address: str) -> pb_grpc.BackendStub:
        stub = self._stubs.get(address)
        if stub is None:
            # Through the blocking client's transport: gRPC's asyncio channels,
            # or backends served in this process.
            stub, close = self.sync.transport.aio_stub(address)
            self._channels.append(close)
            self._stubs[address] = stub
        return stub

    async def close(self) -> None:
        for close in self._channels:
            await close()
        self._channels.clear()
        self._stubs.clear()

    async def _admin(self, method: str, request: Any) -> Any:
        from store._client.client import translate

        last = None
        for address in self.sync._gateway_order():
            try:
                return await getattr(self._stub(address), method)(
                    request, timeout=self.sync.settings.admin_timeout, metadata=self.sync._metadata
                )
            except grpc.aio.AioRpcError as err:
                last = translate(err, False, method)
                if not isinstance(last, BackendUnavailable):
                    raise last from None
        raise last or BackendUnavailable("no backend to ask")

    async def resolve(self, *, object_id: str | None = None, alias: str | None = None) -> pb.ObjectRef:
        request = pb.ResolveRequest(object_id=object_id) if object_id else pb.ResolveRequest(alias=alias)
        reply = await self._admin("Resolve", request)
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)
        return reply.ref

    async def get_by_alias(self, alias: str) -> Any:
        return self.sync._proxy(await self.resolve(alias=alias))

    async def get_by_id(self, object_id: str) -> Any:
        return self.sync._proxy(await self.resolve(object_id=object_id))

    async def call(self, proxy: objmod.StorageObject, kind: int, name: str, args: tuple, kwargs: dict) -> Any:
        """A method call (or attribute access) on a proxy, awaited."""
        from store._client.client import translate

        settings = self.sync.settings
        oid = proxy.getID()
        owner = proxy.__dict__.get(objmod._OWNER, "")
        payload, buffers = self.sync._dump_args((args, kwargs), owner) if args or kwargs else (b"", [])
        size = wire.total_size(payload, buffers)
        if size > settings.inline_limit:
            raise ValueTooLarge(
                f"{name}.aio: arguments of {size} bytes exceed the inline "
                f"limit of {settings.inline_limit} bytes of the asyncio API; "
                f"call {name}() (the blocking API streams large values)"
            )
        request = pb.CallRequest(
            object_id=oid, kind=kind, name=name, chain_id=uuid.uuid4().hex, call_id=uuid.uuid4().hex
        )
        if payload:
            request.args.CopyFrom(wire.inline_value(payload, buffers))
        for _ in range(_MAX_HOPS + 1):
            owner = owner or (await self.resolve(object_id=oid)).backend_id
            address = self.sync._addresses.get(owner) or self.sync.address_of(owner)
            try:
                reply = await self._stub(address).Call(
                    request, timeout=settings.call_timeout, metadata=self.sync._metadata
                )
            except asyncio.CancelledError:
                await self._cancel(address, request.call_id)
                raise
            except grpc.aio.AioRpcError as err:
                exc = translate(err, True, name)
                if isinstance(exc, DeadlineExceeded):
                    await self._cancel(address, request.call_id)
                raise exc from None
            if reply.HasField("error") and reply.error.code in ("ObjectMoved", "ObjectNotFound"):
                # It left that backend (the call did not run there): follow it.
                current = reply.error.moved_to or (await self.resolve(object_id=oid)).backend_id
                if current == owner:
                    break
                owner = proxy.__dict__[objmod._OWNER] = current
                continue
            break
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)
        if reply.result_handle or reply.result.shm:
            raise ValueTooLarge(
                f"{name}.aio: its result of {reply.result_size} bytes exceeds "
                f"the inline limit of the asyncio API; call {name}() instead"
            )
        if not reply.result.payload:
            return None
        return loads(reply.result.payload, wire.writable(reply.result.buffers), None)

    async def _cancel(self, address: str, call_id: str) -> None:
        # Shielded: it runs while the awaiting task is being cancelled.
        async def send():
            try:
                await self._stub(address).Cancel(
                    pb.CancelRequest(call_id=call_id), timeout=2.0, metadata=self.sync._metadata
                )
            except grpc.aio.AioRpcError:
                pass

        try:
            await asyncio.shield(send())
        except asyncio.CancelledError:
            pass


_per_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AioClient]" = weakref.WeakKeyDictionary()


def client() -> AioClient:
    """The asyncio client of the running loop (grpc.aio channels belong to one loop)."""
    loop = asyncio.get_running_loop()
    sync = objmod.get_dispatcher()
    hit = _per_loop.get(loop)
    if hit is None or hit.sync is not sync:
        hit = _per_loop[loop] = AioClient(sync)
    return hit


async def get_by_alias(alias: str) -> Any:
    """The persistent object with this alias (a proxy). Raises AliasNotFound."""
    return await client().get_by_alias(alias)


async def get_by_id(object_id: str) -> Any:
    """The persistent object with this id (a proxy). Raises ObjectNotFound."""
    return await client().get_by_id(object_id)


async def call(proxy: objmod.StorageObject, name: str, *args: Any, **kwargs: Any) -> Any:
    """``await store.aio.call(obj, "incr", 2)``: what ``await obj.incr.aio(2)`` does."""
    return await client().call(proxy, objmod.METHOD, name, args, kwargs)


async def getattr_(proxy: objmod.StorageObject, name: str) -> Any:
    """An attribute of a persistent object, read on its backend."""
    return await client().call(proxy, objmod.GET_ATTR, name, (), {})


__all__ = ["AioClient", "client", "get_by_alias", "get_by_id", "call", "getattr_"]
