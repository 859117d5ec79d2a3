"""Retry with capped exponential backoff, for errors that are safe to retry.

Only errors raised *before* a call could run are retryable (the backend
refused the connection, or it answered that the object lives elsewhere).
A method call whose connection broke mid-flight is never retried here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
import random
import time
from dataclasses import dataclass


@dataclass
class Backoff:
    """Exponential backoff with full jitter, capped at ``cap`` seconds."""

    base: float = 0.02
    cap: float = 0.5

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * (2**attempt)))


class Retry:
    """Retry ``fn`` on ``retryable`` errors until ``timeout`` seconds have passed.

    ``on_retry(exc)`` runs before each new attempt (e.g. to refresh an address).
    The last error is re-raised when time is up.
    """

    def __init__(self, timeout: float, retryable: tuple[type[BaseException], ...], backoff: Backoff | None = None):
        self.timeout = timeout
        self.retryable = retryable
        self.backoff = backoff or Backoff()

    def run(self, fn: Callable[[], Any], on_retry: Callable[..., Any] | None = None) -> Any:
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            try:
                return fn()
            except self.retryable as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                time.sleep(min(remaining, self.backoff.delay(attempt)))
                attempt += 1
                if on_retry is not None:
                    on_retry(exc)
