"""The notebook workflow: a cell that redefines a class gives new objects the new code,
and obj.upgrade_class() moves an existing object to it, durably."""

import sys

import pytest

from store import LocalCluster
from store.errors import ClassNotFound

pytestmark = pytest.mark.slow

V1 = """
from store import StorageObject

class Greeter(StorageObject):
    def __init__(self, name):
        self.name = name
    def greet(self):
        return "hello " + self.name
"""

V2 = (
    V1.replace('"hello "', '"HELLO, "')
    + """
    def shout(self):
        return self.greet() + "!"
"""
)


def run_cell(namespace, source):
    exec(compile(source, "<cell>", "exec"), namespace)


def test_redefined_class_and_upgrade_class(tmp_path):
    # A kernel runs cells in a namespace whose __name__ is "__main__".
    cells = {"__name__": "__main__"}
    main = sys.modules["__main__"]
    try:
        with LocalCluster(backends=2, data_dir=str(tmp_path / "c")) as c:
            run_cell(cells, V1)
            old = cells["Greeter"]("ada")
            old.make_persistent(alias="greeter")
            assert old.greet() == "hello ada"

            run_cell(cells, V2)  # the cell is edited and run again
            new = cells["Greeter"]("bob")
            new.make_persistent()
            assert new.greet() == "HELLO, bob" and new.shout() == "HELLO, bob!"
            assert old.greet() == "hello ada"  # existing objects keep their version

            with pytest.raises(ClassNotFound, match="pass it"):
                old.upgrade_class()  # __main__ has no Greeter here
            main.Greeter = cells["Greeter"]  # as a kernel's __main__ would
            old.upgrade_class()  # to what Greeter is bound to now
            assert old.greet() == "HELLO, ada" and old.shout() == "HELLO, ada!"
            assert old.name == "ada"  # its state is kept

            # Durable: after a restart of its backend it still runs the new code,
            # and a fresh proxy from the directory has the new methods.
            c.restart(old.get_location())
            again = c.client.get_by_alias("greeter")
            assert again.shout() == "HELLO, ada!"

            class Other(cells["Greeter"].__bases__[0]):
                pass

            with pytest.raises(ClassNotFound, match="same class"):
                old.upgrade_class(Other)
    finally:
        main.__dict__.pop("Greeter", None)
