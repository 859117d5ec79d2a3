"""Large numpy values end to end: streamed, assembled in place, never copied on the backend.

Everything runs against real backend processes on 127.0.0.1. Content is
compared by hash (SHA-1 of the raw bytes: it is the fastest hashlib digest
here, and identity, not security, is what is checked). The failure cases kill
real processes; the malformed-stream cases speak the raw wire protocol to a
real backend.
"""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import numpy as np
import psutil
import pytest

import chaos
from runtime import task, wait_on
from store import LocalCluster, StorageObject
from store._wire import wire
from store._client.client import TOKEN_HEADER, Client
from store.config import Settings
from store.errors import (
    BackendUnavailable,
    CallInterrupted,
    ClaypotError,
    DeadlineExceeded,
    ObjectNotFound,
    ProtocolError,
    ValueTooLarge,
)
from store._wire.generated import claypot_pb2 as pb
from store._model.objects import readonly

pytestmark = pytest.mark.large


@pytest.fixture(scope="module", autouse=True)
def _streams_not_shared_memory():
    """This module tests the gRPC streaming path, so same-host shared memory is off
    (for this process and the backends it starts); tests/test_shm.py covers that path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAYPOT_SHM", "0")
        yield


MiB = 1 << 20
GiB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digest(array) -> str:
    """SHA-1 of an array's bytes in memory order (C-contiguous copy only if it is not)."""
    return hashlib.sha1(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def make_array(nbytes: int, seed: int = 0) -> np.ndarray:
    """Random bytes: a lost, repeated or misplaced chunk changes the hash."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


class Holder(StorageObject):
    """An object holding one array, with methods that run next to it."""

    def __init__(self, data):
        self.data = data

    @readonly
    def echo(self, value):
        """Return the argument: a large argument streamed in, a large result streamed out."""
        return value

    @readonly
    def data_digest(self) -> str:
        return digest(self.data)

    @readonly
    def doubled(self):
        """A large result computed on the backend."""
        return self.data * 2

    @readonly
    def address(self) -> int:
        """Where the live array's memory is, seen from inside the backend."""
        return self.data.ctypes.data

    def bump(self, index: int) -> int:
        """Change the live array in place; return the address it still has."""
        self.data[index] += 1
        return self.data.ctypes.data

    @readonly
    def forward_digest(self, other, value) -> str:
        """Pass a large argument on to an object on another backend (backend-to-backend stream)."""
        return other.digest_of(value)

    @readonly
    def digest_of(self, value) -> str:
        return digest(value)


class Mixed(StorageObject):
    """Several buffers in one state: dtypes, shapes, memory orders, views."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.floats = rng.random((700, 600))  # C order, 3.2 MiB
        self.fortran = np.asfortranarray(rng.random((500, 400)))  # F order, 1.5 MiB
        self.strided = rng.integers(0, 9, 3 * MiB, dtype=np.int8)[::3]  # not contiguous
        self.small = np.arange(10)  # in the pickle stream
        self.blob = bytearray(rng.bytes(2 * MiB))  # out of band, not numpy
        self.label = "mixed"


@task(returns=1)
def task_digest_and_address(holder, extra):
    """A task placed on the holder's backend: the live array's address and a digest."""
    return holder.data.ctypes.data, digest(holder.data), digest(extra)


@task(returns=1)
def task_scaled(extra):
    """A task returning a large computed array."""
    return extra * 3


SIZES = [
    pytest.param(1 * MiB - 4096, id="inline-under-1MiB"),
    pytest.param(1 * MiB + 1, id="streamed-just-over-1MiB"),
    pytest.param(9 * MiB + 123, id="9MiB-odd-chunks"),
    pytest.param(65 * MiB, id="65MiB-checkpointed"),
]


@pytest.mark.parametrize("nbytes", SIZES)
def test_array_round_trips_every_path(cluster, nbytes):
    """Persist, attribute read, argument, result, attribute write, move: all hash-equal."""
    b0, b1 = cluster.backends
    array = make_array(nbytes, seed=nbytes)
    expected = digest(array)

    obj = Holder(array)
    obj.make_persistent(backend=b0)
    assert obj.data_digest() == expected, "backend sees different bytes than were sent"
    assert digest(obj.data) == expected, "attribute read returned different bytes"

    other = make_array(nbytes, seed=nbytes + 1)
    assert digest(obj.echo(other)) == digest(other), "argument in, result out"
    assert digest(obj.doubled()) == digest(array * 2), "computed result"

    obj.data = other
    assert obj.data_digest() == digest(other), "attribute write"

    obj.move(b1)
    assert obj.get_location() == b1
    assert obj.data_digest() == digest(other), "state after move (on the target)"
    assert digest(obj.data) == digest(other), "read back after move"
    obj.delete_persistent()


def test_many_buffers_in_one_state(cluster):
    """dtypes, shapes, Fortran order, strided views and bytearrays survive persist and move."""
    obj = Mixed(seed=7)
    want = Mixed(seed=7)
    obj.make_persistent(backend=cluster.backends[0])
    for step in ("persisted", "moved"):
        for name in ("floats", "fortran", "strided", "small"):
            got = getattr(obj, name)
            assert got.dtype == getattr(want, name).dtype, (step, name)
            assert got.shape == getattr(want, name).shape, (step, name)
            assert np.array_equal(got, getattr(want, name)), (step, name)
        assert obj.fortran.flags.f_contiguous, "memory order kept"
        assert bytes(obj.blob) == bytes(want.blob)
        assert obj.label == "mixed"
        obj.move(cluster.backends[1])


def test_large_argument_forwarded_backend_to_backend(cluster):
    """A method on one backend streams a large argument on to an object on another."""
    b0, b1 = cluster.backends
    first, second = Holder(np.zeros(1)), Holder(np.zeros(1))
    first.make_persistent(backend=b0)
    second.make_persistent(backend=b1)
    value = make_array(20 * MiB, seed=3)
    assert first.forward_digest(second, value) == digest(value)


def test_methods_see_the_live_array_without_copies(cluster):
    """The array a method sees is the one in the heap: same address, in-place changes stick."""
    obj = Holder(make_array(16 * MiB, seed=5))
    obj.make_persistent(backend=cluster.backends[0])
    first = obj.address()
    assert obj.address() == first, "each call saw a different copy of the array"
    before = int(obj.data[123])
    assert obj.bump(123) == first, "an in-place update reallocated the array"
    assert int(obj.data[123]) == (before + 1) % 256
    assert obj.address() == first


def test_tasks_see_the_live_array_and_stream_large_values(cluster):
    """A task placed next to an object sees its live array; large task args/results stream."""
    holder = Holder(make_array(16 * MiB, seed=11))
    holder.make_persistent(backend=cluster.backends[1])
    extra = make_array(2 * MiB, seed=12)
    address, held, passed = wait_on(task_digest_and_address(holder, extra))
    assert address == holder.address(), "the task saw a copy, not the live array"
    assert held == holder.data_digest()
    assert passed == digest(extra)
    assert digest(wait_on(task_scaled(extra))) == digest(extra * 3)


def test_chunk_size_above_the_message_limit_is_capped(cluster):
    """chunk_size may be set to 64 MiB; frames still fit the channels' 16 MiB messages."""
    client = Client(cluster.address, cluster.token, Settings.from_env(chunk_size=64 * MiB))
    try:
        array = make_array(40 * MiB, seed=21)
        obj = Holder(array)
        client.make_persistent([obj], None, cluster.backends[0])
        assert client.call(obj, pb.METHOD, "data_digest", (), {}) == digest(array)
    finally:
        client.close()


def test_chunk_framing_is_the_protobuf_encoding():
    """claypot's hand-framed chunks are byte-identical to protobuf's, both ways."""
    for size in (0, 1, 127, 128, 300, 16384, 4 * MiB):
        data = os.urandom(size)
        assert wire.encode_data(data) == pb.Chunk(data=data).SerializeToString()
        assert wire.encode_header(data) == pb.Chunk(header=data).SerializeToString()
        kind, body = wire.decode_chunk(pb.Chunk(data=data).SerializeToString())
        assert kind == "data" and bytes(body) == data
    with pytest.raises(ProtocolError):
        wire.decode_chunk(b"\x12\x05ab")  # length says 5, 2 bytes follow


def test_fortran_ordered_out_of_band_buffer_streams():
    """A PickleBuffer over Fortran-ordered memory (which memoryview.cast refuses) streams whole."""
    source = np.asfortranarray(make_array(3 * MiB, seed=9).reshape(1536, 2048))
    buffer = pickle.PickleBuffer(memoryview(source))
    value, blobs = wire.streamed_value(b"payload", [buffer])
    header = pb.PersistRequest(objects=[pb.PersistObject(object_id="f", state=value)])
    frames = wire.chunk_stream(header.SerializeToString(), blobs, 1 * MiB)
    _, [(payload, [received])] = wire.receive_stream(frames, pb.PersistRequest, 0)
    assert bytes(payload) == b"payload"
    assert received.raw().tobytes() == source.tobytes(order="F")


# -- malformed streams: raw frames to a real backend -------------------------------------


def _raw(cluster):
    channel = grpc.insecure_channel(
        cluster.address,
        options=[("grpc.max_send_message_length", 16 * MiB), ("grpc.max_receive_message_length", 16 * MiB)],
    )
    return channel, wire.StreamStub(channel), ((TOKEN_HEADER, cluster.token),)


def _persist_header(oid: str, sizes: list[int], class_key: str = "tests:Holder") -> bytes:
    state = pb.Value(buffer_sizes=sizes)
    request = pb.PersistRequest(objects=[pb.PersistObject(object_id=oid, class_key=class_key, state=state)])
    return request.SerializeToString()


def _assert_absent(cluster, oid: str) -> None:
    with pytest.raises(ObjectNotFound):
        cluster.client.resolve(object_id=oid)


MALFORMED = {
    "data-before-header": lambda h: [wire.encode_data(b"x" * 10), wire.encode_header(h)],
    "fewer-bytes-than-announced": lambda h: [wire.encode_header(h), wire.encode_data(b"x" * (2 * MiB))],
    "more-bytes-than-announced": lambda h: [wire.encode_header(h), wire.encode_data(b"x" * (3 * MiB + 1))],
    "second-header": lambda h: [wire.encode_header(h), wire.encode_data(b"x" * MiB), wire.encode_header(h)],
    "garbage-header": lambda h: [wire.encode_header(b"\xff\xff\xff\xff"), wire.encode_data(b"x")],
    "empty-chunk": lambda h: [wire.encode_header(h), b""],
    "empty-stream": lambda h: [],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_persist_stream_is_a_protocol_error(cluster, case):
    """A broken stream gets ProtocolError in the reply, and no object is created."""
    oid = os.urandom(16).hex()
    channel, stub, metadata = _raw(cluster)
    try:
        frames = MALFORMED[case](_persist_header(oid, [100, 3 * MiB - 100]))
        reply = stub.PersistStream(iter(frames), timeout=30, metadata=metadata)
    finally:
        channel.close()
    assert reply.HasField("error"), f"{case}: accepted"
    assert isinstance(wire.error_from_pb(reply.error), ProtocolError), reply.error
    _assert_absent(cluster, oid)


def test_malformed_call_stream_is_a_protocol_error(cluster):
    """CallStream checks its stream the same way (fewer bytes than the header announced)."""
    obj = Holder(np.zeros(4))
    obj.make_persistent(backend=cluster.backends[0])
    request = pb.CallRequest(
        object_id=obj.getID(), kind=pb.METHOD, name="echo", args=pb.Value(buffer_sizes=[10, 2 * MiB]), call_id="x"
    )
    channel, stub, metadata = _raw(cluster)
    try:
        reply = stub.CallStream(
            iter([wire.encode_header(request.SerializeToString()), wire.encode_data(b"y" * MiB)]),
            timeout=30,
            metadata=metadata,
        )
    finally:
        channel.close()
    assert isinstance(wire.error_from_pb(reply.error), ProtocolError), reply.error


def test_absurd_announced_size_is_refused(cluster):
    """A header announcing more bytes than the machine can map is refused, not a crash."""
    oid = os.urandom(16).hex()
    channel, stub, metadata = _raw(cluster)
    try:
        reply = stub.PersistStream(
            iter([wire.encode_header(_persist_header(oid, [10, 1 << 62]))]), timeout=30, metadata=metadata
        )
    finally:
        channel.close()
    assert isinstance(wire.error_from_pb(reply.error), ValueTooLarge), reply.error
    _assert_absent(cluster, oid)


def test_unknown_result_handle_streams_back_an_error(cluster):
    """FetchResult for a handle that does not exist answers with an error header."""
    channel, stub, metadata = _raw(cluster)
    try:
        frames = list(stub.FetchResult(pb.FetchRequest(result_handle="nope"), timeout=30, metadata=metadata))
    finally:
        channel.close()
    with pytest.raises(ObjectNotFound):
        header, _ = wire.receive_stream(iter(frames), pb.CallReply, 0)
        raise wire.error_from_pb(header.error)


def test_sender_failing_mid_stream_leaves_nothing(cluster):
    """A client whose data source raises mid-stream gets an error; the backend keeps nothing."""
    oid = os.urandom(16).hex()

    def frames():
        yield wire.encode_header(_persist_header(oid, [100, 64 * MiB]))
        for _ in range(3):
            yield wire.encode_data(b"z" * (4 * MiB))
        raise RuntimeError("the data source broke")

    channel, stub, metadata = _raw(cluster)
    started = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError):
            stub.PersistStream(frames(), timeout=30, metadata=metadata)
    finally:
        channel.close()
    assert time.monotonic() - started < 10, "a broken sender must not hang the call"
    _assert_absent(cluster, oid)
    obj = Holder(make_array(2 * MiB))
    obj.make_persistent(backend=cluster.backends[0])  # the backend still serves streams
    assert obj.data_digest() == digest(make_array(2 * MiB))


# -- peers dying mid-stream ------------------------------------------------------------


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _stored_files(data_dir: str) -> list[str]:
    found = []
    for root, _, files in os.walk(os.path.join(data_dir, "objects")):
        found += [os.path.join(root, f) for f in files]
    return found


def test_backend_killed_during_make_persistent(fresh_cluster):
    """kill -9 of the target mid-stream: a clear error fast, and no object after restart."""
    c = fresh_cluster
    b0 = c.backends[0]
    proc = c.process_of(b0)
    base = _rss(proc.pid)
    outcome = {}

    def persist():
        try:
            Holder(np.ones(1 * GiB, np.uint8)).make_persistent(backend=b0)
            outcome["result"] = "stored"
        except BaseException as exc:  # recorded for the assertion below
            outcome["result"] = exc

    worker = threading.Thread(target=persist)
    worker.start()
    chaos.wait_until(lambda: _rss(proc.pid) > base + 96 * MiB, timeout=60, what="backend receiving the stream")
    chaos.kill_backend(c, b0)
    killed = time.monotonic()
    worker.join(30)
    assert not worker.is_alive(), "make_persistent hung after its backend died"
    assert time.monotonic() - killed < 15
    assert isinstance(outcome["result"], (BackendUnavailable, CallInterrupted)), outcome
    print(f"\nmake_persistent during kill -9 -> {outcome['result']!r}")
    chaos.start_backend(c, b0)
    info = {b.backend_id: b for b in c.client.backends()}
    assert info[b0].objects == 0, "a half-received object survived the restart"
    assert _stored_files(proc.data_dir) == []


def test_backend_killed_while_result_streams_back(fresh_cluster):
    """kill -9 of the owner while a large attribute read streams: a clear error, not a hang."""
    c = fresh_cluster
    b0 = c.backends[0]
    obj = Holder(np.ones(512 * MiB, np.uint8))
    obj.make_persistent(backend=b0)
    me = psutil.Process()
    base = me.memory_info().rss
    outcome = {}

    def read():
        try:
            outcome["result"] = obj.data.nbytes
        except BaseException as exc:  # recorded for the assertion below
            outcome["result"] = exc

    worker = threading.Thread(target=read)
    worker.start()
    chaos.wait_until(
        lambda: me.memory_info().rss > base + 48 * MiB or not worker.is_alive(),
        timeout=60,
        interval=0.005,
        what="result streaming",
    )
    chaos.kill_backend(c, b0)
    worker.join(30)
    assert not worker.is_alive(), "a read hung after its backend died"
    # On a fast machine the read may finish just before the kill lands; otherwise it
    # must fail with a claypot error, never a raw grpc one.
    result = outcome["result"]
    print(f"\nread during kill -9 -> {result!r}")
    assert result == 512 * MiB or isinstance(result, ClaypotError), result


def test_stalled_backend_hits_the_size_scaled_deadline(cluster):
    """A backend frozen mid-stream (SIGSTOP) gives DeadlineExceeded at the scaled deadline.

    The client here uses a short deadline (1 s plus 1 GiB/s of data) so the
    test is quick; the backend, thawed, has dropped the cancelled stream.
    """
    b0 = cluster.backends[0]
    proc = psutil.Process(cluster.process_of(b0).pid)
    before = {b.backend_id: b.objects for b in cluster.client.backends()}[b0]
    settings = Settings.from_env(admin_timeout=1.0, stream_min_rate=float(GiB))
    client = Client(cluster.address, cluster.token, settings)
    size = 512 * MiB
    base = proc.memory_info().rss
    outcome = {}

    def persist():
        try:
            client.make_persistent([Holder(np.ones(size, np.uint8))], None, b0)
            outcome["result"] = "stored"
        except BaseException as exc:  # recorded for the assertion below
            outcome["result"] = exc

    worker = threading.Thread(target=persist)
    try:
        worker.start()
        chaos.wait_until(
            lambda: proc.memory_info().rss > base + 32 * MiB or not worker.is_alive(),
            timeout=60,
            interval=0.005,
            what="backend receiving the stream",
        )
        proc.suspend()
        worker.join(settings.stream_deadline(size) + 10)
    finally:
        proc.resume()
    assert not worker.is_alive(), "make_persistent hung on a frozen backend"
    client.close()
    result = outcome["result"]
    print(f"\nmake_persistent to a frozen backend -> {result!r}")
    if result != "stored":  # on a fast machine the stream may finish before the freeze
        assert isinstance(result, DeadlineExceeded), result
        chaos.wait_until(
            lambda: proc.memory_info().rss < base + 64 * MiB, timeout=30, what="backend dropping the cancelled stream"
        )
        after = {b.backend_id: b.objects for b in cluster.client.backends()}[b0]
        assert after == before


def test_client_killed_mid_stream_frees_the_backend(cluster):
    """A client process killed mid make_persistent: the backend drops the partial buffer."""
    b0 = cluster.backends[0]
    backend_pid = cluster.process_of(b0).pid
    before = {b.backend_id: b.objects for b in cluster.client.backends()}[b0]
    base = _rss(backend_pid)
    script = textwrap.dedent(f"""
        import numpy as np, store
        from store import StorageObject
        class Big(StorageObject):
            def __init__(self, data):
                self.data = data
        store.connect({cluster.address!r}, {cluster.token!r})
        Big(np.ones({GiB}, np.uint8)).make_persistent(backend={b0!r})
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT)
    try:
        chaos.wait_until(
            lambda: _rss(backend_pid) > base + 96 * MiB or child.poll() is not None,
            timeout=60,
            what="backend receiving the child's stream",
        )
        assert child.poll() is None, "the child finished before it could be killed"
        child.kill()
        child.wait()
        chaos.wait_until(
            lambda: _rss(backend_pid) < base + 64 * MiB, timeout=30, what="backend freeing the half-received buffer"
        )
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    after = {b.backend_id: b.objects for b in cluster.client.backends()}[b0]
    assert after == before
    assert cluster.process_of(b0).alive()


# -- 3 GiB: no ceiling, one copy per side ---------------------------------------------------


class PeakRSS:
    """Samples the RSS of some processes every few ms (psutil) and keeps the peaks."""

    def __init__(self, pids: dict[str, int], interval: float = 0.01):
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._interval = interval
        self.peak = {name: 0 for name in pids}
        self.base = {name: p.memory_info().rss for name, p in self._procs.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, p in self._procs.items():
                self.peak[name] = max(self.peak[name], p.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for name, p in self._procs.items():
            self.peak[name] = max(self.peak[name], p.memory_info().rss)

    def growth(self, name: str) -> int:
        """Peak RSS above the RSS when sampling began."""
        return self.peak[name] - self.base[name]


@pytest.mark.large
def test_3gib_array_persist_read_move_near_one_copy():
    """A 3 GiB array (over protobuf's 2 GiB ceiling) persisted, read back and moved.

    Hashes match at every step, and each process's peak RSS grows by about
    one copy of the data at most (the figures are printed for the report).
    Durability is ``none`` to keep the disk out of the test's time.
    """
    size = 3 * GiB
    figures = {}
    with LocalCluster(backends=2, durability="none") as c:
        b0, b1 = c.backends
        pids = {"client": os.getpid(), "b0": c.process_of(b0).pid, "b1": c.process_of(b1).pid}
        array = np.arange(size // 8, dtype=np.uint64)
        expected = digest(array)
        obj = Holder(array)

        with PeakRSS(pids) as rss:
            t = time.perf_counter()
            obj.make_persistent(backend=b0)
            figures["persist_s"] = time.perf_counter() - t
        figures["persist"] = {k: rss.growth(k) for k in ("client", "b0")}
        assert obj.data_digest() == expected

        del array
        gc.collect()
        with PeakRSS(pids) as rss:
            t = time.perf_counter()
            back = obj.data
            figures["read_s"] = time.perf_counter() - t
        figures["read"] = {k: rss.growth(k) for k in ("client", "b0")}
        assert back.dtype == np.uint64 and back.nbytes == size
        assert digest(back) == expected
        del back
        gc.collect()

        with PeakRSS(pids) as rss:
            t = time.perf_counter()
            obj.move(b1)
            figures["move_s"] = time.perf_counter() - t
        figures["move"] = {k: rss.growth(k) for k in ("b0", "b1")}
        assert obj.get_location() == b1
        assert obj.data_digest() == expected

    print(
        "\n3 GiB figures (RSS growth in MiB):",
        {
            k: ({n: round(v / MiB) for n, v in d.items()} if isinstance(d, dict) else round(d, 2))
            for k, d in figures.items()
        },
    )
    # Transient slack for gRPC's in-flight buffers and allocator caches: measured
    # growth is usually 1.01-1.03 copies, rarely up to 1.18 on this shared VM.
    slack = 640 * MiB
    assert figures["persist"]["client"] < slack, "the client copied the array to send it"
    assert figures["persist"]["b0"] < size + slack, "the backend held more than one copy"
    assert figures["read"]["client"] < size + slack, "the client held more than one copy"
    assert figures["read"]["b0"] < slack, "the backend copied the array to send it"
    assert figures["move"]["b0"] < slack, "the source copied the array to send it"
    assert figures["move"]["b1"] < size + slack, "the target held more than one copy"
