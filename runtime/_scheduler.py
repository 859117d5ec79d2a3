"""Where a task runs: locality scoring and per-backend capacity. Pure logic, no I/O.

A task whose arguments include persistent objects runs on the backend that
holds the largest share of them; a task with none goes to the least-loaded
backend. The share is counted in objects: the client knows each object's
owner without asking (it travels in the proxy) but not its size, and asking
would put a directory round trip on every task. Pass ``weights`` to score by
bytes when the caller knows them.

Constraints come first: a task runs only on a backend whose resources meet
its ``@constraint`` (:mod:`runtime._resources`). Among those, locality
decides; so a task whose data lives on a backend that cannot run it runs on
one that can, and reads the data remotely there (by reference, the object
does not move).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable

from store.errors import ConfigurationError

from runtime._resources import satisfies, unmet


@dataclass(frozen=True)
class Demand:
    """What one running task holds on its backend: computing units and bytes of memory."""

    units: int = 1
    memory: int = 0


def locality_scores(owners: Iterable[str], weights: Iterable[float] | None = None) -> dict[str, float]:
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
        self.memory = memory  # bytes per backend; 0: not limited
        self.backends: list[str] = []
        self.offers: dict[str, dict[str, Any]] = {}  # declared resources per backend
        self.excluded: set[str] = set()  # draining: no new tasks
        self.units: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._rr = itertools.count()

    def set_backends(self, backend_ids: list[str], offers: dict[str, dict[str, Any]] | None = None) -> None:
        """The backends that are up, in a stable order, with their declared resources."""
        self.backends = [b for b in backend_ids if b not in self.excluded]
        if offers is not None:
            self.offers = {b: dict(offers.get(b) or {}) for b in self.backends}
        for b in self.backends:
            self.units.setdefault(b, 0)
            self.bytes.setdefault(b, 0)

    def exclude(self, backend: str) -> None:
        """Give ``backend`` no new tasks (it is draining); tasks it runs finish there."""
        self.excluded.add(backend)
        self.backends = [b for b in self.backends if b != backend]

    def slots_of(self, backend: str) -> int:
        """Computing units ``backend`` offers: its declaration, else the runtime's slots."""
        cu = self.offers.get(backend, {}).get("computing_units")
        return int(cu) if cu is not None else self.slots

    def memory_of(self, backend: str) -> int:
        """Bytes of task memory ``backend`` offers: its declaration, else the host share."""
        gib = self.offers.get(backend, {}).get("memory_size")
        return int(float(gib) * 2**30) if gib is not None else self.memory

    def offer(self, backend: str) -> dict[str, Any]:
        """Everything ``backend`` offers, with computing units and memory filled in."""
        out = dict(self.offers.get(backend, {}))
        out["computing_units"] = self.slots_of(backend)
        mem = self.memory_of(backend)
        if mem:
            out["memory_size"] = mem / 2**30
        return out

    def _required(self, demand: Demand, required: dict[str, Any] | None) -> dict[str, Any]:
        req = dict(required or {})
        req["computing_units"] = max(float(req.get("computing_units", 0)), demand.units)
        if demand.memory:
            req["memory_size"] = max(float(req.get("memory_size", 0)), demand.memory / 2**30)
        return req

    def eligible(self, demand: Demand, required: dict[str, Any] | None = None) -> list[str]:
        """Up backends whose resources meet the task's constraints, in stable order."""
        req = self._required(demand, required)
        out = []
        for b in self.backends:
            offer = self.offer(b)
            if "memory_size" not in offer:
                req_b = {k: v for k, v in req.items() if k != "memory_size"}  # not limited
            else:
                req_b = req
            if satisfies(req_b, offer):
                out.append(b)
        return out

    def check(self, demand: Demand, required: dict[str, Any] | None = None) -> None:
        """Raise ConfigurationError (a ValueError) for a task no up backend can ever run."""
        if not self.backends:
            if demand.units > self.slots:
                raise ConfigurationError(
                    f"computing_units={demand.units} exceeds the "
                    f"{self.slots} task slots of a backend "
                    f"(CLAYPOT_TASK_SLOTS)"
                )
            if self.memory and demand.memory > self.memory:
                raise ConfigurationError(
                    f"memory_size of {demand.memory / 2**30:.2f} GiB "
                    f"exceeds the {self.memory / 2**30:.2f} GiB a backend "
                    f"may use for tasks"
                )
            return
        if self.eligible(demand, required):
            return
        req = self._required(demand, required)
        why = []
        for b in self.backends:
            offer = self.offer(b)
            if "memory_size" not in offer:
                req_b = {k: v for k, v in req.items() if k != "memory_size"}
            else:
                req_b = req
            why.append(f"{b[:8]}: " + "; ".join(unmet(req_b, offer)))
        raise ConfigurationError(
            "no backend can run this task: its constraints "
            f"{_show(req)} are not met ({' | '.join(why)}); declare "
            f"resources with --resources / CLAYPOT_RESOURCES "
            f"(computing units default to CLAYPOT_TASK_SLOTS)"
        )

    def choose(self, owners: list[str], weights: list[float] | None = None, among: list[str] | None = None) -> str:
        """The backend to run a task whose persistent arguments live on ``owners``.

        ``among``: the backends allowed (those meeting the task's constraints);
        default all that are up.
        """
        allowed = self.backends if among is None else [b for b in self.backends if b in among]
        if not allowed:
            raise LookupError(
                "no backend is up" if not self.backends else "no backend that is up meets the task's constraints"
            )
        scores = {b: s for b, s in locality_scores(owners, weights).items() if b in self.units and b in allowed}
        if scores:
            best = max(scores.values())
            # Ties between holders go to the less loaded one.
            return min((b for b, s in scores.items() if s == best), key=lambda b: (self.units[b], allowed.index(b)))
        n = len(allowed)
        start = next(self._rr) % n
        order = allowed[start:] + allowed[:start]
        return min(order, key=lambda b: self.units[b])

    def score(self, backend: str, owners: list[str], weights: list[float] | None = None) -> float:
        """How much of a task's data ``backend`` holds (for choosing between implementations)."""
        return locality_scores(owners, weights).get(backend, 0.0)

    def fits(self, backend: str, demand: Demand) -> bool:
        """True when ``demand``'s memory fits in what ``backend`` has free now.

        Computing units are not checked here: the executor's lanes hold a task
        until as many slots as it needs are free on its backend.
        """
        mem = self.memory_of(backend)
        return not mem or self.bytes.get(backend, 0) + demand.memory <= mem

    def take(self, backend: str, demand: Demand) -> None:
        self.units[backend] = self.units.get(backend, 0) + demand.units
        self.bytes[backend] = self.bytes.get(backend, 0) + demand.memory

    def release(self, backend: str, demand: Demand) -> None:
        self.units[backend] = self.units.get(backend, 0) - demand.units
        self.bytes[backend] = self.bytes.get(backend, 0) - demand.memory

    def load(self, backend: str) -> int:
        """Computing units in use on ``backend`` by this runtime's tasks."""
        return self.units.get(backend, 0)


def _show(req: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(req.items()))
