"""The make_persistent path: the fsync of the new records overlaps the directory claim.

What must still hold (each checked on a real cluster, kill -9 included):
- an object is visible to get_by_id and get_by_alias from another process as
  soon as make_persistent returns, and it survives kill -9 (durable under sync);
- a taken alias raises AliasExists and stores nothing;
- a directory entry claimed while its fsync ran, whose state never reached the
  disk (the backend died in between), is forgotten when the backend restarts,
  and the set of such claims does not grow while the backend runs.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import store
from store import LocalCluster, StorageObject
from store._directory.directory import Directory
from store.errors import AliasExists, AliasNotFound, ObjectNotFound

import chaos

pytestmark = pytest.mark.slow


class Point(StorageObject):
    def __init__(self, x):
        self.x = x

    def get(self):
        return self.x


_READER = textwrap.dedent("""
    import sys
    import store
    store.connect(sys.argv[1], sys.argv[2])
    print("ready", flush=True)
    for line in sys.stdin:
        oid, alias = line.split()
        by_id = store.get_by_id(oid).getID()
        by_alias = store.get_by_alias(alias).getID()
        print(by_id == oid and by_alias == oid, flush=True)
""")


def test_visible_to_another_process_at_once_and_durable(tmp_path):
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c")) as c:
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, c.address, c.token],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert reader.stdout.readline().strip() == "ready"
            made = []
            for i in range(40):
                p = Point(i)
                p.make_persistent(alias=f"pt-{i}", backend=c.backends[i % 2])
                # Asked right after the call returned, by a process that never saw it.
                reader.stdin.write(f"{p.getID()} pt-{i}\n")
                reader.stdin.flush()
                assert reader.stdout.readline().strip() == "True"
                made.append(p)
        finally:
            reader.stdin.close()
            reader.wait(timeout=30)
            reader.stdout.close()
        for bid in c.backends:
            chaos.restart_backend(c, bid, kill=True)
        assert [store.get_by_alias(f"pt-{i}").get() for i in range(40)] == list(range(40))
        assert [p.get() for p in made] == list(range(40))


def test_taken_alias_stores_nothing(tmp_path):
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        Point(1).make_persistent(alias="taken")
        loser = Point(2)
        with pytest.raises(AliasExists):
            loser.make_persistent(alias="taken")
        assert loser.getID() is None
        assert store.get_by_alias("taken").get() == 1
        # Nothing of the refused object comes back after a crash either.
        chaos.restart_backend(c, c.backends[0], kill=True)
        assert store.get_by_alias("taken").get() == 1
        d = Directory(c.redis_url, token=c.token)
        try:
            assert d.r.hlen(d.k_objects) == 1
        finally:
            d.close()


def test_claim_without_stored_state_is_forgotten_at_restart(tmp_path):
    """The window the overlap opens: the directory has the entry, the disk does not.

    A claim is made the way a persist makes it, for an id whose records were
    never written (as if the backend died before its fsync finished); the
    restart must forget it and its alias, and keep every real object.
    """
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        bid = c.backends[0]
        kept = [Point(i) for i in range(20)]
        for i, p in enumerate(kept):
            p.make_persistent(alias=f"kept-{i}")
        d = Directory(c.redis_url, token=c.token)
        try:
            # Settled claims leave the set with the next claim: it stays small.
            assert len(d.unsynced(bid)) <= 2
            key = d.lookup(kept[0].getID()).class_key
            lost = "0" * 32
            d.claim_unsynced([(lost, bid, key, "lost-alias")], bid)
            assert store.get_by_alias("lost-alias").getID() == lost
            chaos.restart_backend(c, bid, kill=True)
            with pytest.raises(AliasNotFound):
                store.get_by_alias("lost-alias")
            with pytest.raises(ObjectNotFound):
                d.lookup(lost)
            assert d.unsynced(bid) == []
            assert [store.get_by_alias(f"kept-{i}").get() for i in range(20)] == list(range(20))
        finally:
            d.close()


def test_claim_sent_ahead_survives_a_lost_script_cache_and_a_dropped_connection(tmp_path):
    """The reply of a claim sent before the fsync may never come: it is sent again."""
    import redis as redis_py

    from store._ops.cluster import RedisProcess

    r = RedisProcess(str(tmp_path / "redis")).start()
    try:
        d = Directory(r.url)
        admin = redis_py.Redis(port=r.port)
        try:
            # Redis restarted meanwhile (script cache empty): NOSCRIPT, then loaded and run.
            admin.script_flush()
            d.claim_unsynced_send([("a" * 32, "b1", "k", "first")], "b1")()
            assert d.resolve_alias("first") == "a" * 32
            # The connection is cut after the claim was sent: the reply is lost, the
            # claim runs again (same writes) on a new connection and succeeds.
            finish = d.claim_unsynced_send([("b" * 32, "b1", "k", "second")], "b1", settled=["a" * 32])
            admin.client_kill_filter(_type="normal", skipme=True)
            finish()
            assert d.resolve_alias("second") == "b" * 32
            assert d.unsynced("b1") == ["b" * 32]
            # An alias of another object is refused the same way as by claim().
            finish = d.claim_unsynced_send([("c" * 32, "b1", "k", "second")], "b1")
            with pytest.raises(AliasExists):
                finish()
            with pytest.raises(ObjectNotFound):
                d.lookup("c" * 32)
        finally:
            admin.close()
            d.close()
    finally:
        r.stop()
