"""Certificates for one cluster: a private CA and a certificate it signs.

``LocalCluster(tls=True)`` and ``claypot up --tls`` call :func:`make_cluster_certs`
so that TLS is one flag. The CA's key signs one certificate and is then
thrown away: nothing can issue a second certificate that the cluster would
trust. The certificate names the loopback addresses and this host's name,
and serves as server and client certificate alike:

- backends serve gRPC with it (clients verify it against the CA);
- the Dask scheduler, the Dask workers hosted in backends and the runtime's
  Dask client present it to one another; Dask requires the peer's
  certificate, so a Dask client without it is refused.

Needs the ``cryptography`` package (``pip install 'claypot[tls]'``); the rest
of claypot imports without it.
"""

from __future__ import annotations

from typing import Any
import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass

from .errors import ConfigurationError
from store._util.security import private_dir, write_private


@dataclass(frozen=True)
class ClusterCerts:
    """Paths of a cluster's PEM files."""

    ca: str  # the CA certificate: what every party verifies against
    cert: str  # the certificate of the cluster's processes (server and client)
    key: str  # its private key (mode 0600)

    def backend_env(self) -> dict[str, str]:
        """Environment for a backend: serve TLS, verify peers against the CA."""
        return {"CLAYPOT_TLS_CA": self.ca, "CLAYPOT_TLS_CERT": self.cert, "CLAYPOT_TLS_KEY": self.key}

    def dask_security(self) -> Any:
        """A ``distributed.Security`` for the scheduler, workers and clients of the cluster."""
        from distributed import Security

        return Security(
            tls_ca_file=self.ca,
            tls_client_cert=self.cert,
            tls_client_key=self.key,
            tls_scheduler_cert=self.cert,
            tls_scheduler_key=self.key,
            tls_worker_cert=self.cert,
            tls_worker_key=self.key,
            require_encryption=True,
        )


def make_cluster_certs(directory: str, hosts: tuple[str, ...] = (), days: int = 365) -> ClusterCerts:
    """Write a new CA and a certificate it signed into ``directory`` (created 0700)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigurationError("TLS certificates need the cryptography package: pip install 'claypot[tls]'") from None
    private_dir(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "claypot cluster CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for host in (socket.gethostname(), *hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "claypot node")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(names))), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = ClusterCerts(
        ca=os.path.join(directory, "ca.pem"),
        cert=os.path.join(directory, "node.pem"),
        key=os.path.join(directory, "node.key"),
    )
    write_private(paths.ca, ca.public_bytes(serialization.Encoding.PEM))
    write_private(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        paths.key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return paths


def existing_certs(directory: str) -> ClusterCerts | None:
    """The certificates ``make_cluster_certs`` wrote in ``directory``, if all are there."""
    paths = ClusterCerts(
        ca=os.path.join(directory, "ca.pem"),
        cert=os.path.join(directory, "node.pem"),
        key=os.path.join(directory, "node.key"),
    )
    if all(os.path.isfile(p) for p in (paths.ca, paths.cert, paths.key)):
        return paths
    return None


def dask_security(tls_dir: str) -> Any:
    """The ``distributed.Security`` of the cluster whose certificates are in ``tls_dir``."""
    certs = existing_certs(tls_dir)
    if certs is None:
        raise ConfigurationError(f"no cluster certificates (ca.pem, node.pem, node.key) in {tls_dir}")
    return certs.dask_security()


__all__ = ["ClusterCerts", "make_cluster_certs", "existing_certs", "dask_security"]
