"""Exact discrete Gaussian noise and randomized rounding, from a ChaCha20 stream.

Floating-point samplers leak through their low-order bits (Mironov, CCS 2012);
integer noise on a grid does not, and the sum of integers survives CKKS once
the decrypted sum is rounded back to the grid. The sampler is Algorithm 3 of
Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential Privacy"
(NeurIPS 2020): a discrete Laplace proposal accepted with probability
exp(-(|Y| - σ²/t)²/(2σ²)), every Bernoulli(exp(-x)) drawn exactly with rational
arithmetic (their Algorithms 1 and 2), every random integer drawn by rejection
from the keystream (no modulo bias). It is exact for rational σ², which is why
:attr:`cipherhive.privacy.member_level.MemberMechanism.sigma2` rounds σ² up to a small rational.

Pure Python, about 30-65 µs a value (half a minute to a minute for a 1 M-value
update), so it is the reference: nodes draw their noise with the same algorithms
over numpy arrays (:mod:`cipherhive.node.privacy.vector_gaussian`, ~0.25 µs a
value, ``python -m cipherhive.bench.dp_noise``), which the tests compare with this
one, and which hands it the rare value too large for int64.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from cipherhive.node.privacy.randomness import CryptoStream

__all__ = ["ExactSampler"]

_BATCH = 512


class ExactSampler:
    """Exact integer randomness over one :class:`CryptoStream` (used for nothing else)."""

    def __init__(self, stream: CryptoStream) -> None:
        self._stream = stream
        self._words: list[int] = []

    def _word(self) -> int:
        if not self._words:
            self._words = self._stream.words(_BATCH).tolist()
        return self._words.pop()

    def randbelow(self, m: int) -> int:
        """Uniform on {0, …, m - 1} (rejection sampling on whole bits: no modulo bias)."""
        if m <= 0:
            raise ValueError("randbelow needs m >= 1")
        bits = (m - 1).bit_length()
        while True:
            value, have = 0, 0
            while have < bits:
                value = (value << 64) | self._word()
                have += 64
            value >>= have - bits
            if value < m:
                return value

    def bernoulli(self, p: Fraction) -> bool:
        return self.randbelow(p.denominator) < p.numerator

    def bernoulli_exp(self, x: Fraction) -> bool:
        """Bernoulli(exp(-x)) for rational x ≥ 0 (CKS 2020, Algorithm 1)."""
        while x > 1:
            if not self._bernoulli_exp_unit(Fraction(1)):
                return False
            x -= 1
        return self._bernoulli_exp_unit(x)

    def _bernoulli_exp_unit(self, x: Fraction) -> bool:
        k = 1
        while self.bernoulli(x / k):
            k += 1
        return k % 2 == 1

    def discrete_laplace(self, t: int) -> int:
        """P(Y = y) ∝ exp(-|y|/t) for an integer scale t ≥ 1 (CKS 2020, Algorithm 2)."""
        while True:
            u = self.randbelow(t)
            if not self.bernoulli_exp(Fraction(u, t)):
                continue
            v = 0
            while self.bernoulli_exp(Fraction(1)):
                v += 1
            y = u + t * v
            negative = self.randbelow(2) == 1
            if negative and y == 0:
                continue
            return -y if negative else y

    def discrete_gaussian(self, sigma2: Fraction) -> int:
        """P(Y = y) ∝ exp(-y²/(2σ²)) (CKS 2020, Algorithm 3)."""
        t = math.isqrt(sigma2.numerator // sigma2.denominator) + 1
        while True:
            y = self.discrete_laplace(t)
            if self.bernoulli_exp((abs(y) - sigma2 / t) ** 2 / (2 * sigma2)):
                return y

    def noise(self, count: int, sigma2: Fraction) -> np.ndarray:
        """``count`` independent discrete Gaussians as int64."""
        return np.fromiter((self.discrete_gaussian(sigma2) for _ in range(count)), np.int64, count)


def randomized_round(x: np.ndarray, bound: float, stream: CryptoStream, attempts: int = 1000) -> np.ndarray:
    """Round ``x`` (grid units) to integers at random, unbiased, until ‖result‖₂ ≤ ``bound``.

    Conditional randomized rounding (Kairouz et al. 2021, §4.1): each value goes
    up with probability equal to its fractional part; a draw above the bound
    (probability ≤ β per draw for the bound of Theorem 1) is discarded and redrawn,
    so the sensitivity bound holds with certainty.
    """
    floor = np.floor(x)
    frac = x - floor
    for _ in range(attempts):
        rounded = floor + (stream.uniform(x.shape[0]) < frac)
        if float(np.dot(rounded, rounded)) <= bound * bound:
            out: np.ndarray = rounded.astype(np.int64)
            return out
    raise RuntimeError(f"randomized rounding did not meet its norm bound in {attempts} attempts")
