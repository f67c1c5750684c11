"""Signed commits: a member's word on what it uploaded, before any self-mask is released.

SecAgg (Bonawitz et al., CCS 2017, §6, round 3 "ConsistencyCheck") has every
surviving member sign the set of members the server claims survived, and no
member reveals anything until it holds those signatures from enough peers.
cipherhive's round has no dropouts (a round that loses a member fails), so
the check is stronger: after its upload is acknowledged each member signs

    "cipherhive/v1/commit" ‖ roster hash ‖ TLS certificate fingerprint
      ‖ H(its per-block seeds) ‖ H(its uploaded blocks) ‖ H(its self-mask seed)

with its enrolment key, and releases its self-mask seed only once it holds a
valid commit from **every** roster member (docs/spec/masked-round.md §6). The signer's
certificate fingerprint is inside the signed bytes so that a forwarded commit
says whose it is; the roster hash ties it to one roster of one round.
"H(its uploaded blocks)" is over the ciphertexts exactly as uploaded (c0 and
the seed that expands to c1), each block hashed on its own and the list of
those hashes hashed (:func:`uploaded_digest`), so the server can check it
against what it spooled while its ingest processes hash the blocks in parallel;
"H(its self-mask seed)" (:func:`self_mask_digest`, a hiding commitment: the
seed is 32 random bytes) lets the server refuse a wrong seed at release
rather than publish a sum no member can use.

Wire form: the fields above, length-prefixed (:mod:`cipherhive.secagg.wire`), then
the signature (DER, low-``s``, ≤ 72 bytes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from cryptography.hazmat.primitives.asymmetric import ec

from cipherhive.ckks.c0_sum import seed_trailer_of
from cipherhive.pki import enrolment_certs
from cipherhive.secagg.roster import HASH_BYTES, MAX_SIGNATURE, Roster, RosterError
from cipherhive.secagg.wire import Reader, WireError, field, fields, u64

__all__ = [
    "C0_LABEL",
    "COMMIT_LABEL",
    "SEEDS_LABEL",
    "BlocksDigest",
    "Commit",
    "block_digest",
    "blocks_digest",
    "make_commit",
    "require_all_commits",
    "self_mask_digest",
    "uploaded_digest",
    "verify_commit",
]

COMMIT_LABEL = b"cipherhive/v1/commit"
SEEDS_LABEL = b"cipherhive/v1/seeds"
C0_LABEL = b"cipherhive/v1/c0"
SELF_MASK_LABEL = b"cipherhive/v1/selfmask"


def self_mask_digest(seed: bytes) -> bytes:
    """``H("cipherhive/v1/selfmask" ‖ b_i)``: the commitment to a self-mask seed."""
    return hashlib.sha256(fields(SELF_MASK_LABEL, seed)).digest()


class BlocksDigest:
    """:func:`blocks_digest` block by block, as an upload arrives (the server hashes at ingest)."""

    def __init__(self, label: bytes) -> None:
        self._hash = hashlib.sha256(field(label))
        self.count = 0

    def update(self, block: bytes) -> None:
        self._hash.update(field(block))
        self.count += 1

    def digest(self) -> bytes:
        final = self._hash.copy()
        final.update(field(u64(self.count)))
        return final.digest()


def block_digest(block: bytes | memoryview) -> bytes:
    """``H(block)`` of one uploaded block: the c0 hash is :func:`uploaded_digest` over these.

    Hashing each block on its own lets the server hash an upload in the processes that
    check and add its blocks (cipherhive.server.ingest.workers), in any order.
    """
    return hashlib.sha256(block).digest()


def uploaded_digest(block_digests: Iterable[bytes]) -> bytes:
    """``H(C0_LABEL ‖ H(block_0) ‖ … ‖ n)``: what "H(its uploaded blocks)" in a commit is."""
    return blocks_digest(C0_LABEL, block_digests)


def blocks_digest(label: bytes, blocks: Iterable[bytes]) -> bytes:
    """``H(label ‖ block_0 ‖ … ‖ n)``: use :data:`SEEDS_LABEL` for seeds, :data:`C0_LABEL` for c0 blocks."""
    digest = BlocksDigest(label)
    for block in blocks:
        digest.update(block)
    return digest.digest()


@dataclass
class UploadDigests:
    """H(per-block seeds) and H(blocks as uploaded) of one upload, as a commit states them
    (docs/spec/masked-round.md §5): the one computation the member that commits and the server
    that checks the commit both run, block by block as the blocks are written or arrive.

    The seeds are hashed here, in order; each block's own hash is set by whoever hashed the
    block (the member, or the server's ingest worker that owns it), in any order.
    """

    seeds: BlocksDigest = dataclass_field(default_factory=lambda: BlocksDigest(SEEDS_LABEL))
    blocks: dict[int, bytes] = dataclass_field(default_factory=dict)

    def update(self, blob: bytes) -> None:
        """The next block's seed (a well-formed seeded upload block ends with its seed)."""
        self.seeds.update(seed_trailer_of(blob))

    def add(self, index: int, blob: bytes) -> None:
        """Block ``index`` in full: its seed (blocks in order) and its own hash."""
        self.update(blob)
        self.blocks[index] = block_digest(blob)

    def final(self, count: int) -> tuple[bytes, bytes] | None:
        """(seeds hash, blocks hash) once all ``count`` blocks are in; None before."""
        if self.seeds.count != count or len(self.blocks) != count:
            return None
        return self.seeds.digest(), uploaded_digest(self.blocks[i] for i in range(count))


def upload_digests(blobs: Iterable[bytes]) -> tuple[bytes, bytes]:
    """(H(per-block seeds), H(uploaded blocks)) of a whole upload, as its commit states them."""
    digests = UploadDigests()
    for index, blob in enumerate(blobs):
        digests.add(index, blob)
    final = digests.final(len(digests.blocks))
    assert final is not None
    return final


@dataclass(frozen=True, slots=True)
class Commit:
    """One member's signed commit for one roster."""

    roster_hash: bytes
    cert_fingerprint: bytes
    seeds_hash: bytes
    c0_hash: bytes
    self_mask_hash: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        """The canonical bytes the enrolment key signs."""
        return fields(
            COMMIT_LABEL,
            self.roster_hash,
            self.cert_fingerprint,
            self.seeds_hash,
            self.c0_hash,
            self.self_mask_hash,
        )

    def encode(self) -> bytes:
        """Wire bytes: the signed part, then the signature."""
        return self.signed_bytes() + field(self.signature)

    @classmethod
    def decode(cls, data: bytes) -> Commit:
        """Parse wire bytes; refuses trailing bytes and wrong sizes."""
        r = Reader(data, "commit")
        r.expect(COMMIT_LABEL)
        parts = [
            r.take(name, HASH_BYTES, exact=HASH_BYTES)
            for name in ("roster hash", "certificate fingerprint", "seeds hash", "c0 hash", "self-mask hash")
        ]
        signature = r.take("signature", MAX_SIGNATURE)
        r.finish()
        return cls(parts[0], parts[1], parts[2], parts[3], parts[4], signature)


def make_commit(
    *,
    roster: Roster,
    cert_fingerprint: bytes,
    seeds_hash: bytes,
    c0_hash: bytes,
    self_mask_hash: bytes,
    key: ec.EllipticCurvePrivateKey,
) -> Commit:
    """Sign this member's commit for ``roster`` (after the server acknowledged its upload)."""
    if {len(seeds_hash), len(c0_hash), len(self_mask_hash)} != {HASH_BYTES}:
        raise ValueError("the seeds, blocks and self-mask hashes are SHA-256 digests (32 bytes)")
    roster.member(cert_fingerprint)  # only a member commits
    unsigned = Commit(roster.hash, cert_fingerprint, seeds_hash, c0_hash, self_mask_hash, b"")
    return Commit(
        roster.hash,
        cert_fingerprint,
        seeds_hash,
        c0_hash,
        self_mask_hash,
        enrolment_certs.sign(key, unsigned.signed_bytes()),
    )


def verify_commit(data: bytes, roster: Roster) -> Commit:
    """Decode a forwarded commit and check it: this roster, a member's, signed by its enrolment key."""
    try:
        commit = Commit.decode(data)
    except WireError as exc:
        raise RosterError(f"malformed commit ({exc})") from None
    if commit.roster_hash != roster.hash:
        raise RosterError("a commit for another roster: the server showed members different rosters")
    member = roster.member(commit.cert_fingerprint)
    if not enrolment_certs.verify_signature(member.enrol_key, commit.signature, commit.signed_bytes()):
        raise RosterError(f"the commit of {member.name!r} is not signed by its enrolment key")
    return commit


def require_all_commits(roster: Roster, commits: Iterable[bytes]) -> dict[bytes, Commit]:
    """Every member's valid commit, keyed by TLS fingerprint, or a refusal naming who is missing.

    A node may release its self-mask seed only when this returns (docs/spec/masked-round.md §6).
    """
    got: dict[bytes, Commit] = {}
    for data in commits:
        commit = verify_commit(data, roster)
        previous = got.setdefault(commit.cert_fingerprint, commit)
        if previous != commit and previous.signed_bytes() != commit.signed_bytes():
            name = roster.member(commit.cert_fingerprint).name
            raise RosterError(f"{name!r} signed two different commits for one roster")
    missing = [m.name for m in roster.members if m.cert_fingerprint not in got]
    if missing:
        raise RosterError(f"no valid commit yet from {', '.join(missing)}; the self-mask stays on")
    return got
