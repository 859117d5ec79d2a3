"""Hostile input against a running backend, with a JSON summary of what happened.

Each attack is followed by a check that the backend still serves (same PID,
answers a call) and that no stored object changed. ``run(cluster)`` returns
the counts; ``python tests/hostile.py`` starts a cluster of its own, runs
everything and prints them as JSON. ``tests/test_security_hostile.py`` runs it
in the suite with bounded sizes and fixed seeds.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from store import LocalCluster, StorageObject  # noqa: E402
from store._wire.generated import claypot_pb2 as pb  # noqa: E402

SERVICE = "/claypot.v1.Backend/"
UNARY = {
    "Ping": pb.PingRequest,
    "Resolve": pb.ResolveRequest,
    "ListBackends": pb.ListBackendsRequest,
    "RegisterCode": pb.RegisterCodeRequest,
    "GetCode": pb.GetCodeRequest,
    "DeleteAlias": pb.AliasRequest,
    "SetAlias": pb.AliasRequest,
    "Persist": pb.PersistRequest,
    "Call": pb.CallRequest,
    "Delete": pb.DeleteRequest,
    "Move": pb.MoveRequest,
    "CallJson": pb.JsonCallRequest,
}
STREAMS = {"PersistStream": pb.PersistRequest, "CallStream": pb.CallRequest}


class Safe(StorageObject):
    """What the attacks must not change."""

    def __init__(self, text):
        self.text = text

    def read(self):
        return self.text


class Exploit:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class Target:
    """The backend under attack and what must stay true about it."""

    def __init__(self, cluster, n_objects: int = 5):
        self.cluster = cluster
        self.address = cluster.address
        self.token = cluster.token
        self.meta = [("claypot-token", self.token)]
        self.objects = []
        for i in range(n_objects):
            obj = Safe(f"safe-{i}-{uuid.uuid4().hex}")
            obj.make_persistent(alias=f"safe-{uuid.uuid4().hex[:12]}", backend=cluster.backends[0])
            self.objects.append(obj)
        self.expected = {o.getID(): o.read() for o in self.objects}
        self.pid = self.ping().pid
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", 64 << 20)])

    def ping(self) -> pb.PingReply:
        with grpc.insecure_channel(self.address) as ch:
            return pb.PingReply.FromString(ch.unary_unary(SERVICE + "Ping")(b"", metadata=self.meta, timeout=15))

    def intact(self) -> bool:
        """Same process, still serving calls, every object as it was."""
        if self.ping().pid != self.pid:
            return False
        for oid, text in self.expected.items():
            try:
                reply = self.unary("Call", pb.CallRequest(object_id=oid, kind=pb.METHOD, name="read", chain_id="check"))
            except grpc.RpcError:
                return False
            if reply.HasField("error") or pickle.loads(reply.result.payload) != text:
                return False
        return True

    def unary(self, method: str, request, token: bool = True, timeout: float = 15):
        """A call with raw bytes (the token unless ``token=False``); the decoded reply."""
        raw = request if isinstance(request, bytes) else request.SerializeToString()
        out = self.channel.unary_unary(SERVICE + method)(raw, metadata=self.meta if token else None, timeout=timeout)
        return _reply_type(method).FromString(out)

    def close(self) -> None:
        self.channel.close()


def _reply_type(method):
    return {
        "Ping": pb.PingReply,
        "Resolve": pb.ResolveReply,
        "ListBackends": pb.ListBackendsReply,
        "GetCode": pb.GetCodeReply,
        "Call": pb.CallReply,
        "CallStream": pb.CallReply,
        "CallJson": pb.JsonCallReply,
    }.get(method, pb.Status)


def _outcome(counter: Counter, fn) -> None:
    """Run one hostile call; count how it ended (gRPC status name, or reply error code)."""
    try:
        reply = fn()
    except grpc.RpcError as exc:
        counter["grpc:" + exc.code().name] += 1
        return
    err = getattr(reply, "error", None)
    code = err.code if err is not None and err.code else "ok"
    counter["reply:" + code] += 1


# -- the attacks -----------------------------------------------------------------------------


def random_bytes(t: Target, n: int, seed: int) -> dict:
    """Raw TCP connections sending random bytes, some after a valid HTTP/2 preface."""
    rng = random.Random(seed)
    host, port = t.address.rsplit(":", 1)
    closed = 0
    for i in range(n):
        data = rng.randbytes(rng.randint(1, 4096))
        if i % 2:
            data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + data
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(data)
                s.settimeout(2)
                while s.recv(65536):
                    pass
                closed += 1
            except (ConnectionResetError, BrokenPipeError, socket.timeout):
                closed += 1
    return {"connections": n, "ended": closed}


def truncated_protobuf(t: Target, seed: int) -> dict:
    """Valid requests cut at random points, with the token."""
    rng = random.Random(seed)
    oid = next(iter(t.expected))
    samples = {
        "Call": pb.CallRequest(
            object_id=oid, kind=pb.METHOD, name="read", chain_id="x", args=pb.Value(payload=pickle.dumps(((), {})))
        ),
        "Persist": pb.PersistRequest(
            objects=[
                pb.PersistObject(
                    object_id=uuid.uuid4().hex, class_key="m:C", alias="a", state=pb.Value(payload=b"\x80\x05N.")
                )
            ]
        ),
        "CallJson": pb.JsonCallRequest(object_id=oid, kind=pb.METHOD, name="read", args_json="[]"),
        "SetAlias": pb.AliasRequest(alias="zz", object_id=oid),
        "Resolve": pb.ResolveRequest(alias="zz"),
    }
    outcomes: Counter = Counter()
    sent = 0
    for method, msg in samples.items():
        raw = msg.SerializeToString()
        for _ in range(20):
            cut = raw[: rng.randint(0, max(0, len(raw) - 1))]
            _outcome(outcomes, lambda: t.unary(method, cut))
            sent += 1
    return {"sent": sent, "outcomes": dict(outcomes)}


def hypothesis_requests(t: Target, seed: int, examples: int) -> dict:
    """Every RPC fed requests generated from its message type (bounded, fixed seed)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as fixed_seed
    from hypothesis import strategies as st

    outcomes: Counter = Counter()
    sent = Counter()

    def call(method, raw):
        _outcome(
            outcomes,
            lambda: _reply_type(method).FromString(
                t.channel.unary_unary(SERVICE + method)(raw, metadata=t.meta, timeout=15)
            ),
        )
        sent[method] += 1

    def stream(method, frames):
        _outcome(
            outcomes,
            lambda: _reply_type(method).FromString(
                t.channel.stream_unary(SERVICE + method)(iter(frames), metadata=t.meta, timeout=15)
            ),
        )
        sent[method] += 1

    conf = settings(
        max_examples=examples, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck)
    )

    def unary_runner(method, msg_type):
        @fixed_seed(seed)
        @conf
        @given(messages(msg_type.DESCRIPTOR, st))
        def run_unary(msg):
            call(method, msg.SerializeToString())

        return run_unary

    def stream_runner(method, msg_type):
        header = messages(msg_type.DESCRIPTOR, st).map(lambda m: m.SerializeToString())
        frame = st.one_of(
            header.map(lambda h: pb.Chunk(header=h).SerializeToString()),
            st.binary(max_size=512).map(lambda d: pb.Chunk(data=d).SerializeToString()),
            st.binary(max_size=64),
        )

        @fixed_seed(seed)
        @conf
        @given(st.lists(frame, max_size=4))
        def run_stream(frames):
            stream(method, frames)

        return run_stream

    for method, msg_type in UNARY.items():
        unary_runner(method, msg_type)()
    for method, msg_type in STREAMS.items():
        stream_runner(method, msg_type)()

    @fixed_seed(seed)
    @conf
    @given(st.text(max_size=64))
    def run_fetch(handle):
        try:
            list(
                t.channel.unary_stream(SERVICE + "FetchResult")(
                    pb.FetchRequest(result_handle=handle).SerializeToString(), metadata=t.meta, timeout=15
                )
            )
            outcomes["answered"] += 1
        except grpc.RpcError as exc:
            outcomes["grpc:" + exc.code().name] += 1
        sent["FetchResult"] += 1

    run_fetch()
    return {"sent": sum(sent.values()), "per_rpc": dict(sent), "outcomes": dict(outcomes)}


