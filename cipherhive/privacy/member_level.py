"""Member-level distributed DP: the mechanism's public parameters and what one round costs.

The mechanism (Kairouz, Liu and Steinke, ICML 2021, "The Distributed Discrete
Gaussian Mechanism for Federated Learning with Secure Aggregation", DDGauss):
every member clips its whole update to L2 norm ``C``, scales it by 1/γ
(γ = 2^-grid_bits), rounds it to integers at random (conditionally, so the
rounded norm is at most the inflated bound of their Theorem 1) and adds
discrete Gaussian noise of variance σ² = (z·C/γ)² / (k - t) per value, with
``k`` the roster floor and ``t`` the colluders tolerated: colluders can
subtract their own noise, so only the ``k - t`` honest members' noise counts,
and it sums to variance (z·C/γ)² at least.

Neighbouring relation: *zero-out one member* (its update replaced by zeros;
participation is public, so the member still sends its noise). The
sensitivity is the rounded update's norm, at most Δ₂ (inflated from C/γ).

Accounting. The sum of n discrete Gaussians is not a discrete Gaussian;
Kairouz et al.'s Proposition 14 bounds its Rényi divergence at order α by
``min(α/2·l2² + τd, α/2·(l2² + 2·l1·τ + τ²·d), α/2·(l2 + √d·τ)²)`` with
``l2 = Δ₂/(√n·σ)``, ``l1 = Δ₁/(√n·σ)`` and ``τ = 10·Σ_{j=1}^{n-1} exp(-2π²σ²·j/(j+1))``.
The last two terms are linear in α, i.e. ρ-zCDP, which is *exactly* the RDP
curve of a continuous Gaussian mechanism with multiplier 1/√(2ρ) (Mironov
2017, Prop. 7). That is the one bridge here (:func:`equivalent_multiplier`);
dp-accounting then composes a ``GaussianDpEvent`` of that multiplier once per
round, sampling rate 1 (participation is public, not Poisson). Only the RDP
accountant may be used: a zCDP bound does not imply the Gaussian's exact
privacy profile that the PLD accountant would assume. For n = 1 (τ = 0) the
bridge gives σ/Δ₂, the discrete Gaussian's own bound (Canonne, Kamath and
Steinke, NeurIPS 2020, Theorem 4: ½(Δ/σ)²-zCDP). CKKS decryption error is
never counted as noise: nodes round every decrypted sum back to the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "BETA",
    "MAX_GRID_BITS",
    "MemberMechanism",
    "equivalent_multiplier",
    "rounded_l1_bound",
    "rounded_l2_bound",
    "tau",
]

#: Conditional randomized rounding retries until the norm is within the bound it holds with
#: probability 1 - β; Kairouz et al. use β = e^-0.5 (so √(2 ln 1/β) = 1).
BETA = math.exp(-0.5)
#: The finest grid: γ = 2^-20 ≈ 9.5e-7 keeps half a grid step ~500x above CKKS's error (~1e-9).
MAX_GRID_BITS = 20
#: σ² is rounded *up* to a multiple of this, so the exact sampler works on small rationals.
_VARIANCE_DENOMINATOR = 1024


def rounded_l2_bound(clip: float, dim: int, beta: float = BETA) -> float:
    """Kairouz et al. 2021, Theorem 1: the L2 norm a vector of norm ``clip`` (grid units) can have
    after conditional randomized rounding to integers in ``dim`` dimensions."""
    loose = (clip + math.sqrt(dim)) ** 2
    if beta <= 0:
        return math.sqrt(loose)
    tight = clip**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (clip + math.sqrt(dim) / 2)
    return math.sqrt(min(loose, tight))


def rounded_l1_bound(l2: float, dim: int) -> float:
    """An integer vector has ‖x‖₁ ≤ √d·‖x‖₂ and ‖x‖₁ ≤ ‖x‖₂² (every non-zero |xᵢ| ≥ 1)."""
    return min(math.sqrt(dim) * l2, l2 * l2)


def tau(sigma2: float, members: int) -> float:
    """τ of Kairouz et al. 2021 (Theorem 1): how far a sum of ``members`` discrete Gaussians of
    variance ``sigma2`` (grid units) is from one discrete Gaussian; 0 for a single member."""
    return 10 * sum(math.exp(-2 * math.pi**2 * sigma2 * j / (j + 1)) for j in range(1, members))


def equivalent_multiplier(l2: float, l1: float, sigma2: float, members: int, dim: int) -> float:
    """The bridge: a continuous-Gaussian noise multiplier whose RDP curve bounds the distributed
    discrete Gaussian's (Kairouz et al. 2021, Proposition 14, its two terms linear in α)."""
    t = tau(sigma2, members)
    scale = math.sqrt(members * sigma2)
    a2, a1 = l2 / scale, l1 / scale
    rho2 = min(a2**2 + 2 * a1 * t + t**2 * dim, (a2 + math.sqrt(dim) * t) ** 2)
    return 1 / math.sqrt(rho2)


@dataclass(frozen=True)
class MemberMechanism:
    """One round of member-level DDGauss as a member runs it (all public parameters)."""

    noise_multiplier: float
    clip: float
    min_members: int
    colluders: int
    grid_bits: int
    dimension: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.clip > 0):
            raise ValueError("noise_multiplier and the clipping norm must be positive")
        if self.min_members < 2:
            raise ValueError(f"min_members must be at least 2, got {self.min_members}")
        if not 0 <= self.colluders <= self.min_members - 1:
            raise ValueError(
                f"colluders must be in [0, min_members - 1] = [0, {self.min_members - 1}] (the masking "
                f"bound: floor - 1 colluders can isolate a member), got {self.colluders}"
            )
        if not 1 <= self.grid_bits <= MAX_GRID_BITS:
            raise ValueError(f"grid_bits must be in [1, {MAX_GRID_BITS}], got {self.grid_bits}")
        if self.dimension < 1:
            raise ValueError("the mechanism needs the number of federated values (dimension >= 1)")

    @property
    def gamma(self) -> float:
        """The grid step 2^-grid_bits (a power of two: grid values are exact in float64)."""
        return math.ldexp(1.0, -self.grid_bits)

    @property
    def honest(self) -> int:
        """Members whose noise counts: the floor minus the colluders."""
        return self.min_members - self.colluders

    @property
    def clip_units(self) -> float:
        """C in grid units (C/γ)."""
        return math.ldexp(self.clip, self.grid_bits)

    @property
    def sigma2(self) -> Fraction:
        """Each member's noise variance in grid units, (z·C/γ)²/(k - t), rounded up to a small
        rational the exact sampler uses as is."""
        exact = (self.noise_multiplier * self.clip_units) ** 2 / self.honest
        return Fraction(math.ceil(exact * _VARIANCE_DENOMINATOR), _VARIANCE_DENOMINATOR)

    @property
    def l2_bound(self) -> float:
        """Δ₂: the rounded update's largest norm (grid units), the zero-out sensitivity."""
        return rounded_l2_bound(self.clip_units, self.dimension)

    def multiplier(self) -> float:
        """The guaranteed Gaussian multiplier one round is accounted with (the bridge)."""
        l2 = self.l2_bound
        return equivalent_multiplier(
            l2, rounded_l1_bound(l2, self.dimension), float(self.sigma2), self.honest, self.dimension
        )
