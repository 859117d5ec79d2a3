"""The servicer's error boundary: where an exception becomes an answer.

Every RPC of the Backend service ends one of two ways when something raises:

* :func:`replies` (the claypot RPCs): the exception travels inside the reply,
  as the ``error`` field of the RPC's reply message
  (:func:`store._wire.wire.error_to_pb`), so a claypot error keeps its name and a
  user exception keeps its type and traceback. gRPC status codes stay for
  transport problems and the token check.
* :func:`aborts` (the cross-language RPCs): the call ends with the gRPC status
  of :data:`store._wire.polyglot.STATUS_BY_CODE` and the error code (and the remote
  type) in trailing metadata.

An exception that is not a :class:`store.errors.ClaypotError` and does not
come from user code is a fault of the backend: it gets the same reply as
before (``RemoteError`` with its type and traceback) and its traceback is
logged here, once. User code's exceptions (a method or task that raised) are
the caller's business: logged at debug level only.

Handlers that do real work on failure (give back segments, count a failed
call, forget a dangling entry) stay in the RPC as a narrow ``except`` that
re-raises, or a ``finally``. The wrappers cost one extra frame per call and
nothing else: no allocation unless something raised.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from store._wire import polyglot, wire
from store.errors import ClaypotError
from store._wire.generated import claypot_pb2 as pb

log = logging.getLogger("claypot.backend")

F = TypeVar("F", bound=Callable[..., Any])


def _note(exc: BaseException, rpc: str, user_code: bool) -> None:
    """Log an exception that is not a typed claypot error, once, where it is answered."""
    if isinstance(exc, ClaypotError):
        return
    if user_code:
        log.debug("%s: user code raised %s", rpc, type(exc).__name__, exc_info=exc)
    else:
        log.error("%s failed unexpectedly", rpc, exc_info=exc)


def error_reply(reply_cls: type, exc: BaseException, rpc: str = "", user_code: bool = False) -> Any:
    """``reply_cls`` carrying ``exc`` as its ``error`` field."""
    _note(exc, rpc or reply_cls.__name__, user_code)
    return reply_cls(error=wire.error_to_pb(exc))


def json_error(exc: BaseException, rpc: str = "", user_code: bool = False) -> pb.Error:
    """``exc`` for a client in another language: type, message and traceback, no pickle."""
    _note(exc, rpc, user_code)
    err = wire.error_to_pb(exc)
    err.pickled = b""
    return err


def _boundary(method: F, answer: Callable[[BaseException, str, Any], Any]) -> F:
    """``method`` wrapped: an exception it raises is answered by ``answer(exc, rpc, context)``.

    One frame more per call and nothing else: the try costs nothing until it catches.
    """
    name = method.__name__

    @functools.wraps(method)
    def rpc(self: Any, request: Any, context: Any) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            return answer(exc, name, context)

    return rpc  # type: ignore[return-value]


def replies(reply_cls: type, user_code: bool = False) -> Callable[[F], F]:
    """Decorate a unary RPC: an exception it raises becomes ``reply_cls(error=...)``.

    ``user_code`` marks RPCs whose non-claypot exceptions come from the user's
    methods or tasks (logged at debug level, not as a backend fault).
    """

    def wrap(method: F) -> F:
        return _boundary(method, lambda exc, rpc, _: error_reply(reply_cls, exc, rpc, user_code))

    return wrap


def replies_json(method: F) -> F:
    """Decorate CallJson, the cross-language call whose reply has an ``error`` field.

    The call runs the user's method, so its non-claypot exceptions are the user's.
    """
    return _boundary(method, lambda exc, rpc, _: pb.JsonCallReply(error=json_error(exc, rpc, user_code=True)))


def fail(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the gRPC status and trailers of ``exc``; raises."""
    err = wire.error_to_pb(exc)
    if err.code == "RemoteError":
        # Most often the user's method raised (here or on the owner): worth a line, not
        # a traceback, which the caller receives anyway.
        log.info("cross-language call failed in user code: %s", err.message)
    trailers = [(polyglot.ERROR_CODE_HEADER, err.code)]
    if err.remote_type:
        trailers.append((polyglot.REMOTE_TYPE_HEADER, err.remote_type))
    context.set_trailing_metadata(tuple(trailers))
    context.abort(polyglot.status_of(err), f"{err.code}: {err.message}")
    raise AssertionError("context.abort returned")  # grpc's abort always raises


def aborts(method: F) -> F:
    """Decorate a cross-language RPC: an exception it raises ends the call with a status.

    The RPC may return a reply or, for a server-streaming RPC, an iterator of
    messages (it then runs up to its first message inside the boundary).
    """
    return _boundary(method, lambda exc, _, context: fail(context, exc))


__all__ = ["aborts", "error_reply", "fail", "json_error", "replies", "replies_json"]
