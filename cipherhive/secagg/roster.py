"""Enrolments, the roster check and the pairwise keys of a masked round.

This follows SecAgg (Bonawitz et al., CCS 2017), §4 and §6 (the version
secure against an active server):

* **Round 0, "AdvertiseKeys"** becomes an :class:`Enrolment`: a fresh X25519
  public key, signed with the member's enrolment key (a key the federation CA
  certified for this purpose only, :mod:`cipherhive.pki.enrolment_certs`) over the round
  it is for: federation, aggregator, round number, the server's fresh nonce,
  the member's chain hash (:mod:`cipherhive.secagg.chain`), the CKKS parameters and
  the block count. A signature that binds the round is what keeps a server
  from replaying an entry from another round (§6: "each message is signed").
* **The server's list of enrolled members** is a roster, and every member
  checks it itself (:func:`verify_roster`) before it masks anything: a server
  that could add members of its choosing ("Sybils", §6) or show members
  different rosters would break the threshold the masks rely on. The checks
  are those of docs/spec/masked-round.md §2, each refusal naming what is wrong.
* **Pairwise keys** (§4, "masking with one-time pads"): for each pair the
  X25519 agreement, expanded with HKDF-SHA256 salted with the roster hash, so
  a key is bound to one roster of one round; the member whose TLS certificate
  fingerprint sorts higher adds the mask, the lower subtracts it, and the
  masks cancel in the sum.

Wire form of an enrolment (every field length-prefixed, :mod:`cipherhive.secagg.wire`)::

    "cipherhive/v1/enrol" ‖ federation(32) ‖ aggregator(1..255, UTF-8) ‖ round(u64)
      ‖ nonce(32) ‖ chain hash(32) ‖ parameters id(1..64) ‖ block count(u64)
      ‖ TLS certificate fingerprint(32) ‖ X25519 public key(32)
      ‖ enrolment certificate(DER, ≤ 4096) ‖ signature(DER, ≤ 72)

The signature covers everything before it; the encoding is canonical (no
trailing bytes, no oversized fields, low-``s`` signatures only), so the
roster can be compared and hashed as bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cipherhive.pki import enrolment_certs
from cipherhive.secagg.wire import Reader, WireError, field, fields, read_u64, u64

__all__ = [
    "ENROL_LABEL",
    "PAIRMASK_LABEL",
    "ROSTER_LABEL",
    "Enrolment",
    "Member",
    "Roster",
    "RosterError",
    "RoundBinding",
    "make_enrolment",
    "pairwise_keys",
    "roster_hash",
    "verify_roster",
]

ENROL_LABEL = b"cipherhive/v1/enrol"
ROSTER_LABEL = b"cipherhive/v1/roster"
PAIRMASK_LABEL = b"cipherhive/v1/pairmask"

HASH_BYTES = 32
MAX_AGGREGATOR = 255
MAX_PARAMS_ID = 64
MAX_CERTIFICATE = 4096
MAX_SIGNATURE = 72
#: No federation is this large; bounds the work a hostile server can ask of a node.
MAX_ROSTER = 1024


class RosterError(ValueError):
    """This node must not take part in the round; the message says why and what to check."""


@dataclass(frozen=True, slots=True)
class RoundBinding:
    """What every entry of one roster must share: the round it is for and what it will sum."""

    federation: bytes
    aggregator: str
    round: int
    nonce: bytes
    chain_hash: bytes
    params_id: bytes
    block_count: int

    def __post_init__(self) -> None:
        for name in ("federation", "nonce", "chain_hash"):
            if len(getattr(self, name)) != HASH_BYTES:
                raise ValueError(f"{name} must be {HASH_BYTES} bytes")
        if not 0 < len(self.aggregator.encode()) <= MAX_AGGREGATOR:
            raise ValueError(f"the aggregator identity must be 1 to {MAX_AGGREGATOR} bytes of UTF-8")
        if not 0 < len(self.params_id) <= MAX_PARAMS_ID:
            raise ValueError(f"the parameters id must be 1 to {MAX_PARAMS_ID} bytes")
        if not 0 <= self.round < 1 << 64 or not 0 < self.block_count < 1 << 64:
            raise ValueError("round and block count must fit in 64 bits (block count at least 1)")

    def parts(self) -> tuple[bytes, ...]:
        """The binding's fields in wire order."""
        return (
            self.federation,
            self.aggregator.encode(),
            u64(self.round),
            self.nonce,
            self.chain_hash,
            self.params_id,
            u64(self.block_count),
        )


