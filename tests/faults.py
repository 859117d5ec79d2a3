"""Randomized, model-based fault injection against a real cluster.

A seeded generator drives concurrent clients (threads, each owning its own
objects) through random sequences of make_persistent, changing and
read-only calls, calls that raise, in-place numpy changes (over the
out-of-band threshold and over ``big_object``), moves, deletes and alias
changes, while a killer kill -9s a random backend at random points
(mid-call, mid-checkpoint, mid-move) and restarts it. Checkpoints run every
few tens of milliseconds, so kills land inside them too.

A model records what each acknowledged operation did. An operation that
failed with an error that leaves its outcome open (``CallInterrupted``, a
dead backend) makes the object's state a set of possibilities. After every
round the whole cluster is checked against the model: every acknowledged
change is there, nothing unacknowledged is half there (an array is always
one whole acknowledged state), deleted objects stay deleted, aliases
resolve, and every backend's lifecycle invariants hold.

Used by tests/test_fault_injection.py (fixed seeds, bounded) and by
bench/soak_lifecycle.py (a long soak that reports JSON).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import store
from lifelib import Array, Counter
from store import LocalCluster
from store.errors import AliasNotFound, BackendError, ClaypotError, ObjectMoved, ObjectNotFound

MiB = 1 << 20
BIG_OBJECT = 4 * MiB
# float64 elements: small (inline, out-of-band buffers), medium (streamed or via shm),
# big (over big_object: write-behind)
ARRAY_SIZES = {"small": 32 * 1024, "medium": 256 * 1024, "big": 768 * 1024}

CLUSTER_ENV = {
    "CLAYPOT_CHECKPOINT_INTERVAL": "0.05",
    "CLAYPOT_FLUSH_INTERVAL": "0.05",
    "CLAYPOT_BIG_OBJECT": str(BIG_OBJECT),
    "CLAYPOT_RECONNECT_TIMEOUT": "20",
}
_OPEN = (BackendError, ConnectionError)  # outcome unknown: may or may not have applied


class Violation(AssertionError):
    """The cluster disagrees with the model of acknowledged operations."""


@dataclass
class Model:
    """What one object may be: every state consistent with what was acknowledged."""

    proxy: object
    kind: str  # "counter" or an ARRAY_SIZES key
    states: set  # counter: ints; array: (first half, second half)
    alias: str = ""
    alias_states: set = field(default_factory=set)  # {True, False}: alias present?
    exists: set = field(default_factory=lambda: {True})
    # Big objects are write-behind (documented): after a kill -9 they may come back as
    # any whole state acknowledged since the round began, or the state they began it in.
    round_start: set = field(default_factory=set)
    round_history: set = field(default_factory=set)
    log: list = field(default_factory=list)  # recent operations, for the report

    @property
    def big(self) -> bool:
        return self.kind == "big"


@dataclass
class Stats:
    sequences: int = 0
    operations: int = 0
    acknowledged: int = 0
    open_outcomes: int = 0
    kills: int = 0
    restarts: int = 0
    checks: int = 0
    violations: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "sequences": self.sequences,
            "operations": self.operations,
            "acknowledged": self.acknowledged,
            "open_outcomes": self.open_outcomes,
            "kills": self.kills,
            "restarts": self.restarts,
            "checks": self.checks,
            "violations": len(self.violations),
            "violation_details": self.violations[:10],
        }


def _array_values(state: tuple) -> list:
    return sorted({float(state[0]), float(state[1])})


class Worker:
    """One client thread with its own objects and its own random stream."""

    def __init__(self, name: str, rng: random.Random, cluster: LocalCluster, stats: Stats):
        self.name = name
        self.rng = rng
        self.cluster = cluster
        self.stats = stats
        self.objects: list[Model] = []
        self.deleted: list[Model] = []
        self._aliases = 0
        self._kills_seen = stats.kills

    def _after_kill(self) -> None:
        """A backend was killed: write-behind objects may be back at any state since their
        last durable point."""
        self._kills_seen = self.stats.kills
        for m in self.objects:
            if m.big:
                m.states = m.states | m.round_start | m.round_history

    # -- operations -----------------------------------------------------------------
    def step(self) -> None:
        if self.stats.kills != self._kills_seen:
            self._after_kill()
        live = [m for m in self.objects if True in m.exists]
        ops = ["create"] * 3
        if live:
            ops += (
                ["change"] * 6
                + ["read"] * 3
                + ["fail"] * 2
                + ["move"] * 2
                + ["delete"] * 1
                + ["alias"] * 1
                + ["checkpoint"] * 1
            )
        op = self.rng.choice(ops)
        self.stats.operations += 1
        target = self.rng.choice(live) if live else None
        getattr(self, "_" + op)(target)
        if target is not None and op not in ("create", "checkpoint"):
            where = target.proxy.__dict__.get("_claypot_backend", "")[:4]
            target.log.append(f"{op}@{self.stats.kills}k:{where}:{sorted(map(str, target.states))[:3]}")
            del target.log[:-10]

    def _settle(self, fn, on_ok, on_open, m: Model | None = None) -> None:
        try:
            result = fn()
        except ObjectNotFound:
            if m is None or False not in m.exists:
                raise
            m.exists = {False}  # an open delete that did apply
            return
        except _OPEN:
            self.stats.open_outcomes += 1
            on_open()
            return
        self.stats.acknowledged += 1
        on_ok(result)

    def _create(self, _) -> None:
        kind = self.rng.choice(["counter", "counter", "small", "medium", "big"])
        alias = ""
        if self.rng.random() < 0.3:
            self._aliases += 1
            alias = f"{self.name}-{self._aliases}-{self.rng.getrandbits(32):08x}"
        backend = self.rng.choice(self.cluster.backends)
        if kind == "counter":
            value = self.rng.randrange(1000)
            obj, state = Counter(value), value
        else:
            fill = float(self.rng.randrange(1000))
            obj, state = Array(ARRAY_SIZES[kind], fill), (fill, fill)
        try:
            obj.make_persistent(alias=alias or None, backend=backend)
        except _OPEN:
            self.stats.open_outcomes += 1
            return  # no id came back: nothing to check
        self.stats.acknowledged += 1
        m = Model(obj, kind, {state}, alias, {True} if alias else set())
        self._remember(m)  # written when made persistent: a kill may bring it back to this
        self.objects.append(m)

    def _change(self, m: Model) -> None:
        if m.kind == "counter":
            by = self.rng.randrange(1, 10)
            new = {s + by for s in m.states}
            self._settle(lambda: m.proxy.incr(by), lambda r: self._set(m, new, r), lambda: self._open(m, new), m)
        else:
            v = float(self.rng.randrange(1000, 2000))
            new = {(v, v)}
            self._settle(lambda: m.proxy.fill(v), lambda r: self._set(m, new), lambda: self._open(m, new), m)

    def _set(self, m: Model, new: set, result=None) -> None:
        if m.kind == "counter" and result is not None and result not in new:
            self._violation(m, f"incr returned {result}, model allows {sorted(new)}")
            return
        m.states = {result} if (m.kind == "counter" and result is not None) else new
        m.exists = {True}
        self._remember(m)

    def _open(self, m: Model, new: set) -> None:
        m.states = m.states | new
        self._remember(m)

    @staticmethod
    def _remember(m: Model) -> None:
        if m.big:
            m.round_history |= m.states

    def begin_round(self) -> None:
        for m in self.objects:
            m.round_start = set(m.states)
            m.round_history = set()

    def _read(self, m: Model) -> None:
        try:
            seen = m.proxy.get() if m.kind == "counter" else m.proxy.values()
        except ObjectNotFound:
            if False not in m.exists:
                self._violation(m, "acknowledged object not found")
            else:
                m.exists = {False}
            return
        except _OPEN:
            self.stats.open_outcomes += 1
            return
        self.stats.acknowledged += 1
        self._observe(m, seen)

    def _catch_up(self) -> None:
        if self.stats.kills != self._kills_seen:
            self._after_kill()

    def _observe(self, m: Model, seen) -> None:
        self._catch_up()
        if True not in m.exists:
            self._violation(m, f"deleted object still answers {seen!r}")
            return
        if m.kind == "counter":
            if seen not in m.states:
                self._violation(m, f"counter is {seen}, model allows {sorted(m.states)}")
            else:
                m.states = {seen}
        else:
            allowed = [s for s in m.states if _array_values(s) == seen]
            if not allowed:
                self._violation(m, f"array holds {seen}, model allows {sorted(_array_values(s) for s in m.states)}")
            else:
                m.states = set(allowed)
        m.exists = {True}

    def _fail(self, m: Model) -> None:
        v = float(self.rng.randrange(2000, 3000))
        if m.kind == "counter":
            call, expected = (lambda: m.proxy.incr_then_fail(5)), ValueError
        else:
            call, expected = (lambda: m.proxy.fill_then_fail(v)), RuntimeError

        def after() -> set:
            # Computed once the call is over: a kill meanwhile widens what it started from.
            self._catch_up()
            if m.big:  # a big object keeps its in-place change (documented)
                return {(v, s[1]) for s in m.states}
            return set(m.states)  # others roll back

        try:
            call()
        except ObjectNotFound:
            if False not in m.exists:
                raise
            m.exists = {False}
            return
        except expected:
            self.stats.acknowledged += 1
            m.states = after()
            # Written to its checkpoint before the error returned: durable now.
            m.round_start, m.round_history = set(m.states), set()
            return
        except _OPEN:
            self.stats.open_outcomes += 1
            m.states = m.states | after()
            self._remember(m)
            return
        self._violation(m, "a method that raises returned normally")

    def _move(self, m: Model) -> None:
        target = self.rng.choice(self.cluster.backends)
        try:
            m.proxy.move(target)
        except ObjectNotFound:
            if False not in m.exists:
                self._violation(m, "acknowledged object not found by move")
            return
        except _OPEN:
            self.stats.open_outcomes += 1
            return
        self.stats.acknowledged += 1

    def _delete(self, m: Model) -> None:
        try:
            m.proxy.delete_persistent()
        except ObjectNotFound:
            if False not in m.exists:
                self._violation(m, "acknowledged object not found by delete")
            m.exists = {False}
        except _OPEN:
            self.stats.open_outcomes += 1
            m.exists = m.exists | {False}
            m.alias_states = m.alias_states | ({False} if m.alias else set())
            return
        else:
            self.stats.acknowledged += 1
            m.exists = {False}
        if m.alias:
            m.alias_states = {False}
        self.objects.remove(m)
        self.deleted.append(m)

    def _checkpoint(self, _) -> None:
        """Force a checkpoint on a random backend, at a random point of the sequence."""
        from store._model import objects

        try:
            objects.get_dispatcher().checkpoint_backend(self.rng.choice(self.cluster.backends))
        except _OPEN:
            self.stats.open_outcomes += 1
            return
        self.stats.acknowledged += 1

    def _alias(self, m: Model) -> None:
        if not m.alias or True not in m.alias_states:
            return
        try:
            store.delete_alias(m.alias)
        except AliasNotFound:
            if False not in m.alias_states:
                self._violation(m, f"acknowledged alias {m.alias!r} not found")
            m.alias_states = {False}
            return
        except _OPEN:
            self.stats.open_outcomes += 1
            m.alias_states = {True, False}
            return
        self.stats.acknowledged += 1
        m.alias_states = {False}

    # -- checks -----------------------------------------------------------------------
    def check(self, killed: bool) -> None:
        """Every object against the model (the cluster is whole and quiet)."""
        if killed or self.stats.kills != self._kills_seen:
            self._after_kill()
        for m in list(self.objects) + list(self.deleted):
            self.stats.checks += 1
            try:
                seen = m.proxy.get() if m.kind == "counter" else m.proxy.values()
            except ObjectNotFound:
                if False not in m.exists:
                    self._violation(m, "acknowledged object lost")
                m.exists = {False}
            else:
                self._observe(m, seen)
                if True in m.exists:
                    loc = m.proxy.get_location()
                    if loc not in self.cluster.backends:
                        self._violation(m, f"located on unknown backend {loc}")
            if m.alias:
                self._check_alias(m)

    def _check_alias(self, m: Model) -> None:
        try:
            found = store.get_by_alias(m.alias).getID()
        except (AliasNotFound, ObjectNotFound):
            if m.alias_states == {True} and m.exists == {True}:
                self._violation(m, f"acknowledged alias {m.alias!r} lost")
            m.alias_states = {False}
            return
        if False not in m.exists and found != m.proxy.getID():
            self._violation(m, f"alias {m.alias!r} names {found}")
        if m.alias_states == {False}:
            self._violation(m, f"deleted alias {m.alias!r} came back")

    def _violation(self, m: Model, what: str) -> None:
        self.stats.violations.append(f"{self.name} {m.kind} {m.proxy.getID()}: {what} (recent: {' '.join(m.log)})")


class Killer:
    """kill -9 a random backend at a random moment of each round, then restart it."""

    def __init__(self, rng: random.Random, cluster: LocalCluster, stats: Stats):
        self.rng = rng
        self.cluster = cluster
        self.stats = stats

    def round(self, ops: int, stop: threading.Event) -> None:
        """Kill at a random operation of this round (``ops`` operations in all)."""
        if self.rng.random() < 0.15:
            return  # some rounds run without a kill
        target = self.stats.operations + self.rng.randrange(1, max(2, ops))
        while self.stats.operations < target:
            if stop.wait(0.002):
                return
        import chaos

        victim = self.rng.choice(self.cluster.backends)
        chaos.kill_backend(self.cluster, victim)
        self.stats.kills += 1
        time.sleep(self.rng.uniform(0.0, 0.3))
        chaos.start_backend(self.cluster, victim)
        self.stats.restarts += 1


def run_sequence(cluster: LocalCluster, seed: int, rounds: int, ops: int, workers: int, stats: Stats) -> None:
    """One seeded sequence of rounds on ``cluster``; violations are added to ``stats``."""
    from conftest import validate_backends

    master = random.Random(seed)
    crew = [Worker(f"w{seed}.{i}", random.Random(master.getrandbits(64)), cluster, stats) for i in range(workers)]
    killer = Killer(random.Random(master.getrandbits(64)), cluster, stats)
    for _ in range(rounds):
        stop = threading.Event()
        kills = stats.kills
        for w in crew:
            w.begin_round()
        threads = [threading.Thread(target=_run_worker, args=(w, ops, stats), daemon=True) for w in crew]
        for t in threads:
            t.start()
        kt = threading.Thread(target=killer.round, args=(ops * workers, stop), daemon=True)
        kt.start()
        for t in threads:
            t.join(300)
        stop.set()
        kt.join(120)
        for w in crew:
            w.check(killed=stats.kills > kills)
        # Write-behind objects reach their checkpoints before the next round begins.
        for b in cluster.backends:
            cluster.client.checkpoint_backend(b)
        try:
            validate_backends(cluster)
        except AssertionError as exc:
            stats.violations.append(f"seed {seed}: {exc}")
    stats.sequences += 1


def _run_worker(worker: Worker, ops: int, stats: Stats) -> None:
    for _ in range(ops):
        try:
            worker.step()
        except ObjectMoved as exc:
            stats.violations.append(f"{worker.name}: a call did not follow a move: {exc}")
        except ClaypotError as exc:
            stats.violations.append(f"{worker.name}: unexpected {type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - every surprise is a finding
            stats.violations.append(f"{worker.name}: {type(exc).__name__}: {exc}")
