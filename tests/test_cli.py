"""The claypot command line: up, status, down and demo, as a user runs them."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

CLAYPOT = [sys.executable, "-m", "store._ops.cli"]


def run(args, env, timeout=120):
    return subprocess.run(CLAYPOT + args, capture_output=True, text=True, env=env, timeout=timeout)


def test_up_status_connect_down(tmp_path):
    env = dict(os.environ, CLAYPOT_STATE_DIR=str(tmp_path / "state"))
    env.pop("CLAYPOT_ADDRESS", None)
    up = run(["up", "--backends", "2", "--data-dir", str(tmp_path / "data")], env)
    try:
        assert up.returncode == 0, up.stderr
        assert "CLAYPOT_ADDRESS=127.0.0.1:" in up.stdout
        again = run(["up"], env)
        assert again.returncode == 1 and "already running" in again.stderr
        script = (
            "import store\n"
            "from store import StorageObject\n"
            "class Note(StorageObject):\n"
            "    def __init__(self, text): self.text = text\n"
            "store.connect()\n"
            "Note('hello').make_persistent(alias='note')\n"
            "print('READ', store.get_by_alias('note').text)\n"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
        assert "READ hello" in out.stdout, out.stderr
        address = up.stdout.split("CLAYPOT_ADDRESS=")[1].split()[0]
        demo = run(["demo", "--address", address], env)
        assert demo.returncode == 0, demo.stderr
        assert "alice.transfer_to(bob, 30) -> alice 120, bob 50" in demo.stdout
        status = run(["status"], env)
        assert status.returncode == 0, status.stderr
        assert "2 backend(s), 2 up" in status.stdout
        assert status.stdout.count(" up ") == 2
    finally:
        down = run(["down"], env)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not (tmp_path / "state" / "cluster.json").exists()
    status = run(["status"], env)
    assert status.returncode == 1 and "ConfigurationError" in status.stderr


def test_demo_runs_end_to_end():
    out = run(["demo"], dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert "alice.transfer_to(bob, 30) -> alice 120, bob 50" in out.stdout
    assert "bob moved to backend" in out.stdout and "demo done" in out.stdout


def test_quickstart_example_runs():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(here, "examples", "quickstart.py")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "incr(2) -> 7" in out.stdout and "get_by_alias('c1').incr() -> 11" in out.stdout


def test_local_cluster_stops_everything_when_the_body_raises():
    import psutil
    from store import LocalCluster

    pids = []
    data_dir = None
    try:
        with LocalCluster(backends=2) as c:
            pids = [p.pid for p in c.processes] + [c.redis.proc.pid]
            data_dir = c.data_dir
            raise RuntimeError("user code failed")
    except RuntimeError:
        pass
    assert len(pids) == 3
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert not os.path.exists(data_dir)  # the temporary data dir is removed too
    import pytest
    import store

    with pytest.raises(store.errors.ConfigurationError):  # disconnected, too
        store.backends()
