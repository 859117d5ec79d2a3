"""The task runtime against a real local cluster: order, locality, failures, scale."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import runtime
import store
from runtime import COLLECTION_IN, COLLECTION_INOUT, INOUT, OUT, Future, barrier, constraint, task, wait_on

from store.errors import SerializationError, TaskCancelled, TaskError, TaskTimeout
from tasklib import Block, Log, add, append, block_sum, inc, scale, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@task(returns=1)
def pid_of(*objs):
    return os.getpid()


@task(returns=2)
def interval(obj, pause):
    start = time.time()
    time.sleep(pause)
    return start, time.time()


@task(returns=1)
def sleepy(pause):
    time.sleep(pause)
    return os.getpid()


@pytest.fixture(autouse=True)
def drained(cluster):
    """Each test starts and ends with no task pending and no failure left unreported."""
    yield cluster
    try:
        barrier(timeout=60)
    except TaskError:
        pass


def backend_ids():
    return sorted(b.backend_id for b in store.backends() if b.up)


def test_public_api_is_pinned():
    # One list of the runtime's names, kept with the store's surface test.
    from test_public_surface import RUNTIME_ALL

    assert sorted(runtime.__all__) == RUNTIME_ALL


def test_issue_example_blocks_scaled_and_summed():
    ids = backend_ids()
    blocks = [Block(np.ones(1_000_000)) for _ in range(4)]
    for i, b in enumerate(blocks):
        b.make_persistent(backend=ids[i % 2])
    for b in blocks:
        scale(b, 2.0)
    partials = [block_sum(b) for b in blocks]
    assert all(isinstance(p, Future) for p in partials)
    total = wait_on(add(add(partials[0], partials[1]), add(partials[2], partials[3])))
    assert total == 8_000_000.0
    barrier()
    assert [p.backend for p in partials] == [ids[i % 2] for i in range(4)]


def test_inout_chain_runs_in_submission_order():
    log = Log()
    log.make_persistent()
    # Earlier tasks sleep longer: only the dependency keeps them in order.
    for i in range(12):
        append(log, i, pause=0.02 * (12 - i) if i < 4 else 0.0)
    assert wait_on(snapshot(log)) == list(range(12))
    assert log.items == list(range(12))


def test_reader_after_writer_sees_the_write_and_wait_on_object_syncs():
    b = Block(np.zeros(10))
    b.make_persistent()
    scale_slow = task(b=INOUT)(lambda b: (time.sleep(0.3), b.data.__iadd__(7)))
    scale_slow(b)
    assert wait_on(block_sum(b)) == 70.0
    scale_slow(b)
    assert float(wait_on(b).data.sum()) == 140.0


def test_diamond_graph_of_futures():
    a = inc(1)  # 2
    left, right = inc(a), add(a, 10)  # 3, 12
    top = add(left, right)  # 15
    assert wait_on(top) == 15
    assert wait_on([a, left, right]) == [2, 3, 12]


def test_diamond_graph_over_one_object():
    log = Log()
    log.make_persistent()
    append(log, "first", pause=0.2)
    readers = [snapshot(log), snapshot(log)]
    append(log, "last")
    final = snapshot(log)
    assert wait_on(readers) == [["first"], ["first"]]
    assert wait_on(final) == ["first", "last"]


def test_writer_waits_for_parallel_readers():
    log = Log()
    log.make_persistent()
    r1, e1 = interval(log, 0.4)
    r2, e2 = interval(log, 0.4)
    append(log, "w")
    w = snapshot(log)
    assert wait_on(w) == ["w"]
    s1, s2, end1, end2 = wait_on([r1, r2, e1, e2])
    # Readers overlapped: the second started before the first ended.
    assert max(s1, s2) < min(end1, end2)


def test_locality_by_pid():
    pids = {b.backend_id: b.pid for b in store.backends() if b.up}
    ids = sorted(pids)
    on = {}
    for bid in ids:
        blk = Block(np.arange(100.0))
        blk.make_persistent(backend=bid)
        on[bid] = blk
    for bid, blk in on.items():
        f = pid_of(blk)
        assert wait_on(f) == pids[bid]
        assert f.backend == bid == blk.get_location()
    # Majority wins: two objects on ids[1], one on ids[0].
    extra = Block(np.arange(3.0))
    extra.make_persistent(backend=ids[1])
    f = pid_of(on[ids[0]], on[ids[1]], extra)
    assert wait_on(f) == pids[ids[1]]
    assert f.backend == ids[1]


def test_task_sees_live_array_on_owner_no_copy():
    b = Block(np.zeros(1000))
    b.make_persistent()

    @task(b=INOUT, returns=1)
    def poke(b):
        arr = b.data
        arr[0] = 5.0  # in place on the object's own array: visible only if not a copy
        return b.data is arr

    assert wait_on(poke(b)) is True
    assert b.data[0] == 5.0


def test_tasks_without_persistent_args_spread_over_backends():
    pids = {b.pid for b in store.backends() if b.up}
    futures = [sleepy(0.3) for _ in range(6)]
    assert set(wait_on(futures)) == pids
    assert {f.backend for f in futures} == set(backend_ids())


def test_collection_directions():
    logs = [Log() for _ in range(3)]
    for lg in logs:
        lg.make_persistent()

    @task(logs=COLLECTION_INOUT)
    def stamp_all(logs, v):
        for lg in logs:
            lg.add(v)

    @task(returns=1, parts=COLLECTION_IN)
    def gather(parts):
        return [list(p.items) if hasattr(p, "items") else p for p in parts]

    stamp_all(logs, 1)
    stamp_all(logs, 2)
    got = wait_on(gather(logs + [inc(41)]))
    assert got == [[1, 2], [1, 2], [1, 2], 42]


def test_out_orders_like_inout():
    b = Block(np.zeros(4))
    b.make_persistent()

    @task(b=OUT)
    def fill(b, v):
        time.sleep(0.1)
        b.data = np.full(4, v)

    fill(b, 1.0)
    fill(b, 3.0)
    assert wait_on(block_sum(b)) == 12.0


def test_multiple_returns():
    lo, hi = task(returns=2)(lambda x: (x - 1, x + 1))(10)
    assert wait_on(add(lo, hi)) == 20


def test_function_shipped_once_per_function():
    client = store.client()
    calls = []
    real_admin = client._admin

    def counting_admin(method, request, *a, **kw):
        calls.append(getattr(request, "key", ""))
        return real_admin(method, request, *a, **kw)

    @task(returns=1)
    def fresh(x):
        return x * 3

    client._admin = counting_admin
    try:
        results = wait_on([fresh(i) for i in range(40)])
    finally:
        del client._admin
    assert results == [i * 3 for i in range(40)]
    assert len([k for k in calls if ".fresh#" in k]) == 1


def test_fail_policy_cancels_successors_and_barrier_raises():
    @task(returns=1)
    def boom(x):
        raise ValueError(f"bad {x}")

    f = boom(1)
    g = inc(f)
    h = inc(g)
    with pytest.raises(ValueError, match="bad 1"):
        wait_on(f)
    for succ in (g, h):
        with pytest.raises(TaskCancelled, match=r"boom#\d+"):
            wait_on(succ)
    with pytest.raises(TaskError, match="boom"):
        barrier()
    barrier()  # reported once
    # A task submitted after the failure, taking its future, is cancelled at once.
    with pytest.raises(TaskCancelled):
        wait_on(inc(f))


def test_cancel_successors_policy_keeps_going():
    @task(returns=1, on_failure="CANCEL_SUCCESSORS")
    def boom(x):
        raise RuntimeError("nope")

    f = boom(1)
    g = inc(f)
    other = inc(100)
    barrier()  # does not raise under CANCEL_SUCCESSORS
    assert isinstance(f.exception(), RuntimeError)
    assert isinstance(g.exception(), TaskCancelled)
    assert wait_on(other) == 101


def test_ignore_policy_successors_run_with_none():
    @task(returns=1, on_failure="IGNORE")
    def boom(x):
        raise RuntimeError("ignored")

    @task(returns=1)
    def describe(v):
        return repr(v)

    f = boom(1)
    assert wait_on(describe(f)) == "None"
    assert wait_on(f) is None
    barrier()


def test_retry_policy_reruns_then_succeeds(tmp_path):
    marker = str(tmp_path / "tried")

    @task(returns=1, on_failure="RETRY", retries=2)
    def flaky(path):
        if not os.path.exists(path):
            open(path, "w").close()
            raise OSError("first attempt fails")
        return "ok"

    f = flaky(marker)
    assert wait_on(f) == "ok"
    assert f.attempts == 2


def test_retry_policy_gives_up_after_retries(tmp_path):
    counter = str(tmp_path / "count")

    @task(returns=1, on_failure="RETRY", retries=2)
    def always(path):
        with open(path, "a") as fh:
            fh.write("x")
        raise OSError("always")

    f = always(counter)
    with pytest.raises(OSError):
        wait_on(f)
    assert f.attempts == 3
    assert Path(counter).read_text() == "xxx"
    with pytest.raises(TaskError):
        barrier()


def test_time_out_fails_the_task_and_cancels_successors():
    @task(returns=1, time_out=0.5)
    def slow(x):
        time.sleep(2.5)
        return x

    started = time.monotonic()
    f = slow(1)
    g = inc(f)
    with pytest.raises(TaskTimeout, match="time_out"):
        wait_on(f)
    assert time.monotonic() - started < 2.0
    with pytest.raises(TaskCancelled):
        wait_on(g)
    with pytest.raises(TaskError):
        barrier()


def test_fast_task_with_time_out_succeeds():
    quick = task(returns=1, time_out=5)(lambda x: x * 2)
    assert wait_on(quick(21)) == 42


def test_constraint_computing_units_serialises_big_tasks():
    slots = runtime._core.current().scheduler.slots
    b = Block(np.zeros(1))
    b.make_persistent()

    @constraint(computing_units=slots)
    @task(returns=2)
    def hog(obj, pause):
        start = time.time()
        time.sleep(pause)
        return start, time.time()

    first, second = hog(b, 0.3), hog(b, 0.3)
    (a1, z1), (a2, z2) = wait_on(list(first)), wait_on(list(second))
    assert a2 >= z1 or a1 >= z2  # never at the same time on that backend
    with pytest.raises(ValueError, match="computing_units"):
        constraint(computing_units=slots + 1)(task(lambda: None))()


def test_thousand_task_graph():
    started = time.monotonic()
    leaves = [inc(i) for i in range(500)]  # 500 tasks
    level = leaves
    while len(level) > 1:  # 499 more, a reduction tree
        level = [add(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    assert wait_on(level[0]) == sum(range(1, 501))
    assert runtime._core.current().pending() == 0
    assert time.monotonic() - started < 60


def test_inline_mode_without_a_cluster(tmp_path):
    script = tmp_path / "inline.py"
    script.write_text(
        textwrap.dedent("""
        import os
        from runtime import task, wait_on, barrier, INOUT
        from store import objects
        from store.errors import TaskCancelled

        @task(returns=1)
        def add(x, y):
            return x + y

        @task(acc=INOUT)
        def push(acc, v):
            acc.append(v)

        @task(returns=1, on_failure="CANCEL_SUCCESSORS")
        def boom():
            raise ValueError("x")

        @task(returns=1)
        def where():
            return os.getpid()

        assert not objects.has_dispatcher()
        acc = []
        for i in range(3):
            push(acc, i)
        total = wait_on(add(add(1, 2), add(3, 4)))
        f = where()
        succ = add(boom(), 1)
        barrier()
        try:
            wait_on(succ)
            cancelled = False
        except TaskCancelled:
            cancelled = True
        print(total, acc, wait_on(f) == os.getpid(), f.backend, cancelled)
    """)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAYPOT_")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "10 [0, 1, 2] True None True"


@pytest.mark.slow
def test_numpy_training_example_reduces_loss():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "numpy_training.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert float(lines["final_loss"]) < 0.1 * float(lines["initial_loss"])
    assert lines["gradients_ran_where_shards_live"] == "True"


def test_burst_of_tiny_tasks_is_batched_and_errors_stay_per_task():
    executor = runtime._core.current().executor
    rpcs, batched = executor.rpcs, executor.batched

    @task(returns=1, on_failure="CANCEL_SUCCESSORS")
    def maybe(i):
        if i % 97 == 0:
            raise ValueError(f"task {i}")
        return i

    futures = [maybe(i) for i in range(1000)]
    barrier()
    for i, f in enumerate(futures):
        if i % 97 == 0:
            assert isinstance(f.exception(), ValueError) and str(i) in str(f.exception())
        else:
            assert f.result() == i
    assert executor.batched > batched
    assert executor.rpcs - rpcs < 500


def test_locality_weighs_bytes_not_just_count():
    pids = {b.backend_id: b.pid for b in store.backends() if b.up}
    a, b = sorted(pids)
    big = Block(np.ones(200_000))  # 1.6 MB on a
    big.make_persistent(backend=a)
    smalls = [Block(np.ones(2)) for _ in range(3)]
    for s in smalls:
        s.make_persistent(backend=b)
    f = pid_of(big, *smalls)
    assert wait_on(f) == pids[a] and f.backend == a


def test_object_made_by_a_task_stays_where_it_was_made():
    @task(returns=1)
    def make_block(n):
        return Block(np.arange(float(n)))

    f = make_block(1000)
    blk = wait_on(f)
    assert blk.is_persistent and blk.get_location() == f.backend
    g = block_sum(blk)
    assert wait_on(g) == float(sum(range(1000)))
    assert g.backend == f.backend


def test_task_calling_a_task_runs_it_in_place():
    @task(returns=1)
    def outer(b):
        inner = pid_of(b)  # inside a backend: runs inline, right here
        return os.getpid(), wait_on(inner)

    blk = Block(np.ones(3))
    blk.make_persistent()
    here, inner_pid = wait_on(outer(blk))
    assert here == inner_pid


def test_future_nested_in_a_plain_value_is_a_clear_error():
    @task(returns=1)
    def first(d):
        return d

    with pytest.raises(SerializationError, match="COLLECTION_IN"):
        wait_on(first({"x": inc(1)}))


def test_new_storage_object_argument_is_made_persistent_and_ordered():
    log = Log()  # not persistent yet
    append(log, 1, pause=0.2)
    assert log.is_persistent
    append(log, 2)
    assert wait_on(snapshot(log)) == [1, 2]


def test_memory_size_beyond_a_backend_is_refused_at_call_time():
    huge = constraint(memory_size=10**6)(task(lambda: None))  # a million GiB
    with pytest.raises(ValueError, match="memory_size"):
        huge()