def messages(descriptor, st, depth: int = 0):
    """A hypothesis strategy of protobuf messages of ``descriptor``'s type."""
    from google.protobuf import message_factory
    from google.protobuf.descriptor import FieldDescriptor as F

    cls = message_factory.GetMessageClass(descriptor)
    text = st.one_of(st.text(max_size=40), st.sampled_from(["", "claypot-1-x", "m:C", "|", "\x00", "../../etc/passwd"]))
    scalars = {
        F.TYPE_STRING: text,
        F.TYPE_BYTES: st.binary(max_size=256),
        F.TYPE_BOOL: st.booleans(),
        F.TYPE_DOUBLE: st.floats(),
        F.TYPE_FLOAT: st.floats(width=32),
        F.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
        F.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
        F.TYPE_UINT32: st.integers(0, 2**32 - 1),
        F.TYPE_UINT64: st.integers(0, 2**64 - 1),
        F.TYPE_ENUM: st.integers(-3, 8),
    }
    fields = {}
    for f in descriptor.fields:
        if f.type == F.TYPE_MESSAGE:
            if depth >= 2:
                continue
            one = messages(f.message_type, st, depth + 1)
        elif f.type in scalars:
            one = scalars[f.type]
        else:
            continue
        is_repeated = getattr(f, "is_repeated", None)
        repeated = is_repeated if isinstance(is_repeated, bool) else f.label == F.LABEL_REPEATED
        fields[f.name] = (st.lists(one, max_size=3) if repeated else one, f, repeated)

    def build(values):
        msg = cls()
        for name, value in values.items():
            _, f, repeated = fields[name]
            if repeated:
                if f.type == F.TYPE_MESSAGE:
                    for v in value:
                        getattr(msg, name).add().CopyFrom(v)
                else:
                    getattr(msg, name).extend(value)
            elif f.type == F.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional={k: v[0] for k, v in fields.items()}).map(build)


