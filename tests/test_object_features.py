"""Object features in the native API, on a real three-backend cluster: several aliases
per object, versions, recursive move, custom pickling, get_backends, the identity
map, and proxies by class name."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest

import store
from store import LocalCluster, StorageObject, errors

import chaos

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Person(StorageObject):
    def __init__(self, name, age=0):
        self.name = name
        self.age = age
        self.friend = None

    def birthday(self):
        self.age += 1
        return self.age

    def greet(self):
        return f"hello, {self.name}"


class Node(StorageObject):
    def __init__(self, label):
        self.label = label
        self.children = []

    def add(self, child):
        self.children.append(child)

    def where(self):
        return os.getpid()


class Packed(StorageObject):
    """State kept in a form of its own: only ``items`` travels, as a joined string."""

    def __init__(self, items):
        self.items = list(items)
        self.cache = {"derived": len(items)}

    def __getstate__(self):
        return {"packed": ",".join(self.items)}

    def __setstate__(self, state):
        self.__dict__.update(items=[x for x in state["packed"].split(",") if x], cache={"rebuilt": True})

    def add(self, item):
        self.items.append(item)

    def view(self):
        return list(self.items), dict(self.cache)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(backends=3) as c:
        yield c


# -- aliases --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.both_transports
def test_several_aliases_per_object(cluster):
    p = Person("ana", 30)
    p.make_persistent(alias="ana")
    p.add_alias("ana-2")
    p.add_alias("ana-3")
    p.add_alias("ana-2")  # already its own: nothing changes
    assert p.get_aliases() == {"ana", "ana-2", "ana-3"}
    for alias in ("ana", "ana-2", "ana-3"):
        assert store.get_by_alias(alias).getID() == p.getID()
    p.delete_alias("ana-2")
    assert p.get_aliases() == {"ana", "ana-3"}
    with pytest.raises(errors.AliasNotFound):
        store.get_by_alias("ana-2")
    with pytest.raises(errors.AliasNotFound):
        p.delete_alias("ana-2")
    assert store.get_by_alias("ana-3").greet() == "hello, ana"


@pytest.mark.both_transports
def test_alias_of_another_object_is_refused_and_nothing_changes(cluster):
    a, b = Person("a"), Person("b")
    a.make_persistent(alias="taken-a")
    b.make_persistent(alias="b-own")
    with pytest.raises(errors.AliasExists):
        b.add_alias("taken-a")
    assert b.get_aliases() == {"b-own"}
    assert store.get_by_alias("taken-a").getID() == a.getID()
    with pytest.raises(ValueError):
        b.add_alias("bad|alias")


@pytest.mark.both_transports
def test_concurrent_add_alias_keeps_every_alias(cluster):
    p = Person("busy")
    p.make_persistent()
    errors_seen = []

    def add(i):
        try:
            store.get_by_id(p.getID()).add_alias(f"busy-{i}")
        except Exception as exc:  # reported below
            errors_seen.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors_seen == []
    assert p.get_aliases() == {f"busy-{i}" for i in range(12)}


@pytest.mark.both_transports
def test_aliases_follow_a_move_and_delete_drops_them_all(cluster):
    p = Person("mover")
    p.make_persistent(alias="mover-1", backend=cluster.backends[0])
    p.add_alias("mover-2")
    p.move(cluster.backends[2])
    assert p.get_aliases() == {"mover-1", "mover-2"}
    assert store.get_by_alias("mover-2").get_location() == cluster.backends[2]
    p.delete_persistent()
    for alias in ("mover-1", "mover-2"):
        with pytest.raises((errors.AliasNotFound, errors.ObjectNotFound)):
            store.get_by_alias(alias)


@pytest.mark.slow
def test_aliases_survive_a_wiped_directory_and_repair(tmp_path):
    """Every alias is in the object's stored state: republish and `claypot repair` bring
    them all back, including the one added after a move."""
    from store._ops.cli import main as claypot

    with LocalCluster(backends=2, data_dir=str(tmp_path / "c")) as c:
        p = Person("kept")
        p.make_persistent(alias="kept-1", backend=c.backends[0])
        p.add_alias("kept-2")
        p.move(c.backends[1])
        p.add_alias("kept-3")
        p.delete_alias("kept-1")
        chaos.wipe_redis(c)
        chaos.wait_until(
            lambda: _aliases_or_none("kept-3") == {"kept-2", "kept-3"}, timeout=15, what="aliases republished"
        )
        dirs = [proc.data_dir for proc in c.processes]
        for bid in c.backends:
            chaos.stop_backend(c, bid)
        chaos.wipe_redis(c)
        assert claypot(["repair", "--redis", c.redis_url, *dirs]) == 0
        for bid in c.backends:
            chaos.start_backend(c, bid)
        q = store.get_by_alias("kept-2")
        assert q.get_aliases() == {"kept-2", "kept-3"}
        assert q.greet() == "hello, kept"
        with pytest.raises(errors.AliasNotFound):
            store.get_by_alias("kept-1")


def _aliases_or_none(alias):
    try:
        return store.get_by_alias(alias).get_aliases()
    except errors.ClaypotError:
        return None


# -- versions -------------------------------------------------------------------------------


@pytest.mark.both_transports
def test_new_version_changes_in_isolation_and_consolidates_back(cluster):
    p = Person("marc", 24)
    p.make_persistent(alias="marc")
    v1 = p.new_version()
    assert v1.getID() != p.getID()
    v1.name = "alice"
    v1.birthday()
    assert (p.name, p.age) == ("marc", 24)
    v1.consolidate_version()
    assert (p.name, p.age) == ("alice", 25)
    # The original keeps its id and aliases; the version proxy now stands for it.
    assert v1.getID() == p.getID()
    assert store.get_by_alias("marc").name == "alice"
    assert p.get_aliases() == {"marc"}


@pytest.mark.both_transports
def test_version_on_another_backend_and_version_of_version(cluster):
    p = Person("root", 1)
    p.make_persistent(backend=cluster.backends[0])
    v1 = p.new_version(backend=cluster.backends[1])
    assert v1.get_location() == cluster.backends[1]
    v1.name = "v1"
    v2 = v1.new_version(backend=cluster.backends[2])
    v2.name = "v2"
    assert (p.name, v1.name, v2.name) == ("root", "v1", "v2")
    v2.consolidate_version()
    assert p.name == "v2"
    assert store.get_by_id(v1.getID()).name == "v2"


@pytest.mark.both_transports
def test_consolidating_a_non_version_is_a_typed_error(cluster):
    p = Person("plain")
    p.make_persistent()
    with pytest.raises(errors.NotAVersion, match="is not a version!"):
        p.consolidate_version()
    # Known only from the cluster (another proxy, no local record): still refused.
    with pytest.raises(errors.NotAVersion):
        store.get_by_id(p.getID()).consolidate_version()


@pytest.mark.both_transports
def test_version_made_by_one_process_consolidated_by_another(cluster):
    p = Person("shared", 5)
    p.make_persistent(alias="shared-v")
    v = p.new_version()
    v.age = 99
    code = textwrap.dedent(f"""
        import store
        store.connect({cluster.address!r}, {cluster.token!r})
        store.get_by_id({v.getID()!r}).consolidate_version()
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]))
    subprocess.run([sys.executable, "-c", "import test_object_features\n" + code], check=True, env=env, timeout=60)
    assert store.get_by_alias("shared-v").age == 99


