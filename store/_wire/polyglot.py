"""What clients in other languages see: typed arrays and gRPC status codes.

Two pure pieces shared by the backend's cross-language RPCs (GetArray,
SetArray, CreateObject, DeleteObject) and by the tests:

* :data:`STATUS_BY_CODE`, the one table from an error code (a class name of
  :mod:`store.errors`, or ``RemoteError``) to the gRPC status code a failed
  call ends with. The README's error table is checked against it.
* :func:`describe_array` / :func:`array_from_bytes`, numpy arrays to and from
  the wire's ``TypedArray`` (dtype name, shape, byte order, raw row-major
  bytes). numpy is imported lazily: the core runs without it, and a typed
  array RPC on a backend without numpy fails with ``SerializationError``.
"""

from __future__ import annotations

from typing import Any
import math
import sys

import grpc

from store import errors
from store.errors import ProtocolError, SerializationError, ValueTooLarge
from store._wire.generated import claypot_pb2 as pb

ERROR_CODE_HEADER = "claypot-error-code"
"""Trailing metadata key of a failed cross-language call: the error code."""
REMOTE_TYPE_HEADER = "claypot-remote-type"
"""Trailing metadata key: the qualified type of a user exception (RemoteError only)."""

# Why these statuses: the code a gRPC-native tool (a load balancer, grpcurl,
# a retry policy) should act on. UNAVAILABLE is the only one a client may
# retry blindly; CallInterrupted is ABORTED because the call may have run.
STATUS_BY_CODE: dict[str, grpc.StatusCode] = {
    "ClaypotError": grpc.StatusCode.INTERNAL,
    "ConfigurationError": grpc.StatusCode.INVALID_ARGUMENT,
    "AuthenticationError": grpc.StatusCode.UNAUTHENTICATED,
    "ProtocolError": grpc.StatusCode.INVALID_ARGUMENT,
    "SerializationError": grpc.StatusCode.INVALID_ARGUMENT,
    "ClassNotFound": grpc.StatusCode.FAILED_PRECONDITION,
    "ValueTooLarge": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "ObjectError": grpc.StatusCode.FAILED_PRECONDITION,
    "ObjectNotFound": grpc.StatusCode.NOT_FOUND,
    "ObjectMoved": grpc.StatusCode.NOT_FOUND,
    "AliasNotFound": grpc.StatusCode.NOT_FOUND,
    "AliasExists": grpc.StatusCode.ALREADY_EXISTS,
    "NotPersistent": grpc.StatusCode.FAILED_PRECONDITION,
    "AlreadyPersistent": grpc.StatusCode.ALREADY_EXISTS,
    "ObjectCorrupt": grpc.StatusCode.DATA_LOSS,
    "ObjectBusy": grpc.StatusCode.FAILED_PRECONDITION,
    "InvalidKey": grpc.StatusCode.INVALID_ARGUMENT,
    "NotAVersion": grpc.StatusCode.FAILED_PRECONDITION,
    "FeatureUnavailable": grpc.StatusCode.UNIMPLEMENTED,
    "BackendError": grpc.StatusCode.UNAVAILABLE,
    "BackendNotFound": grpc.StatusCode.NOT_FOUND,
    "BackendUnavailable": grpc.StatusCode.UNAVAILABLE,
    "BackendDown": grpc.StatusCode.UNAVAILABLE,
    "CallInterrupted": grpc.StatusCode.ABORTED,
    "StorageFailed": grpc.StatusCode.INTERNAL,
    "DeadlineExceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "TaskError": grpc.StatusCode.ABORTED,
    "TaskCancelled": grpc.StatusCode.CANCELLED,
    "TaskTimeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "CallCancelled": grpc.StatusCode.CANCELLED,
    "RemoteError": grpc.StatusCode.UNKNOWN,
}


