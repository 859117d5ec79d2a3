"""Stopping a running method or task from outside its thread.

A backend runs each call in a thread of its gRPC server. When the caller gives
up (Ctrl-C, ``future.cancel()``, a client-side deadline) it sends ``Cancel``
with the call's ``call_id``; a task past its ``time_out`` is stopped the same
way by a timer. Python offers one way to stop another thread's code:
``PyThreadState_SetAsyncExc``, which raises an exception in that thread at its
next bytecode boundary. Code blocked inside C (a long ``time.sleep``, a C
extension's loop) sees it only when it returns to Python bytecode: a limit
the README states.

The exception is armed only while user code runs (``armed()`` around the
method or task function), never while the heap stores or rolls back: the
heap's own ``except BaseException`` then rolls the object back to its last
acknowledged state and releases its lock, as for any method that raises.
"""

from __future__ import annotations

from collections.abc import Iterator
import ctypes
import threading
from contextlib import contextmanager

from store.errors import CallCancelled, TaskTimeout

_api = ctypes.pythonapi.PyThreadState_SetAsyncExc  # (thread id, exception type or NULL)

_mu = threading.Lock()
_armed: dict[str, int] = {}  # call id -> ident of the thread running it
_fired: dict[int, type] = {}  # thread ident -> exception type sent to it
_local = threading.local()
# Cancels that came before their call started running (it waited for its
# object's lock, or was still on the way): refused when it starts. Call ids are
# unique, so a cancel for a call that already finished only sits here until
# it expires.
_early: dict[str, float] = {}
_EARLY_TTL = 120.0
_EARLY_MAX = 10000


def set_current(call_id: str | None) -> None:
    """Name the call the current server thread is about to run (None when done)."""
    _local.call_id = call_id


def current() -> str | None:
    return getattr(_local, "call_id", None)


def _fire(ident: int, exc: type) -> bool:
    # Caller holds _mu, and the target thread is armed (inside user code).
    if ident in _fired:
        return True
    if _api(ctypes.c_ulong(ident), ctypes.py_object(exc)) != 1:
        return False
    _fired[ident] = exc
    return True


def cancel(call_id: str) -> bool:
    """Raise CallCancelled in the call ``call_id`` if it runs user code here now.

    Returns False if it does not; should it start later (it waited for its
    object's lock), it is refused as it starts.
    """
    import time

    with _mu:
        ident = _armed.get(call_id)
        if ident is not None:
            return _fire(ident, CallCancelled)
        if call_id:
            now = time.monotonic()
            if len(_early) >= _EARLY_MAX:
                for k in [k for k, t in _early.items() if now - t > _EARLY_TTL] or list(_early)[: _EARLY_MAX // 10]:
                    _early.pop(k, None)
            _early[call_id] = now
        return False


@contextmanager
def armed(what: str, timeout: float = 0.0) -> Iterator[None]:
    """Let the current call be cancelled while the body runs; stop it after ``timeout`` s.

    Re-entrant: a nested in-process call keeps the outer arming. Converts the
    bare exception raised into the thread into one whose message says what
    happened.
    """
    ident = threading.get_ident()
    key = current() or f"thread:{ident}"
    with _mu:
        nested = _armed.get(key) == ident
        if not nested:
            if _early and _early.pop(key, None) is not None:
                raise CallCancelled(f"{what} was cancelled by its caller before it started")
            _armed[key] = ident
    timer = None
    if timeout and timeout > 0 and not nested:

        def expire():
            with _mu:
                if _armed.get(key) == ident:
                    _fire(ident, TaskTimeout)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
    try:
        yield
    except (CallCancelled, TaskTimeout) as exc:
        if exc.args:
            raise
        if isinstance(exc, TaskTimeout):
            raise TaskTimeout(
                f"{what} ran past its time_out of {timeout:g}s and was stopped; its changes were rolled back"
            ) from None
        raise CallCancelled(f"{what} was cancelled by its caller; its changes were rolled back") from None
    finally:
        if timer is not None:
            timer.cancel()
        if not nested:
            with _mu:
                _armed.pop(key, None)
                if _fired.pop(ident, None) is not None:
                    # Sent but maybe not delivered yet: withdraw it (NULL clears),
                    # so it cannot land in the heap's bookkeeping after the body.
                    _api(ctypes.c_ulong(ident), None)


__all__ = ["armed", "cancel", "set_current", "current"]
