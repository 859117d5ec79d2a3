"""File parameters and external programs: what runs on the backend around a task.

A task with ``FILE_*`` parameters, or a ``@binary``/``@mpi`` task, runs
through a :class:`TaskRunner`. In a cluster the runtime sends each input
file's bytes with the task (as an argument: large ones are streamed by the
store like any large value, no shared filesystem is assumed); the runner
writes them into a private directory on the backend, calls the function (or
the program) with those local paths, and returns the bytes of every file the
task wrote. The runtime keeps them as a new version of the file on the
program's side (:class:`FileVersions`); ``compss_wait_on_file`` copies the
last version to the path the program named. With no cluster (inline) the
runner works on the paths themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
import inspect
import io
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field

from store.errors import ConfigurationError, TaskError

from runtime._directions import Direction


@dataclass
class FileValue:
    """A file parameter as it travels to a backend: its name and (for inputs) its bytes."""

    name: str
    data: bytes | None = None
    directory: bool = False  # data is a tar archive of the directory's contents
    shared_in: str | None = None  # on a shared filesystem: the version to read
    shared_out: str | None = None  # ... and where to write the new one


def pack(directory: str) -> bytes:
    """A directory's tree as one uncompressed tar archive (paths relative to it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for entry in sorted(os.listdir(directory)):
            tar.add(os.path.join(directory, entry), arcname=entry)
    return buf.getvalue()


