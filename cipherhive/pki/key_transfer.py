"""Handing the federation's secret key to a new member without copying it in the clear.

``secret.ctx`` used to travel by hand. Here it travels as three signed files
(docs/spec/key-transfer.md):

1. **Request** (the new member): a fresh X25519 key pair, used once; its public half is signed
   with the member's enrolment key, bound to the label, the federation (the key fingerprint of
   the ``public.ctx`` it was given) and its name. An enrolment key is an ECDSA key and only
   signs; it never encrypts.
2. **Grant** (a member that holds the key): it checks the request's signature against the
   enrolment certificate the request carries, that certificate against the federation CA and
   CRL, and the name against its *own* pinned membership, never against what a server or the
   requester says. It then seals the secret key's bytes to the request's X25519 key with HPKE
   (RFC 9180, base mode: X25519, HKDF-SHA256, ChaCha20-Poly1305, from ``cryptography``), with
   the same binding as HPKE's ``info``, and signs the ciphertext, because base mode leaves the
   sender anonymous.
3. **Accept** (the new member): it checks the grant's signature, certificate and membership the
   same way, opens the ciphertext, rebuilds its context from ``public.ctx`` and the secret key,
   and checks the pair with :func:`cipherhive.ckks.keys.check_key_pair`: a member that sends
   a wrong key is refused and named. It records who sent the key beside ``secret.ctx``, so a
   later failure of the same check at start-up names the sender too.

Only the secret key's bytes travel: the receiver takes the parameters and the public key from
its own ``public.ctx``, whose fingerprint its request pinned.

The secret key is the one field a secret context's serialization holds that its public
context's lacks (TenSEAL's context protobuf); :func:`secret_key_field` finds it by that
difference rather than by a field number, and :func:`join_secret_key` accepts exactly one such
field, so a sender cannot replace the parameters or the public key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tenseal as ts
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from cipherhive.ckks import codec, keys
from cipherhive.pki import enrolment_certs
from cipherhive.pki.enrolment_certs import EnrolmentError, EnrolmentIdentity, Revocations
from cipherhive.secagg.wire import fields

__all__ = [
    "KeyGrant",
    "KeyRequest",
    "KeyTransferError",
    "accept_grant",
    "check_request",
    "join_secret_key",
    "make_grant",
    "make_request",
    "secret_key_field",
]

REQUEST_FORMAT = "cipherhive/v1/key-request"
GRANT_FORMAT = "cipherhive/v1/key-grant"
REQUEST_LABEL = b"cipherhive/v1/key-request\0"
GRANT_LABEL = b"cipherhive/v1/key-grant\0"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
#: Bounds on what a file may hold, checked before anything is parsed further.
_MAX_FILE = 1 << 20
_MAX_NAME = 64


class KeyTransferError(ValueError):
    """A request or grant that must not be used; the message says which check failed and who
    signed what was refused."""


# ------------------------------------------------------------------ TenSEAL's context fields


def _wire_fields(data: bytes) -> list[tuple[int, bytes]]:
    """The top-level fields of a serialized context (protobuf wire format): (number, raw bytes
    of the whole field, tag included). Only length-delimited fields are expected."""
    out: list[tuple[int, bytes]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        value, shift = 0, 0
        while True:
            if i >= len(data) or shift > 63:
                raise KeyTransferError("a context field is truncated")
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(data):
        start = i
        key = varint()
        if key & 7 != 2:
            raise KeyTransferError(f"unexpected context field type {key & 7}")
        length = varint()
        if length > len(data) - i:
            raise KeyTransferError("a context field is truncated")
        i += length
        out.append((key >> 3, data[start:i]))
    return out


def _public_part(ctx: ts.Context) -> bytes:
    public = ctx.copy()
    public.make_context_public()
    serialized: bytes = public.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return serialized


def secret_key_field(secret_context: bytes) -> bytes:
    """The secret key of a member's context, as the one serialized field its public part lacks."""
    ctx = ts.context_from(secret_context)
    if not ctx.has_secret_key():
        raise KeyTransferError("this context holds no secret key: give the member's secret.ctx")
    full = ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    public_numbers = {n for n, _ in _wire_fields(_public_part(ctx))}
    extra = [raw for n, raw in _wire_fields(full) if n not in public_numbers]
    if len(extra) != 1:
        raise KeyTransferError(f"expected one secret-key field in the context, found {len(extra)}")
    return extra[0]


def join_secret_key(public_context: bytes, secret_field: bytes) -> bytes:
    """``public.ctx`` plus a received secret-key field: a member's secret context. The field
    must be exactly one field that the public context does not already hold."""
    received = _wire_fields(secret_field)
    public_numbers = {n for n, _ in _wire_fields(public_context)}
    if len(received) != 1 or received[0][0] in public_numbers:
        raise KeyTransferError("the received secret key is not one secret-key field of a context")
    return public_context + secret_field


