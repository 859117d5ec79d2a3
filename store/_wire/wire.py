"""Values on the wire: inline for small ones, streamed in chunks for large ones.

A value is small when its pickle stream plus out-of-band buffers fit in
``inline_limit``; it then rides inside its unary message. A larger value is
sent as a stream: a header message (with the sizes of its blobs) and then the
raw bytes in ``chunk_size`` pieces. The receiver preallocates every blob and
copies each chunk straight into place, so a 3 GiB array costs one buffer on
each side, never a whole-message copy.

The three streaming RPCs (PersistStream, CallStream, FetchResult) carry
``Chunk`` messages, but claypot frames them itself instead of going through
protobuf objects: a data chunk is the tag byte, a varint length and the bytes,
built with one ``join`` straight from the array's memory. Measured on the
project's 2-core VM, building ``pb.Chunk(data=...)`` and serializing it cost
2.8 s per GiB (two more copies of every chunk, into and out of the message),
``join`` 0.07 s. The bytes on the wire are the same ``Chunk`` encoding, so
peers in other languages (or the generated stubs) interoperate unchanged;
:func:`add_servicer` and :class:`StreamStub` install the raw framing on the
server and the client.

Copies of a streamed value, sender to receiver: one ``join`` per chunk (the
sender's framing), gRPC's own copies into and out of its buffers, and one copy
into the receiver's preallocated buffer. Large receive buffers are private
anonymous ``mmap``s, pre-populated (see :func:`receive_buffer`): not
``bytearray``, which zero-fills (a pass over memory for nothing). Landing the
bytes in fresh memory (page faults) is the main cost of receiving here:
claypot's round trip is at par with a bare gRPC stream whose receiver keeps
the bytes, and below one whose receiver only counts them.
"""

from __future__ import annotations

import mmap
import threading
import pickle
from typing import Any, Iterable, Iterator, Sequence

import grpc

from store.errors import ProtocolError, ValueTooLarge
from store._wire.generated import claypot_pb2 as pb

_HEADER_TAG = 0x0A  # Chunk field 1 (header), length-delimited
_DATA_TAG = 0x12  # Chunk field 2 (data), length-delimited


def total_size(payload: bytes, buffers: Sequence) -> int:
    """Bytes a value occupies: its pickle stream plus every out-of-band buffer."""
    return len(payload) + sum(memoryview(b).nbytes for b in buffers)


def flat_bytes(buffer: Any) -> memoryview:
    """A buffer as one flat run of bytes, without copying.

    ``PickleBuffer.raw()`` also accepts Fortran-ordered buffers, which
    ``memoryview.cast`` refuses.
    """
    if isinstance(buffer, pickle.PickleBuffer):
        return buffer.raw()
    return memoryview(buffer).cast("B")


def writable(buffers: Iterable) -> list:
    """Inline buffers (protobuf bytes, read-only) as private writable copies.

    Arrays unpickled over them can then be changed in place like any other;
    inline values are at most ``inline_limit``, so the copy is small.
    """
    return [bytearray(b) for b in buffers]


def inline_value(payload: bytes, buffers: Sequence) -> pb.Value:
    """A Value carrying everything inline (small values only)."""
    return pb.Value(payload=payload, buffers=[flat_bytes(b).tobytes() for b in buffers])


def streamed_value(payload: bytes, buffers: Sequence) -> tuple[pb.Value, list]:
    """A Value header for streaming, and the blobs to send after it, in order."""
    blobs = [payload] + list(buffers)
    value = pb.Value(buffer_sizes=[memoryview(b).nbytes for b in blobs])
    return value, blobs


def value_parts(value: pb.Value) -> tuple[bytes, list]:
    """(payload, buffers) of an inline Value."""
    return value.payload, list(value.buffers)


# -- chunk framing ---------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_header(header: bytes) -> bytes:
    """A serialized ``Chunk(header=header)``."""
    return b"".join((bytes((_HEADER_TAG,)), _varint(len(header)), header))


