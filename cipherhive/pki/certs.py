"""Certificate tooling for a cipherhive federation.

Every participant (aggregation server, training nodes, operators) talks gRPC
over mutual TLS. Certificates carry the participant's role and name, so the
server can authorise a call from the TLS handshake alone, and a signed CRL
lets an operator cut a participant off without restarting anything. Only the
``cryptography`` library is used, so no ``openssl`` binary (and none of its
version quirks) is needed.

CA directory layout::

    ca.key       EC P-256 private key of the CA (mode 0600)
    ca.crt       self-signed CA certificate
    issued.json  index of issued certificates (source of truth for the CRL)
    crl.pem      signed X.509 CRL, rewritten on CA creation and every revoke

A node also receives an enrolment certificate (``NAME.enrol.crt``/``.key``) for
signing round enrolments; see :mod:`cipherhive.pki.enrolment_certs`. The index and CRL
code lives in :mod:`cipherhive.pki.ca_store`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cipherhive.pki import enrolment_certs
from cipherhive.pki.ca_store import (
    CA_CERT,
    CA_KEY,
    CRL,
    INDEX,
    PURPOSE_ENROL,
    PURPOSE_TLS,
    Entry,
    IssuedCert,
    IssuedRecord,
    authority_key_id,
    ca_lock,
    check_key_permissions,
    fsync_dir,
    iso,
    key_pem,
    leaf_builder,
    load_ca,
    read_index,
    replace_file,
    stage,
    utcnow,
    write_crl,
    write_index,
    write_new,
)
from cipherhive.pki.crl_check import crl_number
from cipherhive.runtime.logs import event

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CRL",
    "INDEX",
    "ROLES",
    "CertificateError",
    "Identity",
    "IssuedCert",
    "IssuedRecord",
    "RevocationList",
    "check_key_permissions",
    "create_ca",
    "issue",
    "list_issued",
    "peer_identity",
    "register",
    "revoke",
    "validate_name",
    "validate_role",
]

log = logging.getLogger(__name__)

ROLES = ("server", "node", "admin")


URI_SCHEME = "cipherhive"
DEFAULT_SERVER_HOSTS = ("localhost", "127.0.0.1")
# Back-date notBefore a little so peers with a slightly slow clock accept new certs.
_CLOCK_SKEW = timedelta(minutes=5)

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_RE = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_HEX_RE = re.compile(r"[0-9a-fA-F]{1,64}")


class CertificateError(ValueError):
    """A certificate or CRL is unusable for cipherhive (bad role, name or signature)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is on the other end of a mutual-TLS connection."""

    name: str
    role: str
    serial: int
    fingerprint: str


# --------------------------------------------------------------------------
# validation helpers


def validate_name(name: str) -> str:
    """Reject names that could not be used safely as CN, URI part and file name."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid name {name!r}: use 1-64 characters from A-Z, a-z, 0-9, '.', '_' and '-'")
    return name


