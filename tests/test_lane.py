"""The local lane: same-host unary calls over an abstract Unix socket, against real backends.

Each test starts real backend processes (LocalCluster) and checks what the lane
must keep of gRPC: the same results and errors, the token check, deadlines
that never let a late reply answer the next call, a fork's own connections,
and a backend that survives bytes that are not frames.
"""

import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import store
from store import LocalCluster, StorageObject, readonly
from store._client.client import TOKEN_HEADER, Client
from store._model.objects import dispatching
from store._wire import lane as frames
from store.errors import AuthenticationError, BackendUnavailable, CallInterrupted, DeadlineExceeded

pytestmark = pytest.mark.slow


class Box(StorageObject):
    """A value, a counter, and a method that takes its time."""

    def __init__(self, value=0):
        self.value = value
        self.calls = 0

    def put(self, value):
        self.value = value
        self.calls += 1
        return self.calls

    @readonly
    def get(self):
        return self.value

    @readonly
    def slow(self, seconds, tag):
        time.sleep(seconds)
        return tag

    def fail(self):
        raise KeyError("no such thing")


@pytest.fixture(scope="module")
def lane_cluster(tmp_path_factory):
    with LocalCluster(backends=2, data_dir=str(tmp_path_factory.mktemp("lane") / "c")) as c:
        yield c


@pytest.fixture(autouse=True)
def _connected(lane_cluster):
    store.connect(lane_cluster.address, lane_cluster.token)
    yield


def _lane_sockets(address):
    """The client's open lane connections to ``address`` (empty when calls went over gRPC)."""
    lane = store.client().transport._lane
    return [] if lane is None else list(lane._open.get(address, ()))


def test_calls_go_over_the_lane_and_give_the_same_results_and_errors(lane_cluster):
    b = Box([1, 2, 3])
    b.make_persistent(alias="lane-box", backend=lane_cluster.backends[0])
    assert b.put({"k": b"\x00" * 100}) == 1
    assert b.get() == {"k": b"\x00" * 100}
    assert store.get_by_alias("lane-box").get() == {"k": b"\x00" * 100}
    with pytest.raises(KeyError, match="no such thing"):
        b.fail()
    assert _lane_sockets(lane_cluster.processes[0].address), "the calls did not use the lane"
    b.delete_persistent()


