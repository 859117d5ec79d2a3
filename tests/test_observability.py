"""Observability against real backends: Prometheus metrics scraped over HTTP."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import store
from runtime import wait_on
from store.config import Settings
from store.errors import ConfigurationError
from store.metrics import serve_address
from runtime import task
from tasklib import Block, Log, block_sum, inc


@task(returns=1)
def broken(x):
    raise ValueError(f"broken on {x}")


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """Every sample a backend's /metrics page serves, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


@pytest.mark.slow
def test_every_backend_serves_metrics_that_follow_its_work(cluster):
    infos = store.backends()
    assert len(infos) == 2
    addresses = {b.backend_id: b.metrics_address for b in infos}
    assert all(a.startswith("127.0.0.1:") for a in addresses.values()), addresses
    before = {bid: scrape(a) for bid, a in addresses.items()}
    for samples in before.values():
        assert total(samples, "claypot_up") == 1

    first, second = [b.backend_id for b in infos]
    log = Log()
    log.make_persistent(backend=first)
    for i in range(20):
        log.add(i)
    with pytest.raises(AttributeError):
        log.no_such_method()
    big = Block(np.ones(2_000_000))  # 16 MB: streamed or passed through /dev/shm
    big.make_persistent(backend=second)
    assert wait_on(block_sum(big)) == 2_000_000.0
    assert wait_on(inc(41)) == 42

    after = {bid: scrape(a) for bid, a in addresses.items()}
    a0, a1 = before[first], after[first]
    calls = total(a1, "claypot_calls_total", kind="method", outcome="ok") - total(
        a0, "claypot_calls_total", kind="method", outcome="ok"
    )
    assert calls >= 20
    assert total(a1, "claypot_calls_total", outcome="error") > total(a0, "claypot_calls_total", outcome="error")
    # The latency histogram counts the same calls as the counter.
    assert (
        total(a1, "claypot_call_seconds_count", kind="method") - total(a0, "claypot_call_seconds_count", kind="method")
        >= 20
    )
    # Under the default sync durability each changing call fsyncs the log.
    assert total(a1, "claypot_fsync_seconds_count") > total(a0, "claypot_fsync_seconds_count")
    assert total(a1, "claypot_group_commit_records_sum") >= 20
    assert total(a1, "claypot_objects", state="total") >= 1
    assert total(a1, "claypot_disk_bytes") > 0
    assert total(a1, "claypot_memory_bytes", what="rss") > 0

    b0, b1 = before[second], after[second]
    assert total(b1, "claypot_objects", state="resident") >= 1
    assert total(b1, "claypot_memory_bytes", what="objects") >= 16_000_000
    moved = sum(
        total(b1, name, direction="in") - total(b0, name, direction="in")
        for name in ("claypot_stream_bytes_total", "claypot_shm_bytes_total")
    )
    assert moved >= 16_000_000
    # block_sum ran next to its block; inc ran on either backend.
    assert total(b1, "claypot_tasks_total", outcome="done") - total(b0, "claypot_tasks_total", outcome="done") >= 1
    tasks_done = sum(
        total(after[b], "claypot_tasks_total", outcome="done") - total(before[b], "claypot_tasks_total", outcome="done")
        for b in addresses
    )
    assert tasks_done >= 2
    assert all(total(after[b], "claypot_tasks_now", state="running") == 0 for b in addresses)


def test_failed_tasks_are_counted(cluster):
    infos = store.backends()
    before = sum(total(scrape(b.metrics_address), "claypot_tasks_total", outcome="failed") for b in infos)
    with pytest.raises(Exception, match="broken on 1"):
        wait_on(broken(1))
    after = sum(total(scrape(b.metrics_address), "claypot_tasks_total", outcome="failed") for b in infos)
    assert after >= before + 1


def test_metrics_address_follows_the_settings():
    loop = Settings.from_env({}, data_dir="/tmp/x")
    assert serve_address(loop) == ("127.0.0.1", 0)
    # A backend on a network publishes nothing unless told to.
    assert serve_address(loop.replace(host="0.0.0.0")) is None
    assert serve_address(loop.replace(host="0.0.0.0", metrics_port=9500)) == ("0.0.0.0", 9500)
    assert serve_address(loop.replace(metrics_port=-1)) is None
    assert Settings.from_env({"CLAYPOT_METRICS_PORT": "9123"}).metrics_port == 9123
    with pytest.raises(ConfigurationError):
        Settings.from_env({"CLAYPOT_METRICS_PORT": "70000"})


@pytest.mark.slow
def test_metrics_can_be_turned_off(tmp_path):
    from store import LocalCluster

    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), backend_env={"CLAYPOT_METRICS_PORT": "-1"}) as c:
        infos = c.client.backends()
        assert [b.metrics_address for b in infos] == [""]


@task(returns=1)
def settle(i, pause):
    import time

    time.sleep(pause)
    if i % 3 == 0:
        raise ValueError(f"task {i} fails on purpose")
    return i


def test_progress_counts_done_and_failed_tasks(cluster):
    import io

    from runtime import progress

    out = io.StringIO()
    futures = [settle(i, 0.05 * (i % 4)) for i in range(9)]
    report = progress(futures, timeout=120, file=out)
    assert (report.total, report.done, report.failed) == (9, 6, 3)
    text = out.getvalue()
    assert "9/9" in text and "failed=3" in text
    # wait_on with a bar returns the values as before (and raises the first error).
    ok = [settle(i, 0.01) for i in (1, 2, 4)]
    assert wait_on(ok, progress=True) == [1, 2, 4]
    with pytest.raises(ValueError, match="fails on purpose"):
        wait_on([settle(3, 0.0)], progress=True)


@pytest.mark.slow
def test_progress_times_out_clearly(cluster):
    import io

    from runtime import progress

    slow = settle(1, 3.0)
    with pytest.raises(TimeoutError, match="1 of 1 tasks did not finish"):
        progress([slow], timeout=0.3, file=io.StringIO())
    assert wait_on(slow) == 1


@pytest.mark.slow
def test_long_transfers_show_bytes_and_rate_when_asked(tmp_path):
    """Inside show_transfers(), a streamed make_persistent and the streamed read of a
    large result draw a bar of bytes with a rate; outside it, nothing is drawn."""
    import io

    import numpy as np

    import store
    from lifelib import Array
    from store import LocalCluster

    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")):
        client = store.client()
        client.settings = client.settings.replace(shm=False)  # the stream path (between hosts)
        out = io.StringIO()
        with store.show_transfers(min_bytes=1 << 20, file=out):
            a = Array(2 * 1024 * 1024)  # 16 MiB of float64
            a.make_persistent()
            data = a.data
        assert isinstance(data, np.ndarray) and data.nbytes == 16 * 1024 * 1024
        text = out.getvalue()
        assert "make_persistent" in text and "result" in text, text
        assert "B/s" in text and "16.0M" in text, text
        quiet = io.StringIO()
        b = Array(2 * 1024 * 1024)
        b.make_persistent()
        assert quiet.getvalue() == ""
        with store.show_transfers(min_bytes=1 << 30, file=quiet):  # under the threshold
            b.fill(1.0)
            assert b.data.sum() == b.data.size
        assert quiet.getvalue() == ""
