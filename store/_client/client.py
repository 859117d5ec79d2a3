"""The client: how a process talks to a claypot cluster.

A client needs the address of any one backend (the *gateway*); it learns
the others from it. It caches object locations (carried in every proxy),
backend addresses and class code, so a method call is one RPC to the owner
and nothing else: Redis is never on the call path.

Inside a backend process the same client is used, with ``local`` set to the
backend's heap: a call on an object that lives there is a plain in-process
call (no pickling, no RPC).
"""

from __future__ import annotations

import functools
import itertools
import os
import logging
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import grpc

from store._model import objects as objmod
from store._client import shm
from store import tracing
from store._wire import transfers, wire

# CHANNEL_OPTIONS and MAX_MESSAGE stay importable from here (servers and tests use them).
from store._client.transport import CHANNEL_OPTIONS, MAX_MESSAGE, Transport, for_settings  # noqa: F401
from store.config import Settings
from store.errors import (
    AuthenticationError,
    BackendDown,
    BackendNotFound,
    BackendUnavailable,
    CallInterrupted,
    ClaypotError,
    ConfigurationError,
    DeadlineExceeded,
    NotPersistent,
    ObjectMoved,
    ObjectNotFound,
    ProtocolError,
    ValueTooLarge,
)
from store._wire.generated import claypot_pb2 as pb
from store._wire.generated import claypot_pb2_grpc as pb_grpc
from store._util.ids import fresh_id
from store._client.retry import Retry
from store._wire.serialization import (
    PickleContext,
    code_key_and_bytes,
    dumps,
    import_by_key,
    load_code,
    loads,
    remember_code,
)

if TYPE_CHECKING:  # imported when first used: most clients never need them
    from store._client.leases import LeaseReturns
    from store._client.readcache import ReadCache

log = logging.getLogger("claypot.client")

TOKEN_HEADER = "claypot-token"

_chain = threading.local()
_MAX_HOPS = 4  # moves a call follows before it gives up (ObjectMoved)


def current_chain() -> str | None:
    """The call chain the current thread is serving (inside a backend), if any."""
    return getattr(_chain, "id", None)


def set_chain(chain: str | None) -> None:
    _chain.id = chain


class _NotRun(Exception):
    """Internal: the request never reached a backend; safe to retry."""

    def __init__(self, error: ClaypotError):
        super().__init__(str(error))
        self.error = error


_MISS = object()  # a replica read that did not happen (the primary answers instead)


def _is_connect_failure(err: grpc.RpcError) -> bool:
    details = (err.details() or "").lower()
    return any(
        s in details
        for s in (
            "failed to connect",
            "connection refused",
            "connections to all backends failing",
            "dns resolution",
            "no route to host",
            "unavailable: ipv4",
        )
    )


def translate(err: grpc.RpcError, may_have_run: bool, what: str = "call") -> ClaypotError:
    """A grpc error as a claypot error."""
    code = err.code()
    details = err.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(details or "wrong or missing token")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what}: no answer within its deadline")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ValueTooLarge(f"{what}: {details}")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED):
        return ProtocolError(f"{what}: {details}")
    if code == grpc.StatusCode.UNAVAILABLE and (_is_connect_failure(err) or not may_have_run):
        return BackendUnavailable(f"{what}: backend unreachable ({details})")
    if may_have_run:
        return CallInterrupted(
            f"{what}: the connection broke while the call was in flight ({code.name}: {details}); it may have run"
        )
    return BackendUnavailable(f"{what}: {code.name}: {details}")


