"""claypot across hosts: three hosts of the network-namespace test bed (tests/netbed.py).

host0 runs Redis, a backend and a client; host1 runs two backends and a client;
host2 runs one backend. Every host has its own address and hostname; clients
reach backends by those addresses, never by loopback.
"""

import uuid

import pytest

import netbed

pytestmark = pytest.mark.slow


SETUP = """
import numpy as np, store, hostlib
from store import shm
from runtime import wait_on

cl = store.connect({address!r}, {token!r})
exported = []   # values that went through /dev/shm: new segments, reused ones, leased views
def _counting(real, count):
    def counted(*args):
        out = real(*args)
        exported.append(count(out))
        return out
    return counted
shm.export = _counting(shm.export, len)
shm.fill = _counting(shm.fill, lambda out: 1)
shm.map_readonly = _counting(shm.map_readonly, lambda out: 1)
"""


@pytest.fixture(scope="module")
def bed():
    netbed.require()
    with netbed.NetBed(3) as b:
        h0, h1, h2 = b.hosts
        token = uuid.uuid4().hex
        redis_url = b.start_redis(h0)
        b.backends = {
            "b0": b.start_backend(h0, redis_url, token, name="b0"),
            "b1": b.start_backend(h1, redis_url, token, name="b1"),
            "b1x": b.start_backend(h1, redis_url, token, name="b1x"),
            "b2": b.start_backend(h2, redis_url, token, name="b2"),
        }
        b.token = token
        b.agents = {}
        for h, gateway in ((h0, "b0"), (h1, "b1")):
            a = b.agent(h)
            a.run(SETUP.format(address=b.backends[gateway].address, token=token))
            b.agents[h.name] = a
        yield b


def ids(bed):
    return {k: p.backend_id for k, p in bed.backends.items()}


def test_backends_have_their_hosts_addresses(bed):
    a = bed.agents["host0"]
    seen = a.run("", "[(b.host, b.address, b.host_id, b.up) for b in store.backends()]")
    assert {s[0] for s in seen} == {"host0", "host1", "host2"}
    assert all(s[3] for s in seen)
    for host, address, host_id, _ in seen:
        assert not address.startswith("127."), address
        assert address.startswith(bed.subnet + ".")
    by_host = {}
    for host, _, host_id, _ in seen:
        by_host.setdefault(host, set()).add(host_id)
    # One identity per host (host1's two backends agree), a different one per host.
    assert all(len(v) == 1 for v in by_host.values())
    assert len({next(iter(v)) for v in by_host.values()}) == 3


def test_objects_on_three_hosts_seen_from_every_client(bed):
    bid = ids(bed)
    a0, a1 = bed.agents["host0"], bed.agents["host1"]
    tag = uuid.uuid4().hex[:8]
    placed = a0.run(
        "made = {}\n"
        f"for key, bid in {dict((k, bid[k]) for k in ('b0', 'b1', 'b2'))!r}.items():\n"
        f"    x = hostlib.Box(10)\n"
        f"    x.make_persistent(alias='three-{tag}-' + key, backend=bid)\n"
        "    made[key] = x.where()[0]\n",
        "made",
    )
    assert placed == {"b0": "host0", "b1": "host1", "b2": "host2"}
    # The other client, on host1, finds them by alias and changes them.
    got = a1.run("", f"[store.get_by_alias('three-{tag}-' + k).incr(k == 'b2') for k in ('b0', 'b1', 'b2')]")
    assert got == [10, 10, 11]


def test_nested_calls_across_hosts(bed):
    """A on host1 calls B on host2, which calls A back, ... : no deadlock, hosts alternate."""
    bid = ids(bed)
    hosts = bed.agents["host0"].run(
        f"x = hostlib.Box(1); x.make_persistent(backend={bid['b1']!r})\n"
        f"y = hostlib.Box(2, peer=x); y.make_persistent(backend={bid['b2']!r})\n"
        "x.peer = y\n",
        "x.chain(5)",
    )
    assert hosts == ["host1", "host2", "host1", "host2", "host1", "host2"]


def test_moves_between_hosts_keep_the_data(bed):
    bid = ids(bed)
    out = bed.agents["host0"].run(
        "arr = np.arange(2_000_000, dtype=np.float64)\n"
        f"m = hostlib.Box(arr); m.make_persistent(backend={bid['b1']!r})\n"
        "trail = [(m.where()[0], m.total())]\n"
        f"m.move({bid['b2']!r}); trail.append((m.where()[0], m.total()))\n"
        f"m.move({bid['b0']!r}); trail.append((m.where()[0], m.total()))\n"
        f"m.move({bid['b1x']!r}); trail.append((m.where()[0], m.total()))\n",
        "trail",
    )
    expected = float(sum(range(2_000_000)))
    assert [h for h, _ in out] == ["host1", "host2", "host0", "host1"]
    assert all(t == expected for _, t in out)


