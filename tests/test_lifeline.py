"""A LocalCluster never outlives the process that started it: a normal exit without
stop() (atexit) and a kill -9 of the owner (a notebook kernel restart) both leave no
process and no temporary directory behind."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys, time
from store import LocalCluster
c = LocalCluster(backends=2).start()
print(json.dumps({"pids": [p.pid for p in c.processes] + [c.redis.proc.pid],
                  "data_dir": c.data_dir}), flush=True)
if sys.argv[1] == "hang":
    time.sleep(600)
"""


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def start_owner(mode):
    owner = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE, text=True)
    info = json.loads(owner.stdout.readline())
    assert len(info["pids"]) == 3 and os.path.isdir(info["data_dir"])
    return owner, info


def wait_all_gone(info, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(p) for p in info["pids"]) and not os.path.exists(info["data_dir"]):
            return True
        time.sleep(0.1)
    return False


def test_children_and_temp_dir_go_when_the_owner_is_killed():
    owner, info = start_owner("hang")
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    owner.stdout.close()
    assert wait_all_gone(info), [p for p in info["pids"] if not gone(p)]


def test_atexit_stops_a_cluster_that_was_never_stopped():
    owner, info = start_owner("exit")
    assert owner.wait(60) == 0
    owner.stdout.close()
    # atexit ran stop(): everything is gone by the time the owner exited.
    assert all(gone(p) for p in info["pids"])
    assert not os.path.exists(info["data_dir"])


def test_repr_html_lists_backends(cluster):
    html = cluster._repr_html_()
    for p in cluster.processes:
        assert p.backend_id[:8] in html and p.address in html
    assert "backend.log" in html and "<table>" in html and ">up<" in html


def test_a_child_started_from_a_thread_outlives_that_thread():
    import threading

    from store import LocalCluster

    with LocalCluster(backends=1) as c:
        bid = c.backends[0]
        t = threading.Thread(target=lambda: c.restart(bid, kill=True))
        t.start()
        t.join()
        time.sleep(1.0)  # PDEATHSIG would have killed it by now
        assert c.processes[0].alive()
        assert c.client.backends()[0].up
