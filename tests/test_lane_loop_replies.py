"""Large replies on the local lane's event loop, against a hostile tester.

A reply larger than the socket holds is sent by the loop as its client reads
it (EPOLLOUT), not by a thread of its own. These tests try to make such
replies cross, tear, hang the loop, leak a connection or a busy count (a
graceful stop then waits its whole grace), or grow the thread count: many
threads asking for 1-4 MiB beside small calls, raw clients that read a reply
a few KiB at a time or close half-way through it, and a graceful stop while
one is read slowly. Real backends (LocalCluster), real sockets.
"""

import hashlib
import socket
import threading
import time

import pytest

import store
from store import LocalCluster, StorageObject, readonly
from store._client.client import TOKEN_HEADER, Client
from store._model.objects import dispatching
from store._wire import lane as frames

from lanelib import on_lane, raw_lane, socket_count, thread_count  # noqa: E402

pytestmark = pytest.mark.slow

MIB = 1 << 20
# Replies up to 3 MiB (the largest inline limit) come back inline in the lane's reply
# frame, not by a stream or /dev/shm: the frames this file is about.
_INLINE = {"CLAYPOT_INLINE_LIMIT": str(3 * MIB), "CLAYPOT_SHM": "0"}
BIG = 3 * MIB - 4096


def _pattern(seed: str, n: int) -> bytes:
    block = hashlib.sha256(seed.encode()).digest() * 2048  # 64 KiB, distinct per seed
    return (block * (n // len(block) + 1))[:n]


class Source(StorageObject):
    """Returns bytes that name the caller who asked for them."""

    def __init__(self):
        self.hits = 0

    @readonly
    def bytes_for(self, seed, n):
        return _pattern(seed, n)

    @readonly
    def small(self, tag):
        return tag

    @readonly
    def nap(self, seconds, tag):
        time.sleep(seconds)
        return tag


def _client(c, **kw):
    kw.setdefault("call_timeout", 30.0)
    kw.setdefault("inline_limit", 3 * MIB)
    kw.setdefault("shm", False)
    return Client(c.address, c.token, settings=store.Settings.from_env(**kw))


def _until(predicate, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _captured(client, call):
    """The lane frame a real client sends for ``call()`` (made under ``client``), to replay raw."""
    seen = []
    real = frames.request_frame

    def spy(method, timeout, metadata, request):
        seen.append((method, tuple(metadata or ()), bytes(request)))
        return real(method, timeout, metadata, request)

    frames.request_frame = spy
    try:
        with dispatching(client):
            call()
    finally:
        frames.request_frame = real
    method, metadata, request = seen[-1]
    return b"".join(real(method, 60.0, metadata, request))


def _captured_request(client, cell, seed, n):
    """The lane frame for ``cell.bytes_for(seed, n)``, checked once on the way."""

    def call():
        assert cell.bytes_for(seed, n) == _pattern(seed, n)

    return _captured(client, call)


def _captured_small(client, cell):
    """The lane frame for ``cell.small("raw")``."""

    def call():
        assert cell.small("raw") == "raw"

    return _captured(client, call)


def _carries(reply: bytes, seed: str, n: int) -> bool:
    """Whether a raw CallReply holds the value ``_pattern(seed, n)`` inline, whole."""
    return n < len(reply) < n + 4096 and _pattern(seed, n) in reply


def _read_reply_slowly(sock, chunk, pause):
    """A whole reply frame, read ``chunk`` bytes at a time with ``pause`` between reads."""
    data = bytearray()
    while len(data) < 4 or len(data) < 4 + frames.frame_length(bytes(data[:4])):
        got = sock.recv(chunk)
        if not got:
            raise ConnectionResetError("closed mid-reply")
        data += got
        if pause:
            time.sleep(pause)
    length = frames.frame_length(bytes(data[:4]))
    assert len(data) == 4 + length  # nothing past the reply
    code, reply, details, _ = frames.parse_reply(memoryview(data)[4:])
    assert code == frames.OK, details
    return bytes(reply)


@pytest.fixture(scope="module")
def lc(tmp_path_factory):
    with LocalCluster(backends=1, data_dir=str(tmp_path_factory.mktemp("lanereplies") / "c"), backend_env=_INLINE) as c:
        yield c


@pytest.fixture
def client(lc):
    cl = _client(lc)
    yield cl
    cl.close()


@pytest.fixture
def source(lc, client):
    with dispatching(client):
        cell = Source()
        cell.make_persistent(backend=lc.backends[0])
        assert cell.small("x") == "x"
    assert on_lane(client, lc.processes[0].address)
    return cell


def test_many_threads_mixing_1_to_3_mib_replies_with_small_calls_each_get_their_own(lc, source):
    pid = lc.processes[0].proc.pid
    before = thread_count(pid)
    errors, done = [], []
    peak = [before]

    def worker(k):
        cl = _client(lc)
        try:
            with dispatching(cl):
                for i in range(5):
                    seed = f"w{k}-{i}"
                    n = (1 + (k + i) % 3) * MIB - (k * 4099 + i) - 4096  # odd sizes: no two alike
                    got = source.bytes_for(seed, n)
                    assert (
                        len(got) == n and hashlib.sha256(got).digest() == hashlib.sha256(_pattern(seed, n)).digest()
                    ), seed
                    for j in range(3):
                        assert source.small(f"{seed}-{j}") == f"{seed}-{j}"
            assert on_lane(cl, lc.processes[0].address)
            done.append(k)
        except Exception as exc:  # reported below
            errors.append((k, exc))
        finally:
            cl.close()

    replies = []
    real = frames.read_reply

    def seen(sock):
        body = real(sock)
        replies.append(len(body) if body is not None else 0)
        return body

    frames.read_reply = seen  # every reply the callers read came back on the lane
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and time.monotonic() - t0 < 60:
        peak[0] = max(peak[0], thread_count(pid))
        time.sleep(0.05)
    for t in threads:
        t.join(5)
    frames.read_reply = real
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors[:3]
    # The 40 large values came back inline in lane frames, not by a stream or /dev/shm.
    assert sum(n > MIB - 64 * 1024 for n in replies) >= 40, sorted(replies)[-45:]
    assert sorted(done) == list(range(8))
    # The loop sends the big replies itself: no thread per reply.
    assert peak[0] <= before + 12, (before, peak[0])


def test_small_calls_flow_while_a_raw_client_reads_a_3_mib_reply_slowly_and_its_socket_is_freed(lc, client, source):
    address = lc.processes[0].address
    pid = lc.processes[0].proc.pid
    frame = _captured_request(client, source, "slow", BIG)
    sockets_before = socket_count(pid)
    slow = raw_lane(address, 20)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(frame)
    got = []

    def reader():
        got.append(_read_reply_slowly(slow, 16 * 1024, 0.004))

    t = threading.Thread(target=reader)
    t.start()
    try:
        with dispatching(client):
            slowest = 0.0
            k = 0
            while t.is_alive() and k < 400:
                t0 = time.monotonic()
                assert source.small(k) == k
                slowest = max(slowest, time.monotonic() - t0)
                k += 1
        assert k >= 20, "the slow reply finished before the small calls could be timed"
        assert slowest < 1.0, slowest
        t.join(30)
        assert not t.is_alive()
        assert got and _carries(got[0], "slow", BIG)
        # The same connection serves its next call.
        slow.sendall(frame)
        assert _carries(_read_reply_slowly(slow, 256 * 1024, 0), "slow", BIG)
    finally:
        slow.close()
    assert _until(lambda: socket_count(pid) <= sockets_before, 10), (sockets_before, socket_count(pid))


def test_sixteen_raw_clients_reading_at_different_speeds_each_get_their_own_reply(lc, client, source):
    """Many connections in EPOLLOUT mode at once, one reply each, read at their own pace,
    while a real client's small calls keep flowing."""
    address = lc.processes[0].address
    pid = lc.processes[0].proc.pid
    seeds = [f"r{k}" for k in range(16)]
    frames_of = {seed: _captured_request(client, source, seed, BIG - 977 * k) for k, seed in enumerate(seeds)}
    sockets_before = socket_count(pid)
    socks = {seed: raw_lane(address, 20) for seed in seeds}
    results, errors = {}, []

    def reader(k, seed):
        try:
            sock = socks[seed]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096 * (1 + k % 4))
            sock.sendall(frames_of[seed])
            results[seed] = _read_reply_slowly(sock, 4096 * (1 + k % 8), 0.001 * (k % 3))
        except Exception as exc:  # reported below
            errors.append((seed, exc))

    threads = [threading.Thread(target=reader, args=(k, seed)) for k, seed in enumerate(seeds)]
    for t in threads:
        t.start()
    try:
        with dispatching(client):
            slowest, k = 0.0, 0
            while any(t.is_alive() for t in threads) and k < 2000:
                t0 = time.monotonic()
                assert source.small(k) == k
                slowest = max(slowest, time.monotonic() - t0)
                k += 1
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a raw reader hung"
        assert not errors, errors[:3]
        for k, seed in enumerate(seeds):
            assert _carries(results[seed], seed, BIG - 977 * k), seed
        assert slowest < 1.0, slowest
    finally:
        for sock in socks.values():
            sock.close()
    assert _until(lambda: socket_count(pid) <= sockets_before, 10), (sockets_before, socket_count(pid))


def test_hand_overs_while_a_reply_is_read_slowly_lose_none_of_it(lc, client, source):
    """Calls that sleep past the hand-over time move the loop to new owner threads
    while a 3 MiB reply is in EPOLLOUT mode: it still arrives whole, and the
    threads go back near their count."""
    address = lc.processes[0].address
    pid = lc.processes[0].proc.pid
    frame = _captured_request(client, source, "handover", BIG)
    threads_before = thread_count(pid)
    slow = raw_lane(address, 20)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(frame)
    got, errors = [], []

    def reader():
        try:
            got.append(_read_reply_slowly(slow, 8 * 1024, 0.003))
        except Exception as exc:  # reported below
            errors.append(exc)

    def napper(k):
        cl = _client(lc)
        try:
            with dispatching(cl):
                for i in range(15):
                    tag = f"{k}-{i}"
                    assert source.nap(0.02 if i % 2 else 0.0, tag) == tag
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            cl.close()

    r = threading.Thread(target=reader)
    nappers = [threading.Thread(target=napper, args=(k,)) for k in range(6)]
    r.start()
    for t in nappers:
        t.start()
    try:
        for t in nappers + [r]:
            t.join(60)
        assert not any(t.is_alive() for t in nappers + [r]), "a caller hung"
        assert not errors, errors[:3]
        assert got and _carries(got[0], "handover", BIG)
    finally:
        slow.close()
    assert _until(lambda: thread_count(pid) <= threads_before + 4, 10), (threads_before, thread_count(pid))


def test_clients_closing_half_way_through_their_large_replies_leak_nothing(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), backend_env=_INLINE) as c:
        proc = c.processes[0]
        address, pid = proc.address, proc.proc.pid
        cl = _client(c)
        try:
            with dispatching(cl):
                cell = Source()
                cell.make_persistent(backend=c.backends[0])
                assert cell.small(1) == 1

            frame = _captured_request(cl, cell, "gone", BIG)
            small = _captured_small(cl, cell)
            threads_before, sockets_before = thread_count(pid), socket_count(pid)
            churn_errors, stop_churn = [], threading.Event()

            def churn():
                # New connections while the others close: their fds are reused at once, so
                # a late event or forget of a closed connection would land on one of these.
                try:
                    while not stop_churn.is_set():
                        with raw_lane(address, 20) as s:
                            s.sendall(small)
                            code, _, details, _ = frames.parse_reply(frames.read_reply(s))
                            assert code == frames.OK, details
                except Exception as exc:  # reported below
                    churn_errors.append(exc)

            churners = [threading.Thread(target=churn) for _ in range(3)]
            for t in churners:
                t.start()
            try:
                for round_ in range(3):
                    socks = []
                    for i in range(16):
                        s = raw_lane(address, 20)
                        s.sendall(frame)
                        socks.append(s)
                    for i, s in enumerate(socks):
                        # Some read a part of the reply first, some nothing at all.
                        if i % 2:
                            assert len(s.recv(64 * 1024)) > 0
                        s.close()
            finally:
                stop_churn.set()
                for t in churners:
                    t.join(30)
            assert not churn_errors, churn_errors[:3]
            # The backend keeps serving, its own bytes to each caller.
            with dispatching(cl):
                for k in range(30):
                    assert cell.small(k) == k
                assert cell.bytes_for("after", 2 * MIB) == _pattern("after", 2 * MIB)
            assert _until(lambda: socket_count(pid) <= sockets_before, 10), (sockets_before, socket_count(pid))
            assert thread_count(pid) <= threads_before + 4, (threads_before, thread_count(pid))
        finally:
            cl.close()
        # Every busy count went back to zero: the stop does not wait out its grace (1 s).
        took = proc.stop()
        assert took < 1.0, took


def test_a_graceful_stop_while_a_large_reply_is_read_slowly_ends_it_whole_or_not_at_all(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), backend_env=_INLINE) as c:
        proc = c.processes[0]
        cl = _client(c)
        try:
            with dispatching(cl):
                cell = Source()
                cell.make_persistent(backend=c.backends[0])
                assert cell.small(1) == 1

            frame = _captured_request(cl, cell, "stop", BIG)
        finally:
            cl.close()
        slow = raw_lane(proc.address, 20)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(frame)
        outcome = []

        def reader():
            try:
                outcome.append(_read_reply_slowly(slow, 8 * 1024, 0.01))
            except (ConnectionResetError, BrokenPipeError, socket.timeout) as exc:
                outcome.append(exc)

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.3)
        try:
            took = proc.stop()
            # The stop waits its grace for the reply, then ends: it never hangs on it.
            assert took < 10, took
            t.join(30)
            assert not t.is_alive()
            assert outcome
            if isinstance(outcome[0], bytes):
                assert _carries(outcome[0], "stop", BIG)
        finally:
            slow.close()


