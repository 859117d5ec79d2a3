"""Objects and tasks for the multi-host tests: each reports where it runs."""

from __future__ import annotations

import os
import socket

from runtime import task
from store import StorageObject, readonly


class Box(StorageObject):
    """Holds a value (a number or a numpy array) and says which host holds it."""

    def __init__(self, data=None, peer=None):
        self.data = data
        self.peer = peer

    @readonly
    def where(self):
        return socket.gethostname(), os.getpid()

    @readonly
    def total(self):
        return float(self.data.sum()) if hasattr(self.data, "sum") else self.data

    def incr(self, by=1):
        self.data += by
        return self.data

    @readonly
    def chain(self, depth):
        """Calls its peer, which calls back (A -> B -> A ...): the hosts visited."""
        here = [socket.gethostname()]
        if depth <= 0 or self.peer is None:
            return here
        return here + self.peer.chain(depth - 1)


@task(returns=1)
def where_task(b):
    """Runs next to ``b``: the host and PID it ran in, and b's sum."""
    return socket.gethostname(), os.getpid(), float(b.data.sum())
