"""Randomized fault injection against a real cluster, checked against a model (see faults.py).

A bounded number of fixed-seed sequences runs in the suite; bench/soak_lifecycle.py
runs the same generator for as long as asked and reports JSON.
"""

from __future__ import annotations

import pytest

from faults import CLUSTER_ENV, Stats, run_sequence
from store import LocalCluster

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [11, 23, 37])
def test_random_operations_with_kill9_keep_every_acknowledged_change(tmp_path, seed):
    stats = Stats()
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c"), backend_env=CLUSTER_ENV) as c:
        run_sequence(c, seed, rounds=6, ops=30, workers=2, stats=stats)
    assert stats.acknowledged > 100 and stats.kills >= 1, stats.as_dict()
    assert not stats.violations, "\n".join(stats.violations[:20])