def test_a_client_with_the_lane_off_sees_the_same_objects(lane_cluster):
    b = Box(41)
    b.make_persistent(alias="lane-off", backend=lane_cluster.backends[1])
    script = (
        "import store, sys\n"
        "store.connect(sys.argv[1], sys.argv[2])\n"
        "b = store.get_by_alias('lane-off')\n"
        "b.put(b.get() + 1)\n"
        "assert store.client().transport._lane is None\n"
        "print(b.get())\n"
    )
    env = dict(os.environ, CLAYPOT_LOCAL_LANE="0")
    out = subprocess.run(
        [sys.executable, "-c", script, lane_cluster.address, lane_cluster.token],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"
    assert b.get() == 42


def test_a_wrong_token_is_refused_on_the_lane(lane_cluster):
    b = Box(1)
    b.make_persistent(alias="lane-token", backend=lane_cluster.backends[0])
    bad = Client(lane_cluster.address, token="not-the-token")
    try:
        with pytest.raises(AuthenticationError):
            bad.get_by_alias("lane-token")
        assert _lane_sockets_of(bad, lane_cluster.address), "the refusal did not come over the lane"
    finally:
        bad.close()


def _lane_sockets_of(client, address):
    lane = client.transport._lane
    return [] if lane is None else list(lane._open.get(address, ()))


def test_a_deadline_ends_the_call_and_the_late_reply_never_answers_the_next(lane_cluster):
    b, other = Box(7), Box(8)
    b.make_persistent(backend=lane_cluster.backends[0])
    other.make_persistent(backend=lane_cluster.backends[0])
    impatient = Client(lane_cluster.address, lane_cluster.token, settings=store.Settings.from_env(call_timeout=0.3))
    try:
        with dispatching(impatient):
            mine, theirs = impatient.get_by_id(b.getID()), impatient.get_by_id(other.getID())
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                mine.slow(1.0, "late")
            assert time.monotonic() - t0 < 0.9
            # The same thread's next calls get their own replies, not the late one:
            # while the first still runs (another object), and after it answered.
            assert theirs.slow(0.0, "first") == "first"
            time.sleep(1.0)
            assert mine.slow(0.0, "second") == "second"
            assert mine.get() == 7 and theirs.get() == 8
    finally:
        impatient.close()


def test_threads_on_one_client_never_cross_replies(lane_cluster):
    boxes = [Box(i) for i in range(8)]
    for i, bx in enumerate(boxes):
        bx.make_persistent(backend=lane_cluster.backends[i % 2])
    errors = []

    def worker(k):
        try:
            for n in range(150):
                tag = f"{k}-{n}"
                assert boxes[k].slow(0.0, tag) == tag
                boxes[k].put(n)
                assert boxes[k].get() == n
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [bx.get() for bx in boxes] == [149] * 8


def test_a_forked_child_uses_its_own_connections(lane_cluster):
    b = Box(0)
    b.make_persistent(backend=lane_cluster.backends[0])
    assert b.get() == 0  # the parent now holds a lane connection
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: calls of its own while the parent calls too
        code = 1
        try:
            os.close(r)
            ok = all(b.slow(0.0, f"child-{n}") == f"child-{n}" for n in range(200))
            code = 0 if ok else 2
        except BaseException:
            code = 3
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    try:
        assert all(b.slow(0.0, f"parent-{n}") == f"parent-{n}" for n in range(200))
    finally:
        _, status = os.waitpid(pid, 0)
    got = os.read(r, 1)
    assert got == b"\x00", (status, got)
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0


def _raw_lane(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(frames.socket_name(address))
    assert sock.recv(len(frames.GREETING) + 1) == frames.GREETING + frames.SERVED
    return sock


@pytest.mark.parametrize(
    "junk",
    [
        b"\xff\xff\xff\xff" + b"x" * 64,  # a length past the limit
        b"\x00\x00\x00\x00",  # an empty frame
        struct.pack("<I", 12) + b"\x0bNotAMethod!",  # a name that is not a method
        struct.pack("<I", 3) + b"abc",  # a request cut inside its header
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_bytes_that_are_not_frames_close_that_connection_only(lane_cluster, junk):
    b = Box("still here")
    b.make_persistent(backend=lane_cluster.backends[0])
    address = lane_cluster.processes[0].address
    sock = _raw_lane(address)
    with sock:
        sock.sendall(junk)
        try:
            rest = sock.recv(1024)
        except (ConnectionResetError, socket.timeout):
            rest = b""
        assert rest == b""  # closed, no answer
    assert b.get() == "still here"


def test_an_unknown_method_or_a_bad_request_gets_a_status_not_a_crash(lane_cluster):
    address = lane_cluster.processes[0].address
    meta = ((TOKEN_HEADER, lane_cluster.token),)
    with _raw_lane(address) as sock:
        sock.sendall(b"".join(frames.request_frame("NoSuchMethod", 5.0, meta, b"")))
        code, _, details, _ = frames.parse_reply(frames.read_reply(sock))
        assert code == 12  # UNIMPLEMENTED
        sock.sendall(b"".join(frames.request_frame("CallStream", 5.0, meta, b"")))
        code, _, _, _ = frames.parse_reply(frames.read_reply(sock))
        assert code == 12  # streams are gRPC's
        sock.sendall(b"".join(frames.request_frame("Call", 5.0, meta, b"\xff\xff\xff")))
        code, _, details, _ = frames.parse_reply(frames.read_reply(sock))
        assert code == 13 and "deserializing" in details  # INTERNAL, as gRPC answers
        sock.sendall(b"".join(frames.request_frame("Ping", 5.0, (), b"")))
        code, reply, _, _ = frames.parse_reply(frames.read_reply(sock))
        assert code == 0 and reply is not None  # the connection still serves


def test_past_its_connection_limit_the_lane_sends_callers_to_grpc(lane_cluster):
    address = lane_cluster.processes[1].address
    held = []
    try:
        while True:  # fill the lane (16 for the default 16 server threads is 64)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(frames.socket_name(address))
            greeting = sock.recv(len(frames.GREETING) + 1)
            held.append(sock)
            if greeting == frames.GREETING + frames.FULL:
                break
            assert greeting == frames.GREETING + frames.SERVED
            assert len(held) <= 1000
        other = Client(lane_cluster.address, lane_cluster.token)
        try:
            b = Box("via grpc")
            b.make_persistent(backend=lane_cluster.backends[1])
            with dispatching(other):
                assert other.get_by_id(b.getID()).get() == "via grpc"
            assert not _lane_sockets_of(other, address)
        finally:
            other.close()
    finally:
        for sock in held:
            sock.close()


def test_kill_9_mid_call_is_an_interrupted_call_and_a_restart_is_found_again(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        store.connect(c.address, c.token)
        b = Box("kept")
        b.make_persistent(alias="lane-kill")
        assert b.get() == "kept"
        proc = c.processes[0]
        killer = threading.Timer(0.5, proc.kill)
        killer.start()
        with pytest.raises((CallInterrupted, BackendUnavailable)):
            b.slow(5.0, "never")
        killer.join()
        c.restart(proc.backend_id)
        # The old connection is dead: the next call finds the restarted backend.
        deadline = time.monotonic() + 30
        while True:
            try:
                assert store.get_by_alias("lane-kill").get() == "kept"
                break
            except BackendUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        # Back on the lane once its address is tried again (it was found absent meanwhile).
        address = c.processes[0].address
        deadline = time.monotonic() + 15
        while not _lane_sockets(address):
            assert time.monotonic() < deadline, "the restarted backend's lane was never used"
            assert store.get_by_alias("lane-kill").get() == "kept"
            time.sleep(0.2)


def test_a_graceful_stop_refuses_new_calls_without_hanging(tmp_path):
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c")) as c:
        store.connect(c.address, c.token)
        b = Box(3)
        b.make_persistent(backend=c.backends[1])
        assert b.get() == 3
        c.processes[1].stop()
        t0 = time.monotonic()
        with pytest.raises(store.errors.ClaypotError):
            b.get()
        assert time.monotonic() - t0 < 30


def test_a_lane_held_by_another_user_never_gets_the_token(tmp_path):
    """A process of another user that binds a backend's lane name (abstract names are
    first come, first served) is never sent a request: the client checks the peer's
    credentials before reading its greeting, and uses gRPC."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the squatter as another user")
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), backend_env={"CLAYPOT_LOCAL_LANE": "0"}) as c:
        address = c.processes[0].address
        script = (
            "import os, socket, sys\n"
            "os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "s.bind(bytes.fromhex(sys.argv[1]))\n"
            "s.listen(8)\n"
            "print('ready', flush=True)\n"
            "got = b''\n"
            "s.settimeout(20)\n"
            "try:\n"
            "    while True:\n"
            "        conn, _ = s.accept()\n"
            "        conn.sendall(b'CPLANE1\\x01')\n"
            "        conn.settimeout(2)\n"
            "        try:\n"
            "            got += conn.recv(65536)\n"
            "        except OSError:\n"
            "            pass\n"
            "except OSError:\n"
            "    pass\n"
            "print(got.hex(), flush=True)\n"
        )
        squatter = subprocess.Popen(
            [sys.executable, "-c", script, frames.socket_name(address).hex()], stdout=subprocess.PIPE, text=True
        )
        try:
            assert squatter.stdout.readline().strip() == "ready"
            store.connect(c.address, c.token)
            b = Box("safe")
            b.make_persistent()
            assert b.get() == "safe"
            assert not _lane_sockets(address)
        finally:
            squatter.terminate()
            out, _ = squatter.communicate(timeout=30)
        assert c.token.encode().hex() not in out
        assert out.strip() == ""  # nothing at all was sent to it
