"""Progress of long work: a bar counting finished and failed tasks.

Uses tqdm (the ``claypot[progress]`` extra), whose ``tqdm.auto`` draws a
text bar in a terminal and a widget in Jupyter.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from store.errors import ConfigurationError

from runtime._futures import Future


@dataclass(frozen=True)
class ProgressReport:
    """How a set of tasks ended: ``done`` succeeded, ``failed`` raised or were cancelled."""

    total: int
    done: int
    failed: int


def futures_in(obj: Any) -> list[Future]:
    """Every Future in ``obj`` (a Future, or lists, tuples, sets and dict values of them)."""
    out: list[Future] = []
    seen: set[int] = set()

    def walk(x):
        if isinstance(x, Future):
            if id(x) not in seen:
                seen.add(id(x))
                out.append(x)
        elif isinstance(x, (list, tuple, set, frozenset)):
            for item in x:
                walk(item)
        elif isinstance(x, dict):
            for item in x.values():
                walk(item)

    walk(obj)
    return out


def progress(
    futures: Any, timeout: float | None = None, desc: str = "tasks", file: Any = None, interval: float = 0.1
) -> ProgressReport:
    """Show a progress bar until every future in ``futures`` has finished.

    Counts tasks done and failed (a failed task does not stop the bar; its
    error stays with its future for :func:`runtime.wait_on`). ``file`` is
    where a terminal bar is drawn (default: stderr). Raises ``TimeoutError``
    if ``timeout`` seconds pass first.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ConfigurationError("progress bars need tqdm: pip install 'claypot[progress]'") from None
    items = futures_in(futures)
    changed = threading.Event()
    for f in items:
        f.add_done_callback(lambda _f: changed.set())
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=len(items), desc=desc, file=file, unit="task", dynamic_ncols=True)
    shown = 0
    try:
        while True:
            finished = [f for f in items if f.done()]
            failed = sum(1 for f in finished if f.failed())
            if len(finished) != shown:
                bar.update(len(finished) - shown)
                shown = len(finished)
                bar.set_postfix(failed=failed, refresh=True)
            if shown == len(items):
                return ProgressReport(len(items), shown - failed, failed)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(items) - shown} of {len(items)} tasks did not finish within {timeout}s")
            changed.wait(interval)
            changed.clear()
    finally:
        bar.close()


__all__ = ["progress", "ProgressReport", "futures_in"]
