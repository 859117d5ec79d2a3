"""``python -m store.compat`` prints the shim directory (for PYTHONPATH)."""

from . import real_dataclay, shim_path

if __name__ == "__main__":
    found = real_dataclay()
    if found is not None:
        raise SystemExit(f"a real dataClay is installed ({found}); not printing the shim path")
    print(shim_path())
