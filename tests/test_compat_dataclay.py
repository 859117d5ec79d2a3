"""dataClay's documented examples, run against claypot's dataClay layer on a real cluster
of three backends: the user guide's walk-through, hello-family, the advanced guide's
move and versioning, alien and stub objects, async twins, exceptions, and the shim
that lets ``import dataclay`` resolve to claypot."""

import asyncio
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import store
import store.compat
from store import LocalCluster
from store.errors import ConfigurationError

store.compat.enable()  # the models below import ``dataclay``, as dataClay documents them

from dataclay import (  # noqa: E402
    AlienDataClayObject,
    Client,
    DataClayObject,
    StubDataClayObject,
    activemethod,
)
from dataclay.exceptions import (  # noqa: E402
    AliasAlreadyExistError,
    AliasDoesNotExistError,
    ObjectIsNotVersionError,
    ObjectNotRegisteredError,
)
from dataclay_model.company import Company, Employee  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(backends=3, connect=False) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    host, port = cluster.address.rsplit(":", 1)
    client = Client(
        host=host, port=port, username="testuser", password="s3cret", dataset="testdata", token=cluster.token
    )
    client.start()
    yield client
    client.stop()


@pytest.fixture(autouse=True)
def _connected(request):
    # Other test modules may have left this process connected elsewhere.
    if "client" in request.fixturenames:
        c = request.getfixturevalue("client")
        if store._model.objects._dispatcher is not c._client:
            c._client = store.connect(c.address, c.token)
    yield


def shim_env(cluster, **extra):
    host, port = cluster.address.rsplit(":", 1)
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([store.compat.shim_path(), TESTS, REPO]),
        DC_HOST=host,
        DC_PORT=port,
        CLAYPOT_TOKEN=cluster.token,
        **extra,
    )


# -- the user guide -------------------------------------------------------------------------


def test_user_guide_make_persistent_activemethods_and_properties(client):
    employee = Employee("John", 1000.0)
    employee.make_persistent()
    assert employee.get_payroll(50) == 1000.0 + 10 * 25.0  # one remote call
    employee.salary = 2000.0  # one remote call
    assert (employee.name, employee.salary) == ("John", 2000.0)
    assert Employee.get_by_id(employee.getID()) is employee


def test_user_guide_assign_backend(client, cluster):
    backend_ids = list(client.get_backends())
    assert backend_ids == cluster.backends
    employee = Employee("John", 1000.0)
    employee.make_persistent(backend_id=backend_ids[0])
    assert employee._dc_master_backend_id == backend_ids[0]
    assert employee.backends == {backend_ids[0]}


def test_user_guide_recursive_and_automatic_persistence(client):
    employee = Employee("John", 1000.0)
    company = Company("ABC", employee)
    company.make_persistent()
    assert employee.is_registered

    company = Company("ABC")
    company.make_persistent()
    employee = Employee("John", 1000.0)
    company.employees = [employee]  # assigning registers it
    assert employee.is_registered
    assert employee in company.employees

    company = Company("ABC")
    company.make_persistent()
    employee = Employee("John", 1000.0)
    company.employees.append(employee)  # a local copy: NOT registered
    assert not employee.is_registered
    assert employee not in company.employees

    employees = company.employees
    employees.append(employee)
    company.employees = employees
    assert employee.is_registered
    assert employee in company.employees


def test_user_guide_aliases(client):
    employee = Employee("John", 1000.0)
    employee.make_persistent("CEO")
    new_employee = Employee.get_by_alias("CEO")
    assert new_employee is employee
    employee.add_alias("CFO")
    aliases = employee.get_aliases()
    assert "CFO" in aliases and "CEO" in aliases
    Employee.delete_alias("CEO")
    Employee.delete_alias("CEO")  # idempotent
    employee.delete_alias("CFO")  # also on an instance
    assert employee.get_aliases() == set()
    with pytest.raises(AliasDoesNotExistError, match="Alias .*/CEO does not exist"):
        Employee.get_by_alias("CEO")


def test_user_guide_get_put_update(client):
    employee = Employee("John", 1000.0)
    employee.dc_put("CTO")
    new_employee = employee.dc_clone()
    assert new_employee.name == employee.name
    assert new_employee is not employee and not new_employee.is_registered
    assert Employee.dc_clone_by_alias("CTO").salary == 1000.0
    employee.dc_update(Employee("Marc", 7000.0))
    assert employee.name == "Marc"
    Employee.dc_update_by_alias("CTO", Employee("Ana", 8000.0))
    assert (employee.name, employee.salary) == ("Ana", 8000.0)
    assert employee.get_properties() == {"name": "Ana", "salary": 8000.0}
    employee.dc_update_properties({"salary": 1.0})
    assert employee.salary == 1.0


class Sensor(DataClayObject):
    reading: float

    def __init__(self, reading):
        self.reading = reading
        self.label = "kept in the client"

    @activemethod
    def where(self):
        return os.getpid()

    def here(self):
        return os.getpid(), self.reading


