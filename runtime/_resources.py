"""Constraints against resources: which backends may run a task. Pure logic, no I/O.

A task's ``@constraint`` is a dict of PyCOMPSs resource names
(:mod:`store.hooks`, :func:`~store.hooks.normalise_resource`); a backend satisfies it when, for every name,

- quantities (``computing_units``, ``memory_size``, ``processor_performance``,
  ``gpus``, ...): the backend offers at least the value asked;
- sets (``app_software``, ``host_queues``): the backend lists every item asked;
- anything else (``processor_type``, ``processor_architecture``, labels):
  the backend declares the same value (case-insensitive).

``computing_units`` and ``memory_size`` are also what a running task holds
on its backend (see :mod:`runtime._scheduler`): a backend that declares none
offers the runtime's task slots and its share of the host's memory.
"""

from __future__ import annotations

from typing import Any
from store import hooks


def constraints(**kwargs: Any) -> dict:
    """PyCOMPSs-style keyword constraints, normalised (``MemorySize=1`` -> ``memory_size: 1.0``)."""
    out: dict = {}
    for name, value in kwargs.items():
        if value is None:
            continue
        key, val = hooks.normalise_resource(name, value)
        out[key] = val
    return out


def unmet(required: dict, offered: dict) -> list[str]:
    """The constraints of ``required`` that ``offered`` does not meet, as ``name=value`` text."""
    missing = []
    for key, want in required.items():
        have = offered.get(key)
        if key in hooks.NUMERIC_RESOURCES:
            ok = have is not None and float(have) >= float(want)
        elif key in hooks.LIST_RESOURCES:
            ok = have is not None and set(want) <= set(have)
        else:
            ok = have is not None and str(have).lower() == str(want).lower()
        if not ok:
            missing.append(f"{key}={want!r} (offered: {have!r})")
    return missing


def satisfies(required: dict, offered: dict) -> bool:
    """True when a backend offering ``offered`` may run a task requiring ``required``."""
    return not unmet(required, offered)
