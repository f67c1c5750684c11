"""The CRL travelling through the server: the server's reload log and what it serves, and a
member refusing every CRL a hostile server could send (docs/how-to/member.md)."""

from __future__ import annotations

import logging
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cipherhive.node.secagg import crl_update
from cipherhive.pki import certs
from cipherhive.pki.crl_check import CrlRefused, check_crl
from cipherhive.server.api import handlers
from cipherhive.server.api.guard import required_role
from cipherhive.v1 import federation_pb2 as pb

pytestmark = pytest.mark.timeout(60)


def _ca(tmp_path: Path, name: str = "test-ca") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    ca_dir = tmp_path / "ca"
    certs.create_ca(ca_dir, name=name)
    key = serialization.load_pem_private_key((ca_dir / certs.CA_KEY).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate((ca_dir / certs.CA_CERT).read_bytes()), ca_dir


def _crl(
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    number: int,
    revoked: list[int],
    *,
    next_update: timedelta = timedelta(days=30),
) -> bytes:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now - timedelta(days=60) if next_update < timedelta(0) else now)
        .next_update(now + next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture()
def member(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path, Path]:
    """A CA, and a member holding CRL number 5 (crl.pem next to its ca.crt)."""
    key, ca, ca_dir = _ca(tmp_path)
    node_dir = tmp_path / "node-1"
    node_dir.mkdir()
    (node_dir / "ca.crt").write_bytes((ca_dir / certs.CA_CERT).read_bytes())
    (node_dir / "crl.pem").write_bytes(_crl(key, ca, 5, [11]))
    return key, ca, node_dir / "crl.pem", node_dir / "ca.crt"


def _number(path: Path) -> int | None:
    return crl_update.held_number(path)


def test_newer_crl_replaces_the_members_own(member, caplog: pytest.LogCaptureFixture) -> None:
    key, ca, crl_path, ca_path = member
    newer = _crl(key, ca, 6, [11, 12])
    with caplog.at_level(logging.INFO, "cipherhive.node"):
        assert crl_update.offer(newer, crl_path, ca_path, "node-1")
    assert crl_path.read_bytes() == newer
    assert stat.S_IMODE(crl_path.stat().st_mode) == 0o644
    line = next(r for r in caplog.records if r.getMessage() == "CRL updated from the server")
    assert line.fields["number"] == 6 and line.fields["revoked"] == 2  # type: ignore[attr-defined]
    # The same CRL again is nothing to do, and says nothing.
    caplog.clear()
    assert not crl_update.offer(newer, crl_path, ca_path, "node-1")
    assert not caplog.records


def _refused(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r for r in caplog.records if r.getMessage().startswith("refused the CRL from the server")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert lines[0].levelno == logging.WARNING
    return str(lines[0].fields["reason"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "hostile, reason",
    [
        ("older", "not newer"),
        ("same_number", "not newer"),
        ("foreign", "not signed by the federation CA"),
        ("other_issuer", "not by the federation CA"),
        ("stale", "stale"),
        ("garbage", "not a PEM CRL"),
        ("der", "not a PEM CRL"),
    ],
)
def test_a_hostile_server_cannot_replace_the_crl(
    member, tmp_path: Path, caplog: pytest.LogCaptureFixture, hostile: str, reason: str
) -> None:
    key, ca, crl_path, ca_path = member
    held = crl_path.read_bytes()
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _ca(tmp_path / "other", "other-ca")[1]
    data = {
        "older": lambda: _crl(key, ca, 4, []),  # replayed: would un-revoke serial 11
        "same_number": lambda: _crl(key, ca, 5, []),
        "foreign": lambda: _crl(other_key, ca, 9, []),  # right issuer name, wrong key
        "other_issuer": lambda: _crl(other_key, other_ca, 9, []),
        "stale": lambda: _crl(key, ca, 9, [11], next_update=-timedelta(days=1)),
        "garbage": lambda: b"-----BEGIN X509 CRL-----\nnot a crl\n-----END X509 CRL-----\n",
        "der": lambda: x509.load_pem_x509_crl(held).public_bytes(serialization.Encoding.DER),
    }[hostile]()
    with caplog.at_level(logging.INFO, "cipherhive.node"):
        assert not crl_update.offer(data, crl_path, ca_path, "node-1")
        assert reason in _refused(caplog)
        # Offered again (every round), it is refused again but not logged again.
        assert not crl_update.offer(data, crl_path, ca_path, "node-1")
        _refused(caplog)
    assert crl_path.read_bytes() == held
    assert _number(crl_path) == 5


def test_check_crl_without_a_held_crl_still_needs_the_ca(tmp_path: Path) -> None:
    key, ca, _ = _ca(tmp_path)
    checked = check_crl(_crl(key, ca, 1, [7]), ca)
    assert checked.number == 1 and checked.revoked == {7}
    with pytest.raises(CrlRefused, match="empty"):
        check_crl(b"", ca)
    with pytest.raises(CrlRefused, match="larger"):
        check_crl(b"x" * (5 * 1024 * 1024), ca)


def test_a_member_without_a_crl_takes_a_valid_one(member) -> None:
    key, ca, crl_path, ca_path = member
    crl_path.unlink()
    assert crl_update.offer(_crl(key, ca, 2, []), crl_path, ca_path)
    assert _number(crl_path) == 2


class _Stub:
    def __init__(self, reply: object) -> None:
        self.reply = reply

    def GetRevocationList(self, request: pb.RevocationListRequest, timeout: float) -> object:
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


class _Failed(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


def _config(crl_path: Path, ca_path: Path) -> object:
    class Config:
        insecure = False
        tls_ca = ca_path
        tls_cert = ca_path.with_name("node-1.crt")
        tls_key = ca_path.with_name("node-1.key")

        def enrolment_files(self) -> tuple[Path, Path, Path]:
            return ca_path, ca_path, crl_path

    return Config()


def test_update_never_raises(member, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing the server answers (a failure, an odd reply, a good CRL) stops the daemon."""
    key, ca, crl_path, ca_path = member
    config = _config(crl_path, ca_path)
    with caplog.at_level(logging.INFO, "cipherhive.node"):
        assert not crl_update.update_crl(_Stub(_Failed()), config, "node-1")  # type: ignore[arg-type]
        assert not crl_update.update_crl(_Stub(pb.RevocationList()), config)  # type: ignore[arg-type]
        assert not crl_update.update_crl(_Stub(object()), config)  # type: ignore[arg-type]
        good = pb.RevocationList(crl_pem=_crl(key, ca, 8, [11]))
        assert crl_update.update_crl(_Stub(good), config)  # type: ignore[arg-type]
    assert _number(crl_path) == 8
    messages = [r.getMessage() for r in caplog.records]
    assert "cannot fetch the CRL from the server" in messages
    assert "CRL update failed" in messages


def test_server_logs_each_reload_and_serves_the_exact_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, ca_dir = _ca(tmp_path)
    for name in ("node-1", "node-2"):
        certs.issue(ca_dir, "node", name, tmp_path / name)
    crl_path = ca_dir / certs.CRL
    with caplog.at_level(logging.INFO, "cipherhive.pki"):
        revocations = certs.RevocationList(crl_path, ca_dir / certs.CA_CERT, check_interval=0)
        assert handlers.revocation_list(revocations).crl_pem == crl_path.read_bytes()
        revoked = certs.revoke(ca_dir, "node-1", role="node")
        revocations.refresh()
    assert handlers.revocation_list(revocations).crl_pem == crl_path.read_bytes()
    assert handlers.revocation_list(None).crl_pem == b""
    line = next(r for r in caplog.records if r.getMessage() == "CRL reloaded")
    fields = line.fields  # type: ignore[attr-defined]
    assert fields["path"] == str(crl_path)
    assert fields["number"] == crl_update.held_number(crl_path)
    assert fields["revoked"] == len(revoked) == 2  # the TLS and the enrolment certificate
    assert fields["new"] == 2
    assert revocations.revoked_at(revoked[0].serial) is not None


def test_only_members_may_fetch_the_crl() -> None:
    assert required_role("/cipherhive.v1.Aggregation/GetRevocationList") == "node"
