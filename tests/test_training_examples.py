"""The parameter-server and digits examples, run end to end on a local cluster of their own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CLAYPOT_ADDRESS"}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def test_parameter_server_trains_synchronously_and_asynchronously():
    r = _run("parameter_server.py")
    initial = float(r["initial_loss"])
    assert float(r["sync_final_loss"]) < 0.01 * initial
    assert float(r["async_final_loss"]) < 0.01 * initial
    assert int(r["sync_version"]) == int(r["sync_steps"]) == 40
    assert int(r["async_pushes"]) == 4 * 150  # every push applied, none lost
    assert int(r["async_max_staleness"]) >= 0
    assert r["gradients_ran_where_shards_live"] == "True"
    assert r["backends"] == "2" and r["shards"] == "4"


def test_digits_mlp_reaches_high_accuracy_on_held_out_rows():
    r = _run("digits_training.py")
    assert r["dataset"] == "sklearn.datasets.load_digits"
    assert int(r["train_rows"]) + int(r["test_rows"]) == 1797
    assert float(r["final_loss"]) < 0.2 * float(r["initial_loss"])
    assert float(r["test_accuracy"]) > 0.93
    assert float(r["epochs_per_second"]) > 0
    assert r["gradients_ran_where_shards_live"] == "True"


def test_training_benchmark_runs_the_same_training_on_claypot_and_dask(tmp_path):
    """The benchmark at a toy size: it runs, and both systems compute the same thing.

    (Only its shape and agreement are checked; its speeds are for bench/results.)
    """
    import json

    out_file = tmp_path / "training.json"
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "bench_training.py"),
            "--gib",
            "0.01",
            "--epochs",
            "2",
            "--driver-gib",
            "0.005",
            "--systems",
            "claypot,dask",
            "--out",
            str(out_file),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_file.read_text())
    assert result["data"]["shards"] == 4 and result["workers"] == 2
    for name in ("claypot", "dask"):
        r = result[name]
        assert r["epochs"] == 2 and r["epochs_per_s"] > 0 and r["peak_memory_gib"] > 0
        assert r["ingested_gradient_ok"] is True
    assert abs(result["claypot"]["final_loss"] - result["dask"]["final_loss"]) < 1e-4
    assert result["claypot"]["backends_used"] == 2
    assert set(result["ratios"]) >= {"claypot_vs_dask_epochs_per_s", "dask_vs_claypot_peak_memory"}
