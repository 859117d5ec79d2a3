"""Replicas on a backend: shipping states, holding copies, failover and repair.

The rules are in the pure :mod:`.replication`; this module does the I/O:

- As a **primary**, :meth:`Replicator.replicate` (the heap's hook, called
  under the object's lock before a new state is logged) sends the state with
  its epoch, an LSN and the object's recent call ids to every replica, in
  parallel, each with a deadline. The call is acknowledged only if they all
  accepted it; an unreachable replica is dropped from the set by a
  compare-and-set in the directory first (if the directory cannot be reached
  either, the call fails and is rolled back); a replica that knows a higher
  epoch means this backend was deposed: the call fails with ``ObjectMoved``.
  Changing calls and reads of a replicated object are served only while the
  backend's heartbeat lease holds (it is renewed with each heartbeat, and
  expires before the directory's key does; after a gap, only once the
  directory confirms the ownership), so a primary cut off from the
  directory stops serving before any replica can be promoted. A deposed
  primary is fenced: nothing more of that object is served or acknowledged.
- As a **replica**, :meth:`Replicator.apply` keeps the newest state per
  object in memory and in an append-only log, ``<data_dir>/replicas/copies.log``
  (fdatasync'd under ``sync``, concurrent appends sharing one sync; rewritten
  compactly once it outgrows its live contents), and refuses states from an
  older epoch. Replicas never run changing methods;
  read-only calls that ask for it run on a private instance built from the
  copy.
- A **monitor** thread, every heartbeat interval: replicas whose primary's
  heartbeat expired try to take over (compare-and-set epoch + 1: at most one
  wins), install the copy as a live object and push their state to the other
  replicas; primaries that learn the directory names another owner step down
  (drop their copy); primaries whose set is short of its factor (a replica
  lost) make a new replica on another host, in the background.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
import logging
import os
import pickle
import struct
import threading
import zlib
import time
import uuid

import grpc

from store._model import objects as objmod
from store.errors import BackendUnavailable, ClaypotError, ConfigurationError, ObjectMoved, ProtocolError
from store._wire.generated import claypot_pb2 as pb
from store._wire.serialization import dumps, loads
from store.backend._core import replication as rp
from store.backend._core.replication import Copy, ReplicaSet, ShipOutcome, Verdict
from store.backend._storage.storage import atomic_write

log = logging.getLogger("claypot.replicas")

_NOT_KEPT_SIZE = 2**63 - 1  # marks a call whose result was not kept (see heap)
_LEASE_SHARE = 0.8  # of the heartbeat TTL: a primary's lease ends before its key expires
_HEAD = struct.Struct("<II")  # record length, crc32 of the record
_COMPACT_MIN = 16 * 1024 * 1024  # log bytes before a compaction is considered
_WIPE_GRACE = 4  # heartbeat TTLs a replica keeps a copy whose set vanished (directory wipe)


class ReplicaLog:
    """The replica copies of one backend, durable: an append-only, checksummed log.

    Records are ``("put", Copy)`` and ``("drop", object_id)``; loading replays
    them in order (a torn tail, from a kill mid-append, is cut off). Appends to
    one object happen under that object's lock, so the log order is the order
    its states were accepted in. Under ``durable``, an append returns once it
    is fdatasync'd; appends that arrive during a sync share the next one.
    """

    def __init__(self, root: str, durable: bool):
        self.path = os.path.join(root, "copies.log")
        self.durable = durable
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._written = self._synced = 0
        self._fd = -1
        self.size = 0

    def load(self) -> dict[str, Copy]:
        """The copies in the log; then it is open for appends (a torn tail cut off)."""
        copies, pos, total = self.read()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        if pos < total:
            log.warning("replica log %s: torn tail of %d bytes cut", self.path, total - pos)
        os.ftruncate(self._fd, pos)
        os.lseek(self._fd, pos, os.SEEK_SET)
        self.size = pos
        return copies

    def read(self) -> tuple[dict[str, Copy], int, int]:
        """(copies, bytes of whole records, file size), changing nothing."""
        copies: dict[str, Copy] = {}
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        pos = 0
        while pos + _HEAD.size <= len(data):
            n, crc = _HEAD.unpack_from(data, pos)
            body = data[pos + _HEAD.size : pos + _HEAD.size + n]
            if len(body) < n or zlib.crc32(body) != crc:
                break
            item = pickle.loads(body)
            if item[0] == "put":
                copies[item[1].object_id] = item[1]
            else:
                copies.pop(item[1], None)
            pos += _HEAD.size + n
        return copies, pos, len(data)

    def append(self, item: tuple, then: Callable[[], None] | None = None) -> None:
        """Append ``item``; ``then()`` runs under the log's lock once it is written."""
        body = pickle.dumps(item, protocol=5)
        record = _HEAD.pack(len(body), zlib.crc32(body)) + body
        with self._lock:
            view = memoryview(record)
            while view:
                view = view[os.write(self._fd, view) :]
            self.size += len(record)
            self._written += 1
            seq = self._written
            if then is not None:
                then()
        if self.durable:
            self._sync(seq)

    def _sync(self, seq: int) -> None:
        if self._synced >= seq:
            return
        with self._sync_lock:
            if self._synced >= seq:
                return
            target = self._written
            os.fdatasync(self._fd)
            self._synced = target

    def compact(self, copies: dict[str, Copy]) -> bool:
        """Rewrite the log as one record per copy when it has grown well past them."""
        with self._lock:
            live = sum(len(c.payload) + sum(len(b) for b in c.buffers) for c in copies.values())
            if self.size < max(_COMPACT_MIN, 4 * live):
                return False
            parts = []
            for c in list(copies.values()):
                body = pickle.dumps(("put", c), protocol=5)
                parts.append(_HEAD.pack(len(body), zlib.crc32(body)) + body)
            atomic_write(self.path, parts)
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY, 0o600)
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
            self._synced = self._written
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _result_value(result: tuple) -> pb.Value:
    """A ledger entry on the wire; a result that was not kept travels as buffer_sizes [-1]."""
    if result[0] is None:
        return pb.Value(buffer_sizes=[_NOT_KEPT_SIZE])
    return pb.Value(payload=result[0], buffers=result[1])


