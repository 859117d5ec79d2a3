"""One rank of an ``@mpi`` task that runs a Python function (under mpi4py).

``mpirun -np N python -m runtime.mpi_rank CALL OUTDIR``: every rank loads the
function and its arguments from ``CALL`` (cloudpickle), calls it, and writes
``OUTDIR/rank-<r>.pkl`` with its result, or its exception. The backend that
runs the task collects them in rank order. A rank that can reach the
cluster (``CLAYPOT_ADDRESS`` and ``CLAYPOT_TOKEN`` are set by the backend)
connects first, so persistent objects among the arguments work as proxies.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    import cloudpickle

    call_path, out_dir = argv
    try:
        from mpi4py import MPI
    except ImportError as exc:
        print(f"@mpi Python tasks need mpi4py on the backend: {exc}", file=sys.stderr)
        return 3
    rank = MPI.COMM_WORLD.Get_rank()
    if os.environ.get("CLAYPOT_ADDRESS"):
        import store

        try:
            store.connect()
        except Exception as exc:  # the function may not need the cluster at all
            print(f"rank {rank}: not connected to the cluster: {exc}", file=sys.stderr)
    with open(call_path, "rb") as f:
        fn, kwargs = cloudpickle.loads(f.read())
    try:
        outcome = (True, fn(**kwargs))
    except BaseException as exc:  # noqa: BLE001 - carried back to the task
        outcome = (False, exc)
    data = cloudpickle.dumps(outcome)
    tmp = os.path.join(out_dir, f".rank-{rank}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(out_dir, f"rank-{rank}.pkl"))
    return 0 if outcome[0] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
