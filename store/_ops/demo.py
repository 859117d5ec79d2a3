"""``claypot demo``: persistent objects with methods running next to their data."""

from __future__ import annotations

import os
import time
import uuid

from store._model.objects import StorageObject, readonly


class Account(StorageObject):
    """A bank account whose methods run on the backend that holds it."""

    def __init__(self, owner: str, balance: int = 0):
        self.owner = owner
        self.balance = balance
        self.history: list[int] = []

    def deposit(self, amount: int) -> int:
        self.balance += amount
        self.history.append(amount)
        return self.balance

    def transfer_to(self, other: "Account", amount: int) -> tuple[int, int]:
        """Runs here, calls ``other`` on its own backend: a nested cross-backend call."""
        self.balance -= amount
        self.history.append(-amount)
        return self.balance, other.deposit(amount)

    @readonly
    def where(self) -> tuple[str, int]:
        return "backend pid", os.getpid()


def run(backends: int = 2, address: str | None = None, token: str | None = None) -> int:
    """Run the demo on a fresh embedded cluster, or on a running one at ``address``."""
    from store._ops.cluster import LocalCluster

    if address:
        from store._api import api

        api.connect(address, token)
        ids = [b.backend_id for b in api.backends() if b.up]
        print(f"connected to the cluster at {address}; this process is pid {os.getpid()}")
        # A fresh suffix per run: the pid alone repeats (it is 1 in every container).
        show(ids, suffix=f"-{uuid.uuid4().hex[:12]}")
        return 0
    t0 = time.monotonic()
    with LocalCluster(backends=backends) as cluster:
        print(
            f"started an embedded Redis and {backends} backends in "
            f"{time.monotonic() - t0:.1f}s; this process is pid {os.getpid()}"
        )
        show(cluster.backends)
    print("cluster stopped; demo done")
    return 0


def show(backend_ids: list[str], suffix: str = "") -> None:
    """The demo proper: two accounts on two backends, calls, a nested call, a move."""
    from store._api import api
    from store._ops.status_table import format_status

    alice, bob = Account("alice", 100), Account("bob", 20)
    alice.make_persistent(alias="alice" + suffix, backend=backend_ids[0])
    bob.make_persistent(alias="bob" + suffix, backend=backend_ids[-1])
    print(f"alice lives on backend {alice.get_location()[:8]}, bob on {bob.get_location()[:8]}")
    print(f"alice.where() -> {alice.where()}   bob.where() -> {bob.where()}")
    print(f"alice.deposit(50) -> {alice.deposit(50)} (ran on alice's backend)")
    a, b = alice.transfer_to(bob, 30)
    print(f"alice.transfer_to(bob, 30) -> alice {a}, bob {b} (alice's backend called bob's)")
    same = api.get_by_alias("bob" + suffix)
    print(f"get_by_alias('bob').balance -> {same.balance}, history {same.history}")
    start = time.perf_counter()
    n = 500
    for _ in range(n):
        alice.where()
    per = (time.perf_counter() - start) / n * 1e6
    print(f"{n} method calls: {per:.0f} us per call round trip")
    bob.move(backend_ids[0])
    print(f"bob moved to backend {bob.get_location()[:8]}; balance still {bob.balance}")
    print(format_status(api.backends()))
