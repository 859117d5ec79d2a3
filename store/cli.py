"""The ``claypot`` command: up, status, down, demo, backend, repair."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from . import api
from .errors import ClaypotError
from .security import private_dir, process_identity, read_private, same_process, write_private


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


def cmd_up(a) -> int:
    from .cluster import LocalCluster
    old = _load_state()
    if old and "processes" not in old and any(_pid_exists(p) for p in _legacy_pids(old)):
        # Written by an older claypot: PIDs without identities. Something runs at
        # them; it may be that cluster, on the same storage dirs, so do not start.
        print(f"a cluster recorded by an older claypot may still be running (PIDs "
              f"{', '.join(map(str, _legacy_pids(old)))}); stop it, then remove "
              f"{api.state_file()}")
        return 1
    if old and _running(old):
        print(f"a cluster is already running at {old['address']} (claypot down to stop it)")
        return 1
    data_dir = os.path.abspath(a.data_dir or os.path.join(os.path.dirname(api.state_file()),
                                                          "data"))
    cluster = LocalCluster(backends=a.backends, data_dir=data_dir, redis=a.redis,
                           token=(old or {}).get("token") if old and
                           old.get("data_dir") == data_dir else None,
                           durability=a.durability, memory_limit=a.memory_limit, connect=False,
                           tls=a.tls)
    cluster.start()
    pids = [p.pid for p in cluster.processes]
    redis_pid = cluster.redis.proc.pid if cluster.redis else None
    # Start time and command line of each process, so `claypot down` never
    # signals a PID that has since been reused by some other program.
    processes = [dict(process_identity(pid) or {"pid": pid}, role=role)
                 for pid, role in [(p, "backend") for p in pids] + [(redis_pid, "redis")]
                 if pid]
    state = {"address": cluster.address, "token": cluster.token, "data_dir": data_dir,
             "redis": cluster.redis_url, "pids": pids, "redis_pid": redis_pid,
             "processes": processes, "backends": cluster.backends}
    if cluster.tls_ca:
        state["tls_ca"] = cluster.tls_ca
    _save_state(state)
    print(f"claypot cluster up: {a.backends} backend(s), data in {data_dir}")
    print(f"  export CLAYPOT_ADDRESS={cluster.address}")
    print(f"  export CLAYPOT_TOKEN={cluster.token}")
    if cluster.tls_ca:
        print(f"  export CLAYPOT_TLS_CA={cluster.tls_ca}")
    print("  (store.connect() with no arguments finds this cluster too)")
    return 0


def cmd_down(a) -> int:
    state = _load_state()
    if not state:
        print("no cluster recorded (nothing to stop)")
        return 0
    start = time.monotonic()
    recorded = _recorded(state)
    skipped = [p["pid"] for p in recorded if p.get("pid") and not same_process(p)]
    if "processes" not in state:
        skipped += [p for p in _legacy_pids(state) if _pid_exists(p)]
    backends = [p for p in recorded if p.get("role") != "redis" and same_process(p)]
    redis = [p for p in recorded if p.get("role") == "redis" and same_process(p)]
    _stop_verified(backends, 15)
    _stop_verified(redis, 10)   # after the backends, which deregister through it
    os.unlink(api.state_file())
    if skipped:
        print(f"not signalled (gone, or the PID now belongs to another process): "
              f"{', '.join(map(str, skipped))}")
    print(f"claypot cluster stopped in {time.monotonic() - start:.2f}s "
          f"(data kept in {state.get('data_dir')})")
    return 0


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


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_status(rows) -> str:
    head = f"{'BACKEND':<10} {'STATE':<6} {'ADDRESS':<22} {'HOST':<14} {'PID':>7} " \
           f"{'OBJECTS':>8} {'IN MEMORY':>9} {'RSS':>10}"
    lines = [head]
    for b in rows:
        lines.append(f"{b.backend_id[:8]:<10} {'up' if b.up else 'DOWN':<6} {b.address:<22} "
                     f"{b.host[:14]:<14} {b.pid:>7} {b.objects:>8} {b.resident_objects:>9} "
                     f"{_human(b.memory_bytes):>10}")
    total = sum(b.objects for b in rows)
    lines.append(f"{len(rows)} backend(s), {sum(1 for b in rows if b.up)} up, {total} object(s)")
    return "\n".join(lines)


def cmd_status(a) -> int:
    api.connect(a.address, a.token)
    print(format_status(api.backends()))
    return 0


def cmd_repair(a) -> int:
    """Rebuild the directory from storage dirs (after Redis lost its data)."""
    from .backend.storage import read_backend_id, scan_storage_dir
    from .directory import Directory
    state = _load_state() or {}
    url = a.redis or state.get("redis")
    dirs = a.data_dirs or [os.path.join(state.get("data_dir", ""), d)
                           for d in sorted(os.listdir(state.get("data_dir", ".")))
                           if d.startswith("backend-")] if state else a.data_dirs
    if not url or not dirs:
        print("repair needs --redis URL and storage dirs (or a cluster from claypot up)")
        return 2
    directory = Directory(url)
    total = 0
    for d in dirs:
        backend_id = read_backend_id(d)
        if backend_id is None:
            print(f"{d}: not a claypot storage dir (no backend.id), skipped")
            continue
        # Read-only scan: the dir's backend may be running.
        entries = [(oid, backend_id, key, alias) for oid, key, alias in scan_storage_dir(d)]
        for i in range(0, len(entries), 1000):
            directory.claim(entries[i:i + 1000])
        total += len(entries)
        print(f"{d}: {len(entries)} object(s) registered")
    directory.ensure_epoch()
    print(f"directory rebuilt: {total} object(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "backend":
        from .backend.server import main as backend_main
        backend_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="claypot", description="claypot persistent object store")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a local cluster in the background")
    up.add_argument("--backends", type=int, default=2)
    up.add_argument("--data-dir")
    up.add_argument("--redis", help="use this Redis URL instead of an embedded one")
    up.add_argument("--durability", choices=["sync", "async", "none"])
    up.add_argument("--memory-limit")
    up.add_argument("--tls", action="store_true",
                    help="make a private CA and certificate for this cluster and serve TLS "
                         "(needs the cryptography package)")
    st = sub.add_parser("status", help="backends and objects of the running cluster")
    st.add_argument("--address")
    st.add_argument("--token")
    sub.add_parser("down", help="stop the cluster started by claypot up")
    demo = sub.add_parser("demo", help="run the demo on a fresh local cluster")
    demo.add_argument("--backends", type=int, default=2)
    demo.add_argument("--address", help="run on this running cluster instead of a new one")
    demo.add_argument("--token")
    rp = sub.add_parser("repair", help="rebuild the Redis directory from storage dirs")
    rp.add_argument("--redis")
    rp.add_argument("data_dirs", nargs="*")
    sub.add_parser("backend", help="run one backend (see claypot backend --help)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "demo":
            from .demo import run
            return run(a.backends, a.address, a.token)
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status,
                "repair": cmd_repair}[a.cmd](a)
    except ClaypotError as exc:
        print(f"claypot {a.cmd}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
