"""The one exception tree of claypot. Users catch these, never a raw grpc.RpcError.

    ClaypotError
    ├── ConfigurationError        bad setting, or no cluster to connect to
    ├── AuthenticationError       missing or wrong token
    ├── ProtocolError             malformed bytes on the wire
    ├── SerializationError        a value that cannot be pickled or unpickled
    │   └── ClassNotFound         a class (or task function) no one can load
    ├── ValueTooLarge             a value over a documented limit
    ├── ObjectError
    │   ├── ObjectNotFound        unknown object id (or deleted)
    │   │   └── ObjectMoved       the object left this backend; the client re-routes
    │   ├── AliasNotFound         unknown alias
    │   ├── AliasExists           alias already taken
    │   ├── NotPersistent         the operation needs a persistent object
    │   ├── AlreadyPersistent     make_persistent on a persistent object
    │   ├── ObjectCorrupt         the object's file is torn or corrupt (quarantined)
    │   ├── ObjectBusy            the operation cannot run while the object is in use
    │                             (moving an object from inside one of its own methods)
    │   ├── InvalidKey            a key or index a sharded collection cannot use
    │   └── NotAVersion           consolidate_version on an object that is not a version
    ├── BackendError
    │   ├── BackendNotFound       unknown backend id
    │   ├── BackendUnavailable    the backend cannot be reached (down, restarting)
    │   ├── CallInterrupted       the connection broke mid-call: the call may have run
    │   │   └── BackendDown       its heartbeat expired (host lost); also a BackendUnavailable
    │   ├── StorageFailed         the backend's disk failed; it acknowledges nothing more
    │   └── DeadlineExceeded      no answer within the call's deadline
    ├── FeatureUnavailable        a documented feature this build does not have (moving a replicated object)
    ├── TaskError
    │   ├── TaskCancelled         a task cancelled because a predecessor failed
    │   └── TaskTimeout           a task ran past its time_out
    ├── CallCancelled             the caller cancelled a running call (Ctrl-C, timeout):
    │                             it stopped, and its object is as before the call
    └── RemoteError               user code raised an exception that cannot be rebuilt here

An exception raised by user code in a remote method is re-raised in the
caller as its own type when it can be unpickled, with the remote traceback
added as a note; only when it cannot is it wrapped in RemoteError.
"""

from __future__ import annotations


class ClaypotError(Exception):
    """Base of every error claypot raises."""


class ConfigurationError(ClaypotError, ValueError):
    """A setting or option is invalid, or there is no cluster to connect to."""


class AuthenticationError(ClaypotError):
    """The backend refused the call: missing or wrong token."""


class ProtocolError(ClaypotError):
    """A peer sent bytes that are not a valid claypot message."""


class SerializationError(ClaypotError):
    """A value could not be pickled or unpickled."""


class ClassNotFound(SerializationError):
    """A class or task function could not be imported nor found in the code registry."""


class ValueTooLarge(ClaypotError):
    """A value exceeds a documented size limit."""


class ObjectError(ClaypotError):
    """Base for errors about one persistent object."""


class ObjectNotFound(ObjectError, LookupError):
    """No persistent object has this id (never existed or was deleted)."""


class ObjectMoved(ObjectNotFound):
    """The object left the backend that was asked (moved); ``moved_to`` names the new owner.

    Clients follow it by themselves: users see it only if the object keeps
    moving faster than calls can follow.
    """

    def __init__(self, message: str, moved_to: str = ""):
        super().__init__(message)
        self.moved_to = moved_to


class AliasNotFound(ObjectError, LookupError):
    """No persistent object has this alias."""


class AliasExists(ObjectError):
    """The alias is already taken by another object."""


class NotPersistent(ObjectError):
    """The operation needs a persistent object, and this one is not."""


class AlreadyPersistent(ObjectError):
    """make_persistent was called on an object that is already persistent."""


class ObjectCorrupt(ObjectError):
    """The object's stored state is torn or corrupt; the object is quarantined."""


class ObjectBusy(ObjectError):
    """The operation cannot run while the object is in use by the same call chain."""


class InvalidKey(ObjectError, TypeError):
    """A key a StorageDict cannot place on a shard, or an index a ShardedArray cannot take."""


class NotAVersion(ObjectError):
    """consolidate_version was called on an object that new_version did not make."""


class FeatureUnavailable(ClaypotError):
    """The call names a feature this claypot does not have yet (for example moving an object that has replicas)."""


class BackendError(ClaypotError):
    """Base for errors about reaching a backend."""


class BackendNotFound(BackendError, LookupError):
    """No backend has this id."""


class BackendUnavailable(BackendError):
    """The backend could not be reached; the call did not run."""


class CallInterrupted(BackendError):
    """The connection broke while the call was in flight: it may have run.

    claypot never re-runs such a call by itself; the caller decides.
    """


class BackendDown(BackendUnavailable, CallInterrupted):
    """The backend's heartbeat expired: its process or its whole host is gone.

    ``backend_id``, ``host`` and ``address`` name it. Raised for calls that
    could not reach it and for calls in flight when it vanished; the latter
    may have run just before it was lost, hence also a CallInterrupted.
    """

    def __init__(self, message: str, backend_id: str = "", host: str = "", address: str = ""):
        super().__init__(message)
        self.backend_id, self.host, self.address = backend_id, host, address

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:
        return type(self), (str(self), self.backend_id, self.host, self.address)


class StorageFailed(BackendError):
    """The backend's storage failed (an fsync error): it acknowledges no further change.

    Nothing is acknowledged after the failure; restart the backend (it
    recovers what was acknowledged before it).
    """


class DeadlineExceeded(BackendError, TimeoutError):
    """No answer arrived within the call's deadline."""


class TaskError(ClaypotError):
    """Base for task runtime errors."""


class TaskCancelled(TaskError):
    """The task was cancelled because a task it depends on failed."""


class TaskTimeout(TaskError, TimeoutError):
    """The task ran longer than its time_out."""


class CallCancelled(ClaypotError):
    """The caller cancelled the call while it ran (Ctrl-C, ``future.cancel()``, a timeout).

    Raised inside the running method at its next bytecode boundary; the object
    goes back to its last acknowledged state, like any method that raises.
    """


class RemoteError(ClaypotError):
    """User code raised an exception that cannot be rebuilt in this process.

    Attributes: ``remote_type`` (qualified name) and ``remote_traceback``.
    """

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = ""):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


def by_code(code: str) -> type[ClaypotError] | None:
    """The error class whose name is ``code`` (as carried in a wire Error)."""
    cls = globals().get(code)
    if isinstance(cls, type) and issubclass(cls, ClaypotError):
        return cls
    return None


__all__ = [
    name for name, value in list(globals().items()) if isinstance(value, type) and issubclass(value, ClaypotError)
] + ["by_code"]
