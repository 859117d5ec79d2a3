"""Values on the wire: inline for small ones, streamed in chunks for large ones.

A value is small when its pickle stream plus out-of-band buffers fit in
``inline_limit``; it then rides inside its unary message. A larger value is
sent as a stream: a header message (with the sizes of its blobs) and then the
raw bytes in ``chunk_size`` pieces. The receiver preallocates every blob and
copies each chunk straight into place, so a 3 GiB array costs one buffer on
each side, never a whole-message copy.
"""

from __future__ import annotations

import pickle
from typing import Iterable, Iterator, Sequence

from .errors import ProtocolError, ValueTooLarge
from .generated import claypot_pb2 as pb


def total_size(payload: bytes, buffers: Sequence) -> int:
    return len(payload) + sum(memoryview(b).nbytes for b in buffers)


def inline_value(payload: bytes, buffers: Sequence) -> pb.Value:
    """A Value carrying everything inline (small values only)."""
    return pb.Value(payload=payload, buffers=[memoryview(b).cast("B").tobytes() for b in buffers])


def streamed_value(payload: bytes, buffers: Sequence) -> tuple[pb.Value, list]:
    """A Value header for streaming, and the blobs to send after it, in order."""
    blobs = [payload] + list(buffers)
    value = pb.Value(buffer_sizes=[memoryview(b).nbytes for b in blobs])
    return value, blobs


def value_parts(value: pb.Value) -> tuple[bytes, list]:
    """(payload, buffers) of an inline Value."""
    return value.payload, list(value.buffers)


def chunk_stream(header: bytes, blobs: Iterable, chunk_size: int) -> Iterator[pb.Chunk]:
    """The header chunk, then every blob cut in ``chunk_size`` pieces."""
    yield pb.Chunk(header=header)
    for blob in blobs:
        view = memoryview(blob).cast("B")
        for start in range(0, view.nbytes, chunk_size):
            yield pb.Chunk(data=view[start:start + chunk_size].tobytes())


def streamed_values(message) -> list[pb.Value]:
    """The streamed Values inside a header message, in wire order."""
    if isinstance(message, pb.PersistRequest):
        return [o.state for o in message.objects if not o.state.payload]
    if isinstance(message, pb.CallRequest):
        return [message.args] if not message.args.payload else []
    if isinstance(message, pb.CallReply):
        return [message.result] if not message.result.payload else []
    raise ProtocolError(f"cannot stream a {type(message).__name__}")


class Assembler:
    """Rebuilds the blobs of a streamed message from its data chunks.

    ``feed`` copies each chunk into preallocated bytearrays; ``finish``
    checks every byte arrived and returns, per streamed Value, its
    (payload, buffers) with buffers as writable memoryviews.
    """

    def __init__(self, values: list[pb.Value], max_bytes: int):
        sizes = [n for v in values for n in v.buffer_sizes]
        total = sum(sizes)
        if max_bytes and total > max_bytes:
            raise ValueTooLarge(
                f"value of {total} bytes exceeds the limit of {max_bytes} bytes (max_value_size)")
        self._values = values
        self._blobs = [bytearray(n) for n in sizes]
        self._index = 0
        self._offset = 0
        self.received = 0
        self.expected = total
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._blobs) and len(self._blobs[self._index]) == 0:
            self._index += 1

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view.nbytes:
            if self._index >= len(self._blobs):
                raise ProtocolError("stream carries more bytes than its header announced")
            blob = self._blobs[self._index]
            take = min(len(blob) - self._offset, view.nbytes)
            blob[self._offset:self._offset + take] = view[:take]
            self._offset += take
            self.received += take
            view = view[take:]
            if self._offset == len(blob):
                self._index += 1
                self._offset = 0
                self._skip_empty()

    def finish(self) -> list[tuple[bytes | memoryview, list]]:
        if self.received != self.expected:
            raise ProtocolError(
                f"stream ended after {self.received} of {self.expected} bytes")
        out, pos = [], 0
        for value in self._values:
            n = len(value.buffer_sizes)
            blobs = self._blobs[pos:pos + n]
            pos += n
            if not blobs:
                raise ProtocolError("streamed value has no pickle stream")
            out.append((memoryview(blobs[0]), [pickle.PickleBuffer(b) for b in blobs[1:]]))
        return out


def receive_stream(chunks: Iterator[pb.Chunk], header_type, max_bytes: int):
    """Read a header and its data from ``chunks``.

    Returns (header message, [(payload, buffers) per streamed Value]).
    """
    try:
        first = next(chunks)
    except StopIteration:
        raise ProtocolError("empty stream") from None
    if first.WhichOneof("part") != "header":
        raise ProtocolError("stream does not start with a header")
    try:
        header = header_type.FromString(first.header)
    except Exception as exc:
        raise ProtocolError(f"malformed stream header: {exc}") from None
    assembler = Assembler(streamed_values(header), max_bytes)
    for chunk in chunks:
        if chunk.WhichOneof("part") != "data":
            raise ProtocolError("a second header inside one stream")
        assembler.feed(chunk.data)
    return header, assembler.finish()


# -- errors across the wire ------------------------------------------------------

def error_to_pb(exc: BaseException) -> pb.Error:
    """Encode an exception for a reply: claypot errors by name, user errors pickled."""
    from . import errors
    from .serialization import dump_exception
    if isinstance(exc, errors.ClaypotError) and errors.by_code(type(exc).__name__):
        return pb.Error(code=type(exc).__name__, message=str(exc))
    remote_type, tb, pickled = dump_exception(exc)
    return pb.Error(code="RemoteError", message=f"{type(exc).__name__}: {exc}",
                    remote_type=remote_type, traceback=tb, pickled=pickled)


def error_from_pb(err: pb.Error) -> BaseException:
    """The exception a reply's Error stands for, ready to raise."""
    from . import errors
    if err.code != "RemoteError":
        cls = errors.by_code(err.code) or errors.ClaypotError
        return cls(err.message)
    if err.pickled:
        try:
            exc = pickle.loads(err.pickled)
            if isinstance(exc, BaseException):
                if err.traceback:
                    exc.add_note("Remote traceback (on the claypot backend):\n"
                                 + err.traceback.rstrip())
                return exc
        except Exception:
            pass
    return errors.RemoteError(err.message, err.remote_type, err.traceback)
