"""Failover rounds against a real cluster, shared by the replica tests and the soak bench.

One round: a counter with ``replicas=1``; concurrent clients increment it and
read it (every operation recorded in a :class:`histories.History`); at a
moment drawn from a seeded generator the primary is lost, either killed
(``kill -9``, like a lost host) or cut off (``SIGSTOP``: it neither answers
nor renews its heartbeat, like a partition, and ``SIGCONT`` heals it later).
After the round the history must be linearizable (no acknowledged increment
lost, none applied twice, no stale read), and the counter's final value must
match. The failover time is how long the clients' calls stalled around the
loss: the longest operation that overlapped it.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

from histories import UNKNOWN, History, check
from lifelib import Counter
from store.errors import ClaypotError

TTL = 2.0
ENV = {"CLAYPOT_HEARTBEAT_TTL": str(TTL), "CLAYPOT_HEARTBEAT_INTERVAL": "0.25"}


def client_env() -> dict:
    """The settings a test process uses to match the cluster's heartbeat."""
    return dict(ENV)


@dataclass
class RoundStats:
    operations: int = 0
    acknowledged: int = 0
    open_outcome: int = 0
    failovers: int = 0
    failover_seconds: list = field(default_factory=list)
    by_fault: dict = field(default_factory=dict)  # fault -> [failover seconds]
    lost_updates: int = 0
    duplicates: int = 0
    violations: list = field(default_factory=list)

    def as_dict(self) -> dict:
        fs = sorted(self.failover_seconds)
        return {
            "operations": self.operations,
            "acknowledged": self.acknowledged,
            "open_outcome": self.open_outcome,
            "failovers": self.failovers,
            "failover_seconds_max": round(fs[-1], 3) if fs else None,
            "failover_seconds_median": round(fs[len(fs) // 2], 3) if fs else None,
            "failover_seconds_by_fault": self.by_fault,
            "lost_updates": self.lost_updates,
            "duplicates": self.duplicates,
            "violations": self.violations[:5],
        }


def run_round(cluster, seed: int, stats: RoundStats, clients: int = 3, ops: int = 40, fault: str = "kill") -> None:
    """One seeded round (see the module docstring); adds to ``stats``."""
    rng = random.Random(seed)
    ctr = Counter(0)
    ctr.make_persistent(replicas=1)
    oid = ctr.getID()
    history = History()
    primary = cluster.client.resolve(object_id=oid).backend_id
    victim = cluster.process_of(primary)
    lost_at = [0.0]
    kill_after = rng.randint(ops // 4, ops * clients // 2)
    started_ops = [0]
    lock = threading.Lock()

    def worker(i: int):
        r = random.Random(seed * 100 + i)
        proxy = ctr  # one proxy shared by the client threads, as an application would
        for _ in range(ops):
            with lock:
                started_ops[0] += 1
                n = started_ops[0]
            if n == kill_after:
                lose()
            name = "incr" if r.random() < 0.7 else "get"
            op = history.begin(i, name, 1 if name == "incr" else None)
            try:
                result = proxy.incr(1) if name == "incr" else proxy.get()
            except ClaypotError:
                op.result = UNKNOWN  # its outcome is open: it may or may not have run
                continue
            History.done(op, result)
            time.sleep(r.random() * 0.01)

    def lose():
        lost_at[0] = time.monotonic()
        if fault == "kill":
            victim.kill()
        else:
            os.kill(victim.pid, signal.SIGSTOP)
            threading.Timer(TTL * 2.5, lambda: os.kill(victim.pid, signal.SIGCONT)).start()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    final = ctr.get()
    done = [o for o in history.ops if o.result is not UNKNOWN]
    stats.operations += len(history.ops)
    stats.acknowledged += len(done)
    stats.open_outcome += len(history.ops) - len(done)
    if lost_at[0]:
        stats.failovers += 1
        spans = [
            o.end - max(o.start, lost_at[0]) for o in done if o.end >= lost_at[0] and o.start <= lost_at[0] + TTL * 3
        ]
        stats.failover_seconds.append(max(spans) if spans else 0.0)
        stats.by_fault.setdefault(fault, []).append(round(stats.failover_seconds[-1], 3))
    acked_incrs = sum(1 for o in done if o.name == "incr")
    open_incrs = sum(1 for o in history.ops if o.name == "incr" and o.result is UNKNOWN)
    if final < acked_incrs:
        stats.lost_updates += acked_incrs - final
    if final > acked_incrs + open_incrs:
        stats.duplicates += final - acked_incrs - open_incrs
    # The final read closes the history: it must fit too.
    last = history.begin(-1, "get")
    last.start = time.monotonic()
    History.done(last, final)
    why = check(history.ops)
    if why is not None:
        stats.violations.append(f"seed {seed} ({fault}): {why}")
    if fault != "kill":
        # Healed: the old primary steps down, and never serves the object again.
        deadline = time.monotonic() + TTL * 6
        while time.monotonic() < deadline and _holds(cluster, victim, oid):
            time.sleep(0.2)
        if _holds(cluster, victim, oid):
            stats.violations.append(f"seed {seed}: the healed old primary still holds {oid}")


def _holds(cluster, proc, object_id: str) -> bool:
    """Whether ``proc`` still acknowledges changes to ``object_id`` (a direct call to it)."""
    import grpc

    from store._client.client import CHANNEL_OPTIONS, TOKEN_HEADER
    from store._wire.generated import claypot_pb2 as pb
    from store._wire.generated import claypot_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(proc.address, options=CHANNEL_OPTIONS)
    try:
        reply = pb_grpc.BackendStub(channel).Call(
            pb.CallRequest(object_id=object_id, kind=pb.GET_ATTR, name="value", chain_id="probe", call_id="probe"),
            timeout=10,
            metadata=((TOKEN_HEADER, cluster.token),),
        )
    except grpc.RpcError:
        return False
    finally:
        channel.close()
    return not reply.HasField("error")
