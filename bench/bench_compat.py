"""What the dataClay layer and the new object operations cost, each beside the
native call it builds on, measured in the same run on one cluster.

- an ``@activemethod`` call through store.compat.dataclay vs a native method call
  (same work, same backend): the layer should add nothing measurable;
- an annotated-property read (dataClay) vs a native attribute read;
- ``get_by_alias`` of an object this process already holds (identity map) vs a
  plain method call (both one RPC);
- ``add_alias`` + ``delete_alias`` vs a method call that changes the object;
- ``new_version`` + ``consolidate_version`` vs ``make_persistent`` of a fresh object;
- a 0.5 s reader task then a 0.5 s INOUT writer task on one object, with task versions
  (the writer overlaps the reader) vs without (it waits): wall time of the pair.

Prints one JSON document.

    python bench/bench_compat.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import store  # noqa: E402
from bench.common import emit, latency  # noqa: E402
from store import LocalCluster, StorageObject  # noqa: E402
from store.compat.dataclay import DataClayObject, activemethod  # noqa: E402
from runtime import INOUT, task, wait_on  # noqa: E402


class Native(StorageObject):
    def __init__(self):
        self.value = 0

    def incr(self):
        self.value += 1
        return self.value


class Compat(DataClayObject):
    value: int

    def __init__(self):
        self.value = 0

    @activemethod
    def incr(self):
        self.value += 1
        return self.value


@task(returns=1)
def slow_read(obj, pause):
    time.sleep(pause)
    return obj.value


@task(returns=1, obj=INOUT)
def slow_write(obj, pause):
    time.sleep(pause)
    obj.value += 1


@task(returns=1, obj=INOUT, versions=True)
def slow_write_versioned(obj, pause):
    time.sleep(pause)
    obj.value += 1


def reader_writer_pair(obj, writer, pause: float = 0.5, rounds: int = 4) -> float:
    """Median wall time of a reader task followed by a writer task on one object."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        r = slow_read(obj, pause)
        w = writer(obj, pause)
        wait_on(w)
        wait_on(r)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    n = args.calls
    out: dict = {"calls": n}
    with LocalCluster(backends=2) as c:
        backend = c.backends[0]
        native, compat = Native(), Compat()
        native.make_persistent(alias="bench-native", backend=backend)
        compat.make_persistent("bench-compat", backend_id=backend)

        out["native_call"] = latency(native.incr, n)
        out["compat_activemethod_call"] = latency(compat.incr, n)
        out["native_attribute_read"] = latency(lambda: native.value, n)
        out["compat_property_read"] = latency(lambda: compat.value, n)
        out["get_by_alias_identity_map"] = latency(lambda: store.get_by_alias("bench-native"), n)
        counter = iter(range(10**9))

        def alias_round():
            name = f"a{next(counter)}"
            native.add_alias(name)
            native.delete_alias(name)

        out["add_then_delete_alias"] = latency(alias_round, n // 2, warmup=20)

        def version_round():
            v = native.new_version()
            v.incr()
            v.consolidate_version()

        out["new_version_change_consolidate"] = latency(version_round, max(n // 20, 20), warmup=5)
        out["make_persistent_fresh"] = latency(
            lambda: Native().make_persistent(backend=backend), max(n // 4, 50), warmup=20
        )
        out["reader_then_writer_s"] = {
            "plain": reader_writer_pair(native, slow_write),
            "versions": reader_writer_pair(native, slow_write_versioned),
        }

    p50 = {k: v["p50_us"] for k, v in out.items() if isinstance(v, dict) and "p50_us" in v}
    out["ratios_p50"] = {
        "compat_call_over_native_call": round(p50["compat_activemethod_call"] / p50["native_call"], 2),
        "compat_read_over_native_read": round(p50["compat_property_read"] / p50["native_attribute_read"], 2),
        "get_by_alias_over_native_call": round(p50["get_by_alias_identity_map"] / p50["native_call"], 2),
        "alias_add_delete_over_native_call": round(p50["add_then_delete_alias"] / p50["native_call"], 2),
        "version_round_over_make_persistent": round(
            p50["new_version_change_consolidate"] / p50["make_persistent_fresh"], 2
        ),
        "reader_writer_pair_versions_over_plain": round(
            out["reader_then_writer_s"]["versions"] / out["reader_then_writer_s"]["plain"], 2
        ),
    }
    emit(out)


if __name__ == "__main__":
    main()
