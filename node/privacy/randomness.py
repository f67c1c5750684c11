"""Randomness for DP-SGD from a cryptographic stream (ChaCha20), never from a seeded PRNG.

DP-SGD's guarantee assumes the noise and the Poisson sample are unpredictable
to whoever sees the model. ``torch.normal`` and ``torch.rand`` draw from a
Mersenne Twister, whose state can be recovered from its outputs; Opacus'
``secure_mode`` fixes that with ``torchcsprng``, which does not install with
current PyTorch, and seeding a PRNG from ``os.urandom`` still leaves a PRNG.
So every random bit DP-SGD uses here comes from ChaCha20 (RFC 8439, through
``cryptography``) under a 256-bit key drawn from ``os.urandom``:

* uniforms: each 64-bit keystream word keeps its top 53 bits, times 2^-53;
* Gaussians: Box-Muller (Box and Muller 1958) on pairs of uniforms, in
  float64, then Opacus' secure-mode construction on top (the sum of four
  draws halved, after Holohan et al. 2021, "Are we there yet? …", §5.1, which
  defeats the floating-point attacks on single Gaussian draws).

Streams for different jobs (noise, sampling) and rounds use different nonces
under the same key, so they are independent, and none is used twice. A fixed seed
(:meth:`CryptoStream.insecure`) exists only for tests and reproducible tables:
anyone who knows it can subtract the noise, and it says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["CryptoStream", "DPRandom"]

log = logging.getLogger("cipherhive.node.privacy")

KEY_BYTES = 32
#: A ChaCha20 stream's 32-bit block counter covers 256 GiB; stop far before it could wrap.
_MAX_BYTES = 1 << 36
_NOISE, _SAMPLING = 1, 2

INSECURE_WARNING = (
    "INSECURE: differential-privacy noise and sampling come from the FIXED seed {seed}; anyone who "
    "knows it can remove the noise. Use it only for tests and reproducible tables, never with real data"
)


class CryptoStream:
    """One ChaCha20 keystream, read as uniform or Gaussian float64 values."""

    def __init__(self, key: bytes, purpose: int, index: int) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"stream keys are {KEY_BYTES} bytes")
        # cryptography's ChaCha20 nonce: 32-bit initial block counter, then RFC 8439's 96 bits.
        nonce = struct.pack("<I", 0) + struct.pack("<IQ", purpose, index)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._used = 0

    def words(self, count: int) -> np.ndarray:
        """``count`` uniformly random 64-bit words."""
        self._used += 8 * count
        if self._used > _MAX_BYTES:
            raise RuntimeError("this random stream is exhausted; start a new one")
        return np.frombuffer(self._stream.update(bytes(8 * count)), dtype="<u8")

    def uniform(self, count: int) -> np.ndarray:
        """``count`` values uniform on [0, 1), multiples of 2^-53."""
        return (self.words(count) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def normal(self, count: int) -> np.ndarray:
        """``count`` standard normal values (Box-Muller)."""
        pairs = (count + 1) // 2
        u1 = 1.0 - self.uniform(pairs)  # in (0, 1]: the logarithm is finite
        u2 = self.uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = (2.0 * math.pi) * u2
        out = np.empty(2 * pairs, dtype=np.float64)
        out[0::2] = radius * np.cos(angle)
        out[1::2] = radius * np.sin(angle)
        return out[:count]

    def secure_normal(self, count: int, std: float) -> np.ndarray:
        """Gaussian noise of standard deviation ``std``, built as Opacus' secure mode builds it:
        four independent draws summed and halved."""
        total = self.normal(count)
        for _ in range(3):
            total += self.normal(count)
        return total * (std / 2.0)


class DPRandom:
    """The randomness one node's DP-SGD uses: a key, and a fresh stream per (job, round)."""

    def __init__(self, key: bytes | None = None, insecure_seed: int | None = None, label: str = "") -> None:
        """A fresh key from ``os.urandom``; or, for tests only, one derived from ``insecure_seed`` and
        ``label`` (the node's name, so that members sharing a seed still draw different noise)."""
        self.insecure_seed = insecure_seed
        if insecure_seed is not None:
            log.warning(INSECURE_WARNING.format(seed=insecure_seed))
            text = f"cipherhive insecure DP seed\0{insecure_seed}\0{label}"
            key = hashlib.sha256(text.encode()).digest()
        self._key = os.urandom(KEY_BYTES) if key is None else key
        self._rounds = 0

    @property
    def insecure(self) -> bool:
        return self.insecure_seed is not None

    def next_round(self) -> tuple[CryptoStream, CryptoStream]:
        """Fresh (noise, sampling) streams for one round of training; never the same twice."""
        self._rounds += 1
        return CryptoStream(self._key, _NOISE, self._rounds), CryptoStream(self._key, _SAMPLING, self._rounds)
