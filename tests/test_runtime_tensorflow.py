"""The TensorFlow examples, run end to end. Skipped when TensorFlow is not installed.

CI runs it in a step of its own: ``pip install tensorflow-cpu`` then
``pytest tests/test_runtime_tensorflow.py`` (TensorFlow is a 270 MB wheel and
takes several seconds to import in each backend, too heavy for the default job).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The CI step that installs TensorFlow sets CLAYPOT_REQUIRE_TENSORFLOW=1, so a
# failed install fails the step instead of skipping the test.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None and os.environ.get("CLAYPOT_REQUIRE_TENSORFLOW") != "1",
    reason="tensorflow is not installed (pip install tensorflow-cpu)",
)


def test_tensorflow_training_example_reduces_loss():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "tensorflow_training.py")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert float(lines["final_loss"]) < 0.6 * float(lines["initial_loss"])
    assert lines["gradients_ran_where_shards_live"] == "True"
    assert lines["shards"] == "4"


def test_keras_digits_example_reaches_high_accuracy():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "digits_keras.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert lines["model"] == "keras.Sequential"
    assert float(lines["final_loss"]) < 0.2 * float(lines["initial_loss"])
    assert float(lines["test_accuracy"]) > 0.93
    assert lines["gradients_ran_where_shards_live"] == "True"
