"""The local lane's frames: unary Backend RPCs between processes of one host.

A same-host client reaches a backend over an abstract Unix socket (Linux),
named after the address the backend advertises, instead of gRPC. The request
and reply bytes are the same protobuf messages gRPC would carry; only the
envelope around them differs, and it is this module's. Why a second path
exists (the README's performance notes measure it): on a 2-core host gRPC's
Python machinery (its completion queue, polling thread and pool hand-offs)
costs about 200 µs of CPU on each side of every call, a blocking socket and
one thread per connection about 25 µs.

Abstract socket names live in the network namespace, not on a filesystem: a
name is reachable only from processes in the backend's own namespace (so a
container or a namespace standing for another host never sees it), and it
disappears with the process that bound it (a kill -9 leaves nothing behind).
Names are not owned, though: a client talks only to a lane whose process runs
as root or as its own user (:func:`trusted_peer`), else it uses gRPC.

Frames, all integers little-endian:

- greeting, backend to client, once per connection: ``GREETING`` then one
  byte, 1 (served) or 0 (full: the client uses gRPC instead);
- request: ``u32 length``, then ``u8 len, method name``, ``f64 timeout in
  seconds`` (NaN: none), ``u16 count`` metadata entries, the request bytes;
- reply: ``u32 length``, then ``u8 status code`` (gRPC's numbering; 0 is OK)
  and the reply bytes, or for an error ``u32 len, details``, ``u16 count``
  trailing metadata entries;
- a metadata entry: ``u8 kind`` (0 text, 1 bytes), ``u16 len, key``,
  ``u32 len, value``.

A frame longer than ``MAX_FRAME`` or one that does not parse is a
:class:`store.errors.ProtocolError`; the side that reads it closes the
connection. A request's method, timeout and metadata must fit in its first
``HEAD_LIMIT`` bytes: the backend reads those first and refuses a call without
the token before it reads (and holds) the request bytes, as gRPC's interceptor
runs on the headers before the message arrives.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import struct
from typing import Iterable

from store.errors import ProtocolError

GREETING = b"CPLANE1"
SERVED, FULL = b"\x01", b"\x00"
# gRPC's largest message (transport.MAX_MESSAGE) plus room for the envelope.
MAX_FRAME = 16 * 1024 * 1024 + 64 * 1024
OK = 0
_MAX_NAME = 107  # sun_path holds 108 bytes
_FIRST_READ = 64 * 1024
# Most bytes of a request's method, timeout and metadata (gRPC's default metadata limit is 8 KiB).
HEAD_LIMIT = 16 * 1024

_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_F64 = struct.Struct("<d")
_ENTRY = struct.Struct("<BH")


def socket_name(address: str) -> bytes:
    """The abstract socket name of the lane of the backend advertised at ``address``
    (a digest of it when the address is too long for a socket name)."""
    name = b"\0claypot-lane:" + address.encode("utf-8", "replace")
    if len(name) > _MAX_NAME:
        name = b"\0claypot-lane#" + hashlib.sha256(address.encode("utf-8", "replace")).hexdigest().encode()
    return name


def trusted_peer(sock: socket.socket) -> bool:
    """Whether the process at the other end of a lane connection runs as root or as
    this process's own user (``SO_PEERCRED``).

    Abstract socket names are first come, first served: a process of another
    user could bind a backend's name while the backend is down, and a client
    must not send it the cluster's token. Where the credentials cannot be
    read, nothing is trusted.
    """
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):
        return False
    return uid in (0, os.geteuid())


def _metadata(entries: Iterable[tuple[str, str | bytes]] | None) -> list[bytes]:
    parts: list[bytes] = []
    count = 0
    for key, value in entries or ():
        raw_key = key.encode("ascii")
        if isinstance(value, str):
            kind, raw = 0, value.encode("utf-8")
        else:
            kind, raw = 1, bytes(value)
        parts += (_ENTRY.pack(kind, len(raw_key)), raw_key, _U32.pack(len(raw)), raw)
        count += 1
    return [_U16.pack(count)] + parts


def _read_metadata(body: memoryview, at: int) -> tuple[tuple, int]:
    (count,) = _U16.unpack_from(body, at)
    at += 2
    entries: list[tuple[str, str | bytes]] = []
    for _ in range(count):
        kind, klen = _ENTRY.unpack_from(body, at)
        at += _ENTRY.size
        key = bytes(body[at : at + klen]).decode("ascii")
        at += klen
        (vlen,) = _U32.unpack_from(body, at)
        at += 4
        if at + vlen > len(body) or len(key) != klen:
            raise ProtocolError("lane frame: a metadata entry runs past the frame")
        raw = bytes(body[at : at + vlen])
        at += vlen
        if kind == 0:
            entries.append((key, raw.decode("utf-8")))
        elif kind == 1:
            entries.append((key, raw))
        else:
            raise ProtocolError(f"lane frame: unknown metadata kind {kind}")
    return tuple(entries), at


def request_frame(
    method: str, timeout: float | None, metadata: Iterable[tuple[str, str | bytes]] | None, request: bytes
) -> list[bytes]:
    """A request frame as parts to send together (the request bytes are not copied)."""
    name = method.encode("ascii")
    head = [bytes((len(name),)), name, _F64.pack(math.nan if timeout is None else timeout)]
    head += _metadata(metadata)
    if sum(len(p) for p in head) > HEAD_LIMIT:
        raise ProtocolError(f"lane frame: method and metadata exceed {HEAD_LIMIT} bytes")
    length = sum(len(p) for p in head) + len(request)
    if length > MAX_FRAME:
        raise ProtocolError(f"lane frame of {length} bytes exceeds {MAX_FRAME}")
    return [_U32.pack(length), *head, request]


def parse_request_head(head: bytes | bytearray | memoryview) -> tuple[str, float | None, tuple, int]:
    """(method, timeout or None, metadata, where the request bytes start) of a request
    frame's body, or of its first ``HEAD_LIMIT`` bytes."""
    view = memoryview(head)
    try:
        n = view[0]
        method = bytes(view[1 : 1 + n]).decode("ascii")
        if len(method) != n or not method.isidentifier():
            raise ProtocolError("lane frame: bad method name")
        (timeout,) = _F64.unpack_from(view, 1 + n)
        metadata, at = _read_metadata(view, 1 + n + 8)
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"lane frame: truncated or malformed request ({exc})") from None
    if math.isnan(timeout):
        return method, None, metadata, at
    if not (math.isfinite(timeout) and timeout >= 0):
        raise ProtocolError(f"lane frame: bad timeout {timeout}")
    return method, timeout, metadata, at


