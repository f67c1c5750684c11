"""The node's vectorised discrete Gaussian sampler against the exact pmf and the reference sampler.

Canonne, Kamath and Steinke (NeurIPS 2020), Algorithms 1-3, run over numpy arrays
(:mod:`cipherhive.node.privacy.vector_gaussian`) must draw the same law as the pure-Python
reference (:class:`~cipherhive.node.privacy.discrete_gaussian.ExactSampler`). Every check here is
a chi-square or binomial test on fixed keys, so it is deterministic; each also shows it can fail
(the same draws against a σ² 5-10 % off are rejected).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from cipherhive.node.privacy.discrete_gaussian import ExactSampler
from cipherhive.node.privacy.randomness import CryptoStream
from cipherhive.node.privacy.vector_gaussian import VectorSampler, plan_for
from cipherhive.privacy.member_level import MemberMechanism

#: An integer σ², a non-integer rational one (denominator 1024, as MemberMechanism rounds to), and
#: the server's default mechanism's (z = 1, C = 1, floor 3, grid 2^-16: σ ≈ 37,837).
SIGMA2 = [Fraction(16), Fraction(2561, 1024), MemberMechanism(1.0, 1.0, 3, 0, 16, 1).sigma2]
DRAWS = 200_000
REFERENCE_DRAWS = 20_000


def _stream(seed: int, index: int = 1) -> CryptoStream:
    return CryptoStream(seed.to_bytes(32, "little"), 1, index)


def _bins(sigma2: Fraction, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges at the exact pmf's quantiles (bin i holds (edges[i-1], edges[i]]), and each bin's
    exact probability; the pmf is normalised over ±14σ (the rest weighs < e^-98)."""
    s2 = float(sigma2)
    half = int(14 * math.sqrt(s2)) + 20
    support = np.arange(-half, half + 1)
    pmf = np.exp(-(support.astype(np.float64) ** 2) / (2 * s2))
    cdf = np.cumsum(pmf / pmf.sum())
    cuts = np.unique(np.searchsorted(cdf, np.linspace(0, 1, bins + 1)[1:-1]))
    return support[cuts], np.diff(np.concatenate([[0.0], cdf[cuts], [1.0]]))


def _counts(draws: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, draws), minlength=edges.size + 1)


def _p_against_pmf(draws: np.ndarray, sigma2: Fraction) -> float:
    edges, probabilities = _bins(sigma2)
    expected = probabilities * draws.size
    assert expected.min() >= 20  # the chi-square approximation holds
    return float(stats.chisquare(_counts(draws, edges), expected).pvalue)


def _p_two_samples(a: np.ndarray, b: np.ndarray, sigma2: Fraction) -> float:
    edges, _ = _bins(sigma2)
    return float(stats.chi2_contingency(np.vstack([_counts(a, edges), _counts(b, edges)])).pvalue)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sigma2", SIGMA2, ids=str)
def test_matches_the_exact_pmf_and_the_reference_sampler(sigma2: Fraction) -> None:
    draws = VectorSampler(_stream(1)).noise(DRAWS, sigma2)
    assert _p_against_pmf(draws, sigma2) > 1e-3
    # It can fail: the same draws against σ² 5 % too large or too small.
    assert _p_against_pmf(draws, sigma2 * Fraction(21, 20)) < 1e-9
    assert _p_against_pmf(draws, sigma2 * Fraction(19, 20)) < 1e-9
    reference = ExactSampler(_stream(2)).noise(REFERENCE_DRAWS, sigma2)
    assert _p_two_samples(draws, reference, sigma2) > 1e-3
    wrong = VectorSampler(_stream(3)).noise(DRAWS, sigma2 * Fraction(11, 10))
    assert _p_two_samples(wrong, reference, sigma2) < 1e-4


@pytest.mark.timeout(60)
def test_variance_and_mass_at_zero_of_the_mechanism() -> None:
    """As the reference's test in test_dp_member.py: variance within a few percent of σ² (here
    σ² = 16, the discrete Gaussian's own is σ² minus an e^-2π²σ²-small term), P(0) against the
    exact normalised mass."""
    sigma2 = MemberMechanism(1.0, 1.0, 2, 1, 2, 1).sigma2
    assert sigma2 == 16
    draws = VectorSampler(_stream(4)).noise(DRAWS, sigma2)
    assert abs(float(np.var(draws)) / 16 - 1) < 0.02
    assert abs(float(np.mean(draws))) < 4 * 4 / math.sqrt(DRAWS)
    mass = np.exp(-(np.arange(-60, 61) ** 2) / 32)
    p0 = 1 / mass.sum()
    assert abs(float(np.mean(draws == 0)) - p0) < 4 * math.sqrt(p0 / DRAWS)


