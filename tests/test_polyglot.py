"""The cross-language surface, seen from a bare gRPC client (the generated stubs).

Health checking answers without a token and says only SERVING / NOT_SERVING;
reflection lists the API behind the token; typed arrays travel as dtype,
shape and raw bytes (inline and chunked, both directions); CreateObject and
DeleteObject work on classes the cluster knows; failures are gRPC status codes
with the error code in trailing metadata, as the README's table says.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import store
from store import StorageObject
from store._wire import polyglot
from store._wire.generated import claypot_pb2 as pb
from store._wire.generated import claypot_pb2_grpc as pb_grpc

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


class Grid(StorageObject):
    """Defined here: the backends get its code by value."""

    def __init__(self, n=4, label="grid"):
        self.label = label
        self.values = np.arange(n, dtype=np.float64)
        self.wide = np.zeros((3, 5), dtype=">i4")
        self.fortran = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))

    def scaled(self, factor, offset=0.0):
        return self.values * factor + offset

    def total(self):
        return float(self.values.sum())

    def boom(self):
        raise KeyError("no such cell")


def _address(backend_id: str) -> str:
    return next(b.address for b in store.backends() if b.backend_id == backend_id)


@pytest.fixture(scope="module")
def stub(cluster):
    # The first backend is the gateway; objects live on the second unless said otherwise.
    with grpc.insecure_channel(
        _address(cluster.backends[0]), options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as ch:
        yield pb_grpc.BackendStub(ch), [("claypot-token", cluster.token)], ch


def _get(stub, request, **kw):
    s, md, _ = stub
    parts = list(s.GetArray(request, metadata=md, timeout=60, **kw))
    header = parts[0]
    assert header.WhichOneof("part") == "array"
    data = header.array.data if not header.array.chunked else b"".join(p.data for p in parts[1:])
    return header.array, parts, data


def _failure(call) -> tuple[grpc.StatusCode, dict]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), dict(info.value.trailing_metadata() or ())


@pytest.mark.slow
def test_health_answers_without_a_token_and_reflection_needs_one(cluster):
    address = _address(cluster.backends[1])
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "claypot.v1.Backend"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        code, _ = _failure(lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        code, _ = _failure(lambda: list(refl.ServerReflectionInfo(iter([ask]), timeout=10)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        replies = list(
            refl.ServerReflectionInfo(
                iter([ask, reflection_pb2.ServerReflectionRequest(file_containing_symbol="claypot.v1.TypedArray")]),
                metadata=[("claypot-token", cluster.token)],
                timeout=10,
            )
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"claypot.v1.Backend", "grpc.health.v1.Health"} <= names
        assert replies[1].file_descriptor_response.file_descriptor_proto


def test_health_follows_the_backend_lifecycle():
    """NOT_SERVING until started, while republishing, and for good once draining."""
    from concurrent.futures import ThreadPoolExecutor

    from store.backend._service.polyglot import StandardServices

    server = grpc.server(ThreadPoolExecutor(2))
    services = StandardServices(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)

            def status():
                return health.Check(health_pb2.HealthCheckRequest(), timeout=10).status

            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING  # not started yet
            services.serving(True)
            assert status() == health_pb2.HealthCheckResponse.SERVING
            services.serving(False)  # republishing after Redis lost the directory
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            services.serving(True)
            services.draining()
            services.serving(True)  # a late heartbeat cannot undo draining
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(0)


def test_get_array_inline_chunked_method_and_byte_orders(cluster, stub):
    grid = Grid(8)
    alias = f"grid-{uuid.uuid4().hex[:8]}"
    grid.make_persistent(alias=alias, backend=cluster.backends[1])

    array, parts, data = _get(stub, pb.GetArrayRequest(alias=alias, kind=pb.GET_ATTR, name="values"))
    assert (array.dtype, list(array.shape), array.nbytes) == ("float64", [8], 64)
    assert array.byte_order == pb.BYTE_ORDER_LITTLE_ENDIAN and not array.chunked
    assert len(parts) == 1 and data == np.arange(8, dtype="<f8").tobytes()

    # A method with JSON arguments.
    array, _, data = _get(
        stub,
        pb.GetArrayRequest(alias=alias, kind=pb.METHOD, name="scaled", args_json="[2]", kwargs_json='{"offset": 1}'),
    )
    assert np.array_equal(np.frombuffer(data, "<f8"), np.arange(8) * 2 + 1)

    # Big-endian stays big-endian on the wire, and says so; Fortran order is sent row-major.
    array, _, data = _get(stub, pb.GetArrayRequest(alias=alias, kind=pb.GET_ATTR, name="wide"))
    assert (array.dtype, array.byte_order) == ("int32", pb.BYTE_ORDER_BIG_ENDIAN)
    assert list(array.shape) == [3, 5] and data == bytes(60)
    array, _, data = _get(stub, pb.GetArrayRequest(alias=alias, kind=pb.GET_ATTR, name="fortran"))
    assert np.array_equal(np.frombuffer(data, "<i2").reshape(3, 4), np.arange(12, dtype=np.int16).reshape(3, 4))

    # Over the inline limit (1 MiB): the header, then 4 MiB chunks.
    big = np.random.default_rng(7).standard_normal(1_500_000)  # 12 MB
    grid.values = big
    array, parts, data = _get(stub, pb.GetArrayRequest(object_id=grid.getID(), kind=pb.GET_ATTR, name="values"))
    assert array.chunked and not array.data and array.nbytes == big.nbytes
    assert len(parts) == 1 + -(-big.nbytes // (4 << 20))
    assert data == big.tobytes()


def test_set_array_inline_and_chunked_and_checks_its_header(cluster, stub):
    s, md, _ = stub
    grid = Grid(2)
    grid.make_persistent(backend=cluster.backends[1])
    small = np.arange(6, dtype=">u2").reshape(2, 3)
    header = pb.SetArrayHeader(
        object_id=grid.getID(),
        name="values",
        array=pb.TypedArray(
            dtype="uint16", shape=[2, 3], byte_order=pb.BYTE_ORDER_BIG_ENDIAN, nbytes=12, data=small.tobytes()
        ),
    )
    reply = s.SetArray(iter([pb.SetArrayRequest(header=header)]), metadata=md, timeout=30)
    assert reply.ref.object_id == grid.getID() and reply.ref.backend_id == cluster.backends[1]
    got = grid.values
    assert got.dtype == np.dtype("uint16") and got.dtype.isnative
    assert np.array_equal(got, small)

    big = np.random.default_rng(3).random((1000, 700))  # 5.6 MB: chunked
    raw = big.tobytes()
    header = pb.SetArrayHeader(
        object_id=grid.getID(),
        name="values",
        array=pb.TypedArray(
            dtype="float64", shape=[1000, 700], byte_order=pb.BYTE_ORDER_LITTLE_ENDIAN, nbytes=len(raw), chunked=True
        ),
    )
    pieces = [pb.SetArrayRequest(header=header)] + [
        pb.SetArrayRequest(data=raw[i : i + 1_000_000]) for i in range(0, len(raw), 1_000_000)
    ]
    s.SetArray(iter(pieces), metadata=md, timeout=60)
    assert grid.total() == pytest.approx(big.sum())
    assert np.array_equal(grid.values, big)

    # A header whose nbytes does not match its dtype and shape; a stream cut short.
    bad = pb.SetArrayHeader(
        object_id=grid.getID(), name="values", array=pb.TypedArray(dtype="float64", shape=[4], nbytes=31, chunked=True)
    )
    code, trailers = _failure(lambda: s.SetArray(iter([pb.SetArrayRequest(header=bad)]), metadata=md, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert trailers["claypot-error-code"] == "ProtocolError"
    short = pb.SetArrayHeader(
        object_id=grid.getID(), name="values", array=pb.TypedArray(dtype="float64", shape=[4], nbytes=32, chunked=True)
    )
    code, trailers = _failure(
        lambda: s.SetArray(
            iter([pb.SetArrayRequest(header=short), pb.SetArrayRequest(data=bytes(16))]), metadata=md, timeout=30
        )
    )
    assert trailers["claypot-error-code"] == "ProtocolError"
    code, trailers = _failure(
        lambda: s.SetArray(
            iter(
                [
                    pb.SetArrayRequest(
                        header=pb.SetArrayHeader(
                            object_id=grid.getID(),
                            name="values",
                            array=pb.TypedArray(dtype="object", shape=[1], nbytes=8),
                        )
                    )
                ]
            ),
            metadata=md,
            timeout=30,
        )
    )
    assert trailers["claypot-error-code"] == "ProtocolError"
    assert np.array_equal(grid.values, big)  # nothing half-applied


def test_create_and_delete_objects_by_class_name(cluster, stub):
    s, md, _ = stub
    seed = Grid(1)
    seed.make_persistent(backend=cluster.backends[1])
    key = seed.__dict__["_claypot_class_key"]
    alias = f"made-{uuid.uuid4().hex[:8]}"
    for name in (key, key.split("#")[0], "Grid"):
        ref = s.CreateObject(
            pb.CreateObjectRequest(class_name=name, args_json="[3]", kwargs_json='{"label": "node"}'),
            metadata=md,
            timeout=30,
        ).ref
        assert ref.class_key == key and ref.backend_id == cluster.backends[0]
        made = store.get_by_id(ref.object_id)
        assert made.label == "node" and made.total() == 3.0
    ref = s.CreateObject(
        pb.CreateObjectRequest(class_name="Grid", alias=alias, backend_id=cluster.backends[1]), metadata=md, timeout=30
    ).ref
    assert ref.backend_id == cluster.backends[1]
    assert Grid.get_by_alias(alias).getID() == ref.object_id

    # Deleting through the gateway removes the object from its owner, alias and all.
    s.DeleteObject(pb.DeleteObjectRequest(alias=alias), metadata=md, timeout=30)
    with pytest.raises(store.errors.AliasNotFound):
        store.get_by_alias(alias)
    with pytest.raises(store.errors.ObjectNotFound):
        store.get_by_id(ref.object_id)

    code, trailers = _failure(
        lambda: s.CreateObject(pb.CreateObjectRequest(class_name="NoSuchClass"), metadata=md, timeout=30)
    )
    assert (code, trailers["claypot-error-code"]) == (grpc.StatusCode.FAILED_PRECONDITION, "ClassNotFound")
    code, trailers = _failure(
        lambda: s.CreateObject(
            pb.CreateObjectRequest(class_name="Grid", args_json='{"not": "a list"}'), metadata=md, timeout=30
        )
    )
    assert trailers["claypot-error-code"] == "ProtocolError"


def test_failures_are_status_codes_with_the_error_code_in_trailers(cluster, stub):
    s, md, _ = stub
    grid = Grid(2)
    alias = f"errs-{uuid.uuid4().hex[:8]}"
    grid.make_persistent(alias=alias, backend=cluster.backends[1])

    def get(**fields):
        return lambda: list(s.GetArray(pb.GetArrayRequest(**fields), metadata=md, timeout=30))

    cases = [
        (get(alias="no-such-alias", kind=pb.GET_ATTR, name="values"), grpc.StatusCode.NOT_FOUND, "AliasNotFound"),
        (get(object_id="0" * 32, kind=pb.GET_ATTR, name="values"), grpc.StatusCode.NOT_FOUND, "ObjectNotFound"),
        (get(alias=alias, kind=pb.GET_ATTR, name="label"), grpc.StatusCode.INVALID_ARGUMENT, "SerializationError"),
        (
            get(alias=alias, kind=pb.METHOD, name="scaled", args_json="[1, oops"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ProtocolError",
        ),
        (get(alias=alias, kind=pb.SET_ATTR, name="values"), grpc.StatusCode.INVALID_ARGUMENT, "ProtocolError"),
        (get(alias=alias, kind=pb.METHOD, name="boom"), grpc.StatusCode.UNKNOWN, "RemoteError"),
    ]
    for call, status, code in cases:
        got, trailers = _failure(call)
        assert (got, trailers.get("claypot-error-code")) == (status, code)
        assert status == polyglot.STATUS_BY_CODE[code]
    _, trailers = _failure(get(alias=alias, kind=pb.METHOD, name="boom"))
    assert trailers["claypot-remote-type"].endswith("KeyError")
    code, _ = _failure(lambda: list(s.GetArray(pb.GetArrayRequest(alias=alias, name="values"), timeout=30)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # The object is unharmed.
    assert grid.total() == 1.0


def test_readme_error_table_matches_the_code():
    """Every error code, with its gRPC status, is in the README's one table, and only those."""
    text = Path(README).read_text(encoding="utf-8")
    section = text.split("### Errors, in every language", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", section, flags=re.M))
    assert set(rows) == set(polyglot.error_codes()) == set(polyglot.STATUS_BY_CODE)
    for code, status in rows.items():
        assert polyglot.STATUS_BY_CODE[code].name == status, code


def test_node_and_cpp_clients_carry_the_same_status_table():
    """The clients' own copies of the table (for errors inside replies) match store._wire.polyglot."""
    root = os.path.join(os.path.dirname(__file__), "..", "clients")
    node = Path(root, "node", "index.js").read_text(encoding="utf-8")
    block = node.split("const STATUS_BY_CODE = Object.freeze({", 1)[1].split("});", 1)[0]
    node_table = dict(re.findall(r"(\w+): '(\w+)'", block))
    cpp = Path(root, "cpp", "src", "client.cpp").read_text(encoding="utf-8")
    cpp_table = dict(re.findall(r'\{"(\w+)", grpc::StatusCode::(\w+)\}', cpp))
    expected = {code: status.name for code, status in polyglot.STATUS_BY_CODE.items()}
    assert node_table == expected
    # C++ falls back to INTERNAL for codes it does not list, as ClaypotError is.
    assert dict(cpp_table, ClaypotError="INTERNAL") == expected


def test_claypot_health_command(cluster):
    """`claypot health ADDRESS`: the probe a container or load balancer runs, no token."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CLAYPOT_TOKEN"}
    cmd = [sys.executable, "-m", "store", "health"]
    proc = subprocess.run(cmd + [_address(cluster.backends[0])], capture_output=True, text=True, timeout=60, env=env)
    assert (proc.returncode, proc.stdout.strip()) == (0, "SERVING"), proc.stderr
    proc = subprocess.run(cmd + ["127.0.0.1:1", "--timeout", "2"], capture_output=True, text=True, timeout=60, env=env)
    assert (proc.returncode, proc.stdout.strip()) == (2, "UNREACHABLE")
