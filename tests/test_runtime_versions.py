"""Task versions (``@task(versions=True)``) on a real cluster: a task that changes an
INOUT object works on a new version of it, so it runs alongside the readers submitted
before it; the version is written back once they finished, before any later task."""

from __future__ import annotations

import time

import pytest

import chaos
import store
from runtime import INOUT, barrier, task, wait_on
from store import LocalCluster, StorageObject
from store.errors import TaskError


class Account(StorageObject):
    def __init__(self, balance):
        self.balance = balance


@task(returns=1)
def slow_read(account, pause):
    first = account.balance
    time.sleep(pause)
    return first, account.balance, time.time()


@task(returns=1, versions=True, account=INOUT)
def deposit_versioned(account, amount):
    started = time.time()
    account.balance += amount
    return started, account.getID()


@task(returns=1, account=INOUT)
def deposit_plain(account, amount):
    started = time.time()
    account.balance += amount
    return started, account.getID()


@task(returns=1, versions=True, account=INOUT)
def deposit_then_fail(account, amount):
    account.balance += amount
    raise ValueError("refused")


@task(returns=1)
def read(account):
    return account.balance


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(backends=2) as c:
        yield c


@pytest.fixture(autouse=True)
def _drained(cluster):
    yield
    try:
        barrier(timeout=60)
    except TaskError:
        pass


@pytest.mark.slow
@pytest.mark.both_transports
def test_versioned_writer_runs_alongside_an_earlier_reader(cluster):
    acct = Account(100)
    acct.make_persistent()
    reader = slow_read(acct, 2.0)
    writer = deposit_versioned(acct, 5)
    later = read(acct)
    (started, changed_id), (first, last, reader_done) = wait_on(writer), wait_on(reader)
    assert started < reader_done - 0.5  # it did not wait for the reader
    assert changed_id != acct.getID()  # it changed a version, not the object
    assert (first, last) == (100, 100)  # the reader never saw the change midway
    assert wait_on(later) == 105  # a later task sees it written back
    assert acct.balance == 105
    with pytest.raises(store.errors.ObjectNotFound):
        store.get_by_id(changed_id).balance  # the version is gone


@pytest.mark.both_transports
def test_plain_writer_waits_for_the_earlier_reader(cluster):
    acct = Account(100)
    acct.make_persistent()
    reader = slow_read(acct, 1.0)
    writer = deposit_plain(acct, 5)
    (started, changed_id), (_, _, reader_done) = wait_on(writer), wait_on(reader)
    assert started >= reader_done - 0.05
    assert changed_id == acct.getID()
    assert acct.balance == 105


@pytest.mark.both_transports
def test_versioned_writers_in_a_row_apply_in_order(cluster):
    acct = Account(0)
    acct.make_persistent()
    for i in range(1, 6):
        deposit_versioned(acct, i)
    barrier(timeout=60)
    assert acct.balance == 15


@pytest.mark.both_transports
def test_a_failed_versioned_task_changes_nothing_and_leaves_no_version(cluster):
    acct = Account(7)
    acct.make_persistent()
    before = stored_objects(cluster)
    failing = deposit_then_fail(acct, 1)
    after = read(acct)
    with pytest.raises(ValueError, match="refused"):
        wait_on(failing)
    with pytest.raises(TaskError):
        wait_on(after)  # cancelled: it depended on the failed task
    assert acct.balance == 7
    # The version it changed is deleted.
    chaos.wait_until(lambda: stored_objects(cluster) == before, timeout=15, what="the failed task's version deleted")


def stored_objects(cluster) -> int:
    """Objects in the directory (a deleted version leaves it)."""
    r = chaos.redis_client(cluster)
    try:
        return r.hlen("claypot:objects")
    finally:
        r.close()
