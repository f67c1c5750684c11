"""Tests for cipherhive.pki.certs: CA layout, issuing, revocation, CLI and a real mTLS call."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cipherhive.pki import certs, enrolment_certs


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _load_crl(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(path.read_bytes())


@pytest.fixture()
def ca(tmp_path: Path) -> Path:
    ca_dir = tmp_path / "ca"
    certs.create_ca(ca_dir, name="test-ca")
    return ca_dir


def _self_signed(subject: list[x509.NameAttribute[str]], uri: str | None = None) -> bytes:
    """A throwaway certificate with an arbitrary subject, for peer_identity edge cases."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
    )
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- CA


def test_create_ca_layout(tmp_path: Path) -> None:
    ca_dir = tmp_path / "fresh" / "ca"
    crt_path = certs.create_ca(ca_dir, name="fed-ca", days=30)

    assert crt_path == ca_dir / "ca.crt"
    assert _mode(ca_dir / "ca.key") == 0o600
    certs.check_key_permissions(ca_dir / "ca.key")
    assert json.loads((ca_dir / "issued.json").read_text()) == []
    assert certs.list_issued(ca_dir) == []

    cert = _load_cert(crt_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fed-ca"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    cert.verify_directly_issued_by(cert)

    crl = _load_crl(ca_dir / "crl.pem")
    assert crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    assert len(crl) == 0
    assert crl.next_update_utc is not None and crl.last_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=30)


def test_create_ca_refuses_to_overwrite(ca: Path) -> None:
    before = (ca / "ca.key").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        certs.create_ca(ca)
    assert (ca / "ca.key").read_bytes() == before


# --------------------------------------------------------------------------- issue


@pytest.mark.parametrize("role", certs.ROLES)
def test_issue_each_role(ca: Path, tmp_path: Path, role: str) -> None:
    out = tmp_path / "out" / role
    issued = certs.issue(ca, role, f"{role}-1", out)

    assert issued.key_path == (out / f"{role}-1.key").absolute()
    assert issued.cert_path == (out / f"{role}-1.crt").absolute()
    assert _mode(issued.key_path) == 0o600
    assert (out / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    assert issued.key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8

    cert = _load_cert(issued.cert_path)
    ca_cert = _load_cert(ca / "ca.crt")
    cert.verify_directly_issued_by(ca_cert)
    assert cert.serial_number == issued.serial
    assert cert.not_valid_after_utc == issued.not_after
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in ou] == [role]
    assert [a.value for a in cn] == [f"{role}-1"]

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"cipherhive://{role}/{role}-1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert not bc.ca
    assert ku.digital_signature and not ku.key_cert_sign
    assert aki.key_identifier == ca_ski.digest
    if role == "server":
        assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    else:
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert san.get_values_for_type(x509.DNSName) == []
        assert san.get_values_for_type(x509.IPAddress) == []

    # A node also gets an enrolment certificate (tests below); its TLS row comes first.
    [record] = [r for r in certs.list_issued(ca) if r.purpose == "tls"]
    assert (record.serial, record.role, record.name) == (issued.serial, role, f"{role}-1")
    assert record.revoked_at is None and record.status() == "valid"
    raw = json.loads((ca / "issued.json").read_text())
    assert raw[0]["serial"] == f"{issued.serial:x}"
    assert raw[0]["revoked_at"] is None
    assert datetime.fromisoformat(raw[0]["not_after"]) == issued.not_after


