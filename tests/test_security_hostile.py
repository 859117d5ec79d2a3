"""Hostile input against a running backend (see tests/hostile.py): it keeps serving,
nothing stored changes, no payload runs, every bad request gets an answer."""

import json

import pytest

import hostile
from store import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_hostile_input_leaves_the_backend_serving_and_objects_intact(tmp_path):
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c"), backend_env={"CLAYPOT_ADMIN_TIMEOUT": "3"}) as cluster:
        summary = hostile.run(cluster, examples=12, connections=1000, random_conns=60, silent=3)
    print(json.dumps(summary, indent=2, sort_keys=True))
    attacks = {k: v for k, v in summary.items() if isinstance(v, dict)}
    assert len(attacks) == 8
    for name, result in attacks.items():
        assert result["backend_intact"], name
    assert summary["payload_ran"] is False
    assert not attacks["exploit_pickles"]["payload_ran"]
    # Without a valid token nothing reached the servicer.
    assert attacks["exploit_pickles"]["outcomes"]["grpc:UNAUTHENTICATED"] == 5
    assert attacks["exploit_pickles"]["outcomes"].get("reply:ClassNotFound") == 1
    # Bad names get a typed error, never an unhandled exception.
    names = attacks["long_and_control_names"]["outcomes"]
    assert set(names) <= {"reply:ProtocolError"}, names
    # The 20 MiB message is refused by gRPC, absurd stream sizes by the backend.
    big = attacks["oversized"]["outcomes"]
    assert big.get("grpc:RESOURCE_EXHAUSTED") == 1 and big.get("reply:ValueTooLarge") == 3, big
    # No request the generator made crashed a handler (that would be gRPC UNKNOWN).
    generated = attacks["hypothesis_requests"]
    assert generated["sent"] >= 12 * 13  # Ping and ListBackends have one request each
    assert "grpc:UNKNOWN" not in generated["outcomes"], generated["outcomes"]
    assert "reply:RemoteError" not in generated["outcomes"], generated["outcomes"]
    assert attacks["many_connections"]["opened"] == 1000
    assert attacks["random_bytes"]["ended"] == 60
    # A stream that never sends is cancelled by the backend near its admin timeout (3 s).
    silent = attacks["silent_streams"]
    assert silent["outcomes"] == {"grpc:CANCELLED": 3}, silent
    assert silent["longest_s"] < 30
