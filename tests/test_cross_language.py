"""Other languages and hostile peers against real backends.

A Node.js client (tests/js/client.js, @grpc/grpc-js loading proto/claypot.proto
at run time) works on a Python object through CallJson, and a peer sending
garbage (raw TCP, or gRPC with unparseable request bytes) leaves the backend
serving. The Node test needs ``node`` and ``npm ci --prefix tests/js``; it is
skipped, with the reason, when either is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid

import grpc
import pytest

import store
from store import StorageObject
from store._wire.generated import claypot_pb2 as pb

pytestmark = pytest.mark.slow

JS_DIR = os.path.join(os.path.dirname(__file__), "js")
CLIENT_JS = os.path.join(JS_DIR, "client.js")
TOKEN_HEADER = "claypot-token"


class Ledger(StorageObject):
    """Defined here, so the backends get its code by value."""

    def __init__(self, owner):
        self.owner = owner
        self.entries = []
        self.total = 0.0

    def record(self, amount, memo=""):
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise TypeError(f"amount must be a number, not {type(amount).__name__}")
        self.entries.append({"amount": amount, "memo": memo})
        self.total += amount
        return {"total": self.total, "count": len(self.entries)}


def _node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not os.path.isdir(os.path.join(JS_DIR, "node_modules", "@grpc", "grpc-js")):
        pytest.skip("tests/js/node_modules is missing: run `npm ci --prefix tests/js`")
    return node


def _address_of(backend_id: str) -> str:
    for b in store.backends():
        if b.backend_id == backend_id:
            return b.address
    raise AssertionError(f"backend {backend_id} is not in the directory")


def _ping(address: str, token: str) -> pb.PingReply:
    with grpc.insecure_channel(address) as channel:
        ping = channel.unary_unary(
            "/claypot.v1.Backend/Ping",
            request_serializer=pb.PingRequest.SerializeToString,
            response_deserializer=pb.PingReply.FromString,
        )
        return ping(pb.PingRequest(), metadata=[("claypot-token", token)], timeout=10)


def test_node_client_calls_reads_and_writes_a_python_object(cluster):
    node = _node_or_skip()
    ledger = Ledger("python")
    ledger.record(1.5, memo="from python")
    alias = f"ledger-{uuid.uuid4().hex[:8]}"
    ledger.make_persistent(alias=alias, backend=cluster.backends[1])
    # Node talks to the other backend, which forwards the JSON calls to the owner.
    gateway = _address_of(cluster.backends[0])

    started = time.monotonic()
    proc = subprocess.run([node, CLIENT_JS, gateway, cluster.token, alias], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"node client failed:\n{proc.stdout}\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["ping"]["backend_id"] == cluster.backends[0]
    assert out["resolve"]["object_id"] == ledger.getID()
    assert out["resolve"]["backend_id"] == cluster.backends[1]
    assert out["resolve"]["class_key"]

    assert out["call"] == {"result": {"total": 4.0, "count": 2}}
    assert out["read"] == {"result": [{"amount": 1.5, "memo": "from python"}, {"amount": 2.5, "memo": "from node"}]}
    assert out["write"] == {"result": None}
    written = {"name": "node", "tags": ["js", "grpc"], "n": 3}
    assert out["read_back"] == {"result": written}

    err = out["remote_error"]["error"]
    assert err["code"] == "RemoteError"
    assert err["remote_type"].endswith("TypeError")
    assert "amount must be a number, not str" in err["message"]

    assert out["wrong_token"]["grpc_status"] == "UNAUTHENTICATED"
    assert out["unknown_alias"]["resolve"]["code"] == "AliasNotFound"
    assert out["unknown_alias"]["call"]["error"]["code"] == "AliasNotFound"
    assert out["unknown_alias"]["alias"] in out["unknown_alias"]["call"]["error"]["message"]

    # The Python side sees what Node did, and the failed call changed nothing.
    assert ledger.owner == written
    assert ledger.total == 4.0
    assert ledger.entries[-1] == {"amount": 2.5, "memo": "from node"}
    assert Ledger.get_by_alias(alias).owner == written
    # Node start-up plus a dozen calls; a hang would show here long before the timeout.
    assert elapsed < 60


def test_node_client_reports_bad_usage(cluster):
    node = _node_or_skip()
    proc = subprocess.run([node, CLIENT_JS, cluster.address], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage: node client.js ADDRESS TOKEN ALIAS" in proc.stderr


def _send_garbage(address: str, data: bytes) -> bytes:
    """Write ``data`` on a raw TCP connection; return what the server answered."""
    host, port = address.rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, BrokenPipeError, socket.timeout):
            pass
    return received


def test_malformed_bytes_leave_the_backend_serving(cluster):
    ledger = Ledger("guard")
    ledger.make_persistent(backend=cluster.backends[0])
    address = _address_of(cluster.backends[0])
    pid = _ping(address, cluster.token).pid

    # Raw TCP: not HTTP/2 at all; then the HTTP/2 preface followed by garbage frames.
    _send_garbage(address, os.urandom(4096) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    answer = _send_garbage(address, preface + b"\x00\x00\x04\xff\x07\x00\x00\x00\x01garbage!")
    # The server speaks HTTP/2 back (its SETTINGS and a GOAWAY) instead of crashing.
    assert answer, "the backend closed the connection without an HTTP/2 answer"
    assert ledger.record(1) == {"total": 1.0, "count": 1}

    token = [(TOKEN_HEADER, cluster.token)]
    with grpc.insecure_channel(address) as channel:

        def raw(method: str):
            # No serializers: the bytes go on the wire exactly as given.
            return channel.unary_unary(f"/claypot.v1.Backend/{method}")

        # Bytes that are not a protobuf message: gRPC rejects them before the servicer.
        for method in ("Call", "CallJson", "Persist", "Resolve"):
            with pytest.raises(grpc.RpcError) as info:
                raw(method)(b"\xff\xff\xff\xff\x0f not protobuf", metadata=token, timeout=10)
            assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), info.value

        # Without the token the same bytes are refused before anything is parsed.
        with pytest.raises(grpc.RpcError) as info:
            raw("Call")(b"\xff\xff\xff\xff\x0f not protobuf", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # A well-formed message whose pickled arguments are garbage: a typed error reply.
        bogus = pb.CallRequest(
            object_id=ledger.getID(),
            kind=pb.METHOD,
            name="record",
            args=pb.Value(payload=b"\x80\x05 this is not a pickle"),
        )
        reply = pb.CallReply.FromString(raw("Call")(bogus.SerializeToString(), metadata=token, timeout=10))
        assert reply.error.code == "SerializationError", reply.error
        # Garbage state for a class the backend knows: refused, and no half-made object.
        resolve = pb.ResolveRequest(object_id=ledger.getID())
        class_key = pb.ResolveReply.FromString(
            raw("Resolve")(resolve.SerializeToString(), metadata=token, timeout=10)
        ).ref.class_key
        junk_id, junk_alias = uuid.uuid4().hex, f"junk-{uuid.uuid4().hex[:8]}"
        persist = pb.PersistRequest(
            objects=[
                pb.PersistObject(
                    object_id=junk_id,
                    class_key=class_key,
                    alias=junk_alias,
                    state=pb.Value(payload=b"\x80\x05 garbage"),
                )
            ]
        )
        status = pb.Status.FromString(raw("Persist")(persist.SerializeToString(), metadata=token, timeout=10))
        assert status.error.code == "SerializationError", status
        with pytest.raises(store.errors.AliasNotFound):
            store.get_by_alias(junk_alias)
        with pytest.raises(store.errors.ObjectNotFound):
            store.get_by_id(junk_id)

        # Arguments that are not JSON: a ProtocolError reply, not a crash.
        json_call = pb.JsonCallRequest(object_id=ledger.getID(), kind=pb.METHOD, name="record", args_json="[1, oops")
        json_reply = pb.JsonCallReply.FromString(
            raw("CallJson")(json_call.SerializeToString(), metadata=token, timeout=10)
        )
        assert json_reply.error.code == "ProtocolError"

    # The same process still answers, and the object is intact and callable.
    assert _ping(address, cluster.token).pid == pid
    assert ledger.record(2) == {"total": 3.0, "count": 2}
    assert ledger.entries == [{"amount": 1, "memo": ""}, {"amount": 2, "memo": ""}]
