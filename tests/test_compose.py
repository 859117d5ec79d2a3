"""docker-compose.yml for real: build, run the demo twice, restart a backend, tear down.

Runs wherever a Docker engine with compose v2 is reachable, and skips with the
reason otherwise; under CI=true (where .ci/run sets the engine up) it fails
instead of skipping. The project gets a name of its own, so it never touches a
user's ``claypot`` project, and ``down -v`` removes its containers and volumes.
"""

import json
import os
import secrets
import subprocess

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Objects on every backend, by alias; prints {alias: [backend id, value]}.
MAKE = """
import json, store
from store._ops.demo import Account
store.connect("backend:7000")
out = {}
for i, b in enumerate(b for b in store.backends() if b.up):
    a = Account("check-%d" % i, 1000 + i)
    a.make_persistent(alias="check-%d" % i, backend=b.backend_id)
    a.deposit(5)
    out["check-%d" % i] = [b.backend_id, a.balance, b.address]
print(json.dumps(out))
"""

# The same aliases read back: {alias: [backend id, value]}.
READ = """
import json, sys, time, store
store.connect("backend:7000")
aliases = json.loads(sys.argv[1])
deadline = time.monotonic() + 60
while True:
    try:
        out = {}
        for alias in aliases:
            a = store.get_by_alias(alias)
            out[alias] = [a.get_location(), a.balance]
        break
    except store.errors.ClaypotError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
print(json.dumps(out))
"""


# Each backend's Prometheus metrics, scraped at the address it registered:
# {backend id: [metrics address, whether the page has the call counter]}.
METRICS = """
import json, urllib.request, store

store.connect("backend:7000")
out = {}
for b in store.backends():
    if b.up:
        page = urllib.request.urlopen("http://%s/metrics" % b.metrics_address, timeout=10)
        out[b.backend_id] = [b.metrics_address, "claypot_calls_total" in page.read().decode()]
print(json.dumps(out))
"""


def _engine_missing() -> str | None:
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine reachable ({exc})"
    if info.returncode != 0:
        return f"no Docker engine reachable ({info.stderr.strip()[:200]})"
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if compose.returncode != 0:
        return "docker compose v2 is not installed"
    return None


@pytest.fixture
def compose():
    why = _engine_missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the compose test: {why}")
        pytest.skip(why)
    project = "claypot-test-" + secrets.token_hex(4)
    env = dict(os.environ, CLAYPOT_TOKEN=secrets.token_hex(16), CLAYPOT_REDIS_PASSWORD=secrets.token_hex(16))

    def run(*args, timeout=300, check=True):
        out = subprocess.run(
            ["docker", "compose", "-p", project, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            logs = subprocess.run(
                ["docker", "compose", "-p", project, "logs", "--tail", "40"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            raise AssertionError(
                f"docker compose {' '.join(args)}: exit {out.returncode}\n"
                f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{logs.stdout[-4000:]}"
            )
        return out

    run.project = project
    run.env = env
    try:
        yield run
    finally:
        run("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180, check=False)


def test_compose_cluster_builds_runs_the_demo_twice_and_keeps_objects_across_a_restart(compose):
    compose("up", "--build", "-d", timeout=1200)
    # `compose wait` exits with the demo's exit code (checked by compose()).
    assert "status code 0" in compose("wait", "demo", timeout=300).stdout
    first = compose("logs", "--no-log-prefix", "demo").stdout
    assert "alice.transfer_to(bob, 30) -> alice 120, bob 50" in first
    assert "2 backend(s), 2 up" in first

    # Again: fresh aliases each run (no AliasExists).
    again = compose("run", "--rm", "demo", timeout=300)
    assert "bob moved to backend" in again.stdout, again.stdout

    # `ps` shows each backend at the port it listens on (the image's 7000).
    ps = [json.loads(line) for line in compose("ps", "--format", "json", "backend").stdout.splitlines() if line.strip()]
    assert len(ps) == 2
    for c in ps:
        assert {p["TargetPort"] for p in c["Publishers"]} == {7000}, c["Publishers"]

    made = json.loads(
        compose("run", "--rm", "--entrypoint", "python", "demo", "-c", MAKE).stdout.strip().splitlines()[-1]
    )
    assert len(made) == 2 and len({v[0] for v in made.values()}) == 2
    # Backends on 0.0.0.0 publish metrics because the file sets CLAYPOT_METRICS_PORT.
    scraped = json.loads(
        compose("run", "--rm", "--entrypoint", "python", "demo", "-c", METRICS).stdout.strip().splitlines()[-1]
    )
    assert set(scraped) == {v[0] for v in made.values()}
    for address, has_calls in scraped.values():
        assert address.endswith(":9100") and not address.startswith("0.0.0.0") and has_calls

    # Restart one backend container: its objects are back, on the same backend id.
    victim = ps[0]["Name"]
    subprocess.run(["docker", "restart", "-t", "10", victim], check=True, timeout=120, capture_output=True)
    read = json.loads(
        compose("run", "--rm", "--entrypoint", "python", "demo", "-c", READ, json.dumps(sorted(made)))
        .stdout.strip()
        .splitlines()[-1]
    )
    assert read == {alias: [v[0], v[1]] for alias, v in made.items()}

    # More backends from the same block (CLAYPOT_BACKENDS sets the replicas); a client
    # uses all three, and the first two kept their objects.
    compose.env["CLAYPOT_BACKENDS"] = "3"
    compose("up", "-d", "--wait", "backend", timeout=300)
    spread = json.loads(
        compose("run", "--rm", "--entrypoint", "python", "demo", "-c", MAKE.replace("check-", "scaled-"))
        .stdout.strip()
        .splitlines()[-1]
    )
    assert len({v[0] for v in spread.values()}) == 3
    assert len({v[2] for v in spread.values()}) == 3  # each registered its own address
    read = json.loads(
        compose("run", "--rm", "--entrypoint", "python", "demo", "-c", READ, json.dumps(sorted(made)))
        .stdout.strip()
        .splitlines()[-1]
    )
    assert read == {alias: [v[0], v[1]] for alias, v in made.items()}