def validate_role(role: str) -> str:
    """Reject roles the server would not know how to authorise."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    return role


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"invalid validity {days!r}: days must be a whole number >= 1")


def _role_uri(role: str, name: str) -> str:
    return f"{URI_SCHEME}://{role}/{name}"


def _parse_serial(text: str) -> int | None:
    """Accept serials as printed by ``certs list`` and by openssl (0x prefix, colons)."""
    cleaned = text.strip().replace(":", "")
    if cleaned[:2].lower() == "0x":
        cleaned = cleaned[2:]
    if not _HEX_RE.fullmatch(cleaned):
        return None
    return int(cleaned, 16)


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Turn host strings into SAN entries; IPs must be IPAddress for TLS to match them."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hosts:
        host = raw.strip() if isinstance(raw, str) else ""
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            host = host.rstrip(".").lower()
            if len(host) > 253 or not _DNS_RE.fullmatch(host):
                raise ValueError(
                    f"invalid host {raw!r}: use a DNS name such as 'agg.example.org' "
                    "or an IP address such as '10.0.0.5'"
                ) from None
            if host not in seen:
                seen.add(host)
                names.append(x509.DNSName(host))
            continue
        key = str(ip)
        if key not in seen:
            seen.add(key)
            names.append(x509.IPAddress(ip))
    return names


# --------------------------------------------------------------------------
# public CA operations


def create_ca(ca_dir: Path, name: str = "cipherhive-ca", days: int = 3650) -> Path:
    """Create a new federation CA in ``ca_dir`` and return the path of ``ca.crt``."""
    validate_name(name)
    _check_days(days)
    ca_dir = Path(ca_dir)
    for fname in (CA_KEY, CA_CERT, INDEX):
        if (ca_dir / fname).exists():
            raise FileExistsError(
                f"a CA already exists in {ca_dir} (found {fname}); keep using it, or pick "
                "another directory (delete this one only if you mean to discard the CA and "
                "every certificate it issued)"
            )
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
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
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        write_new(ca_dir / CA_KEY, key_pem(key), 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"a CA already exists in {ca_dir} (found {CA_KEY}); keep using it or pick another directory"
        ) from None
    replace_file(ca_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write_index(ca_dir, [])
    write_crl(ca_dir, key, cert, [])
    log.info("created CA %r in %s", name, ca_dir)
    return ca_dir / CA_CERT


def issue(
    ca_dir: Path,
    role: str,
    name: str,
    out_dir: Path,
    hosts: Sequence[str] = (),
    days: int = 825,
    *,
    replace: bool = False,
) -> IssuedCert:
    """Issue a key pair + certificate for ``role``/``name`` into ``out_dir``.

    Refuses a second valid certificate for the same role and name (two live
    certificates for one identity make revocation error-prone) unless
    ``replace=True``, which revokes the old one in the same step.
    """
    validate_role(role)
    validate_name(name)
    _check_days(days)
    if name == "ca":
        raise ValueError("the name 'ca' is reserved (out_dir/ca.crt holds the CA certificate); pick another")
    if isinstance(hosts, str):
        hosts = (hosts,)
    if role == "server":
        san: list[x509.GeneralName] = _host_names(hosts or DEFAULT_SERVER_HOSTS)
    elif hosts:
        raise ValueError(f"hosts only apply to server certificates, not to role {role!r}")
    else:
        san = []
    san.append(x509.UniformResourceIdentifier(_role_uri(role, name)))

    ca_dir, out_dir = Path(ca_dir), Path(out_dir)
    ca_key, ca_cert = load_ca(ca_dir)
    ca_pem = (ca_dir / CA_CERT).read_bytes()
    key_path = out_dir / f"{name}.key"
    cert_path = out_dir / f"{name}.crt"
    ca_copy = out_dir / CA_CERT

    with ca_lock(ca_dir):
        entries = read_index(ca_dir)
        now = utcnow()
        ca_not_after = ca_cert.not_valid_after_utc
        if ca_not_after <= now:
            raise ValueError(f"the CA in {ca_dir} expired on {ca_not_after:%Y-%m-%d}; create a new CA")
        # A name means one party: the server keys its limits, audit trail and round state by
        # name, so a node certificate named like the operator must never exist (whatever the
        # state of the other certificate: a revoked one still names a party in the audit trail).
        clash = sorted({e.role for e in entries if e.name == name and e.role != role})
        if clash:
            raise FileExistsError(
                f"the name {name!r} is already used by a {' and a '.join(clash)} certificate of this "
                "CA; names are unique across roles, pick another name"
            )
        same = [e for e in entries if e.role == role and e.name == name and e.is_valid(now)]
        current = [e for e in same if e.purpose == PURPOSE_TLS]
        if current and not replace:
            serials = ", ".join(f"{e.serial:x}" for e in current)
            raise FileExistsError(
                f"a valid {role} certificate for {name!r} already exists (serial {serials}); "
                "pass --replace (replace=True) to revoke it and issue a new one"
            )

        key = ec.generate_private_key(ec.SECP256R1())
        # A leaf outliving its CA would fail chain validation anyway; cap it.
        not_after = min(now + timedelta(days=days), ca_not_after)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (
            leaf_builder(ca_cert, role, name, key.public_key(), now - _CLOCK_SKEW, not_after)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(authority_key_id(ca_key, ca_cert), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        entry = Entry(
            serial=cert.serial_number,
            role=role,
            name=name,
            not_after=cert.not_valid_after_utc,
            revoked_at=None,
            cert_path=str(cert_path.absolute()),
            key_path=str(key_path.absolute()),
        )
        # A member also gets the key it signs round enrolments with (cipherhive.pki.enrolment_certs).
        enrol: tuple[Entry, bytes, bytes] | None = None
        if role == enrolment_certs.MEMBER_ROLE:
            enrol_key = ec.generate_private_key(ec.SECP256R1())
            enrol_cert = enrolment_certs.build_certificate(
                ca_key=ca_key,
                ca_cert=ca_cert,
                authority_key_id=authority_key_id(ca_key, ca_cert),
                role=role,
                name=name,
                public_key=enrol_key.public_key(),
                tls_fingerprint=cert.fingerprint(hashes.SHA256()),
                not_before=now - _CLOCK_SKEW,
                not_after=not_after,
            )
            enrol_cert_path, enrol_key_path = enrolment_certs.paths(out_dir, name)
            enrol = (
                Entry(
                    serial=enrol_cert.serial_number,
                    role=role,
                    name=name,
                    not_after=enrol_cert.not_valid_after_utc,
                    revoked_at=None,
                    cert_path=str(enrol_cert_path.absolute()),
                    key_path=str(enrol_key_path.absolute()),
                    purpose=PURPOSE_ENROL,
                ),
                enrol_cert.public_bytes(serialization.Encoding.PEM),
                key_pem(enrol_key),
            )

        # Stage the files first, record the certificate, then rename into place:
        # a certificate never reaches disk without being in the index (revocable).
        out_dir.mkdir(parents=True, exist_ok=True)
        staged: list[tuple[Path, Path]] = []
        try:
            staged.append((stage(key_path, key_pem(key), 0o600), key_path))
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            staged.append((stage(cert_path, cert_pem, 0o644), cert_path))
            if enrol is not None:
                _, enrol_pem, enrol_key_pem = enrol
                enrol_cert_file, enrol_key_file = enrolment_certs.paths(out_dir, name)
                staged.append((stage(enrol_key_file, enrol_key_pem, 0o600), enrol_key_file))
                staged.append((stage(enrol_cert_file, enrol_pem, 0o644), enrol_cert_file))
            if ca_copy.resolve() != (ca_dir / CA_CERT).resolve():
                staged.append((stage(ca_copy, ca_pem, 0o644), ca_copy))
            # Replacing a member's TLS certificate replaces its enrolment certificate too.
            for old in same:
                old.revoked_at = now
            entries.append(entry)
            if enrol is not None:
                entries.append(enrol[0])
            write_index(ca_dir, entries)
        except BaseException:
            for tmp, _ in staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        for tmp, final in staged:
            os.replace(tmp, final)
        fsync_dir(out_dir)
        if same:
            write_crl(ca_dir, ca_key, ca_cert, entries)
            log.info("revoked %d previous %s certificate(s) for %r", len(same), role, name)
    issued = entry.issued()
    if enrol is not None:
        issued = dataclasses.replace(issued, enrolment=enrol[0].issued())
    return issued


def _revoke(
    ca_dir: Path, text: str, role: str | None, mode: Literal["auto", "serial", "name"]
) -> list[IssuedCert]:
    if role is not None:
        validate_role(role)
    ca_dir = Path(ca_dir)
    ca_key, ca_cert = load_ca(ca_dir)
    hint = f"see 'cipherhive certs list --ca {ca_dir}'"
    with ca_lock(ca_dir):
        entries = read_index(ca_dir)
        now = utcnow()
        targets: list[Entry] = []
        serial = _parse_serial(text) if mode != "name" and role is None else None
        if mode == "serial" and serial is None:
            raise ValueError(f"invalid serial {text!r}: give it in hex as shown by 'certs list'")
        by_serial = [e for e in entries if e.serial == serial] if serial is not None else []
        if by_serial:
            entry = by_serial[0]
            if entry.revoked_at is not None:
                raise LookupError(
                    f"certificate {entry.serial:x} ({entry.role} {entry.name!r}) was already "
                    f"revoked at {iso(entry.revoked_at)}; nothing to do"
                )
            targets = [entry]
            if entry.purpose == PURPOSE_TLS:
                # A member cut off from TLS must not keep signing round enrolments either.
                targets += [
                    e
                    for e in entries
                    if e.purpose == PURPOSE_ENROL
                    and (e.role, e.name) == (entry.role, entry.name)
                    and e.is_valid(now)
                ]
        elif mode == "serial":
            raise LookupError(f"no certificate with serial {text!r} in {ca_dir}; {hint}")
        else:
            named = [e for e in entries if e.name == text and (role is None or e.role == role)]
            targets = [e for e in named if e.is_valid(now)]
            what = f"{role} certificate" if role else "certificate"
            if named and not targets:
                raise LookupError(f"every {what} named {text!r} is already revoked or expired; {hint}")
            if not targets:
                label = "name" if mode == "name" else "serial or name"
                raise LookupError(f"no {what} with {label} {text!r} in {ca_dir}; {hint}")
        for entry in targets:
            entry.revoked_at = now
        write_index(ca_dir, entries)
        write_crl(ca_dir, ca_key, ca_cert, entries)
    for entry in targets:
        log.info("revoked %s %r (serial %x)", entry.role, entry.name, entry.serial)
    return [e.issued() for e in targets]


def revoke(ca_dir: Path, serial_or_name: str, role: str | None = None) -> list[IssuedCert]:
    """Revoke by hex serial, or every valid certificate with that name (optionally of a role).

    With ``role`` given the argument is always treated as a name. Revoking a
    member's TLS certificate by serial also revokes its enrolment certificate;
    every revoked certificate is returned (``purpose`` tells them apart).
    """
    return _revoke(Path(ca_dir), serial_or_name, role, "auto")


def list_issued(ca_dir: Path) -> list[IssuedRecord]:
    """Return every certificate the CA has issued (TLS and enrolment), in issue order."""
    return [e.record() for e in read_index(Path(ca_dir))]


# --------------------------------------------------------------------------
# peer side


def _single_attr(cert: x509.Certificate, oid: x509.ObjectIdentifier, label: str) -> str:
    attrs = cert.subject.get_attributes_for_oid(oid)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        raise CertificateError(
            f"peer certificate must carry exactly one {label}; "
            f"found {len(attrs)} (subject {cert.subject.rfc4514_string()!r})"
        )
    return attrs[0].value


@functools.lru_cache(maxsize=1024)
def peer_identity(pem: bytes) -> Identity:
    """Extract role/name from a peer certificate (cached: gRPC repeats the PEM per call).

    The TLS layer has already verified the chain; this only maps the verified
    certificate to an identity and rejects ones not made for cipherhive.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateError(f"peer certificate is not a valid PEM certificate: {exc}") from exc
    role = _single_attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME, "role (OU)")
    if role not in ROLES:
        raise CertificateError(
            f"peer certificate has unknown role {role!r} (OU); expected one of {', '.join(ROLES)}"
        )
    name = _single_attr(cert, NameOID.COMMON_NAME, "name (CN)")
    if not _NAME_RE.fullmatch(name):
        raise CertificateError(f"peer certificate has an invalid name {name!r} (CN)")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [
            u
            for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(f"{URI_SCHEME}://")
        ]
    except x509.ExtensionNotFound:
        uris = []
    if uris and uris != [_role_uri(role, name)]:
        raise CertificateError(
            f"peer certificate SAN URI {uris} disagrees with OU/CN {_role_uri(role, name)!r}"
        )
    return Identity(
        name=name,
        role=role,
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )


