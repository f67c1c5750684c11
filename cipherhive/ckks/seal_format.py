"""SEAL's own serialization format, read and written where `tenseal.sealapi` has no setter.

Why: double masking (SecAgg, Bonawitz et al., CCS 2017, §4) adds pseudo-random
masks to each member's encrypted contribution, and the server removes the
self-masks from the encrypted sum. `tenseal.sealapi` can neither set a
ciphertext's coefficients nor build a plaintext from raw coefficients, but
SEAL (4.x) loads what it saves, and its format is simple:

* every object starts with a 16-byte header: magic ``0xA15E``, header size 16,
  SEAL major and minor version, compression mode (0 none, 1 zlib, 2 zstd), two
  reserved bytes and the total size (uint64, header included);
* a **ciphertext**'s payload is its parms_id (4 x uint64), NTT flag (uint8),
  size, poly_modulus_degree and coeff_modulus_size (3 x uint64), scale (double),
  correction factor (uint64), then its coefficients as a nested SEAL array
  (header, count uint64, count x uint64). A *seeded* ciphertext (symmetric
  encryption) stores only c0 there and, after it, the PRNG seed that expands to
  c1 (a nested header, the PRNG type byte, 64 seed bytes);
* a **plaintext**'s payload is its parms_id, coefficient count (uint64), scale
  (double) and the coefficients as a nested SEAL array.

Adding a mask to c0 is the same as adding it to the encoded plaintext before
encryption (c0 = -a·s + e + m), and it leaves the seed, so the upload stays
seeded. Everything is written back uncompressed: SEAL's zstd cannot shrink
uniformly random coefficients anyway, and the server then skips decompression.

`tests/test_sealformat.py` pins these layouts against the installed SEAL, so
an upgrade that changes them fails loudly instead of corrupting sums.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

MAGIC = 0xA15E
HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, reserved, size
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
_PARMS_ID = struct.Struct("<4Q")
#: parms_id, NTT flag, size, poly_modulus_degree, coeff_modulus_size, scale, correction factor.
_CT_META = struct.Struct("<4QB3QdQ")
_PT_META = struct.Struct("<4QQd")
_COUNT = struct.Struct("<Q")
#: Largest payload accepted when decompressing (a full N=8192 ciphertext is ~131 KB).
MAX_PAYLOAD = 1 << 20


class FormatError(ValueError):
    """Bytes that are not the SEAL object this module expects."""


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    compression: int
    size: int

    def pack(self, size: int, compression: int = COMPR_NONE) -> bytes:
        return HEADER.pack(MAGIC, HEADER.size, self.major, self.minor, compression, 0, size)


def read_header(data: bytes | memoryview, offset: int = 0) -> Header:
    if len(data) - offset < HEADER.size:
        raise FormatError("shorter than a SEAL header")
    magic, size_of_header, major, minor, compression, _reserved, size = HEADER.unpack_from(data, offset)
    if magic != MAGIC or size_of_header != HEADER.size:
        raise FormatError("not a SEAL object (bad magic or header size)")
    if compression not in (COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD):
        raise FormatError(f"unknown SEAL compression mode {compression}")
    return Header(major, minor, compression, size)


def payload(data: bytes) -> tuple[Header, bytes]:
    """The header and the (decompressed) payload of one serialized SEAL object."""
    header = read_header(data)
    if header.size != len(data):
        raise FormatError(f"SEAL header announces {header.size} bytes but {len(data)} arrived")
    body = data[HEADER.size :]
    try:
        if header.compression == COMPR_ZSTD:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_PAYLOAD)
        elif header.compression == COMPR_ZLIB:
            inflater = zlib.decompressobj()
            body = inflater.decompress(body, MAX_PAYLOAD)
            if inflater.unconsumed_tail:
                raise FormatError("zlib payload larger than a ciphertext")
    except (zstandard.ZstdError, zlib.error) as exc:
        raise FormatError(f"corrupt compressed SEAL payload: {exc}") from exc
    if len(body) > MAX_PAYLOAD:
        raise FormatError("SEAL payload larger than a ciphertext")
    return header, body


def _array(body: bytes, offset: int) -> tuple[np.ndarray, int]:
    """A nested uncompressed SEAL array of uint64 at ``offset``: (values, offset after it)."""
    inner = read_header(body, offset)
    if inner.compression != COMPR_NONE:
        raise FormatError("nested SEAL array is compressed")
    start = offset + HEADER.size
    if len(body) < start + _COUNT.size:
        raise FormatError("truncated SEAL array")
    (count,) = _COUNT.unpack_from(body, start)
    end = start + _COUNT.size + 8 * count
    if inner.size != end - offset or end > len(body):
        raise FormatError("SEAL array size does not match its count")
    return np.frombuffer(body, dtype="<u8", count=count, offset=start + _COUNT.size), end


@dataclass
class Ciphertext:
    """One ciphertext's parts: metadata, coefficients (c0, or c0‖c1) and, if seeded, the seed."""

    header: Header
    meta: bytes
    poly_modulus_degree: int
    coeff_modulus_size: int
    size: int
    coefficients: np.ndarray  # uint64
    seed: bytes  # the nested PRNG-info object of a seeded ciphertext; empty for a full one

    @property
    def seeded(self) -> bool:
        return bool(self.seed)

    def poly(self, index: int) -> np.ndarray:
        """Polynomial ``index`` (0 or 1), all RNS components, as stored (NTT form)."""
        n = self.poly_modulus_degree * self.coeff_modulus_size
        if index >= len(self.coefficients) // n:
            raise FormatError(f"polynomial {index} is not stored (seeded ciphertext)")
        return self.coefficients[index * n : (index + 1) * n]

    def to_bytes(self) -> bytes:
        """Serialize uncompressed (SEAL loads it like its own output)."""
        count = len(self.coefficients)
        array = (
            self.header.pack(HEADER.size + _COUNT.size + 8 * count)
            + _COUNT.pack(count)
            + self.coefficients.astype("<u8", copy=False).tobytes()
        )
        body = self.meta + array + self.seed
        return self.header.pack(HEADER.size + len(body)) + body