def test_tasks_run_where_their_data_is(bed):
    bid = ids(bed)
    out = bed.agents["host0"].run(
        "blocks = []\n"
        f"for bid in {[bid['b0'], bid['b1'], bid['b1x'], bid['b2']]!r}:\n"
        "    b = hostlib.Box(np.full(300_000, 2.0)); b.make_persistent(backend=bid)\n"
        "    blocks.append(b)\n"
        "ran = [wait_on(hostlib.where_task(b)) for b in blocks]\n"
        "homes = [b.where() for b in blocks]\n",
        "[ran, homes]",
    )
    ran, homes = out
    for (host, pid, total), (home_host, home_pid) in zip(ran, homes):
        assert (host, pid) == (home_host, home_pid)  # in the very process that holds it
        assert total == 600_000.0
    assert [h for h, _ in homes] == ["host0", "host1", "host1", "host2"]


def test_shared_memory_within_a_host_only(bed):
    """host1's client sends large values through /dev/shm to host1's backends (which it
    reaches at 10.x.y.z, not loopback), and through the network to other hosts."""
    bid = ids(bed)
    a1 = bed.agents["host1"]
    out = a1.run(
        "arr = np.ones(4 << 20 >> 3)\n"  # 4 MiB: above the inline limit
        "counts = {}\n"
        f"for key, bid in {dict((k, bid[k]) for k in ('b1', 'b1x', 'b0', 'b2'))!r}.items():\n"
        "    before = len(exported)\n"
        "    s = hostlib.Box(arr.copy()); s.make_persistent(backend=bid)\n"
        "    back = s.data\n"  # a large result: shm only if same host
        "    assert float(back.sum()) == arr.size\n"
        "    counts[key] = len(exported) - before\n"
        "same = {a: cl._same_host(a) for a in [b.address for b in store.backends()]}\n",
        "[counts, same]",
    )
    counts, same = out
    assert counts["b1"] >= 1 and counts["b1x"] >= 1
    assert counts["b0"] == 0 and counts["b2"] == 0
    local = {bed.backends[k].address for k in ("b1", "b1x")}
    assert {a for a, s in same.items() if s} == local


def test_everything_works_with_2ms_between_hosts(bed):
    why = bed.netem_missing()
    if why:
        netbed.skip_or_fail(why)
    bid = ids(bed)
    for h in bed.hosts:
        bed.netem(h, delay_ms=2)
    try:
        out = bed.agents["host0"].run(
            f"x = hostlib.Box(1); x.make_persistent(backend={bid['b1']!r})\n"
            f"y = hostlib.Box(2, peer=x); y.make_persistent(backend={bid['b2']!r})\n"
            "x.peer = y\n"
            "t0 = time.perf_counter(); x.where(); rtt = time.perf_counter() - t0\n"
            "big = hostlib.Box(np.ones(1 << 20)); big.make_persistent(backend=x.get_location())\n"
            f"big.move({bid['b2']!r})\n"
            "res = wait_on(hostlib.where_task(big))\n",
            "[x.chain(3), rtt, big.where()[0], res[0], res[2]]",
        )
        chain, rtt, home, task_host, total = out
        assert chain == ["host1", "host2", "host1", "host2"]
        assert rtt >= 0.004  # 2 ms each way: the delay is really there
        assert home == task_host == "host2" and total == float(1 << 20)
    finally:
        for h in bed.hosts:
            bed.clear_netem(h)


def test_calls_and_transfers_survive_packet_loss(bed):
    """5% of host2's packets dropped: TCP retransmits, every call still completes."""
    why = bed.netem_missing()
    if why:
        netbed.skip_or_fail(why)
    bid = ids(bed)
    h2 = bed.hosts[2]
    bed.netem(h2, delay_ms=1, loss_pct=5)
    try:
        out = bed.agents["host0"].run(
            f"lossy = hostlib.Box(np.arange(1 << 19, dtype=np.float64)); "
            f"lossy.make_persistent(backend={bid['b2']!r})\n"
            "sums = [lossy.total() for _ in range(30)]\n"
            "copy = lossy.data\n",
            "[len(set(sums)), sums[0], float(copy.sum()), lossy.where()[0]]",
            timeout=120,
        )
        expected = float(sum(range(1 << 19)))
        assert out == [1, expected, expected, "host2"]
    finally:
        bed.clear_netem(h2)
