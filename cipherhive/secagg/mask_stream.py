"""Pseudo-random masks modulo the data prime, from ChaCha20.

SecAgg (Bonawitz et al., CCS 2017, §4) expands each shared key and each
self-mask seed with a PRG into a mask over the whole update. Here the PRG is
ChaCha20 (RFC 8439, through ``cryptography``), one independent stream per
ciphertext block: the 32-byte key, a 12-byte nonce holding the block index
(uint64, little-endian, then four zero bytes) and the block counter from 0.
One stream for all blocks would let the zero-padded last block reveal its
part of the mask.

The keystream is read as little-endian 64-bit words; each keeps its low 60
bits and is rejected when that is not below the modulus q (rejection
sampling: every residue mod q is equally likely). Two members must derive the
same mask bit for bit, so the construction is pinned by test vectors in
`tests/test_maskstream.py`, including a forced rejection.
"""

from __future__ import annotations

import struct

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
_LOW_60 = np.uint64((1 << 60) - 1)
#: Words drawn per extra pass once a rejection left the first ``count`` words short.
_SLACK = 16


def _nonce(block: int) -> bytes:
    # cryptography's ChaCha20 takes 16 bytes: the 32-bit initial counter, then RFC 8439's 96-bit nonce.
    return struct.pack("<I", 0) + struct.pack("<QI", block, 0)


def mask(key: bytes, block: int, modulus: int, count: int) -> np.ndarray:
    """``count`` values uniform in [0, modulus), the mask of block ``block`` under ``key``."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"mask keys are {KEY_BYTES} bytes, got {len(key)}")
    if not 2 <= modulus <= 1 << 60:
        raise ValueError("the modulus must be at most 2^60")
    if not 0 <= block < 1 << 64:
        raise ValueError("block index out of range")
    stream = Cipher(algorithms.ChaCha20(key, _nonce(block)), mode=None).encryptor()
    q = np.uint64(modulus)
    words = np.frombuffer(stream.update(bytes(8 * count)), dtype="<u8") & _LOW_60
    if count == 0 or words.max() < q:
        # The common case for a 60-bit prime (a rejection has probability ~1e-13 per
        # word): no word rejected, the first ``count`` words are the mask.
        return words.astype(np.uint64, copy=False)
    out = np.empty(count, dtype=np.uint64)
    kept = words[words < q]
    out[: kept.shape[0]] = kept
    filled = kept.shape[0]
    want = _SLACK
    while filled < count:
        words = np.frombuffer(stream.update(bytes(8 * want)), dtype="<u8") & _LOW_60
        kept = words[words < q][: count - filled]
        out[filled : filled + kept.shape[0]] = kept
        filled += kept.shape[0]
        want = _SLACK
    return out
