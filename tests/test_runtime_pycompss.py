"""The rest of PyCOMPSs' task model on a real cluster of unlike backends:
resources and @constraint, @implement, FILE directions, @binary and @mpi tasks,
the blocked matrix multiplication, and a cluster that grows and shrinks."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import runtime
import runtime.elastic
import store
from runtime import (
    FILE_IN,
    FILE_INOUT,
    FILE_OUT,
    FILE_OUT_STDERR,
    FILE_OUT_STDOUT,
    INOUT,
    barrier,
    binary,
    compss_open,
    compss_wait_on_file,
    constraint,
    implement,
    mpi,
    task,
    wait_on,
)
from store import LocalCluster
from store.errors import ConfigurationError, TaskCancelled, TaskError
from tasklib import Block

EDGE = "computing_units=2,memory_size=1,processor_type=ARM,zone=edge"
BIG = "computing_units=8,memory_size=6,processor_performance=5000"


@pytest.fixture(scope="module")
def cluster():
    """Three unlike backends: an ARM edge node, a big node, and one that declares nothing."""
    with LocalCluster(backends=3, resources=[EDGE, BIG, ""]) as c:
        yield c


@pytest.fixture
def nodes(cluster):
    edge, big, plain = (p.backend_id for p in cluster.processes[:3])
    return {"edge": edge, "big": big, "plain": plain, "pid": {p.backend_id: p.pid for p in cluster.processes}}


@task(returns=1)
def where():
    return os.getpid()


@task(returns=2)
def where_with(b):
    return os.getpid(), float(b.data.sum())


@pytest.mark.slow
def test_backends_publish_their_resources(cluster, nodes):
    offers = {b.backend_id: json.loads(b.resources_json) for b in cluster.client.backends()}
    assert offers[nodes["edge"]]["processor_type"] == "ARM"
    assert offers[nodes["edge"]]["memory_size"] == 1.0
    assert offers[nodes["big"]]["processor_performance"] == 5000.0
    # Detected where reliable, declared otherwise.
    assert offers[nodes["plain"]]["processor_architecture"] == os.uname().machine
    assert "computing_units" not in offers[nodes["plain"]]


def test_constraints_with_pycompss_names_pick_the_backend(nodes):
    edge = constraint(MemorySize=1.0, ProcessorType="ARM")(task(returns=1)(where.fn))
    perf = constraint(memory_size=6.0, processorPerformance="5000")(task(returns=1)(where.fn))
    label = constraint(zone="EDGE")(task(returns=1)(where.fn))
    units = constraint(computingUnits="8")(task(returns=1)(where.fn))
    got = wait_on([edge() for _ in range(4)] + [perf() for _ in range(4)] + [label(), units()])
    pid = nodes["pid"]
    assert set(got[:4]) == {pid[nodes["edge"]]}
    assert set(got[4:8]) == {pid[nodes["big"]]}
    assert got[8] == pid[nodes["edge"]]
    # 8 units: the big node, or the plain one (its units default to CLAYPOT_TASK_SLOTS, 8).
    assert got[9] in (pid[nodes["big"]], pid[nodes["plain"]])


def test_constraints_come_before_locality(nodes):
    b = Block(np.arange(10.0))
    b.make_persistent(backend=nodes["plain"])
    on_arm = constraint(processor_type="arm")(task(returns=2)(where_with.fn))
    pid, total = wait_on(list(on_arm(b)))
    # It runs where it may, and reads the object remotely there (the object stays put).
    assert pid == nodes["pid"][nodes["edge"]] and total == 45.0
    free = wait_on(list(where_with(b)))
    assert free[0] == nodes["pid"][nodes["plain"]]  # no constraint: locality decides


def test_a_task_no_backend_can_run_fails_at_the_call():
    gpu = constraint(processor_type="GPU")(task(returns=1)(where.fn))
    with pytest.raises(ConfigurationError, match="processor_type='GPU'"):
        gpu()
    huge = constraint(computing_units=64)(task(returns=1)(where.fn))
    with pytest.raises(ConfigurationError, match="computing_units"):
        huge()
    with pytest.raises(ConfigurationError, match="must be a number"):
        constraint(memory_size="lots")(task(returns=1)(where.fn))


@constraint(MemorySize=1.0, ProcessorType="ARM")
@task(returns=2, c=INOUT)
def myfunc(a, b, c):
    c.data += a.data * b.data
    return "edge", os.getpid()


@implement(source_class="test_runtime_pycompss", method="myfunc")
@constraint(MemorySize=6.0, ProcessorPerformance="5000")
@task(returns=2, c=INOUT)
def myfunc_big(a, b, c):
    c.data += a.data * b.data
    return "big", os.getpid()


def test_implement_picks_the_implementation_next_to_the_data(nodes):
    assert [t.__name__ for t in myfunc.alternatives()] == ["myfunc", "myfunc_big"]
    results = {}
    for name in ("edge", "big"):
        blocks = [Block(np.full(4, 2.0)) for _ in range(3)]
        for x in blocks:
            x.make_persistent(backend=nodes[name])
        results[name] = wait_on(list(myfunc(*blocks)))
        assert blocks[2].data.tolist() == [6.0] * 4
    assert results["edge"] == ["edge", nodes["pid"][nodes["edge"]]]
    assert results["big"] == ["big", nodes["pid"][nodes["big"]]]
    # Data on a backend neither implementation may use: one of them runs, elsewhere.
    blocks = [Block(np.ones(2)) for _ in range(3)]
    for x in blocks:
        x.make_persistent(backend=nodes["plain"])
    kind, pid = wait_on(list(myfunc(*blocks)))
    assert pid == nodes["pid"][nodes[kind]]


@task(path=FILE_OUT)
def write(path, text):
    with open(path, "w") as f:
        f.write(text)


@task(path=FILE_INOUT)
def append_line(path, text):
    with open(path, "a") as f:
        f.write(text)


@task(returns=1, path=FILE_IN)
def read(path):
    with open(path) as f:
        return f.read()


def test_file_directions_versions_and_wait_on_file(tmp_path):
    path = str(tmp_path / "log.txt")
    write(path, "a\n")
    first = read(path)  # reads version 1
    for i in range(3):
        append_line(path, f"{i}\n")  # versions 2..4; none waits for `first`
    last = read(path)
    assert wait_on(first) == "a\n"
    assert wait_on(last) == "a\n0\n1\n2\n"
    assert not os.path.exists(path)  # versions live with the runtime until asked for
    assert compss_wait_on_file(path) == path
    with open(path) as f:
        assert f.read() == "a\n0\n1\n2\n"
    append_line(path, "3\n")
    with compss_open(path) as f:
        assert f.read().endswith("2\n3\n")


def test_file_bytes_travel_to_the_backend_large(tmp_path, nodes):
    src = tmp_path / "big.bin"
    data = os.urandom(3 * 2**20)  # past the inline limit: streamed
    src.write_bytes(data)
    size = constraint(zone="edge")(
        task(returns=1, path=FILE_IN)(lambda path: (os.path.getsize(path), os.path.dirname(path)))
    )
    n, where_dir = wait_on(size(str(src)))
    assert n == len(data) and where_dir != str(tmp_path)  # a copy on the backend's side


def test_binary_task_with_files_streams_and_exit_codes(tmp_path):
    src = tmp_path / "words.txt"
    src.write_text("one two three\n")
    out, err = str(tmp_path / "wc.out"), str(tmp_path / "wc.err")

    @binary(binary="wc", args="-w {{path}}")
    @task(returns=int, path=FILE_IN, out=FILE_OUT_STDOUT, err=FILE_OUT_STDERR)
    def count_words(path, out, err):
        pass

    assert wait_on(count_words(str(src), out, err)) == 0
    with open(compss_wait_on_file(out)) as f:
        assert f.read().split()[0] == "3"

    @binary(binary="sh", args="-c 'echo broken >&2; exit 3'")
    @task(returns=int, on_failure="CANCEL_SUCCESSORS")
    def fails():
        pass

    bad = fails()
    after = runtime.task(returns=1)(lambda x: x)(bad)
    with pytest.raises(TaskError, match="exited with 3: broken"):
        wait_on(bad)
    with pytest.raises(TaskCancelled):
        wait_on(after)
    barrier()  # CANCEL_SUCCESSORS: the barrier does not raise

    @binary(binary="sh", args="-c 'exit 5'", fail_by_exit_value=False)
    @task(returns=int)
    def exit_code():
        pass

    assert wait_on(exit_code()) == 5


def _need(program):
    if shutil.which(program) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (.ci/run installs openmpi-bin)")
        pytest.skip(f"{program} is not installed (apt-get install openmpi-bin)")


@pytest.mark.slow
def test_mpi_task_runs_ranks_and_fails_by_exit_code(tmp_path):
    _need("mpirun")
    out = str(tmp_path / "ranks.out")

    @constraint(computing_units="2")
    @mpi(runner="mpirun", binary="sh", args="-c 'echo rank=$OMPI_COMM_WORLD_RANK'", processes=4)
    @task(returns=int, stdOutFile=FILE_OUT_STDOUT)
    def ranks(stdOutFile):
        pass

    assert wait_on(ranks(out)) == 0
    with open(compss_wait_on_file(out)) as f:
        assert sorted(f.read().split()) == [f"rank={i}" for i in range(4)]

    @mpi(runner="mpirun", binary="sh", args="-c 'exit 2'", processes=2)
    @task(returns=int, on_failure="IGNORE")
    def broken():
        pass

    assert wait_on(broken()) is None  # IGNORE: the failure is logged, not raised


def _need_mpi4py():
    _need("mpirun")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("mpi4py is not installed (the dev extra installs it)")
        pytest.skip("mpi4py is not installed (pip install mpi4py)")


@pytest.mark.slow
def test_mpi_task_runs_a_python_function_on_every_rank(cluster):
    """``@mpi`` without a binary: the function runs under mpi4py on each rank, the ranks
    talk to each other, read a persistent object, and the value is every rank's result."""
    _need_mpi4py()
    block = Block(np.arange(8.0))
    block.make_persistent(backend=cluster.backends[2])

    @mpi(runner="mpirun", processes=3)
    @task(returns=1)
    def spread(b, scale):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        mine = float(b.data[rank::size].sum()) * scale
        return rank, size, comm.allreduce(mine)

    results = wait_on(spread(block, 2.0))
    assert [r[:2] for r in results] == [(0, 3), (1, 3), (2, 3)]
    assert all(r[2] == 2.0 * np.arange(8.0).sum() for r in results)

    @mpi(runner="mpirun", processes=2)
    @task(returns=1)
    def one_rank_fails():
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_rank() == 1:
            raise ValueError("rank 1 failed")
        return "ok"

    with pytest.raises(ValueError, match="rank 1 failed"):
        wait_on(one_rank_fails())
    with pytest.raises(TaskError):  # and the next barrier reports it, once
        barrier()


