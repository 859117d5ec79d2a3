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

from . import aio, errors
from .api import (BackendStatus, backends, client, connect, delete_alias, disconnect, getByID,
                  get_backends, get_by_alias, get_by_id, get_locations, make_persistent_many,
                  stub_class)
from .alien import Alien
from .cluster import LocalCluster
from .config import Settings
from .leases import empty, zeros
from .objects import StorageObject, readonly
from .transfers import show_transfers

__all__ = [
    "StorageObject", "Alien", "readonly", "LocalCluster", "Settings", "BackendStatus", "errors",
    "aio",
    "connect", "disconnect", "client", "backends", "get_by_alias", "get_by_id", "getByID",
    "delete_alias", "get_locations", "make_persistent_many", "get_backends", "stub_class",
    "show_transfers", "empty", "zeros",
]