@dataclass(frozen=True, slots=True)
class Enrolment:
    """A member's signed request to take part in one round (SecAgg §4 round 0, with §6's signature)."""

    binding: RoundBinding
    #: SHA-256 of the DER of the member's TLS certificate: orders pairs, names the member to peers.
    cert_fingerprint: bytes
    x25519_public: bytes
    #: The member's enrolment certificate, DER.
    certificate: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        """``"cipherhive/v1/enrol" ‖ every field but the signature``, length-prefixed."""
        return fields(
            ENROL_LABEL, *self.binding.parts(), self.cert_fingerprint, self.x25519_public, self.certificate
        )

    def encode(self) -> bytes:
        """The canonical wire bytes: the signed part, then the signature."""
        return self.signed_bytes() + field(self.signature)

    @classmethod
    def decode(cls, data: bytes) -> Enrolment:
        """Parse wire bytes, refusing anything but the one canonical encoding (no trailing bytes)."""
        r = Reader(data, "enrolment")
        r.expect(ENROL_LABEL)
        federation = r.take("federation fingerprint", HASH_BYTES, exact=HASH_BYTES)
        try:
            aggregator = r.take("aggregator identity", MAX_AGGREGATOR).decode()
        except UnicodeDecodeError:
            raise WireError("enrolment: the aggregator identity is not UTF-8") from None
        round_ = read_u64(r.take("round", 8), "round")
        nonce = r.take("nonce", HASH_BYTES, exact=HASH_BYTES)
        chain_hash = r.take("chain hash", HASH_BYTES, exact=HASH_BYTES)
        params_id = r.take("parameters id", MAX_PARAMS_ID)
        block_count = read_u64(r.take("block count", 8), "block count")
        cert_fp = r.take("certificate fingerprint", HASH_BYTES, exact=HASH_BYTES)
        x25519 = r.take("X25519 key", 32, exact=32)
        certificate = r.take("enrolment certificate", MAX_CERTIFICATE)
        signature = r.take("signature", MAX_SIGNATURE)
        r.finish()
        try:
            binding = RoundBinding(federation, aggregator, round_, nonce, chain_hash, params_id, block_count)
        except ValueError as exc:
            raise WireError(f"enrolment: {exc}") from None
        return cls(binding, cert_fp, x25519, certificate, signature)


def make_enrolment(
    *,
    binding: RoundBinding,
    cert_fingerprint: bytes,
    x25519_public: X25519PublicKey | bytes,
    certificate: bytes,
    key: ec.EllipticCurvePrivateKey,
) -> Enrolment:
    """Sign this member's enrolment for the round ``binding`` describes.

    ``certificate`` is the member's enrolment certificate (PEM or DER) and
    ``key`` its private key (``NAME.enrol.key``); a key that does not belong to
    the certificate is refused here rather than by every peer.
    """
    if isinstance(x25519_public, X25519PublicKey):
        x25519_public = x25519_public.public_bytes_raw()
    if len(cert_fingerprint) != HASH_BYTES or len(x25519_public) != 32:
        raise ValueError("the certificate fingerprint and the X25519 key are 32 bytes each")
    cert = enrolment_certs.load_certificate(certificate)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise enrolment_certs.EnrolmentError("the enrolment key does not belong to the enrolment certificate")
    der = cert.public_bytes(serialization.Encoding.DER)
    if len(der) > MAX_CERTIFICATE:
        raise ValueError(f"the enrolment certificate exceeds {MAX_CERTIFICATE} bytes")
    unsigned = Enrolment(binding, cert_fingerprint, x25519_public, der, b"")
    return Enrolment(
        binding,
        cert_fingerprint,
        x25519_public,
        der,
        enrolment_certs.sign(key, unsigned.signed_bytes()),
    )


@dataclass(frozen=True, slots=True)
class Member:
    """One verified roster entry."""

    name: str
    entry: Enrolment
    encoded: bytes
    #: SHA-256 of the member's enrolment certificate (certified; what pins and commits are checked by).
    enrol_fingerprint: bytes
    enrol_key: ec.EllipticCurvePublicKey

    @property
    def cert_fingerprint(self) -> bytes:
        """The member's TLS certificate fingerprint, as it enrolled."""
        return self.entry.cert_fingerprint