def oversized(t: Target) -> dict:
    """A unary message over the 16 MiB limit, and streams announcing absurd sizes."""
    outcomes: Counter = Counter()
    huge = pb.CallRequest(
        object_id=next(iter(t.expected)), kind=pb.METHOD, name="read", args=pb.Value(payload=b"\0" * (20 << 20))
    )
    _outcome(
        outcomes, lambda: t.channel.unary_unary(SERVICE + "Call")(huge.SerializeToString(), metadata=t.meta, timeout=30)
    )
    for sizes in ([1 << 50], [1 << 40] * 4, [2**63 - 1]):
        header = pb.CallRequest(
            kind=pb.METHOD, object_id=next(iter(t.expected)), name="read", args=pb.Value(buffer_sizes=sizes)
        )
        frames = [
            pb.Chunk(header=header.SerializeToString()).SerializeToString(),
            pb.Chunk(data=b"\0" * 1024).SerializeToString(),
        ]
        _outcome(
            outcomes,
            lambda: pb.CallReply.FromString(
                t.channel.stream_unary(SERVICE + "CallStream")(iter(frames), metadata=t.meta, timeout=30)
            ),
        )
    return {"sent": 4, "outcomes": dict(outcomes)}


def exploit_pickles(t: Target, marker: str) -> dict:
    """A pickle that would run code: sent with no token, a wrong token, and via forged Redis."""
    import redis

    outcomes: Counter = Counter()
    evil = pickle.dumps(((Exploit(marker),), {}))
    oid = next(iter(t.expected))
    call = pb.CallRequest(object_id=oid, kind=pb.METHOD, name="read", chain_id="e", args=pb.Value(payload=evil))
    for meta in (None, [("claypot-token", "")], [("claypot-token", t.token[:-1])], [("claypot-token", t.token + "x")]):
        _outcome(
            outcomes,
            lambda: t.channel.unary_unary(SERVICE + "Call")(call.SerializeToString(), metadata=meta, timeout=15),
        )
    persist = pb.PersistRequest(
        objects=[pb.PersistObject(object_id=uuid.uuid4().hex, class_key="m:C", state=pb.Value(payload=evil))]
    )
    _outcome(outcomes, lambda: t.channel.unary_unary(SERVICE + "Persist")(persist.SerializeToString(), timeout=15))
    # A Redis writer (who has the password, not the token) plants code and asks for a task.
    r = redis.Redis.from_url(t.cluster.redis_url, socket_timeout=5)
    key = f"hostile:task_{uuid.uuid4().hex}"
    r.hset("claypot:code", key, pickle.dumps(Exploit(marker)))
    task = pb.CallRequest(kind=pb.TASK, name=key, chain_id="e")
    _outcome(outcomes, lambda: t.unary("Call", task))
    r.close()
    return {"sent": 6, "outcomes": dict(outcomes), "payload_ran": os.path.exists(marker)}


