"""proto/claypot.proto as a contract: buf lint and breaking-change detection.

tools/check_buf.sh runs buf (the npm package @bufbuild/buf, installed by
``npm ci --prefix tools/buf``) against the committed previous version of the
proto. The current proto must pass; copies with a renumbered field, a removed
RPC or a badly named new message must fail, so the check is known to bite.
Skipped with the reason when buf is missing; failed under CI (CI=true).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
BUF = os.path.join(ROOT, "tools", "buf", "node_modules", ".bin", "buf")
PROTO = os.path.join(ROOT, "proto", "claypot.proto")


@pytest.fixture(scope="module")
def buf() -> str:
    if not os.path.exists(BUF):
        why = "buf is missing: run `npm ci --prefix tools/buf`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI must install it: see .ci/run)")
        pytest.skip(why)
    return BUF


def _check(proto_dir: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if proto_dir is not None:
        env["PROTO_DIR"] = proto_dir
    return subprocess.run(
        ["bash", os.path.join(ROOT, "tools", "check_buf.sh")], env=env, capture_output=True, text=True, timeout=120
    )


def test_current_proto_passes_lint_and_breaking_check(buf):
    proc = _check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no breaking change" in proc.stdout


@pytest.mark.parametrize(
    "change, expect",
    [
        (("bool accept_shm = 9;", "bool accept_shm = 99;"), "accept_shm"),
        (("  rpc Move(MoveRequest) returns (Status);\n", ""), "Move"),
        (("message DeleteObjectResponse {}", "message DeleteObjectResponse {}\nmessage bad_name {}"), "bad_name"),
        (("  bool adopt = 2;\n", ""), "adopt"),
    ],
)
def test_breaking_or_unidiomatic_changes_fail(buf, tmp_path, change, expect):
    text = Path(PROTO).read_text(encoding="utf-8")
    old, new = change
    assert old in text
    (tmp_path / "claypot.proto").write_text(text.replace(old, new, 1))
    proc = _check(str(tmp_path))
    assert proc.returncode != 0, proc.stdout
    assert expect in proc.stdout + proc.stderr
