"""Helpers shared by the local lane's event-loop tests: what a backend holds (threads,
sockets), whether a client's calls took the lane, and a raw lane connection."""

from __future__ import annotations

import os
import socket

from store._wire import lane as frames


def on_lane(client, address: str) -> bool:
    """The client has a lane connection open to ``address`` (its calls went that way)."""
    lane = client.transport._lane
    return lane is not None and bool(lane._open.get(address))


def thread_count(pid: int) -> int:
    """Threads of process ``pid`` now."""
    return len(os.listdir(f"/proc/{pid}/task"))


def socket_count(pid: int) -> int:
    """Sockets process ``pid`` holds open now."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def raw_lane(address: str, timeout: float) -> socket.socket:
    """A lane connection of our own to the backend at ``address``, greeted and served."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(frames.socket_name(address))
    assert sock.recv(len(frames.GREETING) + 1) == frames.GREETING + frames.SERVED
    return sock
