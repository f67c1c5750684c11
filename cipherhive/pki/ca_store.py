"""The CA's on-disk state: crash-safe file helpers, the index ``issued.json`` and the CRL.

Split out of :mod:`cipherhive.pki.certs` so that both the TLS certificates
(``certs``) and the enrolment certificates of the masked round
(:mod:`cipherhive.pki.enrolment_certs`) record themselves in the same index and are
revoked through the same CRL. Nothing here is public API: ``certs``
re-exports what operators and tests use.

Every row of the index carries a *purpose*: ``"tls"`` for the mutual-TLS
certificate of a participant, ``"enrol"`` for the dedicated key a member
signs its round enrolments with (SecAgg, Bonawitz et al. CCS 2017, §6: the
signing keys a PKI certifies). Rows written before purposes existed read as
``"tls"``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
INDEX = "issued.json"
CRL = "crl.pem"
CRL_VALIDITY = timedelta(days=30)

#: Purposes of an index row: the participant's mutual-TLS certificate, or its enrolment certificate.
PURPOSE_TLS = "tls"
PURPOSE_ENROL = "enrol"
PURPOSES = (PURPOSE_TLS, PURPOSE_ENROL)


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """Result of issuing (or revoking) a certificate: where its files live.

    ``enrolment`` is the member's enrolment certificate issued with a node's TLS
    certificate (None for other roles, and on the enrolment result itself).
    """

    serial: int
    role: str
    name: str
    cert_path: Path
    key_path: Path
    not_after: datetime
    purpose: str = PURPOSE_TLS
    enrolment: IssuedCert | None = None


@dataclass(frozen=True, slots=True)
class IssuedRecord:
    """One row of ``issued.json``, as operators see it in ``certs list``."""

    serial: int
    role: str
    name: str
    not_after: datetime
    revoked_at: datetime | None
    purpose: str = PURPOSE_TLS

    def status(self, now: datetime | None = None) -> str:
        """Return "revoked", "expired" or "valid" so callers need not repeat the rules."""
        if self.revoked_at is not None:
            return "revoked"
        if self.not_after <= (now or utcnow()):
            return "expired"
        return "valid"


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.astimezone(UTC).isoformat()


def parse_dt(text: str) -> datetime:
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def check_key_permissions(path: Path) -> None:
    """Refuse private keys others can read: a leaked key defeats mutual TLS."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"private key {path} is accessible by group/others (mode {mode:04o}); "
            f"restrict it with 'chmod 600 {path}'"
        )


# --------------------------------------------------------------------------
# file helpers