def test_server_hosts(ca: Path, tmp_path: Path) -> None:
    issued = certs.issue(ca, "server", "agg", tmp_path / "o", hosts=["Agg.Example.org", "10.0.0.5", "::1"])
    san = _load_cert(issued.cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["agg.example.org"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]


def test_issue_rejects_bad_input(ca: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown role"):
        certs.issue(ca, "root", "x", tmp_path)
    with pytest.raises(ValueError, match="invalid host"):
        certs.issue(ca, "server", "s", tmp_path, hosts=["bad host"])
    with pytest.raises(ValueError, match="only apply to server"):
        certs.issue(ca, "node", "n", tmp_path, hosts=["example.org"])
    with pytest.raises(ValueError, match="days"):
        certs.issue(ca, "node", "n", tmp_path, days=0)
    with pytest.raises(ValueError, match="reserved"):
        certs.issue(ca, "node", "ca", tmp_path)
    with pytest.raises(FileNotFoundError, match="certs init"):
        certs.issue(tmp_path / "nowhere", "node", "n", tmp_path)
    assert certs.list_issued(ca) == []


@pytest.mark.parametrize("name", ["", "a" * 65, "bad name", "x/y", "../x", "caf\u00e9", "n\n"])
def test_bad_names_rejected(ca: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        certs.issue(ca, "node", name, tmp_path / "o")
    with pytest.raises(ValueError, match="invalid name"):
        certs.create_ca(tmp_path / "other", name=name)
    assert not (tmp_path / "o").exists()


def test_good_names_accepted() -> None:
    for name in ("a", "A" * 64, "node-01.site_b", "..."):
        assert certs.validate_name(name) == name


def test_duplicate_refused_and_replace_revokes(ca: Path, tmp_path: Path) -> None:
    first = certs.issue(ca, "node", "n1", tmp_path / "a")
    with pytest.raises(FileExistsError, match="replace"):
        certs.issue(ca, "node", "n1", tmp_path / "b")

    second = certs.issue(ca, "node", "n1", tmp_path / "a", replace=True)
    assert second.serial != first.serial
    by_serial = {r.serial: r for r in certs.list_issued(ca)}
    assert by_serial[first.serial].status() == "revoked"
    assert by_serial[second.serial].status() == "valid"
    revoked = {r.serial_number for r in _load_crl(ca / "crl.pem")}
    assert first.enrolment is not None and second.enrolment is not None
    assert revoked == {first.serial, first.enrolment.serial}  # the member's enrolment key goes too
    assert _load_cert(second.cert_path).serial_number == second.serial
    assert by_serial[second.enrolment.serial].status() == "valid"


@pytest.mark.parametrize("state", ["valid", "revoked"])
def test_a_name_belongs_to_one_role(ca: Path, tmp_path: Path, state: str) -> None:
    """A node certificate named like the operator would share the admin's limits and audit lines."""
    certs.issue(ca, "admin", "operator", tmp_path / "admin")
    if state == "revoked":
        certs.revoke(ca, "operator")
    with pytest.raises(FileExistsError, match="unique across roles"):
        certs.issue(ca, "node", "operator", tmp_path / "mallory")
    assert [r.role for r in certs.list_issued(ca) if r.name == "operator"] == ["admin"]


def test_check_key_permissions(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_bytes(b"x")
    key.chmod(0o600)
    certs.check_key_permissions(key)
    key.chmod(0o640)
    with pytest.raises(PermissionError, match="chmod 600"):
        certs.check_key_permissions(key)


def test_ca_key_permissions_enforced(ca: Path, tmp_path: Path) -> None:
    (ca / "ca.key").chmod(0o644)
    with pytest.raises(PermissionError, match=r"ca\.key"):
        certs.issue(ca, "node", "n", tmp_path)


# --------------------------------------------------------------------------- identity


def test_peer_identity_round_trip(ca: Path, tmp_path: Path) -> None:
    issued = certs.issue(ca, "admin", "ops.alice", tmp_path)
    pem = issued.cert_path.read_bytes()
    ident = certs.peer_identity(pem)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_load_cert(issued.cert_path).public_bytes(serialization.Encoding.DER))
    assert ident == certs.Identity(
        name="ops.alice",
        role="admin",
        serial=issued.serial,
        fingerprint=digest.finalize().hex(),
    )
    assert certs.peer_identity(bytes(pem)) is ident  # cached
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.name = "mallory"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("subject", "uri", "match"),
    [
        ([x509.NameAttribute(NameOID.COMMON_NAME, "n")], None, "role"),
        (
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "root"),
                x509.NameAttribute(NameOID.COMMON_NAME, "n"),
            ],
            None,
            "unknown role",
        ),
        (
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"),
                x509.NameAttribute(NameOID.COMMON_NAME, "bad name"),
            ],
            None,
            "invalid name",
        ),
        ([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "node")], None, "name"),
        (
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"),
                x509.NameAttribute(NameOID.COMMON_NAME, "n"),
            ],
            "cipherhive://admin/n",
            "disagrees",
        ),
    ],
)
def test_peer_identity_rejects(subject: list[x509.NameAttribute[str]], uri: str | None, match: str) -> None:
    with pytest.raises(certs.CertificateError, match=match):
        certs.peer_identity(_self_signed(subject, uri))


