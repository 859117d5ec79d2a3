"""``import dataclay`` resolved to claypot's dataClay layer (store.compat.dataclay).

This package exists only on the shim path (see store.compat). If a real
dataClay is installed later on the path, importing this one fails loudly
rather than hiding it.
"""

import importlib.machinery as _machinery
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
for _entry in _sys.path:
    if _os.path.abspath(_entry or ".") == _here:
        continue
    if _machinery.PathFinder.find_spec("dataclay", [_entry or "."]) is not None:
        raise ImportError(
            f"a real dataClay is installed in {_entry}; claypot's shim is "
            f"earlier on the path and will not hide it: remove the shim from "
            f"PYTHONPATH or uninstall dataclay"
        )

from store.compat.dataclay import *  # noqa: E402,F401,F403
from store.compat.dataclay import __all__, __version__  # noqa: E402,F401

__claypot_shim__ = True
