"""Every way around the token that was found, each closed: one test per hole.

Each test plays the attacker against real processes (a real redis-server, real
backends) and checks both that the attack fails and that nothing it aimed at
changed.
"""

import json
import os
import pickle
import stat
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest
import redis

import store
from store import LocalCluster, StorageObject, errors
from store._client import shm
from store._directory.directory import Directory
from store._wire.generated import claypot_pb2 as pb
from store._util.security import DirectoryKeys, process_identity, token_matches

pytestmark = pytest.mark.timeout(180)


class Vault(StorageObject):
    """A class only the tests define: it is shipped by value into the code registry."""

    def __init__(self, secret):
        self.secret = secret
        self.active = 0

    def read(self):
        return self.secret

    def _private(self):
        return "private"

    def slow(self):
        # Counts how many calls are inside this object at once.
        self.active += 1
        peak = self.active
        time.sleep(0.4)
        self.active -= 1
        return peak

    def big(self, n):
        import numpy

        return numpy.zeros(n, dtype=numpy.uint8)


class Exploit:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _raw(address, method, request, response_cls, token=None, timeout=10):
    with grpc.insecure_channel(address) as channel:
        fn = channel.unary_unary(f"/claypot.v1.Backend/{method}")
        metadata = [("claypot-token", token)] if token is not None else None
        return response_cls.FromString(fn(request.SerializeToString(), metadata=metadata, timeout=timeout))


def _redis(cluster) -> redis.Redis:
    return redis.Redis.from_url(cluster.redis_url, socket_timeout=5)


# -- Redis -------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_redis_needs_its_password(cluster):
    plain = redis.Redis(port=cluster.redis.port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        plain.hgetall("claypot:code")
    # The password is not on any command line other users can read.
    for proc in [cluster.redis.proc] + [p.proc for p in cluster.processes]:
        cmdline = " ".join(process_identity(proc.pid)["cmdline"])
        assert cluster.redis.password not in cmdline
        assert cluster.token not in cmdline
    assert _redis(cluster).ping()  # with it, Redis answers
    conf = os.path.join(cluster.redis.data_dir, "redis.conf")
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    # Error messages name the Redis URL, never its password.
    from store._directory.directory import redact_url

    assert cluster.redis.password not in redact_url(cluster.redis_url)
    assert Directory(cluster.redis_url).url.endswith(f":***@127.0.0.1:{cluster.redis.port}/0")


def test_forged_code_entry_is_never_unpickled(tmp_path):
    """A Redis writer replaces a class's code with a payload: backends refuse to load it."""
    marker = str(tmp_path / "pwned")
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c")) as c:
        v = Vault("gold")
        v.make_persistent(alias="vault")
        r = _redis(c)
        (key,) = [k for k in r.hkeys("claypot:code") if b"Vault" in k]
        r.hset("claypot:code", key, pickle.dumps(Exploit(marker)))
        # Also an entry signed with a key derived from a guessed (wrong) token.
        forged = DirectoryKeys.from_token("guess").seal_code(key.decode(), pickle.dumps(Exploit(marker)))
        r.hset("claypot:code", b"x:" + key, forged)
        c.restart(c.backends[0], kill=True)  # its class cache is gone: it must reload
        fresh = store.connect(c.address, c.token)
        # The backend reloads the class from the code kept in its own storage dir,
        # never from the forged registry entry.
        assert fresh.get_by_alias("vault").read() == "gold"
        with pytest.raises(errors.ClassNotFound):  # the forged registry entry is refused
            _raise_if_forged(c, key)
        reply = _raw(c.address, "GetCode", pb.GetCodeRequest(key="x:" + key.decode()), pb.GetCodeReply, c.token)
        assert reply.error.code == "ClassNotFound" and not reply.code
        assert not os.path.exists(marker)
        # A token holder registering the class again heals the entry.
        Directory(c.redis_url, token=c.token).put_code(key.decode(), b"not a pickle")
        assert Directory(c.redis_url, token=c.token).get_code(key.decode()) == b"not a pickle"


def _raise_if_forged(c, key: bytes) -> None:
    reply = _raw(c.address, "GetCode", pb.GetCodeRequest(key=key.decode()), pb.GetCodeReply, c.token)
    if reply.HasField("error"):
        raise errors.by_code(reply.error.code)(reply.error.message)


def test_forged_backend_address_is_not_handed_to_clients(cluster):
    r = _redis(cluster)
    fake = uuid.uuid4().hex
    r.hset("claypot:backends", fake, json.dumps({"address": "127.0.0.1:9", "host": "evil", "pid": 1, "started": 0}))
    r.set("claypot:alive:" + fake, "1", px=60_000)
    real_id = cluster.backends[1]
    r.hset("claypot:backends", real_id, json.dumps({"address": "127.0.0.1:9"}))
    try:
        fresh = store.connect(cluster.address, cluster.token)
        listed = {b.backend_id: b.address for b in fresh.backends()}
        assert fake not in listed
        assert "127.0.0.1:9" not in listed.values()
    finally:
        r.hdel("claypot:backends", fake)
        r.delete("claypot:alive:" + fake)


# -- the state file and claypot down --------------------------------------------------------


def test_state_file_and_dir_are_private_from_the_start(tmp_path, monkeypatch):
    from store._ops import cli

    state_dir = tmp_path / "state"
    monkeypatch.setenv("CLAYPOT_STATE_DIR", str(state_dir))
    old = os.umask(0)  # the most permissive umask: modes must not depend on it
    try:
        cli._save_state({"address": "127.0.0.1:1", "token": "t" * 32})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state_dir / "cluster.json").st_mode) == 0o600
    assert cli._load_state()["token"] == "t" * 32
    # A state dir others can write to is refused rather than used.
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    monkeypatch.setenv("CLAYPOT_STATE_DIR", str(open_dir))
    with pytest.raises(errors.ConfigurationError):
        cli._save_state({"token": "x"})
    # One that others may only read (an older claypot made it 0755) is tightened.
    readable = tmp_path / "readable"
    readable.mkdir()
    os.chmod(readable, 0o755)
    monkeypatch.setenv("CLAYPOT_STATE_DIR", str(readable))
    cli._save_state({"token": "y"})
    assert stat.S_IMODE(os.stat(readable).st_mode) == 0o700