def test_only_annotated_attributes_persist_and_plain_methods_run_locally(client):
    s = Sensor(1.5)
    s.make_persistent()
    assert s.where() != os.getpid()
    assert s.here() == (os.getpid(), 1.5)  # local method, remote property
    assert s.label == "kept in the client"  # not a property: stays here
    s.label = "changed here"
    assert Sensor.get_by_id(s.getID()).label == "changed here"  # the same proxy
    assert s.get_properties() == {"reading": 1.5}


# -- hello-family, unchanged ----------------------------------------------------------------


def test_hello_family_example_runs_unchanged(client, cluster):
    script = os.path.join(TESTS, "dataclay_model", "hello_family_client.py")
    env = shim_env(cluster)
    first = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["Hello1", "Hello2", "Members:", " - Name: Marc, age: 24"]
    second = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("Marc") == 2


# -- the advanced guide: move and versioning -----------------------------------------------


def test_advanced_move_and_recursive_move(client):
    backend_ids = list(client.get_backends())
    employee = Employee("John", 1000.0)
    employee.move(backend_ids[0])  # not yet persistent: placed there
    assert employee._dc_master_backend_id == backend_ids[0]
    employee.move(backend_ids[1])
    assert employee.get_location() == backend_ids[1]

    employee = Employee("John", 1000.0)
    employee.make_persistent(backend_id=backend_ids[0])
    company = Company("ABC", employee)
    company.make_persistent(backend_id=backend_ids[1])
    company.move(backend_ids[2], recursive=True)
    employee.name
    assert employee._dc_master_backend_id == backend_ids[2]

    employee = Employee("John", 1000.0)
    employee.make_persistent(backend_id=backend_ids[0])
    company = Company("ABC", employee)
    company.make_persistent(backend_id=backend_ids[1])
    company.move(backend_ids[2], recursive=True, remotes=False)
    employee.sync()
    assert employee._dc_master_backend_id == backend_ids[0]
    assert company._dc_master_backend_id == backend_ids[2]


def test_advanced_versioning(client):
    employee = Employee("John", 1000.0)
    employee.make_persistent()
    employee_v1 = employee.new_version()
    employee_v1.salary = 2000.0
    assert employee.salary == 1000.0
    employee_v1.consolidate_version()
    assert employee.salary == 2000.0

    employee = Employee("John", 1000.0)
    employee.make_persistent()
    employee_v1 = employee.new_version()
    employee_v2 = employee_v1.new_version()
    employee_v2.salary = 2000.0
    employee_v2.consolidate_version()
    assert employee.salary == 2000.0
    assert employee_v1.salary == 2000.0


def test_version_on_a_chosen_backend_keeps_the_original_alias(client):
    backend_ids = list(client.get_backends())
    employee = Employee("Vera", 10.0)
    employee.make_persistent("vera", backend_id=backend_ids[0])
    v = employee.new_version(backend_id=backend_ids[2])
    assert v._dc_master_backend_id == backend_ids[2]
    v.salary = 11.0
    v.consolidate_version()
    assert Employee.get_by_alias("vera").salary == 11.0
    assert employee.get_aliases() == {"vera"}


# -- exceptions ------------------------------------------------------------------------------


def test_dataclay_exceptions_and_messages(client):
    employee = Employee("Ex", 1.0)
    with pytest.raises(ObjectNotRegisteredError, match="is not registered!"):
        employee.add_alias("x")
    employee.make_persistent("ex-alias")
    with pytest.raises(AliasAlreadyExistError, match="Alias .*/ex-alias already exists"):
        Employee("Other", 2.0).make_persistent("ex-alias")
    with pytest.raises(ObjectIsNotVersionError, match="is not a version!"):
        employee.consolidate_version()
    # new_replica makes a consistent replica (README "Replicas"): changes reach it.
    employee.new_replica()
    assert len(store._api.api.get_locations(employee.getID())) == 2
    employee.salary = 7.0
    assert employee.call_on_replica().salary == 7.0
    employee.call_on_replica(False)
    with pytest.raises(AliasDoesNotExistError):
        Employee.get_by_alias("never-made")


# -- async twins -----------------------------------------------------------------------------


def test_async_twins_and_sync_calls_inside_a_running_loop(client):
    async def main():
        print(await client.a_get_backends())
        employee_1 = Employee("John", 1000.0)
        employee_2 = Employee("Jane", 2000.0)
        await asyncio.gather(employee_1.a_make_persistent("async-1"), employee_2.a_make_persistent("async-2"))
        got = await Employee.a_get_by_alias("async-2")
        assert got is employee_2
        await got.a_add_alias("async-2b")
        assert await got.a_get_aliases() == {"async-2", "async-2b"}
        v = await got.a_new_version()
        v.salary = 3.0
        await v.a_consolidate_version()
        await Employee.a_delete_alias("async-2b")
        # A synchronous call inside the running loop works too.
        assert Employee.get_by_alias("async-2").salary == 3.0
        await got.a_new_replica()
        assert len(store._api.api.get_locations(got.getID())) == 2

    asyncio.run(main())


