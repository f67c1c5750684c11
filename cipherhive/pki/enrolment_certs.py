"""Enrolment certificates: the key a member signs its round enrolments with, and nothing else.

SecAgg (Bonawitz et al., CCS 2017, §6, the "active adversary" model) needs a
PKI: every message that fixes who takes part in a round (the advertised keys
of round 0, the consistency check of round 3) is signed, and every member
checks each signature against a key the trusted authority bound to a
member's identity. In cipherhive the authority is the federation CA
(``cipherhive certs``), run by the members' governance, never by the
aggregator's operator.

Each member gets a dedicated **enrolment certificate** next to its TLS pair
(``NAME.enrol.crt``, ``NAME.enrol.key``), issued by ``certs issue --role
node`` and revoked with the member's TLS certificate. Why a separate key:

* a signature made with the TLS key over cipherhive's messages could in
  principle be replayed into a TLS handshake (or the reverse); a key used for
  one purpose only cannot be, whatever the TLS version;
* the certificate carries an extended key usage that names only this
  purpose (``ENROL_EKU``), so TLS stacks refuse it as a client or server
  certificate, and :func:`verify_certificate` refuses a TLS certificate (one
  with serverAuth or clientAuth, or without the purpose URI) as an enrolment
  certificate;
* its SAN URI ``cipherhive://node/NAME/enrol`` says what it is, and
  :func:`cipherhive.pki.certs.peer_identity` refuses it as a TLS identity;
* it names the member's TLS certificate (``TLS_BINDING``: the SHA-256 of its
  DER, issued in the same step), so the TLS fingerprint in an enrolment, which
  orders the pairs and names the member to its peers, is certified too.

Signatures are ECDSA P-256 with SHA-256. ECDSA signatures are malleable
(``(r, s)`` and ``(r, n - s)`` both verify), and a roster compares entries
byte for byte, so only the low-``s`` DER form is produced and accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cipherhive.pki.ca_store import leaf_builder, utcnow
from cipherhive.runtime.fsutil import require_private_file

__all__ = [
    "ENROL_EKU",
    "EnrolmentError",
    "EnrolmentIdentity",
    "build_certificate",
    "enrol_uri",
    "load_certificate",
    "load_key",
    "paths",
    "sign",
    "verify_certificate",
    "verify_signature",
]

#: Extended key usage of an enrolment certificate: an OID derived from a random UUID (ITU-T X.667,
#: arc 2.25), so it needs no registration and names nothing else. Not serverAuth, not clientAuth.
ENROL_EKU = x509.ObjectIdentifier("2.25.17618881593584267949101967208403389414")
#: Extension (non-critical) holding the SHA-256 of the member's TLS certificate, DER OCTET STRING.
TLS_BINDING = x509.ObjectIdentifier("2.25.3585492733225939538498998737878616880")
#: The only role that enrols in rounds.
MEMBER_ROLE = "node"
_TLS_EKUS = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
_CURVE_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 n
_MAX_SIGNATURE = 72
_OCTET_32 = b"\x04\x20"  # DER header of a 32-byte OCTET STRING


class EnrolmentError(ValueError):
    """An enrolment certificate, key or signature that must not be trusted; the text says why."""


class RevocationCheck(Protocol):
    """What :class:`cipherhive.pki.certs.RevocationList` offers: a live answer per serial."""

    def is_revoked(self, serial: int) -> bool: ...


Revocations = x509.CertificateRevocationList | RevocationCheck


@dataclass(frozen=True, slots=True)
class EnrolmentIdentity:
    """A verified enrolment certificate: the member it names and the key it certifies."""

    name: str
    role: str
    serial: int
    #: SHA-256 of the enrolment certificate's DER (what a node may pin instead of a name).
    fingerprint: bytes
    public_key: ec.EllipticCurvePublicKey
    #: SHA-256 of the member's TLS certificate, issued with this one (``TLS_BINDING``).
    tls_fingerprint: bytes


def enrol_uri(name: str, role: str = MEMBER_ROLE) -> str:
    """The SAN URI that marks a certificate as ``name``'s enrolment certificate."""
    return f"cipherhive://{role}/{name}/enrol"


def paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """``(certificate, key)`` of ``name``'s enrolment pair in ``out_dir``, next to its TLS pair."""
    return out_dir / f"{name}.enrol.crt", out_dir / f"{name}.enrol.key"


