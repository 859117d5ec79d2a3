"""The dependency graph: a pure, I/O-free core.

It knows task ids and the keys of the objects each task reads or writes,
nothing about functions, futures, backends or threads, so it can be tested
and reasoned about on its own. The runtime calls it under one lock.

Rules, for each object key:

- a reader runs after the last writer;
- a writer runs after the last writer and after every reader since then
  (readers between two writers run in parallel);
- a task runs after every task whose future it takes.

Finished tasks leave the graph at once, so its size is the number of tasks
not yet finished, whatever the length of the program.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Iterable


class _Node:
    __slots__ = ("waiting", "successors", "reads", "writes")

    def __init__(self, reads: tuple[Hashable, ...], writes: tuple[Hashable, ...]):
        self.waiting: set[int] = set()  # unfinished predecessors
        self.successors: set[int] = set()
        self.reads = reads
        self.writes = writes


class TaskGraph:
    """Unfinished tasks and the order between them (see the module docstring)."""

    def __init__(self) -> None:
        self._nodes: dict[int, _Node] = {}
        self._writer: dict[Hashable, int] = {}  # key -> last unfinished writer
        self._readers: dict[Hashable, set[int]] = {}  # key -> unfinished readers since

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._nodes

    def add(
        self,
        task_id: int,
        after: Iterable[int] = (),
        reads: Iterable[Hashable] = (),
        writes: Iterable[Hashable] = (),
        early: Iterable[Hashable] = (),
    ) -> bool:
        """Add a task; True when it can run at once (nothing unfinished before it).

        ``early`` keys are written to a private version: the task waits for their
        last writer only, not for their readers, and is not itself their writer
        (the task that writes the version back is, see Runtime's task versions).
        """
        if task_id in self._nodes:
            raise ValueError(f"task {task_id} is already in the graph")
        writes = tuple(dict.fromkeys(writes))
        reads = tuple(k for k in dict.fromkeys(reads) if k not in writes)
        node = _Node(reads, writes)
        deps = {t for t in after if t in self._nodes}
        for key in reads:
            w = self._writer.get(key)
            if w is not None:
                deps.add(w)
            self._readers.setdefault(key, set()).add(task_id)
        for key in writes:
            w = self._writer.get(key)
            if w is not None:
                deps.add(w)
            deps |= self._readers.pop(key, set())
            self._writer[key] = task_id
        for key in early:
            w = self._writer.get(key)
            if w is not None:
                deps.add(w)
        deps.discard(task_id)
        node.waiting = deps
        for d in deps:
            self._nodes[d].successors.add(task_id)
        self._nodes[task_id] = node
        return not deps

    def predecessors(self, task_id: int) -> set[int]:
        """Unfinished tasks that ``task_id`` still waits for."""
        return set(self._nodes[task_id].waiting)

    def last_writer(self, key: Hashable) -> int | None:
        """The unfinished task that writes ``key`` last, if any."""
        return self._writer.get(key)

    def users(self, key: Hashable) -> set[int]:
        """Unfinished tasks that read or write ``key``."""
        out = set(self._readers.get(key, ()))
        w = self._writer.get(key)
        if w is not None:
            out.add(w)
        return out

    def finish(self, task_id: int) -> list[int]:
        """Mark a task done; returns the tasks that became ready, in submission order."""
        node = self._remove(task_id)
        ready = []
        for s in node.successors:
            succ = self._nodes.get(s)
            if succ is None:
                continue
            succ.waiting.discard(task_id)
            if not succ.waiting:
                ready.append(s)
        ready.sort()
        return ready

    def cancel_successors(self, task_id: int) -> list[int]:
        """Mark a task failed and drop every task that depends on it, directly or not.

        Returns the dropped tasks (in submission order); their other predecessors
        no longer count them as successors.
        """
        node = self._remove(task_id)
        dropped: list[int] = []
        queue = deque(node.successors)
        while queue:
            t = queue.popleft()
            if t not in self._nodes:
                continue
            succ = self._remove(t)
            dropped.append(t)
            queue.extend(succ.successors)
        dropped.sort()
        return dropped

    def _remove(self, task_id: int) -> _Node:
        node = self._nodes.pop(task_id)
        for p in node.waiting:
            pred = self._nodes.get(p)
            if pred is not None:
                pred.successors.discard(task_id)
        for key in node.writes:
            if self._writer.get(key) == task_id:
                del self._writer[key]
        for key in node.reads:
            readers = self._readers.get(key)
            if readers is not None:
                readers.discard(task_id)
                if not readers:
                    del self._readers[key]
        return node
