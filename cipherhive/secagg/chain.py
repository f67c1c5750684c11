"""The chain hash: a digest of every sum a node has applied, bound into its enrolments.

SecAgg (Bonawitz et al., CCS 2017, §6) adds a consistency check so that a
malicious server cannot show different members different views of one round.
cipherhive extends that across rounds: each member enrols with a chain hash
over the sums it applied, and a roster only holds entries with the same
chain hash (:func:`cipherhive.secagg.roster.verify_roster`). Members that were
shown different sums in some round (a "split view") therefore can never
share a roster again, and a server that forks the federation ends up with
rosters too small to pass the members' floors.

Definition (every field length-prefixed, :mod:`cipherhive.secagg.wire`)::

    chain_0 = SHA-256("cipherhive/v1/chain"      ‖ federation fingerprint ‖ layout hash)
    chain_r = SHA-256("cipherhive/v1/chain/step" ‖ chain_{r'} ‖ sum digest of round r)
    sum digest = SHA-256("cipherhive/v1/sum" ‖ block_0 ‖ … ‖ block_{n-1} ‖ n)

where ``r'`` is the round the node applied before ``r``, the federation
fingerprint and layout hash are the 32 bytes of their hex forms
(:func:`cipherhive.ckks.keys.fingerprint`, :attr:`cipherhive.federation.layout.Layout.hash`),
and the blocks are the serialized ciphertexts of the published sum, in block
order, exactly as the node received and checked them. Rounds a node did not
apply (refused, withdrawn) do not enter its chain. Distinct labels keep a
genesis value from ever equalling a step.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from cipherhive.runtime.fsutil import atomic_write
from cipherhive.secagg.wire import field, fields, u64

__all__ = ["CHAIN_LABEL", "CHAIN_STEP_LABEL", "SUM_LABEL", "ChainHash", "SumDigest", "sum_digest"]

CHAIN_LABEL = b"cipherhive/v1/chain"
CHAIN_STEP_LABEL = b"cipherhive/v1/chain/step"
SUM_LABEL = b"cipherhive/v1/sum"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _digest_bytes(value: bytes | str, what: str) -> bytes:
    raw = bytes.fromhex(value) if isinstance(value, str) else value
    if len(raw) != 32:
        raise ValueError(f"{what} must be a SHA-256 digest (32 bytes or 64 hex digits)")
    return raw


class SumDigest:
    """:func:`sum_digest` one block at a time, as a sum is downloaded."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256(field(SUM_LABEL))
        self._count = 0

    def update(self, block: bytes) -> None:
        self._digest.update(field(block))
        self._count += 1

    def digest(self) -> bytes:
        final = self._digest.copy()
        final.update(field(u64(self._count)))
        return final.digest()


def sum_digest(blocks: Iterable[bytes]) -> bytes:
    """Digest of a published sum's serialized ciphertext blocks (streams: one block at a time)."""
    digest = SumDigest()
    for block in blocks:
        digest.update(block)
    return digest.digest()


class ChainHash:
    """A node's chain hash; :meth:`apply` after each sum it applies, persist with :meth:`hex`."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = _digest_bytes(value, "a chain hash")

    @classmethod
    def genesis(cls, federation_fingerprint: bytes | str, layout_hash: bytes | str) -> ChainHash:
        """``chain_0`` of a federation key and a model layout (before any sum is applied)."""
        return cls(
            hashlib.sha256(
                fields(
                    CHAIN_LABEL,
                    _digest_bytes(federation_fingerprint, "the federation fingerprint"),
                    _digest_bytes(layout_hash, "the layout hash"),
                )
            ).digest()
        )

    def apply(self, digest_of_sum: bytes) -> bytes:
        """Fold in the :func:`sum_digest` of a sum this node has just applied; returns the new value."""
        step = fields(CHAIN_STEP_LABEL, self._value, _digest_bytes(digest_of_sum, "a sum digest"))
        self._value = hashlib.sha256(step).digest()
        return self._value

    @property
    def value(self) -> bytes:
        """The current 32-byte chain hash (what an enrolment carries)."""
        return self._value

    def hex(self) -> str:
        """The persisted form: 64 lowercase hex digits."""
        return self._value.hex()

    @classmethod
    def from_hex(cls, text: str) -> ChainHash:
        """Parse :meth:`hex`; anything else is refused, never guessed."""
        text = text.strip()
        if not _HEX64.fullmatch(text):
            raise ValueError("a chain hash is 64 lowercase hex digits")
        return cls(bytes.fromhex(text))

    def save(self, path: Path) -> None:
        """Write the hex form atomically (0600), next to the checkpoint it describes."""
        atomic_write(path, (self.hex() + "\n").encode(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> ChainHash:
        """Read :meth:`save`'s file; a missing or damaged file raises (no silent restart at chain_0)."""
        try:
            return cls.from_hex(path.read_text(encoding="ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{path} does not hold a chain hash ({exc}); restore it from a backup") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChainHash) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"ChainHash({self.hex()})"
