"""The object store against a real cluster: redis-server plus two backend processes."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import store
from store import StorageObject, errors, readonly

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Counter(StorageObject):
    def __init__(self, start=0):
        self.value = start

    def incr(self, by=1):
        self.value += by
        return self.value

    @readonly
    def pid(self):
        return os.getpid()

    def fail(self, message):
        raise KeyError(message)

    def hold(self, other):
        self.other = other

    def other_value(self):
        return self.other.value

    def make_child(self, start):
        self.child = Counter(start)
        return self.child


class Bag(StorageObject):
    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __contains__(self, x):
        return x in self.items


class Node(StorageObject):
    """For nested calls: ping-pong between objects on different backends."""

    def __init__(self, name):
        self.name = name
        self.peer = None
        self.hits = 0

    def bounce(self, depth):
        self.hits += 1
        if depth == 0:
            return [(self.name, os.getpid())]
        return [(self.name, os.getpid())] + self.peer.bounce(depth - 1)


def run_script(code: str, env_extra=None, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.mark.slow
def test_issue_usage_as_a_user_script():
    """The issue's snippet, verbatim, with the class in the user's own script (__main__)."""
    result = run_script("""
        from store import StorageObject, LocalCluster, get_by_alias
        import store

        class Counter(StorageObject):
            def __init__(self, start=0):
                self.value = start
            def incr(self, by=1):
                self.value += by
                return self.value

        with LocalCluster(backends=2) as cluster:
            c = Counter(5)
            c.make_persistent(alias="c1", backend=cluster.backends[1])
            assert c.incr(2) == 7
            assert c.value == 7
            c.value = 10
            same = Counter.get_by_alias("c1")
            assert same.getID() == c.getID() and same.incr() == 11
            assert store.get_by_alias("c1").value == 11
            assert c.get_location() == cluster.backends[1]
            assert store.get_locations(c.getID())
            print("USAGE-OK")
    """)
    assert "USAGE-OK" in result.stdout, result.stdout + result.stderr


def test_methods_run_on_the_backend(cluster):
    c = Counter(1)
    assert c.getID() is None
    c.make_persistent(backend=cluster.backends[0])
    assert c.getID() is not None
    owner_pid = {b.backend_id: b.pid for b in store.backends()}[cluster.backends[0]]
    assert c.pid() == owner_pid != os.getpid()
    assert c.incr(4) == 5
    assert c.value == 5


def test_two_client_processes_share_objects(cluster):
    c = Counter(100)
    c.make_persistent(alias="shared-counter")
    code = f"""
        import store
        store.connect("{cluster.address}", "{cluster.token}")
        c = store.get_by_alias("shared-counter")   # this process never defined Counter
        print("GOT", c.incr(1), type(c).__name__)
        same = store.get_by_id("{c.getID()}")
        print("ID", same.value)
    """
    out = run_script(code).stdout
    assert "GOT 101 Counter" in out
    assert "ID 101" in out
    assert c.value == 101


def test_connect_from_environment(cluster):
    out = run_script(
        """
        import store
        store.connect()
        print("BACKENDS", len(store.backends()))
    """,
        {"CLAYPOT_ADDRESS": cluster.address, "CLAYPOT_TOKEN": cluster.token},
    )
    assert "BACKENDS 2" in out.stdout, out.stderr


@pytest.mark.both_transports
def test_compss_names(cluster):
    c = Counter(3)
    c.makePersistent()
    assert store.getByID(c.getID()).value == 3
    assert Counter.getByID(c.getID()).incr() == 4
    c.deletePersistent()
    with pytest.raises(errors.ObjectNotFound):
        store.get_by_id(c.getID())


@pytest.mark.both_transports
def test_remote_exception_keeps_type_and_traceback(cluster):
    c = Counter()
    c.make_persistent()
    with pytest.raises(KeyError) as info:
        c.fail("boom")
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Remote traceback" in notes and "in fail" in notes
    assert c.incr() == 1  # the object is fine afterwards


@pytest.mark.both_transports
def test_dunder_methods_run_remotely(cluster):
    b = Bag([1, 2, 3])
    b.make_persistent()
    assert len(b) == 3
    assert b[1] == 2
    assert 3 in b and 7 not in b


@pytest.mark.both_transports
def test_references_travel_as_references(cluster):
    a, b = Counter(1), Counter(2)
    b.make_persistent(backend=cluster.backends[1])
    a.make_persistent(backend=cluster.backends[0])
    a.hold(b)  # a proxy argument arrives as a reference
    assert a.other_value() == 2  # a's backend calls b's backend
    b.incr(5)
    assert a.other_value() == 7  # not a copy: the same object
    held = a.other
    assert held.getID() == b.getID()


@pytest.mark.both_transports
def test_new_objects_persist_with_their_holder(cluster):
    child = Counter(10)
    holder = Bag([child, Counter(20)])
    holder.make_persistent(backend=cluster.backends[1])
    first = holder[0]
    assert first.getID() == child.getID()  # the local instance became a proxy
    assert child.get_location() == cluster.backends[1]
    assert child.incr() == 11
    assert holder[1].value == 20


@pytest.mark.both_transports
def test_objects_created_on_the_backend_are_persistent(cluster):
    c = Counter()
    c.make_persistent(backend=cluster.backends[0])
    child = c.make_child(41)
    assert child.getID() is not None
    assert child.incr() == 42
    assert c.child.value == 42


def test_nested_calls_across_backends_do_not_deadlock(cluster):
    a, b = Node("a"), Node("b")
    a.make_persistent(backend=cluster.backends[0])
    b.make_persistent(backend=cluster.backends[1])
    a.peer = b
    b.peer = a
    trail = a.bounce(5)  # a -> b -> a -> b -> a -> b
    assert [name for name, _ in trail] == ["a", "b", "a", "b", "a", "b"]
    assert len({pid for _, pid in trail}) == 2
    assert a.hits == 3 and b.hits == 3


@pytest.mark.slow
@pytest.mark.both_transports
def test_concurrent_calls_are_serialised_per_object(cluster):
    c = Counter(0)
    c.make_persistent()
    errors_seen = []

    def worker():
        try:
            for _ in range(500):
                c.incr()
        except Exception as exc:  # surfaced by the assertion below
            errors_seen.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors_seen
    assert c.value == 4000


@pytest.mark.both_transports
def test_aliases(cluster):
    c = Counter(1)
    c.make_persistent(alias="alias-test")
    with pytest.raises(errors.AliasExists):
        Counter(2).make_persistent(alias="alias-test")
    store.delete_alias("alias-test")
    with pytest.raises(errors.AliasNotFound):
        store.get_by_alias("alias-test")
    with pytest.raises(errors.AliasNotFound):
        store.delete_alias("alias-test")
    assert store.get_by_id(c.getID()).value == 1  # the object outlives its alias
    d = Counter(3)
    d.make_persistent(alias="alias-test")  # the alias is free again
    assert store.get_by_alias("alias-test").value == 3


@pytest.mark.both_transports
def test_duplicate_alias_leaves_nothing_behind(cluster):
    Counter(1).make_persistent(alias="taken")
    child = Counter(5)
    loser = Bag([child])
    time.sleep(0.3)  # backends publish their object counts within ~50 ms of a change
    before = sum(b.objects for b in store.backends())
    with pytest.raises(errors.AliasExists):
        loser.make_persistent(alias="taken")
    assert loser.getID() is None and child.getID() is None  # still plain local objects
    assert len(loser) == 1 and loser.items[0] is child
    assert store.get_by_alias("taken").value == 1
    assert store.client().resolve(alias="taken").object_id
    time.sleep(0.3)
    assert sum(b.objects for b in store.backends()) == before  # neither holder nor child


@pytest.mark.both_transports
def test_unknown_alias_and_id(cluster):
    with pytest.raises(errors.AliasNotFound):
        store.get_by_alias("no-such-alias")
    with pytest.raises(errors.ObjectNotFound):
        store.get_by_id("0" * 32)
    with pytest.raises(LookupError):  # both are LookupErrors too
        Counter.get_by_alias("nope")


@pytest.mark.both_transports
def test_unpicklable_value_is_refused_cleanly(cluster):
    c = Counter(1)
    c.lock = threading.Lock()
    with pytest.raises(errors.SerializationError):
        c.make_persistent(alias="unpicklable")
    assert c.getID() is None and c.value == 1
    with pytest.raises(errors.AliasNotFound):
        store.get_by_alias("unpicklable")
    d = Counter(0)
    d.make_persistent()
    with pytest.raises(errors.SerializationError):
        d.hold(threading.Lock())
    assert d.value == 0


@pytest.mark.both_transports
def test_missing_class_is_a_clear_error(cluster):
    from store._wire.generated import claypot_pb2 as pb

    client = store.client()
    request = pb.PersistRequest(
        objects=[
            pb.PersistObject(
                object_id="f" * 32, class_key="nowhere.module:Ghost#0000", state=pb.Value(payload=b"\x80\x05}\x94.")
            )
        ]
    )
    reply = client._stub(cluster.address).Persist(request, timeout=10, metadata=client._metadata)
    assert reply.error.code == "ClassNotFound"
    with pytest.raises(errors.ObjectNotFound):
        store.get_by_id("f" * 32)


def test_wrong_token_is_refused(cluster):
    out = run_script(f"""
        import store
        from store import errors
        try:
            store.connect("{cluster.address}", "not-the-token")
        except errors.AuthenticationError as exc:
            print("REFUSED", type(exc).__name__)
    """)
    assert "REFUSED AuthenticationError" in out.stdout, out.stderr


@pytest.mark.both_transports
def test_delete_persistent(cluster):
    c = Counter(1)
    c.make_persistent(alias="to-delete")
    oid = c.getID()
    c.delete_persistent()
    with pytest.raises(errors.ObjectNotFound):
        store.get_by_id(oid)
    with pytest.raises(errors.AliasNotFound):
        store.get_by_alias("to-delete")
    with pytest.raises(errors.ObjectNotFound):
        c.incr()


@pytest.mark.both_transports
def test_move_keeps_id_alias_and_state(cluster):
    c = Counter(7)
    c.make_persistent(alias="mover", backend=cluster.backends[0])
    other = store.get_by_alias("mover")  # a second proxy with a stale location
    c.move(cluster.backends[1])
    assert c.get_location() == cluster.backends[1]
    assert c.incr() == 8
    assert other.incr() == 9  # follows the object to its new backend
    assert store.get_by_alias("mover").get_location() == cluster.backends[1]
    with pytest.raises(errors.BackendNotFound):
        c.move("no-such-backend")


def test_backends_listing(cluster):
    rows = store.backends()
    assert {b.backend_id for b in rows} == set(cluster.backends)
    for b in rows:
        assert b.up and b.address.startswith("127.0.0.1:") and b.host and b.pid > 0
        assert b.memory_bytes > 0


@pytest.mark.both_transports
def test_make_persistent_twice_and_unknown_backend(cluster):
    c = Counter()
    with pytest.raises(errors.BackendNotFound):
        c.make_persistent(backend="nope")
    assert c.getID() is None
    c.make_persistent()
    with pytest.raises(errors.AlreadyPersistent):
        c.make_persistent()


@pytest.mark.both_transports
def test_make_persistent_many(cluster):
    objs = [Counter(i) for i in range(300)]
    store.make_persistent_many(objs, backend=cluster.backends[0])
    assert all(o.getID() for o in objs)
    assert objs[123].value == 123


def test_not_persistent_operations():
    c = Counter()
    with pytest.raises(errors.NotPersistent):
        c.get_location()
    with pytest.raises(errors.NotPersistent):
        c.delete_persistent()
    assert c.incr() == 1  # a plain local object until made persistent


@pytest.mark.slow
def test_graceful_restart_brings_objects_back(fresh_cluster):
    c = Counter(41)
    c.make_persistent(alias="survivor", backend=fresh_cluster.backends[0])
    c.incr()
    fresh_cluster.restart(fresh_cluster.backends[0])
    same = store.get_by_alias("survivor")
    assert same.value == 42
    assert c.incr() == 43  # the old proxy keeps working


@pytest.mark.both_transports
def test_oversized_values_are_refused_before_sending(cluster, monkeypatch):
    """A value over max_value_size: ValueTooLarge, nothing sent, nothing stored."""
    np = pytest.importorskip("numpy")
    client = store.client()
    monkeypatch.setattr(client, "settings", client.settings.replace(max_value_size="1MiB"))
    big = Bag([np.zeros(2 << 20, dtype=np.uint8)])
    with pytest.raises(errors.ValueTooLarge):
        big.make_persistent(alias="too-big")
    assert big.getID() is None and len(big.items[0]) == 2 << 20
    with pytest.raises(errors.AliasNotFound):
        store.get_by_alias("too-big")
    c = Counter()
    c.make_persistent()
    with pytest.raises(errors.ValueTooLarge):
        c.hold(np.zeros(2 << 20, dtype=np.uint8))


@pytest.mark.slow
def test_backend_refuses_values_over_its_limit(tmp_path):
    """The backend checks the announced size before allocating anything."""
    np = pytest.importorskip("numpy")
    with store.LocalCluster(
        backends=1, data_dir=str(tmp_path / "c"), backend_env={"CLAYPOT_MAX_VALUE_SIZE": "1MiB"}
    ) as c:
        big = Bag([np.zeros(2 << 20, dtype=np.uint8)])
        with pytest.raises(errors.ValueTooLarge):
            big.make_persistent(alias="too-big")
        assert big.getID() is None
        assert store.backends()[0].objects == 0
        small = Bag([1, 2])
        small.make_persistent()
        assert len(small) == 2
        assert c.processes[0].alive()