def _result_of(value: pb.Value) -> tuple:
    if list(value.buffer_sizes) == [_NOT_KEPT_SIZE]:
        return (None, [])
    return (bytes(value.payload), [bytes(b) for b in value.buffers])


class Replicator:
    """One backend's part in replication (see the module docstring)."""

    def __init__(self, backend):
        self.b = backend
        self.heap = backend.heap
        self.directory = backend.directory
        self.settings = backend.settings
        self.me = backend.backend_id
        self.root = os.path.join(self.settings.data_dir, "replicas")
        os.makedirs(self.root, exist_ok=True)
        self.sets: dict[str, ReplicaSet] = {}  # objects this backend is primary of
        # Objects this backend was primary of until it learnt it was deposed -> the owner it
        # was told of: fenced (no change, read or delete served) until it is promoted again.
        self.deposed: dict[str, str] = {}
        self._creating: dict[str, threading.Event] = {}  # published, replica set not yet
        self.copies: dict[str, Copy] = {}  # replicas held here
        self.confirmed: dict[str, float] = {}  # oid -> when the copy was last known current
        self.received: dict[str, float] = {}  # oid -> when a state last arrived
        self._set_seen: dict[str, float] = {}  # oid -> when its replica set was last read
        self._locks: dict[str, threading.Lock] = {}
        self._mu = threading.Lock()
        self._instances: dict[str, tuple[int, int, object]] = {}  # replica-read instances
        self.lease_until = 0.0
        self.failovers = 0
        self.repairs = 0
        self.ship_timeout = max(1.0, self.settings.heartbeat_ttl)
        # A send unanswered this long starts a ping of its replica (answered this fast).
        self._probe_after = self.ship_timeout / 4
        self._suspect: dict[str, float] = {}  # backend id -> suspect until (monotonic)
        self._probes: dict[str, threading.Lock] = {}
        self.log = ReplicaLog(self.root, self.settings.durability == "sync")

    # -- start ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load the copies kept here and the sets of objects this backend is primary of."""
        self.copies.update(self.log.load())
        for oid, rset in self.directory.all_replica_sets().items():
            if rset.primary == self.me and self.heap.has(oid):
                self.sets[oid] = rset
        self.heap.replicate = self.replicate

    def renewed(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` (monotonic) was stored: extend the lease.

        If the lease had lapsed, the heartbeat key may have expired meanwhile and a
        replica taken over: the lease is extended only once the directory, read after
        this heartbeat was stored, still names this backend primary of each object
        (those it does not are deposed first). A promotion needs the old primary's
        key gone, so none can slip in after that read while the lease runs.
        """
        if time.monotonic() > self.lease_until and self.sets:
            self._confirm_owned()
        self.lease_until = max(self.lease_until, sent_at + self.settings.heartbeat_ttl * _LEASE_SHARE)

    def _confirm_owned(self) -> None:
        oids = list(self.sets)
        owners = self.directory.lookup_many(oids)
        sets = self.directory.replica_sets(oids)
        for oid, entry, rset in zip(oids, owners, sets):
            mine = self.sets.get(oid)
            if mine is None or entry is None or rset is None:
                continue  # deleted, or a wiped directory: the monitor sorts it out
            if entry.backend_id != self.me or rset.primary != self.me or rset.epoch > mine.epoch:
                self._deposed(oid)

    def _lock(self, object_id: str) -> threading.Lock:
        with self._mu:
            lock = self._locks.get(object_id)
            if lock is None:
                lock = self._locks[object_id] = threading.Lock()
            return lock

    # -- primary side --------------------------------------------------------------------
    def check_serving(self, object_id: str) -> None:
        """Refuse a call on a replicated object while this backend holds no lease, or
        on one it was deposed from."""
        gate = self._creating.get(object_id)
        if gate is not None and not gate.wait(2 * self.ship_timeout):
            raise BackendUnavailable(f"object {object_id} is still getting its replicas: retry")
        owner = self.deposed.get(object_id)
        if owner is not None:
            raise ObjectMoved(
                f"object {object_id} failed over to {owner[:8]}: this backend is no longer its primary", owner
            )
        if object_id in self.sets and time.monotonic() > self.lease_until:
            raise BackendUnavailable(
                f"backend {self.me[:8]} cannot confirm it is still the primary of "
                f"{object_id} (no heartbeat stored for {self.settings.heartbeat_ttl:g}s): "
                f"retry, the object may be failing over"
            )

    def replicate(self, entry: Any, payload: bytes, buffers: list, call: Any) -> None:
        """The heap's hook: send a new state to every replica before it is acknowledged."""
        oid = entry.object_id
        rset = self.sets.get(oid)
        if rset is None:
            self.check_serving(oid)  # deposed: a change finishing now is never acknowledged
            return
        self.check_serving(oid)
        if not rset.replicas:
            return  # every replica was dropped (the directory agrees): repair adds one
        calls = self.heap.calls.recent(oid)
        if call is not None:
            calls.append((call[0], call[2]))
        request = self._request(oid, rset.epoch, entry.class_key, entry.alias, payload, buffers, calls)
        accepted, refused = self._ship(rset.replicas, request)
        outcome, new = rp.after_ship(rset, accepted, refused)
        if outcome is ShipOutcome.ACK:
            return
        if outcome is ShipOutcome.DEPOSED:
            raise self._deposed(oid)
        # Some replicas are unreachable: acknowledge without them only once the directory
        # agrees they are out (a CAS on our epoch); unreachable directory -> the call fails.
        try:
            ok = self.directory.replace_replica_set(oid, rset.epoch, self.me, new)
        except ClaypotError as exc:
            raise BackendUnavailable(
                f"object {oid}: replica(s) {', '.join(r[:8] for r in rset.replicas if r not in accepted)} "
                f"unreachable and the directory too ({exc}): the change was rolled back"
            ) from None
        if not ok:
            raise self._deposed(oid)
        log.warning(
            "object %s: dropped unreachable replica(s) %s (epoch %d)",
            oid,
            [r[:8] for r in rset.replicas if r not in accepted],
            new.epoch,
        )
        self.sets[oid] = new

    def _deposed(self, object_id: str) -> ObjectMoved:
        """This backend is no longer the object's primary: stop acting as one."""
        # Fenced before it leaves the sets: a change finishing in between must not be
        # taken for one of an object that is not replicated.
        self.deposed[object_id] = ""
        self.sets.pop(object_id, None)
        try:
            owner = self.directory.lookup(object_id).backend_id
        except ClaypotError:
            owner = ""
        self.deposed[object_id] = owner
        log.warning("object %s: deposed (the directory names %s): stepping down", object_id, owner[:8])
        threading.Thread(target=self._step_down, args=(object_id,), daemon=True).start()
        return ObjectMoved(f"object {object_id} failed over to {owner[:8]}; its change here was not applied", owner)

    def _step_down(self, object_id: str) -> None:
        try:
            if self.heap.has(object_id) and object_id not in self.sets:
                self.heap.delete(object_id, forget=False)
        except ClaypotError as exc:
            log.warning("object %s: stale primary copy not dropped: %s", object_id, exc)

    def _request(
        self, oid: str, epoch: int, class_key: str, alias: str, payload, buffers, calls
    ) -> pb.ReplicateRequest:
        return pb.ReplicateRequest(
            object_id=oid,
            primary_id=self.me,
            epoch=epoch,
            lsn=self.b.storage.next_lsn(),
            class_key=class_key,
            alias=alias,
            state=pb.Value(payload=bytes(payload), buffers=[bytes(memoryview(b)) for b in buffers]),
            calls=[pb.ReplicatedCall(call_id=c, result=_result_value(r)) for c, r in calls],
        )

    def _ship(self, replicas, request) -> tuple[set[str], set[str]]:
        """Send ``request`` to each replica at once; (accepted, refused with a higher epoch).

        The sends are gRPC futures (no thread each). A replica that answers nothing
        for a while is pinged once (one probe per replica at a time); if the ping
        goes unanswered too, or a send times out, the replica is *suspect*: every
        send to it waiting now or made in the next ship timeout gives up at once,
        so one frozen replica holds the calls of the objects it replicates for about
        half the ship timeout, not one ship timeout each, and other objects' not at all.
        """
        pending = {}
        for r in replicas:
            if self._suspect_now(r):
                log.warning("replica %s of %s suspect (unresponsive): not waited for", r[:8], request.object_id)
                continue
            try:
                addr = self.b.client.address_of(r)
                pending[r] = self.b.client._stub(addr).Replicate.future(
                    request, timeout=self.ship_timeout, metadata=self.b.client._metadata
                )
            except (grpc.RpcError, ClaypotError, ValueError) as exc:
                log.warning("replica %s of %s unreachable: %s", r[:8], request.object_id, exc)
        accepted, refused = set(), set()
        for r, fut in pending.items():
            try:
                reply = self._await(r, fut)
            except (grpc.RpcError, ClaypotError, ValueError) as exc:
                log.warning(
                    "replica %s of %s unreachable: %s",
                    r[:8],
                    request.object_id,
                    exc.details() if isinstance(exc, grpc.RpcError) else exc,
                )
                continue
            if reply.epoch > request.epoch:
                refused.add(r)
            elif not reply.HasField("error"):
                accepted.add(r)
            else:
                log.warning("replica %s refused %s: %s", r[:8], request.object_id, reply.error.message)
        return accepted, refused

    def _suspect_now(self, backend_id: str) -> bool:
        return self._suspect.get(backend_id, 0.0) > time.monotonic()

    def _await(self, backend_id: str, fut):
        """The reply of one send (raises what it raised); gives up once the replica is
        suspect (see _ship)."""
        while True:
            try:
                reply = fut.result(timeout=self._probe_after)
                self._suspect.pop(backend_id, None)
                return reply
            except grpc.FutureTimeoutError:
                pass
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    self._suspect[backend_id] = time.monotonic() + self.ship_timeout
                raise
            if self._suspect_now(backend_id) or not self._probe(backend_id):
                fut.cancel()
                raise BackendUnavailable(f"replica {backend_id[:8]} does not answer")

    def _probe(self, backend_id: str) -> bool:
        """Whether the replica answers a ping (False marks it suspect). Only one probe per
        replica runs at a time; other waiters keep waiting meanwhile."""
        with self._mu:
            probe = self._probes.get(backend_id)
            if probe is None:
                probe = self._probes[backend_id] = threading.Lock()
        if not probe.acquire(blocking=False):
            return True
        try:
            if self._suspect_now(backend_id):
                return False
            try:
                addr = self.b.client.address_of(backend_id)
                self.b.client._stub(addr).Ping(
                    pb.PingRequest(), timeout=self._probe_after, metadata=self.b.client._metadata
                )
                return True
            except (grpc.RpcError, ClaypotError, ValueError):
                self._suspect[backend_id] = time.monotonic() + self.ship_timeout
                log.warning("replica %s does not answer a ping: suspect", backend_id[:8])
                return False
        finally:
            probe.release()

    def create(self, items: list[tuple[str, str, object, list, str]], factor: int, publish: Callable[[], None]) -> None:
        """Persist new objects here with ``factor`` replicas each.

        The replicas take the state first; then ``publish()`` persists the objects
        here and claims them in the directory, and their replica sets are written.
        Until those are written a call to one of them waits (it is served
        replicated or not at all), so no change is ever acknowledged before the
        replicas exist; if they cannot be made, nothing was published (or the
        objects go again). Raises ConfigurationError (before anything is sent) when
        fewer than ``factor`` other backends are up.
        """
        targets = self._targets(factor, ())
        if len(targets) < factor:
            raise ConfigurationError(f"replicas={factor} needs {factor} other backend(s) up; {len(targets)} available")
        rsets = {}
        for oid, key, payload, buffers, alias in items:
            rset = ReplicaSet(1, self.me, tuple(targets), factor)
            request = self._request(oid, 1, key, alias, payload, buffers, [])
            accepted, refused = self._ship(rset.replicas, request)
            if accepted != set(targets):
                raise BackendUnavailable(f"object {oid}: replica(s) did not take its state")
            rsets[oid] = rset
        gate = threading.Event()
        for oid in rsets:
            self._creating[oid] = gate
        published = False
        try:
            publish()
            published = True
            for oid, rset in rsets.items():
                if not self.directory.replace_replica_set(oid, 0, self.me, rset):
                    raise ProtocolError(f"object {oid} already has a replica set")
                self.sets[oid] = rset
                self.deposed.pop(oid, None)
        except BaseException:
            for oid in rsets:
                self.sets.pop(oid, None)
                if published:
                    try:
                        self.heap.delete(oid)
                    except ClaypotError:
                        pass
            raise
        finally:
            for oid in rsets:
                self._creating.pop(oid, None)
            gate.set()

    def _targets(self, n: int, taken: tuple[str, ...]) -> list[str]:
        ups = [b for b in self.directory.backends() if b["up"] and not self._suspect_now(b["backend_id"])]
        hosts = {b["backend_id"]: b.get("host_id", "") for b in ups}
        hosts.setdefault(self.me, self.b.host_id)
        # Fewest objects first: spreads replicas over the cluster.
        cands = [(b["backend_id"], b.get("host_id", "")) for b in sorted(ups, key=lambda b: b.get("objects", 0))]
        return rp.choose_targets(n, self.me, taken, cands, hosts)

    def add(self, object_id: str, backend_id: str = "") -> str:
        """One more replica of an object held here (its factor grows by one); returns where.

        ``backend_id`` names the backend; empty: one is chosen, other hosts first.
        """
        self.check_serving(object_id)
        entry = self.heap._acquire(object_id, "replicas:" + uuid.uuid4().hex)
        try:
            rset = self.sets.get(object_id) or ReplicaSet(0, self.me, (), 0)
            if backend_id:
                if backend_id == self.me or backend_id in rset.replicas:
                    raise ConfigurationError(f"backend {backend_id[:8]} already holds object {object_id}")
                target = backend_id
            else:
                found = self._targets(1, rset.replicas)
                if not found:
                    raise ConfigurationError(f"no other backend is up to hold a replica of {object_id}")
                target = found[0]
            payload, buffers = dumps(entry.obj.__getstate__(), self.heap.pickle_context("replicas"))
            request = self._request(
                object_id,
                rset.epoch + 1,
                entry.class_key,
                entry.alias,
                payload,
                buffers,
                self.heap.calls.recent(object_id),
            )
            accepted, refused = self._ship((target,), request)
            if refused:
                raise self._deposed(object_id)
            if target not in accepted:
                raise BackendUnavailable(f"backend {target[:8]} did not take a replica of {object_id}")
            new = ReplicaSet(rset.epoch + 1, self.me, rset.replicas + (target,), rset.target + 1)
            if not self.directory.replace_replica_set(object_id, rset.epoch, self.me, new):
                raise self._deposed(object_id)
            self.sets[object_id] = new
            return target
        finally:
            entry.lock.release()

    def deleted(self, object_id: str) -> None:
        """The object was deleted here: its replicas drop their copies (best effort)."""
        rset = self.sets.pop(object_id, None)
        self.heap.calls.forget(object_id)
        if rset is not None:
            # The directory entry goes only while it names this backend (a compare-and-set):
            # if another backend owns the object now, the delete was not applied there.
            try:
                owner = self.directory.lookup(object_id).backend_id
            except ClaypotError:
                owner = ""
            if owner and owner != self.me:
                self.deposed[object_id] = owner
                raise ObjectMoved(f"object {object_id} failed over to {owner[:8]}; it was not deleted there", owner)
        if rset and rset.replicas:
            self._ship(
                rset.replicas,
                pb.ReplicateRequest(
                    object_id=object_id,
                    primary_id=self.me,
                    epoch=rset.epoch,
                    lsn=self.b.storage.next_lsn(),
                    deleted=True,
                ),
            )

    def replicated(self, object_id: str) -> bool:
        return object_id in self.sets or object_id in self.copies

    # -- replica side --------------------------------------------------------------------
    def apply(self, request: pb.ReplicateRequest) -> pb.ReplicateResponse:
        """Take a state from a primary, or refuse it with the higher epoch known here."""
        oid = request.object_id
        with self._lock(oid):
            mine = self.sets.get(oid)
            if mine is not None and request.primary_id != self.me:
                if request.epoch <= mine.epoch:
                    return pb.ReplicateResponse(epoch=mine.epoch)
                self._deposed(oid)  # a later epoch than ours: we were deposed
            copy = self.copies.get(oid)
            held = (copy.epoch, copy.lsn) if copy is not None else (0, 0)
            v = rp.verdict(held[0], held[1], request.epoch, request.lsn)
            if v is Verdict.STALE:
                return pb.ReplicateResponse(epoch=held[0])
            if v is Verdict.APPLY:
                if request.deleted:
                    self._drop_copy(oid)
                else:
                    copy = Copy(
                        oid,
                        request.primary_id,
                        request.epoch,
                        request.lsn,
                        request.class_key,
                        request.alias,
                        bytes(request.state.payload),
                        [bytes(b) for b in request.state.buffers],
                        [(c.call_id, *_result_of(c.result)) for c in request.calls],
                    )
                    self.log.append(("put", copy), lambda: self.copies.__setitem__(oid, copy))
            self.confirmed[oid] = self.received[oid] = time.monotonic()
            return pb.ReplicateResponse(epoch=request.epoch)

    def _drop_copy(self, object_id: str) -> None:
        self._set_seen.pop(object_id, None)
        self.confirmed.pop(object_id, None)
        self.received.pop(object_id, None)
        self._instances.pop(object_id, None)
        if object_id in self.copies:
            self.log.append(("drop", object_id), lambda: self.copies.pop(object_id, None))

    def has_copy(self, object_id: str) -> bool:
        return object_id in self.copies

    def read(self, object_id: str, kind: int, name: str, args: tuple, kwargs: dict) -> Any:
        """Run a read-only call on this replica's copy (a private instance of it).

        The copy must have been confirmed current within the staleness bound
        (``heartbeat_ttl``); otherwise the caller is sent to the primary.
        """
        copy = self.copies.get(object_id)
        seen = self.confirmed.get(object_id, 0.0)
        if copy is None or time.monotonic() - seen > self.settings.heartbeat_ttl:
            owner = copy.primary if copy is not None else ""
            raise ObjectMoved(f"replica of {object_id} here is not known current: ask the primary", owner)
        hit = self._instances.get(object_id)
        if hit is None or hit[:2] != (copy.epoch, copy.lsn):
            cls = self.heap.code.get(copy.class_key)
            obj = cls.__new__(cls)
            obj.__setstate__(loads(copy.payload, copy.buffers, self.heap.unpickle_context()))
            objmod.attach_identity(obj, object_id, copy.class_key, copy.primary)
            hit = (copy.epoch, copy.lsn, obj)
            self._instances[object_id] = hit
        obj = hit[2]
        if kind == objmod.GET_ATTR:
            return getattr(obj, name)
        fn = getattr(obj, name)
        if kind != objmod.METHOD or not getattr(fn, "__claypot_readonly__", False):
            raise ProtocolError(f"{name} is not a @readonly method: replicas run read-only calls only")
        return fn(*args, **kwargs)

    # -- monitor: failover, step-down, repair ---------------------------------------------
    def monitor_once(self) -> None:
        """One round of the monitor (see the module docstring)."""
        if not (self.copies or self.sets):
            return  # nothing replicated here: no directory traffic
        ups = {b["backend_id"]: b for b in self.directory.backends()}
        self._watch_primaries(ups)
        self._check_own(ups)
        self.log.compact(self.copies)

    def _watch_primaries(self, ups: dict) -> None:
        oids = list(self.copies)
        if not oids:
            return
        now = time.monotonic()
        for oid, rset in zip(oids, self.directory.replica_sets(oids)):
            copy = self.copies.get(oid)
            if copy is None:
                continue
            if rset is not None:
                self._set_seen[oid] = now
            if rset is None or (self.me not in rset.replicas and rset.primary != self.me):
                # Deleted, or dropped from the set: not ours to keep. But a copy newer than
                # the set read (or just received) may be one whose set is being written now,
                # and a set missing for a short while may be one a wiped directory lost:
                # its primary puts it back.
                with self._lock(oid):
                    copy = self.copies.get(oid)
                    fresh = copy is not None and (
                        (rset is not None and copy.epoch > rset.epoch)
                        or now - self.received.get(oid, 0.0) < 2 * self.ship_timeout
                        or (
                            rset is None
                            and now - self._set_seen.setdefault(oid, now) < _WIPE_GRACE * self.settings.heartbeat_ttl
                        )
                    )
                    if copy is not None and not fresh:
                        self._drop_copy(oid)
                continue
            if rset.primary == self.me:
                continue
            primary_up = bool(ups.get(rset.primary, {}).get("up"))
            if primary_up:
                if copy.epoch == rset.epoch:
                    self.confirmed[oid] = now
                continue
            if rp.can_promote(rset, self.me, primary_up, True):
                try:
                    self.promote(oid, rset)
                except Exception as exc:
                    log.warning("object %s: promotion failed: %s", oid, exc)

    def promote(self, object_id: str, rset: ReplicaSet) -> bool:
        """Take over a replicated object whose primary is lost; True if this backend won."""
        with self._lock(object_id):
            copy = self.copies.get(object_id)
            if copy is None:
                return False
            new = rp.promoted(rset, self.me)
            self.heap.calls.seed(object_id, copy.calls)
            # The copy becomes a live object first, unverified: until the directory names
            # this backend, a call reaching it is sent to the owner the directory names.
            self.heap.persist([(object_id, copy.class_key, copy.payload, copy.buffers, copy.alias)], adopt=True)
            try:
                won = self.directory.replace_replica_set(object_id, rset.epoch, rset.primary, new)
            except ClaypotError:
                won = False
            if not won:
                self.heap.delete(object_id, forget=False)
                return False
            self.sets[object_id] = new
            self.deposed.pop(object_id, None)
            self._drop_copy(object_id)
            self.failovers += 1
        log.warning(
            "object %s: promoted to primary (epoch %d) after backend %s was lost",
            object_id,
            new.epoch,
            rset.primary[:8],
        )
        # The other replicas learn the new epoch now (and drop any state the old primary
        # sent them without acknowledging it).
        if new.replicas:
            self._resync(object_id, (), push=True)
        return True

    def _check_own(self, ups: dict) -> None:
        oids = list(self.sets)
        if not oids:
            return
        owners = self.directory.lookup_many(oids)
        sets = self.directory.replica_sets(oids)
        for oid, entry, rset in zip(oids, owners, sets):
            mine = self.sets.get(oid)
            if mine is None:
                continue
            if entry is None or rset is None:
                if not self.heap.has(oid):
                    self.sets.pop(oid, None)  # deleted
                elif entry is not None and entry.backend_id == self.me:
                    # The directory was wiped and this backend republished the object:
                    # put its replica set back (from "none", with the epoch known here).
                    if self.directory.replace_replica_set(oid, 0, self.me, mine):
                        log.warning("object %s: replica set put back in the directory (epoch %d)", oid, mine.epoch)
                continue  # (no entry yet: the republish after a wipe comes first)
            if entry.backend_id != self.me or rset.epoch > mine.epoch and rset.primary != self.me:
                self._deposed(oid)
                continue
            dead = tuple(r for r in mine.replicas if not ups.get(r, {}).get("up"))
            if dead or mine.missing:
                try:
                    self._resync(oid, dead)
                except Exception as exc:
                    log.warning("object %s: repair failed: %s", oid, exc)

    def _resync(self, object_id: str, dead: tuple[str, ...], push: bool = False) -> None:
        """Under the object's lock: drop ``dead`` replicas, add new ones up to the factor,
        and send the current state to all of them with the next epoch (nothing when there
        is nothing to change, unless ``push``)."""
        entry = self.heap._acquire(object_id, "replicas:" + uuid.uuid4().hex)
        try:
            rset = self.sets.get(object_id)
            if rset is None:
                return
            kept = tuple(r for r in rset.replicas if r not in dead)
            fresh = self._targets(rset.target - len(kept), kept) if rset.target > len(kept) else []
            if not (dead or fresh or push):
                return
            payload, buffers = dumps(entry.obj.__getstate__(), self.heap.pickle_context("replicas"))
            request = self._request(
                object_id,
                rset.epoch + 1,
                entry.class_key,
                entry.alias,
                payload,
                buffers,
                self.heap.calls.recent(object_id),
            )
            accepted, refused = self._ship(kept + tuple(fresh), request)
            if refused:
                raise self._deposed(object_id)
            new = rp.resized(rset, tuple(r for r in kept + tuple(fresh) if r in accepted))
            if not self.directory.replace_replica_set(object_id, rset.epoch, self.me, new):
                raise self._deposed(object_id)
            self.sets[object_id] = new
            added = [r for r in new.replicas if r not in rset.replicas]
            if added:
                self.repairs += 1
                log.warning("object %s: new replica(s) %s (epoch %d)", object_id, [r[:8] for r in added], new.epoch)
        finally:
            entry.lock.release()

    def stats(self) -> dict:
        return {
            "primary_of": len(self.sets),
            "replicas_held": len(self.copies),
            "failovers": self.failovers,
            "repairs": self.repairs,
        }

    def close(self) -> None:
        self.log.close()


__all__ = ["Replicator"]
