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

import numpy as np

from cipherhive.ckks import c0_sum
from cipherhive.ckks.c0_sum import UploadParser
from cipherhive.ckks.codec import ServerCodec
from cipherhive.secagg import masking


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

    def load(self, data: bytes) -> Any:
        """Parse and validate one uploaded block (SEAL's own checks)."""
        return self._codec.load(data)

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

    def serialized(self) -> Iterator[bytes]:
        for index, block in enumerate(self._blocks):
            if block is None:
                raise RuntimeError(f"block {index} of the sum was never added")
            yield self._codec.dump(block)


class MaskedSum:
    """A masked round's running Σ c0 (see :mod:`cipherhive.ckks.c0_sum`): one uint64 row per block.

    Same contract as :class:`RunningSum`, without SEAL: :meth:`load` parses and checks
    a block, :meth:`add` adds its c0 modulo q, :meth:`subtract` takes spooled blocks
    off again (rollback), :meth:`remove_self_masks` unmasks, :meth:`serialized` gives
    the published records. ``buffer`` lets the rows live in shared memory.
    """

    def __init__(
        self, parser: UploadParser, num_ciphertexts: int, buffer: Any = None, *, zero: bool = True
    ) -> None:
        self._parser = parser
        self._q = np.uint64(parser.modulus)
        shape = (num_ciphertexts, c0_sum.DEGREE)
        if buffer is None:
            self._rows = np.zeros(shape, dtype="<u8")
        else:
            self._rows = np.ndarray(shape, dtype="<u8", buffer=buffer)
            if zero:
                self._rows.fill(0)

    def __len__(self) -> int:
        return len(self._rows)

    def load(self, data: bytes) -> np.ndarray:
        c0, _seed = self._parser.parse(data)
        return c0

    def add(self, index: int, c0: np.ndarray) -> None:
        c0_sum.add_mod(self._rows[index], c0, self._q)

    def subtract_one(self, index: int, c0: np.ndarray) -> None:
        c0_sum.sub_mod(self._rows[index], c0, self._q)

    def subtract(self, blobs: Iterable[bytes]) -> int:
        count = 0
        for index, blob in enumerate(blobs):
            self.subtract_one(index, self.load(blob))
            count += 1
        return count

    def remove_self_masks(self, seeds: list[bytes]) -> None:
        """Subtract Σ PRG(b_i, block) mod q from every row: SecAgg §4's unmasking, no key needed."""
        for index, row in enumerate(self._rows):
            masks = masking.self_mask_sum(seeds, index, self._parser.modulus, c0_sum.DEGREE)
            c0_sum.sub_mod(row, masks, self._q)

    def serialized(self) -> Iterator[bytes]:
        for row in self._rows:
            yield row.tobytes()
