"""Module-level functions of the store: connect, look up, list backends."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
import json
import os
from dataclasses import dataclass

from store._model import objects as objmod
from store._client.client import Client
from store.config import Settings
from store._util.addresses import HINT, check_address
from store.errors import AuthenticationError, BackendUnavailable, ConfigurationError
from store._client.transport import Transport

_client: Client | None = None


def state_file() -> str:
    """Where ``claypot up`` records the running cluster (address, token, PIDs)."""
    base = os.environ.get("CLAYPOT_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".claypot")
    return os.path.join(base, "cluster.json")


def load_state() -> dict:
    """The cluster ``claypot up`` recorded ({} when none)."""
    from store._util.security import read_private

    try:
        state = json.loads(read_private(state_file()))
    except (FileNotFoundError, ValueError, TypeError):
        return {}
    return state if isinstance(state, dict) else {}


def _state_addresses(state: dict) -> list[str]:
    out = [state["address"]] if state.get("address") else []
    for b in state.get("members", []):
        if isinstance(b, dict) and b.get("address") and b["address"] not in out:
            out.append(b["address"])
    return out


def _stale_env(state: dict, address: str, token: str) -> list[str]:
    """Environment variables that disagree with the cluster recorded by ``claypot up``."""
    if not state:
        return []
    notes = []
    env_address = os.environ.get("CLAYPOT_ADDRESS", "")
    if env_address and env_address == address and address not in _state_addresses(state):
        notes.append(
            f"CLAYPOT_ADDRESS={env_address} (from the environment) is not an address "
            f"of the cluster recorded in {state_file()} "
            f"({', '.join(_state_addresses(state))}): unset it or export the new value"
        )
    env_token = os.environ.get("CLAYPOT_TOKEN", "")
    if env_token and env_token == token and state.get("token") and env_token != state["token"]:
        notes.append(
            f"CLAYPOT_TOKEN (from the environment) differs from the token of the "
            f"cluster recorded in {state_file()}: unset it or export the new value"
        )
    return notes


def connect(
    address: str | None = None,
    token: str | None = None,
    tls_ca: str | None = None,
    transport: Transport | None = None,
    settings: Settings | None = None,
) -> Client:
    """Connect this process to a running cluster.

    ``address`` is any backend's host:port; by default ``CLAYPOT_ADDRESS``,
    else the cluster started by ``claypot up``. ``token`` defaults to
    ``CLAYPOT_TOKEN`` (or that cluster's token). ``tls_ca`` (default
    ``CLAYPOT_TLS_CA``, or the CA of a ``claypot up --tls`` cluster) makes
    the connection TLS, verified against that CA. ``transport`` (a
    :class:`store._client.transport.Transport`) replaces gRPC channels, e.g. with the
    backends of a :class:`store._ops.inproc.InProcessCluster`; ``settings`` replace
    those read from the environment.

    The client learns every backend of the cluster from the first one that
    answers, and from the state file of ``claypot up``, and asks any live one:
    one dead backend does not hide the others. When none answers within about
    a second per address, BackendUnavailable says which addresses were tried
    and which ``CLAYPOT_*`` variable looks stale.
    """
    global _client
    settings = settings or Settings.from_env()
    # The state file of `claypot up` names gRPC addresses: no business of another transport.
    state = load_state() if transport is None else {}
    source = "address"
    if not address:
        address, source = settings.address, "CLAYPOT_ADDRESS"
    if not address:
        address, source = state.get("address", ""), state_file()
    if not address:
        raise ConfigurationError("no cluster to connect to: pass an address, set CLAYPOT_ADDRESS, or run `claypot up`")
    address = check_address(address, source) if transport is None else transport.check_address(address, source)
    if token is None:
        token = settings.token or state.get("token", "")
    same_cluster = address in _state_addresses(state)
    if tls_ca:
        settings = settings.replace(tls_ca=tls_ca)
    elif not settings.tls_ca and state.get("tls_ca") and same_cluster:
        settings = settings.replace(tls_ca=state["tls_ca"])
    gateways = _state_addresses(state) if same_cluster or token == state.get("token") else []
    client = Client(address, token, settings, gateways=gateways, transport=transport)
    try:
        client.probe(timeout=min(settings.admin_timeout, 1.0))
    except (BackendUnavailable, AuthenticationError) as exc:
        client.close()
        notes = _stale_env(state, address, token)
        hint = "" if isinstance(exc, AuthenticationError) else f"; {HINT}"
        raise type(exc)(f"{exc}{hint}" + "".join(f"\n  - {n}" for n in notes)) from None
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


def get_by_alias(alias: str) -> Any:
    """The persistent object with this alias (a proxy). Raises AliasNotFound."""
    return client().get_by_alias(alias)


def get_by_id(object_id: str) -> Any:
    """The persistent object with this id (a proxy). Raises ObjectNotFound."""
    return client().get_by_id(object_id)


getByID = get_by_id


def delete_alias(alias: str) -> None:
    """Remove an alias; the object stays. Raises AliasNotFound."""
    client().delete_alias(alias)


def make_persistent_many(objs: Iterable[objmod.StorageObject], backend: str | None = None) -> None:
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
    host_id: str = ""  # equal for backends that share /dev/shm (see store._client.shm.host_id)
    metrics_address: str = ""  # host:port of its Prometheus metrics; empty when off


def backends() -> list[BackendStatus]:
    """Every backend of the cluster: id, address, host, object count, memory, up/down."""
    return [
        BackendStatus(
            b.backend_id,
            b.address,
            b.host,
            b.pid,
            b.up,
            b.objects,
            b.memory_bytes,
            b.resident_objects,
            b.running_tasks,
            b.host_id,
            b.metrics_address,
        )
        for b in client().backends()
    ]


def get_locations(object_id: str) -> list[str]:
    """Host names holding the object, its primary's first, then its replicas' (for
    locality-aware schedulers)."""
    c = client()
    ref = c.resolve(object_id=object_id)
    hosts = {b.backend_id: b.host for b in c.backends()}
    return [hosts[b] for b in [ref.backend_id, *ref.replicas] if b in hosts]


def get_backends() -> dict[str, Any]:
    """The backends that are up, as an ordered mapping: backend id -> BackendHandle."""
    return client().get_backends()


def stub_class(name: str) -> type:
    """A proxy class for ``name`` ("module.Class"), a class registered in the cluster that
    this process need not be able to import: its methods are asked from a backend."""
    from store._model.objectops import stub_class as build

    return build(client(), name)