# -- alien and stub objects ------------------------------------------------------------------


def test_alien_objects_builtins_and_numpy(client):
    a = AlienDataClayObject([1, 2, 3])
    assert type(a).__qualname__ == "AlienDataClayObject[builtins.list]"
    assert isinstance(a, DataClayObject)
    a.make_persistent("alien-list")
    a.append(4)  # runs on the backend
    assert len(a) == 4 and list(a) == [1, 2, 3, 4] and a[3] == 4 and 2 in a
    assert DataClayObject.get_by_alias("alien-list") is a
    m = AlienDataClayObject(np.arange(12).reshape(3, 4))
    m.make_persistent()
    assert m.shape == (3, 4)
    assert int(m.sum()) == 66
    m.fill(1)  # an in-place change, stored
    assert int(m.sum()) == 12


STUB_MODEL = textwrap.dedent("""
    from dataclay import DataClayObject, activemethod

    class Vault(DataClayObject):
        secret: str
        opened: int

        def __init__(self, secret):
            self.secret = secret
            self.opened = 0

        @activemethod
        def open(self):
            self.opened += 1
            return self.secret.upper()
""")


def test_stub_objects_without_the_model_locally(client, cluster, tmp_path):
    (tmp_path / "vaultmodel.py").write_text(STUB_MODEL)
    maker = textwrap.dedent("""
        from dataclay import Client
        from vaultmodel import Vault
        with Client(host=None):
            Vault("gold").make_persistent("vault")
    """)
    env = shim_env(cluster)
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    run = subprocess.run([sys.executable, "-c", maker], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "vaultmodel" not in sys.modules
    VaultStub = StubDataClayObject["vaultmodel.Vault"]
    vault = VaultStub.get_by_alias("vault")
    assert isinstance(vault, VaultStub)
    assert vault.open() == "GOLD"
    assert vault.opened == 1
    vault.secret = "silver"
    assert vault.open() == "SILVER"
    made = VaultStub(secret="iron")  # a stub is always remote: made on a backend
    made.add_alias("vault-iron")
    assert VaultStub.get_by_alias("vault-iron").open() == "IRON"


# -- the shim --------------------------------------------------------------------------------


def test_shim_resolves_dataclay_and_storage_api(cluster):
    code = textwrap.dedent("""
        import dataclay, dataclay.exceptions, storage.api
        import store.compat.dataclay as layer, store.compat.compss as sri
        assert dataclay.DataClayObject is layer.DataClayObject
        assert dataclay.exceptions.AliasDoesNotExistError is layer.exceptions.AliasDoesNotExistError
        assert storage.api.getByID is sri.getByID and storage.api.TaskContext is sri.TaskContext
        print("resolved", dataclay.__version__)
    """)
    run = subprocess.run(
        [sys.executable, "-c", code], env=shim_env(cluster), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "resolved 4.3.1"


def test_shim_never_hides_a_real_dataclay(cluster, tmp_path):
    real = tmp_path / "site" / "dataclay"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = True\n")
    env = shim_env(cluster)
    env["PYTHONPATH"] += os.pathsep + str(tmp_path / "site")
    run = subprocess.run([sys.executable, "-c", "import dataclay"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "a real dataClay is installed" in run.stderr
    enable = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "site")!r})
        import store.compat
        try:
            store.compat.enable()
        except store.errors.ConfigurationError as exc:
            print("refused:", exc)
        import dataclay
        print("real" if getattr(dataclay, "REAL", False) else "shim")
    """)
    run = subprocess.run(
        [sys.executable, "-c", enable],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert run.returncode == 0, run.stderr
    assert "refused: a real dataClay is installed" in run.stdout
    assert run.stdout.strip().endswith("real")
    out = subprocess.run(
        [sys.executable, "-m", "store.compat"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert out.stdout.strip() == store.compat.shim_path()


def test_enable_refuses_when_a_real_dataclay_is_on_the_path(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "dataclay").mkdir(parents=True)
    (site / "dataclay" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ConfigurationError, match="will not shadow it"):
        store.compat.enable()


def test_public_names_are_pinned():
    import store.compat.compss as sri
    import store.compat.dataclay as layer

    assert sorted(layer.__all__) == sorted(
        [
            "Client",
            "DataClayObject",
            "AlienDataClayObject",
            "StubDataClayObject",
            "activemethod",
            "StorageObject",
            "exceptions",
        ]
    )
    assert sorted(sri.__all__) == sorted(
        [
            "init",
            "finish",
            "initWorker",
            "finishWorker",
            "initWorkerPostFork",
            "finishWorkerPostFork",
            "getByID",
            "getLocations",
            "TaskContext",
            "StorageObject",
            "get_client",
            "read_config",
        ]
    )
    for name in layer.exceptions.__all__:
        cls = getattr(layer.exceptions, name)
        assert issubclass(cls, layer.exceptions.DataClayException) and cls.__doc__, name