# -- recursive move -------------------------------------------------------------------------


@pytest.mark.both_transports
def test_recursive_move_takes_references_of_references_and_cycles(cluster):
    b0, b1, b2 = cluster.backends
    root, mid, leaf, far = Node("root"), Node("mid"), Node("leaf"), Node("far")
    far.make_persistent(backend=b1)
    root.add(mid)
    mid.add(leaf)
    leaf.add(root)  # a cycle back to the root
    leaf.add(far)  # and an object on another backend
    root.make_persistent(backend=b0)
    assert {n.get_location() for n in (root, mid, leaf)} == {b0}
    root.move(b2, recursive=True)
    assert {n.get_location() for n in (root, mid, leaf, far)} == {b2}
    assert root.children[0].children[0].children[0].label == "root"
    assert len({n.where() for n in (root, mid, leaf, far)}) == 1


@pytest.mark.both_transports
def test_plain_move_leaves_references_where_they_are(cluster):
    b0, b1, _ = cluster.backends
    parent, child = Node("p"), Node("c")
    parent.add(child)
    parent.make_persistent(backend=b0)
    parent.move(b1)
    assert parent.get_location() == b1
    assert child.get_location() == b0


# -- custom pickling ------------------------------------------------------------------------


@pytest.mark.slow
def test_custom_getstate_setstate_through_persist_move_and_spill(tmp_path):
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c"), memory_limit="1MB") as c:
        obj = Packed(["a", "b"])
        obj.make_persistent(backend=c.backends[0])
        assert obj.view() == (["a", "b"], {"rebuilt": True})
        obj.add("c")
        obj.move(c.backends[1])
        assert obj.view() == (["a", "b", "c"], {"rebuilt": True})
        # Enough other data to push it out of memory, then read it back from disk.
        ballast = [Packed(["x" * 200_000]) for _ in range(12)]
        for b in ballast:
            b.make_persistent(backend=c.backends[1])
        chaos.restart_backend(c, c.backends[1], kill=True)
        assert obj.view() == (["a", "b", "c"], {"rebuilt": True})