def check_health(address: str, timeout: float = 5.0, service: str = "") -> str:
    """Ask a backend's standard health service: "SERVING", "NOT_SERVING" or "UNREACHABLE".

    Needs no token (as a load balancer or a container probe would ask); uses
    TLS when CLAYPOT_TLS_CA is set.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from store.config import Settings

    settings = Settings.from_env()
    if settings.tls_ca:
        channel = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=settings.read_pem("tls_ca"))
        )
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def status_of(err: pb.Error) -> grpc.StatusCode:
    """The gRPC status a call failing with ``err`` ends with."""
    return STATUS_BY_CODE.get(err.code, grpc.StatusCode.UNKNOWN)


def error_codes() -> list[str]:
    """Every error code a reply or trailer may carry: store.errors classes and RemoteError."""
    return [name for name in errors.__all__ if name != "by_code"]


# -- typed arrays -------------------------------------------------------------------

DTYPES = (
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)
"""Element types a TypedArray may carry, by numpy name."""

_NATIVE = pb.BYTE_ORDER_LITTLE_ENDIAN if sys.byteorder == "little" else pb.BYTE_ORDER_BIG_ENDIAN


def _numpy():
    try:
        import numpy
    except ImportError:
        raise SerializationError("typed arrays need numpy on the backend (pip install 'claypot[numpy]')") from None
    return numpy


def describe_array(value: Any, what: str, inline_limit: int) -> tuple[pb.TypedArray, Any]:
    """(TypedArray header, contiguous array) for a numpy array or numpy scalar.

    The header carries the data inline when it fits ``inline_limit``;
    otherwise ``chunked`` is set and the caller streams the array's bytes.
    Anything that is not an array of a :data:`DTYPES` type is a
    SerializationError naming ``what``.
    """
    np = _numpy()
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise SerializationError(
            f"{what} is a {type(value).__name__}, not a numpy array (use CallJson for other values)"
        )
    if value.dtype.name not in DTYPES:
        raise SerializationError(
            f"{what} has dtype {value.dtype}, which has no typed-array encoding (supported: {', '.join(DTYPES)})"
        )
    # Row-major is the wire's order: a Fortran-ordered or strided view is
    # copied once here; a C-contiguous array is sent from its own memory.
    value = np.ascontiguousarray(value)
    order = value.dtype.byteorder
    byte_order = pb.BYTE_ORDER_LITTLE_ENDIAN if order == "<" else pb.BYTE_ORDER_BIG_ENDIAN if order == ">" else _NATIVE
    header = pb.TypedArray(dtype=value.dtype.name, shape=list(value.shape), byte_order=byte_order, nbytes=value.nbytes)
    if value.nbytes <= inline_limit:
        header.data = value.tobytes()
    else:
        header.chunked = True
    return header, value


def expected_nbytes(header: pb.TypedArray, max_bytes: int) -> int:
    """Check a received TypedArray header; return the byte count its data must have."""
    np = _numpy()
    if header.dtype not in DTYPES:
        raise ProtocolError(f"unknown dtype {header.dtype!r} (supported: {', '.join(DTYPES)})")
    if header.byte_order not in (pb.BYTE_ORDER_UNSPECIFIED, pb.BYTE_ORDER_LITTLE_ENDIAN, pb.BYTE_ORDER_BIG_ENDIAN):
        raise ProtocolError(f"unknown byte order {header.byte_order}")
    nbytes = math.prod(int(n) for n in header.shape) * np.dtype(header.dtype).itemsize
    if header.nbytes != nbytes:
        raise ProtocolError(
            f"nbytes {header.nbytes} does not match dtype {header.dtype} "
            f"and shape {list(header.shape)} ({nbytes} bytes)"
        )
    if max_bytes and nbytes > max_bytes:
        raise ValueTooLarge(f"array of {nbytes} bytes exceeds the limit of {max_bytes} bytes (max_value_size)")
    if not header.chunked and len(header.data) != nbytes:
        raise ProtocolError(f"inline data has {len(header.data)} bytes, the header announces {nbytes}")
    return nbytes


def array_from_bytes(header: pb.TypedArray, data: Any) -> Any:
    """The numpy array (native byte order, writable) of a header and its data buffer."""
    np = _numpy()
    dtype = np.dtype(header.dtype)
    if dtype.itemsize > 1 and header.byte_order == pb.BYTE_ORDER_BIG_ENDIAN:
        dtype = dtype.newbyteorder(">")
    elif dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<")
    arr = np.frombuffer(data, dtype=dtype).reshape([int(n) for n in header.shape])
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    elif not arr.flags.writeable:
        arr = arr.copy()
    return arr
