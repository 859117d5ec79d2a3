"""Where a task runs: locality scoring and per-backend capacity. Pure logic, no I/O.

A task whose arguments include persistent objects runs on the backend that
holds the largest share of them; a task with none goes to the least-loaded
backend. The share is counted in objects: the client knows each object's
owner without asking (it travels in the proxy) but not its size, and asking
would put a directory round trip on every task. Pass ``weights`` to score by
bytes when the caller knows them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Hashable, Iterable

from store.errors import ConfigurationError


@dataclass(frozen=True)
class Demand:
    """What one running task holds on its backend: computing units and bytes of memory."""
    units: int = 1
    memory: int = 0


def locality_scores(owners: Iterable[str], weights: Iterable[float] | None = None
                    ) -> dict[str, float]:
    """Sum of weights (1 per object by default) held by each backend."""
    scores: dict[str, float] = {}
    if weights is None:
        for o in owners:
            scores[o] = scores.get(o, 0.0) + 1.0
    else:
        for o, w in zip(owners, weights):
            scores[o] = scores.get(o, 0.0) + float(w)
    return scores


class Scheduler:
    """Chooses a backend per task and keeps count of what runs where.

    ``units`` counts the tasks given to each backend and not finished (its
    load). ``memory`` is each backend's budget for tasks' ``memory_size``; a
    task that does not fit waits for its backend (it is not sent elsewhere,
    which would give up locality).
    """

    def __init__(self, slots: int, memory: int = 0):
        self.slots = slots
        self.memory = memory                  # bytes per backend; 0: not limited
        self.backends: list[str] = []
        self.units: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._rr = itertools.count()

    def set_backends(self, backend_ids: list[str]) -> None:
        """The backends that are up, in a stable order."""
        self.backends = list(backend_ids)
        for b in self.backends:
            self.units.setdefault(b, 0)
            self.bytes.setdefault(b, 0)

    def check(self, demand: Demand) -> None:
        """Raise ValueError for a demand no backend could ever satisfy."""
        if demand.units > self.slots:
            raise ConfigurationError(f"computing_units={demand.units} exceeds the {self.slots} task "
                             f"slots of a backend (CLAYPOT_TASK_SLOTS)")
        if self.memory and demand.memory > self.memory:
            raise ConfigurationError(f"memory_size of {demand.memory / 2**30:.2f} GiB exceeds the "
                             f"{self.memory / 2**30:.2f} GiB a backend may use for tasks")

    def choose(self, owners: list[str], weights: list[float] | None = None) -> str:
        """The backend to run a task whose persistent arguments live on ``owners``."""
        if not self.backends:
            raise LookupError("no backend is up")
        scores = {b: s for b, s in locality_scores(owners, weights).items()
                  if b in self.units and b in self.backends}
        if scores:
            best = max(scores.values())
            # Ties between holders go to the less loaded one.
            return min((b for b, s in scores.items() if s == best),
                       key=lambda b: (self.units[b], self.backends.index(b)))
        n = len(self.backends)
        start = next(self._rr) % n
        order = self.backends[start:] + self.backends[:start]
        return min(order, key=lambda b: self.units[b])

    def fits(self, backend: str, demand: Demand) -> bool:
        """True when ``demand``'s memory fits in what ``backend`` has free now.

        Computing units are not checked here: the executor's lanes hold a task
        until as many slots as it needs are free on its backend.
        """
        return not self.memory or self.bytes.get(backend, 0) + demand.memory <= self.memory

    def take(self, backend: str, demand: Demand) -> None:
        self.units[backend] = self.units.get(backend, 0) + demand.units
        self.bytes[backend] = self.bytes.get(backend, 0) + demand.memory

    def release(self, backend: str, demand: Demand) -> None:
        self.units[backend] = self.units.get(backend, 0) - demand.units
        self.bytes[backend] = self.bytes.get(backend, 0) - demand.memory

    def load(self, backend: Hashable) -> int:
        """Computing units in use on ``backend`` by this runtime's tasks."""
        return self.units.get(backend, 0)