def ok_frame(reply: bytes) -> list[bytes]:
    """A successful reply frame, as parts to send together."""
    return [_U32.pack(1 + len(reply)), b"\x00", reply]


def error_frame(code: int, details: str, trailing: Iterable[tuple[str, str | bytes]] | None) -> list[bytes]:
    """A failed reply frame: gRPC status ``code`` (not 0), its details and trailing metadata."""
    raw = (details or "").encode("utf-8", "replace")
    parts = [bytes((code,)), _U32.pack(len(raw)), raw, *_metadata(trailing)]
    return [_U32.pack(sum(len(p) for p in parts)), *parts]


def parse_reply(body: bytes | bytearray | memoryview) -> tuple[int, memoryview | None, str, tuple]:
    """(status code, reply bytes or None, details, trailing metadata) of a reply frame's body."""
    view = memoryview(body)
    try:
        code = view[0]
        if code == OK:
            return OK, view[1:], "", ()
        (n,) = _U32.unpack_from(view, 1)
        details = bytes(view[5 : 5 + n]).decode("utf-8", "replace")
        trailing, _ = _read_metadata(view, 5 + n)
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"lane frame: truncated or malformed reply ({exc})") from None
    return code, None, details, trailing


def frame_length(head: bytes | bytearray) -> int:
    """The body length a frame's 4-byte head announces (checked against MAX_FRAME)."""
    (length,) = _U32.unpack(head)
    if length == 0 or length > MAX_FRAME:
        raise ProtocolError(f"lane frame of {length} bytes (the limit is {MAX_FRAME})")
    return length


def read_reply(sock: socket.socket) -> bytes | bytearray | None:
    """A reply frame's body, read for a caller that has exactly one reply coming:
    its first read takes the head and (usually) the whole body in one system call.
    Bytes past the frame are a ProtocolError (a backend sends nothing unasked)."""
    first = sock.recv(_FIRST_READ)
    if not first:
        return None
    if len(first) < 4:
        rest = recv_exact(sock, 4 - len(first), allow_eof=False)
        first += rest or b""
    length = frame_length(first[:4])
    if len(first) - 4 > length:
        raise ProtocolError("lane frame: bytes past the end of a reply")
    return read_rest(sock, length, first[4:])


def read_request_head(sock: socket.socket) -> tuple[int, bytes | bytearray] | None:
    """A request frame's length and its first ``min(length, HEAD_LIMIT)`` body bytes
    (see :func:`parse_request_head`); None on a clean end of stream before it."""
    head = recv_exact(sock, 4, allow_eof=True)
    if head is None:
        return None
    length = frame_length(head)
    first = recv_exact(sock, min(length, HEAD_LIMIT), allow_eof=False)
    assert first is not None
    return length, first


def read_rest(sock: socket.socket, length: int, first: bytes | bytearray) -> bytes | bytearray:
    """The whole body of a frame of ``length`` bytes whose ``first`` bytes were read."""
    if len(first) == length:
        return first
    buf = bytearray(length)
    view = memoryview(buf)
    got = len(first)
    view[:got] = first
    while got < length:
        k = sock.recv_into(view[got:], length - got)
        if k == 0:
            raise ConnectionError("the lane's connection closed inside a frame")
        got += k
    return buf


def skip(sock: socket.socket, n: int) -> None:
    """Read and drop ``n`` bytes (the rest of a refused frame) without holding them."""
    scratch = bytearray(min(n, 64 * 1024))
    while n > 0:
        k = sock.recv_into(scratch, min(n, len(scratch)))
        if k == 0:
            raise ConnectionError("the lane's connection closed inside a frame")
        n -= k


def recv_exact(sock: socket.socket, n: int, allow_eof: bool = False) -> bytes | bytearray | None:
    """Exactly ``n`` bytes; with ``allow_eof`` None on an end of stream before the first
    of them (else, and inside them, ConnectionError)."""
    first = sock.recv(n)
    if not first:
        if allow_eof:
            return None
        raise ConnectionError("the lane's connection closed inside a frame")
    return read_rest(sock, n, first)
