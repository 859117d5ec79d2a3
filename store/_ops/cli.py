"""The ``claypot`` command: up, status, restart, logs, forget, down, demo, backend,
repair, health.

Built on click (help for every flag, shell completion through click's
``_CLAYPOT_COMPLETE`` variable: ``eval "$(_CLAYPOT_COMPLETE=bash_source claypot)"``),
with rich for the status table when the output is a terminal.

Exit codes: 0 success; 1 an error (its type and message on stderr); 2 a usage
error; 3 ``status`` found a backend down.
"""

from __future__ import annotations

from typing import Any, NoReturn
import json
import os
import signal
import sys
import time

import click

from store._api import api
from store.errors import ClaypotError
from store._ops.status_table import COLUMNS, format_status, status_row, status_summary
from store._util.security import private_dir, process_identity, read_private, same_process, write_private

EXIT_BACKEND_DOWN = 3
CLUSTER_FILE = "cluster.json"  # in the data dir: ports, token, Redis password to reuse


def _save_state(state: dict) -> None:
    # It holds the token and the Redis password: created 0600 in a 0700 dir,
    # never readable by anyone else, not even for a moment.
    path = api.state_file()
    private_dir(os.path.dirname(path))
    write_private(path, json.dumps(state, indent=2).encode())


def _load_state() -> dict | None:
    try:
        return json.loads(read_private(api.state_file()))
    except (FileNotFoundError, ValueError):
        return None


def _recorded(state: dict) -> list[dict]:
    """The processes a state file records (backends first, then Redis)."""
    procs = state.get("processes")
    if procs is not None:
        return [p for p in procs if isinstance(p, dict)]
    # A state file written before identities were recorded: PIDs alone are not
    # enough to signal safely, so nothing from it is ever signalled.
    return []


def _legacy_pids(state: dict) -> list[int]:
    pids = [p for p in state.get("pids", []) if isinstance(p, int)]
    if isinstance(state.get("redis_pid"), int):
        pids.append(state["redis_pid"])
    return pids


def _pid_exists(pid: int) -> bool:
    import psutil

    return pid > 0 and psutil.pid_exists(pid)


def _running(state: dict) -> list[dict]:
    """Recorded processes that are still the very processes claypot started."""
    return [p for p in _recorded(state) if same_process(p)]


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


def _need_state() -> dict:
    state = _load_state()
    if not state:
        _fail(f"no cluster recorded in {api.state_file()} (start one with `claypot up`)")
    return state


def _member(state: dict, name: str) -> dict:
    """The recorded backend whose id starts with ``name`` (or whose index is ``name``)."""
    members = state.get("members", [])
    hits = [m for m in members if m["backend_id"].startswith(name)]
    if name.isdigit() and int(name) < len(members) and not hits:
        hits = [members[int(name)]]
    if len(hits) != 1:
        known = ", ".join(m["backend_id"][:8] for m in members) or "none"
        _fail(f"{'no' if not hits else 'more than one'} backend matches {name!r} (backends: {known})")
    return hits[0]


# -- the command group ---------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("claypot")
    except PackageNotFoundError:
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", "-V", prog_name="claypot", message="%(prog)s %(version)s")
def cli() -> None:
    """claypot: a persistent object store for Python.

    `claypot up` starts a local cluster in the background and records it in
    ~/.claypot/cluster.json (CLAYPOT_STATE_DIR moves it); the other commands
    act on that cluster. Shell completion (bash):
    eval "$(_CLAYPOT_COMPLETE=bash_source claypot)"
    """


