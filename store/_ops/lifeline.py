"""Children that die with the process that started them.

A ``LocalCluster`` owned by a script or a notebook kernel must not outlive it:
a ``kill -9`` of the owner (what a Jupyter kernel restart does) gives it no
chance to run ``stop()``. Two mechanisms cover that:

- every child is started with ``PR_SET_PDEATHSIG`` (Linux ``prctl``), so the
  kernel sends it SIGTERM when the thread that started it exits;
- a small reaper process watches the owner and, once it is gone, waits for the
  recorded children to exit (SIGKILL after a grace period) and removes the
  cluster's temporary directory, which no child can remove for itself.
"""

from __future__ import annotations

from typing import Any
import json
import os
import signal
import subprocess
import sys
import threading
import queue
import time

# Run by a fresh interpreter in place of the child: arm PDEATHSIG, check the
# parent is still there, then exec the real program (the setting survives exec).
# A preexec_fn would do the same in the forked child, but Python code between
# fork and exec in a process with gRPC's threads can deadlock or abort.
_ARM = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(1, int(sys.argv[1]), 0, 0, 0)\n"
    "os.getppid() == int(sys.argv[2]) or os._exit(1)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def die_with_parent(argv: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """``argv`` run so that the child receives ``sig`` when this process dies.

    Unchanged where ``prctl`` is unavailable (not Linux): the reaper and
    ``atexit`` still apply there.
    """
    if not sys.platform.startswith("linux"):
        return list(argv)
    import shutil

    program = argv[0] if os.path.isabs(argv[0]) else (shutil.which(argv[0]) or argv[0])
    return [sys.executable, "-S", "-c", _ARM, str(int(sig)), str(os.getpid()), program, *argv[1:]]


_spawner_lock = threading.Lock()
_spawner_queue: "queue.Queue | None" = None


def _spawner_loop(q: Any) -> None:
    while True:
        args, kwargs, outcome, done = q.get()
        try:
            outcome["proc"] = subprocess.Popen(*args, **kwargs)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()


def popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` run from one thread that lives as long as this process.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that started the child ends,
    not the process: a child started from a short-lived thread (a test's
    killer thread, a notebook's background task) would be killed with it.
    """
    global _spawner_queue
    with _spawner_lock:
        if _spawner_queue is None:
            _spawner_queue = queue.Queue()
            threading.Thread(target=_spawner_loop, args=(_spawner_queue,), name="claypot-spawner", daemon=True).start()
    outcome: dict = {}
    done = threading.Event()
    _spawner_queue.put((args, kwargs, outcome, done))
    done.wait()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["proc"]


def start_reaper(owner: int, pid_file: str, remove_dir: str) -> subprocess.Popen:
    """Start the reaper of a cluster owned by ``owner`` (see the module docstring)."""
    return subprocess.Popen(
        [sys.executable, "-m", "store._ops.lifeline", str(owner), pid_file, remove_dir],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _identity_matches(rec: dict) -> bool:
    import psutil

    try:
        return abs(psutil.Process(rec["pid"]).create_time() - rec["started"]) < 0.01
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        return False


def _reap(owner: int, pid_file: str, remove_dir: str, grace: float = 15.0) -> None:
    import shutil

    # The reaper is the owner's child: once the owner is gone, it is re-parented.
    while os.getppid() == owner:
        if not os.path.isdir(remove_dir):
            return  # the owner stopped its cluster cleanly
        time.sleep(0.25)
    try:
        with open(pid_file) as f:
            children = json.load(f)
    except (OSError, ValueError):
        children = []
    deadline = time.monotonic() + grace
    # PDEATHSIG already sent them SIGTERM; send it again for children that
    # started without it (another platform), then wait.
    for rec in children:
        if _identity_matches(rec):
            try:
                os.kill(rec["pid"], signal.SIGTERM)
            except OSError:
                pass
    while time.monotonic() < deadline and any(_identity_matches(r) for r in children):
        time.sleep(0.1)
    for rec in children:
        if _identity_matches(rec):
            try:
                os.kill(rec["pid"], signal.SIGKILL)
            except OSError:
                pass
    shutil.rmtree(remove_dir, ignore_errors=True)


if __name__ == "__main__":
    _reap(int(sys.argv[1]), sys.argv[2], sys.argv[3])
