"""A directory that survives losing its host: Redis Sentinel on the test bed.

host0: Redis primary and a sentinel; host1: the replica, a sentinel and a
backend; host2: a sentinel, a backend and the client. The backends use
``redis+sentinel://`` with all three sentinels. host0 is lost; the sentinels
on host1 and host2 (a quorum of two) promote the replica; backends and clients
carry on, and whatever the replica missed is republished by the backends.
"""

import os
import time
import uuid

import pytest

import netbed
from store import errors
from store._directory.directory import parse_sentinel_url, redact_url, sentinel_auth

pytestmark = pytest.mark.slow

FAST = {"CLAYPOT_HEARTBEAT_TTL": "3", "CLAYPOT_HEARTBEAT_INTERVAL": "0.5", "CLAYPOT_ADMIN_TIMEOUT": "3"}


def test_sentinel_url_parsing():
    assert parse_sentinel_url("redis+sentinel://a:26379,10.0.0.2:26380/dir") == (
        [("a", 26379), ("10.0.0.2", 26380)],
        "dir",
        0,
    )
    assert parse_sentinel_url("redis+sentinel://a:1/dir/3")[2] == 3
    for bad in (
        "redis+sentinel://a:1",
        "redis+sentinel:///svc",
        "redis+sentinel://a/svc",
        "redis+sentinel://a:x/svc",
        "redis+sentinel://a:1/svc/x",
    ):
        with pytest.raises(errors.ConfigurationError):
            parse_sentinel_url(bad)
    # A password is the primary's; it never shows in messages.
    url = "redis+sentinel://:s%40cret@a:1,b:2/dir"
    assert parse_sentinel_url(url) == ([("a", 1), ("b", 2)], "dir", 0)
    assert sentinel_auth(url) == {"password": "s@cret"}
    assert sentinel_auth("redis+sentinel://a:1/dir") == {}
    assert "cret" not in redact_url(url) and redact_url(url).endswith("@a:1,b:2/dir")


def _sentinel(bed, host, primary_ip, port=26379):
    d = os.path.join(bed.workdir, f"sentinel-{host.name}")
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "sentinel.conf")
    with open(conf, "w") as f:  # sentinel rewrites its config file: it must be writable
        f.write(
            f"port {port}\nbind {host.ip}\nprotected-mode no\ndir {d}\n"
            f"sentinel monitor directory {primary_ip} 6379 2\n"
            "sentinel down-after-milliseconds directory 1000\n"
            "sentinel failover-timeout directory 4000\n"
            "sentinel parallel-syncs directory 1\n"
        )
    proc = bed.start_program(host, [netbed.find_redis_server(), conf, "--sentinel"], os.path.join(d, "sentinel.log"))
    bed.wait_port(host, port, proc)
    return f"{host.ip}:{port}"


def test_backends_and_clients_carry_on_when_the_primary_host_is_lost(tmp_path):
    netbed.require()
    with netbed.NetBed(3, workdir=str(tmp_path)) as bed:
        h0, h1, h2 = bed.hosts
        bed.start_redis(h0)
        bed.start_redis(h1, args=["--replicaof", h0.ip, "6379"], name="replica")
        sentinels = [_sentinel(bed, h, h0.ip) for h in (h0, h1, h2)]
        url = "redis+sentinel://" + ",".join(sentinels) + "/directory"
        token = uuid.uuid4().hex
        b1 = bed.start_backend(h1, url, token, name="b1", env=FAST)
        b2 = bed.start_backend(h2, url, token, name="b2", env=FAST)
        c = bed.agent(h2, env=FAST)
        c.run(
            "import store, hostlib, time\n"
            f"cl = store.connect({b2.address!r}, {token!r})\n"
            "made = []\n"
            f"for i, bid in enumerate([{b1.backend_id!r}, {b2.backend_id!r}] * 5):\n"
            "    x = hostlib.Box(i); x.make_persistent(alias=f'before-{i}', backend=bid)\n"
            "    made.append(x)\n"
        )
        # The replica has caught up with everything so far...
        cli = netbed.find_redis_server().replace("redis-server", "redis-cli")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = h1.exec(cli, "-h", h1.ip, "-p", "6379", "hlen", "claypot:aliases", check=False)
            if out.stdout.strip() == "10":
                break
            time.sleep(0.1)
        # ...then some writes reach only the primary: the replica's replication link
        # (and only it: backend b1 shares its host) stops delivering.
        listing = h0.exec(cli, "-h", h0.ip, "-p", "6379", "client", "list", "type", "replica")
        link_port = [f.split(":")[-1] for f in listing.stdout.split() if f.startswith("addr=")][0]
        h1.exec(
            "iptables", "-A", "INPUT", "-s", h0.ip, "-p", "tcp", "--sport", "6379", "--dport", link_port, "-j", "DROP"
        )
        c.run(
            "for i in range(3):\n"
            f"    y = hostlib.Box(100 + i); y.make_persistent(alias=f'late-{{i}}', "
            f"backend={b1.backend_id!r})\n"
        )
        bed.kill_host(h0)  # the primary and one sentinel are gone
        h1.exec("iptables", "-F", "INPUT")

        # The sentinels promote the replica; backends follow it and republish.
        t0 = time.monotonic()
        result = c.run(
            """
deadline = time.monotonic() + 45
while True:
    try:
        found = [store.get_by_alias(f'before-{i}').total() for i in range(10)]
        found += [store.get_by_alias(f'late-{i}').total() for i in range(3)]
        break
    except store.errors.ClaypotError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
z = hostlib.Box(7); z.make_persistent(alias='after')
ups = sorted((b.host, b.up) for b in store.backends())
""",
            "[found, store.get_by_alias('after').incr(), ups]",
            timeout=90,
        )
        took = time.monotonic() - t0
        found, after, ups = result
        assert found == list(range(10)) + [100, 101, 102]
        assert after == 8
        assert ups == [["host1", True], ["host2", True]]
        assert took < 45, took
        # The promoted replica, on host1, is the one serving now, and it has the late
        # aliases: the backend republished them (it never received them by replication).
        assert h1.exec(cli, "-h", h1.ip, "-p", "6379", "role").stdout.split()[0] == "master"
        assert h1.exec(cli, "-h", h1.ip, "-p", "6379", "hexists", "claypot:aliases", "late-0").stdout.strip() == "1"
