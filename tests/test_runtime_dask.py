"""The task runtime on Dask distributed: backends host Dask workers, tasks are pinned to them.

A real local cluster with ``dask=True``: an embedded Redis, a ``dask
scheduler`` process and two backend processes, each hosting a Dask worker
named after its backend id. The runtime's executor is switched to Dask for
this module; dependencies, locality and failure policies still come from the
runtime, so the same expectations as with the default executor hold.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("distributed", reason="dask[distributed] is not installed")

import runtime  # noqa: E402
import runtime._core  # noqa: E402
from runtime import INOUT, barrier, task, wait_on  # noqa: E402
from runtime._dask_executor import DaskExecutor  # noqa: E402
from store import LocalCluster  # noqa: E402
from store.errors import TaskCancelled, TaskError  # noqa: E402
from tasklib import Block, Log, add, append, block_sum, inc, scale, snapshot  # noqa: E402


@task(returns=1)
def where(*objs):
    """The process and the Dask worker the task ran in."""
    from distributed import get_worker

    return os.getpid(), get_worker().name


@pytest.fixture(scope="module")
def dask_cluster():
    """Two backends hosting Dask workers; this process's tasks go through Dask."""
    with LocalCluster(backends=2, dask=True) as c:
        runtime.use_executor("dask")
        try:
            yield c
        finally:
            # Closes the runtime's Dask client before the scheduler stops, and lets
            # later test modules use the default executor again.
            runtime.use_executor(None)


@pytest.fixture(autouse=True)
def drained(dask_cluster):
    """Each test starts and ends with no task pending and no failure left unreported."""
    yield dask_cluster
    try:
        barrier(timeout=60)
    except TaskError:
        pass


@pytest.mark.slow
def test_backends_host_workers_named_after_their_ids(dask_cluster):
    executor = runtime._core.current().executor
    assert isinstance(executor, DaskExecutor)
    assert executor.scheduler == dask_cluster.dask_scheduler
    assert executor.worker_names(refresh=True) == set(dask_cluster.backends)


def test_locality_by_pid_through_dask(dask_cluster):
    pids = {p.backend_id: p.pid for p in dask_cluster.processes}
    executor = runtime._core.current().executor
    sent = executor.submitted
    blocks = {}
    for bid in pids:
        blk = Block(np.arange(100.0))
        blk.make_persistent(backend=bid)
        blocks[bid] = blk
    for bid, blk in blocks.items():
        f = where(blk)
        # The owner's pid, and its hosted Dask worker: the task went through Dask
        # and ran inside the backend process that holds the block.
        assert wait_on(f) == (pids[bid], bid)
        assert f.backend == bid == blk.get_location()
    # Majority of bytes wins: the big block's owner runs a task over both.
    ids = sorted(pids)
    big = Block(np.zeros(100_000))
    big.make_persistent(backend=ids[1])
    f = where(blocks[ids[0]], big)
    assert wait_on(f) == (pids[ids[1]], ids[1])
    assert executor.submitted - sent == 3


def test_task_reads_the_owners_array_in_place(dask_cluster):
    b = Block(np.zeros(1000))
    b.make_persistent()

    @task(b=INOUT, returns=1)
    def poke(b):
        arr = b.data
        arr[0] = 5.0  # visible afterwards only if this was the heap's own array
        return b.data is arr

    assert wait_on(poke(b)) is True
    assert b.data[0] == 5.0


def test_dependency_graph_of_futures_and_objects(dask_cluster):
    ids = dask_cluster.backends
    blocks = [Block(np.ones(1000)) for _ in range(4)]
    for i, b in enumerate(blocks):
        b.make_persistent(backend=ids[i % 2])
    for b in blocks:
        scale(b, 2.0)
    partials = [block_sum(b) for b in blocks]
    total = add(add(partials[0], partials[1]), add(partials[2], partials[3]))
    a = inc(1)
    diamond = add(inc(a), add(a, 10))  # (2 + 1) + (2 + 10)
    assert wait_on(total) == 8000.0
    assert wait_on(diamond) == 15
    barrier()
    assert [p.backend for p in partials] == [ids[i % 2] for i in range(4)]


def test_inout_changes_are_ordered_and_visible_afterwards(dask_cluster):
    log = Log()
    log.make_persistent()
    # Earlier writers sleep longer: only the runtime's dependencies keep them in order.
    for i in range(8):
        append(log, i, pause=0.03 * (8 - i) if i < 3 else 0.0)
    readers = [snapshot(log), snapshot(log)]
    assert wait_on(readers) == [list(range(8))] * 2
    # Through the proxy, from this process: the backend stored the changes.
    assert log.items == list(range(8))
    b = Block(np.zeros(10))
    b.make_persistent()
    scale_plus = task(b=INOUT)(lambda b: b.data.__iadd__(3))
    scale_plus(b)
    assert float(wait_on(b).data.sum()) == 30.0


