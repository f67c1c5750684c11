"""What a masked round keeps in memory about its members and uploads (SecAgg, Bonawitz et al., CCS 2017, §4).

Plain data, apart from ``masked``'s phase logic: the open round (``context.OpenRound``)
holds a :class:`MaskState` and each of its uploads an ``UploadDigests`` (the commit's own), so these
live below both ``context`` and ``masked`` and neither has to import the other's types.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from cipherhive.secagg.commit import Commit, UploadDigests

__all__ = ["Entry", "MaskState", "UploadDigests"]


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
    #: Members that withdrew (signed) while the round was enrolling: not waited for.
    withdrawn: set[str] = field(default_factory=set)
    #: The roster was re-formed (at most once, docs/spec/masked-round.md §2.1); the hash it replaced.
    reformed: bool = False
    superseded: set[bytes] = field(default_factory=set)
    #: When the release phase began here (its step deadline counts from it; a restart resets it).
    release_started: float = 0.0

    def ordered(self) -> list[Entry]:
        """Roster members in pair order (TLS certificate fingerprint), as members order them."""
        return sorted(self.roster.values(), key=lambda e: e.cert_fingerprint)

    def missing(self, done: Collection[str]) -> list[str]:
        return sorted(n for n in self.roster if n not in done)
