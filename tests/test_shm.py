"""Same-host transfers through /dev/shm: large values to a loopback backend skip the socket."""

from __future__ import annotations

import gc
import hashlib
import os
import time

import numpy as np
import pytest

from runtime import task, wait_on
from store import StorageObject, errors
from store._client import shm
from store._wire.generated import claypot_pb2 as pb
from store._model.objects import readonly

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")]

MiB = 1 << 20


class Holder(StorageObject):
    def __init__(self, data):
        self.data = data

    @readonly
    def address(self):
        return self.data.ctypes.data

    def replace(self, data):
        self.data = data
        return self.data.sum()

    @readonly
    def scaled(self, factor):
        return self.data * factor


@task(returns=1)
def total(h, extra):
    return float(h.data.sum() + extra.sum())


def digest(a) -> str:
    return hashlib.sha1(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


def segments() -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(shm.PREFIX)}


def in_use() -> set[str]:
    """Segments other than free ones and spares kept for reuse."""
    return {n for n in segments() if f"-{shm.FREE_MARK}" not in n and f"-{shm.SPARE_MARK}" not in n}


@pytest.fixture
def counted(monkeypatch):
    """Counts segments this process (the client side) wrote: new ones, and free ones it
    claimed and filled (any same-user backend's pool on this host may hold one)."""
    made = []
    real, real_fill = shm.export, shm.fill

    def export(buffers):
        names = real(buffers)
        made.extend(names)
        return names

    def fill(name, buf):
        real_fill(name, buf)
        made.append(name)

    monkeypatch.setattr(shm, "export", export)
    monkeypatch.setattr(shm, "fill", fill)
    return made


def test_every_path_goes_through_shared_memory(cluster, counted):
    before = segments()
    a = np.random.default_rng(1).random(3 * MiB)  # 24 MiB
    h = Holder(a)
    h.make_persistent(backend=cluster.backends[0])
    assert counted, "make_persistent did not use shared memory"
    assert digest(h.data) == digest(a)  # result through shm
    first = h.address()
    assert h.address() == first  # the backend keeps one live array
    b = np.arange(2 * MiB, dtype=np.float64)
    n = len(counted)
    assert h.replace(b) == b.sum()  # argument through shm
    assert len(counted) > n
    assert digest(h.scaled(2.0)) == digest(b * 2.0)
    h.move(cluster.backends[1])  # backend to backend, same host
    assert digest(h.data) == digest(b)
    assert wait_on(total(h, np.ones(2 * MiB))) == float(b.sum() + 2 * MiB)
    # A backend keeps a live object's buffers in its segments (zero-copy reads); once the
    # object is gone and no reader leases them, nothing is left behind in /dev/shm but
    # the free segments a backend keeps for reuse (bounded by CLAYPOT_SHM_POOL).
    h.delete_persistent()
    gc.collect()
    deadline = time.monotonic() + 15
    while not in_use() <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_use() <= before


def test_disabled_falls_back_to_streams(cluster, counted, monkeypatch):
    import store

    client = store.client()
    monkeypatch.setattr(client, "settings", client.settings.replace(shm=False))
    a = np.ones(4 * MiB)
    h = Holder(a)
    h.make_persistent()
    assert digest(h.data) == digest(a)
    assert counted == []


def test_bad_segment_names_are_refused(cluster):
    import store

    client = store.client()
    for names in (["../../etc/passwd"], ["claypot-" + "0" * 32]):
        request = pb.PersistRequest(
            objects=[
                pb.PersistObject(
                    object_id="e" * 32,
                    class_key="x:y#0",
                    state=pb.Value(payload=b"\x80\x05N.", buffer_sizes=[10], shm=names),
                )
            ]
        )
        reply = client._stub(cluster.address).Persist(request, timeout=10, metadata=client._metadata)
        assert reply.error.code == "ProtocolError"
    with pytest.raises(errors.ObjectNotFound):
        store.get_by_id("e" * 32)


def test_full_shared_memory_falls_back_to_streams(cluster, monkeypatch):
    """No room in /dev/shm (a small container tmpfs, say): the value streams instead."""

    def full(buffers):
        raise shm.Unavailable("No space left on device")

    monkeypatch.setattr(shm, "export", full)
    a = np.arange(3 * MiB, dtype=np.float64)
    h = Holder(a)
    h.make_persistent()
    assert digest(h.data) == digest(a)
    b = np.ones(2 * MiB)
    assert h.replace(b) == b.sum()


def test_mid_sized_values_go_by_shared_memory_from_shm_min(cluster, counted, monkeypatch):
    """Same host, values from shm_min up to inline_limit go through /dev/shm both ways
    (faster than the protobuf copies of an inline value); below it, or with
    shm_min raised, they stay inline."""
    import store

    attached = []
    real_attach = shm.attach

    def attach(names, sizes):
        attached.extend(names)
        return real_attach(names, sizes)

    monkeypatch.setattr(shm, "attach", attach)
    client = store.client()
    h = Holder(np.zeros(4))
    h.make_persistent(backend=cluster.backends[0])
    mid = np.random.default_rng(3).random(32 * 1024)  # 256 KiB
    assert client.settings.shm_min <= mid.nbytes < client.settings.inline_limit
    out = h.scaled(1.0)
    assert counted == [] and attached == []  # small: inline
    assert h.replace(mid) == mid.sum()
    assert len(counted) == 1  # argument through shm
    out = h.scaled(2.0)
    assert len(attached) == 1  # result through shm
    assert digest(out) == digest(mid * 2.0)
    out[0] = -1.0  # a private, writable copy
    assert digest(h.scaled(1.0)) == digest(mid)
    monkeypatch.setattr(client, "settings", client.settings.replace(shm_min=2 * MiB))
    n = len(counted)
    assert h.replace(mid + 1) == (mid + 1).sum()
    assert len(counted) == n  # shm_min raised: inline
    h.delete_persistent()


def test_mid_sized_values_fall_back_inline_when_shared_memory_is_full(cluster, monkeypatch):
    def full(buffers):
        raise shm.Unavailable("No space left on device")

    monkeypatch.setattr(shm, "export", full)
    h = Holder(np.zeros(4))
    h.make_persistent()
    mid = np.arange(32 * 1024, dtype=np.float64)  # 256 KiB
    assert h.replace(mid) == mid.sum()
    assert digest(h.scaled(1.0)) == digest(mid)
    h.delete_persistent()


def test_shm_min_must_not_be_negative():
    from store.config import Settings

    with pytest.raises(errors.ConfigurationError, match="shm_min"):
        Settings.from_env({"CLAYPOT_SHM_MIN": "-1"})
