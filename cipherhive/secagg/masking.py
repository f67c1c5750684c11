"""Double masks inside the ciphertexts (SecAgg, Bonawitz et al., CCS 2017, §4), codec side.

Every member adds to its encoded update, modulo the data prime q,

    PRG(b_i, block) + Σ_j sign_ij · PRG(K_ij, block)

where ``b_i`` is its fresh self-mask seed and ``K_ij`` the key it shares with
member j (``sign_ij`` is +1 for the higher member of the pair, -1 for the
lower, so each pairwise mask cancels in the sum). The masks go into c0 of the
*seeded* ciphertext (:func:`cipherhive.ckks.seal_format.add_to_c0`): since
c0 = -a·s + e + m, adding to c0 is adding to the plaintext m, and the seed that
expands to c1 = a is untouched, so the upload stays seeded (~8 B/value).

Three operations live here, all without changing the ciphertext format:

* :func:`combined_mask` / :func:`encrypt_masked` (node): all masks of a block in
  one pass, each term reduced as it is added;
* :func:`self_mask_sum` (server, no key): once every ``b_i`` is released,
  Σ PRG(b_i) is subtracted from Σ c0 (SecAgg §4, "unmasking";
  :meth:`cipherhive.server.ingest.running_sum.MaskedSum.remove_self_masks`), or from a
  full encrypted sum as a plaintext (:meth:`cipherhive.ckks.codec.PublicCodec.remove_self_masks`);
* :func:`seeded_zero` (node, before decrypting a sum published as full ciphertexts,
  through :meth:`cipherhive.ckks.codec.SecretCodec.check_seeds`): the sum's c1 must be exactly
  Σ expand(seed_i) over the roster's signed per-block seeds. Otherwise a hostile
  server could make the node decrypt a ciphertext of its choosing, which is a
  key-recovery attack on CKKS (Li and Micciancio, EUROCRYPT 2021).

Who derives the keys and seeds, and when ``b_i`` may be released, is the round
protocol's business; this module only turns them into (un)masked ciphertexts.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cipherhive.ckks import c0_sum, seal_format
from cipherhive.secagg import mask_stream

SEED_BYTES = mask_stream.KEY_BYTES
_PLAN_HEAD = struct.Struct("<QI")  # modulus, number of pairs
_PAIR_SIGN = struct.Struct("<b")


class MaskError(ValueError):
    """A mask plan or seed list that cannot be used (wrong sizes, signs or modulus)."""


class SeedCheckFailed(Exception):
    """The sum's second component is not Σ expand(seed) over the roster's seeds.

    Raised before anything is decrypted; its message names only the block, never a value.
    """

    def __init__(self, block_index: int, message: str) -> None:
        super().__init__(message)
        self.block_index = block_index
        self.message = message

    def __reduce__(self) -> tuple[type[SeedCheckFailed], tuple[int, str]]:
        # Raised in the crypto pool's workers: it must unpickle with both arguments.
        return (type(self), (self.block_index, self.message))


@dataclass(frozen=True)
class MaskPlan:
    """One member's masks for one upload (SecAgg §4, "double masking").

    ``self_seed`` is ``b_i``, fresh for every upload and never reused; ``pairs``
    holds ``(K_ij, sign)`` for every other roster member (sign +1 when this member
    is the higher of the pair, -1 when the lower); ``modulus`` is the data prime q,
    read from the SEAL context (:attr:`cipherhive.ckks.codec.SecretCodec.modulus`).
    """

    self_seed: bytes
    pairs: tuple[tuple[bytes, int], ...]
    modulus: int

    def __post_init__(self) -> None:
        if len(self.self_seed) != SEED_BYTES:
            raise MaskError(f"the self-mask seed must be {SEED_BYTES} bytes")
        for key, sign in self.pairs:
            if len(key) != SEED_BYTES:
                raise MaskError(f"pairwise mask keys must be {SEED_BYTES} bytes")
            if sign not in (1, -1):
                raise MaskError("a pairwise sign is +1 (higher member) or -1 (lower member)")
        if not 2 <= self.modulus < 1 << 60:
            raise MaskError("the modulus must be a data prime below 2^60")

    def __repr__(self) -> str:  # keys and seeds never end up in a log line
        return f"MaskPlan(pairs={len(self.pairs)}, modulus={self.modulus})"

    @classmethod
    def fresh(cls, pairs: Sequence[tuple[bytes, int]], modulus: int) -> MaskPlan:
        """A plan with a new random self-mask seed (one per upload, SecAgg §4)."""
        return cls(os.urandom(SEED_BYTES), tuple(pairs), modulus)

    def to_bytes(self) -> bytes:
        """Compact form handed to the crypto pool's workers once per round."""
        parts = [_PLAN_HEAD.pack(self.modulus, len(self.pairs)), self.self_seed]
        for key, sign in self.pairs:
            parts += [key, _PAIR_SIGN.pack(sign)]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskPlan:
        if len(data) < _PLAN_HEAD.size + SEED_BYTES:
            raise MaskError("truncated mask plan")
        modulus, count = _PLAN_HEAD.unpack_from(data)
        step = SEED_BYTES + _PAIR_SIGN.size
        offset = _PLAN_HEAD.size + SEED_BYTES
        if len(data) != offset + count * step:
            raise MaskError("mask plan length does not match its number of pairs")
        pairs = []
        for start in range(offset, len(data), step):
            (sign,) = _PAIR_SIGN.unpack_from(data, start + SEED_BYTES)
            pairs.append((data[start : start + SEED_BYTES], sign))
        return cls(data[_PLAN_HEAD.size : offset], tuple(pairs), modulus)


