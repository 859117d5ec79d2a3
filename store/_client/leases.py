"""Same-host zero-copy reads, the reader's side: leased read-only views.

A backend answers a same-host read of a large buffer it keeps in shared
memory with the segment's name, an offset and a lease (see
:mod:`store.backend._storage.segments`). The reader maps the segment read-only; the
value it unpickles (a numpy array, say) is a read-only view of that mapping,
with no copy on either side. When the view is garbage collected, the lease
goes back to the backend: a finalizer queues it (finalizers may run on any
thread, inside any call, so they never make an RPC themselves) and a daemon
thread returns queued leases in batches, each with a deadline. If the reader
dies first (``kill -9``), the backend notices on its own.

Arrays built with :func:`empty` / :func:`zeros` live in a shared-memory
segment of this process from the start: ``make_persistent`` of an object
holding one hands the segment to a same-host backend instead of copying it
(this process's mapping turns copy-on-write, so later writes here never
reach the stored object).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from typing import Any, Callable

from store._client import shm

log = logging.getLogger("claypot.leases")

_RELEASE_DEADLINE = 5.0
_RELEASE_ATTEMPTS = 4


class LeaseReturns:
    """Queues leases whose views died and returns them to their backends."""

    def __init__(self, send: Callable[[str, list[str], float], None]):
        self._send = send  # (backend address, lease ids, deadline)
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple[str, str]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._inflight = 0

    def track(self, view: memoryview, address: str, lease_id: str) -> None:
        """Return ``lease_id`` to ``address`` once the mapping under ``view`` is gone."""
        weakref.finalize(view.obj, self._queue_release, address, lease_id)

    def _queue_release(self, address: str, lease_id: str) -> None:
        with self._cv:
            self._queue.append((address, lease_id))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="claypot-leases", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    if not self._cv.wait(30.0):
                        self._thread = None  # idle: the next release starts a new one
                        return
                batch: dict[str, list[str]] = {}
                while self._queue:
                    address, lease_id = self._queue.popleft()
                    batch.setdefault(address, []).append(lease_id)
                self._inflight += 1
            try:
                for address, ids in batch.items():
                    self._return(address, ids)
            finally:
                with self._cv:
                    self._inflight -= 1
                    self._cv.notify_all()

    def _return(self, address: str, ids: list[str]) -> None:
        # A busy backend may miss one deadline: try a few times before giving up.
        # After that the backend is taken to be gone (its leases with it); if it
        # is not, it ends them when this process exits.
        for attempt in range(_RELEASE_ATTEMPTS):
            try:
                self._send(address, ids, _RELEASE_DEADLINE)
                return
            except Exception as exc:
                log.debug("returning %d leases to %s failed (attempt %d): %s", len(ids), address, attempt + 1, exc)
                time.sleep(0.2 * (attempt + 1))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued lease was sent (for tests and orderly exits)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._inflight, timeout)


def empty(shape: Any, dtype: Any = float) -> Any:
    """A numpy array in shared memory, uninitialised: stored without a copy on this host.

    Like ``numpy.empty``. ``make_persistent`` of an object holding it (as a
    whole attribute) hands its memory to a same-host backend; elsewhere (or
    without /dev/shm) it is an ordinary array and is sent as usual.
    """
    try:
        return shm.make_array(shape, dtype, zero=False)
    except shm.Unavailable:
        import numpy as np

        return np.empty(shape, dtype)


def zeros(shape: Any, dtype: Any = float) -> Any:
    """Like :func:`empty`, filled with zeros (a new segment reads as zeros: no extra cost)."""
    try:
        return shm.make_array(shape, dtype, zero=True)
    except shm.Unavailable:
        import numpy as np

        return np.zeros(shape, dtype)
