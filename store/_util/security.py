"""Secrets and checks that keep a cluster to the holders of its token.

The cluster token is the one secret a user handles. Everything else is
derived from it or generated next to it and kept the same way (in the
private state file of ``claypot up``, or in the memory of ``LocalCluster``):

- **Token check.** ``token_matches`` compares in constant time.
- **Signed directory entries.** Redis is shared infrastructure: whoever can
  write to it must still not be able to inject code (the class registry is
  unpickled by backends) or redirect clients (backend addresses). Backends
  sign those entries with keys derived from the token (HMAC-SHA256) and
  verify them before unpickling or trusting them; ``DirectoryKeys``.
- **Private files.** ``write_private`` and ``private_dir`` create files 0600
  and directories 0700 from the start (no window in which another user can
  open them).
- **Process identity.** ``process_identity`` records a PID's start time and
  command line, so that ``claypot down`` never signals a PID the system has
  reused for someone else's process.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass

from store.errors import ConfigurationError

_MAC_LEN = 32
CODE_MAGIC = b"CPS1"  # a signed code-registry entry: magic, 32-byte MAC, cloudpickle


def token_matches(expected: str, given: str | bytes | None) -> bool:
    """True if ``given`` is the token; constant time in the token's contents."""
    if given is None:
        return False
    if isinstance(given, str):
        given = given.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(expected.encode("utf-8", "surrogatepass"), given)


def new_secret(nbytes: int = 24) -> str:
    """A random secret for tokens and passwords (hex, safe in URLs and argv)."""
    return secrets.token_hex(nbytes)


class TamperedEntry(Exception):
    """A directory entry whose MAC does not verify (not written by a token holder)."""


@dataclass(frozen=True)
class DirectoryKeys:
    """HMAC keys for the directory entries that backends must be able to trust.

    Derived from the cluster token, one key per purpose, so a MAC for one kind
    of entry never verifies as another.
    """

    code: bytes
    backends: bytes

    @classmethod
    def from_token(cls, token: str) -> "DirectoryKeys":
        root = token.encode("utf-8", "surrogatepass")
        return cls(
            code=hmac.new(root, b"claypot/v1/code-registry", hashlib.sha256).digest(),
            backends=hmac.new(root, b"claypot/v1/backends", hashlib.sha256).digest(),
        )

    # -- code registry: bytes that backends unpickle -------------------------------
    def seal_code(self, key: str, code: bytes) -> bytes:
        """The stored form of a code entry: magic, MAC over (key, code), code."""
        return CODE_MAGIC + self._code_mac(key, code) + code

    def open_code(self, key: str, stored: bytes) -> bytes:
        """The code inside a stored entry, or TamperedEntry if its MAC does not verify."""
        head = len(CODE_MAGIC) + _MAC_LEN
        if len(stored) < head or not stored.startswith(CODE_MAGIC):
            raise TamperedEntry(f"code entry {key!r} is not signed")
        mac, code = stored[len(CODE_MAGIC) : head], stored[head:]
        if not hmac.compare_digest(mac, self._code_mac(key, code)):
            raise TamperedEntry(f"code entry {key!r} has a bad signature")
        return code

    def _code_mac(self, key: str, code: bytes) -> bytes:
        h = hmac.new(self.code, key.encode("utf-8", "surrogatepass"), hashlib.sha256)
        h.update(b"\0")
        h.update(code)
        return h.digest()

    # -- backend records: where clients send their calls (and their token) ---------
    def seal_backend(self, backend_id: str, info: dict) -> str:
        """The stored form of a backend's record: MAC (hex), a dot, the JSON."""
        text = json.dumps(info, sort_keys=True)
        return self._backend_mac(backend_id, text) + "." + text

    def open_backend(self, backend_id: str, stored: str) -> dict:
        """The record inside a stored backend entry, or TamperedEntry."""
        mac, sep, text = stored.partition(".")
        if not sep or not hmac.compare_digest(mac.encode(), self._backend_mac(backend_id, text).encode()):
            raise TamperedEntry(f"backend entry {backend_id!r} has a bad signature")
        try:
            info = json.loads(text)
        except ValueError:
            raise TamperedEntry(f"backend entry {backend_id!r} is not JSON") from None
        if not isinstance(info, dict):
            raise TamperedEntry(f"backend entry {backend_id!r} is not a record")
        return info

    def _backend_mac(self, backend_id: str, text: str) -> str:
        h = hmac.new(self.backends, backend_id.encode("utf-8", "surrogatepass"), hashlib.sha256)
        h.update(b"\0")
        h.update(text.encode())
        return h.hexdigest()


# -- private files ---------------------------------------------------------------------


def private_dir(path: str) -> str:
    """Create ``path`` (and missing parents) with mode 0700; refuse one others can use.

    An existing directory must belong to this user and be writable by no one
    else (another user could have planted files in it); one that others may
    only read (made by an older claypot, or by hand) is tightened to 0700.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=False)
    except FileExistsError:
        pass
    st = os.stat(path, follow_symlinks=False)
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigurationError(f"{path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & 0o022:
        raise ConfigurationError(
            f"{path} is writable by other users (mode {st.st_mode & 0o777:o}): not keeping secrets in it"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by this user only from the start.

    The temporary file is created 0600 with O_EXCL and O_NOFOLLOW (a planted
    symlink or file makes this fail instead of writing through it), then
    renamed over ``path``.
    """
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_private(path: str) -> bytes:
    """Read a file written by ``write_private``; refuse one others could have written."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise ConfigurationError(f"{path} is writable by other users or not ours: not trusting it")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


# -- process identity --------------------------------------------------------------


def process_identity(pid: int) -> dict | None:
    """What identifies a running process beyond its PID: start time and command line."""
    import psutil

    try:
        p = psutil.Process(pid)
        return {"pid": pid, "create_time": p.create_time(), "cmdline": p.cmdline()}
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def same_process(recorded: dict) -> bool:
    """True if the process recorded by ``process_identity`` is still the one at its PID."""
    if not recorded or not recorded.get("pid"):
        return False
    now = process_identity(int(recorded["pid"]))
    if now is None:
        return False
    # create_time is a float computed from boot time and clock ticks: equal to
    # well under a tick for the same process, seconds apart for a reused PID.
    return abs(now["create_time"] - float(recorded.get("create_time", -1))) < 0.05 and now["cmdline"] == list(
        recorded.get("cmdline", [])
    )


# -- listening --------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """True if listening on ``host`` reaches only this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "token_matches",
    "new_secret",
    "DirectoryKeys",
    "TamperedEntry",
    "private_dir",
    "write_private",
    "read_private",
    "process_identity",
    "same_process",
    "is_loopback_host",
]
