"""The local lane against a hostile tester: what the gRPC path kept, the lane must keep.

Real backends (LocalCluster on loopback), real processes, real signals. Each
test tries to make the lane cross replies, hang, run a call twice, leak the
token or lose an error that gRPC would have given.
"""

import os
import signal
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
from store.errors import (
    BackendDown,
    BackendUnavailable,
    CallInterrupted,
    ClaypotError,
    DeadlineExceeded,
)

pytestmark = pytest.mark.slow


class Cell(StorageObject):
    """A counter whose every increment returns its own number, and methods that take time."""

    def __init__(self, value=0):
        self.value = value
        self.count = 0

    def incr(self):
        self.count += 1
        return self.count

    @readonly
    def get(self):
        return self.value

    @readonly
    def echo(self, seconds, tag):
        time.sleep(seconds)
        return tag

    @readonly
    def relay(self, other, tag, depth):
        """A call nested from this backend to ``other`` (another backend of this host)."""
        if depth <= 0:
            return tag
        return other.relay(self, tag, depth - 1)


@pytest.fixture(scope="module")
def hc(tmp_path_factory):
    with LocalCluster(backends=2, data_dir=str(tmp_path_factory.mktemp("lanehostile") / "c")) as c:
        yield c


@pytest.fixture
def connected(hc):
    store.connect(hc.address, hc.token)
    yield hc


def _lane_sockets(client, address):
    lane = client.transport._lane
    return [] if lane is None else list(lane._open.get(address, ()))


def _raw(address, timeout=10.0):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(frames.socket_name(address))
    assert sock.recv(len(frames.GREETING) + 1) == frames.GREETING + frames.SERVED
    return sock


# -- correctness under concurrency ------------------------------------------------


def test_a_signal_handler_calling_mid_call_gets_its_own_reply(connected):
    """A handler runs on the main thread between two bytecodes of a call in flight:
    a call it makes must not ride the connection that waits for the first reply."""
    hc = connected
    slow, other = Cell(), Cell()
    slow.make_persistent(backend=hc.backends[0])
    other.make_persistent(backend=hc.backends[0])
    assert other.echo(0.0, "warm") == "warm"  # the main thread holds a lane connection now
    assert _lane_sockets(store.client(), hc.processes[0].address)
    got = []

    def handler(signum, frame):
        got.append(other.echo(0.0, "from-handler"))

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        main = slow.echo(1.0, "main")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert got == ["from-handler"]
    assert main == "main"
    assert other.echo(0.0, "after") == "after"  # and the connection is still in step