def test_cluster_files_are_private(tmp_path):
    """Objects' checkpoints and logs, the Redis AOF, logs and certificates: this user's only."""
    old = os.umask(0o022)  # a usual umask, which would leave files world-readable
    try:
        with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), tls=True) as c:
            v = Vault("on disk")
            v.make_persistent()
            v.secret = "changed"  # a logged change
            data_dir = c.data_dir
            seen = 0
            for root, dirs, files in os.walk(data_dir):
                for name in dirs + files:
                    mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
                    assert not mode & 0o077, (os.path.join(root, name), oct(mode))
                    seen += 1
            assert seen > 5
    finally:
        os.umask(old)


def test_down_signals_only_processes_it_started(tmp_path):
    """A recorded PID now running something else (PID reuse) is left alone."""
    from store._util.security import write_private

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ident = process_identity(bystander.pid)
        state_dir = tmp_path / "state"
        state_dir.mkdir(mode=0o700)
        reused = dict(ident, create_time=ident["create_time"] - 3600, role="backend")
        other_cmd = dict(ident, cmdline=["redis-server"], role="redis")
        write_private(
            str(state_dir / "cluster.json"),
            json.dumps(
                {
                    "address": "127.0.0.1:1",
                    "token": "t",
                    "pids": [bystander.pid],
                    "redis_pid": bystander.pid,
                    "processes": [reused, other_cmd],
                }
            ).encode(),
        )
        env = dict(os.environ, CLAYPOT_STATE_DIR=str(state_dir))
        out = subprocess.run(
            [sys.executable, "-m", "store._ops.cli", "down"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert "not signalled" in out.stdout
        time.sleep(0.3)
        assert bystander.poll() is None, "claypot down signalled a process it did not start"
        # A state file from before identities were recorded: PIDs alone are never signalled,
        # and `up` will not start a second cluster beside what may be the old one.
        write_private(
            str(state_dir / "cluster.json"),
            json.dumps({"address": "127.0.0.1:1", "token": "t", "pids": [bystander.pid], "redis_pid": None}).encode(),
        )
        up = subprocess.run(
            [sys.executable, "-m", "store._ops.cli", "up"], env=env, capture_output=True, text=True, timeout=60
        )
        assert up.returncode == 1 and "older claypot" in up.stderr
        out = subprocess.run(
            [sys.executable, "-m", "store._ops.cli", "down"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0 and str(bystander.pid) in out.stdout
        time.sleep(0.3)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# -- the token check, Ping, listening ---------------------------------------------------------


def test_token_comparison_is_constant_time(monkeypatch):
    import hmac

    from store.backend._service.server import carries_token

    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert carries_token([("claypot-token", "s3cret")], "s3cret")
    assert not carries_token([("claypot-token", "s3cres")], "s3cret")
    assert not carries_token([("claypot-token", "s3")], "s3cret")
    assert not carries_token([("other", "s3cret")], "s3cret")
    assert not token_matches("s3cret", None)
    assert token_matches("pässwörd", "pässwörd")
    assert len(calls) >= 3  # every comparison went through compare_digest


def test_wrong_token_is_refused_and_ping_says_only_serving(cluster):
    with pytest.raises(grpc.RpcError) as info:
        _raw(
            cluster.address,
            "ListBackends",
            pb.ListBackendsRequest(),
            pb.ListBackendsReply,
            token=cluster.token[:-1] + ("0" if cluster.token[-1] != "0" else "1"),
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    anonymous = _raw(cluster.address, "Ping", pb.PingRequest(), pb.PingReply)
    assert anonymous.status == "serving"
    assert (anonymous.backend_id, anonymous.host, anonymous.address, anonymous.pid) == ("", "", "", 0)
    known = _raw(cluster.address, "Ping", pb.PingRequest(), pb.PingReply, cluster.token)
    assert known.status == "serving" and known.backend_id == cluster.backends[0]


def test_backend_refuses_an_open_address_without_a_token(cluster, tmp_path):
    from store.backend._service.server import check_listen

    env = dict(os.environ, CLAYPOT_TOKEN="", CLAYPOT_REDIS=cluster.redis_url)
    out = subprocess.run(
        [sys.executable, "-m", "store.backend", "--data-dir", str(tmp_path / "b"), "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "without a token" in out.stderr and "--insecure" in out.stderr
    # Only an explicit --insecure accepts it (checked without opening the port).
    check_listen(store.Settings.from_env({}, host="0.0.0.0", insecure=True))
    check_listen(store.Settings.from_env({}, host="127.0.0.1"))  # loopback: fine
    check_listen(store.Settings.from_env({}, host="0.0.0.0", token="t"))  # a token: fine
    # A hosted Dask worker joins only a TLS scheduler, with the cluster's certificates.
    with pytest.raises(errors.ConfigurationError, match="without TLS"):
        check_listen(store.Settings.from_env({}, dask_scheduler="tcp://127.0.0.1:8786"))
    with pytest.raises(errors.ConfigurationError, match="without TLS"):
        check_listen(store.Settings.from_env({}, dask_scheduler="tls://127.0.0.1:8786"))
    check_listen(store.Settings.from_env({}, dask_scheduler="tls://127.0.0.1:8786", dask_tls_dir=str(tmp_path)))
    check_listen(store.Settings.from_env({}, dask_scheduler="tcp://127.0.0.1:8786", insecure=True))


# -- shared memory -------------------------------------------------------------------------


@pytest.mark.skipif(not shm.available(), reason="no /dev/shm")
def test_shm_refuses_symlinks_foreign_modes_and_sweeps_orphans(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"keep me" * 10)
    link = f"{shm.PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    os.symlink(target, os.path.join(shm.SHM_DIR, link))
    with pytest.raises(errors.ProtocolError):
        shm.attach([link], [70])
    assert target.read_bytes() == b"keep me" * 10
    # A segment another process could have written (mode 0644) is refused too.
    loose = f"{shm.PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    path = os.path.join(shm.SHM_DIR, loose)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    os.fchmod(fd, 0o644)
    os.write(fd, b"x" * 16)
    os.close(fd)
    with pytest.raises(errors.ProtocolError):
        shm.attach([loose], [16])
    assert not os.path.exists(path)
    # Orphans: a segment whose creator is dead goes, a live creator's stays.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = f"{shm.PREFIX}{dead.pid}-{uuid.uuid4().hex}"
    (mine,) = shm.export([b"y" * 32])
    with open(os.path.join(shm.SHM_DIR, orphan), "wb") as f:
        f.write(b"z")
    shm.remove_orphans()  # younger than the TTL: it may still be claimed, so it stays
    assert os.path.exists(os.path.join(shm.SHM_DIR, orphan))
    old = time.time() - 2 * shm.RESULT_TTL
    os.utime(os.path.join(shm.SHM_DIR, orphan), (old, old))
    assert shm.remove_orphans() >= 1
    assert not os.path.exists(os.path.join(shm.SHM_DIR, orphan))
    # Whatever its age, a segment whose creator still runs is not an orphan.
    shm.remove_orphans(min_age=0)
    assert os.path.exists(os.path.join(shm.SHM_DIR, mine))
    shm.discard([mine])


@pytest.mark.slow
@pytest.mark.skipif(not shm.available(), reason="no /dev/shm")
def test_backend_sweeps_orphans_at_start_and_unclaimed_results_on_a_timer(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{dead.pid}-{uuid.uuid4().hex}")
    with open(orphan, "wb") as f:
        f.write(b"left by a kill -9")
    os.utime(orphan, (time.time() - 60, time.time() - 60))  # older than the TTL below
    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), backend_env={"CLAYPOT_RESULT_TTL": "1"}) as c:
        assert not os.path.exists(orphan)
        v = Vault("x")
        v.make_persistent()
        args = pickle.dumps(((4 << 20,), {}), protocol=5)
        reply = _raw(
            c.address,
            "Call",
            pb.CallRequest(
                object_id=v.getID(),
                kind=pb.METHOD,
                name="big",
                chain_id="c1",
                accept_shm=True,
                args=pb.Value(payload=args),
            ),
            pb.CallReply,
            c.token,
        )
        assert not reply.HasField("error") and reply.result.shm
        names = list(reply.result.shm)
        assert all(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in names)
        # Nobody claims them and nothing else moves: the timer removes them.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in names):
            time.sleep(0.2)
        assert not any(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in names)
        # The same for a streamed result nobody fetched: dropped, not kept for ever.
        reply = _raw(
            c.address,
            "Call",
            pb.CallRequest(object_id=v.getID(), kind=pb.METHOD, name="big", chain_id="c2", args=pb.Value(payload=args)),
            pb.CallReply,
            c.token,
        )
        assert reply.result_handle
        time.sleep(3)
        with grpc.insecure_channel(c.address) as channel:
            chunks = list(
                channel.unary_stream("/claypot.v1.Backend/FetchResult")(
                    pb.FetchRequest(result_handle=reply.result_handle).SerializeToString(),
                    metadata=[("claypot-token", c.token)],
                    timeout=10,
                )
            )
        first = pb.Chunk.FromString(chunks[0])
        assert pb.CallReply.FromString(first.header).error.code == "ObjectNotFound"


# -- CallJson and raw calls ------------------------------------------------------------------


def test_call_json_reaches_public_names_only(cluster):
    v = Vault("json-secret")
    v.make_persistent(backend=cluster.backends[0])
    for kind, name in [
        (pb.METHOD, "_private"),
        (pb.METHOD, "__reduce_ex__"),
        (pb.GET_ATTR, "__class__"),
        (pb.GET_ATTR, "_claypot_id"),
        (pb.GET_ATTR, "__dict__"),
        (pb.SET_ATTR, "_claypot_backend"),
        (pb.METHOD, "read.__globals__"),
        (pb.METHOD, ""),
    ]:
        reply = _raw(
            cluster.address,
            "CallJson",
            pb.JsonCallRequest(
                object_id=v.getID(), kind=kind, name=name, args_json="[1]" if kind == pb.SET_ATTR else ""
            ),
            pb.JsonCallReply,
            cluster.token,
        )
        assert reply.error.code == "ProtocolError", (name, reply)
    ok = _raw(
        cluster.address,
        "CallJson",
        pb.JsonCallRequest(object_id=v.getID(), kind=pb.METHOD, name="read"),
        pb.JsonCallReply,
        cluster.token,
    )
    assert json.loads(ok.result_json) == "json-secret"
    assert v.read() == "json-secret" and v.getID()


def test_raw_calls_without_a_chain_do_not_share_an_object_lock(cluster):
    v = Vault("lock")
    v.make_persistent(backend=cluster.backends[0])
    peaks = []

    def call():
        reply = _raw(
            cluster.address,
            "Call",
            pb.CallRequest(object_id=v.getID(), kind=pb.METHOD, name="slow"),
            pb.CallReply,
            cluster.token,
            timeout=30,
        )
        peaks.append(pickle.loads(reply.result.payload))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(peaks) == [1, 1, 1]  # one at a time inside the object


# -- Dask ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_dask_scheduler_refuses_clients_without_the_cluster_certificate(tmp_path):
    import distributed
    from store.certs import make_cluster_certs

    with LocalCluster(backends=1, data_dir=str(tmp_path / "c"), dask=True, connect=False) as c:
        assert c.dask_scheduler.startswith("tls://")
        plain = c.dask_scheduler.replace("tls://", "tcp://")
        with pytest.raises((OSError, TimeoutError)):
            distributed.Client(plain, timeout=3, set_as_default=False)
        # TLS with a certificate from another CA (an attacker's own): refused too.
        other = make_cluster_certs(str(tmp_path / "other"))
        with pytest.raises((OSError, TimeoutError)):
            distributed.Client(c.dask_scheduler, timeout=3, set_as_default=False, security=other.dask_security())
        # The cluster's own certificate gets in, and reaches the backend's worker.
        with distributed.Client(
            c.dask_scheduler, timeout=30, set_as_default=False, security=c.certs.dask_security()
        ) as ok:
            assert c.backends[0] in {w["name"] for w in ok.scheduler_info()["workers"].values()}
        mode = stat.S_IMODE(os.stat(c.certs.key).st_mode)
        assert mode == 0o600


@pytest.mark.slow
def test_tls_is_one_flag(tmp_path):
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c"), tls=True) as c:
        v = Vault("over tls")
        v.make_persistent(alias="tls-vault", backend=c.backends[1])
        assert store.get_by_alias("tls-vault").read() == "over tls"
        # A plaintext client gets nowhere.
        with pytest.raises(grpc.RpcError):
            _raw(c.address, "Ping", pb.PingRequest(), pb.PingReply, timeout=3)


@pytest.mark.slow
def test_claypot_up_tls_serves_tls_and_status_finds_the_ca(tmp_path):
    env = dict(os.environ, CLAYPOT_STATE_DIR=str(tmp_path / "state"))
    env.pop("CLAYPOT_ADDRESS", None)
    env.pop("CLAYPOT_TLS_CA", None)
    cli = [sys.executable, "-m", "store._ops.cli"]
    up = subprocess.run(
        cli + ["up", "--tls", "--backends", "1", "--data-dir", str(tmp_path / "data")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert up.returncode == 0, up.stderr
        assert "CLAYPOT_TLS_CA=" in up.stdout
        status = subprocess.run(cli + ["status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "1 backend(s), 1 up" in status.stdout, status.stderr
        address = up.stdout.split("CLAYPOT_ADDRESS=")[1].split()[0]
        with pytest.raises(grpc.RpcError):  # plaintext gets nowhere
            _raw(address, "Ping", pb.PingRequest(), pb.PingReply, timeout=3)
    finally:
        down = subprocess.run(cli + ["down"], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "stopped" in down.stdout
