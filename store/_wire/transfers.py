"""Progress of long transfers: bytes and rate, shown when asked.

    with store.show_transfers():          # or show_transfers(min_bytes=256 * 2**20)
        big.make_persistent()             # a bar: bytes sent, MB/s
        data = big.data                   # a bar: bytes received

Off by default: a transfer shows a bar only inside ``show_transfers()`` in
the thread that starts it, and only when it moves at least ``min_bytes``.
The bar is tqdm's (the ``claypot[progress]`` extra): text in a terminal, a
widget in Jupyter.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

from store.errors import ConfigurationError

_local = threading.local()
DEFAULT_MIN_BYTES = 64 * 1024 * 1024


@contextmanager
def show_transfers(min_bytes: int = DEFAULT_MIN_BYTES, file: Any = None) -> Iterator[None]:
    """Within this block, this thread's transfers of ``min_bytes`` or more show progress."""
    try:
        import tqdm.auto  # noqa: F401
    except ImportError:
        raise ConfigurationError("transfer progress needs tqdm: pip install 'claypot[progress]'") from None
    previous = getattr(_local, "options", None)
    _local.options = (min_bytes, file)
    try:
        yield
    finally:
        _local.options = previous


class Meter:
    """A progress bar of bytes moved; ``add(n)`` as they move, ``close()`` at the end."""

    def __init__(self, total: int, desc: str, file: Any = None):
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=file,
            dynamic_ncols=True,
            mininterval=0.2,
        )
        self._lock = threading.Lock()  # a stream may be consumed by a gRPC thread

    def add(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        with self._lock:
            self._bar.close()


def meter(total: int, desc: str) -> Meter | None:
    """A Meter for a transfer of ``total`` bytes if this thread asked for progress, else None."""
    options = getattr(_local, "options", None)
    if options is None or total < options[0]:
        return None
    return Meter(total, desc, options[1])