def test_threads_and_processes_never_get_each_others_replies(connected):
    """Writers in 3 processes x 4 threads on one shared object, readers on separate
    ones: every increment number comes back exactly once, every echo is its own."""
    hc = connected
    shared = Cell()
    shared.make_persistent(alias="lane-hostile-shared", backend=hc.backends[0])
    mine = [Cell(k) for k in range(4)]
    for k, c in enumerate(mine):
        c.make_persistent(backend=hc.backends[k % 2])
    script = (
        "import store, sys, threading\n"
        "store.connect(sys.argv[1], sys.argv[2])\n"
        "s = store.get_by_alias('lane-hostile-shared')\n"
        "out, bad = [], []\n"
        "def work(t):\n"
        "    for n in range(100):\n"
        "        out.append(s.incr())\n"
        "        tag = f'{sys.argv[3]}-{t}-{n}'\n"
        "        if s.echo(0.0, tag) != tag: bad.append(tag)\n"
        "ts = [threading.Thread(target=work, args=(t,)) for t in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "assert store.client().transport._lane._open, 'no lane used'\n"
        "print(len(bad), ' '.join(map(str, out)))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, hc.address, hc.token, f"p{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    errors = []

    def local(k):
        try:
            for n in range(150):
                tag = f"local-{k}-{n}"
                assert mine[k].echo(0.0, tag) == tag
                assert mine[k].get() == k
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=local, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    numbers = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        bad, _, nums = out.strip().partition(" ")
        assert bad == "0"
        numbers += [int(x) for x in nums.split()]
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(numbers) == list(range(1, 1201))
    assert shared.incr() == 1201


_FORKER = r"""
import os, sys, threading, time
import store
store.connect(sys.argv[1], sys.argv[2])
cells = [store.get_by_alias(f"lane-fork-{k}") for k in range(3)]
stop = threading.Event()
errors, done = [], [0, 0, 0]

def busy(k):
    try:
        n = 0
        while not stop.is_set():
            tag = f"parent-{k}-{n}"
            got = cells[k].echo(0.005, tag)
            assert got == tag, (got, tag)
            n += 1
        done[k] = n
    except Exception as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=busy, args=(k,)) for k in range(3)]
for t in threads:
    t.start()
bad = []
for f in range(6):
    time.sleep(0.05)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ok = all(cells[n % 3].echo(0.0, f"child-{f}-{n}") == f"child-{f}-{n}" for n in range(60))
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status:
        bad.append(os.waitstatus_to_exitcode(status))
stop.set()
for t in threads:
    t.join()
assert store.client().transport._lane._open, "the parent's calls did not use the lane"
print(bad, errors, all(done))
"""


def test_forks_while_other_threads_are_mid_call(connected):
    """Forked children of a process whose threads are mid-call on the lane: the
    children use connections of their own, the parent's threads get their own replies,
    and gRPC's fork handlers (on by default) do not crash a child (they did, now and
    then, while the lane connected each gRPC channel in the background)."""
    hc = connected
    for k in range(3):
        Cell(k).make_persistent(alias=f"lane-fork-{k}", backend=hc.backends[k % 2])
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", _FORKER, hc.address, hc.token], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[-2] == "[] [] True", out.stdout


def test_many_threads_past_their_deadlines_never_read_a_late_reply(connected):
    hc = connected
    cells = [Cell(k) for k in range(12)]
    for k, c in enumerate(cells):
        c.make_persistent(backend=hc.backends[k % 2])
    impatient = Client(hc.address, hc.token, settings=store.Settings.from_env(call_timeout=0.4))
    errors = []
    try:
        with dispatching(impatient):
            mine = [impatient.get_by_id(c.getID()) for c in cells]

        def worker(k):
            try:
                with dispatching(impatient):
                    for n in range(3):
                        with pytest.raises(DeadlineExceeded):
                            mine[k].echo(1.0, f"late-{k}-{n}")
                        for m in range(5):  # right away, on the same connection
                            tag = f"own-{k}-{n}-{m}"
                            assert mine[k + 6].echo(0.0, tag) == tag
            except BaseException as exc:  # reported below (pytest.raises fails with BaseException)
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert _lane_sockets(impatient, hc.processes[0].address)
    finally:
        impatient.close()


def test_calls_nested_between_two_backends_of_this_host(connected):
    hc = connected
    a, b = Cell(), Cell()
    a.make_persistent(backend=hc.backends[0])
    b.make_persistent(backend=hc.backends[1])
    errors = []

    def worker(k):
        try:
            for n in range(10):
                tag = f"nested-{k}-{n}"
                assert a.relay(b, tag, 4) == tag
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_a_3_mib_inline_argument_and_reply_cross_the_lane_whole(connected):
    hc = connected
    c = Cell()
    c.make_persistent(backend=hc.backends[1])
    other = Client(
        hc.address, hc.token, settings=store.Settings.from_env(inline_limit=3 * 1024 * 1024, shm_min=1 << 40)
    )
    try:
        with dispatching(other):
            mine = other.get_by_id(c.getID())
            value = bytes(range(256)) * (3 * 4096 - 64)
            assert mine.echo(0.0, value) == value
        assert _lane_sockets(other, hc.processes[1].address)
    finally:
        other.close()


def test_a_deadline_already_past_is_deadline_exceeded_on_both_paths(connected):
    """A negative call_timeout (the settings accept it) gives gRPC a deadline in the past."""
    hc = connected
    timeout = -1.0
    c = Cell("untouched")
    c.make_persistent(backend=hc.backends[0])
    for lane in (False, True):
        other = Client(hc.address, hc.token, settings=store.Settings.from_env(call_timeout=timeout, local_lane=lane))
        try:
            with dispatching(other):
                mine = other.get_by_id(c.getID())
                with pytest.raises(DeadlineExceeded):
                    mine.echo(0.0, "never")
        finally:
            other.close()
    assert c.get() == "untouched"


# -- hostile bytes and the token -------------------------------------------------


def test_a_wrong_or_missing_token_is_refused_before_the_request_is_read(connected):
    hc = connected
    address = hc.processes[0].address
    junk = b"\xff\xff\xff\xff"  # would be INTERNAL ("deserializing") if it were parsed
    for meta in ((), ((TOKEN_HEADER, "not-the-token"),), ((TOKEN_HEADER, ""),)):
        with _raw(address) as sock:
            sock.sendall(b"".join(frames.request_frame("Call", 5.0, meta, junk)))
            code, reply, details, _ = frames.parse_reply(frames.read_reply(sock))
            assert code == 16 and reply is None, (code, details)  # UNAUTHENTICATED


def test_a_caller_without_the_token_cannot_make_the_backend_hold_its_request(connected):
    """gRPC's token interceptor runs on the headers, before the message arrives: a
    refused caller never makes the backend buffer a request. The lane reads the
    token first too, so 8 unfinished 16 MiB frames without it cost the backend nothing."""
    import psutil

    hc = connected
    backend = psutil.Process(hc.processes[1].proc.pid)
    address = hc.processes[1].address
    meta = ((TOKEN_HEADER, "not-the-token"),)
    head = b"".join(frames.request_frame("Call", 5.0, meta, b""))[4:]
    chunk = b"\x00" * (12 * 1024 * 1024)
    before = backend.memory_info().rss
    held = []
    refused = 0
    try:
        for _ in range(8):
            sock = _raw(address)
            held.append(sock)
            try:
                # A whole head's worth of bytes (HEAD_LIMIT) is what the backend reads first.
                sock.sendall(struct.pack("<I", frames.MAX_FRAME) + head + b"\x00" * (frames.HEAD_LIMIT - len(head)))
                sock.settimeout(2.0)
                code, _, _, _ = frames.parse_reply(frames.read_reply(sock))
                refused += code == 16  # UNAUTHENTICATED, on the first bytes
                sock.sendall(chunk)  # and the rest is not read: the connection is closed
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                pass
        time.sleep(0.5)
        grown = backend.memory_info().rss - before
    finally:
        for sock in held:
            sock.close()
    assert refused == 8
    assert grown < 48 * 1024 * 1024, f"the backend holds {grown >> 20} MiB of refused requests"
    c = Cell("fine")
    c.make_persistent(backend=hc.backends[1])
    assert c.get() == "fine"


def test_a_wrong_token_with_a_large_request_gets_its_refusal_not_a_broken_pipe(connected):
    """The refusal comes on the request's first bytes while the caller still sends the
    rest: it must be able to send it all and read UNAUTHENTICATED (a client would
    otherwise see a connection that broke, BackendUnavailable, and retry)."""
    hc = connected
    meta = ((TOKEN_HEADER, "not-the-token"),)
    with _raw(hc.processes[0].address) as sock:
        sock.sendall(b"".join(frames.request_frame("Call", 5.0, meta, b"\x01" * (4 * 1024 * 1024))))
        code, _, details, _ = frames.parse_reply(frames.read_reply(sock))
        assert code == 16, (code, details)
        assert sock.recv(1) == b""  # and then the connection ends


def test_slowloris_and_huge_length_prefixes_leave_other_callers_served(connected):
    hc = connected
    address = hc.processes[1].address
    c = Cell("served")
    c.make_persistent(backend=hc.backends[1])
    held = []
    try:
        for i in range(80):  # past the lane's 64 connections
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(frames.socket_name(address))
            greeting = sock.recv(len(frames.GREETING) + 1)
            held.append(sock)
            if greeting != frames.GREETING + frames.SERVED:
                continue
            if i % 2:
                sock.sendall(struct.pack("<I", frames.MAX_FRAME) + b"x")  # 16 MiB announced, 1 byte sent
            else:
                sock.sendall(struct.pack("<I", 100) + b"\x04Ping")  # half a header, never finished
        fresh = Client(hc.address, hc.token)
        try:
            with dispatching(fresh):
                t0 = time.monotonic()
                assert fresh.get_by_id(c.getID()).get() == "served"
                assert time.monotonic() - t0 < 20
        finally:
            fresh.close()
    finally:
        for sock in held:
            sock.close()
    # Once they go, the lane serves again.
    deadline = time.monotonic() + 20
    while True:
        again = Client(hc.address, hc.token)
        try:
            with dispatching(again):
                assert again.get_by_id(c.getID()).get() == "served"
            if _lane_sockets(again, address):
                break
        finally:
            again.close()
        assert time.monotonic() < deadline, "the lane never served again"
        time.sleep(0.5)


def test_a_thousand_connections_at_once_neither_hang_nor_break_the_backend(connected):
    hc = connected
    address = hc.processes[0].address
    c = Cell("alive")
    c.make_persistent(backend=hc.backends[0])
    socks = []
    try:
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(frames.socket_name(address))
            except (BlockingIOError, ConnectionRefusedError):
                pass  # the backlog is full: that is the kernel's answer, not a hang
            socks.append(sock)
        other = Client(hc.address, hc.token)
        try:
            with dispatching(other):
                t0 = time.monotonic()
                for n in range(20):
                    assert other.get_by_id(c.getID()).echo(0.0, n) == n
                assert time.monotonic() - t0 < 30
        finally:
            other.close()
    finally:
        for sock in socks:
            sock.close()
    assert c.get() == "alive"


def test_random_bytes_on_many_connections_touch_nothing(connected):
    hc = connected
    address = hc.processes[0].address
    c = Cell("untouched")
    c.make_persistent(backend=hc.backends[0])
    rng = __import__("random").Random(1616)
    for _ in range(40):
        with _raw(address) as sock:
            n = rng.randrange(1, 4096)
            body = bytes(rng.getrandbits(8) for _ in range(n))
            try:
                sock.sendall(struct.pack("<I", n) + body)
                answer = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError, socket.timeout):
                answer = b""
            if answer:  # a frame that happened to parse: it gets a status, never a crash
                assert len(answer) >= 5
    assert c.get() == "untouched"
    assert c.echo(0.0, "ok") == "ok"


# -- a process that is not the backend holds the lane's name ------------------------


_SQUATTER = r"""
import os, socket, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)  # before listen(): SO_PEERCRED names the user that listened
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(b"\0claypot-lane:" + sys.argv[1].encode())
s.listen(64)
print("bound", flush=True)
got = 0
s.settimeout(float(sys.argv[2]))
try:
    while True:
        c, _ = s.accept()
        c.settimeout(1.0)
        try:
            c.sendall(b"CPLANE1\x01")
            while True:
                data = c.recv(65536)
                if not data:
                    break
                got += len(data)
        except OSError:
            pass  # a client that left
        c.close()
except socket.timeout:
    pass
print(got, flush=True)
"""


def _squat(address, accepting_for):
    """A process of user nobody that binds the lane name of ``address``, answers like a
    backend's lane and prints how many bytes it was sent."""
    return subprocess.Popen(
        [sys.executable, "-c", _SQUATTER, address, str(accepting_for)], stdout=subprocess.PIPE, text=True
    )


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_squatter_of_another_user_never_gets_the_token_or_a_request(tmp_path):
    """Abstract names have no permissions: any local user may bind a backend's lane
    name before it starts. A client must not send its token there; the backend's
    gRPC port (which the squatter could not take) serves instead."""
    assert os.geteuid() == 0, "needs root, to run the squatter as another user"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    squatter = _squat(address, 5.0)
    try:
        assert squatter.stdout.readline().strip() == "bound"
        with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), ports=[port]) as c:
            assert c.processes[0].address == address
            client = Client(c.address, c.token, settings=store.Settings.from_env(call_timeout=10))
            try:
                with dispatching(client):
                    cell = Cell("real")
                    cell.make_persistent()
                    assert cell.echo(0.0, "via grpc") == "via grpc"
                    assert cell.get() == "real"
                assert not _lane_sockets(client, address)
            finally:
                client.close()
        got = squatter.stdout.readline().strip()
    finally:
        if squatter.poll() is None:
            squatter.kill()
        squatter.communicate(timeout=30)
    assert got == "0", f"the squatter was sent {got} bytes"


