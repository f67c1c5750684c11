"""Checks on a CRL that came from somewhere else than the CA's own directory.

The server serves the CRL it has loaded to the members (``GetRevocationList``),
but the server is not trusted with revocations: a member accepts a CRL only if
the federation CA signed it, it is not stale, and its CRL number is strictly
greater than the one the member already holds, so that a server replaying an
older CRL cannot take anyone off it (docs/how-to/member.md#keep-the-revocation-list-current).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

#: The largest CRL a member accepts from the server (a CRL of a few thousand entries is ~100 KiB).
MAX_CRL_BYTES = 4 * 1024 * 1024

_IssuerKey = (
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


class CrlRefused(ValueError):
    """A CRL that must not replace the one held; the message says why."""


@dataclass(frozen=True, slots=True)
class CheckedCrl:
    """A CRL that passed :func:`check_crl`."""

    crl: x509.CertificateRevocationList
    number: int | None
    revoked: frozenset[int]


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    """The CRL's number (the CRLNumber extension), or None if it carries none."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def check_crl(
    data: bytes,
    ca_cert: x509.Certificate,
    *,
    held_number: int | None = None,
    now: datetime | None = None,
) -> CheckedCrl:
    """Parse ``data`` (PEM) and check it as a member must before using it.

    Signed by ``ca_cert`` with a matching issuer, not past its nextUpdate, and
    numbered strictly above ``held_number`` (when the member holds a CRL). Raises
    :class:`CrlRefused` naming the first failed check.
    """
    if not isinstance(data, bytes) or not data:
        raise CrlRefused("empty CRL")
    if len(data) > MAX_CRL_BYTES:
        raise CrlRefused(f"CRL of {len(data)} bytes is larger than the {MAX_CRL_BYTES} accepted")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise CrlRefused(f"not a PEM CRL ({str(exc)[:120]})") from None
    key = ca_cert.public_key()
    if not isinstance(key, _IssuerKey):
        raise CrlRefused("the federation CA certificate has an unsupported key type")
    if crl.issuer != ca_cert.subject:
        raise CrlRefused(f"issued by {crl.issuer.rfc4514_string()!r}, not by the federation CA")
    try:
        signed = crl.is_signature_valid(key)
    except (ValueError, TypeError):
        signed = False
    if not signed:
        raise CrlRefused("not signed by the federation CA")
    now = now or datetime.now(UTC)
    next_update = crl.next_update_utc
    if next_update is not None and next_update < now:
        raise CrlRefused(f"stale: its next update was due {next_update.isoformat()}")
    number = crl_number(crl)
    if held_number is not None and (number is None or number <= held_number):
        raise CrlRefused(
            f"CRL number {number} is not newer than the {held_number} this member holds "
            "(a CRL never goes back)"
        )
    return CheckedCrl(crl=crl, number=number, revoked=frozenset(r.serial_number for r in crl))