def test_peer_identity_rejects_ca_and_garbage(ca: Path) -> None:
    with pytest.raises(certs.CertificateError):
        certs.peer_identity((ca / "ca.crt").read_bytes())
    with pytest.raises(certs.CertificateError):
        certs.peer_identity(b"not a certificate")
    assert issubclass(certs.CertificateError, ValueError)


# --------------------------------------------------------------------------- revocation


def test_revoke_by_serial_and_name(ca: Path, tmp_path: Path) -> None:
    a = certs.issue(ca, "node", "alpha", tmp_path / "a")
    b = certs.issue(ca, "admin", "beta", tmp_path / "b")
    c = certs.issue(ca, "node", "gamma", tmp_path / "c")

    # A member's TLS certificate, revoked by serial, takes its enrolment certificate with it.
    [got, got_enrol] = certs.revoke(ca, f"0x{c.serial:X}")
    assert got.serial == c.serial and got.cert_path == c.cert_path and got.purpose == "tls"
    assert c.enrolment is not None and a.enrolment is not None
    assert (got_enrol.serial, got_enrol.purpose) == (c.enrolment.serial, "enrol")
    with pytest.raises(LookupError, match="already revoked"):
        certs.revoke(ca, f"{c.serial:x}")

    with pytest.raises(LookupError):
        certs.revoke(ca, "beta", role="node")
    [only_admin] = certs.revoke(ca, "beta", role="admin")
    assert only_admin.serial == b.serial
    rest = certs.revoke(ca, "alpha")
    assert [(r.serial, r.purpose) for r in rest] == [(a.serial, "tls"), (a.enrolment.serial, "enrol")]
    with pytest.raises(LookupError, match="already revoked or expired"):
        certs.revoke(ca, "alpha")
    with pytest.raises(LookupError, match="no certificate"):
        certs.revoke(ca, "nobody")
    with pytest.raises(LookupError, match="no certificate"):
        certs.revoke(ca, "deadbeef")

    crl = _load_crl(ca / "crl.pem")
    assert {r.serial_number for r in crl} == {
        a.serial,
        a.enrolment.serial,
        b.serial,
        c.serial,
        c.enrolment.serial,
    }
    assert crl.is_signature_valid(_load_cert(ca / "ca.crt").public_key())  # type: ignore[arg-type]
    numbers = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert numbers == 4  # one CRL at init, then one per revoke call
    assert all(r.revoked_at is not None for r in certs.list_issued(ca))
    assert not list(ca.glob(".*.tmp"))


def test_revocation_list_follows_file(ca: Path, tmp_path: Path) -> None:
    node = certs.issue(ca, "node", "n1", tmp_path)
    other = certs.issue(ca, "node", "n2", tmp_path)
    live = certs.RevocationList(ca / "crl.pem", ca / "ca.crt", check_interval=0)
    throttled = certs.RevocationList(ca / "crl.pem", ca / "ca.crt", check_interval=3600)
    assert not live.is_revoked(node.serial)
    assert not throttled.is_revoked(node.serial)

    certs.revoke(ca, "n1")
    # Make sure the change is visible even on filesystems with coarse mtimes.
    st = (ca / "crl.pem").stat()
    os.utime(ca / "crl.pem", ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))

    assert live.is_revoked(node.serial)
    assert not live.is_revoked(other.serial)
    assert not throttled.is_revoked(node.serial)  # not re-checked within the interval
    throttled.refresh()
    assert throttled.is_revoked(node.serial)
    assert node.enrolment is not None
    assert throttled.revoked_serials() == frozenset({node.serial, node.enrolment.serial})