@task(c=INOUT)
def multiply(a, b, c):
    c.data += a.data @ b.data


def test_blocked_matrix_multiplication_on_persistent_blocks(cluster):
    n, m = 3, 16  # 3x3 blocks of 16x16
    rng = np.random.default_rng(7)
    A = rng.random((n * m, n * m))
    B = rng.random((n * m, n * m))
    ids = cluster.backends

    def blocks(M, zero=False):
        out = []
        for i in range(n):
            row = []
            for j in range(n):
                blk = Block(np.zeros((m, m)) if zero else M[i * m : (i + 1) * m, j * m : (j + 1) * m].copy())
                blk.make_persistent(backend=ids[(i * n + j) % len(ids)])
                row.append(blk)
            out.append(row)
        return out

    a, b, c = blocks(A), blocks(B), blocks(None, zero=True)
    for i in range(n):
        for j in range(n):
            for k in range(n):
                multiply(a[i][k], b[k][j], c[i][j])
    barrier()
    C = np.block([[wait_on(c[i][j]).data for j in range(n)] for i in range(n)])
    np.testing.assert_allclose(C, A @ B)


@pytest.mark.slow
def test_elastic_scale_uses_new_backends_at_once_and_drains(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "elastic")) as c:
        keep = Block(np.arange(5.0))
        keep.make_persistent(backend=c.backends[0])
        joined = c.scale(2, resources="zone=burst")
        assert len(joined) == 1 and len(c.backends) == 2
        burst = constraint(zone="burst")(task(returns=1)(where.fn))
        # Used for the next tasks at once: no wait for the runtime's backend cache.
        assert wait_on(burst()) == c.process_of(joined[0]).pid
        moving = Block(np.arange(3.0))
        moving.make_persistent(backend=joined[0])
        left = c.scale(1)
        assert left == joined and not c.process_of(joined[0]).alive()
        # Its objects moved before it stopped: still there, on the remaining backend.
        assert moving.data.tolist() == [0.0, 1.0, 2.0]
        assert store.get_by_id(moving.getID()).data.sum() == 3.0
        assert wait_on(where()) == c.processes[0].pid
        with pytest.raises(ConfigurationError, match="zone"):
            burst()


