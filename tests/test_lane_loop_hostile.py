"""The local lane's event loop against a hostile tester.

One owner thread answers every lane connection, makes each batch durable with
one fsync and hands the loop to a new thread when a call runs long. These
tests try to make it stall, cross or lose replies, run a changing call twice,
leak threads, or acknowledge what a kill -9 then loses. Real backends
(LocalCluster), real processes, real sockets, real signals.
"""

import os
import random
import socket
import threading
import time

import pytest

import store
from store import LocalCluster, StorageObject, readonly
from store._client.client import Client
from store._model.objects import dispatching
from store._wire import lane as frames
from store.errors import ClaypotError

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


def _on_lane(client, address):
    lane = client.transport._lane
    return lane is not None and bool(lane._open.get(address))


def _threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def _raw(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(frames.socket_name(address))
    assert sock.recv(len(frames.GREETING) + 1) == frames.GREETING + frames.SERVED
    return sock


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
        assert _on_lane(client, address)
        t0 = time.monotonic()
        with pytest.raises(ClaypotError):
            cell.leave()
        assert time.monotonic() - t0 < 10
        for k in range(20):
            t0 = time.monotonic()
            assert cell.echo(0.0, k) == k
            assert time.monotonic() - t0 < 5
        assert _on_lane(client, address)