_IssuerKey = (
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


class RevocationList:
    """Live view of crl.pem for a running server.

    The file is re-read when its identity (mtime, size, inode) changes, checked at
    most every ``check_interval`` seconds, so ``cipherhive certs revoke`` takes
    effect without a restart. Every CRL is verified against ``ca_cert``.
    """

    def __init__(self, crl_path: Path, ca_cert: Path, *, check_interval: float = 1.0) -> None:
        self._path = Path(crl_path)
        try:
            ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        except ValueError as exc:
            raise CertificateError(f"cannot parse CA certificate {ca_cert}: {exc}") from exc
        public_key = ca.public_key()
        if not isinstance(public_key, _IssuerKey):
            raise CertificateError(f"CA certificate {ca_cert} has an unsupported key type")
        self._ca_subject = ca.subject
        self._ca_key = public_key
        self._interval = max(0.0, check_interval)
        self._lock = threading.Lock()
        self._revoked: frozenset[int] = frozenset()
        self._revoked_at: dict[int, datetime] = {}
        self._pem = b""
        self._number: int | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._loaded = False
        self._warned_missing = False
        self._next_check = time.monotonic() + self._interval
        with self._lock:
            self._refresh_locked(initial=True)

    @property
    def path(self) -> Path:
        """The CRL file being watched."""
        return self._path

    def is_revoked(self, serial: int) -> bool:
        """True if ``serial`` is on the current CRL (reloading it if the file changed)."""
        with self._lock:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self._interval
                self._refresh_locked(initial=False)
            return serial in self._revoked

    def refresh(self) -> None:
        """Check the file now, ignoring the rate limit (e.g. right after a revoke)."""
        with self._lock:
            self._next_check = time.monotonic() + self._interval
            self._refresh_locked(initial=False)

    def revoked_serials(self) -> frozenset[int]:
        """Snapshot of the revoked serials as last loaded."""
        with self._lock:
            return self._revoked

    def revoked_at(self, serial: int) -> datetime | None:
        """When ``serial`` was revoked, per the CRL as last loaded (None: not on it)."""
        with self._lock:
            return self._revoked_at.get(serial)

    def pem(self) -> bytes:
        """The exact bytes of the CRL as last loaded (empty before any), re-checking the file
        if it is due: what the server serves to members, who verify it themselves
        (docs/how-to/member.md#keep-the-revocation-list-current)."""
        with self._lock:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self._interval
                self._refresh_locked(initial=False)
            return self._pem

    def _refresh_locked(self, *, initial: bool) -> None:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            if not self._warned_missing:
                self._warned_missing = True
                if self._loaded:
                    log.warning(
                        "CRL %s disappeared; keeping the %d revocations loaded before",
                        self._path,
                        len(self._revoked),
                    )
                else:
                    log.warning("CRL %s not found; treating no certificate as revoked", self._path)
            self._stamp = None
            return
        except OSError as exc:
            if initial:
                raise
            log.warning("cannot stat CRL %s (%s); keeping the previous list", self._path, exc)
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        self._warned_missing = False
        try:
            data, crl = self._load()
        except (CertificateError, OSError) as exc:
            if initial:
                raise
            # Remember the stamp so one bad file is reported once, not every second.
            self._stamp = stamp
            log.warning("ignoring unusable CRL %s (%s); keeping the previous list", self._path, exc)
            return
        revoked_at = {r.serial_number: r.revocation_date_utc for r in crl}
        revoked = frozenset(revoked_at)
        number = crl_number(crl)
        # One line per load, so an operator sees a revocation take effect (docs/how-to/operator.md).
        event(
            log,
            "CRL loaded" if not self._loaded else "CRL reloaded",
            path=str(self._path),
            number=number if number is not None else "none",
            revoked=len(revoked),
            new=len(revoked - self._revoked) if self._loaded else len(revoked),
        )
        self._revoked = revoked
        self._revoked_at = revoked_at
        self._pem = data
        self._number = number
        self._stamp = stamp
        self._loaded = True

    def _load(self) -> tuple[bytes, x509.CertificateRevocationList]:
        data = self._path.read_bytes()
        try:
            crl = x509.load_pem_x509_crl(data)
        except ValueError as exc:
            raise CertificateError(f"CRL {self._path} is not a valid PEM CRL: {exc}") from exc
        if crl.issuer != self._ca_subject or not crl.is_signature_valid(self._ca_key):
            raise CertificateError(
                f"CRL {self._path} is not signed by the configured CA; "
                "copy crl.pem from the CA that issued the federation certificates"
            )
        next_update = crl.next_update_utc
        if next_update is not None and next_update < utcnow():
            log.warning(
                "CRL %s is stale (next update was %s); regenerate it on the CA",
                self._path,
                next_update.isoformat(),
            )
        return data, crl


# --------------------------------------------------------------------------
# CLI

_ERROR_PREFIX = "cipherhive certs: error:"
_Command = Callable[[argparse.Namespace], int]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename} (check the path and its permissions)"
    if isinstance(exc, LookupError) and len(exc.args) == 1:
        return str(exc.args[0])  # KeyError would otherwise add quotes
    return str(exc) or type(exc).__name__


