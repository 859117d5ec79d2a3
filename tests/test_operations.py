"""Running a cluster as a person does: the CLI's restart, logs, status --json, forget,
stable addresses across `up`, failover to any live backend, clear connection errors."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from store import errors

pytestmark = pytest.mark.slow

CLAYPOT = [sys.executable, "-m", "store._ops.cli"]


def run(args, env, timeout=120):
    return subprocess.run(CLAYPOT + args, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, CLAYPOT_STATE_DIR=str(tmp_path / "state"), CLAYPOT_HEARTBEAT_TTL="2")
    for name in ("CLAYPOT_ADDRESS", "CLAYPOT_TOKEN", "CLAYPOT_TLS_CA"):
        e.pop(name, None)
    yield e
    run(["down"], e)


def state_of(env):
    with open(os.path.join(env["CLAYPOT_STATE_DIR"], "cluster.json")) as f:
        return json.load(f)


def wait_status(env, predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        out = run(["status", "--json"], env)
        rows = json.loads(out.stdout) if out.stdout.strip() else []
        if predicate(out, rows) or time.monotonic() > deadline:
            return out, rows
        time.sleep(0.3)


def test_a_dead_first_backend_does_not_hide_the_cluster(env, tmp_path):
    up = run(["up", "--backends", "2", "--data-dir", str(tmp_path / "data")], env)
    assert up.returncode == 0, up.stderr
    st = state_of(env)
    first = st["members"][0]
    os.kill(first["process"]["pid"], signal.SIGKILL)

    # status answers at once through the other backend, and exits 3 once the
    # dead one's heartbeat expired; --json carries every BackendInfo field.
    out, rows = wait_status(env, lambda o, r: o.returncode == 3)
    assert out.returncode == 3, out.stderr
    by_id = {r["backend_id"]: r for r in rows}
    assert by_id[first["backend_id"]]["up"] is False
    assert {
        "backend_id",
        "address",
        "host",
        "pid",
        "up",
        "objects",
        "memory_bytes",
        "resident_objects",
        "running_tasks",
        "host_id",
        "stopped",
    } <= set(rows[0])
    assert isinstance(rows[0]["pid"], int)

    # A client connecting with no arguments (the state file names the dead
    # backend first) is up in well under the reconnect timeout.
    script = (
        "import time, store\nt = time.monotonic()\nc = store.connect()\n"
        "print('BACKENDS', len(c.backends()), round(time.monotonic() - t, 2))\n"
    )
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert "BACKENDS 2" in out.stdout, out.stderr
    assert time.monotonic() - started < 8

    # `up` says which backend is down and how to bring it back.
    again = run(["up"], env)
    assert again.returncode == 1 and f"claypot restart {first['backend_id'][:8]}" in again.stderr

    restarted = run(["restart", first["backend_id"][:8]], env)
    assert restarted.returncode == 0, restarted.stderr
    assert first["address"] in restarted.stdout  # same port
    out, rows = wait_status(env, lambda o, r: o.returncode == 0)
    assert out.returncode == 0 and all(r["up"] for r in rows)

    # Its log says it served, twice (before and after the restart).
    logs = run(["logs", first["backend_id"][:8], "-n", "20"], env)
    assert logs.returncode == 0
    assert logs.stdout.count("serving at " + first["address"]) == 2
    assert all(line.startswith(f"[{first['backend_id'][:8]}]") for line in logs.stdout.splitlines())


def test_logs_follow_prints_new_lines(env, tmp_path):
    assert run(["up", "--backends", "1", "--data-dir", str(tmp_path / "data")], env).returncode == 0
    member = state_of(env)["members"][0]
    follower = subprocess.Popen(CLAYPOT + ["logs", "0", "-f", "-n", "0"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert run(["restart", "0"], env).returncode == 0
        line = follower.stdout.readline()  # the restarted backend's first line
        assert "backend " + member["backend_id"] in line
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
        follower.stdout.close()
    assert follower.returncode == 0


def test_up_on_an_existing_data_dir_keeps_ports_and_token(env, tmp_path):
    data = str(tmp_path / "data")
    first = run(["up", "--backends", "2", "--data-dir", data], env)
    assert first.returncode == 0, first.stderr
    before = state_of(env)
    assert run(["down"], env).returncode == 0
    second = run(["up", "--backends", "2", "--data-dir", data], env)
    assert second.returncode == 0, second.stderr
    after = state_of(env)
    assert [m["address"] for m in after["members"]] == [m["address"] for m in before["members"]]
    assert after["token"] == before["token"]
    # The export lines printed the first time still work.
    assert first.stdout.splitlines()[1:3] == second.stdout.splitlines()[1:3]
    assert run(["down"], env).returncode == 0
    third = run(["up", "--backends", "2", "--data-dir", data, "--new-token"], env)
    assert third.returncode == 0 and state_of(env)["token"] != before["token"]


def test_forget_removes_a_backend_gone_for_good(env, tmp_path):
    assert run(["up", "--backends", "2", "--data-dir", str(tmp_path / "data")], env).returncode == 0
    gone = state_of(env)["members"][1]
    up_one = run(["forget", gone["backend_id"][:8]], env)
    assert up_one.returncode == 1 and "is up" in up_one.stderr
    os.kill(gone["process"]["pid"], signal.SIGTERM)
    wait_status(env, lambda o, r: o.returncode == 3)
    out = run(["forget", gone["backend_id"][:8]], env)
    assert out.returncode == 0, out.stderr
    out, rows = wait_status(env, lambda o, r: o.returncode == 0)
    assert out.returncode == 0
    assert [r["backend_id"] for r in rows] == [state_of(env)["members"][0]["backend_id"]]


def test_stale_environment_variables_are_named(env, tmp_path):
    assert run(["up", "--backends", "1", "--data-dir", str(tmp_path / "data")], env).returncode == 0
    bad_token = run(["status"], dict(env, CLAYPOT_TOKEN="not-the-token"))
    assert bad_token.returncode == 1
    assert "AuthenticationError" in bad_token.stderr and "CLAYPOT_TOKEN" in bad_token.stderr
    st = state_of(env)
    # A stale address with a token from elsewhere: nothing to fail over to.
    stale = dict(env, CLAYPOT_ADDRESS="127.0.0.1:1", CLAYPOT_TOKEN="other")
    started = time.monotonic()
    out = run(["status"], stale)
    assert out.returncode == 1
    assert "CLAYPOT_ADDRESS=127.0.0.1:1" in out.stderr and "claypot status" in out.stderr
    assert st["address"] in out.stderr
    assert time.monotonic() - started < 8


def test_bad_addresses_fail_at_once_with_what_is_wrong():
    import store

    cases = {
        "http://127.0.0.1:5000": "http:// prefix",
        "127.0.0.1": "no port",
        "127.0.0.1:99999": "between 1 and 65535",
        "no-such-host.invalid:5000": "resolve",
    }
    for address, says in cases.items():
        started = time.monotonic()
        with pytest.raises(errors.ConfigurationError, match=says):
            store.connect(address, "token")
        assert time.monotonic() - started < 5


def test_a_refused_connection_fails_in_about_a_second_with_a_hint(tmp_path, monkeypatch):
    import store
    from store._ops.cluster import free_port

    monkeypatch.setenv("CLAYPOT_STATE_DIR", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(errors.BackendUnavailable, match="claypot status"):
        store.connect(f"127.0.0.1:{free_port()}", "token")
    assert time.monotonic() - started < 3


def test_cli_has_help_for_every_flag_version_and_completion():
    from store._ops.cli import cli

    for name, command in cli.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"claypot {name} {param.opts}: no help"
    version = run(["--version"], dict(os.environ))
    assert version.returncode == 0 and version.stdout.startswith("claypot ")
    completion = subprocess.run(
        CLAYPOT, capture_output=True, text=True, timeout=30, env=dict(os.environ, _CLAYPOT_COMPLETE="bash_source")
    )
    assert "complete" in completion.stdout and "_CLAYPOT_COMPLETE" in completion.stdout


def test_drain_moves_a_backends_objects_away_and_stops_it(env, tmp_path):
    assert run(["up", "--backends", "2", "--data-dir", str(tmp_path / "data")], env).returncode == 0
    st = state_of(env)
    leaving, staying = st["members"][0], st["members"][1]
    script = (
        "import store\nfrom lifelib import Counter\nstore.connect()\n"
        f"for i in range(5):\n    Counter(i).make_persistent(alias=f'd{{i}}', "
        f"backend={leaving['backend_id']!r})\n"
    )
    e = dict(env, PYTHONPATH=os.path.dirname(__file__) + os.pathsep + env.get("PYTHONPATH", ""))
    made = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=e, timeout=60)
    assert made.returncode == 0, made.stderr
    out = run(["drain", leaving["backend_id"][:8]], e)
    assert out.returncode == 0, out.stderr
    assert "5 object(s) moved" in out.stdout
    assert (
        not psutil.pid_exists(leaving["process"]["pid"])
        or psutil.Process(leaving["process"]["pid"]).status() == psutil.STATUS_ZOMBIE
    )
    check = (
        "import store\nstore.connect()\n"
        "print(sorted((store.get_by_alias(f'd{i}').get_location(), "
        "store.get_by_alias(f'd{i}').value) for i in range(5)))\n"
    )
    got = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=e, timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == str([(staying["backend_id"], i) for i in range(5)])
    assert [m["backend_id"] for m in state_of(env)["members"]] == [staying["backend_id"]]