def test_autoscaling_policy():
    from runtime.elastic import target

    assert target(0, 0.0, 3, 1, 4) == 1  # idle: down to the minimum
    assert target(20, 0.1, 1, 1, 4, tasks_per_backend=8) == 3
    assert target(100, 0.1, 1, 1, 4) == 4  # capped at the maximum
    assert target(2, 9.0, 1, 1, 4, max_wait=5.0) == 2  # long waits add one
    assert target(1, 0.0, 3, 1, 4) == 3  # never shrinks under pending tasks
    with pytest.raises(ConfigurationError):
        runtime.elastic.Autoscaler(None, minimum=3, maximum=2)


@task(returns=1)
def nap(seconds, after=None):
    import time

    time.sleep(seconds)
    return os.getpid()


@pytest.mark.slow
def test_autoscaler_grows_with_the_queue_and_shrinks_when_idle(tmp_path):
    import time

    from runtime.elastic import Autoscaler

    with LocalCluster(backends=1, data_dir=str(tmp_path / "auto")) as c:
        with Autoscaler(c, minimum=1, maximum=2, tasks_per_backend=4, interval=0.2, cooldown=0.5) as auto:
            # Tasks are placed when they become ready: these wait behind a gate long
            # enough for the queue to be seen and a backend to join.
            gate = nap(3.0)
            futures = [nap(0.2, gate) for _ in range(40)]
            pids = set(wait_on(futures))
            deadline = time.monotonic() + 30
            while auto.size() > 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        assert auto.error is None
        assert [n for _, n in auto.history][:1] == [2] and auto.history[-1][1] == 1
        assert len(pids) == 2  # the new backend took tasks that became ready
        assert auto.size() == 1