def fsync_dir(directory: Path) -> None:
    """Persist a rename; best effort because some filesystems refuse directory fsync."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def stage(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a synced temp file next to ``path``; the caller renames it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically so readers (e.g. RevocationList) never see half a file."""
    tmp = stage(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively so two concurrent ``init`` runs cannot both win."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@contextlib.contextmanager
def ca_lock(ca_dir: Path) -> Iterator[None]:
    """Serialise index/CRL updates between concurrent CLI runs (flock on ca.key)."""
    fd = os.open(ca_dir / CA_KEY, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# CA state


@dataclass
class Entry:
    serial: int
    role: str
    name: str
    not_after: datetime
    revoked_at: datetime | None
    cert_path: str | None = None
    key_path: str | None = None
    purpose: str = PURPOSE_TLS

    def is_valid(self, now: datetime) -> bool:
        return self.revoked_at is None and self.not_after > now

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": f"{self.serial:x}",
            "role": self.role,
            "name": self.name,
            "not_after": iso(self.not_after),
            "revoked_at": iso(self.revoked_at),
            "cert_path": self.cert_path,
            "key_path": self.key_path,
            "purpose": self.purpose,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Entry:
        if not isinstance(raw, dict):
            raise ValueError("entry is not an object")
        revoked = raw.get("revoked_at")
        cert_path = raw.get("cert_path")
        key_path = raw.get("key_path")
        purpose = str(raw.get("purpose", PURPOSE_TLS))
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose {purpose!r}")
        return cls(
            serial=int(str(raw["serial"]), 16),
            role=str(raw["role"]),
            name=str(raw["name"]),
            not_after=parse_dt(str(raw["not_after"])),
            revoked_at=None if revoked is None else parse_dt(str(revoked)),
            cert_path=None if cert_path is None else str(cert_path),
            key_path=None if key_path is None else str(key_path),
            purpose=purpose,
        )

    def record(self) -> IssuedRecord:
        return IssuedRecord(self.serial, self.role, self.name, self.not_after, self.revoked_at, self.purpose)

    def issued(self) -> IssuedCert:
        return IssuedCert(
            serial=self.serial,
            role=self.role,
            name=self.name,
            cert_path=Path(self.cert_path or ""),
            key_path=Path(self.key_path or ""),
            not_after=self.not_after,
            purpose=self.purpose,
        )


def read_index(ca_dir: Path) -> list[Entry]:
    """Load issued.json; a missing index is an error because the CRL is rebuilt from it."""
    path = ca_dir / INDEX
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not (ca_dir / CA_CERT).exists():
            raise FileNotFoundError(
                f"no CA in {ca_dir}; create one with 'cipherhive certs init --ca {ca_dir}'"
            ) from None
        raise FileNotFoundError(
            f"{path} is missing; restore it from a backup (regenerating it would un-revoke "
            "every revoked certificate)"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupt ({exc}); restore it from a backup") from exc
    try:
        if not isinstance(raw, list):
            raise ValueError("top level is not a list")
        return [Entry.from_json(item) for item in raw]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is corrupt ({exc!r}); restore it from a backup") from exc


def write_index(ca_dir: Path, entries: Sequence[Entry]) -> None:
    data = json.dumps([e.to_json() for e in entries], indent=2) + "\n"
    replace_file(ca_dir / INDEX, data.encode("utf-8"), 0o644)


def load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Load and sanity-check the CA key pair before signing anything with it."""
    key_path, cert_path = ca_dir / CA_KEY, ca_dir / CA_CERT
    if not key_path.is_file() or not cert_path.is_file():
        raise FileNotFoundError(
            f"no CA in {ca_dir} (expected {CA_KEY} and {CA_CERT}); "
            f"create one with 'cipherhive certs init --ca {ca_dir}'"
        )
    check_key_permissions(key_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot load the CA from {ca_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key; was this CA made by cipherhive?")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ValueError(f"{key_path} does not belong to {cert_path}; restore the matching pair")
    return key, cert


def leaf_builder(
    ca_cert: x509.Certificate,
    role: str,
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    """What every leaf this CA signs shares: subject (OU role, CN name), issuer, validity,
    not a CA, digital signature only. Callers add their purpose (EKU, SAN) and sign."""
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def authority_key_id(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def next_crl_number(crl_path: Path) -> int:
    """CRL numbers must grow; derive from the current CRL, else from the clock."""
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        current = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except FileNotFoundError:
        return 1
    except (OSError, ValueError, x509.ExtensionNotFound):
        return int(time.time())
    return current + 1


def write_crl(
    ca_dir: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    entries: Sequence[Entry],
) -> None:
    """Rebuild crl.pem from the index so the CRL can never drift from issued.json."""
    now = utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(next_crl_number(ca_dir / CRL)), critical=False)
        .add_extension(authority_key_id(ca_key, ca_cert), critical=False)
    )
    for entry in entries:
        if entry.revoked_at is not None:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(entry.serial)
                .revocation_date(entry.revoked_at)
                .build()
            )
    crl = builder.sign(ca_key, hashes.SHA256())
    replace_file(ca_dir / CRL, crl.public_bytes(serialization.Encoding.PEM), 0o644)
