"""TLS between clients and backends (and between backends), with certificates made here."""

import os
import shutil
import subprocess
import time

import pytest

import store
from store import LocalCluster, StorageObject, errors

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


class Box(StorageObject):
    def __init__(self, value):
        self.value = value
        self.peer = None

    def through_peer(self):
        return self.peer.value


def make_certs(d) -> dict:
    """A CA and a backend certificate for 127.0.0.1 / localhost, signed by it."""

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=claypot test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "backend.key",
        "-out",
        "backend.csr",
        "-subj",
        "/CN=localhost",
    )
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "backend.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "backend.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    return {
        "CLAYPOT_TLS_CA": os.path.join(d, "ca.pem"),
        "CLAYPOT_TLS_CERT": os.path.join(d, "backend.pem"),
        "CLAYPOT_TLS_KEY": os.path.join(d, "backend.key"),
    }


@pytest.mark.slow
def test_cluster_over_tls(tmp_path, monkeypatch):
    certs = make_certs(str(tmp_path))
    monkeypatch.setenv("CLAYPOT_TLS_CA", certs["CLAYPOT_TLS_CA"])
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c"), backend_env=certs) as c:
        a, b = Box(1), Box(2)
        b.make_persistent(backend=c.backends[1])
        a.make_persistent(alias="tls-box", backend=c.backends[0])
        a.peer = b
        assert a.through_peer() == 2  # backend to backend, over TLS too
        assert store.get_by_alias("tls-box").value == 1

        # A client without the CA cannot talk to a TLS backend: a clear error, no hang.
        monkeypatch.delenv("CLAYPOT_TLS_CA")
        monkeypatch.setenv("CLAYPOT_RECONNECT_TIMEOUT", "1")
        plain = store.client().__class__(c.address, c.token)
        started = time.monotonic()
        with pytest.raises(errors.BackendUnavailable):
            plain.backends()
        assert time.monotonic() - started < 10
        plain.close()


def test_tls_settings_are_checked(tmp_path):
    with pytest.raises(errors.ConfigurationError):
        store.Settings.from_env({}, tls_cert=str(tmp_path / "missing.pem"), tls_key=str(tmp_path / "missing.key"))
    with pytest.raises(errors.ConfigurationError):
        store.Settings.from_env({}, tls_cert=__file__)