def long_and_control_names(t: Target) -> dict:
    """Aliases, ids and class names of 1 MB, or with control characters."""
    outcomes: Counter = Counter()
    oid = next(iter(t.expected))
    names = ["a" * (1 << 20), "bad\x00alias", "line\nbreak", "esc\x1b[31m", "pipe|alias"]
    for name in names:
        _outcome(outcomes, lambda: t.unary("SetAlias", pb.AliasRequest(alias=name, object_id=oid)))
        _outcome(outcomes, lambda: t.unary("Resolve", pb.ResolveRequest(alias=name)))
        _outcome(outcomes, lambda: t.unary("RegisterCode", pb.RegisterCodeRequest(key=name, code=b"x")))
        _outcome(
            outcomes,
            lambda: t.unary(
                "Persist",
                pb.PersistRequest(
                    objects=[
                        pb.PersistObject(
                            object_id=uuid.uuid4().hex, class_key=name, state=pb.Value(payload=pickle.dumps(1))
                        )
                    ]
                ),
            ),
        )
        _outcome(outcomes, lambda: t.unary("Call", pb.CallRequest(kind=pb.TASK, name=name, chain_id="n")))
    return {"sent": 5 * len(names), "outcomes": dict(outcomes)}


def many_connections(t: Target, n: int) -> dict:
    """``n`` connections opened at once, then dropped (half after an HTTP/2 preface)."""
    host, port = t.address.rsplit(":", 1)
    opened = Counter()
    barrier = threading.Barrier(min(n, 50))

    def worker(count):
        socks = []
        try:
            barrier.wait(10)
        except threading.BrokenBarrierError:
            pass
        for i in range(count):
            try:
                s = socket.create_connection((host, int(port)), timeout=10)
                if i % 2:
                    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                socks.append(s)
                opened["ok"] += 1
            except OSError:
                opened["failed"] += 1
        for s in socks:
            s.close()

    threads = [threading.Thread(target=worker, args=(n // 50 + (i < n % 50),)) for i in range(min(n, 50))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return {"attempted": n, "opened": opened["ok"], "failed": opened["failed"]}


def silent_streams(t: Target, n: int) -> dict:
    """Streams that are opened and never send: cancelled by the backend, not kept for ever."""
    never = threading.Event()

    def frames():
        never.wait(120)
        return
        yield  # a generator that blocks before its first item

    ended, started = Counter(), time.monotonic()
    durations = []

    def one():
        t0 = time.monotonic()
        try:
            t.channel.stream_unary(SERVICE + "CallStream")(frames(), metadata=t.meta, timeout=60)
            ended["answered"] += 1
        except grpc.RpcError as exc:
            ended["grpc:" + exc.code().name] += 1
        durations.append(time.monotonic() - t0)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(90)
    never.set()
    return {
        "streams": n,
        "outcomes": dict(ended),
        "longest_s": round(max(durations), 2) if durations else 0,
        "total_s": round(time.monotonic() - started, 2),
    }


def run(
    cluster, seed: int = 20261127, examples: int = 15, connections: int = 1000, random_conns: int = 100, silent: int = 4
) -> dict:
    """Every attack in turn, each followed by the integrity check; the JSON-ready summary."""
    t = Target(cluster)
    marker = os.path.join(tempfile.mkdtemp(prefix="claypot-hostile-"), "pwned")
    summary = {}
    attacks = [
        ("random_bytes", lambda: random_bytes(t, random_conns, seed)),
        ("truncated_protobuf", lambda: truncated_protobuf(t, seed)),
        ("hypothesis_requests", lambda: hypothesis_requests(t, seed, examples)),
        ("oversized", lambda: oversized(t)),
        ("exploit_pickles", lambda: exploit_pickles(t, marker)),
        ("long_and_control_names", lambda: long_and_control_names(t)),
        ("many_connections", lambda: many_connections(t, connections)),
        ("silent_streams", lambda: silent_streams(t, silent)),
    ]
    try:
        for name, attack in attacks:
            started = time.monotonic()
            result = attack()
            result["seconds"] = round(time.monotonic() - started, 2)
            result["backend_intact"] = t.intact()
            summary[name] = result
    finally:
        t.close()
    summary["payload_ran"] = os.path.exists(marker)
    return summary


def main() -> None:
    with LocalCluster(backends=2, backend_env={"CLAYPOT_ADMIN_TIMEOUT": "3"}) as cluster:
        summary = run(cluster, examples=int(os.environ.get("HOSTILE_EXAMPLES", "25")), silent=20)
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
