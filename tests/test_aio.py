"""The asyncio API: `await obj.method.aio(...)`, `await store.aio.get_by_alias(...)`,
a thousand calls in flight from one loop, cancellation, blocking calls inside a loop."""

import asyncio
import time

import pytest

import store
from store import StorageObject
from store.errors import AliasNotFound, ValueTooLarge


class Tally(StorageObject):
    def __init__(self):
        self.n = 0
        self.steps = 0

    def incr(self, k=1):
        self.n += k
        return self.n

    def spin(self, seconds):
        self.n = -1
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.steps += 1
            time.sleep(0.01)
        return "done"

    def blob(self, size):
        return b"x" * size

    def fail(self):
        raise KeyError("no such thing")


@pytest.mark.both_transports
def test_await_methods_and_lookups(cluster):
    t = Tally()
    t.make_persistent(alias="aio-tally")

    async def main():
        proxy = await store.aio.get_by_alias("aio-tally")
        assert await proxy.incr.aio(2) == 2
        assert await store.aio.call(proxy, "incr", 3) == 5
        assert await store.aio.getattr_(proxy, "n") == 5
        with pytest.raises(KeyError, match="no such thing"):
            await proxy.fail.aio()
        with pytest.raises(AliasNotFound):
            await store.aio.get_by_alias("aio-no-such-alias")
        with pytest.raises(ValueTooLarge, match="blocking API|instead"):
            await proxy.blob.aio(4 * 1024 * 1024)
        # A blocking call inside a running loop (a notebook cell) works too.
        assert proxy.incr(1) == 6

    asyncio.run(main())


@pytest.mark.both_transports
def test_a_thousand_concurrent_calls_from_one_loop(cluster):
    tallies = [Tally() for _ in range(4)]
    for t in tallies:
        t.make_persistent()

    async def main():
        calls = [tallies[i % 4].incr.aio(1) for i in range(1000)]
        results = await asyncio.gather(*calls)
        return results

    results = asyncio.run(main())
    assert len(results) == 1000
    assert sorted(t.n for t in tallies) == [250, 250, 250, 250]
    # Every call ran once: each tally returned 1..250 exactly once.
    assert sorted(results) == sorted(list(range(1, 251)) * 4)


@pytest.mark.slow
@pytest.mark.both_transports
def test_cancelling_the_task_cancels_the_remote_call(cluster):
    t = Tally()
    t.make_persistent()

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(t.spin.aio(120), timeout=1.0)

    asyncio.run(main())
    started = time.monotonic()
    assert t.incr() == 1  # rolled back (n was 0) and the lock is free
    assert time.monotonic() - started < 3