# -- failures --------------------------------------------------------------------


def test_sigstop_ends_calls_at_their_deadline_and_the_watchdog_drops_lane_calls(tmp_path):
    env = {"CLAYPOT_HEARTBEAT_TTL": "2"}
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c"), backend_env=env) as c:
        client = Client(c.address, c.token, settings=store.Settings.from_env(heartbeat_ttl=2.0, call_timeout=1.5))
        stopped = c.processes[1]
        try:
            with dispatching(client):
                cell = Cell()
                cell.make_persistent(backend=c.backends[1])
                mine = client.get_by_id(cell.getID())
                assert mine.echo(0.0, "up") == "up"
                assert _lane_sockets(client, stopped.address)
                os.kill(stopped.proc.pid, signal.SIGSTOP)
                try:
                    t0 = time.monotonic()
                    with pytest.raises(DeadlineExceeded):
                        mine.echo(0.0, "short")
                    assert time.monotonic() - t0 < 10
                    # A long call (watched): its backend's heartbeat expires and the
                    # watchdog ends it long before its own deadline.
                    client.settings = client.settings.replace(call_timeout=60.0)
                    t0 = time.monotonic()
                    with pytest.raises((BackendDown, CallInterrupted, BackendUnavailable)):
                        mine.echo(0.0, "long")
                    assert time.monotonic() - t0 < 30
                finally:
                    os.kill(stopped.proc.pid, signal.SIGCONT)
                deadline = time.monotonic() + 30
                while True:
                    try:
                        assert mine.echo(0.0, "back") == "back"
                        break
                    except ClaypotError:
                        assert time.monotonic() < deadline
                        time.sleep(0.3)
        finally:
            client.close()


