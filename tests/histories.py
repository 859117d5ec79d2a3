"""A small linearizability checker for the histories the replica fault tests record.

Each client operation is recorded with its start and end (``time.monotonic``)
and its result. An operation whose outcome is unknown (it failed with an
error that leaves open whether it ran) may take effect at any point after
its start, or never. :func:`check` searches for one sequential order of the
operations, consistent with their real-time order, under which every
result is what a single copy of the object would have returned (the search
of Wing and Gong, with the memo of visited (done set, state) pairs that
Lowe added to keep it small). Returns None when one exists, else a message.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

UNKNOWN = object()  # the result of an operation whose outcome is open


@dataclass
class Op:
    client: int
    name: str  # "incr" | "get" (counter), "set" | "get" (register)
    arg: Any
    start: float
    end: float = math.inf  # inf: outcome unknown (may or may not have happened)
    result: Any = UNKNOWN


class History:
    """Thread-safe recorder of operations."""

    def __init__(self):
        self.ops: list[Op] = []
        self._lock = threading.Lock()

    def begin(self, client: int, name: str, arg=None) -> Op:
        op = Op(client, name, arg, time.monotonic())
        with self._lock:
            self.ops.append(op)
        return op

    @staticmethod
    def done(op: Op, result) -> None:
        op.end, op.result = time.monotonic(), result

    @staticmethod
    def failed_definitely(op: Op, ops: "History") -> None:
        """The operation did not happen (an error that guarantees it did not run)."""
        with ops._lock:
            ops.ops.remove(op)


def counter_step(state: int, op: Op):
    """(new state, expected result) of a counter: incr(by) returns the new value."""
    if op.name == "incr":
        return state + op.arg, state + op.arg
    if op.name == "get":
        return state, state
    raise ValueError(op.name)


def check(ops: list[Op], step: Callable = counter_step, initial=0) -> str | None:
    """None if ``ops`` is linearizable for the sequential model ``step``; else why not."""
    ops = sorted(ops, key=lambda o: o.start)
    n = len(ops)
    required = frozenset(i for i, o in enumerate(ops) if o.end != math.inf)
    seen: set = set()
    stack = [(frozenset(), initial)]
    while stack:
        done, state = stack.pop()
        if required <= done:
            return None
        key = (done, state)
        if key in seen:
            continue
        seen.add(key)
        # The earliest end among operations not yet placed bounds which may go next.
        horizon = min((ops[i].end for i in range(n) if i not in done), default=math.inf)
        for i in range(n):
            if i in done:
                continue
            o = ops[i]
            if o.start > horizon:
                break
            new, expected = step(state, o)
            if o.result is not UNKNOWN and o.result != expected:
                continue
            stack.append((done | {i}, new))
    return (
        f"no linearization of {n} operations ({len(required)} completed) matches the "
        f"results: searched {len(seen)} states"
    )
