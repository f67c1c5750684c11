"""diagnose_tls against a plain TLS server whose certificate has expired, or does not hold the
address it is reached by (no gRPC needed)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cipherhive.runtime.transport import ClientTLS, TLSSettings, diagnose_tls

pytestmark = pytest.mark.timeout(60)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    start: dt.datetime,
    days: int,
    ca: bool = False,
    names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names or [x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.with_suffix(".key").write_bytes(pem)
        path.with_suffix(".key").chmod(0o600)


@contextmanager
def _server(
    folder: Path, server_start: dt.timedelta, server_days: int, names: list[x509.GeneralName] | None = None
) -> Iterator[int]:
    """A CA, a client pair and a TLS server on 127.0.0.1 whose certificate the CA issued; its port.

    The server serves a few handshakes (diagnose_tls may connect twice: once to verify, once to
    read the names the certificate holds).
    """
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, None, now - dt.timedelta(days=400), 800, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _cert("server", server_key, ("test-ca", ca_key), now + server_start, server_days, names=names)
    client = _cert("client", client_key, ("test-ca", ca_key), now - dt.timedelta(days=1), 30)
    _write(folder / "ca", ca)
    _write(folder / "server", server, server_key)
    _write(folder / "client", client, client_key)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.crt", folder / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for _ in range(4):
            try:
                conn, _ = listener.accept()
                with context.wrap_socket(conn, server_side=True):
                    pass
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_an_expired_server_certificate_is_named(tmp_path: Path) -> None:
    with _server(tmp_path, -dt.timedelta(days=30), 10) as port:
        tls = ClientTLS(tmp_path / "client.crt", tmp_path / "client.key", tmp_path / "ca.crt", "localhost")
        found = diagnose_tls(f"127.0.0.1:{port}", tls, timeout=5)
    assert found is not None
    assert found.cause == "the server's certificate has expired"
    assert "cipherhive certs issue --role server" in found.fix


def test_an_address_the_server_certificate_does_not_hold_lists_what_it_holds(tmp_path: Path) -> None:
    """Reached by 127.0.0.1, a certificate for agg.example.com and 10.0.0.7: say what it holds
    and what to do, as for a wrong host name (docs/troubleshooting.md, "TLS: the server name")."""
    names: list[x509.GeneralName] = [
        x509.DNSName("agg.example.com"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
    ]
    with _server(tmp_path, -dt.timedelta(days=1), 30, names) as port:
        tls = ClientTLS(tmp_path / "client.crt", tmp_path / "client.key", tmp_path / "ca.crt")
        found = diagnose_tls(f"127.0.0.1:{port}", tls, timeout=5)
        with_flag = diagnose_tls(
            f"127.0.0.1:{port}", tls, TLSSettings(server_name="--server-name"), timeout=5
        )
    assert found is not None
    assert found.cause == (
        "wrong server address: the server's certificate is not valid for the IP address '127.0.0.1' "
        "(it names: agg.example.com, 10.0.0.7)"
    )
    assert "connect to the server by a name in its certificate such as 'agg.example.com'" in found.fix
    assert "set tls_server_name to that name" in found.fix
    assert "cipherhive certs issue --role server --replace --host 127.0.0.1" in found.fix
    assert with_flag is not None and "set --server-name to that name" in with_flag.fix
