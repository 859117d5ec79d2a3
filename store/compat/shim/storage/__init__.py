"""The ``storage`` package PyCOMPSs imports, resolved to claypot (store.compat.compss)."""
