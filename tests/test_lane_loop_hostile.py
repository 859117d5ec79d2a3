"""The local lane's event loop against a hostile tester.

One owner thread answers every lane connection, makes each batch durable with
one fsync and hands the loop to a new thread when a call runs long. These
tests try to make it stall, cross or lose replies, run a changing call twice,
leak threads, or acknowledge what a kill -9 then loses. Real backends
(LocalCluster), real processes, real sockets, real signals.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import chaos
import pytest

import store
from store import LocalCluster, StorageObject, readonly
from store._client.client import Client
from store._model.objects import dispatching
from store.errors import ClaypotError

from lanelib import on_lane, raw_lane, thread_count  # noqa: E402

pytestmark = pytest.mark.slow


class Tally(StorageObject):
    """A counter, a value, and methods that take time or fail in odd ways."""

    def __init__(self, value=0):
        self.value = value
        self.count = 0

    def incr(self):
        self.count += 1
        return self.count

    def put(self, value):
        self.value = value
        return value

    @readonly
    def get(self):
        return self.value

    @readonly
    def total(self):
        return self.count

    @readonly
    def echo(self, seconds, tag):
        time.sleep(seconds)
        return tag

    @readonly
    def spin(self, seconds, tag):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        return tag

    @readonly
    def blob(self, n):
        return b"z" * n

    @readonly
    def leave(self):
        raise SystemExit(3)

    @readonly
    def relay(self, other, tag, depth):
        if depth <= 0:
            return tag
        return other.relay(self, tag, depth - 1)


def _client(c, **kw):
    kw.setdefault("call_timeout", 20.0)
    return Client(c.address, c.token, settings=store.Settings.from_env(**kw))


@pytest.fixture(scope="module")
def lc(tmp_path_factory):
    with LocalCluster(backends=2, data_dir=str(tmp_path_factory.mktemp("laneloop") / "c")) as c:
        yield c


@pytest.fixture
def client(lc):
    cl = _client(lc)
    yield cl
    cl.close()


# -- liveness -----------------------------------------------------------------------


def test_a_method_raising_systemexit_fails_its_call_and_the_lane_keeps_serving(lc, client):
    """SystemExit is a BaseException: it must not end the loop's only owner thread."""
    address = lc.processes[0].address
    with dispatching(client):
        cell = Tally(1)
        cell.make_persistent(backend=lc.backends[0])
        assert cell.get() == 1
        assert on_lane(client, address)
        t0 = time.monotonic()
        with pytest.raises(ClaypotError):
            cell.leave()
        assert time.monotonic() - t0 < 10
        for k in range(20):
            t0 = time.monotonic()
            assert cell.echo(0.0, k) == k
            assert time.monotonic() - t0 < 5
        assert on_lane(client, address)