def test_kill_9_with_many_calls_in_flight_ends_each_with_a_may_have_run_error(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        client = Client(c.address, c.token, settings=store.Settings.from_env(call_timeout=30))
        try:
            with dispatching(client):
                cells = [Cell(k) for k in range(6)]
                for cell in cells:
                    cell.make_persistent()
                outcomes = [None] * 6

                def worker(k):
                    with dispatching(client):
                        try:
                            outcomes[k] = cells[k].echo(10.0, f"never-{k}")
                        except BaseException as exc:  # recorded below
                            outcomes[k] = exc

                threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
                for t in threads:
                    t.start()
                time.sleep(1.0)
                t0 = time.monotonic()
                c.processes[0].kill()
                for t in threads:
                    t.join(60)
                assert time.monotonic() - t0 < 30
            assert all(isinstance(o, (CallInterrupted, BackendUnavailable)) for o in outcomes), outcomes
            # Sent whole before the kill: the error must say it may have run.
            assert all(isinstance(o, CallInterrupted) for o in outcomes), outcomes
        finally:
            client.close()


def test_a_graceful_stop_with_calls_in_flight_answers_or_fails_them_never_wrongly(tmp_path):
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c")) as c:
        client = Client(c.address, c.token, settings=store.Settings.from_env(call_timeout=30))
        try:
            with dispatching(client):
                cells = [Cell(k) for k in range(4)]
                for cell in cells:
                    cell.make_persistent(backend=c.backends[1])
                outcomes = [None] * 4

                def worker(k):
                    with dispatching(client):
                        try:
                            outcomes[k] = cells[k].echo(0.5, f"tag-{k}")
                        except BaseException as exc:  # recorded below
                            outcomes[k] = exc

                threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
                for t in threads:
                    t.start()
                time.sleep(0.2)
                c.processes[1].stop()
                for t in threads:
                    t.join(60)
            for k, o in enumerate(outcomes):
                assert o == f"tag-{k}" or isinstance(o, ClaypotError), outcomes
        finally:
            client.close()


# -- when the lane must not be used ----------------------------------------------


def test_a_backend_with_the_lane_off_opens_no_lane_and_serves_over_grpc(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), backend_env={"CLAYPOT_LOCAL_LANE": "0"}) as c:
        address = c.processes[0].address
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(frames.socket_name(address))
        client = Client(c.address, c.token)
        try:
            with dispatching(client):
                cell = Cell(5)
                cell.make_persistent()
                assert cell.get() == 5
            assert not _lane_sockets(client, address)
        finally:
            client.close()


def test_a_tls_cluster_never_opens_or_uses_a_lane(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), tls=True) as c:
        address = c.processes[0].address
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(frames.socket_name(address))
        client = Client(c.address, c.token, settings=store.Settings.from_env(tls_ca=c.tls_ca))
        try:
            with dispatching(client):
                cell = Cell(6)
                cell.make_persistent()
                assert cell.get() == 6
            assert client.transport._lane is None
        finally:
            client.close()
