"""Errors a person can act on: a failing TLS handshake, against a real server.

The node must say at once what is wrong and what to do (not DEADLINE_EXCEEDED
after 30 s), keep retrying, and `cipherhive ctl` must give the same diagnosis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cipherhive.demo.federation import LocalFederation
from cipherhive.pki import certs
from cipherhive.runtime.transport import ClientTLS, TLSSettings, channel, diagnose_tls
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def _server_only(workdir: Path) -> LocalFederation:
    fed = LocalFederation(workdir, nodes=2, rounds={"min_participants": 2})
    fed.setup()
    return fed


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """A server, no node running; the tests start node-1 (and stop it again) or only dial it."""
    fed = _server_only(tmp_path_factory.mktemp("tlserr"))
    other = fed.workdir / "other-ca"
    certs.create_ca(other)
    certs.issue(other, "node", "stranger", fed.workdir / "stranger")
    try:
        fed.start_server()
        fed.wait_serving()
        yield fed
    finally:
        fed.stop_all()


@pytest.fixture
def own_federation(tmp_path: Path) -> Iterator[LocalFederation]:
    """A server for one test that changes what the others rely on (its CA's revocation list)."""
    fed = _server_only(tmp_path / "own")
    try:
        fed.start_server()
        fed.wait_serving()
        yield fed
    finally:
        fed.stop_all()


def _tls(fed: LocalFederation, who: str = "node-1", name: str = "localhost", ca: str = "") -> ClientTLS:
    d = fed.workdir / who
    return ClientTLS(d / f"{who}.crt", d / f"{who}.key", Path(ca) if ca else d / "ca.crt", name)


def test_node_with_a_wrong_server_name_says_so_at_once(federation: LocalFederation) -> None:
    fed = federation
    text = (fed.workdir / "node-1.toml").read_text()
    (fed.workdir / "node-1.toml").write_text(text.replace('"localhost"', '"wrong.example"'))
    fed.start_node(0)
    try:
        wanted = (
            "TLS handshake fails: wrong server name: "
            "the server's certificate is not valid for 'wrong.example'"
        )
        fed.wait_for(lambda: wanted in fed.log("node-1"), 60, "the node's diagnosis")
        line = next(line for line in fed.log("node-1").splitlines() if wanted in line)
        assert "it names: localhost, 127.0.0.1" in line
        assert "fix: set tls_server_name to a name in the server's certificate, e.g. 'localhost'" in line
        assert "retrying with back-off" in line
        assert "DEADLINE_EXCEEDED" not in fed.log("node-1")
        # It keeps retrying (the server may be fixed), saying so each time.
        fed.wait_for(lambda: fed.log("node-1").count(wanted) >= 2, 60, "a second attempt")
        assert fed.procs["node-1"].poll() is None
    finally:
        fed.stop("node-1")
        (fed.workdir / "node-1.toml").write_text(text)


def test_diagnoses(federation: LocalFederation) -> None:
    fed = federation
    address = f"127.0.0.1:{fed.port}"
    assert diagnose_tls(address, _tls(fed)) is None
    assert diagnose_tls(address, _tls(fed, name="")) is None  # 127.0.0.1 is in the certificate too

    wrong_name = diagnose_tls(
        address, _tls(fed, name="agg.example"), TLSSettings(server_name="--server-name")
    )
    assert wrong_name is not None and "--server-name" in wrong_name.fix

    unknown_ca = diagnose_tls(address, _tls(fed, ca=str(fed.workdir / "other-ca" / "ca.crt")))
    assert unknown_ca is not None and unknown_ca.cause.startswith("unknown CA")

    stranger = ClientTLS(
        fed.workdir / "stranger" / "stranger.crt",
        fed.workdir / "stranger" / "stranger.key",
        fed.workdir / "node-1" / "ca.crt",
        "localhost",
    )
    refused = diagnose_tls(address, stranger)
    assert refused is not None and "does not accept this certificate" in refused.cause

    # Nothing listening: not a TLS problem (the caller reports it as unreachable).
    assert diagnose_tls("127.0.0.1:1", _tls(fed)) is None


def test_expired_own_certificate_is_named(federation: LocalFederation, tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old")])
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(past)
        .not_valid_after(past + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "old.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls = ClientTLS(tmp_path / "old.crt", tmp_path / "old.key", federation.workdir / "node-1" / "ca.crt")
    found = diagnose_tls(f"127.0.0.1:{federation.port}", tls)
    assert found is not None and "expired on 2020-01-02" in found.cause


def _refused_as_revoked(fed: LocalFederation, who: str) -> bool:
    """True once the server refuses ``who``'s certificate as revoked (it re-reads crl.pem on its own).

    GetStatus needs an admin certificate, so a member's call is refused either way; the
    revocation check comes first, so the reason says which list the server is using.
    """
    d = fed.workdir / who
    tls = ClientTLS(d / f"{who}.crt", d / f"{who}.key", d / "ca.crt", "localhost")
    with channel(f"127.0.0.1:{fed.port}", tls) as ch:
        try:
            pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.PERMISSION_DENIED and "has been revoked" in (
                exc.details() or ""
            )
    return False


def test_revoked_node_is_told_what_to_do(own_federation: LocalFederation) -> None:
    """node-2 is revoked: the handshake passes; Join is refused, with the fix."""
    fed = own_federation
    certs.revoke(fed.workdir / "ca", "node-2")
    fed.wait_for(lambda: _refused_as_revoked(fed, "node-2"), 60, "the server to load the new crl.pem")
    proc = fed.start_node(1)
    assert proc.wait(120) == 2, fed.log("node-2")[-3000:]
    log = fed.log("node-2")
    assert "server refused this node: PERMISSION_DENIED: certificate" in log and "has been revoked" in log
    assert "fix: this member's certificate is no longer accepted" in log
