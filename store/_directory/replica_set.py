"""The record of who holds a replicated object, as the directory stores it.

Shared by the directory (which stores and compare-and-sets it) and the
backend's replication rules (store.backend._core.replication), so that neither
layer imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReplicaSet:
    """Who holds a replicated object: its primary and replicas, at an epoch."""

    epoch: int
    primary: str
    replicas: tuple[str, ...] = ()
    target: int = 0  # the replication factor asked for

    def encode(self) -> str:
        return f"{self.epoch}|{self.primary}|{self.target}|{','.join(self.replicas)}"

    @classmethod
    def decode(cls, raw: str) -> "ReplicaSet":
        epoch, primary, target, replicas = raw.split("|", 3)
        return cls(int(epoch), primary, tuple(r for r in replicas.split(",") if r), int(target))

    @property
    def missing(self) -> int:
        """Replicas short of the factor asked for (repair makes them)."""
        return max(0, self.target - len(self.replicas))
