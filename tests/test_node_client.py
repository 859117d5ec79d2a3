"""The Node.js client library (clients/node) against a real cluster, and as a package.

``node --test`` runs clients/node/test/, which starts its own cluster
(clients/node/test/cluster.py under this Python); ``tsc`` checks the type
definitions against a TypeScript session; ``npm pack`` builds the package and
a fresh project installs it from the tarball. Needs node, npm and
``npm ci --prefix clients/node``: skipped with the reason when missing,
failed under CI (CI=true), where .ci/run installs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

NODE_DIR = os.path.join(os.path.dirname(__file__), "..", "clients", "node")


def _need(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI must install it: see .ci/run)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    _need(exe is not None, "node is not installed")
    _need(
        os.path.isdir(os.path.join(NODE_DIR, "node_modules", "@grpc", "grpc-js")),
        "clients/node/node_modules is missing: run `npm ci --prefix clients/node`",
    )
    return exe


def test_node_client_against_a_cluster(node):
    env = dict(os.environ, CLAYPOT_PYTHON=sys.executable)
    proc = subprocess.run([node, "--test", "test/"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = int(re.search(r"^# pass (\d+)$", proc.stdout, re.M).group(1))
    failed = int(re.search(r"^# fail (\d+)$", proc.stdout, re.M).group(1))
    assert (passed, failed) == (7, 0), out[-3000:]


def test_type_definitions_compile(node):
    tsc = os.path.join(NODE_DIR, "node_modules", "typescript", "bin", "tsc")
    _need(os.path.exists(tsc), "typescript is missing: run `npm ci --prefix clients/node`")
    proc = subprocess.run(
        [node, tsc, "-p", "test/tsconfig.json"], cwd=NODE_DIR, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_npm_pack_makes_an_installable_package(node, tmp_path):
    npm = shutil.which("npm")
    _need(npm is not None, "npm is not installed")
    proc = subprocess.run(
        [npm, "pack", "--json", "--pack-destination", str(tmp_path)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    packed = json.loads(proc.stdout)[0]
    files = {f["path"] for f in packed["files"]}
    assert {"index.js", "index.d.ts", "package.json", "README.md", "proto/claypot.proto"} <= files
    assert not os.path.exists(os.path.join(NODE_DIR, "proto")), "postpack left the proto copy"
    with open(os.path.join(NODE_DIR, "..", "..", "proto", "claypot.proto"), "rb") as f:
        contract = f.read()

    project = tmp_path / "app"
    project.mkdir()
    (project / "package.json").write_text('{"name": "app", "version": "1.0.0", "private": true}')
    proc = subprocess.run(
        [
            npm,
            "install",
            "--prefer-offline",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            str(tmp_path / packed["filename"]),
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    installed = project / "node_modules" / "claypot-client"
    assert (installed / "proto" / "claypot.proto").read_bytes() == contract
    probe = (
        "const c = require('claypot-client');"
        "console.log(JSON.stringify({api: Object.keys(c), dtypes: c.DTYPES.length,"
        " ok: typeof c.connect === 'function'}))"
    )
    proc = subprocess.run([node, "-e", probe], cwd=project, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert sorted(seen["api"]) == ["ClaypotError", "Client", "DTYPES", "STATUS_BY_CODE", "connect"]
    assert (seen["dtypes"], seen["ok"]) == (14, True)
