"""What a backend offers to tasks: its resources, as PyCOMPSs names them.

A backend declares them with ``--resources`` / ``CLAYPOT_RESOURCES``, a
comma-separated list of ``name=value`` pairs::

    CLAYPOT_RESOURCES="computing_units=4,memory_size=6,processor_type=ARM,gpus=1,zone=edge"

Names follow PyCOMPSs' ``@constraint`` keywords and may be written either
way (``computing_units`` or ``computingUnits``, ``memory_size`` or
``MemorySize``); :func:`canonical` turns them into snake case. A name
PyCOMPSs does not define is a label: a task that asks for it runs only on a
backend declaring the same value. What is not declared is detected where
that is reliable (the machine's architecture and operating system); memory
and computing units are not guessed, because several backends may share a
host. The backend publishes the result in its heartbeat (``resources`` in
``claypot status``, ``resources_json`` in ``ListBackends``).
"""

from __future__ import annotations

from typing import Any
import platform
import re

from store.errors import ConfigurationError

# Constraint names whose values are quantities: a backend satisfies a task when
# it offers at least as much. Memory and storage are in GiB, speeds in GHz,
# bandwidth in MB/s, wall_clock_limit in seconds, as in PyCOMPSs.
NUMERIC = frozenset(
    {
        "computing_units",
        "memory_size",
        "processor_speed",
        "processor_performance",
        "processor_internal_memory_size",
        "storage_size",
        "storage_bw",
        "gpus",
        "wall_clock_limit",
    }
)
# Names whose values are comma-separated sets: the task's set must be contained.
LISTS = frozenset({"host_queues", "app_software"})

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")  # "GPU" stays one word


def canonical(name: str) -> str:
    """``computingUnits``/``ComputingUnits``/``computing_units`` -> ``computing_units``."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"a resource name must be a non-empty string, not {name!r}")
    name = name.strip()
    if "_" not in name:
        name = _CAMEL.sub("_", name)
    return name.lower()


def normalise(name: str, value: Any) -> tuple[str, object]:
    """(canonical name, value) with quantities as floats and strings stripped."""
    key = canonical(name)
    if key in NUMERIC:
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise ConfigurationError(f"resource {key} must be a number, not {value!r}") from None
        if num < 0:
            raise ConfigurationError(f"resource {key} must be >= 0, not {value!r}")
        return key, num
    if key in LISTS:
        items = value if isinstance(value, (list, tuple)) else str(value).split(";")
        return key, sorted({str(i).strip() for i in items if str(i).strip()})
    return key, str(value).strip()


def parse(text: str) -> dict:
    """The resources declared by ``text`` (``name=value,...``); a clear error if malformed."""
    out: dict = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise ConfigurationError(
                f"resources: {part!r} is not name=value (for example computing_units=4,memory_size=8)"
            )
        key, val = normalise(name, value)
        out[key] = val
    return out


def detect() -> dict:
    """What this machine says about itself, for names a backend did not declare."""
    return {
        "processor_architecture": platform.machine() or "unknown",
        "operating_system_type": platform.system() or "unknown",
    }


def declared(text: str) -> dict:
    """Detected values overlaid with the declared ones (declarations win)."""
    return {**detect(), **parse(text)}
