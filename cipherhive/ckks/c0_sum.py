"""A masked round's sum as c0 alone: the server adds first components, nodes rebuild c1.

Why: in a masked round every member's upload is a *seeded* ciphertext, c0 plus
the PRNG seed that expands to its c1, and every node already needs all of the
roster's seeds to check the sum before decrypting it (Li and Micciancio,
EUROCRYPT 2021: a node must never decrypt a c1 the server chose). So the
server need not expand seeds, nor add or send c1 at all:

* **server**: parse each upload with this module (no SEAL, no seed expansion),
  check it is exactly a seeded ciphertext of this federation's parameters with
  every coefficient below q, and add c0 modulo q with numpy (addition mod q is
  SEAL's own ``add``, coefficient by coefficient, on NTT-form polynomials);
* **published sum**: Σ c0 (self-masks removed), :data:`RECORD_BYTES` per block,
  8 bytes per value instead of the full ciphertext's 16;
* **node** (:meth:`cipherhive.ckks.codec.SecretCodec.decrypt_c0_sum`): loads Σ c0 with
  the first member's seed and adds the other members' seeded zeros, so SEAL
  itself expands c1 = Σ expand(seed_i) from the seeds the members signed. The
  server chooses nothing in c1, by construction.

The server's checks mirror what SEAL's ``Ciphertext::load`` checks for such a
ciphertext (header, parameters, sizes, coefficients reduced modulo q, a seed of
a PRNG SEAL knows), so an upload the server adds is one every node can load.
"""

from __future__ import annotations

import struct

import numpy as np

from cipherhive.ckks import seal_format

#: The federation's parameters fix these (cipherhive.ckks.codec): N and one data prime.
DEGREE = 8192
#: One published block: Σ c0 as little-endian uint64.
RECORD_BYTES = DEGREE * 8
#: parms_id, NTT flag, size, N, coeff_modulus_size, scale, correction factor (SEAL 4).
_META = struct.Struct("<4QB3QdQ")
_COUNT = struct.Struct("<Q")
#: SEAL's UniformRandomGeneratorInfo: its header, the PRNG type, a 512-bit seed.
SEED_TRAILER_BYTES = seal_format.HEADER.size + 1 + 64
#: prng_type values SEAL 4 can expand (blake2xb, shake256).
KNOWN_PRNGS = (1, 2)
_ARRAY_BYTES = seal_format.HEADER.size + _COUNT.size + RECORD_BYTES
UPLOAD_BYTES = seal_format.HEADER.size + _META.size + _ARRAY_BYTES + SEED_TRAILER_BYTES


class UploadError(ValueError):
    """A block that is not a seeded ciphertext this federation's nodes could load."""


def expected_meta(parms_id: tuple[int, ...], scale: float) -> bytes:
    """The exact metadata of a fresh seeded ciphertext at the data prime, in NTT form."""
    return _META.pack(*parms_id, 1, 2, DEGREE, 1, scale, 1)


class UploadParser:
    """Checks and splits one uploaded block into (c0, seed trailer) without SEAL."""

    def __init__(self, parms_id: tuple[int, ...], scale: float, modulus: int) -> None:
        self._meta = expected_meta(parms_id, scale)
        self.parms_id, self.scale, self.modulus = parms_id, scale, modulus

    def parse(self, data: bytes | memoryview) -> tuple[np.ndarray, bytes]:
        """``(c0, seed trailer)`` of one masked upload block, or :class:`UploadError`."""
        view = memoryview(data)
        if len(view) != UPLOAD_BYTES:
            raise UploadError(
                f"a masked upload block is {UPLOAD_BYTES} bytes (an uncompressed seeded ciphertext), "
                f"this one is {len(view)}"
            )
        try:
            header = seal_format.read_header(view)
        except seal_format.FormatError as exc:
            raise UploadError(str(exc)) from exc
        if header.size != UPLOAD_BYTES or header.compression != seal_format.COMPR_NONE:
            raise UploadError("a masked upload block must be an uncompressed SEAL object of its own length")
        at = seal_format.HEADER.size
        if view[at : at + _META.size] != self._meta:
            raise UploadError(
                "the block's parameters (parms_id, NTT form, size, N, scale) are not this federation's"
            )
        at += _META.size
        try:
            inner = seal_format.read_header(view, at)
        except seal_format.FormatError as exc:
            raise UploadError(f"c0: {exc}") from exc
        (count,) = _COUNT.unpack_from(view, at + seal_format.HEADER.size)
        if inner.size != _ARRAY_BYTES or inner.compression != seal_format.COMPR_NONE or count != DEGREE:
            raise UploadError(f"c0 must be an uncompressed array of {DEGREE} coefficients")
        at += seal_format.HEADER.size + _COUNT.size
        c0 = np.frombuffer(view, dtype="<u8", count=DEGREE, offset=at)
        if int(c0.max()) >= self.modulus:
            raise UploadError("c0 holds a coefficient that is not reduced modulo the data prime")
        trailer = bytes(view[at + RECORD_BYTES :])
        check_seed_trailer(trailer)
        return c0, trailer


def check_seed_trailer(trailer: bytes) -> None:
    try:
        seed_header = seal_format.read_header(trailer)
    except seal_format.FormatError as exc:
        raise UploadError(f"seed: {exc}") from exc
    if (
        len(trailer) != SEED_TRAILER_BYTES
        or seed_header.size != SEED_TRAILER_BYTES
        or seed_header.compression != seal_format.COMPR_NONE
        or trailer[seal_format.HEADER.size] not in KNOWN_PRNGS
    ):
        raise UploadError("the block's seed is not a PRNG seed SEAL can expand")


def add_mod(acc: np.ndarray, term: np.ndarray, modulus: np.uint64) -> None:
    """``acc += term`` modulo q, both reduced (q < 2^61, so the sum does not wrap).

    ``min(s, s - q)`` is the reduction: below q, ``s - q`` wraps to a huge uint64.
    """
    acc += term
    np.minimum(acc, acc - modulus, out=acc)


def sub_mod(acc: np.ndarray, term: np.ndarray, modulus: np.uint64) -> None:
    """``acc -= term`` modulo q, both reduced: the exact inverse of :func:`add_mod`.

    Below ``term`` the difference wraps, and adding q wraps it back into [0, q).
    """
    acc -= term
    np.minimum(acc, acc + modulus, out=acc)


def seed_trailer_of(record: bytes) -> bytes:
    """The seed trailer at the end of a spooled upload block (validated when it was added)."""
    return record[-SEED_TRAILER_BYTES:]