@pytest.mark.timeout(60)
def test_the_python_integer_path_draws_the_same_law() -> None:
    """A candidate beyond the int64 bounds (V > vmax, ||Y| - μ| > emax) is finished with Python
    integers on the same stream. With bounds this low, about 30 % of the candidates take that path
    and the draws still fit the pmf (and do not fit a σ² 5 % off)."""
    sigma2 = Fraction(16)
    plan = plan_for(sigma2)
    assert plan is not None and plan.mu == 4
    low = dataclasses.replace(plan, vmax=1, emax=3)
    draws = VectorSampler(_stream(5)).sample(40_000, low)
    assert _p_against_pmf(draws, sigma2) > 1e-3
    assert _p_against_pmf(draws, sigma2 * Fraction(21, 20)) < 1e-4


@pytest.mark.timeout(30)
def test_a_sigma2_too_large_for_int64_goes_to_the_reference_sampler_whole() -> None:
    sigma2 = Fraction(2**70 + 1, 3)
    assert plan_for(sigma2) is None
    assert plan_for(Fraction(2**53, 1024)) is not None  # σ ≈ 3e6 grid units: still vectorised
    got = VectorSampler(_stream(6)).noise(50, sigma2)
    assert np.array_equal(got, ExactSampler(_stream(6)).noise(50, sigma2))
    with pytest.raises(ValueError, match="σ²"):
        VectorSampler(_stream(6)).noise(5, Fraction(0))


@pytest.mark.timeout(30)
def test_deterministic_for_a_fixed_key_and_fresh_for_another_stream() -> None:
    sigma2 = SIGMA2[2]
    first = VectorSampler(_stream(7)).noise(100_003, sigma2)
    assert np.array_equal(first, VectorSampler(_stream(7)).noise(100_003, sigma2))
    assert not np.array_equal(first, VectorSampler(_stream(7, index=2)).noise(100_003, sigma2))
    assert first.dtype == np.int64 and first.shape == (100_003,)
    assert VectorSampler(_stream(7)).noise(0, sigma2).shape == (0,)
    # Two calls on one sampler go on along the stream: fresh values, no word used twice.
    sampler = VectorSampler(_stream(8))
    assert not np.array_equal(sampler.noise(1000, sigma2), sampler.noise(1000, sigma2))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("m", [2, 3, 7, 200, 257, 70_001, 2**40 + 3])
def test_uniform_integers_by_rejection(m: int) -> None:
    """No modulo bias: counts in 16 bins of (almost) equal width fit the uniform law; for small m,
    every value's count does."""
    draws = VectorSampler(_stream(9))._below(m, 200_000)
    assert draws.min() >= 0 and draws.max() < m
    if m <= 257:
        counts = np.bincount(draws, minlength=m)
        expected = np.full(m, draws.size / m)
    else:
        counts = np.bincount(draws * 16 // m, minlength=16)
        widths = np.diff([-(-i * m // 16) for i in range(17)])
        expected = widths / m * draws.size
    assert float(stats.chisquare(counts, expected).pvalue) > 1e-3


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("num", "den"),
    [(0, 1), (1, 3), (1, 1), (5, 2), (7, 1), (2**59, 3 * 2**59)],  # the last: den·k past int64
    ids=["0", "1/3", "1", "5/2", "7", "1/3 huge"],
)
def test_bernoulli_exp_frequency(num: int, den: int) -> None:
    """Algorithm 1 over arrays: the share of successes is exp(-num/den) within 5 standard errors,
    including the integer part (⌊γ⌋ Bernoulli(exp(-1))) and den·k beyond int64 (then
    Bernoulli(x/k) is drawn as Bernoulli(x) and Bernoulli(1/k))."""
    n = 200_000
    hits = VectorSampler(_stream(10))._bernoulli_exp(np.full(n, num, dtype=np.int64), den)
    p = math.exp(-num / den)
    assert abs(float(hits.mean()) - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12