def test_a_sleeping_call_holds_up_no_one_and_eight_sleep_side_by_side(lc, client):
    with dispatching(client):
        cells = [Tally(k) for k in range(9)]
        for cell in cells:
            cell.make_persistent(backend=lc.backends[0])
            cell.get()
        done = []

        def long_one():
            with dispatching(client):
                done.append(cells[8].echo(2.0, "slow"))

        slow = threading.Thread(target=long_one)
        slow.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        for k in range(50):
            assert cells[k % 8].get() == k % 8
        assert time.monotonic() - t0 < 1.5  # not behind the 2 s call
        assert not done  # which was still running
        slow.join(10)
        assert done == ["slow"]
        got = [None] * 8

        def sleeper(k):
            with dispatching(client):
                got[k] = cells[k].echo(1.0, f"s{k}")

        threads = [threading.Thread(target=sleeper, args=(k,)) for k in range(8)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert got == [f"s{k}" for k in range(8)]
        assert time.monotonic() - t0 < 4.0  # side by side (8 in series would be 8 s)


def test_calls_nested_back_into_the_first_backend_complete(lc, client):
    with dispatching(client):
        a, b = Tally(), Tally()
        a.make_persistent(backend=lc.backends[0])
        b.make_persistent(backend=lc.backends[1])
        for depth in (2, 5, 9):
            t0 = time.monotonic()
            assert a.relay(b, f"d{depth}", depth) == f"d{depth}"
            assert time.monotonic() - t0 < 10
        results = [None] * 6

        def worker(k):
            with dispatching(client):
                results[k] = a.relay(b, k, 6)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == list(range(6))


_BIG_READER = r"""
import sys, store
store.connect(sys.argv[1], sys.argv[2])
cell = store.get_by_alias(sys.argv[3])
assert cell.get() == 7
print("ready", flush=True)
while True:
    assert len(cell.blob(3 << 20)) == 3 << 20
"""


def test_a_stalled_half_frame_and_an_unread_3_mib_reply_stall_no_one(lc, client):
    """A raw client sends half a request and stalls; a real client asks for 3 MiB
    replies and is frozen (SIGSTOP) mid-read: the others are served on time."""
    address = lc.processes[0].address
    with dispatching(client):
        cell = Tally(7)
        cell.make_persistent(alias="loop-big-reader", backend=lc.backends[0])
        assert cell.get() == 7
    half = raw_lane(address, 10)
    half.sendall((1 << 20).to_bytes(4, "little") + b"\x04Call")
    reader = subprocess.Popen(
        [sys.executable, "-c", _BIG_READER, lc.address, lc.token, "loop-big-reader"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        os.kill(reader.pid, signal.SIGSTOP)
        time.sleep(0.3)
        with dispatching(client):
            t0 = time.monotonic()
            for k in range(40):
                assert cell.echo(0.0, k) == k
            assert time.monotonic() - t0 < 3.0
    finally:
        half.close()
        reader.kill()
        reader.wait(10)
        reader.stdout.close()


# -- hand-overs under load ------------------------------------------------------------


def test_long_and_short_calls_mixed_for_a_while_lose_cross_or_repeat_nothing(lc, client):
    """12 threads for 6 s: sleeps of 0-30 ms (around the hand-over threshold), reads,
    increments on a shared counter. Each reply is its own, each increment number
    comes back once, no short call waits long, and the backend's threads come back
    near where they were once the load stops."""
    pid = lc.processes[0].proc.pid
    with dispatching(client):
        shared = Tally()
        shared.make_persistent(backend=lc.backends[0])
        mine = [Tally(k) for k in range(12)]
        for cell in mine:
            cell.make_persistent(backend=lc.backends[0])
            cell.get()
    before = thread_count(pid)
    stop = time.monotonic() + 6.0
    numbers, errors, slowest = [], [], [0.0]

    def worker(k):
        rng = random.Random(k)
        try:
            with dispatching(client):
                n = 0
                while time.monotonic() < stop:
                    pick = rng.random()
                    t0 = time.monotonic()
                    if pick < 0.3:
                        numbers.append(shared.incr())
                    elif pick < 0.6:
                        tag = f"{k}-{n}"
                        got = mine[k].echo(rng.choice((0.0, 0.004, 0.005, 0.006, 0.03)), tag)
                        assert got == tag, (got, tag)
                    else:
                        assert mine[k].get() == k
                        slowest[0] = max(slowest[0], time.monotonic() - t0)
                    n += 1
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    peak = before
    while any(t.is_alive() for t in threads):
        peak = max(peak, thread_count(pid))
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert sorted(numbers) == list(range(1, len(numbers) + 1))
    with dispatching(client):
        assert shared.total() == len(numbers)
    # A read waits at most for a batch's fsync and a hand-over, never for a poll's timeout.
    assert slowest[0] < 0.5, slowest[0]
    time.sleep(1.0)
    after = thread_count(pid)
    assert after <= before + 4, (before, peak, after)


def test_a_long_call_started_under_load_always_gets_a_thread_of_its_own(lc, client):
    """Short calls keep the owner busy while long calls start now and then: whatever
    the watchdog saw just before, each long call is handed its own thread, so no
    short call ever waits for one."""
    with dispatching(client):
        slow = Tally()
        slow.make_persistent(backend=lc.backends[0])
        quick = [Tally(k) for k in range(5)]
        for cell in quick:
            cell.make_persistent(backend=lc.backends[0])
            cell.get()
    done = threading.Event()
    worst, errors = [0.0] * 5, []

    def short(k):
        try:
            with dispatching(client):
                while not done.is_set():
                    t0 = time.monotonic()
                    assert quick[k].get() == k
                    worst[k] = max(worst[k], time.monotonic() - t0)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=short, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    try:
        with dispatching(client):
            for n in range(12):
                assert slow.echo(0.4, n) == n
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert max(worst) < 0.3, worst


def test_calls_nested_back_into_a_busy_backend_never_wait_for_their_deadline(lc):
    """A -> B -> A with 200 KB arguments while other threads keep A's loop busy with
    short calls. The watchdog looks at A's owner every few milliseconds; had it
    concluded "nothing to do" just as the owner took the outer call's request, and
    gone to sleep, the owner would wait in that call for B, B for A's loop, and the
    callback would wait for its deadline. Two processes spinning on the CPU (as on a
    shared machine) widen that moment enough to hit it within seconds."""
    cl = _client(lc, call_timeout=3.0)
    try:
        with dispatching(cl):
            a, b = Tally(), Tally()
            a.make_persistent(backend=lc.backends[0])
            b.make_persistent(backend=lc.backends[1])
            quick = [Tally(k) for k in range(3)]
            for cell in quick:
                cell.make_persistent(backend=lc.backends[0])
                cell.get()
        done = threading.Event()
        errors, slowest, calls = [], [0.0], [0]

        def short(k):
            with dispatching(cl):
                while not done.is_set():
                    quick[k].get()

        background = [threading.Thread(target=short, args=(k,)) for k in range(3)]
        for t in background:
            t.start()
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        tag = b"t" * 200_000
        stop = time.monotonic() + 8.0
        try:
            with dispatching(cl):
                while time.monotonic() < stop and not errors:
                    t0 = time.monotonic()
                    try:
                        assert a.relay(b, tag, 2) == tag
                    except ClaypotError as exc:
                        errors.append(exc)
                    slowest[0] = max(slowest[0], time.monotonic() - t0)
                    calls[0] += 1
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait(10)
            done.set()
            for t in background:
                t.join(30)
        assert not errors, (calls, errors)
        assert slowest[0] < 1.5, slowest
    finally:
        cl.close()


def test_a_stop_with_a_long_call_and_others_in_flight_answers_each_or_fails_it(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        cl = _client(c, call_timeout=30.0, reconnect_timeout=2.0)
        try:
            with dispatching(cl):
                cells = [Tally(k) for k in range(6)]
                for cell in cells:
                    cell.make_persistent()
                    cell.get()
                outcomes = [None] * 6

                def worker(k):
                    with dispatching(cl):
                        try:
                            outcomes[k] = cells[k].echo(3.0 if k == 0 else 0.3, f"t{k}")
                        except BaseException as exc:  # recorded below
                            outcomes[k] = exc

                threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
                for t in threads:
                    t.start()
                time.sleep(0.15)
                t0 = time.monotonic()
                c.processes[0].stop()
                for t in threads:
                    t.join(60)
                assert time.monotonic() - t0 < 25
            for k, o in enumerate(outcomes):
                assert o == f"t{k}" or isinstance(o, ClaypotError), outcomes
        finally:
            cl.close()


# -- durability -----------------------------------------------------------------------


def test_what_lane_writers_acknowledged_or_any_reader_saw_survives_kill_9(tmp_path):
    """6 lane writers increment their own counters while a lane reader and a gRPC
    reader read them; kill -9 at a random point, restart: every counter is at least
    what its writer was told and what either reader saw, and at most one more than
    its writer was told (the increment in flight may have run)."""
    rng = random.Random()
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        bid = c.backends[0]
        lane_cl = _client(c, call_timeout=5.0, reconnect_timeout=1.0)
        grpc_cl = _client(c, call_timeout=5.0, reconnect_timeout=1.0, local_lane=False)
        try:
            with dispatching(lane_cl):
                cells = [Tally() for _ in range(6)]
                for cell in cells:
                    cell.make_persistent()
                ids = [cell.getID() for cell in cells]
            for _round in range(3):
                acked, seen = [0] * 6, [0] * 6
                stop = threading.Event()

                def writer(k):
                    with dispatching(lane_cl):
                        cell = lane_cl.get_by_id(ids[k])
                        while not stop.is_set():
                            try:
                                acked[k] = cell.incr()
                            except ClaypotError:
                                return

                def reader(cl):
                    with dispatching(cl):
                        mine = [cl.get_by_id(i) for i in ids]
                        while not stop.is_set():
                            for k, cell in enumerate(mine):
                                try:
                                    seen[k] = max(seen[k], cell.total())
                                except ClaypotError:
                                    return

                threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
                threads += [threading.Thread(target=reader, args=(cl,)) for cl in (lane_cl, grpc_cl)]
                for t in threads:
                    t.start()
                time.sleep(rng.uniform(0.4, 1.5))
                chaos.kill_backend(c, bid)
                stop.set()
                for t in threads:
                    t.join(30)
                assert not any(t.is_alive() for t in threads)
                assert sum(acked) > 0
                chaos.start_backend(c, bid)
                with dispatching(lane_cl):
                    after = [lane_cl.get_by_id(i).total() for i in ids]
                for k in range(6):
                    assert max(acked[k], seen[k]) <= after[k] <= acked[k] + 1, (k, acked, seen, after)
        finally:
            lane_cl.close()
            grpc_cl.close()
