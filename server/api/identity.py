"""Who is calling: taken from the client's TLS certificate, never from a message field.

With mutual TLS the name is the certificate's common name and the role
(node or admin) its organizational unit, as issued by `cipherhive certs`; a
revoked certificate is refused on every call. With ``--insecure`` there are
no certificates, so names are self-declared in request metadata: fit for a
test on one machine, never for a federation of companies.

The checks here are plain functions of the call's auth context and metadata
that raise :class:`Refusal`; the server interceptor (``server/api/guard.py``)
turns a refusal into the call's status, so no servicer repeats them.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cipherhive.pki import certs
from cipherhive.runtime.transport import NODE_NAME_METADATA

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: The role a method needs when any certificate of the federation will do (health, reflection).
ANY_ROLE = "any"


class Refusal(Exception):
    """A call refused before it reached a servicer, with the status the caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Caller:
    """An identified caller; limits and the audit trail key on ``(role, name)``."""

    name: str
    role: str
    serial: int = 0  # certificate serial, 0 in insecure mode
    #: SHA-256 of the client certificate's DER (empty in insecure mode): what a masked
    #: round's enrolment must name (docs/spec/masked-round.md §1).
    tls_fingerprint: bytes = b""

    @property
    def key(self) -> tuple[str, str]:
        return (self.role, self.name)


class Authenticator:
    def __init__(self, *, insecure: bool, revocations: certs.RevocationList | None = None) -> None:
        self.insecure = insecure
        self._revocations = revocations

    def identify(
        self,
        auth_context: Mapping[str, Sequence[bytes]],
        metadata: Sequence[tuple[str, str | bytes]],
        role: str,
        claimed: str = "",
    ) -> Caller:
        """The caller, or raise Refusal (UNAUTHENTICATED / PERMISSION_DENIED)."""
        if self.insecure:
            return self._self_declared(metadata, role, claimed)
        pems = auth_context.get("x509_pem_cert")
        if not pems:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "no client certificate: connect with the certificate issued by `cipherhive certs`",
            )
        try:
            ident = certs.peer_identity(pems[0])
        except certs.CertificateError as exc:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"client certificate not usable: {exc}") from exc
        caller = Caller(ident.name, ident.role, ident.serial, _der_fingerprint(pems[0]))
        revoked = self.revoked(caller)
        if revoked:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, revoked)
        if role != ANY_ROLE and ident.role != role:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this call needs a {role} certificate; {ident.name!r} presented a {ident.role} one",
            )
        return caller

    @property
    def revocation_list(self) -> certs.RevocationList | None:
        """The CRL the server checks callers against (None: insecure, or run without one)."""
        return None if self.insecure else self._revocations

    def revoked(self, caller: Caller) -> str:
        """A reason to refuse or end ``caller``'s call if its certificate is revoked, else ""."""
        if self.insecure or self._revocations is None or not caller.serial:
            return ""
        if self._revocations.is_revoked(caller.serial):
            return f"certificate {caller.serial:x} of {caller.role} {caller.name!r} has been revoked"
        return ""

    def _self_declared(self, metadata: Sequence[tuple[str, str | bytes]], role: str, claimed: str) -> Caller:
        if role == "admin":
            return Caller("operator", "admin")
        name = claimed or str(dict(metadata).get(NODE_NAME_METADATA, ""))
        if role == ANY_ROLE:
            return Caller(name if _NAME.match(name) else "anonymous", "client")
        if not _NAME.match(name):
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"insecure server: send the node name (1-64 of A-Z a-z 0-9 . _ -) in the "
                f"{NODE_NAME_METADATA!r} metadata; got {name[:80]!r}",
            )
        return Caller(name, role)


@functools.lru_cache(maxsize=256)
def _der_fingerprint(pem: bytes) -> bytes:
    """SHA-256 of a PEM certificate's DER (cached: the same few certificates call all day)."""
    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