def sum_masks(terms: Sequence[tuple[bytes, int]], block_index: int, modulus: int, count: int) -> np.ndarray:
    """Σ sign · PRG(key, block) mod q over ``terms``.

    Each term is added (or subtracted) modulo q with one comparison-free reduction,
    ``min(s, s ∓ q)`` on uint64 (:func:`cipherhive.ckks.c0_sum.add_mod`): cheaper than a
    division, and every intermediate stays reduced.
    """
    q = np.uint64(modulus)
    acc = np.zeros(count, dtype=np.uint64)
    for key, sign in terms:
        term = mask_stream.mask(key, block_index, modulus, count)
        if sign < 0:
            c0_sum.sub_mod(acc, term, q)
        else:
            c0_sum.add_mod(acc, term, q)
    return acc


def combined_mask(plan: MaskPlan, block_index: int, count: int) -> np.ndarray:
    """Self-mask plus signed pairwise masks of one block: what goes into c0."""
    return sum_masks(((plan.self_seed, 1), *plan.pairs), block_index, plan.modulus, count)


def self_mask_sum(seeds: Sequence[bytes], block_index: int, modulus: int, count: int) -> np.ndarray:
    """Σ PRG(b_i, block) mod q: the self-masks the server removes once they are released."""
    for seed in seeds:
        if len(seed) != SEED_BYTES:
            raise MaskError(f"self-mask seeds are {SEED_BYTES} bytes")
    return sum_masks([(seed, 1) for seed in seeds], block_index, modulus, count)


def mask_ciphertext(data: bytes, block_index: int, plan: MaskPlan, count: int) -> bytes:
    """A seeded ciphertext (c0 of ``count`` coefficients) with the plan's masks added to c0,
    written back uncompressed; :func:`cipherhive.ckks.seal_format.add_to_c0` checks the count."""
    return seal_format.add_to_c0(data, combined_mask(plan, block_index, count), plan.modulus)


# ----------------------------------------------------------------------------- seed check


def seeded_zero(template: seal_format.Ciphertext, seed: bytes) -> bytes:
    """A seeded ciphertext with c0 = 0 and ``seed``'s trailer: SEAL expands its c1 on load.

    ``template`` gives the metadata (parms_id, NTT flag, size 2, N, scale) of the sum.
    """
    n = template.poly_modulus_degree * template.coeff_modulus_size
    zero = seal_format.Ciphertext(
        template.header,
        template.meta,
        template.poly_modulus_degree,
        template.coeff_modulus_size,
        2,
        np.zeros(n, dtype=np.uint64),
        seed,
    )
    return zero.to_bytes()


def upload_seed(data: bytes) -> bytes:
    """The PRNG seed trailer of one seeded upload: what a member signs and the server publishes."""
    ct = seal_format.read_ciphertext(data)
    if not ct.seeded:
        raise MaskError("the upload is not a seeded ciphertext")
    return ct.seed
