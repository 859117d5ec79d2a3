"""The storage runtime interface (``storage.api``) that PyCOMPSs calls, on claypot.

PyCOMPSs started with ``--storage_conf=<file>`` imports ``storage.api`` and
calls, in this order:

- master: ``init(config_file)`` before the application, ``finish()`` after;
- each worker: ``initWorker(config_file)`` in the worker process, which then
  forks its executors; each executor calls ``initWorkerPostFork()``, runs its
  tasks inside ``TaskContext(logger, values)``, resolving persistent
  arguments with ``getByID(id)``, and calls ``finishWorkerPostFork()``; the
  worker finally calls ``finishWorker()``.

Nothing that holds a gRPC channel is made before the fork (gRPC is not
fork-safe): ``initWorker`` only reads the configuration, and the connection
is opened by ``initWorkerPostFork``.

The configuration file is the ``storage.properties`` style of dataClay:
``KEY=VALUE`` lines (``#`` comments, optional quotes and ``export``), put
into the environment. claypot reads ``CLAYPOT_ADDRESS`` and ``CLAYPOT_TOKEN``
(or dataClay's ``DC_HOST``/``DC_PORT``) from it, and every other ``CLAYPOT_*``
setting. An empty or missing path means: the environment as it is.

``StorageObject`` is claypot's (``getID``, ``makePersistent``,
``deletePersistent``, ``getByID``); dataClay applications keep using their
``DataClayObject`` classes (store.compat.dataclay), which have the same names.
"""

from __future__ import annotations

from typing import Any
import logging
import os
import threading

import store
from store import StorageObject
from store.errors import ConfigurationError

log = logging.getLogger("claypot.compss")

_lock = threading.Lock()
_client = None
_config: dict[str, str] = {}


def read_config(config_file_path: str | None) -> dict[str, str]:
    """The ``KEY=VALUE`` settings of a storage configuration file."""
    if not config_file_path:
        return {}
    try:
        with open(config_file_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigurationError(f"storage configuration {config_file_path}: {exc}") from None
    out: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ConfigurationError(f"{config_file_path}:{number}: expected KEY=VALUE, got {raw!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def _address(env: Any) -> str | None:
    if env.get("CLAYPOT_ADDRESS"):
        return env["CLAYPOT_ADDRESS"]
    if env.get("DC_HOST"):
        return f"{env['DC_HOST']}:{env.get('DC_PORT') or 6867}"
    return None


def initWorker(config_file_path: str | None = None, **kwargs: Any) -> None:
    """Worker process set-up, before it forks: reads the configuration only."""
    global _config
    _config = read_config(config_file_path)
    os.environ.update(_config)


def initWorkerPostFork() -> None:
    """Executor set-up, after the fork: connects this process to the cluster."""
    global _client
    with _lock:
        _client = store.connect(_address(os.environ), os.environ.get("CLAYPOT_TOKEN"))


def finishWorkerPostFork() -> None:
    """Executor tear-down (matches initWorkerPostFork in the same process)."""
    global _client
    with _lock:
        if _client is not None:
            store.disconnect(_client)
        _client = None


def finishWorker(**kwargs: Any) -> None:
    """Worker tear-down: nothing is held per worker beyond its executors."""


def init(config_file_path: str | None = None, **kwargs: Any) -> None:
    """Master set-up: read the configuration and connect."""
    initWorker(config_file_path)
    initWorkerPostFork()


def finish(**kwargs: Any) -> None:
    """Master tear-down."""
    finishWorkerPostFork()


def get_client() -> Any:
    """The connection of this process (None before init / initWorkerPostFork)."""
    return _client


def getByID(object_id: str) -> Any:
    """The persistent object with this id (what its ``getID()`` returned)."""
    if _client is None:
        raise ConfigurationError(
            "storage.api: call init() (master) or initWorker() and initWorkerPostFork() (worker) first"
        )
    return store.get_by_id(object_id)


def getLocations(object_id: str) -> list[str]:
    """Host names holding the object, for the scheduler's locality decisions."""
    return store.get_locations(object_id)


class TaskContext:
    """Encloses one task's execution on a worker: ``with TaskContext(logger, values):``.

    ``values`` are the task's parameters; the persistent ones among them are
    checked to be reachable before the task starts, so a task whose object is
    gone fails with a claypot error at once rather than midway.
    """

    def __init__(self, logger, values, config_file_path=None, **kwargs):
        self.logger = logger or log
        self.values = values or []

    def __enter__(self):
        self.logger.debug("claypot: task starting")
        for value in self.values:
            if isinstance(value, StorageObject) and value.getID() is not None:
                value.get_location()
        return self

    def __exit__(self, etype, value, tb):
        if etype is not None:
            self.logger.warning("claypot: task raised %s: %s", etype.__name__, value)
        else:
            self.logger.debug("claypot: task finished")
        return False  # never swallow the task's exception


__all__ = [
    "init",
    "finish",
    "initWorker",
    "finishWorker",
    "initWorkerPostFork",
    "finishWorkerPostFork",
    "getByID",
    "getLocations",
    "TaskContext",
    "StorageObject",
    "get_client",
    "read_config",
]