def encode_data(data: Any) -> bytes:
    """A serialized ``Chunk(data=data)``, copied once from any buffer (no protobuf object)."""
    view = memoryview(data)
    return b"".join((bytes((_DATA_TAG,)), _varint(view.nbytes), view))


def decode_chunk(chunk: Any) -> tuple[str | None, memoryview | bytes]:
    """(``"header"`` or ``"data"`` or None, its bytes) of a raw or parsed Chunk.

    The common case (one field, as every claypot sender writes it) is read
    in place, a view into the received bytes; anything else is handed to
    protobuf, so any valid encoding of a Chunk is accepted.
    """
    if isinstance(chunk, pb.Chunk):
        part = chunk.WhichOneof("part")
        return part, getattr(chunk, part) if part else b""
    raw = memoryview(chunk)
    if raw.nbytes >= 2 and raw[0] in (_HEADER_TAG, _DATA_TAG):
        length, shift, pos = 0, 0, 1
        while pos < raw.nbytes and pos < 11:
            byte = raw[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            if not byte & 0x80:
                if pos + length == raw.nbytes:
                    return ("header" if raw[0] == _HEADER_TAG else "data"), raw[pos:]
                break
            shift += 7
    try:
        parsed = pb.Chunk.FromString(bytes(raw))
    except Exception as exc:
        raise ProtocolError(f"malformed stream chunk: {exc}") from None
    return decode_chunk(parsed)


# gRPC channels here cap messages at 16 MiB; a frame adds at most 11 bytes.
MAX_CHUNK = 16 * 1024 * 1024 - 64


def chunk_stream(header: bytes, blobs: Iterable, chunk_size: int, meter: Any = None) -> Iterator[bytes]:
    """The header chunk, then every blob cut in ``chunk_size`` pieces, framed as Chunks.

    ``chunk_size`` is capped at :data:`MAX_CHUNK` so a larger setting cannot
    produce a message the channel refuses. ``meter`` (a transfers.Meter)
    counts the bytes as they are handed to gRPC.
    """
    chunk_size = min(chunk_size, MAX_CHUNK)
    yield encode_header(header)
    try:
        for blob in blobs:
            view = flat_bytes(blob)
            for start in range(0, view.nbytes, chunk_size):
                piece = view[start : start + chunk_size]
                yield encode_data(piece)
                if meter is not None:
                    meter.add(piece.nbytes)
    finally:
        if meter is not None:
            meter.close()


def _serialize_chunk(message: Any) -> bytes:
    """Raw frames pass through; a ``pb.Chunk`` (an error header, say) is serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


_SERVICE = "claypot.v1.Backend"

# Stream messages laid out like Chunk (field 1 a header, field 2 raw data):
# they travel with the same raw framing.
_RAW_FRAMED = (pb.Chunk, pb.GetArrayResponse, pb.SetArrayRequest)


class StreamStub:
    """The streaming RPCs of a channel, with claypot's raw chunk framing.

    Requests are frames from :func:`chunk_stream`; FetchResult yields raw
    frames for :func:`receive_stream`. Unary RPCs keep the generated stub.
    """

    def __init__(self, channel: grpc.Channel):
        prefix = f"/{_SERVICE}/"
        self.PersistStream = channel.stream_unary(
            prefix + "PersistStream", request_serializer=_serialize_chunk, response_deserializer=pb.Status.FromString
        )
        self.CallStream = channel.stream_unary(
            prefix + "CallStream", request_serializer=_serialize_chunk, response_deserializer=pb.CallReply.FromString
        )
        self.FetchResult = channel.unary_stream(
            prefix + "FetchResult", request_serializer=pb.FetchRequest.SerializeToString, response_deserializer=None
        )


def add_servicer(servicer: Any, server: grpc.Server) -> None:
    """Register a Backend servicer like the generated helper, with raw chunk framing.

    The chunk-carrying directions get no protobuf (de)serializer: requests of
    PersistStream and CallStream arrive as the raw bytes of each Chunk, and
    FetchResult sends the frames :func:`chunk_stream` built.
    """
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Backend"].methods:
        fn = getattr(servicer, method.name)
        request_type = getattr(pb, method.input_type.name)
        reply_type = getattr(pb, method.output_type.name)
        deserialize = None if request_type in _RAW_FRAMED else request_type.FromString
        serialize = _serialize_chunk if reply_type in _RAW_FRAMED else reply_type.SerializeToString
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming:
            make = grpc.stream_unary_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(fn, request_deserializer=deserialize, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(_SERVICE, handlers)


# -- receiving -------------------------------------------------------------------


def streamed_values(message: Any) -> list[pb.Value]:
    """The streamed Values inside a header message, in wire order."""
    if isinstance(message, pb.PersistRequest):
        return [o.state for o in message.objects if not o.state.payload]
    if isinstance(message, pb.CallRequest):
        return [message.args] if not message.args.payload else []
    if isinstance(message, pb.CallReply):
        if message.HasField("error"):
            return []  # a failed fetch streams its error header and nothing else
        return [message.result] if not message.result.payload else []
    raise ProtocolError(f"cannot stream a {type(message).__name__}")


_MMAP_MIN = 1 << 20


class ReceiveBudget:
    """Bytes of streamed values being received at once by this process, bounded.

    A stream reserves what its header announces before any buffer is made,
    and gives it back when the value is complete (it then belongs to an
    object) or the stream fails. A header past what is left is refused with
    ``ValueTooLarge`` (RESOURCE_EXHAUSTED): headers alone cannot commit
    memory, however many arrive at once.
    """

    def __init__(self, limit: int = 0):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> None:
        with self._lock:
            if self.limit and self.used + nbytes > self.limit:
                raise ValueTooLarge(
                    f"cannot receive a value of {nbytes} bytes now: {self.used} of the "
                    f"{self.limit} bytes this process receives at once (receive_budget) are "
                    f"in use by other streams"
                )
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)


RECEIVING = ReceiveBudget()


def set_receive_budget(nbytes: int) -> None:
    """Bound the bytes of streamed values this process receives at once (0: unbounded)."""
    RECEIVING.limit = nbytes


def receive_buffer(nbytes: int) -> tuple[memoryview, "_Prefaulter | None"]:
    """A writable buffer of ``nbytes`` that the incoming data fills (see the module docstring).

    Anonymous mmap pages are zero on first touch by the kernel, so nothing
    writes them before the data does; small buffers use a bytearray.
    Memory is committed as the data arrives: a prefaulter maps pages at most
    a window ahead of the bytes received, never the whole announced size.
    """
    if nbytes < _MMAP_MIN:
        return memoryview(bytearray(nbytes)), None
    # Private: mmap's default shared mapping would be shmem (slower to fill, and
    # accounted as shared memory). Mapping the pages ahead of the data saves one
    # fault per page as chunks land; a background thread does it (_Prefaulter),
    # overlapping with the network: a 1 GiB round trip went from a median of
    # about 700 MB/s (MAP_POPULATE up front) to about 880 MB/s. It stays within
    # a window ahead of the data, so a header announcing a huge value and
    # sending nothing commits no more than that window.
    # Transparent huge pages were measured too: 0.15 s per GiB when the kernel
    # has 2 MiB pages at hand, but 1-4 s when it must compact memory first, so
    # a read-back of 1 GiB ranged 2.2-3.4 s against 1.9-2.7 s populated.
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    except (OSError, OverflowError) as exc:
        raise ValueTooLarge(f"cannot allocate {nbytes} bytes to receive a value: {exc}") from None
    prefaulter = _Prefaulter.start(region, nbytes) if nbytes >= _PREFAULT_MIN else None
    return memoryview(region), prefaulter


_PREFAULT_MIN = 16 << 20
_PREFAULT_SLICE = 8 << 20
_PREFAULT_WINDOW = 32 << 20  # bytes mapped ahead of the data received
_MADV_POPULATE_WRITE = 23


class _Prefaulter:
    """Maps a receive buffer's pages in a background thread, a window ahead of the data.

    Faulting in fresh pages is the dominant cost of receiving into new memory
    on these machines; done by a thread that releases the GIL (ctypes), it
    overlaps with the network instead of running before or during the copy.
    """

    _libc = None

    def __init__(self):
        self._cond = threading.Condition()
        self._allowed = _PREFAULT_WINDOW
        self._closed = False

    def advance(self, received: int) -> None:
        """``received`` bytes of this buffer have arrived: map up to a window past them."""
        with self._cond:
            if received + _PREFAULT_WINDOW > self._allowed:
                self._allowed = received + _PREFAULT_WINDOW
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    @classmethod
    def start(cls, region: mmap.mmap, nbytes: int) -> "_Prefaulter | None":
        import ctypes

        if cls._libc is None:
            try:
                cls._libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                cls._libc = False
        if not cls._libc:
            return None
        holder = ctypes.c_char.from_buffer(region)
        base = ctypes.addressof(holder)
        del holder
        self = cls()

        def run(region=region):
            # ``region`` is held until the thread ends, so the mapping cannot go
            # away (and its addresses be reused) under the madvise calls.
            madvise = cls._libc.madvise
            madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            for off in range(0, nbytes, _PREFAULT_SLICE):
                with self._cond:
                    while off >= self._allowed and not self._closed:
                        self._cond.wait(1.0)
                    if self._closed:
                        return
                n = min(_PREFAULT_SLICE, nbytes - off)
                if madvise(base + off, n, _MADV_POPULATE_WRITE) != 0:
                    return  # old kernel or no memory: pages fault in on first write

        threading.Thread(target=run, name="prefault", daemon=True).start()
        return self


class Assembler:
    """Rebuilds the blobs of a streamed message from its data chunks.

    ``feed`` copies each chunk into preallocated buffers; ``finish`` checks
    every byte arrived and returns, per streamed Value, its (payload,
    buffers) with buffers as writable ``PickleBuffer``s over those buffers,
    so unpickled numpy arrays use them in place.
    """

    def __init__(self, values: list[pb.Value], max_bytes: int):
        sizes = [int(n) for v in values for n in v.buffer_sizes]
        total = sum(sizes)
        if max_bytes and total > max_bytes:
            raise ValueTooLarge(f"value of {total} bytes exceeds the limit of {max_bytes} bytes (max_value_size)")
        for v in values:
            if not v.buffer_sizes:
                raise ProtocolError("streamed value has no pickle stream")
        self._values = values
        RECEIVING.reserve(total)
        self._reserved = total
        self._sizes = sizes
        self._blobs = []
        self._prefaulters = []
        try:
            for n in sizes:
                if n < _MMAP_MIN:
                    # Made when its first byte arrives: a header announcing many small
                    # buffers commits nothing by itself.
                    self._blobs.append(None)
                    self._prefaulters.append(None)
                    continue
                blob, prefaulter = receive_buffer(n)
                self._blobs.append(blob)
                self._prefaulters.append(prefaulter)
        except BaseException:
            self.close()
            raise
        self._index = 0
        self._offset = 0
        self.received = 0
        self.expected = total
        self._skip_empty()

    def close(self) -> None:
        """Stop prefaulting and give the reservation back (the stream is over)."""
        for prefaulter in self._prefaulters:
            if prefaulter is not None:
                prefaulter.close()
        self._prefaulters = [None] * len(self._prefaulters)
        RECEIVING.release(self._reserved)
        self._reserved = 0

    def _skip_empty(self) -> None:
        while self._index < len(self._blobs) and self._sizes[self._index] == 0:
            self._index += 1

    def feed(self, data: Any) -> None:
        """Copy one data chunk into place; more bytes than announced is a ProtocolError."""
        view = memoryview(data)
        while view.nbytes:
            if self._index >= len(self._blobs):
                raise ProtocolError("stream carries more bytes than its header announced")
            blob = self._blobs[self._index]
            if blob is None:
                blob = self._blobs[self._index] = memoryview(bytearray(self._sizes[self._index]))
            take = min(blob.nbytes - self._offset, view.nbytes)
            blob[self._offset : self._offset + take] = view[:take]
            self._offset += take
            prefaulter = self._prefaulters[self._index]
            if prefaulter is not None:
                prefaulter.advance(self._offset)
            self.received += take
            view = view[take:]
            if self._offset == blob.nbytes:
                self._index += 1
                self._offset = 0
                self._skip_empty()

    def finish(self) -> list[tuple[memoryview, list]]:
        """Per streamed Value: (pickle stream, [PickleBuffer, ...])."""
        if self.received != self.expected:
            raise ProtocolError(f"stream ended after {self.received} of {self.expected} bytes")
        self.close()
        self._blobs = [b if b is not None else memoryview(bytearray(0)) for b in self._blobs]
        out, pos = [], 0
        for value in self._values:
            n = len(value.buffer_sizes)
            blobs = self._blobs[pos : pos + n]
            pos += n
            out.append((blobs[0], [pickle.PickleBuffer(b) for b in blobs[1:]]))
        return out


def receive_stream(chunks: Iterator, header_type: Any, max_bytes: int, progress: str = "") -> tuple[Any, list]:
    """Read a header and its data from ``chunks`` (raw frames or ``pb.Chunk``s).

    Returns (header message, [(payload, buffers) per streamed Value]). A
    stream that does not start with a header, has a second header, or
    carries fewer or more bytes than its header announced raises
    :class:`ProtocolError`; nothing of it is kept.
    """
    try:
        first = next(chunks)
    except StopIteration:
        raise ProtocolError("empty stream") from None
    kind, body = decode_chunk(first)
    if kind != "header":
        raise ProtocolError("stream does not start with a header")
    try:
        header = header_type.FromString(bytes(body))
    except Exception as exc:
        raise ProtocolError(f"malformed stream header: {exc}") from None
    assembler = Assembler(streamed_values(header), max_bytes)
    from store._wire.transfers import meter as transfer_meter

    bar = transfer_meter(assembler.expected, progress) if progress else None
    try:
        for chunk in chunks:
            kind, body = decode_chunk(chunk)
            if kind != "data":
                raise ProtocolError(
                    "a second header inside one stream"
                    if kind == "header"
                    else "a stream chunk with neither header nor data"
                )
            assembler.feed(body)
            if bar is not None:
                bar.add(memoryview(body).nbytes)
        return header, assembler.finish()
    finally:
        assembler.close()
        if bar is not None:
            bar.close()


# -- errors across the wire ------------------------------------------------------


def error_to_pb(exc: BaseException) -> pb.Error:
    """Encode an exception for a reply: claypot errors by name, user errors pickled."""
    from store import errors
    from store._wire.serialization import dump_exception

    if isinstance(exc, errors.ClaypotError) and errors.by_code(type(exc).__name__):
        return pb.Error(code=type(exc).__name__, message=str(exc), moved_to=getattr(exc, "moved_to", "") or "")
    remote_type, tb, pickled = dump_exception(exc)
    return pb.Error(
        code="RemoteError",
        message=f"{type(exc).__name__}: {exc}",
        remote_type=remote_type,
        traceback=tb,
        pickled=pickled,
    )


def error_from_pb(err: pb.Error) -> BaseException:
    """The exception a reply's Error stands for, ready to raise."""
    from store import errors

    if err.code != "RemoteError":
        cls = errors.by_code(err.code) or errors.ClaypotError
        if cls is errors.ObjectMoved:
            return cls(err.message, err.moved_to)
        return cls(err.message)
    if err.pickled:
        try:
            exc = pickle.loads(err.pickled)
            if isinstance(exc, BaseException):
                if err.traceback:
                    from store._wire.serialization import annotate_remote_traceback

                    exc.add_note(
                        "Remote traceback (on the claypot backend):\n"
                        + annotate_remote_traceback(err.traceback.rstrip())
                    )
                return exc
        except Exception:
            pass
    from store._wire.serialization import annotate_remote_traceback

    return errors.RemoteError(err.message, err.remote_type, annotate_remote_traceback(err.traceback))
