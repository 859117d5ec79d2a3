"""Cancelling remote work: Ctrl-C, a client-side deadline and a task's time_out stop the
method on the backend, release its object and leave it in its last acknowledged state."""

import os
import signal
import subprocess
import sys
import time

import pytest

import store
from store import StorageObject
from store.errors import CallCancelled, DeadlineExceeded, TaskTimeout


class Spinner(StorageObject):
    def __init__(self):
        self.value = 0
        self.steps = 0

    def spin(self, marker, seconds):
        self.value = -1  # a change the cancel must undo
        open(marker, "w").close()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.steps += 1
            time.sleep(0.01)
        self.value = 1
        return self.value

    def read(self):
        return self.value, self.steps


def wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_ctrl_c_cancels_the_remote_method_and_frees_its_object(cluster, tmp_path):
    s = Spinner()
    s.make_persistent(alias="spinner-ctrl-c")
    marker = str(tmp_path / "running")
    script = (
        "import store, sys\n"
        "store.connect(sys.argv[1], sys.argv[2])\n"
        "store.get_by_alias('spinner-ctrl-c').spin(sys.argv[3], 120)\n"
    )
    client = subprocess.Popen(
        [sys.executable, "-c", script, cluster.address, cluster.token, marker], stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(marker)
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert "KeyboardInterrupt" in err
    started = time.monotonic()
    assert s.read() == (0, 0)  # rolled back: as before the call
    assert time.monotonic() - started < 3  # and not locked any more


@pytest.mark.both_transports
def test_a_client_deadline_cancels_the_remote_method(cluster, tmp_path):
    s = Spinner()
    s.make_persistent()
    c = store.client()
    saved = c.settings
    c.settings = saved.replace(call_timeout=1.0)
    try:
        with pytest.raises(DeadlineExceeded):
            s.spin(str(tmp_path / "m"), 120)
    finally:
        c.settings = saved
    started = time.monotonic()
    assert s.read() == (0, 0)
    assert time.monotonic() - started < 3


@pytest.mark.both_transports
def test_cancel_by_call_id_raises_call_cancelled_in_the_method(cluster, tmp_path):
    import threading
    import uuid

    from store._wire.generated import claypot_pb2 as pb
    from store._wire.serialization import dumps
    from store._wire import wire
    from store._model.objects import METHOD

    s = Spinner()
    s.make_persistent()
    c = store.client()
    marker = str(tmp_path / "m")
    call_id = uuid.uuid4().hex
    payload, buffers = dumps(((marker, 120), {}))
    request = pb.CallRequest(
        object_id=s.getID(),
        kind=METHOD,
        name="spin",
        call_id=call_id,
        chain_id=uuid.uuid4().hex,
        args=wire.inline_value(payload, buffers),
    )
    owner = c.locate(s)
    outcome = {}

    def call():
        try:
            outcome["result"] = c._call(s, request, payload, buffers)
        except Exception as exc:
            outcome["error"] = exc

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(marker) and "error" not in outcome:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "error" not in outcome, outcome
    assert c.cancel_call(owner, call_id) is True
    t.join(30)
    assert isinstance(outcome.get("error"), CallCancelled), outcome
    assert "rolled back" in str(outcome["error"])
    assert s.read() == (0, 0)
    assert c.cancel_call(owner, call_id) is False  # nothing runs under that id now


def _spin_task(obj, log, seconds):
    obj.value = 42
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with open(log, "a") as f:
            f.write("x")
        time.sleep(0.05)
    return "finished"


@pytest.mark.both_transports
def test_a_task_past_its_time_out_stops_running(cluster, tmp_path):
    s = Spinner()
    s.make_persistent()
    c = store.client()
    key = c.register_code(_spin_task)
    log = str(tmp_path / "log")
    started = time.monotonic()
    with pytest.raises(TaskTimeout, match="stopped"):
        c.run_task(c.locate(s), key, (s, log, 60), {}, [s.getID()], timeout=1.0)
    assert time.monotonic() - started < 10
    size = os.path.getsize(log)
    time.sleep(0.5)
    assert os.path.getsize(log) == size  # the function no longer runs
    assert s.read() == (0, 0)  # its change was rolled back


@pytest.mark.both_transports
def test_future_cancel_stops_a_running_task(cluster, tmp_path):
    from runtime import INOUT, task, wait_on
    from store.errors import TaskCancelled

    @task(obj=INOUT)
    def spin_task(obj, marker, seconds):
        obj.value = 7
        open(marker, "w").close()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            obj.steps += 1
            time.sleep(0.01)
        return "finished"

    s = Spinner()
    s.make_persistent()
    marker = str(tmp_path / "task-running")
    f = spin_task(s, marker, 120)
    wait_for(marker)
    assert f.cancel() is True
    with pytest.raises(TaskCancelled, match="future.cancel"):
        wait_on(f)
    assert f.cancelled() and f.cancel() is False
    started = time.monotonic()
    assert s.read() == (0, 0)  # stopped on its backend and rolled back
    assert time.monotonic() - started < 3


@pytest.mark.slow
@pytest.mark.both_transports
def test_a_call_cancelled_while_it_waits_for_the_lock_never_runs(cluster, tmp_path):
    import threading
    import uuid

    from store._wire import wire
    from store._wire.generated import claypot_pb2 as pb
    from store._model.objects import METHOD
    from store._wire.serialization import dumps

    s = Spinner()
    s.make_persistent()
    c = store.client()
    first = threading.Thread(target=lambda: s.spin(str(tmp_path / "first"), 2.0))
    first.start()
    wait_for(str(tmp_path / "first"))
    call_id = uuid.uuid4().hex
    payload, buffers = dumps(((str(tmp_path / "second"), 60), {}))
    request = pb.CallRequest(
        object_id=s.getID(),
        kind=METHOD,
        name="spin",
        call_id=call_id,
        chain_id=uuid.uuid4().hex,
        args=wire.inline_value(payload, buffers),
    )
    outcome = {}

    def second():
        try:
            outcome["result"] = c._call(s, request, payload, buffers)
        except Exception as exc:
            outcome["error"] = exc

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.3)  # queued behind the first call's lock
    assert c.cancel_call(c.locate(s), call_id) is False  # not running yet
    first.join(30)
    t.join(30)
    assert isinstance(outcome.get("error"), CallCancelled), outcome
    assert not os.path.exists(str(tmp_path / "second"))  # it never ran
    value, steps = s.read()
    assert value == 1 and steps > 0  # the first call's result stands
