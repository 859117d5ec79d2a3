"""The cheap paths of a call: fresh ids and the plain-value pickle.

Both replace something slower on every call (uuid4's system call; a
cloudpickle pickler per value), so both must give what the slower thing gave:
ids unique across threads and forked processes, and the very same pickle
bytes for the values the fast path takes.
"""

import io
import pickle
import subprocess
import sys
import threading

import pytest
from hostilelib import full_pickle

from store._wire import serialization
from store._util.ids import fresh_id
from store._wire.serialization import _Pickler, dumps, loads


def test_fresh_ids_look_like_uuid4_hex_and_do_not_repeat_across_threads():
    seen: list[list[str]] = [[] for _ in range(4)]

    def draw(k):
        seen[k] = [fresh_id() for _ in range(20000)]

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for part in seen for i in part]
    assert len(set(ids)) == len(ids) == 80000
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids[:1000])


_FORKING = r"""
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("ids", sys.argv[1])
ids = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ids)
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # the child: report its next ids, then leave without cleanup
    os.close(r)
    os.write(w, " ".join(ids.fresh_id() for _ in range(100)).encode())
    os._exit(0)
os.close(w)
mine = {ids.fresh_id() for _ in range(100)}
with os.fdopen(r, "rb") as f:
    theirs = set(f.read().decode().split())
os.waitpid(pid, 0)
print(len(mine), len(theirs), len(mine & theirs))
"""


def test_a_forked_child_draws_other_ids_than_its_parent():
    # In a fresh interpreter that loads only store/_util/ids.py: forking this test process,
    # with gRPC's threads possibly running in it, is not safe.
    import store._util.ids

    out = subprocess.run(
        [sys.executable, "-c", _FORKING, store._util.ids.__file__],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["100", "100", "0"]


PLAIN = [
    None,
    True,
    7,
    -(2**70),
    1.5,
    2j,
    "é",
    b"x" * 100,
    b"y" * (1 << 17),
    ((), {}),
    ((1, "a"), {"k": [1.0, None]}),
    {"value": 3, "_claypot_key": "m:C"},
    [[[]]],
    {"nested": {"deeper": (b"", "s")}},
]


@pytest.mark.parametrize("value", PLAIN, ids=[repr(v)[:24] for v in PLAIN])
def test_plain_values_pickle_to_the_same_bytes_as_the_full_pickler(value):
    full = io.BytesIO()
    _Pickler(full, protocol=5, buffer_callback=lambda b: True).dump(value)
    payload, buffers = dumps(value)
    assert serialization._plain(value)
    assert payload == full.getvalue()
    assert buffers == []
    assert loads(payload) == value


class Point:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, Point) and other.x == self.x


class MyInt(int):
    pass


def test_anything_else_takes_the_full_pickler():
    big = pickle.PickleBuffer(bytearray(1 << 17))  # out of band: not for the fast path
    many = list(range(serialization._PLAIN_PARTS))  # a big value: not worth the look
    nested_many = [[i] for i in range(serialization._PLAIN_PARTS // 2)]
    for value in (
        [Point(1)],
        {"f": len},
        (MyInt(3),),
        {1, 2},
        big,
        [big],
        many,
        nested_many,
        {i: i for i in range(serialization._PLAIN_PARTS // 2)},
    ):
        assert not serialization._plain(value)
        assert loads(*dumps(value)) is not None
    assert serialization._plain(list(range(serialization._PLAIN_PARTS // 2)))
    payload, buffers = dumps([big])
    assert len(buffers) == 1 and bytes(loads(payload, buffers)[0]) == bytes(1 << 17)
    assert loads(*dumps([Point(2)])) == [Point(2)]
    assert loads(*dumps((MyInt(3),)))[0].__class__ is MyInt


def test_numpy_arrays_take_the_c_pickler_with_the_same_bytes_and_buffers():
    np = pytest.importorskip("numpy")
    small = np.arange(10, dtype=np.int32)
    big = np.arange(1 << 15, dtype=np.float64)  # 256 KiB: out of band
    fortran = np.asfortranarray(np.ones((300, 300)))
    strided = big[::3]  # not contiguous: numpy pickles it in band
    frozen = np.arange(1 << 15, dtype=np.float64)
    frozen.flags.writeable = False
    for value in (((small,), {}), [big, "x"], {"a": fortran}, (strided,), (frozen,), big):
        assert serialization._plain(value) == serialization._WITH_ARRAYS
        payload, buffers = dumps(value)
        want_payload, want_buffers = full_pickle(value)
        assert payload == want_payload
        assert [bytes(b.raw()) for b in buffers] == [bytes(b.raw()) for b in want_buffers]
        back = loads(payload, [b.raw() for b in buffers])
        assert pickle.dumps(back, protocol=4) == pickle.dumps(value, protocol=4)  # same values, in band
    payload, buffers = dumps(((big,), {}))
    assert len(buffers) == 1 and buffers[0].raw().nbytes == big.nbytes
    (got,), _ = loads(payload, [bytearray(b.raw()) for b in buffers])
    assert np.array_equal(got, big) and got.flags.writeable


def test_arrays_that_may_hold_objects_or_subclass_ndarray_take_the_full_pickler():
    np = pytest.importorskip("numpy")
    objects = np.array([Point(1), None], dtype=object)
    fields = np.zeros(2, dtype=[("a", "i4"), ("b", object)])
    masked = np.ma.masked_array([1, 2], mask=[0, 1])
    scalar = np.float32(1.5)
    for value in (objects, (fields,), [masked], (scalar,)):
        assert serialization._plain(value) == serialization._NOT_PLAIN
    back = loads(*dumps((objects,)))[0]
    assert back[0] == Point(1) and back[1] is None
    assert loads(*dumps([masked]))[0].mask.tolist() == [False, True]


def test_a_cycle_or_deep_nesting_is_a_clear_error_not_a_crash():
    loop: list = []
    loop.append(loop)
    assert loads(dumps(loop)[0])[0][0][0] is not None  # cycles: the full pickler's memo
    deep: list = []
    for _ in range(100000):
        deep = [deep]
    from store.errors import SerializationError

    with pytest.raises(SerializationError):
        dumps(deep)
    assert pickle.dumps(1, protocol=5) == dumps(1)[0]
