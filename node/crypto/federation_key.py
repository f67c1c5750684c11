"""A member's federation key: asking for it, granting it, accepting it, from the node's own
configuration (``cipherhive node key-request | key-grant | key-accept``).

The protocol and its checks are :mod:`cipherhive.pki.key_transfer` (docs/spec/key-transfer.md);
this module finds the files it needs where the node's configuration says: the enrolment
certificate and key, the CA and CRL, the pinned membership (``[masking] members``), the secret
context's path and the state directory, which keeps the request's private X25519 key (mode 0600)
until the grant is accepted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from cipherhive.ckks import keys
from cipherhive.node.config import NodeConfig
from cipherhive.pki import enrolment_certs, key_transfer
from cipherhive.pki.key_transfer import KeyGrant, KeyRequest, KeyTransferError
from cipherhive.runtime.errors import UserError
from cipherhive.runtime.fsutil import atomic_write

__all__ = ["SENDER_SUFFIX", "accept", "grant", "request", "sender_note"]

#: The request's private X25519 key and the request itself, in the state directory.
REQUEST_KEY = "key-request.x25519"
REQUEST_FILE = "key-request.json"
#: Beside secret.ctx: who sent the key (so that a later failed key check names the sender).
SENDER_SUFFIX = ".sender.json"


@dataclass(frozen=True)
class _Member:
    name: str
    cert: x509.Certificate
    key_path: Path
    ca: x509.Certificate
    crl: x509.CertificateRevocationList
    members: tuple[str, ...]


def _member(cfg: NodeConfig) -> _Member:
    if cfg.insecure or cfg.tls_cert is None or cfg.tls_key is None or cfg.tls_ca is None:
        raise UserError(
            "the federation key travels only between members with enrolment certificates: set [tls] "
            "tls_cert, tls_key and tls_ca (and no insecure = true)"
        )
    if not cfg.members:
        raise UserError(
            "set [masking] members: the key is granted to, and accepted from, pinned members only"
        )
    cert_path, key_path, crl_path = cfg.enrolment_files()
    try:
        cert = enrolment_certs.load_certificate(cert_path.read_bytes())
        ca = x509.load_pem_x509_certificate(cfg.tls_ca.read_bytes())
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read this member's certificates: {exc}") from None
    name = cfg.name or enrolment_certs.verify_certificate(cert, ca, crl).name
    return _Member(name, cert, key_path, ca, crl, tuple(cfg.members))


def request(cfg: NodeConfig, public_context: Path, out: Path) -> str:
    """Step 1: write a signed request to ``out``; keep its private key in the state directory."""
    me = _member(cfg)
    if cfg.secret_context.exists():
        raise UserError(f"{cfg.secret_context} already exists: this member holds a federation key")
    req, private = key_transfer.make_request(
        keys.read_public_context(public_context), me.name, me.cert, enrolment_certs.load_key(me.key_path)
    )
    keys.ensure_private_dir(cfg.state_dir)
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    atomic_write(cfg.state_dir / REQUEST_KEY, raw, mode=0o600)
    atomic_write(cfg.state_dir / REQUEST_FILE, req.to_json().encode(), mode=0o600)
    atomic_write(out, (req.to_json() + "\n").encode(), mode=0o644)
    return f"wrote {out}: {me.name!r} asks for the key of federation {req.federation.hex()[:16]}…"


def grant(cfg: NodeConfig, request_path: Path, out: Path) -> str:
    """Step 2: check a request, seal this member's key to it, sign; write the grant to ``out``."""
    me = _member(cfg)
    req = KeyRequest.load(request_path)
    secret = keys.read_secret_context(cfg.secret_context)
    sealed = key_transfer.make_grant(
        req, secret, me.name, me.cert, enrolment_certs.load_key(me.key_path), me.ca, me.crl, me.members
    )
    atomic_write(out, (sealed.to_json() + "\n").encode(), mode=0o644)
    return f"wrote {out}: the federation key, sealed to {req.member!r}'s request and signed by {me.name!r}"


def accept(cfg: NodeConfig, grant_path: Path, public_context: Path) -> str:
    """Step 3: open and check a grant; write the secret context (0600) and who sent it."""
    me = _member(cfg)
    if cfg.secret_context.exists():
        raise UserError(f"{cfg.secret_context} already exists; move it away first to accept another key")
    try:
        raw = (cfg.state_dir / REQUEST_KEY).read_bytes()
        req = KeyRequest.load(cfg.state_dir / REQUEST_FILE)
    except OSError:
        raise UserError(
            f"no key request in {cfg.state_dir}: run `cipherhive node key-request` first, on this member"
        ) from None
    if len(raw) != 32:
        raise KeyTransferError(f"{cfg.state_dir / REQUEST_KEY} is not an X25519 private key")
    private = x25519.X25519PrivateKey.from_private_bytes(raw)
    received = KeyGrant.load(grant_path)
    secret = key_transfer.accept_grant(
        received, req, private, keys.read_public_context(public_context), me.ca, me.crl, me.members
    )
    atomic_write(cfg.secret_context, secret, mode=0o600)
    note = {"sender": received.sender, "sender_cert_sha256": _cert_hash(received.sender_cert)}
    atomic_write(_note_path(cfg.secret_context), (json.dumps(note) + "\n").encode(), mode=0o600)
    for name in (REQUEST_KEY, REQUEST_FILE):
        (cfg.state_dir / name).unlink(missing_ok=True)
    return (
        f"wrote {cfg.secret_context}: the federation key from {received.sender!r}, checked against public.ctx"
    )


def _cert_hash(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _note_path(secret_context: Path) -> Path:
    return secret_context.with_name(secret_context.name + SENDER_SUFFIX)


def sender_note(secret_context: Path) -> str:
    """Who sent this secret context, for an error about it (from the note beside it); empty if
    the key did not come through a grant."""
    try:
        note = json.loads(_note_path(secret_context).read_text(encoding="utf-8"))
        return f" It was received from member {note['sender']!r} (signed key grant)."
    except (OSError, ValueError, KeyError, TypeError):
        return ""
