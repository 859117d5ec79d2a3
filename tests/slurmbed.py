"""A one-machine SLURM cluster for tests: munged, slurmctld and slurmd as child processes.

Everything lives in one private directory (configuration, state, spool, the
munge socket); the daemons listen on free loopback ports and are stopped by
their PIDs. Needs root (slurmd launches jobs) and Debian's ``slurm-wlm``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from store._ops.cluster import free_port, signal_and_wait

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def missing() -> str:
    """Why this machine cannot run the bed ('' when it can)."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    if not os.path.exists("/etc/munge/munge.key"):
        return "no /etc/munge/munge.key (the munge package makes it)"
    return ""


class SlurmBed:
    def __init__(self, root: str):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.conf = os.path.join(root, "slurm.conf")

    def start(self, timeout: float = 60.0) -> "SlurmBed":
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for d in ("state", "spool"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        node = socket.gethostname().split(".")[0]
        sock = os.path.join(self.root, "munge.sock")
        with open(self.conf, "w") as f:
            f.write(
                "\n".join(
                    [
                        "ClusterName=claypot",
                        f"SlurmctldHost={node}(127.0.0.1)",
                        f"SlurmctldPort={free_port()}",
                        f"SlurmdPort={free_port()}",
                        "AuthType=auth/munge",
                        f"AuthInfo=socket={sock}",
                        "ProctrackType=proctrack/linuxproc",
                        "TaskPlugin=task/none",
                        "SelectType=select/cons_tres",
                        "SelectTypeParameters=CR_Core",
                        "ReturnToService=2",
                        f"StateSaveLocation={self.root}/state",
                        f"SlurmdSpoolDir={self.root}/spool",
                        f"SlurmctldPidFile={self.root}/slurmctld.pid",
                        f"SlurmdPidFile={self.root}/slurmd.pid",
                        "SlurmUser=root",
                        "MpiDefault=none",
                        "JobCompType=jobcomp/none",
                        "AccountingStorageType=accounting_storage/none",
                        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
                        "PartitionName=claypot Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8",
                        "",
                    ]
                )
            )
        os.environ["SLURM_CONF"] = self.conf
        log = open(os.path.join(self.root, "daemons.log"), "ab")
        self.procs.append(
            subprocess.Popen(
                [
                    "munged",
                    "-F",
                    "--force",
                    f"--socket={sock}",
                    f"--pid-file={self.root}/munged.pid",
                    f"--log-file={self.root}/munged.log",
                    f"--seed-file={self.root}/munged.seed",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        )
        self._wait(lambda: os.path.exists(sock), timeout, "munged")
        for daemon in ("slurmctld", "slurmd"):
            self.procs.append(
                subprocess.Popen([daemon, "-D", "-f", self.conf], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            )
        log.close()  # the daemons keep their own copies
        self._wait(self._idle, timeout, "the SLURM node")
        return self

    def _idle(self) -> bool:
        try:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return "idle" in out.stdout

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{p.args[0]} exited ({p.returncode}) while starting {what}; see {self.root}/daemons.log"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready within {timeout:.0f}s; see {self.root}/daemons.log")
            time.sleep(0.2)

    def stop(self) -> None:
        for p in reversed(self.procs):
            signal_and_wait(p, signal.SIGTERM, 15)
        os.environ.pop("SLURM_CONF", None)
