"""The local lane's frames (store._wire.lane): round trips and malformed bytes (pure logic)."""

import math
import socket
import struct
import threading
import time

import pytest

from store._wire import lane
from store.errors import ProtocolError


def _body(parts):
    data = b"".join(parts)
    (length,) = struct.unpack_from("<I", data)
    assert length == len(data) - 4
    return data[4:]


def test_request_round_trip_keeps_method_timeout_metadata_and_bytes():
    meta = (("x-claypot-token", "s3cret"), ("trace-bin", b"\x00\xff"), ("empty", ""))
    body = _body(lane.request_frame("Call", 2.5, meta, b"\x01\x02payload"))
    method, timeout, metadata, at = lane.parse_request_head(body)
    request = body[at:]
    assert (method, timeout, metadata, bytes(request)) == ("Call", 2.5, meta, b"\x01\x02payload")
    body = _body(lane.request_frame("Ping", None, None, b""))
    method, timeout, metadata, at = lane.parse_request_head(body)
    request = body[at:]
    assert (method, timeout, metadata, bytes(request)) == ("Ping", None, (), b"")


def test_reply_round_trips_ok_and_error_with_trailing_metadata():
    code, reply, details, trailing = lane.parse_reply(_body(lane.ok_frame(b"abc")))
    assert (code, bytes(reply), details, trailing) == (lane.OK, b"abc", "", ())
    frame = lane.error_frame(16, "wrong token é", (("claypot-error-bin", b"\x01"), ("why", "x")))
    code, reply, details, trailing = lane.parse_reply(_body(frame))
    assert (code, reply, details, trailing) == (
        16,
        None,
        "wrong token é",
        (("claypot-error-bin", b"\x01"), ("why", "x")),
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",  # nothing
        b"\x04Ca",  # method name cut short
        b"\x04C ll" + struct.pack("<d", 1.0) + b"\x00\x00",  # not an identifier
        b"\x04Call" + struct.pack("<d", 1.0),  # no metadata count
        b"\x04Call" + struct.pack("<d", -1.0) + b"\x00\x00",  # negative timeout
        b"\x04Call" + struct.pack("<d", math.inf) + b"\x00\x00",  # endless timeout
        b"\x04Call" + struct.pack("<d", 1.0) + b"\x01\x00" + b"\x07\x01\x00k" + struct.pack("<I", 1) + b"v",  # bad kind
        b"\x04Call" + struct.pack("<d", 1.0) + b"\x01\x00" + b"\x00\x01\x00k" + struct.pack("<I", 99) + b"v",  # overrun
        b"\x04Call" + struct.pack("<d", 1.0) + b"\x01\x00" + b"\x00\x09\x00k",  # key overrun
        b"\x04Call"
        + struct.pack("<d", 1.0)
        + b"\x01\x00"
        + b"\x00\x01\x00\xff"
        + struct.pack("<I", 0),  # key not ascii
    ],
)
def test_malformed_requests_are_protocol_errors(body):
    with pytest.raises(ProtocolError):
        lane.parse_request_head(body)


def test_malformed_replies_are_protocol_errors():
    for body in (b"", b"\x10\x05\x00", b"\x10" + struct.pack("<I", 2) + b"ab"):
        with pytest.raises(ProtocolError):
            lane.parse_reply(body)


def test_frame_length_limits():
    for bad in (0, lane.MAX_FRAME + 1, 2**32 - 1):
        with pytest.raises(ProtocolError):
            lane.frame_length(struct.pack("<I", bad))
    assert lane.frame_length(struct.pack("<I", 7)) == 7
    with pytest.raises(ProtocolError):
        lane.request_frame("Call", 1.0, (), b"x" * lane.MAX_FRAME)


def test_read_reply_over_a_socket_pair_reads_whole_frames_and_sees_cuts():
    a, b = socket.socketpair()
    with a, b:
        parts = lane.ok_frame(b"y" * 300_000)
        data = b"".join(parts)
        # Bigger than the socket's buffer: sent from a thread, in two writes.
        sender = threading.Thread(target=lambda: (a.sendall(data[:10]), a.sendall(data[10:])))
        sender.start()
        assert bytes(lane.read_reply(b)) == data[4:]
        sender.join()
        a.sendall(b"\x05\x00\x00\x00ab")  # a frame of 5 bytes cut after 2
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError):
            lane.read_reply(b)
    c, d = socket.socketpair()
    with c, d:
        c.close()
        assert lane.read_reply(d) is None  # a clean end between frames


def test_socket_names_follow_the_advertised_address():
    assert lane.socket_name("127.0.0.1:5000") == b"\0claypot-lane:127.0.0.1:5000"
    assert lane.socket_name("a:1") != lane.socket_name("a:2")


def test_a_long_address_gets_a_name_that_fits_a_socket():
    name = lane.socket_name("h" * 300 + ":1")
    assert len(name) <= 107 and name.startswith(b"\0claypot-lane#")
    assert name != lane.socket_name("h" * 300 + ":2")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(name)  # fits


def test_a_peer_of_this_user_is_trusted():
    a, b = socket.socketpair()
    with a, b:
        assert lane.trusted_peer(a)


def test_read_reply_takes_small_and_large_replies_and_refuses_extra_bytes():
    for size in (0, 10, 70_000, 1_000_000):
        a, b = socket.socketpair()
        with a, b:
            data = b"".join(lane.ok_frame(b"z" * size))
            sender = threading.Thread(target=lambda: (a.sendall(data[:3]), a.sendall(data[3:])))
            sender.start()
            assert bytes(lane.read_reply(b)) == data[4:]
            sender.join()
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"".join(lane.ok_frame(b"abc")) + b"junk")
        time.sleep(0.05)
        with pytest.raises(ProtocolError):
            lane.read_reply(b)
    c, d = socket.socketpair()
    with c, d:
        c.close()
        assert lane.read_reply(d) is None