def test_revocation_list_rejects_foreign_crl(ca: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    certs.create_ca(other, name="test-ca")  # same subject, different key
    with pytest.raises(certs.CertificateError, match="not signed by the configured CA"):
        certs.RevocationList(other / "crl.pem", ca / "ca.crt")
    bad = tmp_path / "garbage.pem"
    bad.write_bytes(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(certs.CertificateError):
        certs.RevocationList(bad, ca / "ca.crt")


def test_revocation_list_keeps_previous_on_bad_reload(
    ca: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = certs.issue(ca, "node", "n1", tmp_path)
    certs.revoke(ca, "n1")
    crl_copy = tmp_path / "crl.pem"
    crl_copy.write_bytes((ca / "crl.pem").read_bytes())
    rl = certs.RevocationList(crl_copy, ca / "ca.crt", check_interval=0)
    assert rl.is_revoked(node.serial)

    other = tmp_path / "other-ca"
    certs.create_ca(other)
    with caplog.at_level(logging.WARNING, logger=certs.__name__):
        crl_copy.write_bytes((other / "crl.pem").read_bytes())  # wrong signer
        assert rl.is_revoked(node.serial)
        crl_copy.write_bytes(b"garbage")
        assert rl.is_revoked(node.serial)
        assert rl.is_revoked(node.serial)
    warnings = [r for r in caplog.records if "keeping the previous list" in r.getMessage()]
    assert len(warnings) == 2  # once per bad file, not once per check


def test_revocation_list_missing_file(ca: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "nope" / "crl.pem"
    with caplog.at_level(logging.WARNING, logger=certs.__name__):
        rl = certs.RevocationList(missing, ca / "ca.crt", check_interval=0)
        assert not rl.is_revoked(1)
        assert not rl.is_revoked(2)
    assert len([r for r in caplog.records if "not found" in r.getMessage()]) == 1

    # The file showing up later is picked up.
    node = certs.issue(ca, "node", "n1", tmp_path / "o")
    certs.revoke(ca, "n1")
    missing.parent.mkdir()
    missing.write_bytes((ca / "crl.pem").read_bytes())
    assert rl.is_revoked(node.serial)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cipherhive")
    sub = parser.add_subparsers(dest="command", required=True)
    certs.register(sub)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    rc = args.func(args)
    assert isinstance(rc, int)
    return rc


def test_cli_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = str(tmp_path / "ca")
    out = str(tmp_path / "out")

    assert _run(["certs", "init", "--ca", ca, "--name", "cli-ca"]) == 0
    assert "created CA 'cli-ca'" in capsys.readouterr().out

    assert _run(["certs", "init", "--ca", ca]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("cipherhive certs: error: a CA already exists")
    assert "Traceback" not in captured.err

    argv = ["certs", "issue", "--ca", ca, "--role", "server", "--name", "agg", "--out", out]
    assert _run([*argv, "--host", "agg.local", "--host", "10.1.2.3", "--days", "10"]) == 0
    text = capsys.readouterr().out
    assert "issued server certificate 'agg'" in text and "agg.key" in text

    assert _run(argv) == 2
    assert "--replace" in capsys.readouterr().err
    assert _run([*argv, "--replace"]) == 0
    assert "revoked previous certificate" in capsys.readouterr().out

    node = ["certs", "issue", "--ca", ca, "--role", "node", "--name", "n-1", "--out", out]
    assert _run(node) == 0
    capsys.readouterr()
    assert _run(["certs", "issue", "--ca", ca, "--role", "node", "--name", "a b", "--out", out]) == 2
    assert "invalid name 'a b'" in capsys.readouterr().err

    assert _run(["certs", "list", "--ca", ca]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["SERIAL", "ROLE", "NAME", "PURPOSE", "NOT", "AFTER", "STATUS"]
    assert len(listing) == 5  # the node's enrolment certificate has a row of its own
    assert listing[4].split()[1:4] == ["node", "n-1", "enrol"]
    assert sum("revoked" in line for line in listing) == 1

    assert _run(["certs", "list", "--ca", ca, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["role"], r["name"], r["purpose"], r["status"]) for r in rows] == [
        ("server", "agg", "tls", "revoked"),
        ("server", "agg", "tls", "valid"),
        ("node", "n-1", "tls", "valid"),
        ("node", "n-1", "enrol", "valid"),
    ]

    assert _run(["certs", "revoke", "--ca", ca, "--serial", rows[1]["serial"]]) == 0
    assert f"(serial {rows[1]['serial']})" in capsys.readouterr().out
    assert _run(["certs", "revoke", "--ca", ca, "--name", "n-1", "--role", "node"]) == 0
    text = capsys.readouterr().out
    assert "revoked node certificate 'n-1'" in text
    assert "revoked node enrolment certificate 'n-1'" in text
    assert _run(["certs", "revoke", "--ca", ca, "--name", "n-1"]) == 2
    assert capsys.readouterr().err.startswith("cipherhive certs: error: ")
    assert _run(["certs", "revoke", "--ca", ca, "--serial", "zz"]) == 2
    assert "invalid serial" in capsys.readouterr().err
    assert _run(["certs", "revoke", "--ca", ca, "--serial", "ab", "--role", "node"]) == 2
    assert "--role only applies with --name" in capsys.readouterr().err

    revoked = {r.serial_number for r in _load_crl(Path(ca) / "crl.pem")}
    assert {f"{s:x}" for s in revoked} == {r["serial"] for r in rows}


def test_cli_errors_without_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing")
    assert _run(["certs", "list", "--ca", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cipherhive certs: error: no CA in")
    assert "certs init" in err
    argv = ["certs", "issue", "--ca", missing, "--role", "node", "--name", "n", "--out", missing]
    assert _run(argv) == 2
    assert "certs init" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["certs", "revoke", "--ca", missing])  # neither --serial nor --name
    assert exc.value.code == 2


# --------------------------------------------------------------------------- mutual TLS


@pytest.fixture()
def mtls_server(ca: Path, tmp_path: Path) -> Iterator[tuple[int, certs.RevocationList]]:
    srv = certs.issue(ca, "server", "aggregator", tmp_path / "server")
    revocations = certs.RevocationList(ca / "crl.pem", ca / "ca.crt", check_interval=0)

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        ident = certs.peer_identity(context.auth_context()["x509_pem_cert"][0])
        if revocations.is_revoked(ident.serial):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
        return f"{ident.role}/{ident.name}/{ident.serial:x}".encode()

    handler = grpc.method_handlers_generic_handler(
        "cipherhive.test.Echo", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(srv.key_path.read_bytes(), srv.cert_path.read_bytes())],
        root_certificates=(ca / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port, revocations
    finally:
        server.stop(None)


def _call(port: int, ca_pem: bytes, client: certs.IssuedCert) -> bytes:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem,
        private_key=client.key_path.read_bytes(),
        certificate_chain=client.cert_path.read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        method = channel.unary_unary("/cipherhive.test.Echo/WhoAmI")
        result: bytes = method(b"", timeout=5)
        return result


def test_mutual_tls(ca: Path, tmp_path: Path, mtls_server: tuple[int, certs.RevocationList]) -> None:
    port, _ = mtls_server
    ca_pem = (ca / "ca.crt").read_bytes()

    node = certs.issue(ca, "node", "hospital-a", tmp_path / "node")
    assert _call(port, ca_pem, node) == f"node/hospital-a/{node.serial:x}".encode()

    rogue_ca = tmp_path / "rogue-ca"
    certs.create_ca(rogue_ca, name="test-ca")
    rogue = certs.issue(rogue_ca, "node", "hospital-a", tmp_path / "rogue")
    with pytest.raises(grpc.RpcError) as exc:
        _call(port, ca_pem, rogue)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE

    certs.revoke(ca, f"{node.serial:x}")
    with pytest.raises(grpc.RpcError) as exc:
        _call(port, ca_pem, node)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --------------------------------------------------------------------------- enrolment certificates


def test_node_gets_an_enrolment_certificate(ca: Path, tmp_path: Path) -> None:
    """A member's enrolment key: EC P-256, digitalSignature only, no TLS usage, its own SAN URI."""
    out = tmp_path / "acme"
    issued = certs.issue(ca, "node", "acme", out)
    enrol = issued.enrolment
    assert enrol is not None and enrol.purpose == "enrol"
    assert enrol.cert_path == (out / "acme.enrol.crt").absolute()
    assert enrol.key_path == (out / "acme.enrol.key").absolute()
    assert _mode(enrol.key_path) == 0o600
    assert enrol.key_path.read_bytes() != issued.key_path.read_bytes()

    cert = _load_cert(enrol.cert_path)
    cert.verify_directly_issued_by(_load_cert(ca / "ca.crt"))
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.key_agreement or ku.value.key_encipherment)
    eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.CLIENT_AUTH not in eku and ExtendedKeyUsageOID.SERVER_AUTH not in eku
    assert eku == [enrolment_certs.ENROL_EKU]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["cipherhive://node/acme/enrol"]
    assert cert.not_valid_after_utc == enrol.not_after

    records = certs.list_issued(ca)
    assert [(r.serial, r.role, r.name, r.purpose) for r in records] == [
        (issued.serial, "node", "acme", "tls"),
        (enrol.serial, "node", "acme", "enrol"),
    ]
    assert json.loads((ca / "issued.json").read_text())[1]["purpose"] == "enrol"
    # The TLS side refuses it as an identity, and the verifier accepts it as an enrolment key.
    with pytest.raises(certs.CertificateError, match="SAN URI"):
        certs.peer_identity(enrol.cert_path.read_bytes())
    crl = _load_crl(ca / "crl.pem")
    who = enrolment_certs.verify_certificate(cert, _load_cert(ca / "ca.crt"), crl)
    assert (who.name, who.role, who.serial) == ("acme", "node", enrol.serial)
    # It names the member's TLS certificate, so the fingerprint in an enrolment is certified.
    assert who.tls_fingerprint == _load_cert(issued.cert_path).fingerprint(hashes.SHA256())


@pytest.mark.parametrize("role", ["server", "admin"])
def test_only_members_get_enrolment_certificates(ca: Path, tmp_path: Path, role: str) -> None:
    issued = certs.issue(ca, role, "x", tmp_path)
    assert issued.enrolment is None
    assert not list(tmp_path.glob("*.enrol.*"))
    assert [r.purpose for r in certs.list_issued(ca)] == ["tls"]


def test_index_without_purpose_reads_as_tls(ca: Path, tmp_path: Path) -> None:
    """Indexes written before enrolment certificates existed stay readable."""
    certs.issue(ca, "admin", "ops", tmp_path)
    raw = json.loads((ca / "issued.json").read_text())
    del raw[0]["purpose"]
    (ca / "issued.json").write_text(json.dumps(raw))
    assert [r.purpose for r in certs.list_issued(ca)] == ["tls"]
    raw[0]["purpose"] = "wildcard"
    (ca / "issued.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="corrupt"):
        certs.list_issued(ca)


def test_revoking_the_enrolment_alone_keeps_tls(ca: Path, tmp_path: Path) -> None:
    issued = certs.issue(ca, "node", "acme", tmp_path)
    assert issued.enrolment is not None
    [only] = certs.revoke(ca, f"{issued.enrolment.serial:x}")
    assert only.purpose == "enrol"
    status = {r.serial: r.status() for r in certs.list_issued(ca)}
    assert status == {issued.serial: "valid", issued.enrolment.serial: "revoked"}
    # Re-issuing after that needs --replace (the TLS certificate is live) and replaces both.
    again = certs.issue(ca, "node", "acme", tmp_path, replace=True)
    assert again.enrolment is not None
    live = [(r.purpose, r.serial) for r in certs.list_issued(ca) if r.status() == "valid"]
    assert live == [("tls", again.serial), ("enrol", again.enrolment.serial)]


def test_cli_issue_shows_the_enrolment_pair(
    ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    argv = ["certs", "issue", "--ca", str(ca), "--role", "node", "--name", "n-2", "--out", str(out)]
    assert _run(argv) == 0
    text = capsys.readouterr().out
    assert f"enrolment key:  {(out / 'n-2.enrol.key').absolute()}" in text
    assert "enrolment cert: " in text and "n-2.enrol.crt" in text


def test_tls_refuses_an_enrolment_certificate(
    ca: Path, tmp_path: Path, mtls_server: tuple[int, certs.RevocationList]
) -> None:
    """No serverAuth/clientAuth EKU: the TLS handshake itself refuses the enrolment key."""
    port, _ = mtls_server
    node = certs.issue(ca, "node", "hospital-b", tmp_path / "node")
    assert node.enrolment is not None
    with pytest.raises(grpc.RpcError) as exc:
        _call(port, (ca / "ca.crt").read_bytes(), node.enrolment)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _call(port, (ca / "ca.crt").read_bytes(), node) == f"node/hospital-b/{node.serial:x}".encode()
