"""The COMPSs storage runtime interface (store.compat.compss, ``storage.api`` on the
shim path), called the way the COMPSs runtime calls it: the master's init/finish,
and a worker that reads its configuration, forks executors which connect after
the fork, run tasks inside TaskContext and resolve their arguments with getByID."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest

import store
import store.compat
from store import LocalCluster, StorageObject
from store.compat import compss
from store.errors import ConfigurationError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


class Tally(StorageObject):
    def __init__(self):
        self.count = 0

    def bump(self):
        self.count += 1
        return self.count


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(backends=2, connect=False) as c:
        yield c


@pytest.fixture(autouse=True)
def _environment_restored():
    # initWorker puts the configuration into the environment, as the COMPSs worker
    # expects; the rest of the suite must not inherit it.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def write_config(path, cluster, style="claypot"):
    host, port = cluster.address.rsplit(":", 1)
    if style == "claypot":
        body = f"""
            # claypot as the COMPSs storage backend
            CLAYPOT_ADDRESS={cluster.address}
            export CLAYPOT_TOKEN="{cluster.token}"
        """
    else:  # dataClay's storage.properties names
        body = f"""
            DC_HOST={host}
            DC_PORT='{port}'
            DC_USERNAME=testuser
            DC_PASSWORD=s3cret
            CLAYPOT_TOKEN={cluster.token}
        """
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_config_file_format(tmp_path, cluster):
    cfg = compss.read_config(write_config(tmp_path / "storage.properties", cluster))
    assert cfg == {"CLAYPOT_ADDRESS": cluster.address, "CLAYPOT_TOKEN": cluster.token}
    assert compss.read_config("") == {}
    bad = tmp_path / "bad.properties"
    bad.write_text("CLAYPOT_ADDRESS\n")
    with pytest.raises(ConfigurationError, match="bad.properties:1: expected KEY=VALUE"):
        compss.read_config(str(bad))
    with pytest.raises(ConfigurationError, match="missing.properties"):
        compss.read_config(str(tmp_path / "missing.properties"))


def test_master_init_getbyid_getlocations_finish(tmp_path, cluster, monkeypatch):
    for key in ("CLAYPOT_ADDRESS", "CLAYPOT_TOKEN", "DC_HOST", "DC_PORT"):
        monkeypatch.delenv(key, raising=False)
    compss.init(write_config(tmp_path / "storage.properties", cluster, style="dataclay"))
    try:
        t = Tally()
        t.makePersistent()
        oid = t.getID()
        same = compss.getByID(oid)
        assert same is t and same.bump() == 1
        owner = t.get_location()
        assert compss.getLocations(oid) == [b.host for b in store.backends() if b.backend_id == owner]
        assert compss.getLocations(oid)
        assert compss.get_client() is store.client()
    finally:
        compss.finish()
    assert compss.get_client() is None
    with pytest.raises(ConfigurationError, match="call init"):
        compss.getByID(oid)


def test_task_context_logs_and_never_swallows(tmp_path, cluster, caplog, monkeypatch):
    monkeypatch.delenv("CLAYPOT_ADDRESS", raising=False)
    compss.init(write_config(tmp_path / "storage.properties", cluster))
    try:
        t = Tally()
        t.make_persistent()
        logger = logging.getLogger("compss.worker")
        with caplog.at_level(logging.DEBUG, logger="compss.worker"):
            with compss.TaskContext(logger, [t, 3, "x"]):
                t.bump()
            with pytest.raises(KeyError):
                with compss.TaskContext(logger, [t]):
                    raise KeyError("task failed")
        assert "task raised KeyError" in caplog.text
        assert t.count == 1
        t.deletePersistent()
        with pytest.raises(store.errors.ObjectNotFound):
            with compss.TaskContext(logger, [t]):
                pass
    finally:
        compss.finish()


WORKER = textwrap.dedent("""
    # The order the COMPSs worker follows: initWorker in the worker process, fork
    # executors, initWorkerPostFork in each, tasks in TaskContext, getByID for
    # persistent arguments, finishWorkerPostFork, then finishWorker.
    import logging, os, sys
    import storage.api as api
    import store._model.objects

    config, object_id, executors = sys.argv[1], sys.argv[2], int(sys.argv[3])
    api.initWorker(config)
    assert not store._model.objects.has_dispatcher(), "nothing connected before the fork"
    children = []
    for i in range(executors):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                api.initWorkerPostFork()
                tally = api.getByID(object_id)
                with api.TaskContext(logging.getLogger("executor"), [tally]):
                    tally.bump()
                api.finishWorkerPostFork()
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    failed = [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
    api.finishWorker()
    print("executors failed:", len(failed))
""")


def test_worker_forks_executors_that_connect_after_the_fork(tmp_path, cluster):
    compss.init(write_config(tmp_path / "storage.properties", cluster))
    try:
        t = Tally()
        t.make_persistent()
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([store.compat.shim_path(), TESTS, REPO]))
        env.pop("CLAYPOT_ADDRESS", None)
        run = subprocess.run(
            [sys.executable, str(script), write_config(tmp_path / "w.properties", cluster), t.getID(), "3"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "executors failed: 0"
        assert t.count == 3
    finally:
        compss.finish()