def _cli(fn: _Command) -> _Command:
    """Turn expected failures into one stderr line and exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, LookupError, OSError) as exc:
            print(f"{_ERROR_PREFIX} {_describe(exc)}", file=sys.stderr)
            return 2

    return wrapper


def _fmt_time(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@_cli
def _cmd_init(args: argparse.Namespace) -> int:
    ca_dir: Path = args.ca
    cert = create_ca(ca_dir, name=args.name, days=args.days)
    print(f"created CA {args.name!r} in {ca_dir}")
    print(f"  certificate: {cert} (distribute to every server and node)")
    print(f"  private key: {ca_dir / CA_KEY} (keep secret, ideally offline)")
    print(f"  CRL:         {ca_dir / CRL}")
    return 0


@_cli
def _cmd_issue(args: argparse.Namespace) -> int:
    hosts: list[str] = args.host or []
    before = (
        {
            r.serial
            for r in list_issued(args.ca)
            if r.role == args.role and r.name == args.name and r.status() == "valid"
        }
        if args.replace
        else set()
    )
    cert = issue(args.ca, args.role, args.name, args.out, hosts=hosts, days=args.days, replace=args.replace)
    print(
        f"issued {cert.role} certificate {cert.name!r} (serial {cert.serial:x}), "
        f"valid until {_fmt_time(cert.not_after)}"
    )
    print(f"  key:            {cert.key_path}")
    print(f"  certificate:    {cert.cert_path}")
    print(f"  CA certificate: {Path(args.out) / CA_CERT}")
    if cert.enrolment is not None:
        print(f"  enrolment key:  {cert.enrolment.key_path} (signs round enrolments only)")
        print(f"  enrolment cert: {cert.enrolment.cert_path} (serial {cert.enrolment.serial:x})")
    for serial in sorted(before):
        print(f"revoked previous certificate {serial:x}; CRL updated: {Path(args.ca) / CRL}")
    return 0


@_cli
def _cmd_list(args: argparse.Namespace) -> int:
    records = list_issued(args.ca)
    now = utcnow()
    if args.json:
        rows = [
            {
                "serial": f"{r.serial:x}",
                "role": r.role,
                "name": r.name,
                "purpose": r.purpose,
                "not_after": iso(r.not_after),
                "revoked_at": iso(r.revoked_at),
                "status": r.status(now),
            }
            for r in records
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not records:
        print(f"no certificates issued by the CA in {args.ca} yet")
        return 0
    table = [("SERIAL", "ROLE", "NAME", "PURPOSE", "NOT AFTER", "STATUS")] + [
        (f"{r.serial:x}", r.role, r.name, r.purpose, _fmt_time(r.not_after), r.status(now)) for r in records
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


@_cli
def _cmd_revoke(args: argparse.Namespace) -> int:
    if args.serial is not None:
        if args.role is not None:
            raise ValueError("--role only applies with --name; a serial is already unique")
        revoked = _revoke(args.ca, args.serial, None, "serial")
    else:
        revoked = _revoke(args.ca, args.name, args.role, "name")
    for cert in revoked:
        kind = "enrolment certificate" if cert.purpose == PURPOSE_ENROL else "certificate"
        print(f"revoked {cert.role} {kind} {cert.name!r} (serial {cert.serial:x})")
    print(f"CRL updated: {Path(args.ca) / CRL} (servers reload it within seconds)")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``certs`` command (init/issue/list/revoke) to the cipherhive CLI."""
    certs = subparsers.add_parser(
        "certs",
        help="manage the federation CA and mutual-TLS certificates",
        description="Create a CA, issue role certificates, list and revoke them.",
    )
    sub = certs.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)
    ca_help = "CA directory (holds ca.key, ca.crt, issued.json, crl.pem)"

    p = sub.add_parser("init", help="create a new CA", description="Create a new CA.")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help=ca_help)
    p.add_argument("--name", default="cipherhive-ca", help="CA common name")
    p.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("issue", help="issue a certificate", description="Issue a certificate.")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help=ca_help)
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--name", required=True, help="participant name, 1-64 of [A-Za-z0-9._-]")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--host",
        action="append",
        metavar="H",
        help="DNS name or IP for server certificates (repeatable; default localhost, 127.0.0.1)",
    )
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.add_argument("--replace", action="store_true", help="revoke an existing valid certificate first")
    p.set_defaults(func=_cmd_issue)

    p = sub.add_parser("list", help="list issued certificates", description="List certificates.")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help=ca_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("revoke", help="revoke certificates", description="Revoke certificates.")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help=ca_help)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", metavar="HEX", help="serial number as shown by 'certs list'")
    which.add_argument("--name", help="revoke every valid certificate with this name")
    p.add_argument("--role", choices=ROLES, help="with --name: only this role")
    p.set_defaults(func=_cmd_revoke)
