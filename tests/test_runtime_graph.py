"""The runtime's pure parts, without a cluster: dependency graph, scoring, decorators."""

from __future__ import annotations

import pytest

from runtime import INOUT, OnFailure, constraint, task
from runtime._graph import TaskGraph
from runtime._scheduler import Demand, Scheduler, locality_scores


def test_readers_after_writer_run_together_and_next_writer_waits_for_all():
    g = TaskGraph()
    assert g.add(1, writes=["x"])
    assert not g.add(2, reads=["x"])
    assert not g.add(3, reads=["x"])
    assert not g.add(4, writes=["x"])
    assert g.predecessors(4) == {1, 2, 3}
    assert g.finish(1) == [2, 3]
    assert g.finish(2) == []
    assert g.finish(3) == [4]
    assert g.finish(4) == []
    assert len(g) == 0


def test_a_versioned_writer_waits_for_the_last_writer_only_its_commit_for_readers():
    g = TaskGraph()
    assert g.add(1, writes=["x"])
    assert not g.add(2, reads=["x"])
    assert not g.add(3, early=["x"])  # the run: after writer 1, not reader 2
    assert not g.add(4, after=[3], writes=["x"])  # the commit: after the run and reader 2
    assert not g.add(5, reads=["x"])  # later readers wait for the commit
    assert g.predecessors(3) == {1}
    assert g.predecessors(4) == {1, 2, 3}
    assert g.finish(1) == [2, 3]
    assert g.finish(3) == []
    assert g.finish(2) == [4]
    assert g.finish(4) == [5]
    assert g.finish(5) == []
    assert len(g) == 0


def test_future_edges_and_diamond():
    g = TaskGraph()
    assert g.add(1)
    assert not g.add(2, after=[1])
    assert not g.add(3, after=[1])
    assert not g.add(4, after=[2, 3])
    assert g.finish(1) == [2, 3]
    assert g.finish(3) == []
    assert g.finish(2) == [4]


def test_edges_to_finished_tasks_are_ignored():
    g = TaskGraph()
    g.add(1, writes=["x"])
    g.finish(1)
    assert g.add(2, after=[1], reads=["x"])
    assert g.last_writer("x") is None


def test_cancel_successors_is_transitive_and_spares_others():
    g = TaskGraph()
    g.add(1)
    g.add(2, after=[1])
    g.add(3, after=[2])
    g.add(4)
    g.add(5, after=[4, 2])
    assert g.cancel_successors(1) == [2, 3, 5]
    assert 4 in g and len(g) == 1
    assert g.finish(4) == []


def test_task_that_reads_and_writes_is_a_writer():
    g = TaskGraph()
    g.add(1, reads=["x"], writes=["x"])
    assert not g.add(2, reads=["x"])
    assert g.users("x") == {1, 2}


def test_graph_stays_small_over_a_long_chain():
    g = TaskGraph()
    for i in range(1, 10_001):
        g.add(i, writes=["x"])
        if i > 1:
            g.finish(i - 1)
    assert len(g) == 1


def test_locality_picks_the_backend_with_most_bytes_then_least_loaded():
    s = Scheduler(slots=4)
    s.set_backends(["a", "b"])
    assert s.choose(["a", "b", "b"]) == "b"  # by count
    assert s.choose(["a", "b", "b"], [1000.0, 1.0, 1.0]) == "a"  # by bytes
    s.take("a", Demand())
    assert s.choose(["a", "b"]) == "b"  # tie: less loaded
    assert s.choose([]) == "b"  # no data: least loaded
    assert s.choose(["gone"]) in ("a", "b")  # owner not up: ignored
    assert locality_scores(["a", "a"]) == {"a": 2.0}


def test_demand_checks():
    s = Scheduler(slots=4, memory=2**30)
    s.check(Demand(units=4))
    with pytest.raises(ValueError, match="computing_units"):
        s.check(Demand(units=5))
    with pytest.raises(ValueError, match="memory_size"):
        s.check(Demand(memory=2**31))


def test_decorator_validation():
    with pytest.raises(TypeError, match="no parameter"):
        task(nope=INOUT)(lambda x: x)
    with pytest.raises(ValueError, match="on_failure"):
        task(on_failure="SOMETIMES")(lambda x: x)
    t = constraint(computing_units=2, memory_size=0.5)(task(returns=2, on_failure="retry")(lambda x: (x, x)))
    assert (t.returns, t.on_failure, t.computing_units, t.memory_bytes) == (2, OnFailure.RETRY, 2, 2**29)
    assert t.positional_names(1) == ["x"]
