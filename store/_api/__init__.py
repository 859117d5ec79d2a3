"""The application API behind ``store/__init__.py``: connecting, looking objects up,
placement, and the ``Alien`` wrapper. Public names are re-exported by ``store``."""
