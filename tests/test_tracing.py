"""OpenTelemetry traces across processes: nested calls and a task's calls form one trace.

The test process records its spans with the SDK's in-memory exporter; each
backend appends its own to a shared JSON-lines file (CLAYPOT_TRACE_FILE).
Parent and child are matched by span id across the three processes.
"""

from __future__ import annotations

import os
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from runtime import task, wait_on
from store import LocalCluster, StorageObject, tracing


class Node(StorageObject):
    def __init__(self, name):
        self.name = name
        self.peer = None

    def bounce(self, depth):
        if depth == 0:
            return [self.name]
        return [self.name] + self.peer.bounce(depth - 1)


@task(returns=1)
def bounce_from(node, depth):
    return node.bounce(depth)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    path = str(tmp_path_factory.mktemp("spans") / "backends.jsonl")
    env = {"CLAYPOT_TRACING": "1", "CLAYPOT_TRACE_FILE": path}
    with LocalCluster(backends=2, backend_env=env) as c:
        tracing.enable()
        try:
            yield c, exporter, path
        finally:
            tracing.disable()


def local_spans(exporter) -> list[dict]:
    out = []
    for s in exporter.get_finished_spans():
        ctx = s.get_span_context()
        out.append(
            {
                "name": s.name,
                "trace_id": format(ctx.trace_id, "032x"),
                "span_id": format(ctx.span_id, "016x"),
                "parent_id": format(s.parent.span_id, "016x") if s.parent else "",
                "pid": os.getpid(),
                "kind": s.kind.name,
            }
        )
    return out


def spans_of_trace(exporter, path, trace_id: str, at_least: int) -> list[dict]:
    """Every span of ``trace_id`` from all processes, once ``at_least`` have arrived."""
    deadline = time.monotonic() + 15
    while True:
        spans = [s for s in local_spans(exporter) + tracing.read_trace_file(path) if s["trace_id"] == trace_id]
        if len(spans) >= at_least or time.monotonic() > deadline:
            return spans
        time.sleep(0.05)


def chain_below(spans: list[dict], root: dict) -> list[dict]:
    """The spans from ``root`` down, following the one child each span has."""
    by_parent: dict[str, list[dict]] = {}
    for s in spans:
        by_parent.setdefault(s["parent_id"], []).append(s)
    out = [root]
    while by_parent.get(out[-1]["span_id"]):
        children = by_parent[out[-1]["span_id"]]
        assert len(children) == 1, children
        out.append(children[0])
    return out


def test_nested_calls_a_b_a_are_one_trace(traced):
    c, exporter, path = traced
    a, b = Node("a"), Node("b")
    a.make_persistent(backend=c.backends[0])
    b.make_persistent(backend=c.backends[1])
    a.peer = b
    b.peer = a
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("user work") as root:
        assert a.bounce(2) == ["a", "b", "a"]
    trace_id = format(root.get_span_context().trace_id, "032x")
    # user work > call > method (A) > call > method (B) > call > method (A)
    spans = spans_of_trace(exporter, path, trace_id, at_least=7)
    top = next(s for s in spans if s["name"] == "user work")
    chain = chain_below(spans, top)
    assert [s["name"] for s in chain] == [
        "user work",
        "call bounce",
        "method bounce",
        "call bounce",
        "method bounce",
        "call bounce",
        "method bounce",
    ]
    assert [s["kind"] for s in chain[1:]] == ["CLIENT", "SERVER"] * 3
    pids = [s["pid"] for s in chain]
    pid_a, pid_b = (c.process_of(x).proc.pid for x in c.backends)
    assert pids == [os.getpid(), os.getpid(), pid_a, pid_a, pid_b, pid_b, pid_a]