@dataclass(frozen=True, slots=True)
class Roster:
    """A roster this node has verified: its members ordered by TLS certificate fingerprint."""

    binding: RoundBinding
    members: tuple[Member, ...]
    #: ``roster_hash`` of the entries: salts every pairwise key, opens every commit.
    hash: bytes

    @property
    def names(self) -> tuple[str, ...]:
        """Member names in pair order."""
        return tuple(m.name for m in self.members)

    def member(self, cert_fingerprint: bytes) -> Member:
        """The member that enrolled with this TLS certificate fingerprint."""
        for m in self.members:
            if m.cert_fingerprint == cert_fingerprint:
                return m
        raise RosterError(f"no member with certificate fingerprint {cert_fingerprint.hex()} in the roster")


def roster_hash(encoded_entries: Sequence[bytes], nonce: bytes) -> bytes:
    """``H("cipherhive/v1/roster" ‖ count ‖ sorted canonical entries ‖ nonce)``
    (docs/spec/masked-round.md §2).

    Sorting makes the hash independent of the order the server sent; the
    count and the length prefixes make it injective.
    """
    digest = hashlib.sha256(field(ROSTER_LABEL) + u64(len(encoded_entries)))
    for entry in sorted(encoded_entries):
        digest.update(field(entry))
    digest.update(field(nonce))
    return digest.digest()


def _pinned(who: enrolment_certs.EnrolmentIdentity, pinned: Collection[str]) -> bool:
    """A name matches exactly (names are case-sensitive); a fingerprint in any hex spelling."""
    fps = {p.strip().lower().replace(":", "") for p in pinned}
    return who.name in pinned or who.fingerprint.hex() in fps or who.tls_fingerprint.hex() in fps


def _check_binding(name: str, got: RoundBinding, want: RoundBinding) -> None:
    """Refuse an entry made for another round, another history, or another computation."""
    if (got.round, got.nonce) != (want.round, want.nonce):
        raise RosterError(
            f"the entry of {name!r} was made for round {got.round} (nonce {got.nonce.hex()[:16]}…), "
            f"not this round {want.round} (nonce {want.nonce.hex()[:16]}…): a replayed old entry"
        )
    if got.chain_hash != want.chain_hash:
        raise RosterError(
            f"{name!r} has applied a different history of sums (chain hash {got.chain_hash.hex()[:16]}…, "
            f"this node's {want.chain_hash.hex()[:16]}…): the server showed members different sums, or "
            "one of you missed a round; catch up before taking part"
        )
    if got.federation != want.federation:
        raise RosterError(f"the entry of {name!r} is for another federation key")
    if got.aggregator != want.aggregator:
        raise RosterError(
            f"the entry of {name!r} is for aggregator {got.aggregator!r}, not {want.aggregator!r}"
        )
    if (got.params_id, got.block_count) != (want.params_id, want.block_count):
        raise RosterError(
            f"the entry of {name!r} is for other CKKS parameters or block count "
            f"({got.block_count} blocks, this round has {want.block_count})"
        )