@cli.command()
@click.option(
    "--backends", type=click.IntRange(min=1), default=2, show_default=True, help="Number of backend processes."
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Where objects, logs and Redis data live [default: next to the state "
    "file]. An existing one is reused with its ports and token.",
)
@click.option("--redis", metavar="URL", help="Use this Redis instead of an embedded one.")
@click.option(
    "--durability",
    type=click.Choice(["sync", "async", "none"]),
    help="When a change is acknowledged (see the README) [default: sync].",
)
@click.option("--memory-limit", metavar="SIZE", help="Per backend: bytes, 512MiB, or a fraction of RAM like 0.25.")
@click.option("--tls", is_flag=True, help="Make a private CA and serve TLS (needs the cryptography package).")
@click.option("--new-token", is_flag=True, help="Make a new token instead of reusing the data dir's.")
@click.option("--new-ports", is_flag=True, help="Pick new ports instead of reusing the data dir's.")
def up(
    backends: int,
    data_dir: str | None,
    redis: str | None,
    durability: str | None,
    memory_limit: str | None,
    tls: bool,
    new_token: bool,
    new_ports: bool,
) -> None:
    """Start a local cluster in the background."""
    from store._ops.cluster import LocalCluster, port_is_free

    old = _load_state()
    if old and "processes" not in old and any(_pid_exists(p) for p in _legacy_pids(old)):
        # Written by an older claypot: PIDs without identities. Something runs at
        # them; it may be that cluster, on the same storage dirs, so do not start.
        _fail(
            f"a cluster recorded by an older claypot may still be running (PIDs "
            f"{', '.join(map(str, _legacy_pids(old)))}); stop it, then remove "
            f"{api.state_file()}"
        )
    if old and _running(old):
        dead = [m for m in old.get("members", []) if not same_process(m.get("process") or {})]
        msg = f"a cluster is already running ({api.state_file()}); `claypot down` stops it"
        if dead:
            msg += "; down: " + ", ".join(
                f"{m['backend_id'][:8]} ({m['address']}): `claypot restart {m['backend_id'][:8]}`" for m in dead
            )
        _fail(msg)
    data_dir = os.path.abspath(data_dir or os.path.join(os.path.dirname(api.state_file()), "data"))
    reuse = _load_cluster_file(data_dir)
    token = None if new_token else reuse.get("token")
    ports, redis_port = [], 0
    if not new_ports:
        ports = [p if port_is_free(p) else 0 for p in reuse.get("ports", [])[:backends]]
        for old_port, new in zip(reuse.get("ports", []), ports):
            if not new:
                click.echo(f"port {old_port} is taken: that backend gets a new one", err=True)
        redis_port = reuse.get("redis_port", 0)
        if redis_port and not port_is_free(redis_port):
            redis_port = 0
    cluster = LocalCluster(
        backends=backends,
        data_dir=data_dir,
        redis=redis,
        token=token,
        durability=durability,
        memory_limit=memory_limit,
        connect=False,
        tls=tls,
        ports=ports,
        redis_port=redis_port,
        redis_password=reuse.get("redis_password"),
        detach=True,
    )
    cluster.start()
    members: list[dict[str, Any]] = [
        {
            "backend_id": p.backend_id,
            "address": p.address,
            "port": p.port,
            "data_dir": p.data_dir,
            "process": process_identity(p.pid) or {"pid": p.pid},
        }
        for p in cluster.processes
    ]
    redis_pid = cluster.redis.proc.pid if cluster.redis and cluster.redis.proc else None
    # Start time and command line of each process, so `claypot down` never
    # signals a PID that has since been reused by some other program.
    processes = [dict(m["process"], role="backend") for m in members]
    if redis_pid:
        processes.append(dict(process_identity(redis_pid) or {"pid": redis_pid}, role="redis"))
    state = {
        "address": cluster.address,
        "token": cluster.token,
        "data_dir": data_dir,
        "redis": cluster.redis_url,
        "processes": processes,
        "members": members,
        "backends": cluster.backends,
        "backend_args": cluster.backend_args,
        "backend_env": cluster.backend_env,
    }
    if cluster.tls_ca:
        state["tls_ca"] = cluster.tls_ca
    _save_state(state)
    write_private(
        os.path.join(data_dir, CLUSTER_FILE),
        json.dumps(
            {
                "token": cluster.token,
                "ports": [p.port for p in cluster.processes],
                "redis_port": cluster.redis.port if cluster.redis else 0,
                "redis_password": cluster.redis.password if cluster.redis else "",
            }
        ).encode(),
    )
    click.echo(f"claypot cluster up: {backends} backend(s), data in {data_dir}")
    click.echo(f"  export CLAYPOT_ADDRESS={cluster.address}")
    click.echo(f"  export CLAYPOT_TOKEN={cluster.token}")
    if cluster.tls_ca:
        click.echo(f"  export CLAYPOT_TLS_CA={cluster.tls_ca}")
    click.echo(
        "  (store.connect() with no arguments finds this cluster too; a later "
        "`claypot up` on this data dir keeps these values)"
    )


def _load_cluster_file(data_dir: str) -> dict:
    try:
        found = json.loads(read_private(os.path.join(data_dir, CLUSTER_FILE)))
    except (FileNotFoundError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


@cli.command()
def down() -> None:
    """Stop the cluster started by `claypot up` (its data is kept)."""
    state = _load_state()
    if not state:
        click.echo("no cluster recorded (nothing to stop)")
        return
    start = time.monotonic()
    recorded = _recorded(state)
    skipped = [p["pid"] for p in recorded if p.get("pid") and not same_process(p)]
    if "processes" not in state:
        skipped += [p for p in _legacy_pids(state) if _pid_exists(p)]
    backends = [p for p in recorded if p.get("role") != "redis" and same_process(p)]
    redis = [p for p in recorded if p.get("role") == "redis" and same_process(p)]
    _stop_verified(backends, 15)
    _stop_verified(redis, 10)  # after the backends, which deregister through it
    os.unlink(api.state_file())
    if skipped:
        click.echo(f"not signalled (gone, or the PID now belongs to another process): {', '.join(map(str, skipped))}")
    click.echo(
        f"claypot cluster stopped in {time.monotonic() - start:.2f}s "
        f"(data kept in {state.get('data_dir')}; delete that directory to wipe it)"
    )


def _stop_verified(procs: list[dict], timeout: float) -> None:
    """SIGTERM each process whose identity still matches, then SIGKILL what outlives timeout."""
    for p in procs:
        if same_process(p):
            os.kill(p["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(same_process(p) for p in procs):
        time.sleep(0.05)
    for p in procs:
        if same_process(p):
            os.kill(p["pid"], signal.SIGKILL)


@cli.command()
@click.argument("backend")
@click.option("--kill", is_flag=True, help="kill -9 instead of a graceful stop.")
def restart(backend: str, kill: bool) -> None:
    """Restart one backend of the `claypot up` cluster on its storage dir and port.

    BACKEND is a backend id (a prefix is enough, as `claypot status` shows it)
    or its index.
    """
    from store._ops.cluster import BackendProcess

    state = _need_state()
    m = _member(state, backend)
    proc = m.get("process") or {}
    if same_process(proc):
        _stop_verified([proc], 0 if kill else 15)
    bp = BackendProcess(
        m["data_dir"],
        state["redis"],
        state["token"],
        port=m["port"],
        env=dict(state.get("backend_env", {})),
        extra_args=list(state.get("backend_args", [])),
    )
    bp.start()
    m.update(address=bp.address, port=bp.port, process=process_identity(bp.pid) or {"pid": bp.pid})
    state["processes"] = [p for p in state.get("processes", []) if p.get("pid") != proc.get("pid")] + [
        dict(m["process"], role="backend")
    ]
    _save_state(state)
    click.echo(f"backend {m['backend_id'][:8]} restarted at {bp.address} (pid {bp.pid})")


@cli.command()
@click.argument("backend")
def drain(backend: str) -> None:
    """Move a backend's objects to the other live backends, then stop it for good.

    BACKEND is a backend id (a prefix is enough) or its index. Tasks stop going
    to it first; it leaves the cluster (and `claypot status`) once empty.
    """
    from store._api import api
    from store.elastic import drain as drain_backend, handed_over, retire

    state = _need_state()
    m = _member(state, backend)
    client = api.connect(state["members"][0]["address"] if state.get("members") else None, state["token"])
    targets = [b.backend_id for b in client.backends() if b.up and b.backend_id != m["backend_id"]]
    if not targets:
        _fail("cannot drain the last live backend: its objects have nowhere to go")
    moved = drain_backend(client, state["redis"], state["token"], m["backend_id"], targets)
    proc = m.get("process") or {}
    if same_process(proc):
        _stop_verified([proc], 15)
        handed_over(state["redis"], state["token"], m["backend_id"])
    retire(state["redis"], state["token"], m["backend_id"])
    state["members"] = [x for x in state.get("members", []) if x is not m]
    state["processes"] = [p for p in state.get("processes", []) if p.get("pid") != proc.get("pid")]
    _save_state(state)
    click.echo(f"backend {m['backend_id'][:8]} drained ({moved} object(s) moved) and stopped")


def _log_files(state: dict, backend: str | None) -> list[tuple[str, str]]:
    members = (
        [_member(state, backend)]
        if backend and backend != "redis"
        else ([] if backend == "redis" else state.get("members", []))
    )
    files = [(m["backend_id"][:8], os.path.join(m["data_dir"], "backend.log")) for m in members]
    if backend in (None, "redis") and state.get("data_dir"):
        files.append(("redis", os.path.join(state["data_dir"], "redis", "redis.log")))
    return files


@cli.command()
@click.argument("backend", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Lines of the end of each log to show first.",
)
def logs(backend: str | None, follow: bool, lines: int) -> None:
    """Show the logs of the `claypot up` cluster: every backend and Redis, or
    BACKEND only (an id prefix, an index, or `redis`). Each line starts with
    whose log it is."""
    state = _need_state()
    files = _log_files(state, backend)
    handles = []
    for name, path in files:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            click.echo(f"[{name}] no log at {path}", err=True)
            continue
        tail = f.read().splitlines()[-lines:] if lines else []
        for line in tail:
            click.echo(f"[{name}] {line.decode('utf-8', 'replace')}")
        handles.append((name, f))
    sys.stdout.flush()
    if not follow:
        return
    try:
        while True:
            quiet = True
            for name, f in handles:
                line = f.readline()
                if line:
                    quiet = False
                    click.echo(f"[{name}] {line.decode('utf-8', 'replace').rstrip()}")
            if quiet:
                sys.stdout.flush()
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass


def _print_table(rows: Any) -> None:
    try:
        if not sys.stdout.isatty():
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # piped, or without the `cli` extra: plain text
        click.echo(format_status(rows))
        return
    table = Table(*COLUMNS, caption=status_summary(rows))
    for b in rows:
        r = list(status_row(b))
        r[1] = "[green]up[/green]" if b.up else f"[bold red]{r[1]}[/bold red]"
        table.add_row(*r)
    Console().print(table)


def message_to_json(msg: Any) -> dict:
    """Every field of a proto message (fields added later included), 64-bit integers
    as JSON numbers rather than the strings of the proto3 JSON mapping."""
    from google.protobuf.descriptor import FieldDescriptor
    from google.protobuf.json_format import MessageToDict

    out = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    wide = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
    for f in msg.DESCRIPTOR.fields:
        if f.cpp_type in wide and f.name in out:
            value = out[f.name]
            out[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return out


@cli.command()
@click.option("--address", help="Any backend's host:port [default: CLAYPOT_ADDRESS, else the `claypot up` cluster].")
@click.option("--token", help="The cluster's token [default: CLAYPOT_TOKEN, else the `claypot up` cluster's].")
@click.option(
    "--json", "as_json", is_flag=True, help="Print every field of every backend as JSON (one object per backend)."
)
def status(address: str | None, token: str | None, as_json: bool) -> None:
    """Backends and objects of the running cluster; exits 3 if any backend is down."""
    client = api.connect(address, token)
    rows = client.backends()
    if as_json:
        click.echo(json.dumps([message_to_json(b) for b in rows], indent=2))
    else:
        _print_table(rows)
    if any(not b.up for b in rows):
        sys.exit(EXIT_BACKEND_DOWN)


@cli.command()
@click.argument("backend")
@click.option("--redis", metavar="URL", help="The directory's Redis [default: the `claypot up` cluster's].")
@click.option("--token", help="The cluster's token [default: the `claypot up` cluster's].")
@click.option("--force", is_flag=True, help="Forget it even though the directory still maps objects to it.")
def forget(backend: str, redis: str | None, token: str | None, force: bool) -> None:
    """Remove a backend that is gone for good from the directory (it stops being
    listed as DOWN). BACKEND is its id or an id prefix. A backend that is up is
    never forgotten."""
    from store._directory.directory import Directory

    state = _load_state() or {}
    url = redis or state.get("redis")
    if not url:
        _fail("forget needs --redis URL (or a cluster from `claypot up`)")
    directory = Directory(url, token=token or state.get("token", ""))
    hits = [b for b in directory.backends() if b["backend_id"].startswith(backend)]
    if len(hits) != 1:
        _fail(f"{'no' if not hits else 'more than one'} backend matches {backend!r}")
    b = hits[0]
    if b["up"]:
        _fail(f"backend {b['backend_id'][:8]} is up: stop it first")
    owned = len(directory.objects_of(b["backend_id"]))
    if owned and not force:
        _fail(
            f"backend {b['backend_id'][:8]} still owns {owned} object(s) in the directory; "
            f"restart it to get them back, or pass --force to forget it anyway"
        )
    directory.forget_backend(b["backend_id"])
    if state.get("members"):
        state["members"] = [m for m in state["members"] if m["backend_id"] != b["backend_id"]]
        _save_state(state)
    click.echo(f"backend {b['backend_id'][:8]} forgotten")


@cli.command()
@click.option(
    "--backends",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Backends of the fresh cluster the demo starts.",
)
@click.option("--address", help="Run on this running cluster instead of a new one.")
@click.option("--token", help="The token of the cluster at --address.")
def demo(backends: int, address: str | None, token: str | None) -> None:
    """Run the demo (objects, calls, a move) on a fresh local cluster."""
    from store._ops.demo import run

    sys.exit(run(backends, address, token))


@cli.command()
@click.option("--redis", metavar="URL", help="The Redis to rebuild [default: the `claypot up` cluster's].")
@click.argument("data_dirs", nargs=-1, type=click.Path(exists=True, file_okay=False))
def repair(redis: str | None, data_dirs: tuple[str, ...]) -> None:
    """Rebuild the Redis directory from storage dirs (after Redis lost its data)."""
    from store.backend._storage.storage import read_backend_id, scan_storage_dir
    from store._directory.directory import Directory

    state = _load_state() or {}
    url = redis or state.get("redis")
    dirs = list(data_dirs)
    if not dirs and state:
        dirs = [
            os.path.join(state.get("data_dir", ""), d)
            for d in sorted(os.listdir(state.get("data_dir", ".")))
            if d.startswith("backend-")
        ]
    if not url or not dirs:
        _fail("repair needs --redis URL and storage dirs (or a cluster from claypot up)", 2)
    directory = Directory(url)
    total = 0
    for d in dirs:
        backend_id = read_backend_id(d)
        if backend_id is None:
            click.echo(f"{d}: not a claypot storage dir (no backend.id), skipped")
            continue
        # Read-only scan: the dir's backend may be running.
        entries = [(oid, backend_id, key, alias) for oid, key, alias in scan_storage_dir(d)]
        for i in range(0, len(entries), 1000):
            directory.claim(entries[i : i + 1000])
        total += len(entries)
        click.echo(f"{d}: {len(entries)} object(s) registered")
    directory.ensure_epoch()
    click.echo(f"directory rebuilt: {total} object(s)")


@cli.command()
@click.argument("address")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the answer.")
def health(address: str, timeout: float) -> None:
    """grpc.health.v1 check of one backend, no token: exit 0 SERVING, 1
    NOT_SERVING, 2 unreachable."""
    from store._wire.polyglot import check_health

    result = check_health(address, timeout)
    click.echo(result)
    sys.exit({"SERVING": 0, "UNREACHABLE": 2}.get(result, 1))


@cli.command()
@click.option("--address", help="A backend host:port (default: the cluster of `claypot up`).")
@click.option("--token", help="The cluster token (default: CLAYPOT_TOKEN or the state file).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve the page on.")
@click.option("--port", type=int, default=8787, show_default=True, help="Port to serve on (0: any free one).")
@click.option("--insecure", is_flag=True, help="Serve a non-loopback address (the page has no login).")
def dashboard(address: str | None, token: str | None, host: str, port: int, insecure: bool) -> None:
    """Serve a live web dashboard of the cluster (needs `pip install 'claypot[dashboard]'`)."""
    from store.dashboard import main as dashboard_main

    argv = ["--host", host, "--port", str(port)]
    if address:
        argv += ["--address", address]
    if token:
        argv += ["--token", token]
    if insecure:
        argv.append("--insecure")
    dashboard_main(argv)


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def backend(args: tuple[str, ...]) -> None:
    """Run one backend in the foreground (see `claypot backend --help`)."""
    from store.backend._service.server import main as backend_main

    backend_main(list(args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `claypot` script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv else ""
    if name == "backend":  # its own flags, parsed by the backend
        from store.backend._service.server import main as backend_main

        backend_main(argv[1:])
        return 0
    try:
        cli.main(args=argv, prog_name="claypot", standalone_mode=False)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click.exceptions.Abort:
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except ClaypotError as exc:
        click.echo(f"claypot {name}: {type(exc).__name__}: {exc}", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
