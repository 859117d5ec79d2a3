"""Backends as SLURM jobs: a cluster that grows and shrinks through ``sbatch``/``scancel``.

    engine = SlurmCluster(redis_url, token, data_dir="/shared/claypot")
    engine.scale(4, resources="computing_units=16,memory_size=64")   # four jobs
    runtime.elastic.Autoscaler(engine, minimum=1, maximum=16).start()

Each backend is one batch job (``sbatch --wrap``) running
``python -m store.backend``; SLURM's scheduler decides where it runs, claypot
only asks for jobs and cancels them. The job reads the token and the Redis
URL from private files in ``data_dir`` (never from its command line or the
environment SLURM stores with the job). ``data_dir`` must be visible from
the nodes at the same path (a shared filesystem, the usual SLURM set-up):
the job writes its address there when it serves. A backend that leaves is
drained first (:func:`store.elastic.drain`), then its job gets ``SIGTERM``
(a graceful stop) through ``scancel``. Every ``sbatch``/``squeue``/``scancel``
call has a deadline.

``host`` is the address a backend listens on: ``127.0.0.1`` (default, one
machine) or ``0.0.0.0`` on a real cluster, where it registers its node's own
address.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from .errors import ConfigurationError

COMMAND_TIMEOUT = 30.0  # seconds any SLURM command may take


def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT, env: dict | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise ConfigurationError(f"{argv[0]} not found: SLURM's client commands must be on PATH")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConfigurationError(f"{shlex.join(argv)} did not answer within {timeout:.0f}s") from None
    if out.returncode != 0:
        raise ConfigurationError(f"{shlex.join(argv)} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return out.stdout


@dataclass
class SlurmBackend:
    """One backend job: its SLURM job id and, once it serves, its address and backend id."""

    job_id: str
    data_dir: str
    address: str = ""
    backend_id: str = ""
    pid: int = 0
    gone: bool = False

    def state(self) -> str:
        """The job's SLURM state (``PENDING``, ``RUNNING``, ...), or ``""`` once it left."""
        out = _run(["squeue", "-h", "-j", self.job_id, "-o", "%T"])
        return out.strip().splitlines()[0] if out.strip() else ""

    def alive(self) -> bool:
        return not self.gone and self.state() in ("PENDING", "CONFIGURING", "RUNNING")