# -- backends, identity, stubs --------------------------------------------------------------


@pytest.mark.both_transports
def test_get_backends_is_an_ordered_mapping_of_handles(cluster):
    backends = store.get_backends()
    assert list(backends) == cluster.backends
    first = next(iter(backends.values()))
    assert first == cluster.backends[0] and first.address
    p = Person("placed")
    p.make_persistent(backend=str(first))
    assert p.get_location() == first


@pytest.mark.both_transports
def test_identity_map_returns_one_proxy_per_object(cluster):
    p = Person("same")
    p.make_persistent(alias="same")
    a, b = store.get_by_alias("same"), store.get_by_alias("same")
    assert a is b is p
    c = store.get_by_id(p.getID())
    assert c is a
    assert len({a, b, c}) == 1 and a == c


@pytest.mark.both_transports
def test_proxies_compare_and_hash_by_id(cluster):
    p, q = Person("x"), Person("x")
    p.make_persistent()
    q.make_persistent()
    assert p != q
    assert {p: 1}[store.get_by_id(p.getID())] == 1


STUB_CLASS = textwrap.dedent("""
    from store import StorageObject, readonly

    class Secret(StorageObject):
        def __init__(self, word):
            self.word = word

        @readonly
        def shout(self):
            return self.word.upper()

        def set(self, word):
            self.word = word

        @property
        def length(self):
            return len(self.word)
""")


@pytest.mark.both_transports
def test_stub_by_class_name_without_the_class_locally(cluster, tmp_path):
    """A process that cannot import a class calls its objects through a stub whose
    members come from the cluster."""
    mod = tmp_path / "secretmod"
    mod.mkdir()
    (mod / "__init__.py").write_text(STUB_CLASS)
    maker = textwrap.dedent(f"""
        import sys, store
        sys.path.insert(0, {str(tmp_path)!r})
        from secretmod import Secret
        store.connect({cluster.address!r}, {cluster.token!r})
        Secret("psst").make_persistent(alias="secret")
    """)
    subprocess.run([sys.executable, "-c", maker], check=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert "secretmod" not in sys.modules
    Secret = store.stub_class("secretmod.Secret")
    s = store.get_by_alias("secret")
    assert isinstance(s, Secret)
    assert s.shout() == "PSST"
    s.set("quiet")
    assert (s.shout(), s.length, s.word) == ("QUIET", 5, "quiet")
    made = Secret("new one")  # constructed on a backend, returned as a proxy
    assert made.getID() and made.shout() == "NEW ONE"
    assert store.get_by_id(made.getID()) is made
    with pytest.raises(errors.ClassNotFound):
        store.stub_class("secretmod.Nothing")


# -- values that are not StorageObjects -----------------------------------------------------


@pytest.mark.both_transports
def test_any_picklable_value_as_an_object_with_remote_methods(cluster):
    import numpy as np

    arr = store.Alien(np.arange(10, dtype=np.float64))
    assert type(arr).__qualname__ == "Alien[numpy.ndarray]"
    arr.make_persistent(alias="weights", backend=cluster.backends[1])
    arr.fill(2.0)  # in place, on the backend
    assert arr.shape == (10,) and float(arr.sum()) == 20.0
    same = store.get_by_alias("weights")
    assert same is arr and same.get_location() == cluster.backends[1]
    assert float(np.asarray(same.unwrap()).sum()) == 20.0

    d = store.Alien({"a": 1})
    d.make_persistent(alias="settings")
    d["b"] = 2
    d.update(c=3)
    assert len(d) == 3 and "c" in d and d["b"] == 2
    assert sorted(d) == ["a", "b", "c"]
    assert store.get_by_alias("settings").unwrap() == {"a": 1, "b": 2, "c": 3}


@pytest.mark.slow
def test_republish_keeps_the_aliases_still_free(tmp_path):
    """After Redis lost everything, a backend republishes its objects; an alias another
    object took meanwhile is dropped, the object's other aliases are kept."""
    from store._directory.directory import Directory

    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        p = Person("both")
        p.make_persistent(alias="first", backend=c.backends[0])
        p.add_alias("second")
        oid = p.getID()
        chaos.stop_backend(c, c.backends[0])
        chaos.wipe_redis(c)
        d = Directory(c.redis_url, token=c.token)
        try:
            d.claim([("someone-else", "elsewhere", "k", "first")])
        finally:
            d.close()
        chaos.start_backend(c, c.backends[0])
        assert store.get_by_alias("second").getID() == oid
        assert p.get_aliases() == {"second"}
        with pytest.raises(errors.ClaypotError):
            store.get_by_alias("first").greet()
