"""What a masked round keeps in memory about its members and uploads (SecAgg, Bonawitz et al., CCS 2017, §4).

Plain data, apart from ``masked``'s phase logic: the open round (``context.OpenRound``)
holds a :class:`MaskState` and each of its uploads an :class:`UploadDigests`, so these
live below both ``context`` and ``masked`` and neither has to import the other's types.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from cipherhive.ckks.c0_sum import seed_trailer_of
from cipherhive.secagg.commit import (
    SEEDS_LABEL,
    BlocksDigest,
    Commit,
    block_digest,
    uploaded_digest,
)


@dataclass
class Entry:
    """A verified roster entry as the server keeps it."""

    node: str
    encoded: bytes
    cert_fingerprint: bytes
    enrol_key: ec.EllipticCurvePublicKey


@dataclass
class MaskState:
    """The open masked round's members, in memory (mirrors the ``members`` table)."""

    nonce: bytes
    phase: str
    enrolled: dict[str, Entry] = field(default_factory=dict)
    roster: dict[str, Entry] = field(default_factory=dict)
    roster_hash: bytes = b""
    commits: dict[str, Commit] = field(default_factory=dict)
    seeds: dict[str, bytes] = field(default_factory=dict)

    def ordered(self) -> list[Entry]:
        """Roster members in pair order (TLS certificate fingerprint), as members order them."""
        return sorted(self.roster.values(), key=lambda e: e.cert_fingerprint)

    def missing(self, done: Collection[str]) -> list[str]:
        return sorted(n for n in self.roster if n not in done)


@dataclass
class UploadDigests:
    """H(per-block seeds) and H(blocks as uploaded), as the blocks arrive (cipherhive.secagg.commit).

    The seeds are hashed here, in order; each block's own hash comes from whoever
    checked it (this process, or the ingest worker that owns the block).
    """

    seeds: BlocksDigest = field(default_factory=lambda: BlocksDigest(SEEDS_LABEL))
    blocks: dict[int, bytes] = field(default_factory=dict)

    def update(self, blob: bytes) -> None:
        self.seeds.update(seed_trailer_of(blob))

    def final(self, count: int) -> tuple[bytes, bytes] | None:
        if self.seeds.count != count or len(self.blocks) != count:
            return None
        return self.seeds.digest(), uploaded_digest(self.blocks[i] for i in range(count))


def upload_digests(blobs: Iterator[bytes]) -> tuple[bytes, bytes]:
    """(H(per-block seeds), H(uploaded blocks)) of one spooled upload, as a member commits them."""
    digests = UploadDigests()
    for index, blob in enumerate(blobs):
        digests.update(blob)
        digests.blocks[index] = block_digest(blob)
    final = digests.final(len(digests.blocks))
    assert final is not None
    return final