# ------------------------------------------------------------------ files


def _hex(doc: dict[str, Any], key: str, size: int | None = None) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str):
        raise KeyTransferError(f"field {key!r} is missing")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise KeyTransferError(f"field {key!r} is not hex") from None
    if size is not None and len(raw) != size:
        raise KeyTransferError(f"field {key!r} must be {size} bytes, not {len(raw)}")
    return raw


def _name(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_NAME or not value.isprintable():
        raise KeyTransferError(f"field {key!r} must be a member name of 1 to {_MAX_NAME} characters")
    return value


def _load_doc(path: Path, fmt: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_FILE + 1)
    except OSError as exc:
        raise KeyTransferError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_FILE:
        raise KeyTransferError(f"{path} is larger than {_MAX_FILE} bytes: not a {fmt} file")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise KeyTransferError(f"{path} is not JSON: not a {fmt} file") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise KeyTransferError(f"{path} is not a {fmt} file")
    return doc


@dataclass(frozen=True)
class KeyRequest:
    """A new member asks for the federation key (signed with its enrolment key)."""

    federation: bytes
    member: str
    x25519_public: bytes
    enrolment_cert: bytes  # DER
    signature: bytes

    def signed_bytes(self) -> bytes:
        return fields(REQUEST_LABEL, self.federation, self.member.encode(), self.x25519_public)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": REQUEST_FORMAT,
                "federation": self.federation.hex(),
                "member": self.member,
                "x25519_public": self.x25519_public.hex(),
                "enrolment_cert": self.enrolment_cert.hex(),
                "signature": self.signature.hex(),
            },
            indent=1,
        )

    @classmethod
    def load(cls, path: Path) -> KeyRequest:
        doc = _load_doc(path, REQUEST_FORMAT)
        return cls(
            _hex(doc, "federation", 32),
            _name(doc, "member"),
            _hex(doc, "x25519_public", 32),
            _hex(doc, "enrolment_cert"),
            _hex(doc, "signature"),
        )


@dataclass(frozen=True)
class KeyGrant:
    """A member seals the federation key to one request (and signs the ciphertext)."""

    federation: bytes
    sender: str
    recipient: str
    recipient_x25519: bytes
    sealed: bytes
    sender_cert: bytes  # DER of the sender's enrolment certificate
    signature: bytes

    def info(self) -> bytes:
        """HPKE's info, and the prefix of what the sender signs: the whole binding."""
        return fields(
            GRANT_LABEL, self.federation, self.sender.encode(), self.recipient.encode(), self.recipient_x25519
        )

    def signed_bytes(self) -> bytes:
        return fields(GRANT_LABEL, self.info(), self.sealed)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": GRANT_FORMAT,
                "federation": self.federation.hex(),
                "sender": self.sender,
                "recipient": self.recipient,
                "recipient_x25519": self.recipient_x25519.hex(),
                "sealed": self.sealed.hex(),
                "sender_cert": self.sender_cert.hex(),
                "signature": self.signature.hex(),
            },
            indent=1,
        )

    @classmethod
    def load(cls, path: Path) -> KeyGrant:
        doc = _load_doc(path, GRANT_FORMAT)
        return cls(
            _hex(doc, "federation", 32),
            _name(doc, "sender"),
            _name(doc, "recipient"),
            _hex(doc, "recipient_x25519", 32),
            _hex(doc, "sealed"),
            _hex(doc, "sender_cert"),
            _hex(doc, "signature"),
        )


# ------------------------------------------------------------------ the three steps


def _pinned(who: EnrolmentIdentity, pinned: list[str] | tuple[str, ...]) -> bool:
    fps = {p.strip().lower().replace(":", "") for p in pinned}
    return who.name in pinned or who.fingerprint.hex() in fps or who.tls_fingerprint.hex() in fps


def _signer(
    cert_der: bytes,
    claimed: str,
    role: str,
    ca_cert: x509.Certificate,
    crl: Revocations,
    members: list[str] | tuple[str, ...],
) -> EnrolmentIdentity:
    """The certified identity behind a signature, or refuse: CA, validity, revocation, the name
    it claims, and this member's own pinned membership."""
    try:
        who = enrolment_certs.verify_certificate(cert_der, ca_cert, crl)
    except (EnrolmentError, ValueError) as exc:
        raise KeyTransferError(f"the {role}'s enrolment certificate is refused: {exc}") from None
    if who.name != claimed:
        raise KeyTransferError(
            f"the {role} claims to be {claimed!r} but its enrolment certificate names {who.name!r}"
        )
    if not _pinned(who, members):
        raise KeyTransferError(
            f"the {role} {who.name!r} is not in this member's pinned membership ([masking] members); "
            "the federation key goes only between admitted members"
        )
    return who