def unpack(data: bytes, directory: str) -> None:
    """Extract ``pack``'s archive into ``directory``, refusing links and paths outside it."""
    os.makedirs(directory, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        if hasattr(tarfile, "data_filter"):
            try:
                tar.extractall(directory, filter="data")
            except tarfile.FilterError as exc:
                raise TaskError(f"refusing archive member: {exc}") from None
            return
        # A Python without extraction filters: check each member the same way.
        root = os.path.realpath(directory)
        for m in tar.getmembers():
            target = os.path.realpath(os.path.join(root, m.name))
            if not (m.isfile() or m.isdir()) or os.path.isabs(m.name) or os.path.commonpath([root, target]) != root:
                raise TaskError(
                    f"refusing archive member {m.name!r}: only plain files and directories inside the tree travel"
                )
        tar.extractall(directory)


@dataclass
class FileResult:
    """What a runner returns from a backend: the task's value and the files it wrote."""

    value: object
    outputs: dict = field(default_factory=dict)  # parameter name -> bytes


class TaskRunner:
    """Runs one task's function or program with its file parameters (see the module docstring).

    ``files`` maps parameter names to their file directions; ``program``
    (``@binary``/``@mpi``) describes the command to run instead of the function.
    """

    def __init__(self, fn: Callable[..., Any], files: dict, program: dict | None) -> None:
        self.fn = fn
        self.files = dict(files)
        self.program = program
        self.__qualname__ = getattr(fn, "__qualname__", "task")
        self.__name__ = getattr(fn, "__name__", "task")

    def __call__(self, *args, **kwargs):
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        values = bound.arguments
        work = tempfile.mkdtemp(prefix="claypot-task-")
        remote: dict[str, str] = {}
        try:
            for name, direction in self.files.items():
                v = values.get(name)
                if isinstance(v, FileValue) and (v.shared_in or v.shared_out):
                    if v.shared_out:
                        if v.shared_in and direction.reads_file:
                            shutil.copyfile(v.shared_in, v.shared_out)
                        values[name] = v.shared_out
                    else:
                        values[name] = v.shared_in
                    continue
                if isinstance(v, FileValue):
                    local = os.path.join(work, name, os.path.basename(v.name) or name)
                    os.makedirs(os.path.dirname(local), exist_ok=True)
                    if v.directory:
                        os.makedirs(local, exist_ok=True)
                        if v.data is not None:
                            unpack(v.data, local)
                    elif v.data is not None:
                        with open(local, "wb") as f:
                            f.write(v.data)
                    values[name] = local
                    remote[name] = local
            if self.program is not None:
                result = run_program(self.program, self.fn, values, self.files)
            else:
                result = self.fn(*bound.args, **bound.kwargs)
            if not remote:
                return result
            outs = {}
            for name, local in remote.items():
                if not self.files[name].writes or not os.path.exists(local):
                    continue
                if self.files[name].directory:
                    outs[name] = pack(local)
                else:
                    with open(local, "rb") as f:
                        outs[name] = f.read()
            return FileResult(result, outs)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def command_line(program: dict, fn: Callable[..., Any], values: dict, files: dict) -> list[str]:
    """The argv of a ``@binary``/``@mpi`` task: runner, program, then its parameters.

    Parameters become arguments in the function's order (stream parameters
    excluded); ``args="-n {{n}} {{path}}"`` places them by name instead.
    """
    params = [
        p
        for p in inspect.signature(fn).parameters
        if not (p in files and files[p] in (Direction.FILE_OUT_STDOUT, Direction.FILE_OUT_STDERR))
    ]
    template = program.get("args")
    if template:
        text = template
        for p in params:
            text = text.replace("{{" + p + "}}", shlex.quote(str(values.get(p, ""))))
        tail = shlex.split(text)
    else:
        tail = []
        for p in params:
            v = values.get(p)
            if v is None:
                continue
            tail.extend(str(x) for x in v) if isinstance(v, (list, tuple)) else tail.append(str(v))
    argv = shlex.split(program["binary"]) + tail
    if program["kind"] == "mpi":
        runner = program.get("runner") or "mpirun"
        n = str(int(program.get("processes") or 1))
        flags = shlex.split(program.get("flags") or "")
        if os.path.basename(runner) == "mpirun":
            pre = [runner, "-np", n]
            # Open MPI refuses root and more ranks than cores unless told otherwise.
            if _as_root():
                pre.append("--allow-run-as-root")
            pre.append("--oversubscribe")
        elif os.path.basename(runner) == "srun":
            pre = [runner, "-n", n]
        else:
            pre = [runner, "-n", n]
        argv = pre + flags + argv
    return argv


def _mpi_prefix(program: dict) -> list[str]:
    runner = program.get("runner") or "mpirun"
    n = str(int(program.get("processes") or 1))
    flags = shlex.split(program.get("flags") or "")
    if os.path.basename(runner) == "mpirun":
        pre = [runner, "-np", n]
        # Open MPI refuses root and more ranks than cores unless told otherwise.
        if _as_root():
            pre.append("--allow-run-as-root")
        pre.append("--oversubscribe")
    else:
        pre = [runner, "-n", n]
    return pre + flags


def run_python_ranks(program: dict, fn: Callable[..., Any], values: dict) -> list:
    """Run ``fn(**values)`` on every rank of an MPI job; the ranks' results, in order."""
    import sys

    import cloudpickle

    work = tempfile.mkdtemp(prefix="claypot-mpi-")
    try:
        call = os.path.join(work, "call.pkl")
        with open(call, "wb") as f:
            f.write(cloudpickle.dumps((fn, dict(values))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        from store.hooks import backend_gateway

        gateway = backend_gateway()
        if gateway is not None:  # inside a backend: the ranks reach the cluster through it
            env["CLAYPOT_ADDRESS"], env["CLAYPOT_TOKEN"] = gateway
        argv = _mpi_prefix(program) + [sys.executable, "-m", "runtime.mpi_rank", call, work]
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=program.get("working_dir") or None,
                env=env,
                check=False,
            )
        except FileNotFoundError:
            raise TaskError(f"task {fn.__qualname__}: {argv[0]!r} not found") from None
        results = []
        for rank in range(int(program.get("processes") or 1)):
            path = os.path.join(work, f"rank-{rank}.pkl")
            if not os.path.exists(path):
                tail = proc.stderr[-500:].decode("utf-8", "replace").strip()
                raise TaskError(
                    f"task {fn.__qualname__}: rank {rank} left no result "
                    f"({shlex.join(argv[:3])}... exited with {proc.returncode})" + (f": {tail}" if tail else "")
                )
            with open(path, "rb") as f:
                ok, value = cloudpickle.loads(f.read())
            if not ok:
                raise value
            results.append(value)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_program(program: dict, fn: Callable[..., Any], values: dict, files: dict) -> Any:
    """Run a ``@binary``/``@mpi`` task's command; its exit code, or TaskError when it fails.

    An ``@mpi`` task without a binary runs ``fn`` on every rank (see
    :func:`run_python_ranks`) and its value is the list of their results.
    """
    if program["kind"] == "mpi_python":
        return run_python_ranks(program, fn, values)
    argv = command_line(program, fn, values, files)
    streams = {Direction.FILE_OUT_STDOUT: None, Direction.FILE_OUT_STDERR: None}
    for p, d in files.items():
        if d in streams and values.get(p):
            streams[d] = values[p]
    cwd = program.get("working_dir") or None
    out = open(streams[Direction.FILE_OUT_STDOUT], "wb") if streams[Direction.FILE_OUT_STDOUT] else subprocess.DEVNULL
    err_path = streams[Direction.FILE_OUT_STDERR]
    err = open(err_path, "wb") if err_path else subprocess.PIPE
    try:
        try:
            proc = subprocess.run(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd, check=False)
        except FileNotFoundError:
            raise TaskError(f"task {fn.__qualname__}: program {argv[0]!r} not found") from None
    finally:
        for f in (out, err):
            if hasattr(f, "close"):
                f.close()
    if proc.returncode != 0 and program.get("fail_by_exit_value", True):
        tail = ""
        if err_path:
            with open(err_path, "rb") as f:
                tail = f.read()[-500:].decode("utf-8", "replace")
        elif proc.stderr:
            tail = proc.stderr[-500:].decode("utf-8", "replace")
        raise TaskError(
            f"task {fn.__qualname__}: {shlex.join(argv)} exited with "
            f"{proc.returncode}" + (f": {tail.strip()}" if tail.strip() else "")
        )
    return proc.returncode


class FileVersions:
    """Versions of the files tasks write, kept on the program's side.

    Version 0 of a path is the file the program named; version n > 0 is
    kept in a private directory until ``final`` copies it back.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._dir: str | None = None
        self.current: dict[str, int] = {}  # path -> newest version number handed out
        self.directories: set[str] = set()  # paths whose versions are tar archives
        self.stored: dict[tuple[str, int], str] = {}

    @staticmethod
    def canonical(path: str | os.PathLike) -> str:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigurationError(f"a FILE parameter must be a path, not {path!r}")
        return os.path.abspath(os.fspath(path))

    def key(self, path: str, version: int) -> str:
        """The dependency key of one version of a file."""
        return f"file:{path}@{version}"

    def read_version(self, path: str) -> int:
        with self._lock:
            return self.current.get(path, 0)

    def new_version(self, path: str) -> tuple[int, int]:
        """(version read, version written) for a task that writes ``path``."""
        with self._lock:
            old = self.current.get(path, 0)
            self.current[path] = old + 1
            return old, old + 1

    def location(self, path: str, version: int) -> str:
        if version == 0:
            return path
        with self._lock:
            where = self.stored.get((path, version))
        if where is None:
            raise TaskError(f"version {version} of {path} was never written (the task that should write it failed)")
        return where

    def read(self, path: str, version: int, directory: bool = False) -> bytes:
        """The bytes of one version (of a directory: a tar archive of its tree)."""
        where = self.location(path, version)
        if directory and version == 0:
            return pack(where)
        with open(where, "rb") as f:
            return f.read()

    def store(self, path: str, version: int, data: bytes) -> None:
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="claypot-files-")
            where = os.path.join(self._dir, f"{len(self.stored)}-{os.path.basename(path)}")
        with open(where, "wb") as f:
            f.write(data)
        with self._lock:
            self.stored[(path, version)] = where

    def close(self) -> None:
        """Drop the versions kept (the runtime that made them is ending)."""
        with self._lock:
            where, self._dir = self._dir, None
            self.stored.clear()
        if where is not None:
            shutil.rmtree(where, ignore_errors=True)

    def adopt(self, path: str, version: int, where: str) -> None:
        """Record a version a task wrote in place (on the shared filesystem)."""
        with self._lock:
            self.stored[(path, version)] = where

    def final(self, path: str) -> str:
        """Copy the newest version back to ``path`` (call once its writer finished)."""
        with self._lock:
            v = self.current.get(path, 0)
            where = self.stored.get((path, v)) if v else None
        if where is None:
            return path
        tmp = path + ".claypot-tmp"
        if path in self.directories:
            shutil.rmtree(tmp, ignore_errors=True)
            with open(where, "rb") as f:
                unpack(f.read(), tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        else:
            shutil.copyfile(where, tmp)
            os.replace(tmp, path)
        return path
