"""dataClay 4.3.1 on this machine: the yardstick of bench_calls' make_persistent and 8-thread figures.

dataClay is not a dependency of claypot (not even an extra): it pins its own
grpcio, protobuf and redis. Install it into a separate virtualenv and point
this bench at that interpreter::

    python3 -m venv /tmp/dcvenv && /tmp/dcvenv/bin/pip install dataclay==4.3.1
    python bench/bench_dataclay.py --python /tmp/dcvenv/bin/python

(or set ``CLAYPOT_DATACLAY_PYTHON``). It starts a redis-server (the one claypot
finds), a dataClay metadata service and one dataClay backend, all on
127.0.0.1 with free ports, and measures from one client process, with the
same shapes as bench/bench_calls.py:

- ``make_persistent_per_s``: one small object per call, one caller;
- ``method_call``: p50/p99 of a read-only ``@activemethod`` call;
- ``threads_8_calls_per_s``: read-only calls from 8 threads, one object each.

Note what dataClay's make_persistent promises: the object lives in the
backend's memory and reaches disk when evicted or at shutdown, so its rate
includes no fsync; claypot's (under ``sync``) does.

Prints one JSON document; ``{"available": false, ...}`` when no interpreter
with dataClay is given.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

MODEL = """
from dataclay import DataClayObject, activemethod


class DCounter(DataClayObject):
    value: int

    @activemethod
    def __init__(self, value=0):
        self.value = value

    @activemethod
    def get(self):
        return self.value
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def client(args) -> None:
    """Runs under the dataClay interpreter: the measurements."""
    sys.path.insert(0, args.model_dir)
    from dataclay import Client
    from dc_model import DCounter

    c = Client(host="127.0.0.1", port=args.metadata_port)
    c.start()
    out: dict = {}
    try:
        for i in range(100):
            DCounter(i).make_persistent()
        objs = [DCounter(i) for i in range(args.objects)]
        t = time.perf_counter()
        for o in objs:
            o.make_persistent()
        out["make_persistent_per_s"] = round(args.objects / (time.perf_counter() - t))
        o = objs[0]
        for _ in range(100):
            o.get()
        samples = []
        for _ in range(args.calls):
            t = time.perf_counter()
            o.get()
            samples.append((time.perf_counter() - t) * 1e6)
        samples.sort()
        out["method_call"] = {
            "p50_us": round(samples[len(samples) // 2], 1),
            "p99_us": round(samples[int(len(samples) * 0.99)], 1),
        }
        done = [0] * 8
        stop = time.perf_counter() + args.seconds

        errors: list = []

        def caller(k):
            obj = objs[k]
            n = 0
            try:
                while time.perf_counter() < stop:
                    obj.get()
                    n += 1
            except Exception as exc:  # reported below: a silent zero would mislead
                errors.append(repr(exc))
            done[k] = n

        # dataClay keeps its session in a context variable: each thread runs in a copy.
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(caller, k)) for k in range(8)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        out["threads_8_calls_per_s"] = round(sum(done) / (time.perf_counter() - t))
        if errors:
            out["threads_8_errors"] = errors[:3]
    finally:
        c.stop()
    print(json.dumps(out))


def run(python: str, objects: int = 2000, calls: int = 2000, seconds: float = 4.0) -> dict:
    """Start dataClay under ``python``, measure, stop it; the client's JSON as a dict."""
    sys.path.insert(0, os.path.dirname(HERE))
    from store._ops.cluster import RedisProcess

    work = tempfile.mkdtemp(prefix="dataclay-bench-")
    with open(os.path.join(work, "dc_model.py"), "w") as f:
        f.write(MODEL)
    redis = RedisProcess(os.path.join(work, "redis")).start()
    procs: list[subprocess.Popen] = []
    try:
        md_port, be_port = _free_port(), _free_port()
        env = dict(
            os.environ,
            PYTHONPATH=work,
            DATACLAY_KV_HOST="127.0.0.1",
            DATACLAY_KV_PORT=str(redis.port),
            DATACLAY_METADATA_HOST="127.0.0.1",
            DATACLAY_METADATA_PORT=str(md_port),
            DATACLAY_METADATA_LISTEN_ADDRESS="127.0.0.1",
            DATACLAY_BACKEND_HOST="127.0.0.1",
            DATACLAY_BACKEND_PORT=str(be_port),
            DATACLAY_BACKEND_LISTEN_ADDRESS="127.0.0.1",
            DATACLAY_STORAGE_PATH=os.path.join(work, "storage"),
            DATACLAY_LOGLEVEL="WARNING",
        )
        log = open(os.path.join(work, "services.log"), "wb")
        md = subprocess.Popen(
            [python, "-m", "dataclay.metadata"], env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT
        )
        procs.append(md)
        _wait_port(md_port, md, "dataClay metadata service")
        be = subprocess.Popen(
            [python, "-m", "dataclay.backend"], env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT
        )
        procs.append(be)
        _wait_port(be_port, be, "dataClay backend")
        time.sleep(1.0)  # the backend registers itself in the metadata after listening
        res = subprocess.run(
            [
                python,
                os.path.abspath(__file__),
                "--client",
                "--model-dir",
                work,
                "--metadata-port",
                str(md_port),
                "--objects",
                str(objects),
                "--calls",
                str(calls),
                "--seconds",
                str(seconds),
            ],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if res.returncode != 0:
            raise RuntimeError(f"dataClay client failed: {res.stderr[-2000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        out["available"] = True
        out["version"] = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('dataclay'))"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        return out
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        redis.stop()


def python_from_env() -> str:
    """The interpreter with dataClay that CLAYPOT_DATACLAY_PYTHON names, or ""."""
    return os.environ.get("CLAYPOT_DATACLAY_PYTHON", "")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--python", default=python_from_env())
    p.add_argument("--objects", type=int, default=2000)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--metadata-port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client:
        client(a)
        return
    if not a.python:
        print(json.dumps({"available": False, "reason": "no --python / CLAYPOT_DATACLAY_PYTHON with dataclay"}))
        return
    print(json.dumps(run(a.python, a.objects, a.calls, a.seconds), indent=2))


if __name__ == "__main__":
    main()