def verify_roster(
    entries: Sequence[bytes],
    *,
    me: Enrolment | None,
    ca_cert: x509.Certificate,
    crl: enrolment_certs.Revocations,
    pinned_members: Collection[str],
    floor: int,
    expected: RoundBinding,
) -> Roster:
    """Check a roster the server sent (docs/spec/masked-round.md §2; SecAgg §6) and return it, or refuse.

    ``me`` is this node's current enrolment for the round ``expected``
    describes; ``pinned_members`` are names, or SHA-256 fingerprints (hex, any
    case, colons allowed) of members' TLS or enrolment certificates, from this
    node's own configuration. ``me`` is None when a node checks the proof of
    a round it did not take part in (catching up): the roster is then checked
    the same way, without the own-entry rules. Everything compared is certified: the name and
    both fingerprints come from the CA-signed enrolment certificate (the TLS
    fingerprint an entry carries must equal the one its certificate names),
    never from a field a member fills in alone. The node itself need not be
    listed. ``floor`` is its own minimum roster size. Raises
    :class:`RosterError` with the reason.
    """
    if floor < 2:
        raise ValueError("a roster floor below 2 would let one member's update out unmasked")
    if me is not None and me.binding != expected:
        raise RosterError("this node's own enrolment is not for the round being checked")
    if len(entries) < floor:
        raise RosterError(
            f"the roster has {len(entries)} member(s), fewer than this node's floor of {floor}: "
            "too few for the masks to hide an update"
        )
    if len(entries) > MAX_ROSTER:
        raise RosterError(f"the roster has {len(entries)} entries, more than {MAX_ROSTER}")
    decoded: list[Enrolment] = []
    for i, raw in enumerate(entries):
        try:
            decoded.append(Enrolment.decode(raw))
        except WireError as exc:
            raise RosterError(f"roster entry {i} is malformed ({exc})") from None

    mine = me.encode() if me is not None else None
    if me is not None and sum(raw == mine for raw in entries) != 1:
        if mine in entries:
            raise RosterError("this node's own entry appears more than once: a duplicate")
        if any(e.cert_fingerprint == me.cert_fingerprint or e.certificate == me.certificate for e in decoded):
            raise RosterError(
                "this node's own entry in the roster is not the enrolment it sent for this round "
                "(changed or replaced by the server)"
            )
        raise RosterError("this node is missing from the roster it was sent")

    members: list[Member] = []
    for raw, entry in zip(entries, decoded, strict=True):
        try:
            who = enrolment_certs.verify_certificate(entry.certificate, ca_cert, crl)
        except enrolment_certs.EnrolmentError as exc:
            raise RosterError(f"roster entry refused: {exc}") from None
        if not enrolment_certs.verify_signature(who.public_key, entry.signature, entry.signed_bytes()):
            raise RosterError(f"the signature on the entry of {who.name!r} does not verify")
        if entry.cert_fingerprint != who.tls_fingerprint:
            raise RosterError(
                f"the entry of {who.name!r} claims TLS certificate {entry.cert_fingerprint.hex()[:16]}…, "
                f"but its enrolment certificate names {who.tls_fingerprint.hex()[:16]}…"
            )
        if raw != mine and not _pinned(who, pinned_members):
            raise RosterError(
                f"{who.name!r} is not in this node's pinned membership; add it to the configuration "
                "only if the federation admitted it"
            )
        _check_binding(who.name, entry.binding, expected)
        members.append(Member(who.name, entry, raw, who.fingerprint, who.public_key))

    seen: set[tuple[str, object]] = set()
    for m in members:
        for what, value in (
            ("name", m.name),
            ("TLS certificate fingerprint", m.cert_fingerprint),
            ("enrolment certificate", m.enrol_fingerprint),
            ("X25519 key", m.entry.x25519_public),
        ):
            if (what, value) in seen:
                raise RosterError(f"the roster lists {m.name!r} twice (duplicate {what}): a duplicate entry")
            seen.add((what, value))
    members.sort(key=lambda m: m.cert_fingerprint)
    return Roster(expected, tuple(members), roster_hash(list(entries), expected.nonce))


def pair_info(low: Member, high: Member) -> bytes:
    """HKDF info of a pair: label ‖ lower fingerprint ‖ higher ‖ their X25519 keys, same order."""
    return fields(
        PAIRMASK_LABEL,
        low.cert_fingerprint,
        high.cert_fingerprint,
        low.entry.x25519_public,
        high.entry.x25519_public,
    )


def pairwise_keys(
    roster: Roster, my_x25519_private: X25519PrivateKey, my_cert_fingerprint: bytes
) -> list[tuple[bytes, int]]:
    """``(K_ij, sign)`` for every other member j, in pair order (SecAgg §4; docs/spec/masked-round.md §3).

    ``K_ij = HKDF-SHA256(salt = roster hash, IKM = X25519(mine, theirs), info =
    pair_info)``; sign is +1 when this node's TLS certificate fingerprint is the
    higher of the pair, -1 when it is the lower, so each pair's masks cancel.
    An all-zero agreement (a small-order public key) is refused: it would make
    a key anyone can compute.
    """
    me = roster.member(my_cert_fingerprint)
    if my_x25519_private.public_key().public_bytes_raw() != me.entry.x25519_public:
        raise RosterError("this X25519 private key is not the one this node enrolled with")
    out: list[tuple[bytes, int]] = []
    for other in roster.members:
        if other is me:
            continue
        try:
            shared = my_x25519_private.exchange(X25519PublicKey.from_public_bytes(other.entry.x25519_public))
        except ValueError:
            shared = bytes(32)
        if shared == bytes(32):
            raise RosterError(f"the X25519 key of {other.name!r} gives an all-zero shared secret")
        higher = my_cert_fingerprint > other.cert_fingerprint
        low, high = (other, me) if higher else (me, other)
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=roster.hash, info=pair_info(low, high)).derive(
            shared
        )
        out.append((key, 1 if higher else -1))
    return out