def build_certificate(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    authority_key_id: x509.AuthorityKeyIdentifier,
    role: str,
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    tls_fingerprint: bytes,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """An enrolment certificate for ``role``/``name`` signed by the CA (used by ``certs issue``)."""
    if len(tls_fingerprint) != 32:
        raise ValueError("the TLS certificate fingerprint is a SHA-256 digest (32 bytes)")
    return (
        leaf_builder(ca_cert, role, name, public_key, not_before, not_after)
        # Present and without serverAuth/clientAuth: TLS stacks refuse the certificate.
        .add_extension(x509.ExtendedKeyUsage([ENROL_EKU]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(enrol_uri(name, role))]),
            critical=False,
        )
        .add_extension(x509.UnrecognizedExtension(TLS_BINDING, _OCTET_32 + tls_fingerprint), critical=False)
        .add_extension(authority_key_id, critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def load_certificate(data: bytes) -> x509.Certificate:
    """Parse a PEM or DER certificate, saying which when neither works."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise EnrolmentError(f"not a PEM or DER certificate: {exc}") from exc


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a member's enrolment key (``NAME.enrol.key``), refusing one others can read."""
    require_private_file(path, "enrolment key")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise EnrolmentError(f"cannot load the enrolment key {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise EnrolmentError(f"{path} is not an EC P-256 key; issue it with `cipherhive certs issue`")
    return key


def _is_revoked(revocations: Revocations, serial: int, ca_cert: x509.Certificate) -> bool:
    if isinstance(revocations, x509.CertificateRevocationList):
        ca_key = ca_cert.public_key()
        if not isinstance(ca_key, ec.EllipticCurvePublicKey) or (
            revocations.issuer != ca_cert.subject or not revocations.is_signature_valid(ca_key)
        ):
            raise EnrolmentError(
                "the CRL is not signed by the federation CA; copy crl.pem from the CA that issued "
                "the members' certificates"
            )
        return revocations.get_revoked_certificate_by_serial_number(serial) is not None
    return revocations.is_revoked(serial)


def _one_attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(oid)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        return None
    return attrs[0].value


def verify_certificate(
    cert: x509.Certificate | bytes,
    ca_cert: x509.Certificate,
    revocations: Revocations,
    *,
    now: datetime | None = None,
) -> EnrolmentIdentity:
    """Check that ``cert`` is a live enrolment certificate of a member, issued by ``ca_cert``.

    Raises :class:`EnrolmentError` naming the first failed check: not issued by
    the federation CA, outside its validity, a TLS certificate (or any other
    kind) rather than an enrolment certificate, not a member's, revoked.
    """
    if isinstance(cert, bytes):
        cert = load_certificate(cert)
    subject = cert.subject.rfc4514_string()
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise EnrolmentError(
            f"certificate {subject!r} is not signed by the federation CA {ca_cert.subject.rfc4514_string()!r}"
        ) from None
    when = now or utcnow()
    if not cert.not_valid_before_utc - timedelta(minutes=5) <= when <= cert.not_valid_after_utc:
        raise EnrolmentError(
            f"certificate {subject!r} is outside its validity "
            f"({cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    try:
        ekus = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        ekus = []
    if any(e in _TLS_EKUS for e in ekus) or ekus != [ENROL_EKU]:
        raise EnrolmentError(
            f"certificate {subject!r} is not an enrolment certificate (a TLS certificate, or one "
            "made for another purpose); sign enrolments with NAME.enrol.key from `cipherhive certs issue`"
        )
    role, name = _one_attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME), _one_attr(cert, NameOID.COMMON_NAME)
    if role != MEMBER_ROLE or name is None:
        raise EnrolmentError(f"enrolment certificate {subject!r} does not name a member (OU=node)")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise EnrolmentError(f"enrolment certificate {subject!r} lacks {exc.oid.dotted_string}") from None
    if uris != [enrol_uri(name, role)] or bc.ca or not ku.digital_signature:
        raise EnrolmentError(
            f"certificate {subject!r} is not an enrolment certificate (expected the SAN URI "
            f"{enrol_uri(name, role)!r}, digitalSignature, not a CA)"
        )
    try:
        binding = cert.extensions.get_extension_for_oid(TLS_BINDING).value
    except x509.ExtensionNotFound:
        binding = None
    if (
        not isinstance(binding, x509.UnrecognizedExtension)
        or len(binding.value) != 34
        or not binding.value.startswith(_OCTET_32)
    ):
        raise EnrolmentError(f"enrolment certificate {subject!r} does not name its member's TLS certificate")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise EnrolmentError(f"enrolment certificate {subject!r} does not hold an EC P-256 key")
    if _is_revoked(revocations, cert.serial_number, ca_cert):
        raise EnrolmentError(
            f"the enrolment certificate of {name!r} (serial {cert.serial_number:x}) is revoked"
        )
    return EnrolmentIdentity(
        name=name,
        role=role,
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()),
        public_key=public_key,
        tls_fingerprint=binding.value[2:],
    )


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA P-256/SHA-256 over ``message``, in the one (low-``s``) DER form verifiers accept."""
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return encode_dss_signature(r, min(s, _CURVE_ORDER - s))


def verify_signature(public_key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    """True only for a valid, canonical (DER, low-``s``) signature of ``message``."""
    if len(signature) > _MAX_SIGNATURE:
        return False
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        return False
    if s > _CURVE_ORDER // 2 or encode_dss_signature(r, s) != signature:
        return False
    try:
        public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
