"""Checking a backend address before any connection is tried.

gRPC accepts almost any string as a target and then retries it until a
deadline: ``http://host:1234`` or ``host`` (which becomes port 443) would
cost a user the whole reconnect timeout and end in an error that does not
say what was wrong. These checks fail at once, naming the mistake.
"""

from __future__ import annotations

import socket

from store.errors import ConfigurationError

HINT = "is the cluster up? run `claypot status` (or `claypot up` to start one)"


def check_address(address: str, source: str = "address") -> str:
    """``address`` as ``host:port`` (stripped), or ConfigurationError naming ``source``."""
    if not isinstance(address, str) or not address.strip():
        raise ConfigurationError(f"{source}: empty address (expected host:port)")
    text = address.strip()
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigurationError(f"{source}={address!r}: drop the {scheme}:// prefix; a backend address is host:port")
    if "/" in text:
        raise ConfigurationError(f"{source}={address!r}: a backend address is host:port, without a path")
    if text.startswith("["):  # [IPv6]:port
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigurationError(f"{source}={address!r}: no port (expected host:port, e.g. 127.0.0.1:50051)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{source}={address!r}: port {port!r} is not a number between 1 and 65535")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigurationError(f"{source}={address!r}: cannot resolve host {host!r} ({exc})") from None
    return text


__all__ = ["check_address", "HINT"]
