"""claypot's object store.

from store import StorageObject, LocalCluster

class Counter(StorageObject):
    def __init__(self):
        self.value = 0
    def incr(self):
        self.value += 1
        return self.value

with LocalCluster(backends=2):
    c = Counter()
    c.make_persistent(alias="c")
    c.incr()          # runs on the backend that holds c
"""

# Old module names (store.client, store.backend.heap, ...) keep working:
# importing _legacy installs the finder that maps them.
from . import _legacy  # noqa: F401

from . import aio, errors
from store._api.api import (
    BackendStatus,
    backends,
    client,
    connect,
    delete_alias,
    disconnect,
    getByID,
    get_backends,
    get_by_alias,
    get_by_id,
    get_locations,
    make_persistent_many,
    stub_class,
)
from store._api.alien import Alien
from store._ops.cluster import LocalCluster
from .config import Settings
from store._client.leases import empty, zeros
from store._model.objects import StorageObject, readonly
from store._wire.transfers import show_transfers

__all__ = [
    "StorageObject",
    "Alien",
    "readonly",
    "LocalCluster",
    "Settings",
    "BackendStatus",
    "errors",
    "aio",
    "connect",
    "disconnect",
    "client",
    "backends",
    "get_by_alias",
    "get_by_id",
    "getByID",
    "delete_alias",
    "get_locations",
    "make_persistent_many",
    "get_backends",
    "stub_class",
    "show_transfers",
    "empty",
    "zeros",
]
