"""``storage.api``, the storage runtime interface PyCOMPSs calls: claypot's
store.compat.compss (same functions and classes)."""

from store.compat.compss import *  # noqa: F401,F403
from store.compat.compss import __all__  # noqa: F401
