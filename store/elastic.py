"""Backends leaving a running cluster: drain one (objects move away, tasks stop).

``drain(client, redis_url, token, backend_id, targets)`` is what
``claypot drain BACKEND`` and ``LocalCluster.scale`` / ``LocalCluster.drain``
run before a backend stops: first every callback registered with
:func:`on_drain` is told (the task runtime stops placing tasks there), then
each object the directory lists on the backend moves to one of ``targets``
in turn (the store's own ``move``: the bytes stream backend to backend and
proxies follow), except replicated objects, which fail over to a replica once
the caller has stopped the process (:func:`handed_over` waits for that).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .errors import ConfigurationError, ObjectNotFound

log = logging.getLogger("claypot.elastic")

_hooks: list[Callable[[str, str], None]] = []


def on_change(callback: Callable[[str, str], None]) -> None:
    """Call ``callback(event, backend_id)`` when a backend joins (``"join"``) or
    starts draining (``"drain"``) through this process."""
    _hooks.append(callback)


def _notify(event: str, backend_id: str) -> None:
    for cb in list(_hooks):
        try:
            cb(event, backend_id)
        except Exception:  # a listener's failure must not stop the change
            log.exception("%s listener failed for %s", event, backend_id)


def joined(backend_id: str) -> None:
    """Tell this process's listeners that ``backend_id`` is up and takes work now."""
    _notify("join", backend_id)


def draining(backend_id: str) -> None:
    """Tell this process's listeners that ``backend_id`` takes no new work."""
    _notify("drain", backend_id)


def drain(client: Any, redis_url: str, token: str, backend_id: str, targets: list[str]) -> int:
    """Move every object of ``backend_id`` to ``targets`` (round robin); how many moved."""
    from store._directory.directory import Directory

    targets = [t for t in targets if t != backend_id]
    if not targets:
        raise ConfigurationError(f"cannot drain {backend_id}: no other backend to move to")
    draining(backend_id)
    directory = Directory(redis_url, timeout=client.settings.admin_timeout, token=token)
    moved = 0
    try:
        oids = sorted(directory.objects_of(backend_id))
        # A replicated object is not moved: when the backend stops, one of its replicas
        # takes over (see handed_over), with every acknowledged change.
        replicated = {
            oid for oid, rset in zip(oids, directory.replica_sets(oids)) if rset is not None and rset.replicas
        }
        for i, oid in enumerate(o for o in oids if o not in replicated):
            try:
                proxy = client.get_by_id(oid)
                client.move(proxy, targets[i % len(targets)])
                moved += 1
            except ObjectNotFound:
                continue  # deleted meanwhile
    finally:
        directory.close()
    return moved


def handed_over(redis_url: str, token: str, backend_id: str, timeout: float = 30.0) -> int:
    """Wait until the replicated objects of a drained, stopped backend have failed over
    to their replicas; how many had not within ``timeout`` seconds (they fail over as
    soon as a replica's monitor sees the backend gone)."""
    import time
    from store._directory.directory import Directory

    directory = Directory(redis_url, timeout=min(timeout, 10.0), token=token)
    try:
        deadline = time.monotonic() + timeout
        while True:
            oids = list(directory.objects_of(backend_id))
            left = [o for o, rset in zip(oids, directory.replica_sets(oids)) if rset is not None and rset.replicas]
            if not left or time.monotonic() > deadline:
                if left:
                    log.warning("%d replicated object(s) of %s not failed over yet", len(left), backend_id)
                return len(left)
            time.sleep(0.1)
    finally:
        directory.close()


def retire(redis_url: str, token: str, backend_id: str, timeout: float = 10.0) -> None:
    """Mark a drained backend that has stopped as gone for good, not restarting.

    A backend that stops on its own is marked "stopped" so clients keep
    retrying it while it restarts; one that was drained will not come back,
    so a client holding an old proxy goes to the directory at once instead.
    """
    from store._directory.directory import Directory

    directory = Directory(redis_url, timeout=timeout, token=token)
    try:
        for info in directory.backends():
            if info["backend_id"] == backend_id and not info["up"]:
                entry = {k: v for k, v in info.items() if k not in ("backend_id", "up")}
                entry.update(stopped=False, drained=True)
                directory.r.hset(directory.k_backends, backend_id, directory.keys.seal_backend(backend_id, entry))
    finally:
        directory.close()
