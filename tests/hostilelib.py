"""Set-up shared by the hostile test files (test_*_hostile.py): clusters of their own,
fixtures, and raw gRPC calls that go to one backend, past the client's routing and retry.

A hostile test owns its cluster: it kills, freezes and fills things, so nothing
it does may leak into the next test. :func:`own_cluster` starts one under the
test's ``tmp_path``; the fixtures ``rcluster`` and ``bigcluster``
(tests/conftest.py) are the replica-shaped ones.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from chaos import backend, wait_until
from replicalib import ENV as REPLICA_ENV
from store import LocalCluster
from store._client.client import CHANNEL_OPTIONS, TOKEN_HEADER
from store._wire.generated import claypot_pb2 as pb
from store._wire.generated import claypot_pb2_grpc as pb_grpc
from store._wire import serialization
from store._wire.serialization import _Pickler, dumps, loads

BIG_ENV = dict(REPLICA_ENV, CLAYPOT_BIG_OBJECT="65536")
"""Replica settings with a 64 KiB big-object threshold (write-behind for larger states)."""


@contextmanager
def own_cluster(
    tmp_path, backends: int = 1, durability: str = "none", env: dict | None = None, monkeypatch=None, **options
) -> Iterator[LocalCluster]:
    """A cluster for one test, its data under ``tmp_path / "c"``.

    ``env`` goes to the backends; with ``monkeypatch`` this process takes it
    too (a client must match the cluster's heartbeat settings to judge when a
    backend is down). ``options`` go to :class:`LocalCluster`.
    """
    if env and monkeypatch is not None:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    if env:
        options["backend_env"] = env
    with LocalCluster(backends=backends, data_dir=str(tmp_path / "c"), durability=durability, **options) as c:
        yield c


def backend_pid(cluster: LocalCluster, backend_id: str) -> int:
    """The PID of a backend, by id."""
    return backend(cluster, backend_id).pid


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (which is returned)."""
    return wait_until(predicate, timeout, what=what)


# -- raw calls to one backend ---------------------------------------------------------------


@contextmanager
def raw_stub(address: str) -> Iterator[pb_grpc.BackendStub]:
    """A Backend stub on a channel of its own, closed afterwards."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        yield pb_grpc.BackendStub(channel)
    finally:
        channel.close()


def raw_call(cluster: LocalCluster, address: str, object_id: str, name: str, args, call_id: str, timeout: float = 30):
    """One method Call straight to one backend: its result, or the reply's pb.Error."""
    payload, buffers = dumps((args, {}))
    with raw_stub(address) as stub:
        reply = stub.Call(
            pb.CallRequest(
                object_id=object_id,
                kind=pb.METHOD,
                name=name,
                chain_id=call_id,
                call_id=call_id,
                args=pb.Value(payload=payload, buffers=buffers),
            ),
            timeout=timeout,
            metadata=((TOKEN_HEADER, cluster.token),),
            wait_for_ready=True,
        )
    if reply.HasField("error"):
        return reply.error
    if not reply.HasField("result"):
        return None
    return loads(reply.result.payload, list(reply.result.buffers))


def raw_get_attr(cluster: LocalCluster, address: str, object_id: str, name: str):
    """One attribute read straight to one backend: the value, the pb.Error, or the RpcError."""
    with raw_stub(address) as stub:
        try:
            reply = stub.Call(
                pb.CallRequest(object_id=object_id, kind=pb.GET_ATTR, name=name, chain_id="probe", call_id=""),
                timeout=5,
                metadata=((TOKEN_HEADER, cluster.token),),
            )
        except grpc.RpcError as exc:
            return exc
    if reply.HasField("error"):
        return reply.error
    return loads(reply.result.payload, list(reply.result.buffers))


def raw_delete(cluster: LocalCluster, address: str, object_id: str, timeout: float = 30):
    """One Delete straight to one backend: None, or the reply's pb.Error."""
    with raw_stub(address) as stub:
        reply = stub.Delete(
            pb.DeleteRequest(object_id=object_id, chain_id="hostile-delete"),
            timeout=timeout,
            metadata=((TOKEN_HEADER, cluster.token),),
        )
    return reply.error if reply.HasField("error") else None


def full_pickle(value) -> tuple[bytes, list]:
    """What ``dumps`` gives through cloudpickle's pickler: the stream and its out-of-band
    buffers (the reference plain values taking the C pickler must match)."""
    buffers: list = []

    def out_of_band(buf):
        if buf.raw().nbytes >= serialization.OUT_OF_BAND_MIN:
            buffers.append(buf)
            return False
        return True

    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=out_of_band).dump(value)
    return out.getvalue(), buffers
