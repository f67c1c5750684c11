"""A round's encrypted sum, built as ciphertexts arrive.

Memory is bounded by the model size (one ciphertext per block), not by the
number of members: each block of an upload is added as soon as it is
validated. An upload that fails half-way is subtracted again, block by
block, from its spooled bytes; addition modulo q is exact, so the sum is
restored bit for bit (all-or-nothing without holding whole updates).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from cipherhive.codec import ServerCodec


class RunningSum:
    """Not thread-safe: the round that owns it serialises access with its lock."""

    def __init__(self, codec: ServerCodec, num_ciphertexts: int) -> None:
        self._codec = codec
        self._blocks: list[Any] = [None] * num_ciphertexts
        # Uploads added into each block: subtracting the only one must reset the
        # block, since SEAL refuses to produce a transparent (all-zero) ciphertext.
        self._counts = [0] * num_ciphertexts

    def __len__(self) -> int:
        return len(self._blocks)

    def add(self, index: int, ct: Any) -> None:
        current = self._blocks[index]
        if current is None:
            self._blocks[index] = ct
        else:
            self._codec.add_inplace(current, ct)
        self._counts[index] += 1

    def subtract(self, blobs: Iterable[bytes]) -> int:
        """Remove the first ciphertexts of an upload (given as spooled bytes)."""
        count = 0
        for index, blob in enumerate(blobs):
            current = self._blocks[index]
            assert current is not None, "rollback of a block that was never added"
            self._counts[index] -= 1
            if self._counts[index] == 0:
                self._blocks[index] = None
            else:
                self._codec.sub_inplace(current, self._codec.load(blob))
            count += 1
        return count

    def blocks(self) -> Iterator[Any]:
        """The accumulated ciphertexts, in order, to change in place (unmasking)."""
        for index, block in enumerate(self._blocks):
            if block is None:
                raise RuntimeError(f"block {index} of the sum was never added")
            yield block

    def serialized(self) -> Iterator[bytes]:
        for index, block in enumerate(self._blocks):
            if block is None:
                raise RuntimeError(f"block {index} of the sum was never added")
            yield self._codec.dump(block)