def make_request(
    public_context: bytes,
    name: str,
    enrolment_cert: x509.Certificate,
    enrolment_key: ec.EllipticCurvePrivateKey,
) -> tuple[KeyRequest, x25519.X25519PrivateKey]:
    """Step 1: a request for the federation whose ``public.ctx`` this is, and its private key."""
    ctx = ts.context_from(public_context)
    if ctx.has_secret_key():
        raise KeyTransferError("give the federation's public.ctx, not a secret context")
    federation = bytes.fromhex(keys.fingerprint(ctx))
    private = x25519.X25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    draft = KeyRequest(federation, name, public, enrolment_cert.public_bytes(serialization.Encoding.DER), b"")
    return replace(draft, signature=enrolment_certs.sign(enrolment_key, draft.signed_bytes())), private


def check_request(
    request: KeyRequest,
    federation_fingerprint: str,
    ca_cert: x509.Certificate,
    crl: Revocations,
    members: list[str] | tuple[str, ...],
) -> EnrolmentIdentity:
    """Step 2's checks: a signed request from an admitted member, for this federation."""
    who = _signer(request.enrolment_cert, request.member, "requester", ca_cert, crl, members)
    if not enrolment_certs.verify_signature(who.public_key, request.signature, request.signed_bytes()):
        raise KeyTransferError(f"the request of {who.name!r} is not signed by its enrolment key")
    if request.federation.hex() != federation_fingerprint:
        raise KeyTransferError(
            f"{who.name!r} asks for the key of another federation (fingerprint "
            f"{request.federation.hex()[:16]}…, this member's is {federation_fingerprint[:16]}…): "
            "it was given another public.ctx"
        )
    return who


def make_grant(
    request: KeyRequest,
    secret_context: bytes,
    sender: str,
    sender_cert: x509.Certificate,
    sender_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    crl: Revocations,
    members: list[str] | tuple[str, ...],
) -> KeyGrant:
    """Step 2: check ``request``, then seal this member's secret key to it and sign."""
    federation = keys.verified_fingerprint(secret_context)
    check_request(request, federation, ca_cert, crl, members)
    draft = KeyGrant(
        request.federation,
        sender,
        request.member,
        request.x25519_public,
        b"",
        sender_cert.public_bytes(serialization.Encoding.DER),
        b"",
    )
    recipient = x25519.X25519PublicKey.from_public_bytes(request.x25519_public)
    draft = replace(
        draft, sealed=SUITE.encrypt(secret_key_field(secret_context), recipient, info=draft.info())
    )
    return replace(draft, signature=enrolment_certs.sign(sender_key, draft.signed_bytes()))


def accept_grant(
    grant: KeyGrant,
    request: KeyRequest,
    private: x25519.X25519PrivateKey,
    public_context: bytes,
    ca_cert: x509.Certificate,
    crl: Revocations,
    members: list[str] | tuple[str, ...],
) -> bytes:
    """Step 3: the secret context ``grant`` carries for ``request``, checked; raises naming the
    sender when anything it signed is wrong."""
    who = _signer(grant.sender_cert, grant.sender, "sender", ca_cert, crl, members)
    if not enrolment_certs.verify_signature(who.public_key, grant.signature, grant.signed_bytes()):
        raise KeyTransferError(
            f"the grant claiming to come from {who.name!r} is not signed by its enrolment key"
        )
    if (grant.recipient, grant.recipient_x25519, grant.federation) != (
        request.member,
        request.x25519_public,
        request.federation,
    ):
        raise KeyTransferError(
            f"the grant from {who.name!r} answers another request (for {grant.recipient!r}, key "
            f"{grant.recipient_x25519.hex()[:16]}…), not this member's"
        )
    if keys.fingerprint(ts.context_from(public_context)) != request.federation.hex():
        raise KeyTransferError("public.ctx is not the one this member's request was made for")
    try:
        secret_field = SUITE.decrypt(grant.sealed, private, info=grant.info())
    except (InvalidTag, ValueError):
        raise KeyTransferError(
            f"the key sealed by {who.name!r} does not open with this member's request key: it was "
            "sealed to another key or altered on the way"
        ) from None
    try:
        secret_context = join_secret_key(public_context, secret_field)
        keys.check_key_pair(ts.context_from(secret_context))
    except (KeyTransferError, codec.CodecError, ValueError, RuntimeError, TypeError) as exc:
        raise KeyTransferError(
            f"the secret key sent by {who.name!r} (signed by its enrolment key, serial "
            f"{who.serial:x}) is not the federation's: {exc}"
        ) from None
    return secret_context
