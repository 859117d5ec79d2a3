"""The README's "From other languages" sessions, run exactly as printed.

The Node session (a ```js block) runs with claypot-client installed into a
scratch project; the C++ session (a ```cpp block) is compiled against the
built clients/cpp library. Both run against a cluster holding the README's
objects: ``c1`` (the Usage section's Counter, reset to 5 before each session)
and ``field``. Missing node / the C++ build: skipped, or failed under CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import store
from store import StorageObject

pytestmark = pytest.mark.slow

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = os.path.join(ROOT, "README.md")
CPP_BUILD = os.environ.get("CLAYPOT_CPP_BUILD", os.path.join(ROOT, "clients", "cpp", "build"))


class Counter(StorageObject):
    """The README's Counter."""

    def __init__(self, start=0):
        self.value = start

    def incr(self, by=1):
        self.value += by
        return self.value


class Field(StorageObject):
    def __init__(self, n):
        self.samples = np.arange(n, dtype=np.float64) * 1.5
        self.grid = np.zeros((2, 3), dtype=np.float32)

    def scaled(self, k):
        return self.samples * k


def _need(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI must install it: see .ci/run)")
        pytest.skip(why)


def _block(lang: str) -> str:
    text = Path(README).read_text(encoding="utf-8")
    section = text.split("## From other languages", 1)[1]
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one {lang} session in the README"
    return blocks[0]


@pytest.fixture(scope="module")
def objects(cluster):
    c1 = Counter(5)
    c1.make_persistent(alias="c1", backend=cluster.backends[1])
    field = Field(200_000)  # 1.6 MB: read in chunks
    field.make_persistent(alias="field", backend=cluster.backends[1])
    address = next(b.address for b in store.backends() if b.backend_id == cluster.backends[0])
    return c1, field, address


def _check_effects(cluster, c1, field):
    assert c1.value == 0
    assert field.grid.dtype == np.float32 and field.grid.tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(store.errors.AliasNotFound):
        store.get_by_alias("c2")


def test_node_session(cluster, objects, tmp_path):
    node = shutil.which("node")
    lib = os.path.join(ROOT, "clients", "node")
    _need(
        node is not None and os.path.isdir(os.path.join(lib, "node_modules", "@grpc")),
        "node or clients/node/node_modules is missing",
    )
    c1, field, address = objects
    c1.value = 5
    field.grid = np.zeros((2, 3), dtype=np.float32)
    (tmp_path / "node_modules").mkdir()
    os.symlink(os.path.abspath(lib), tmp_path / "node_modules" / "claypot-client")
    script = tmp_path / "session.js"
    script.write_text(_block("js").replace("127.0.0.1:7000", address))
    proc = subprocess.run(
        [node, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, CLAYPOT_TOKEN=cluster.token),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["7", "10"]
    assert lines[2] == "float64 [ 200000 ] true"
    assert lines[3:6] == ["3", "42", "AliasNotFound NOT_FOUND"]
    assert sorted(lines[6:]) == sorted(f"{b} up" for b in cluster.backends)
    _check_effects(cluster, c1, field)


def test_cpp_session(cluster, objects, tmp_path):
    lib = os.path.join(CPP_BUILD, "libclaypot_client.a")
    _need(
        os.path.exists(lib) and shutil.which("g++") is not None,
        "clients/cpp is not built (tests/test_cpp_client.py builds it)",
    )
    c1, field, address = objects
    c1.value = 5
    field.grid = np.zeros((2, 3), dtype=np.float32)
    source = tmp_path / "session.cpp"
    source.write_text(_block("cpp").replace("127.0.0.1:7000", address))
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"], capture_output=True, text=True, check=True
    ).stdout.split()
    exe = tmp_path / "session"
    proc = subprocess.run(
        ["g++", "-std=c++17", str(source), "-o", str(exe), "-I" + os.path.join(ROOT, "clients", "cpp", "include"), lib]
        + flags,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run(
        [str(exe)], capture_output=True, text=True, timeout=120, env=dict(os.environ, CLAYPOT_TOKEN=cluster.token)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:5] == ["7", "10", "float64 200000 1.5", "42", "AliasNotFound 5"]
    assert sorted(line.split()[0] for line in lines[5:]) == sorted(cluster.backends)
    _check_effects(cluster, c1, field)