class Client:
    """A connection to a claypot cluster (see the module docstring).

    ``transport`` (a :class:`store._client.transport.Transport`) is how it reaches
    backends: gRPC channels by default, or backends served in this process
    (:class:`store._ops.inproc.InProcessCluster`).
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        settings: Settings | None = None,
        gateways: list[str] | None = None,
        transport: Transport | None = None,
    ):
        self.settings = settings or Settings.from_env()
        address = address or self.settings.address
        if not address:
            raise ConfigurationError(
                "no cluster address: pass one to store.connect(), set CLAYPOT_ADDRESS, "
                "or start a cluster with `claypot up`"
            )
        self.token = token if token is not None else self.settings.token
        wire.set_receive_budget(self.settings.receive_budget_bytes())
        self._metadata = ((TOKEN_HEADER, self.token),)
        if self.settings.tracing and not tracing.enabled():
            tracing.enable()
        # Backends asked directory questions, in order: the given address, then
        # any others known from elsewhere (the state file of `claypot up`).
        self._gateways = [address] + [g for g in (gateways or []) if g != address]
        # Channels read the settings when they open: callers may replace self.settings.
        self.transport: Transport = for_settings(lambda: self.settings, transport)
        self._addresses: dict[str, str] = {}  # backend id -> address
        self._host_ids: dict[str, str] = {}  # address -> host id it reported (see _same_host)
        self._down_checked: dict[str, tuple] = {}  # address -> (when, BackendDown or None)
        # Long calls in flight, watched for a backend whose host vanished (see _watch).
        self._inflight: dict[int, tuple[str, float]] = {}
        self._call_ids = itertools.count()
        self._lost: dict[str, tuple[float, BackendDown]] = {}  # address -> (when, error)
        self._watchdog: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._registered: set[str] = set()
        self._classes: dict[str, type] = {}
        self._round_robin = itertools.count()
        self._up: list[str] = []
        self._up_checked = 0.0
        self.local = None  # the heap, when this client lives inside a backend
        self.local_id: str | None = None
        # Identity map: one proxy per object id in this process, while it is in use.
        self._proxies: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()

    @classmethod
    def inside_backend(
        cls, heap: Any, backend_id: str, address: str, settings: Settings, transport: Transport | None = None
    ) -> "Client":
        """The client a backend's own code uses (methods calling other objects, tasks).

        Calls to objects in ``heap`` run in place; everything else goes out
        like any client's, with the backend itself (at ``address``) as the
        gateway for directory questions.
        """
        client = cls(address=address, token=settings.token, settings=settings, transport=transport)
        client.local = heap
        client.local_id = backend_id
        return client

    @property
    def gateway(self) -> str:
        """The backend this client asks directory questions first."""
        return self._gateways[0]

    # -- plumbing -----------------------------------------------------------------
    def _stub(self, address: str) -> pb_grpc.BackendStub:
        """The unary RPCs to a backend, through this client's transport."""
        return self.transport.stub(address)

    def _streams(self, address: str) -> wire.StreamStub:
        """The streaming RPCs to a backend, with claypot's raw chunk framing (see wire)."""
        return self.transport.streams(address)

    def close(self) -> None:
        """Close every connection of this client (the cluster keeps running)."""
        self._closed = True
        self.transport.close()

    def _rpc(self, address: str, method: str, request, timeout: float, may_have_run: bool, what: str):
        key = None
        if timeout > self.settings.heartbeat_ttl:
            # Long calls are watched (see _watch); a plain dict entry, not a
            # future: a future's result comes back through another thread, which
            # measured 40% more per call.
            key = next(self._call_ids)
            started = time.monotonic()
            self._inflight[key] = (address, started)
            if self._watchdog is None:
                self._start_watchdog()
        try:
            return getattr(self._stub(address), method)(
                request, timeout=timeout, metadata=tracing.metadata(self._metadata)
            )
        except grpc.RpcError as err:
            lost = self._lost.get(address)
            if key is not None and lost is not None and lost[0] >= started:
                raise lost[1] from None  # cancelled by the watchdog: its host is gone
            exc = translate(err, may_have_run, what)
            if isinstance(exc, BackendUnavailable):
                raise _NotRun(exc) from None
            raise exc from None
        except ValueError:
            # The watchdog closed this channel between our getting its stub and
            # calling: the call never left, and the host is known to be gone.
            lost = self._lost.get(address)
            if lost is None:
                raise
            raise _NotRun(lost[1]) from None
        finally:
            if key is not None:
                self._inflight.pop(key, None)

    def _start_watchdog(self) -> None:
        with self._lock:
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="claypot-watchdog", daemon=True)
                self._watchdog.start()

    def _watch(self) -> None:
        """Give up on calls whose backend's heartbeat expired.

        A host that vanished answers nothing (no reset, no FIN): without this a
        call to it would wait for its deadline. Every TTL/2 the backends of calls
        older than that are checked in the directory; the channel of one that is
        down is closed, which ends its calls, and they raise its BackendDown.
        """
        period = max(self.settings.heartbeat_ttl / 2, 0.2)
        while not self._closed:
            time.sleep(period)
            now = time.monotonic()
            stale = {addr for addr, t0 in list(self._inflight.values()) if now - t0 >= period}
            for addr in stale:
                down = self._down_at(addr)
                if down is None:
                    continue
                self._lost[addr] = (time.monotonic(), down)
                self.transport.drop(addr)

    def _down_at(self, address: str) -> BackendDown | None:
        """A BackendDown naming the backend at ``address`` if the directory (asked
        through any other backend) shows its heartbeat expired; None if it is up
        or no one can tell."""
        now = time.monotonic()
        cached = self._down_checked.get(address)
        if cached is not None and now - cached[0] < 0.25:
            return cached[1]
        found = None
        for gateway in self._gateway_order():
            if gateway == address:
                continue
            try:
                reply = self._stub(gateway).ListBackends(
                    pb.ListBackendsRequest(), timeout=min(self.settings.admin_timeout, 2.0), metadata=self._metadata
                )
            except grpc.RpcError:
                continue
            for b in reply.backends:
                if b.address == address and not b.up and not b.stopped:
                    found = BackendDown(
                        f"backend {b.backend_id[:8]} on host {b.host} ({address}) is down: "
                        f"no heartbeat for {self.settings.heartbeat_ttl:g}s",
                        b.backend_id,
                        b.host,
                        address,
                    )
            break
        self._down_checked[address] = (now, found)
        return found

    def _admin(self, method: str, request, address: str | None = None):
        """A directory question: safe to retry, tried on every known gateway."""

        def attempt():
            addrs = [address] if address else self._gateway_order()
            last = None
            for addr in addrs:
                try:
                    return self._rpc(addr, method, request, self.settings.admin_timeout, False, method)
                except _NotRun as exc:
                    last = exc
                except BackendDown as exc:  # a gateway on a lost host: ask the next one
                    last = _NotRun(exc)
            raise last

        try:
            return Retry(self.settings.reconnect_timeout, (_NotRun,)).run(attempt)
        except _NotRun as exc:
            raise exc.error from None

    def _gateway_order(self) -> list[str]:
        seen, out = set(), []
        for addr in self._gateways + list(self._addresses.values()):
            if addr not in seen:
                seen.add(addr)
                out.append(addr)
        return out

    def probe(self, timeout: float = 1.0) -> str:
        """Find a live gateway fast: one ListBackends per known address, ``timeout`` each.

        Returns the address that answered (now asked first) and learns every
        backend from it. Raises AuthenticationError at once on a wrong token,
        and BackendUnavailable naming the addresses tried when none answers.
        """
        tried, last = [], ""
        for addr in self._gateway_order():
            tried.append(addr)
            try:
                reply = self._stub(addr).ListBackends(
                    pb.ListBackendsRequest(), timeout=timeout, metadata=self._metadata
                )
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise AuthenticationError(f"{addr}: {err.details() or 'wrong token'}") from None
                last = f"{err.code().name}: {err.details()}"
                continue
            with self._lock:
                self._gateways = [addr] + [g for g in self._gateways if g != addr]
                for b in reply.backends:
                    self._addresses[b.backend_id] = b.address
                    if b.address and b.address not in self._gateways:
                        self._gateways.append(b.address)
            return addr
        raise BackendUnavailable(f"no backend answers at {', '.join(tried)} ({last})")

    # -- backends -------------------------------------------------------------------
    def backends(self) -> list[pb.BackendInfo]:
        """Every backend the directory knows, up or down."""
        reply = self._admin("ListBackends", pb.ListBackendsRequest())
        with self._lock:
            for b in reply.backends:
                self._addresses[b.backend_id] = b.address
        return list(reply.backends)

    def validate_backend(self, backend_id: str) -> None:
        """Ask a backend to check its lifecycle invariants; raises if one is broken."""
        reply = self._on_owner(
            backend_id,
            lambda addr: self._rpc(
                addr, "Validate", pb.ValidateRequest(), self.settings.admin_timeout, False, "validate"
            ),
        )
        if reply.HasField("error"):
            raise AssertionError(reply.error.message)

    def checkpoint_backend(self, backend_id: str) -> None:
        """Make a backend write every pending change to its checkpoint now."""
        reply = self._on_owner(
            backend_id,
            lambda addr: self._rpc(
                addr, "Checkpoint", pb.CheckpointRequest(), self.settings.call_timeout, False, "checkpoint"
            ),
        )
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)

    def address_of(self, backend_id: str, refresh: bool = False) -> str:
        if not refresh:
            addr = self._addresses.get(backend_id)
            if addr:
                return addr
        for b in self.backends():
            if b.backend_id == backend_id:
                return b.address
        raise BackendNotFound(f"no backend with id {backend_id}")

    def _choose_backend(self) -> str:
        now = time.monotonic()
        if now - self._up_checked > 2.0 or not self._up:
            self._up = [b.backend_id for b in self.backends() if b.up]
            self._up_checked = now
        up = self._up
        if not up:
            raise BackendUnavailable("no backend is up")
        return up[next(self._round_robin) % len(up)]

    def _on_owner(self, backend_id: str, fn):
        """Run fn(address) against a backend, retrying while it refuses connections.

        Retried only when the request never reached the backend; the address is
        looked up again between attempts (a restarted backend may have a new port).
        """
        state = {"refresh": False}

        def attempt():
            return fn(self.address_of(backend_id, refresh=state["refresh"]))

        def on_retry(exc):
            state["refresh"] = True
            down = self._down_at(self._addresses.get(backend_id, ""))
            if down is not None:  # its heartbeat expired: waiting longer is pointless
                raise down

        try:
            return Retry(self.settings.reconnect_timeout, (_NotRun,)).run(attempt, on_retry)
        except _NotRun as exc:
            raise BackendUnavailable(f"backend {backend_id[:8]} is unavailable: {exc.error}") from None

    # -- code ------------------------------------------------------------------------------
    def register_code(self, obj: Any) -> str:
        """Ship a class or function by value, once per key; returns its key."""
        key, code = code_key_and_bytes(obj)
        self._classes.setdefault(key, obj)
        if key not in self._registered:
            reply = self._admin("RegisterCode", pb.RegisterCodeRequest(key=key, code=code))
            if reply.HasField("error"):
                raise wire.error_from_pb(reply.error)
            self._registered.add(key)
        return key

    def class_for_key(self, key: str) -> type:
        hit = self._classes.get(key)
        if hit is not None:
            return hit
        if self.local is not None:
            cls = self.local.code.get(key)
        else:
            reply = self._admin("GetCode", pb.GetCodeRequest(key=key))
            if reply.HasField("error"):
                cls = import_by_key(key)
            else:
                cls = load_code(reply.code)
                remember_code(key, cls)
        self._classes[key] = cls
        return cls

    # -- objects ---------------------------------------------------------------------------
    def make_persistent(
        self, objs: list, alias: str | None = None, backend: str | None = None, replicas: int | None = None
    ) -> None:
        """Persist ``objs`` (and the new StorageObjects they reference) in one batch.

        ``replicas``: synchronous replicas of each (default: the first object's
        class attribute ``claypot_replicas``, else the ``replicas`` setting).
        """
        if alias is not None and (not isinstance(alias, str) or not alias or "|" in alias):
            raise ValueError("an alias is a non-empty string without '|'")
        if replicas is None:
            replicas = getattr(objmod.real_class(objs[0]), "claypot_replicas", None) if objs else None
            if replicas is None:
                replicas = self.settings.replicas
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ConfigurationError(f"replicas is a count of 0 or more, not {replicas!r}")
        target = backend or self._choose_backend()
        if backend is not None:
            self.address_of(backend)  # BackendNotFound early, before anything is sent
        items, _ = self._collect(objs, target)
        entries = []
        for i, (obj, oid, key, payload, buffers) in enumerate(items):
            entries.append(pb.PersistObject(object_id=oid, class_key=key, alias=(alias or "") if i == 0 else ""))
        self._send_persist(target, entries, [(p, b) for _, _, _, p, b in items], replicas=replicas)
        for obj, oid, key, _, _ in items:
            objmod.turn_into_proxy(obj, oid, key, target)
            self._remember_proxy(oid, obj)

    def _collect(self, roots: list, target: str):
        """Assign ids to roots and every new StorageObject they reach; pickle each state."""
        assigned: dict[int, tuple[str, str, str]] = {}
        queue: list = []

        def new_object(obj) -> tuple[str, str, str]:
            hit = assigned.get(id(obj))
            if hit is None:
                key = self.register_code(objmod.real_class(obj))
                hit = (fresh_id(), key, target)
                assigned[id(obj)] = hit
                queue.append(obj)
            return hit

        for obj in roots:
            if obj.getID() is not None:
                from store.errors import AlreadyPersistent

                raise AlreadyPersistent(f"object {obj.getID()} is already persistent")
            new_object(obj)
        ctx = PickleContext(new_object)
        items = []
        i = 0
        while i < len(queue):
            obj = queue[i]
            oid, key, _ = assigned[id(obj)]
            payload, buffers = dumps(obj.__getstate__(), ctx)
            items.append((obj, oid, key, payload, buffers))
            i += 1
        return items, assigned

    def send_states(self, target: str, entries: list, values: list, adopt: bool = False) -> None:
        """Send encoded object states (``(payload, buffers)`` per entry) to backend ``target``.

        ``adopt`` marks them as arriving by a move (the sender still holds
        them until the move commits).
        """
        self._send_persist(target, entries, values, adopt=adopt)

    def _send_persist(self, target: str, entries: list, values: list, adopt: bool = False, replicas: int = 0):
        size = sum(wire.total_size(p, b) for p, b in values)
        check_size(size, self.settings, "make_persistent")
        if size <= self.settings.inline_limit:
            for entry, (p, b) in zip(entries, values):
                entry.state.CopyFrom(wire.inline_value(p, b))
            request = pb.PersistRequest(objects=entries, adopt=adopt, replicas=replicas)

            def send(addr):
                return self._rpc(
                    addr, "Persist", request, self.settings.stream_deadline(size), False, "make_persistent"
                )
        else:
            blobs = []
            for entry, (p, b) in zip(entries, values):
                value, parts = wire.streamed_value(p, b)
                entry.state.CopyFrom(value)
                blobs += parts
            header = pb.PersistRequest(objects=entries, adopt=adopt, replicas=replicas).SerializeToString()
            small_payloads = sum(len(p) for p, _ in values) <= self.settings.inline_limit

            def send(addr):
                if small_payloads and self._same_host(addr):
                    try:
                        return self._persist_via_shm(addr, entries, values, adopt, size, replicas)
                    except shm.Unavailable:
                        pass  # /dev/shm full or missing: stream instead
                try:
                    return self._streams(addr).PersistStream(
                        wire.chunk_stream(
                            header, blobs, self.settings.chunk_size, transfers.meter(size, "make_persistent")
                        ),
                        timeout=self.settings.stream_deadline(size),
                        metadata=self._metadata,
                    )
                except grpc.RpcError as err:
                    exc = translate(err, False, "make_persistent")
                    if isinstance(exc, BackendUnavailable) and _is_connect_failure(err):
                        raise _NotRun(exc) from None
                    raise exc from None

        if self.local is not None and target == self.local_id:
            raise ConfigurationError("in-process persist goes through the heap")
        reply = self._on_owner(target, send)
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)

    def _same_host(self, address: str) -> bool:
        """Whether large buffers to ``address`` may go through /dev/shm (see store._client.shm).

        Decided by host identity, not by the address: a backend on this host
        reached by its network address qualifies, a loopback-forwarded port of
        another host (a container) does not.
        """
        if not (self.settings.shm and shm.available()):
            return False
        peer = self._host_ids.get(address)
        if peer is None:
            peer = self._ask_host_id(address)
        if not peer:  # a peer that does not tell: only loopback is known to be local
            return shm.is_local_address(address)
        return peer == shm.host_id(self.settings.host_id)

    def _ask_host_id(self, address: str) -> str | None:
        """The host id a backend reports (one Ping, cached per address)."""
        try:
            reply = self._stub(address).Ping(
                pb.PingRequest(), metadata=self._metadata, timeout=min(self.settings.admin_timeout, 2.0)
            )
        except grpc.RpcError:
            return None  # unreachable now: stream, and ask again next time
        self._host_ids[address] = reply.host_id
        return reply.host_id

    def _persist_via_shm(self, addr: str, entries: list, values: list, adopt: bool, size: int, replicas: int = 0):
        names: list[str] = []
        try:
            objects = []
            held = []
            for entry, (p, b) in zip(entries, values):
                # The backend keeps these segments as the object's memory: buffers
                # built in shared memory (store.empty) go as they are, under a lease
                # of this process (its own mapping of them must not see changes).
                segments, leases, made = shm.hand_over(b)
                names += segments
                held += [(lease, m) for lease, m in zip([x for x in leases if x], made)]
                obj = pb.PersistObject()
                obj.CopyFrom(entry)
                obj.state.CopyFrom(
                    pb.Value(payload=p, shm=segments, leases=leases, buffer_sizes=[memoryview(x).nbytes for x in b])
                )
                objects.append(obj)
            request = pb.PersistRequest(objects=objects, adopt=adopt, replicas=replicas)
            reply = self._rpc(addr, "Persist", request, self.settings.stream_deadline(size), False, "make_persistent")
            for lease, made in held:
                self.lease_returns.track(memoryview(made.region), addr, lease)
            return reply
        finally:
            shm.discard(names)  # the backend unlinked what it took; this clears the rest

    def resolve(self, *, object_id: str | None = None, alias: str | None = None) -> pb.ObjectRef:
        request = pb.ResolveRequest(object_id=object_id) if object_id else pb.ResolveRequest(alias=alias)
        reply = self._admin("Resolve", request)
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)
        return reply.ref

    def _proxy(self, ref: pb.ObjectRef):
        return self.proxy_for(ref.object_id, ref.class_key, ref.backend_id)

    def proxy_for(self, object_id: str, class_key: str, backend_id: str) -> Any:
        """The proxy of an object: the one this process already has, else a new one."""
        hit = self._proxies.get(object_id)
        if hit is not None and objmod.is_proxy(hit) and hit.getID() == object_id:
            if backend_id:
                hit.__dict__[objmod._OWNER] = backend_id
            return hit
        cls = self.class_for_key(class_key)
        proxy = objmod.make_proxy(cls, object_id, class_key, backend_id)
        try:
            return self._proxies.setdefault(object_id, proxy)
        except TypeError:
            return proxy  # a class with __slots__ and no __weakref__: no identity map entry

    def get_by_alias(self, alias: str) -> Any:
        return self._proxy(self.resolve(alias=alias))

    def get_by_id(self, object_id: str) -> Any:
        return self._proxy(self.resolve(object_id=object_id))

    def delete_alias(self, alias: str) -> None:
        """Drop an alias. Sent to the object's owner, which also drops it from the
        object's stored state, so a directory rebuilt from storage dirs does not
        bring it back."""
        owner = self.resolve(alias=alias).backend_id
        request = pb.AliasRequest(alias=alias)
        reply = self._on_owner(
            owner,
            lambda addr: self._rpc(addr, "DeleteAlias", request, self.settings.admin_timeout, True, "delete_alias"),
        )
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)

    def locate(self, proxy: objmod.StorageObject) -> str:
        if not objmod.is_proxy(proxy):  # the real object, inside its backend
            return proxy.__dict__[objmod._OWNER]
        ref = self.resolve(object_id=proxy.getID())
        proxy.__dict__[objmod._OWNER] = ref.backend_id
        return ref.backend_id

    def delete_persistent(self, proxy: objmod.StorageObject) -> None:
        oid = proxy.getID()
        reply = self._with_relocation(
            proxy,
            lambda addr: self._rpc(
                addr,
                "Delete",
                pb.DeleteRequest(object_id=oid, chain_id=current_chain() or ""),
                self.settings.admin_timeout,
                True,
                "delete_persistent",
            ),
        )
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)

    def move(self, proxy: objmod.StorageObject, backend_id: str) -> None:
        oid = proxy.getID()
        self.address_of(backend_id)
        reply = self._with_relocation(
            proxy,
            lambda addr: self._rpc(
                addr,
                "Move",
                pb.MoveRequest(object_id=oid, target_backend_id=backend_id, chain_id=current_chain() or ""),
                self.settings.call_timeout,
                True,
                "move",
            ),
        )
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)
        proxy.__dict__[objmod._OWNER] = backend_id

    def upgrade_class(self, proxy: objmod.StorageObject, cls: type) -> None:
        """Move a persistent object to ``cls``, a new version of its class (see
        StorageObject.upgrade_class)."""
        key = self.register_code(objmod.real_class(cls))
        oid = proxy.getID()
        request = pb.UpgradeClassRequest(object_id=oid, class_key=key, chain_id=current_chain() or "")
        reply = self._with_relocation(
            proxy,
            lambda addr: self._rpc(addr, "UpgradeClass", request, self.settings.call_timeout, True, "upgrade_class"),
        )
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)
        proxy.__dict__[objmod._KEY] = key
        if objmod.is_proxy(proxy):
            # Not proxy.__class__ = ...: a proxy forwards attribute writes to its backend.
            object.__setattr__(proxy, "__class__", objmod.proxy_class(cls))

    def add_replica(self, proxy: objmod.StorageObject, backend_id: str | None = None) -> str:
        """One more synchronous replica of a persistent object; returns its backend id."""
        oid = proxy.getID()
        if backend_id:
            self.address_of(backend_id)  # BackendNotFound early
        request = pb.AddReplicaRequest(object_id=oid, backend_id=backend_id or "")
        reply = self._with_relocation(
            proxy, lambda addr: self._rpc(addr, "AddReplica", request, self.settings.call_timeout, True, "add_replica")
        )
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)
        return reply.backend_id

    def _with_relocation(self, proxy, fn):
        """Run fn(address) on the object's owner; if it moved, follow it.

        A backend the object left answers ``ObjectMoved`` naming the new owner
        (the call did not run there); one that never had it, ``ObjectNotFound``,
        after which the directory is asked. Followed a bounded number of times.
        """
        oid = proxy.getID()
        if oid is None:
            raise NotPersistent("object is not persistent")
        owner = proxy.__dict__.get(objmod._OWNER) or self.resolve(object_id=oid).backend_id
        for attempt in range(_MAX_HOPS + 1):
            try:
                reply = self._on_owner(owner, fn)
            except BackendUnavailable:
                # Its owner left (drained, then stopped): the object moved before it
                # went, and the directory says where. Still there: the error stands.
                current = self.resolve(object_id=oid).backend_id
                if current == owner or attempt == _MAX_HOPS:
                    raise
                owner = current
                proxy.__dict__[objmod._OWNER] = owner
                continue
            err = getattr(reply, "error", None)
            if err is None or not reply.HasField("error") or attempt == _MAX_HOPS:
                return reply
            if err.code == "ObjectMoved" and err.moved_to and err.moved_to != owner:
                current = err.moved_to
            elif err.code in ("ObjectMoved", "ObjectNotFound"):
                current = self.resolve(object_id=oid).backend_id  # raises if really gone
            else:
                return reply
            if current == owner:
                return reply
            owner = current
            proxy.__dict__[objmod._OWNER] = owner
        return reply

    # -- calls -----------------------------------------------------------------------------
    def call(self, proxy: Any, kind: int, name: str, args: tuple, kwargs: dict) -> Any:
        """Run a method (or attribute access) on the object's owner and return its result."""
        oid = proxy.getID()
        chain = current_chain() or fresh_id()
        if self.local is not None and self.local.has(oid):
            try:
                return self.local.invoke(oid, kind, name, args, kwargs, chain)
            except ObjectMoved as exc:
                # It left this backend between the check and the call (which did not
                # run): follow it like any remote caller.
                proxy.__dict__[objmod._OWNER] = exc.moved_to
        if kind == objmod.GET_ATTR and "read_cache" in self.__dict__:
            hit, value = self.read_cache.get((oid, name), lambda p, b: loads(p, b, None))
            if hit:
                return value
        owner = proxy.__dict__.get(objmod._OWNER, "")
        if kind == objmod.SET_ATTR:
            payload, buffers = self._dump_args(args[0], owner)
        elif args or kwargs:
            payload, buffers = self._dump_args((args, kwargs), owner)
        else:
            payload, buffers = b"", []
        request = pb.CallRequest(object_id=oid, kind=kind, name=name, chain_id=chain, call_id=fresh_id())
        if proxy.__dict__.get(objmod._PREFIX + "on_replica") and self._reads(proxy, kind, name):
            hit = self._call_replica(proxy, request, payload, buffers)
            if hit is not _MISS:
                return hit
        if not tracing.enabled():
            return self._call_failing_over(proxy, request, payload, buffers)
        with tracing.client_span(f"call {name}", object_id=oid, call_id=request.call_id):
            return self._call_failing_over(proxy, request, payload, buffers)

    def _call_failing_over(self, proxy, request: pb.CallRequest, payload, buffers):
        """A call on an object with replicas rides over its primary's loss.

        When the primary is lost or cut off (BackendDown, CallInterrupted,
        BackendUnavailable), the call is sent again, with the same call id, to
        whichever backend the directory names next, until ``failover_timeout``:
        a changing call that had already run returns its recorded result there
        instead of running twice. Objects without replicas fail as before.
        """
        try:
            return self._call(proxy, request, payload, buffers)
        except (CallInterrupted, BackendUnavailable) as first:
            try:
                ref = self.resolve(object_id=request.object_id)
            except ClaypotError:
                raise first from None
            if not ref.epoch:
                raise
            deadline = time.monotonic() + (self.settings.failover_timeout or 3 * self.settings.heartbeat_ttl)
            last: ClaypotError = first
            while time.monotonic() < deadline:
                time.sleep(min(0.2, self.settings.heartbeat_ttl / 10))
                try:
                    ref = self.resolve(object_id=request.object_id)
                    addr = self._addresses.get(ref.backend_id, "")
                    if isinstance(last, BackendDown) and addr == last.address and self._down_at(addr) is not None:
                        continue  # not promoted yet: a frozen host would hold the call
                    proxy.__dict__[objmod._OWNER] = ref.backend_id
                    return self._call(proxy, request, payload, buffers)
                except (CallInterrupted, BackendUnavailable) as exc:
                    last = exc
            raise last from None

    def _reads(self, proxy, kind: int, name: str) -> bool:
        """Whether a call only reads: an attribute read or a @readonly method."""
        if kind == objmod.GET_ATTR:
            return True
        if kind != objmod.METHOD:
            return False
        fn = getattr(objmod.real_class(type(proxy)), name, None)
        return bool(getattr(fn, "__claypot_readonly__", False))

    def _call_replica(self, proxy, request: pb.CallRequest, payload, buffers):
        """Try a read on one of the object's replicas (round robin); _MISS if none answers."""
        # The replica set is cached on the proxy for a second: reads spread without a
        # directory question each.
        cached = proxy.__dict__.get(objmod._PREFIX + "replicas")
        if cached is None or time.monotonic() - cached[0] > 1.0:
            ref = self.resolve(object_id=request.object_id)
            cached = (time.monotonic(), list(ref.replicas))
            proxy.__dict__[objmod._PREFIX + "replicas"] = cached
        replicas = cached[1]
        if not replicas:
            return _MISS
        replica = replicas[next(self._round_robin) % len(replicas)]
        request.on_replica = True
        if payload:
            request.args.CopyFrom(wire.inline_value(payload, buffers))
        try:
            reply = self._on_owner(
                replica, lambda addr: self._rpc(addr, "Call", request, self.settings.call_timeout, True, request.name)
            )
            return self._result(reply, self.address_of(replica))
        except (ObjectNotFound, BackendUnavailable, CallInterrupted):
            proxy.__dict__.pop(objmod._PREFIX + "replicas", None)
            return _MISS  # not current there, or gone: the primary answers
        finally:
            request.on_replica = False
            request.ClearField("args")

    def encode_args(self, value: Any, backend_id: str) -> tuple[bytes, list]:
        """Pickle call arguments for a call on ``backend_id``: ``(payload, buffers)``.

        New StorageObjects among them are made persistent there first.
        """
        return self._dump_args(value, backend_id)

    def _dump_args(self, value, owner: str):
        """Pickle call arguments; new StorageObjects among them go to the callee's backend."""
        fresh: list = []

        def new_object(obj):
            fresh.append(obj)
            return self._persist_now(obj, owner)

        return dumps(value, PickleContext(new_object))

    def _persist_now(self, obj, backend: str) -> tuple[str, str, str]:
        self.make_persistent([obj], None, backend or None)
        return obj.getID(), obj.__dict__[objmod._KEY], obj.__dict__[objmod._OWNER]

    def _call(self, proxy, request: pb.CallRequest, payload: bytes, buffers: list, owner: str | None = None) -> Any:
        size = len(payload) + sum(memoryview(b).nbytes for b in buffers)
        timeout = self.settings.call_timeout + size / self.settings.stream_min_rate
        check_size(size, self.settings, request.name)
        if size <= self.settings.inline_limit:
            inline = wire.inline_value(payload, buffers) if payload else None
            # Same host, buffers of shm_min bytes or more: /dev/shm beats the
            # protobuf copies of an inline value (see README, Performance).
            by_shm = bool(buffers) and size >= self.settings.shm_min

            def send(addr):
                request.accept_shm = self._same_host(addr)
                request.reader_pid = os.getpid() if request.accept_shm else 0
                request.reader_pid_ns = shm.pid_namespace() if request.accept_shm else 0
                if by_shm and request.accept_shm:
                    reply = self._call_via_shm(addr, request, payload, buffers, timeout)
                    if reply is not None:
                        return reply
                if inline is not None:
                    request.args.CopyFrom(inline)
                return self._rpc(addr, "Call", request, timeout, True, request.name)
        else:
            value, blobs = wire.streamed_value(payload, buffers)
            request.args.CopyFrom(value)
            header = request.SerializeToString()

            def send(addr):
                if len(payload) <= self.settings.inline_limit and self._same_host(addr):
                    reply = self._call_via_shm(addr, request, payload, buffers, timeout)
                    if reply is not None:
                        return reply
                try:
                    return self._streams(addr).CallStream(
                        wire.chunk_stream(
                            header, blobs, self.settings.chunk_size, transfers.meter(size, f"{request.name} arguments")
                        ),
                        timeout=timeout,
                        metadata=tracing.metadata(self._metadata),
                    )
                except grpc.RpcError as err:
                    exc = translate(err, True, request.name)
                    if isinstance(exc, BackendUnavailable):
                        raise _NotRun(exc) from None
                    raise exc from None

        try:
            if proxy is None:
                reply = self._on_owner(owner, send)
                addr = self.address_of(owner)
            else:
                reply = self._with_relocation(proxy, send)
                addr = self.address_of(proxy.__dict__[objmod._OWNER])
        except (KeyboardInterrupt, DeadlineExceeded):
            # The caller gave up (Ctrl-C, or its deadline passed): stop the call
            # on the backend too, so it neither keeps running nor holds the lock.
            self.cancel_call(owner if proxy is None else proxy.__dict__.get(objmod._OWNER, ""), request.call_id)
            raise
        return self._result(reply, addr, (request.object_id, request.name) if request.kind == objmod.GET_ATTR else None)

    def _call_via_shm(
        self, addr: str, request: pb.CallRequest, payload: bytes, buffers: list, timeout: float
    ) -> pb.CallReply | None:
        """Send a call's argument buffers through /dev/shm; None when it cannot take them."""
        try:
            names = shm.export(buffers)
        except shm.Unavailable:
            return None  # /dev/shm full or missing: inline or stream instead
        try:
            request.accept_shm = True
            request.reader_pid = os.getpid()
            request.reader_pid_ns = shm.pid_namespace()
            request.args.CopyFrom(
                pb.Value(payload=payload, shm=names, buffer_sizes=[memoryview(b).nbytes for b in buffers])
            )
            return self._rpc(addr, "Call", request, timeout, True, request.name)
        finally:
            shm.discard(names)

    def cancel_call(self, backend_id: str, call_id: str) -> bool:
        """Ask a backend to stop the running call ``call_id``; True if it was running there.

        Best effort and quick (one attempt, a 2 s deadline): it runs on the way
        out of a KeyboardInterrupt or a deadline.
        """
        if not backend_id or not call_id:
            return False
        try:
            addr = self._addresses.get(backend_id) or self.address_of(backend_id)
            reply = self._stub(addr).Cancel(pb.CancelRequest(call_id=call_id), timeout=2.0, metadata=self._metadata)
            return reply.found
        except (grpc.RpcError, ClaypotError, ValueError):
            return False

    def _result(self, reply: pb.CallReply, address: str, reusable: tuple[str, str] | None = None) -> Any:
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)
        ctx = None
        if reply.result_handle:
            try:
                with tracing.client_span("stream result", bytes=reply.result_size):
                    chunks = self._streams(address).FetchResult(
                        pb.FetchRequest(result_handle=reply.result_handle),
                        timeout=self.settings.stream_deadline(reply.result_size),
                        metadata=tracing.metadata(self._metadata),
                    )
                    header, values = wire.receive_stream(
                        iter(chunks), pb.CallReply, _max_value_size(self.settings), progress="result"
                    )
            except grpc.RpcError as err:
                raise translate(err, True, "fetching a result") from None
            if header.HasField("error"):
                raise wire.error_from_pb(header.error)
            payload, buffers = values[0]
            return loads(payload, buffers, ctx)
        if not reply.result.payload:
            return None
        if reply.result.leases:
            views = self._leased(reply.result, address)
            value = loads(reply.result.payload, views, ctx)
            if reusable is not None and reply.version_table:
                # The backend lets this view be reused while the object is unchanged.
                self.read_cache.remember(
                    reusable,
                    reply.version_table,
                    reply.version_slot,
                    reply.version_word,
                    reply.version_pid,
                    reply.result.payload,
                    views,
                    list(reply.result.shm_offsets),
                )
            return value
        if reply.result.shm:
            buffers = shm.attach(list(reply.result.shm), list(reply.result.buffer_sizes))
            return loads(reply.result.payload, buffers, ctx)
        return loads(reply.result.payload, wire.writable(reply.result.buffers), ctx)

    def _leased(self, value: pb.Value, address: str) -> list[memoryview]:
        """Read-only views of a backend's segments, each holding its lease (store._client.leases)."""
        names, offsets = list(value.shm), list(value.shm_offsets)
        sizes, leases = list(value.buffer_sizes), list(value.leases)
        if not len(names) == len(offsets) == len(sizes) == len(leases):
            raise ProtocolError("leased segments, offsets, sizes and leases do not match")
        views = []
        try:
            for name, offset, size, lease in zip(names, offsets, sizes, leases):
                view = shm.map_readonly(name, offset, size)
                views.append(view)
                if size:
                    self.lease_returns.track(view, address, lease)
                else:
                    self._return_leases(address, [lease], 2.0)
        except BaseException:
            done = len(views)
            self._return_leases(address, leases[done:], 2.0)
            raise
        return views

    @functools.cached_property
    def read_cache(self) -> ReadCache:
        """Leased views reused while their objects stay unchanged (store._client.readcache)."""
        from store._client.readcache import ReadCache

        return ReadCache()

    @functools.cached_property
    def lease_returns(self) -> LeaseReturns:
        from store._client.leases import LeaseReturns

        return LeaseReturns(self._return_leases)

    def _return_leases(self, address: str, lease_ids: list[str], timeout: float):
        """Tell a backend these leases ended; returns its report of shared memory held."""
        reply = self._stub(address).Leases(
            pb.LeasesRequest(release=lease_ids), metadata=self._metadata, timeout=timeout
        )
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)
        return reply

    def shm_report(self, backend_id: str) -> dict:
        """Shared memory a same-host backend keeps for zero-copy reads, and its leases.

        Leases this process no longer needs are returned first, so the report
        counts only views still alive somewhere.
        """
        if "lease_returns" in self.__dict__:
            self.lease_returns.flush()
        reply = self._return_leases(self.address_of(backend_id), [], self.settings.admin_timeout)
        return {
            "segments": reply.segments,
            "segment_bytes": reply.segment_bytes,
            "leases": reply.leases,
            "leased_bytes": reply.leased_bytes,
            "stale_leased_bytes": reply.stale_leased_bytes,
            "limit": reply.limit,
            "relocations": reply.relocations,
            "pool_bytes": reply.pool_bytes,
            "pool_segments": reply.pool_segments,
        }

    def run_task(
        self,
        backend_id: str,
        code_key: str,
        args: tuple,
        kwargs: dict,
        mutates: list[str],
        timeout: float = 0.0,
        chain: str | None = None,
        task_key: str | None = None,
    ) -> Any:
        """Run a registered task function on a backend, returning its result.

        ``task_key`` names the task across its retries: a backend that already
        committed an attempt of it returns that result instead of applying the
        task again.
        """
        payload, buffers = self._dump_args((args, kwargs), backend_id)
        request = pb.CallRequest(
            kind=pb.TASK,
            name=code_key,
            chain_id=chain or uuid.uuid4().hex,
            call_id=task_key or uuid.uuid4().hex,
            mutates=mutates,
            timeout=timeout,
        )
        with tracing.client_span(f"task {code_key}", backend_id=backend_id, call_id=request.call_id):
            return self._call(None, request, payload, buffers, owner=backend_id)

    # -- aliases, backends, identity ------------------------------------------------------
    def _remember_proxy(self, object_id: str, proxy) -> None:
        try:
            self._proxies.setdefault(object_id, proxy)
        except TypeError:
            pass  # a class with __slots__ and no __weakref__: no identity map entry

    def add_alias(self, proxy: objmod.StorageObject, alias: str) -> None:
        """Give a persistent object one more alias (atomic in the directory; the owner
        also keeps it in the object's stored state, for repair)."""
        if not isinstance(alias, str) or not alias or "|" in alias:
            raise ValueError("an alias is a non-empty string without '|'")
        oid = proxy.getID()
        reply = self._with_relocation(
            proxy,
            lambda addr: self._rpc(
                addr,
                "AddAlias",
                pb.AliasRequest(alias=alias, object_id=oid),
                self.settings.admin_timeout,
                True,
                "add_alias",
            ),
        )
        if reply.HasField("error"):
            raise wire.error_from_pb(reply.error)

    def get_aliases(self, proxy: objmod.StorageObject) -> list[str]:
        """Every alias of a persistent object, oldest first."""
        return list(self.resolve(object_id=proxy.getID()).aliases)

    def get_backends(self) -> "OrderedDict[str, BackendHandle]":
        """The backends that are up, in the directory's order: id -> handle."""
        out: OrderedDict[str, BackendHandle] = OrderedDict()
        for b in self.backends():
            if b.up:
                out[b.backend_id] = BackendHandle(b.backend_id, b.address, b.host)
        return out


class BackendHandle:
    """One backend, as ``get_backends()`` names it: its id, address and host.

    Compares equal to (and hashes like) its id, so it can be passed wherever
    a backend id is expected.
    """

    __slots__ = ("id", "address", "host")

    def __init__(self, backend_id: str, address: str, host: str):
        self.id, self.address, self.host = backend_id, address, host

    def __eq__(self, other):
        if isinstance(other, BackendHandle):
            return self.id == other.id
        return self.id == other if isinstance(other, str) else NotImplemented

    def __hash__(self):
        return hash(self.id)

    def __str__(self):
        return self.id

    def __repr__(self):
        return f"<BackendHandle {self.id[:8]} at {self.address}>"


def _max_value_size(settings: Settings) -> int:
    return settings.max_value_bytes()


def check_size(size: int, settings: Settings, what: str) -> None:
    """Refuse a value over ``max_value_size`` before a byte of it is sent."""
    limit = settings.max_value_bytes()
    if limit and size > limit:
        raise ValueTooLarge(
            f"{what}: value of {size} bytes exceeds the limit of {limit} bytes (CLAYPOT_MAX_VALUE_SIZE)"
        )