def read_ciphertext(data: bytes) -> Ciphertext:
    header, body = payload(data)
    if len(body) < _CT_META.size:
        raise FormatError("truncated ciphertext metadata")
    fields = _CT_META.unpack_from(body)
    size, degree, moduli = fields[5], fields[6], fields[7]
    if not (1 <= size <= 4 and degree in (1024, 2048, 4096, 8192, 16384, 32768) and 1 <= moduli <= 64):
        raise FormatError(f"implausible ciphertext shape: size {size}, N {degree}, {moduli} moduli")
    coefficients, end = _array(body, _CT_META.size)
    seed = body[end:]
    per_poly = degree * moduli
    if seed:
        if len(coefficients) != per_poly:
            raise FormatError("seeded ciphertext must store exactly c0")
        seed_header = read_header(seed)
        if seed_header.size != len(seed):
            raise FormatError("trailing bytes after the ciphertext's seed")
    elif len(coefficients) != size * per_poly:
        raise FormatError(f"ciphertext stores {len(coefficients)} coefficients, expected {size * per_poly}")
    return Ciphertext(header, body[: _CT_META.size], degree, moduli, size, coefficients, seed)


def add_to_c0(data: bytes, mask: np.ndarray, modulus: int) -> bytes:
    """``data`` (one ciphertext, one RNS component) with ``mask`` added to c0 mod ``modulus``."""
    ct = read_ciphertext(data)
    if ct.coeff_modulus_size != 1:
        raise FormatError("masking is defined for ciphertexts at a single data prime")
    c0 = ct.poly(0)
    if mask.shape != c0.shape:
        raise FormatError(f"mask has {mask.shape[0]} coefficients, c0 has {c0.shape[0]}")
    q = np.uint64(modulus)
    # Both terms are below q < 2^63, so their sum does not wrap in uint64.
    masked = c0 + mask
    masked -= q * (masked >= q)
    rest = ct.coefficients[len(c0) :]
    ct.coefficients = np.concatenate([masked, rest]) if len(rest) else masked
    return ct.to_bytes()


def plaintext_bytes(template: Header, parms_id: tuple[int, ...], scale: float, coeffs: np.ndarray) -> bytes:
    """A SEAL plaintext (NTT form, one data prime) holding ``coeffs``: what the server
    subtracts from the encrypted sum to remove the released self-masks."""
    count = len(coeffs)
    array = (
        template.pack(HEADER.size + _COUNT.size + 8 * count)
        + _COUNT.pack(count)
        + coeffs.astype("<u8", copy=False).tobytes()
    )
    body = _PT_META.pack(*parms_id, count, scale) + array
    return template.pack(HEADER.size + len(body)) + body


def read_plaintext(data: bytes) -> tuple[tuple[int, ...], float, np.ndarray]:
    """(parms_id, scale, coefficients) of a serialized plaintext."""
    _header, body = payload(data)
    if len(body) < _PT_META.size:
        raise FormatError("truncated plaintext metadata")
    *parms, count, scale = _PT_META.unpack_from(body)
    coeffs, end = _array(body, _PT_META.size)
    if end != len(body) or len(coeffs) != count:
        raise FormatError("plaintext coefficient count does not match its array")
    return tuple(parms), scale, coeffs
