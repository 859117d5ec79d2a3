"""What used to happen silently now says so: an open file stored as a copy, a value that
cannot be pickled (naming the attribute), remote tracebacks without their source lines."""

import threading
import warnings

import pytest

from store import StorageObject
from store.errors import SerializationError


class Holder(StorageObject):
    def __init__(self, thing):
        self.name = "holder"
        self.thing = thing

    def fail(self):
        marker = "the line of the raise"
        raise ValueError(marker)


def test_an_open_file_is_stored_as_a_copy_with_a_warning(cluster, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("some notes")
    with open(path) as f:
        h = Holder(f)
        with pytest.warns(UserWarning, match="copy of its contents"):
            h.make_persistent()
    assert h.thing.read() == "some notes"


def test_a_value_that_cannot_be_pickled_names_its_attribute(cluster):
    h = Holder({"config": {"guard": threading.Lock()}})
    with pytest.raises(
        SerializationError,
        match=r"\['thing'\]\['config'\]\['guard'\] "
        r"\(a lock\)",
    ):
        h.make_persistent()
    assert not h.is_persistent


def test_remote_tracebacks_point_at_the_source(cluster):
    h = Holder(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about here
        h.make_persistent()
    with pytest.raises(ValueError) as info:
        h.fail()
    note = "\n".join(info.value.__notes__)
    assert "<dynamic-code>" not in note
    assert __file__ in note and "raise ValueError(marker)" in note
