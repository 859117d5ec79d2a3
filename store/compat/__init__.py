"""Compatibility layers: claypot behind other systems' APIs.

- :mod:`store.compat.dataclay` mirrors dataClay 4's public API.
- :mod:`store.compat.compss` is the storage runtime interface PyCOMPSs calls
  (its ``storage.api`` module).

Applications import them by these names, or, to run unchanged, put the shim
directory on the import path so that ``import dataclay`` and
``import storage.api`` resolve to them::

    export PYTHONPATH="$(python -m store.compat)${PYTHONPATH:+:$PYTHONPATH}"

or, inside a program, ``store.compat.enable()``. Both refuse to hide a real
dataClay: ``enable()`` raises ConfigurationError when one is importable, and
the shim's ``dataclay`` package raises ImportError when it finds a real one
later on the path, so nobody gets claypot by accident.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

from ..errors import ConfigurationError

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim")


def shim_path() -> str:
    """The directory to put on the import path (holds ``dataclay`` and ``storage``)."""
    return SHIM_DIR


def real_dataclay() -> str | None:
    """Where a real dataClay is installed (outside the shim), or None."""
    for entry in sys.path:
        if os.path.abspath(entry or ".") == SHIM_DIR:
            continue
        spec = importlib.machinery.PathFinder.find_spec("dataclay", [entry or "."])
        if spec is not None:
            return spec.origin or entry
    return None


def enable() -> None:
    """Make ``import dataclay`` and ``import storage.api`` resolve to claypot's layers.

    Appends the shim directory to ``sys.path`` (last, so nothing installed is
    shadowed). Raises ConfigurationError if a real dataClay is installed, or if
    ``dataclay`` was already imported from elsewhere.
    """
    found = real_dataclay()
    if found is not None:
        raise ConfigurationError(
            f"a real dataClay is installed ({found}); claypot will not shadow it. "
            f"Import store.compat.dataclay by name instead, or uninstall dataclay"
        )
    loaded = sys.modules.get("dataclay")
    if loaded is not None and not getattr(loaded, "__claypot_shim__", False):
        raise ConfigurationError(f"dataclay is already imported from {loaded.__file__}")
    if SHIM_DIR not in sys.path:
        sys.path.append(SHIM_DIR)