def test_object_made_by_a_task_stays_on_its_backend(dask_cluster):
    @task(returns=1)
    def make_block(n):
        return Block(np.arange(float(n)))

    f = make_block(100)
    blk = wait_on(f)
    assert blk.is_persistent and blk.get_location() == f.backend
    assert wait_on(block_sum(blk)) == float(sum(range(100)))


def test_failure_keeps_its_type_and_cancels_successors(dask_cluster):
    @task(returns=1)
    def boom(x):
        raise ValueError(f"bad {x}")

    f = boom(1)
    g = inc(f)
    with pytest.raises(ValueError, match="bad 1"):
        wait_on(f)
    with pytest.raises(TaskCancelled, match=r"boom#\d+"):
        wait_on(g)
    with pytest.raises(TaskError, match="boom"):
        barrier()


def test_use_executor_refuses_unknown_names_and_pending_tasks(dask_cluster):
    with pytest.raises(ValueError, match="dask"):
        runtime.use_executor("ray")
    slow = task(returns=1)(lambda: time.sleep(0.5) or 1)
    f = slow()
    with pytest.raises(RuntimeError, match="pending"):
        runtime.use_executor("store")
    assert wait_on(f) == 1
    assert isinstance(runtime._core.current().executor, DaskExecutor)


def test_backend_without_a_worker_is_a_clear_error(dask_cluster, tmp_path):
    # A backend started without --dask-scheduler: a task placed there fails at once
    # with a message saying why, instead of waiting forever for a worker.
    from store._ops.cluster import BackendProcess
    from store.errors import ConfigurationError

    plain = BackendProcess(str(tmp_path / "plain"), dask_cluster.redis_url, dask_cluster.token).start()
    rt = runtime._core.current()
    try:
        blk = Block(np.ones(10))
        blk.make_persistent(backend=plain.backend_id)
        rt._refresh_backends(force=True)
        f = block_sum(blk)
        with pytest.raises(ConfigurationError, match="hosts no Dask worker"):
            wait_on(f, timeout=30)
        with pytest.raises(TaskError):
            barrier()
    finally:
        plain.stop()
        # Forget it now rather than after the runtime's cache of live backends expires.
        rt._refresh_backends(force=True)
    assert set(rt.pids) == set(dask_cluster.backends)


def test_environment_selects_the_dask_executor(dask_cluster):
    # A separate script, configured only by the environment, as a user would run it.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, store, runtime._core
        from runtime import task, wait_on

        @task(returns=1)
        def where():
            from distributed import get_worker
            return os.getpid(), get_worker().name

        store.connect()
        pid, worker = wait_on(where())
        print(type(runtime._core.current().executor).__name__, pid, worker)
        runtime.use_executor("store")   # closes the Dask client before exiting
    """)
    env = dict(
        os.environ,
        CLAYPOT_EXECUTOR="dask",
        CLAYPOT_DASK_SCHEDULER=dask_cluster.dask_scheduler,
        CLAYPOT_DASK_TLS_DIR=dask_cluster.dask_tls_dir,
        CLAYPOT_ADDRESS=dask_cluster.address,
        CLAYPOT_TOKEN=dask_cluster.token,
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    name, pid, worker = out.stdout.split()
    pids = {p.backend_id: p.pid for p in dask_cluster.processes}
    assert name == "DaskExecutor"
    assert pids[worker] == int(pid)


def test_burst_of_tasks_with_chains_over_both_backends(dask_cluster):
    executor = runtime._core.current().executor
    sent = executor.submitted
    heads = [inc(i) for i in range(200)]
    tails = [inc(inc(h)) for h in heads]
    assert wait_on(tails) == [i + 3 for i in range(200)]
    assert executor.submitted - sent == 600
    # Tasks with no persistent argument go to the least loaded backend: both got some.
    assert {f.backend for f in heads + tails} == set(dask_cluster.backends)


@pytest.mark.slow
def test_time_out_through_dask(dask_cluster):
    from store.errors import TaskTimeout

    slow = task(returns=1, time_out=0.3)(lambda: time.sleep(1.5) or 1)
    f = slow()
    g = inc(f)
    with pytest.raises(TaskTimeout, match="time_out"):
        wait_on(f)
    with pytest.raises(TaskCancelled):
        wait_on(g)
    with pytest.raises(TaskError):
        barrier()