def test_a_task_and_its_calls_are_one_trace(traced):
    c, exporter, path = traced
    a, b = Node("a"), Node("b")
    a.make_persistent(backend=c.backends[0])
    b.make_persistent(backend=c.backends[1])
    a.peer = b
    b.peer = a
    exporter.clear()
    assert wait_on(bounce_from(a, 1)) == ["a", "b"]
    # The runtime sends the task from a thread of its own: its client span is the root.
    top = next(s for s in local_spans(exporter) if "bounce_from" in s["name"] and s["kind"] == "CLIENT")
    spans = spans_of_trace(exporter, path, top["trace_id"], at_least=4)
    chain = chain_below(spans, top)
    names = [s["name"] for s in chain]
    assert names[1].startswith("task ") and names[1] == top["name"]
    # Inside the task, a.bounce is a plain local call; its call to b is remote.
    assert names[2:] == ["call bounce", "method bounce"]
    pid_a, pid_b = (c.process_of(x).proc.pid for x in c.backends)
    assert [s["pid"] for s in chain] == [os.getpid(), pid_a, pid_a, pid_b]


class Blob(StorageObject):
    def __init__(self, n):
        self.data = bytes(n)

    def payload(self):
        return self.data


def test_streams_and_checkpoints_have_spans(traced):
    c, exporter, path = traced
    blob = Blob(3 * 1024 * 1024)  # over the inline limit
    blob.make_persistent(backend=c.backends[1])
    with trace.get_tracer("test").start_as_current_span("fetch") as root:
        assert len(blob.payload()) == 3 * 1024 * 1024
    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = spans_of_trace(exporter, path, trace_id, at_least=3)
    names = {s["name"] for s in spans}
    assert "call payload" in names and "method payload" in names
    # The same host passes the result through /dev/shm; otherwise it streams, and the
    # fetch is a client span whose server side is a span of its own.
    streamed = [s for s in spans if s["name"] == "stream result"]
    assert len(streamed) in (0, 2)
    if streamed:
        client = next(s for s in streamed if s["kind"] == "CLIENT")
        assert next(s for s in streamed if s["kind"] == "SERVER")["parent_id"] == client["span_id"]
    c.client.checkpoint_backend(c.backends[1])
    deadline = time.monotonic() + 30
    while not any(s["name"] == "checkpoint" for s in tracing.read_trace_file(path)):
        assert time.monotonic() < deadline, "no checkpoint span"
        time.sleep(0.2)


def test_the_core_imports_and_refuses_tracing_without_opentelemetry():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import store, store.backend._service.server, runtime\n"
        "from store import tracing\n"
        "from store.errors import ConfigurationError\n"
        "try:\n"
        "    tracing.enable()\n"
        "except ConfigurationError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "refused: tracing needs OpenTelemetry" in out.stdout


class Chatty(StorageObject):
    def __init__(self):
        self.n = 0

    def work(self):
        import logging

        self.n += 1
        logging.getLogger("app").warning("working on call %d", self.n)
        return self.n


@pytest.mark.slow
def test_json_logs_name_backend_object_call_and_trace(tmp_path):
    import json

    env = {
        "CLAYPOT_LOG_FORMAT": "json",
        "CLAYPOT_LOG": "INFO",
        "CLAYPOT_TRACING": "1",
        "CLAYPOT_TRACE_FILE": str(tmp_path / "spans.jsonl"),
    }
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), backend_env=env) as c:
        obj = Chatty()
        obj.make_persistent()
        assert obj.work() == 1
        log_path = os.path.join(c.processes[0].data_dir, "backend.log")
        deadline = time.monotonic() + 10
        while True:
            with open(log_path) as f:
                lines = [line for line in f if line.strip()]
            records = [json.loads(line) for line in lines if line.startswith("{")]
            work = [r for r in records if r["message"] == "working on call 1"]
            if work or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    # Every line is a JSON object: the default text format is gone entirely.
    assert len(records) == len(lines)
    assert any("serving on" in r["message"] for r in records)
    assert all(r["backend_id"] == c.backends[0] for r in records)
    [rec] = work
    assert rec["object_id"] == obj.getID() and rec["call_id"] and rec["level"] == "WARNING"
    spans = tracing.read_trace_file(str(tmp_path / "spans.jsonl"))
    served = next(s for s in spans if s["name"] == "method work")
    assert rec["trace_id"] == served["trace_id"] and rec["span_id"] == served["span_id"]