class SlurmCluster:
    """Backends started as SLURM jobs (see the module docstring). Has ``scale(n)`` for
    :class:`runtime.elastic.Autoscaler`."""

    def __init__(
        self,
        redis_url: str,
        token: str,
        data_dir: str,
        host: str = "127.0.0.1",
        partition: str = "",
        sbatch_args: list[str] | None = None,
        start_timeout: float = 120.0,
    ):
        if not redis_url or not token:
            raise ConfigurationError("a SLURM cluster needs the Redis URL and the token")
        self.redis_url, self.token = redis_url, token
        self.data_dir = os.path.abspath(data_dir)
        self.host = host
        self.partition = partition
        self.sbatch_args = list(sbatch_args or [])
        self.start_timeout = start_timeout
        self.processes: list[SlurmBackend] = []
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self._secrets = os.path.join(self.data_dir, "secrets")
        os.makedirs(self._secrets, mode=0o700, exist_ok=True)
        for name, value in (("token", token), ("redis", redis_url)):
            path = os.path.join(self._secrets, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(value)

    @property
    def backends(self) -> list[str]:
        """Ids of the backends serving, in start order."""
        return [p.backend_id for p in self.processes if p.backend_id and not p.gone]

    def size(self) -> int:
        """Backend jobs queued or running."""
        return len([p for p in self.processes if p.alive()])

    def _script(self, work: str, resources: str) -> str:
        py = os.pathsep.join(p for p in sys.path if p)
        args = [
            sys.executable,
            "-m",
            "store.backend",
            "--data-dir",
            work,
            "--host",
            self.host,
            "--port",
            "0",
            "--ready-file",
            os.path.join(work, "ready.json"),
        ]
        if resources:
            args += ["--resources", resources]
        tok, red = (shlex.quote(os.path.join(self._secrets, n)) for n in ("token", "redis"))
        return (
            f'export CLAYPOT_TOKEN="$(cat {tok})" CLAYPOT_REDIS="$(cat {red})" '
            f"PYTHONPATH={shlex.quote(py)}; exec {shlex.join(args)}"
        )

    def add_backend(self, resources: str | None = None) -> SlurmBackend:
        """Submit one backend job and wait until it serves."""
        work = os.path.join(self.data_dir, f"backend-{len(self.processes)}")
        os.makedirs(work, mode=0o700, exist_ok=True)
        ready = os.path.join(work, "ready.json")
        if os.path.exists(ready):
            os.unlink(ready)
        argv = [
            "sbatch",
            "--parsable",
            "--job-name",
            "claypot-backend",
            "--ntasks",
            "1",
            "--output",
            os.path.join(work, "job-%j.log"),
            "--export",
            "NONE",
        ]
        if self.partition:
            argv += ["--partition", self.partition]
        argv += self.sbatch_args + ["--wrap", self._script(work, resources or "")]
        job = SlurmBackend(_run(argv).strip().split(";")[0], work)
        self.processes.append(job)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with open(ready) as f:
                    info = json.load(f)
                break
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() > deadline:
                self._cancel(job)
                raise ConfigurationError(
                    f"SLURM job {job.job_id} did not serve a backend within {self.start_timeout:.0f}s (see {work})"
                )
            if job.state() == "":
                job.gone = True
                raise ConfigurationError(
                    f"SLURM job {job.job_id} ended before serving (see {work}/job-{job.job_id}.log)"
                )
            time.sleep(0.1)
        job.address, job.backend_id, job.pid = info["address"], info["backend_id"], info["pid"]
        return job

    def scale(self, n: int, resources: str | None = None) -> list[str]:
        """Grow or shrink to ``n`` backend jobs; the backend ids that joined or left.

        New ones are announced to this process's runtime at once; leaving ones
        (newest first) are drained, then cancelled.
        """
        from .elastic import joined

        if n < 0:
            raise ConfigurationError("a SLURM cluster cannot have fewer than 0 backends")
        live = [p for p in self.processes if p.alive()]
        changed = []
        for _ in range(n - len(live)):
            changed.append(self.add_backend(resources).backend_id)
            joined(changed[-1])
        for p in reversed(live[n:]):
            self.drain(p.backend_id)
            changed.append(p.backend_id)
        return changed

    def drain(self, backend_id: str, targets: list[str] | None = None) -> int:
        """Move a backend's objects to the other backends, then end its job; how many moved."""
        from store._api import api
        from .elastic import drain, retire

        job = next((p for p in self.processes if p.backend_id == backend_id), None)
        if job is None:
            raise KeyError(backend_id)
        client = api.client()
        if targets is None:
            targets = [b.backend_id for b in client.backends() if b.up and b.backend_id != backend_id]
        moved = drain(client, self.redis_url, self.token, backend_id, targets)
        self._cancel(job)
        retire(self.redis_url, self.token, backend_id)
        return moved

    def _cancel(self, job: SlurmBackend, timeout: float = 30.0) -> None:
        # SIGTERM to the batch step: the backend stops gracefully (flushes, unregisters).
        _run(["scancel", "--batch", "--signal=TERM", job.job_id])
        deadline = time.monotonic() + timeout
        while job.state() and time.monotonic() < deadline:
            time.sleep(0.1)
        if job.state():
            _run(["scancel", job.job_id])
        job.gone = True

    def stop(self) -> None:
        """Cancel every backend job this engine started (no drain: the cluster is ending)."""
        for job in self.processes:
            if not job.gone:
                try:
                    self._cancel(job)
                except ConfigurationError:
                    pass
