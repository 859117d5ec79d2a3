"""``dataclay.exceptions`` resolved to store.compat.dataclay.exceptions (same classes)."""

from store.compat.dataclay.exceptions import *  # noqa: F401,F403
from store.compat.dataclay.exceptions import __all__  # noqa: F401