def test_workflow_of_python_binary_and_mpi_tasks_over_files(tmp_path):
    _need("mpirun")
    data, sorted_out, ranks_out = (str(tmp_path / n) for n in ("data.txt", "sorted.txt", "ranks.txt"))

    @task(path=FILE_OUT)
    def generate(path, n):
        with open(path, "w") as f:
            f.write("".join(f"{(i * 7919) % n}\n" for i in range(n)))

    @binary(binary="sort", args="-n {{src}}")
    @task(returns=int, src=FILE_IN, out=FILE_OUT_STDOUT)
    def sort_numbers(src, out):
        pass

    @mpi(runner="mpirun", binary="sh", processes=3, args="-c 'echo $OMPI_COMM_WORLD_RANK $(wc -l < {{src}})'")
    @task(returns=int, src=FILE_IN, out=FILE_OUT_STDOUT)
    def count_on_ranks(src, out):
        pass

    @task(returns=1, path=FILE_IN)
    def total(path):
        with open(path) as f:
            return sum(int(line.split()[1]) for line in f)

    generate(data, 50)
    sort_numbers(data, sorted_out)
    count_on_ranks(sorted_out, ranks_out)
    assert wait_on(total(ranks_out)) == 3 * 50
    with open(compss_wait_on_file(sorted_out)) as f:
        assert [int(x) for x in f] == sorted((i * 7919) % 50 for i in range(50))


