"""Module-level functions of the store: connect, look up, list backends."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from . import objects as objmod
from .client import Client
from .config import Settings
from .errors import ConfigurationError

_client: Client | None = None


def state_file() -> str:
    """Where ``claypot up`` records the running cluster (address, token, PIDs)."""
    base = os.environ.get("CLAYPOT_STATE_DIR") or os.path.join(os.path.expanduser("~"),
                                                                ".claypot")
    return os.path.join(base, "cluster.json")


def _from_state_file() -> tuple[str, str, str]:
    from .security import read_private
    try:
        state = json.loads(read_private(state_file()))
        return state["address"], state["token"], state.get("tls_ca", "")
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return "", "", ""


def connect(address: str | None = None, token: str | None = None,
            tls_ca: str | None = None) -> Client:
    """Connect this process to a running cluster.

    ``address`` is any backend's host:port; by default ``CLAYPOT_ADDRESS``,
    else the cluster started by ``claypot up``. ``token`` defaults to
    ``CLAYPOT_TOKEN`` (or that cluster's token). ``tls_ca`` (default
    ``CLAYPOT_TLS_CA``, or the CA of a ``claypot up --tls`` cluster) makes
    the connection TLS, verified against that CA.
    """
    global _client
    settings = Settings.from_env()
    address = address or settings.address
    saved_address, saved_token, saved_ca = _from_state_file()
    if not address:
        address = saved_address
    if token is None and not settings.token:
        token = saved_token  # the cluster `claypot up` started, if any
    if tls_ca:
        settings = settings.replace(tls_ca=tls_ca)
    elif not settings.tls_ca and saved_ca and address == saved_address:
        settings = settings.replace(tls_ca=saved_ca)
    if not address:
        raise ConfigurationError("no cluster to connect to: pass an address, set "
                                 "CLAYPOT_ADDRESS, or run `claypot up`")
    client = Client(address, token if token is not None else settings.token, settings)
    client.backends()  # fail now, clearly, if the address or token is wrong
    if _client is not None:
        _client.close()
    _client = client
    objmod.set_dispatcher(client)
    return client


def disconnect(client: Client | None = None) -> None:
    """Forget the connection (only if it is ``client``, when given)."""
    global _client
    if client is not None and client is not _client:
        client.close()
        return
    if _client is not None:
        _client.close()
    _client = None
    objmod.set_dispatcher(None)


def client() -> Client:
    """The client this process is connected with."""
    d = objmod.get_dispatcher()
    return d  # type: ignore[return-value]


def get_by_alias(alias: str):
    """The persistent object with this alias (a proxy). Raises AliasNotFound."""
    return client().get_by_alias(alias)


def get_by_id(object_id: str):
    """The persistent object with this id (a proxy). Raises ObjectNotFound."""
    return client().get_by_id(object_id)


getByID = get_by_id


def delete_alias(alias: str) -> None:
    """Remove an alias; the object stays. Raises AliasNotFound."""
    client().delete_alias(alias)


def make_persistent_many(objs, backend: str | None = None) -> None:
    """Make many objects persistent in one round trip (all or none)."""
    client().make_persistent(list(objs), None, backend)


@dataclass(frozen=True)
class BackendStatus:
    """One backend as the directory sees it."""
    backend_id: str
    address: str
    host: str
    pid: int
    up: bool
    objects: int
    memory_bytes: int
    resident_objects: int
    running_tasks: int
    host_id: str = ""   # equal for backends that share /dev/shm (see store.shm.host_id)
    metrics_address: str = ""  # host:port of its Prometheus metrics; empty when off


def backends() -> list[BackendStatus]:
    """Every backend of the cluster: id, address, host, object count, memory, up/down."""
    return [BackendStatus(b.backend_id, b.address, b.host, b.pid, b.up, b.objects,
                          b.memory_bytes, b.resident_objects, b.running_tasks, b.host_id,
                          b.metrics_address)
            for b in client().backends()]


def get_locations(object_id: str) -> list[str]:
    """Host names holding the object (for locality-aware schedulers)."""
    c = client()
    ref = c.resolve(object_id=object_id)
    return [b.host for b in c.backends() if b.backend_id == ref.backend_id]


def get_backends():
    """The backends that are up, as an ordered mapping: backend id -> BackendHandle."""
    return client().get_backends()


def stub_class(name: str) -> type:
    """A proxy class for ``name`` ("module.Class"), a class registered in the cluster that
    this process need not be able to import: its methods are asked from a backend."""
    from .objectops import stub_class as build
    return build(client(), name)
