"""bench/compare.py: the verdicts it gives on saved runs, and that it watches real figures.

The benches themselves are not run here (timings are never asserted in tests):
compare.py is run as a program on JSON documents written by the test.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import compare  # noqa: E402

BASE = {"ratios": {"readonly_call_over_echo_p50": 1.2, "make_persistent_over_floor": 0.5, "threads_8_over_echo": 0.9}}


def run_compare(tmp_path, runs: list[dict], *extra: str) -> tuple[int, dict]:
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    (results / "calls.json").write_text(json.dumps(BASE))
    args = []
    for i, doc in enumerate(runs):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(doc))
        args += ["--current", f"calls={path}"]
    res = subprocess.run(
        [sys.executable, "bench/compare.py", "--results", str(results), *args, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return res.returncode, json.loads(res.stdout)


def rows_by_ratio(report: dict) -> dict:
    return {r["ratio"].split(".")[-1]: r for r in report["benches"]["calls"]["ratios"]}


def test_same_figures_pass(tmp_path):
    code, report = run_compare(tmp_path, [BASE])
    assert code == 0 and report["ok"] and report["regressions"] == []
    rows = rows_by_ratio(report)
    assert rows["make_persistent_over_floor"]["verdict"] == "ok"
    assert rows["make_persistent_over_floor"]["change"] == 0
    # Watched but absent on both sides (no dataClay in this run): said, not failed.
    assert rows["make_persistent_over_dataclay"]["verdict"] == "not compared"


@pytest.mark.parametrize(
    "name,value,verdict",
    [
        ("make_persistent_over_floor", 0.40, "regression"),  # higher is better: 20% lower
        ("make_persistent_over_floor", 0.44, "ok"),  # 12% lower: within 15%
        ("make_persistent_over_floor", 0.90, "ok"),  # better
        ("readonly_call_over_echo_p50", 1.44, "regression"),  # lower is better: 20% higher
        ("readonly_call_over_echo_p50", 1.30, "ok"),
        ("readonly_call_over_echo_p50", 1.00, "ok"),
    ],
)
def test_a_ratio_worse_by_more_than_the_threshold_fails(tmp_path, name, value, verdict):
    doc = copy.deepcopy(BASE)
    doc["ratios"][name] = value
    code, report = run_compare(tmp_path, [doc])
    assert rows_by_ratio(report)[name]["verdict"] == verdict
    assert code == (1 if verdict == "regression" else 0)
    assert [r["ratio"] for r in report["regressions"]] == ([f"ratios.{name}"] if verdict == "regression" else [])


def test_best_of_repeated_runs_counts_and_threshold_is_settable(tmp_path):
    bad, good = copy.deepcopy(BASE), copy.deepcopy(BASE)
    bad["ratios"]["threads_8_over_echo"] = 0.5
    code, report = run_compare(tmp_path, [bad, good])
    assert code == 0 and rows_by_ratio(report)["threads_8_over_echo"]["current"] == 0.9
    code, report = run_compare(tmp_path, [bad], "--threshold", "0.5")
    assert code == 0  # 44% worse is within a 50% threshold
    code, report = run_compare(tmp_path, [bad])
    assert code == 1


def test_bad_arguments_are_refused(tmp_path):
    res = subprocess.run(
        [sys.executable, "bench/compare.py", "--current", "nosuch=x.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "BENCH=FILE" in res.stderr


def test_every_watched_ratio_is_in_the_committed_results():
    """A watched path that matches nothing would compare nothing, silently."""
    optional = {"ratios.make_persistent_over_dataclay", "ratios.threads_8_over_dataclay"}
    for name, spec in compare.BENCHES.items():
        with open(os.path.join(ROOT, "bench", "results", spec["results"])) as f:
            doc = json.load(f)
        for path in spec["watch"]:
            if path in optional and compare.pick(doc, path) is None:
                continue
            assert isinstance(compare.pick(doc, path), (int, float)), (name, path)