def test_file_and_binary_tasks_run_inline_without_a_cluster(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        from runtime import task, binary, FILE_IN, FILE_INOUT, FILE_OUT_STDOUT, wait_on
        from runtime import compss_wait_on_file

        @task(path=FILE_INOUT)
        def add_line(path, text):
            with open(path, "a") as f:
                f.write(text + "\\n")

        @binary(binary="wc", args="-l {{{{path}}}}")
        @task(returns=int, path=FILE_IN, out=FILE_OUT_STDOUT)
        def lines(path, out):
            pass

        p = {str(tmp_path / "inline.txt")!r}
        add_line(p, "a"); add_line(p, "b")
        assert wait_on(lines(p, p + ".wc")) == 0
        print(open(compss_wait_on_file(p + ".wc")).read().split()[0])
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAYPOT_ADDRESS")}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


@pytest.mark.slow
def test_slurm_jobs_join_take_tasks_and_leave_drained(tmp_path):
    from slurmbed import SlurmBed, missing

    from store.slurm import SlurmCluster

    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM test bed unavailable: {why} (.ci/run installs slurm-wlm)")
        pytest.skip(why)
    bed = SlurmBed(str(tmp_path / "slurm")).start()
    try:
        with LocalCluster(backends=1, data_dir=str(tmp_path / "local")) as c:
            engine = SlurmCluster(c.redis_url, c.token, str(tmp_path / "jobs"))
            try:
                joined = engine.scale(1, resources="zone=slurm")
                job = engine.processes[0]
                assert job.state() == "RUNNING" and joined == [job.backend_id]
                on_slurm = constraint(zone="slurm")(task(returns=1)(where.fn))
                assert wait_on(on_slurm()) == job.pid  # used at once
                obj = Block(np.arange(4.0))
                obj.make_persistent(backend=job.backend_id)
                assert engine.scale(0) == [job.backend_id]
                assert job.state() == "" and engine.size() == 0  # the job ended
                assert obj.data.tolist() == [0.0, 1.0, 2.0, 3.0]  # moved before it left
                with pytest.raises(ConfigurationError, match="zone"):
                    on_slurm()
            finally:
                engine.stop()
    finally:
        bed.stop()


def test_resource_names_parsing_and_matching():
    from runtime._resources import constraints, satisfies, unmet
    from store._util import resources as res

    assert [res.canonical(n) for n in ("MemorySize", "computingUnits", "GPU", "zone")] == [
        "memory_size",
        "computing_units",
        "gpu",
        "zone",
    ]
    offered = res.parse("computing_units=4, MemorySize=8,processorType=ARM,app_software=numpy;gromacs,zone=edge")
    assert offered == {
        "computing_units": 4.0,
        "memory_size": 8.0,
        "processor_type": "ARM",
        "app_software": ["gromacs", "numpy"],
        "zone": "edge",
    }
    assert satisfies(constraints(computingUnits="2", processor_type="arm", appSoftware="numpy"), offered)
    assert unmet(constraints(memory_size=16, app_software=["numpy", "tf"], zone="cloud"), offered) == [
        "memory_size=16.0 (offered: 8.0)",
        "app_software=['numpy', 'tf'] (offered: ['gromacs', 'numpy'])",
        "zone='cloud' (offered: 'edge')",
    ]
    for bad in ("computing_units", "memory_size=-1", "gpus=many"):
        with pytest.raises(ConfigurationError):
            res.parse(bad)
    with pytest.raises(ConfigurationError, match="resources"):
        store.config.Settings.from_env(env={"CLAYPOT_RESOURCES": "zone"})


def test_directory_directions_travel_as_trees_with_versions(tmp_path):
    from runtime import DIRECTORY_IN, DIRECTORY_INOUT, DIRECTORY_OUT

    out = str(tmp_path / "tree")

    @task(d=DIRECTORY_OUT)
    def fill(d, n):
        os.makedirs(os.path.join(d, "sub"), exist_ok=True)
        for i in range(n):
            with open(os.path.join(d, "sub", f"{i}.txt"), "w") as f:
                f.write(str(i))

    @task(d=DIRECTORY_INOUT)
    def add(d, name):
        with open(os.path.join(d, name), "w") as f:
            f.write(name)

    @task(returns=1, d=DIRECTORY_IN)
    def listing(d):
        return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)

    fill(out, 3)
    before = listing(out)  # version 1
    add(out, "extra")  # version 2: does not wait for `before`
    after = listing(out)
    assert wait_on(before) == ["sub/0.txt", "sub/1.txt", "sub/2.txt"]
    assert wait_on(after) == ["extra", "sub/0.txt", "sub/1.txt", "sub/2.txt"]
    compss_wait_on_file(out)
    with open(os.path.join(out, "sub", "2.txt")) as f:
        assert f.read() == "2"
    assert sorted(os.listdir(out)) == ["extra", "sub"]


def test_a_directory_archive_cannot_write_outside_its_tree(tmp_path):
    import io
    import tarfile

    from runtime._files import unpack

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(TaskError, match="refusing archive member"):
        unpack(buf.getvalue(), str(tmp_path / "tree"))
    assert not (tmp_path / "escaped").exists()


def test_files_on_the_shared_filesystem_do_not_travel(cluster, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    path = str(shared / "data.txt")
    client = cluster.client
    saved = client.settings
    client.settings = saved.replace(shared_dir=str(shared))
    try:

        @task(returns=1, path=FILE_INOUT)
        def grow(path, text):
            with open(path, "a") as f:
                f.write(text)
            return path

        @task(returns=2, path=FILE_IN)
        def seen(path):
            with open(path) as f:
                return path, f.read()

        with open(path, "w") as f:
            f.write("a")
        first = seen(path)
        where = grow(path, "b")
        second = seen(path)
        p1, t1 = wait_on(list(first))
        p2, t2 = wait_on(list(second))
        assert (t1, t2) == ("a", "ab")
        # The tasks worked on the shared directory itself, not on copies.
        assert p1 == path and os.path.dirname(wait_on(where)).startswith(str(shared))
        assert p2 == wait_on(where)
        with open(compss_wait_on_file(path)) as f:
            assert f.read() == "ab"
    finally:
        client.settings = saved