def test_a_refusal_to_a_client_that_does_not_read_its_replies_stalls_no_one(lc, client, source):
    """A caller with the token asks for a reply that just fills its socket and reads none
    of it, then sends a request without the token: the loop's refusal must not wait
    for room (up to the 120 s send timeout) while every other caller waits for it."""
    address = lc.processes[0].address
    refused = b"".join(frames.request_frame("Call", 5.0, ((TOKEN_HEADER, "not-the-token"),), b"\xff" * 16))
    stuck = []
    quick = _client(lc, call_timeout=4.0)
    try:
        # Sizes around the socket's send buffer: one of them is sent whole and leaves it full.
        with open("/proc/sys/net/core/wmem_default") as f:
            wmem = int(f.read())
        for k, n in enumerate(range(wmem - 17_000, wmem + 5_000, 1000)):
            seed = f"full{k}"
            frame = _captured_request(client, source, seed, n)
            sock = raw_lane(address, 20)
            sock.sendall(frame)
            stuck.append(sock)
            time.sleep(0.1)  # its reply is sent (or waits for room); the next request is read after
            sock.sendall(refused)
            time.sleep(0.1)
            with dispatching(quick):
                t0 = time.monotonic()
                for i in range(5):
                    assert source.small(i) == i, n
                assert time.monotonic() - t0 < 3.0, n
    finally:
        quick.close()
        for sock in stuck:
            sock.close()


def test_readers_that_leave_during_a_graceful_stop_end_its_wait_for_their_replies(tmp_path):
    """Eight raw clients stop reading their 3 MiB replies; a graceful stop waits for those
    replies; the clients close a moment later: the loop, still running, counts each
    one done, so the stop ends then, not at the end of its grace (1 s)."""
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), backend_env=_INLINE) as c:
        proc = c.processes[0]
        cl = _client(c)
        try:
            with dispatching(cl):
                cell = Source()
                cell.make_persistent(backend=c.backends[0])
            frame = _captured_request(cl, cell, "leave", BIG)
        finally:
            cl.close()
        socks = []
        for _ in range(8):
            s = raw_lane(proc.address, 20)
            s.sendall(frame)
            assert len(s.recv(64 * 1024)) > 0  # its reply began, then nobody reads
            socks.append(s)
        time.sleep(0.2)
        closer = threading.Timer(0.2, lambda: [s.close() for s in socks])
        closer.start()
        try:
            took = proc.stop()
        finally:
            closer.join(5)
        # 0.2 s until the clients leave, then the backend's own shutdown (0.5 s here); a
        # stop that waited out its grace would take that grace (1 s) plus the shutdown.
        assert 0.2 <= took < 1.25, took
