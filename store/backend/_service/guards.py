"""Checks a backend applies to whatever arrives, token or not.

- ``StreamIdleGuard`` cancels a client stream that stops sending: without it
  a caller that opens ``PersistStream`` or ``CallStream`` and goes silent
  would hold one of the server's threads for ever.
- ``check_name`` refuses identifiers (aliases, object ids, code keys) that are
  huge or hold control characters or the directory's separator, before they
  reach Redis or a log line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from store.errors import ProtocolError

log = logging.getLogger("claypot.backend")

MAX_NAME = 1024  # characters in an alias, object id or code key


def check_name(what: str, value: str, allow_empty: bool = False) -> str:
    """``value`` if it is a usable identifier, else ProtocolError naming ``what``."""
    if not value:
        if allow_empty:
            return value
        raise ProtocolError(f"{what} is empty")
    if len(value) > MAX_NAME:
        raise ProtocolError(f"{what} is {len(value)} characters long (at most {MAX_NAME})")
    if "|" in value or not value.isprintable():
        raise ProtocolError(f"{what} {value[:40]!r} holds a control character or '|'")
    return value


class _Watchdog:
    """One thread that cancels calls whose stream has been silent past their deadline."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._calls: dict[int, tuple[float, grpc.ServicerContext]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.cancelled = 0

    def touch(self, key: int, context: grpc.ServicerContext) -> None:
        deadline = time.monotonic() + self.timeout
        with self._lock:
            self._calls[key] = (deadline, context)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-watchdog", daemon=True)
                self._thread.start()

    def done(self, key: int) -> None:
        with self._lock:
            self._calls.pop(key, None)

    def _run(self) -> None:
        tick = max(0.05, min(0.5, self.timeout / 4))
        while True:
            time.sleep(tick)
            now = time.monotonic()
            with self._lock:
                stale = [(k, c) for k, (d, c) in self._calls.items() if d < now]
                for k, _ in stale:
                    del self._calls[k]
            for _, context in stale:
                self.cancelled += 1
                log.warning("cancelling a stream that sent nothing for %.0fs", self.timeout)
                context.cancel()


class _Watched:
    """A request iterator whose silence the watchdog measures (re-armed per message)."""

    def __init__(self, it: Iterator, context: grpc.ServicerContext, dog: _Watchdog) -> None:
        self._it, self._context, self._dog = it, context, dog
        self._key = id(self)
        dog.touch(self._key, context)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            item = next(self._it)
        except BaseException:
            self._dog.done(self._key)
            raise
        self._dog.touch(self._key, self._context)
        return item

    def close(self) -> None:
        self._dog.done(self._key)


class StreamIdleGuard(grpc.ServerInterceptor):
    """Cancels client-streaming calls that send nothing for ``timeout`` seconds."""

    def __init__(self, timeout: float):
        self.dog = _Watchdog(timeout)

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or not handler.request_streaming or handler.response_streaming:
            return handler
        inner, dog = handler.stream_unary, self.dog

        def guarded(request_iterator, context):
            watched = _Watched(request_iterator, context, dog)
            try:
                return inner(watched, context)
            finally:
                watched.close()

        return grpc.stream_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


__all__ = ["StreamIdleGuard", "check_name", "MAX_NAME"]
