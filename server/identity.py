"""Who is calling: taken from the client's TLS certificate, never from a message field.

With mutual TLS the name is the certificate's common name and the role
(node or admin) its organizational unit, as issued by `cipherhive certs`; a
revoked certificate is refused on every call. With ``--insecure`` there are
no certificates, so names are self-declared in request metadata: fit for a
test on one machine, never for a federation of companies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc

from cipherhive import certs
from cipherhive.transport import NODE_NAME_METADATA

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class Caller:
    name: str
    role: str


class Authenticator:
    def __init__(self, *, insecure: bool, revocations: certs.RevocationList | None = None) -> None:
        self.insecure = insecure
        self._revocations = revocations

    def require(self, context: grpc.ServicerContext, role: str, claimed: str = "") -> Caller:
        """The caller, or abort the RPC with UNAUTHENTICATED / PERMISSION_DENIED."""
        if self.insecure:
            return self._self_declared(context, role, claimed)
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "no client certificate: connect with the certificate issued by `cipherhive certs`",
            )
        try:
            ident = certs.peer_identity(pems[0])
        except certs.CertificateError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"client certificate not usable: {exc}")
        if self._revocations is not None and self._revocations.is_revoked(ident.serial):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate {ident.serial:x} of {ident.role} {ident.name!r} has been revoked",
            )
        if ident.role != role:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this call needs a {role} certificate; {ident.name!r} presented a {ident.role} one",
            )
        return Caller(ident.name, ident.role)

    def revoked(self, context: grpc.ServicerContext) -> str:
        """For long streams: a reason to end the call if the caller's certificate was revoked since."""
        if self.insecure or self._revocations is None:
            return ""
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            return ""
        ident = certs.peer_identity(pems[0])
        if self._revocations.is_revoked(ident.serial):
            return f"certificate {ident.serial:x} of {ident.role} {ident.name!r} has been revoked"
        return ""

    def _self_declared(self, context: grpc.ServicerContext, role: str, claimed: str) -> Caller:
        if role == "admin":
            return Caller("operator", "admin")
        metadata = dict(context.invocation_metadata())
        name = claimed or str(metadata.get(NODE_NAME_METADATA, ""))
        if not _NAME.match(name):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"insecure server: send the node name (1-64 of A-Z a-z 0-9 . _ -) in the "
                f"{NODE_NAME_METADATA!r} metadata; got {name!r}",
            )
        return Caller(name, role)
