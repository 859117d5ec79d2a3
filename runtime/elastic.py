"""Autoscaling: grow and shrink a cluster with this program's task workload.

The policy (:func:`target`) is pure: from the tasks not finished, how long
the oldest has waited and the current size, it returns the size to ask for,
between a minimum and a maximum. :class:`Autoscaler` applies it every
``interval`` seconds through an engine that knows how to add and remove
backends: anything with ``scale(n)`` and ``processes`` (``LocalCluster``,
or :class:`store.slurm.SlurmCluster`, which asks SLURM for jobs). Shrinking happens only when no task is pending, after ``cooldown``
seconds of quiet, so a backend never leaves under a running task; each one
that leaves is drained first (its objects move to the others).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from store.errors import ConfigurationError

log = logging.getLogger("claypot.elastic")


def target(
    pending: int,
    oldest_wait: float,
    current: int,
    minimum: int,
    maximum: int,
    tasks_per_backend: int = 8,
    max_wait: float = 5.0,
) -> int:
    """The cluster size to ask for.

    Enough backends for ``tasks_per_backend`` pending tasks each; one more
    than now when the oldest task has waited past ``max_wait`` seconds (a
    queue of long tasks); never fewer than now while tasks are pending.
    """
    want = math.ceil(pending / max(1, tasks_per_backend))
    if pending and oldest_wait > max_wait:
        want = max(want, current + 1)
    if pending:
        want = max(want, current)
    return max(minimum, min(maximum, want))


class Autoscaler:
    """Applies :func:`target` to ``cluster`` from a background thread (see the module docstring)."""

    def __init__(
        self,
        cluster: Any,
        minimum: int = 1,
        maximum: int = 4,
        tasks_per_backend: int = 8,
        max_wait: float = 5.0,
        interval: float = 0.5,
        cooldown: float = 2.0,
        resources: str | None = None,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ConfigurationError(f"autoscaling needs 1 <= minimum <= maximum, not {minimum}..{maximum}")
        self.cluster = cluster
        self.minimum, self.maximum = minimum, maximum
        self.tasks_per_backend, self.max_wait = tasks_per_backend, max_wait
        self.interval, self.cooldown = interval, cooldown
        self.resources = resources
        self.history: list[tuple[float, int]] = []  # (time, size) after each change
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._quiet_since: float | None = None

    def size(self) -> int:
        """Backends the engine has now (its ``size()``, else its live processes)."""
        if hasattr(self.cluster, "size"):
            return self.cluster.size()
        return len([p for p in self.cluster.processes if p.alive()])

    def step(self) -> int:
        """Look at the workload once and scale if the policy says so; the new size."""
        from runtime._core import current

        pending, waited = current().workload()
        now = time.monotonic()
        size = self.size()
        want = target(pending, waited, size, self.minimum, self.maximum, self.tasks_per_backend, self.max_wait)
        if want < size:
            # Shrink only after a quiet spell: a program between two bursts keeps its nodes.
            self._quiet_since = self._quiet_since or now
            if now - self._quiet_since < self.cooldown:
                return size
        else:
            self._quiet_since = None
        if want != size:
            log.info("autoscaling %d -> %d backends (%d pending, oldest %.1fs)", size, want, pending, waited)
            self.cluster.scale(want, resources=self.resources)
            self.history.append((now, want))
        return want

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
            except Exception as exc:  # kept for the owner to see; the program goes on
                log.exception("autoscaling step failed")
                self.error = exc

    def start(self) -> "Autoscaler":
        self._thread = threading.Thread(target=self._loop, name="claypot-autoscale", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Autoscaler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
