"""Member-level distributed DP (docs/spec/privacy.md §2): the mechanism, the attacks, the grid, the bridge.

Each test can fail: the residual-noise and attack tests run the real mechanism
(clipping, conditional randomized rounding, the exact discrete Gaussian sampler
on ChaCha20) and measure what an attacker is left with; the grid tests run real
CKKS; the accountant tests compare with published closed forms.
"""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy.stats import norm

from cipherhive.ckks import keys
from cipherhive.ckks.codec import VALUE_RANGE, PublicCodec, SecretCodec
from cipherhive.federation.layout import LEADING_VALUES
from cipherhive.node.config import NodeConfig
from cipherhive.node.privacy.discrete_gaussian import ExactSampler
from cipherhive.node.privacy.ledger import PrivacyLedger, ledger_path
from cipherhive.node.privacy.member_level import clip_update, noised_integers, privatize
from cipherhive.node.privacy.randomness import DPRandom
from cipherhive.node.privacy.record_level import PrivacyGuard, ScheduleRefused
from cipherhive.node.sums.checks import CheckedApplier, SumLimits, SumRejected
from cipherhive.node.training.update import UpdateError, check_update, weighted_blocks
from cipherhive.privacy.member_level import (
    MemberMechanism,
    equivalent_multiplier,
    rounded_l1_bound,
    rounded_l2_bound,
    tau,
)
from cipherhive.privacy.schedule import PrivacySchedule, ScheduleError
from cipherhive.runtime.config import ConfigError
from cipherhive.server.config import ServerConfig
from cipherhive.server.ingest.running_sum import RunningSum
from cipherhive.v1 import federation_pb2 as pb


def _member(mech: MemberMechanism, delta: np.ndarray, seed: int) -> np.ndarray:
    """One member's integers (clipped, rounded, noised), from its own insecure test key."""
    noise, rounding = DPRandom(insecure_seed=seed, label="test").next_round()
    return noised_integers(delta, mech, noise, rounding)


def _clipped_grid(mech: MemberMechanism, delta: np.ndarray) -> np.ndarray:
    return np.ldexp(clip_update(delta, mech.clip), mech.grid_bits)


def _updates(count: int, dim: int, seed: int) -> np.ndarray:
    """Updates of norm 3 (clipped to C = 1 by the mechanism)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, dim))
    return 3 * x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- noise an attacker is left with


@pytest.mark.parametrize(("k", "t"), [(5, 0), (5, 2), (4, 3)])
def test_residual_noise_after_colluders_subtract_their_own(k: int, t: int) -> None:
    """k members, t of them colluding: they subtract their own contributions (noise included) from
    the sum; what remains around the honest members' true (clipped) updates has std ≥ z·C."""
    dim, z = 3000, 1.0
    mech = MemberMechanism(z, 1.0, k, t, 10, dim)
    # Configured: the honest members' variance reaches (z·C)² exactly or above (σ² is rounded up).
    assert (k - t) * float(mech.sigma2) * mech.gamma**2 >= (z * mech.clip) ** 2
    updates = _updates(k, dim, seed=k * 10 + t)
    sent = [_member(mech, updates[i], seed=100 * k + 10 * t + i) for i in range(k)]
    total = np.sum(sent, axis=0)
    colluders = range(k - t, k)
    residual = total - sum((sent[j] for j in colluders), np.zeros(dim, dtype=np.int64))
    truth = sum(_clipped_grid(mech, updates[i]) for i in range(k - t))
    error = (residual - truth) * mech.gamma
    # 3000 values: the std estimate is within ~1.3 % (one sd) of the truth; 4 sd below z·C fails.
    assert float(np.std(error)) >= z * mech.clip * (1 - 4 / math.sqrt(2 * dim))
    assert abs(float(np.mean(error))) < 4 * z / math.sqrt(dim)


def _ratio(estimate: np.ndarray, victim: np.ndarray, mech: MemberMechanism) -> float:
    """‖x̂ - x‖² / (d·(z_eff·C)²) with z_eff the announced multiplier z: the noise the honest members
    must leave on the victim whatever the colluders do (not what the code believes it added)."""
    return float(np.sum((estimate - victim) ** 2)) / (
        mech.dimension * (mech.noise_multiplier * mech.clip) ** 2
    )


def test_zeros_attack_leaves_the_noise() -> None:
    """Every other member sends zeros (t colluders, the rest have nothing to say) and the colluders
    subtract their own noise: x̂ = sum - colluders' contributions, off by the honest noise."""
    k, t, dim = 4, 2, 1500
    mech = MemberMechanism(1.0, 1.0, k, t, 10, dim)
    victim = _updates(1, dim, seed=7)[0]
    ratios = []
    for trial in range(3):
        sent = [
            _member(mech, victim if i == 0 else np.zeros(dim), seed=1000 + 10 * trial + i) for i in range(k)
        ]
        known = sum(sent[j] for j in range(k - t, k))
        estimate = (np.sum(sent, axis=0) - known) * mech.gamma
        ratios.append(_ratio(estimate, clip_update(victim, mech.clip), mech))
    assert float(np.mean(ratios)) >= 0.9


@pytest.mark.parametrize("t", [1, 3])
def test_differencing_attack_leaves_the_noise(t: int) -> None:
    """Two rounds whose rosters differ by the victim (replaced by a member with a zero update); the
    others send the same updates; colluders subtract their own noise in both rounds."""
    k, dim = 4, 1500
    mech = MemberMechanism(1.0, 1.0, k, t, 10, dim)
    updates = _updates(k, dim, seed=11)
    ratios = []
    for trial in range(3):
        base = 2000 + 100 * trial
        with_victim = [_member(mech, updates[i], seed=base + i) for i in range(k)]
        without = [_member(mech, updates[i] if i else np.zeros(dim), seed=base + 50 + i) for i in range(k)]
        known = sum(with_victim[j] - without[j] for j in range(k - t, k))
        estimate = (np.sum(with_victim, axis=0) - np.sum(without, axis=0) - known) * mech.gamma
        ratios.append(_ratio(estimate, clip_update(updates[0], mech.clip), mech))
    assert float(np.mean(ratios)) >= 0.9


def test_sampler_matches_the_discrete_gaussian() -> None:
    """Variance within a few percent of σ² (the discrete Gaussian's is σ² minus e^-2π²σ²-small);
    P(0) against the exact normalised mass."""
    sampler = ExactSampler(DPRandom(insecure_seed=3).next_round()[0])
    sigma2 = MemberMechanism(1.0, 1.0, 2, 1, 2, 1).sigma2  # (z·C/γ)² = 16
    draws = sampler.noise(20_000, sigma2)
    s2 = float(sigma2)
    assert abs(float(np.var(draws)) / s2 - 1) < 0.04
    support = np.arange(-60, 61)
    mass = np.exp(-(support**2) / (2 * s2))
    p0 = 1 / mass.sum()
    assert abs(float(np.mean(draws == 0)) - p0) < 4 * math.sqrt(p0 / 20_000)


# --------------------------------------------------------------------------- the grid: rounding and headroom


@pytest.fixture(scope="module")
def codecs(tmp_path_factory: pytest.TempPathFactory) -> tuple[SecretCodec, PublicCodec]:
    files = keys.keygen(tmp_path_factory.mktemp("keys"))
    return SecretCodec(files.secret.read_bytes()), PublicCodec(files.public.read_bytes())


def test_ckks_sum_rounded_to_the_grid_is_the_exact_integer_sum(
    codecs: tuple[SecretCodec, PublicCodec],
) -> None:
    """k members' noised grid vectors, encrypted, summed by the server, decrypted and applied: the
    applied mean is exactly (Σ integers)·γ / k, bit for bit; the raw decryption is not."""
    secret, public = codecs
    k, dim = 5, 3000
    mech = MemberMechanism(1.0, 1.0, k, 0, 16, dim)
    global_ = np.random.default_rng(0).normal(size=dim).astype(np.float32)
    updates = _updates(k, dim, seed=5)
    per_block = secret.values_per_block
    running = RunningSum(public, -(-(dim + LEADING_VALUES) // per_block))
    ints = []
    for i in range(k):
        noise, rounding = DPRandom(insecure_seed=50 + i).next_round()
        local = privatize(global_ + updates[i].astype(np.float32), global_, mech, noise, rounding)
        check_update(local, global_, 1.0, 64)
        ints.append(np.rint(np.ldexp(local - global_, mech.grid_bits)).astype(np.int64))
        for index, block in enumerate(weighted_blocks(local, global_, 1.0, per_block)):
            running.add(index, public.load(secret.encrypt(block)))
    decrypted = [secret.decrypt(blob) for blob in running.serialized()]
    exact = np.ldexp(np.sum(ints, axis=0).astype(np.float64), -mech.grid_bits)
    raw = np.concatenate(decrypted)[LEADING_VALUES : LEADING_VALUES + dim]
    assert 0 < float(np.abs(raw - exact).max()) < 1e-6  # CKKS error: present, far below a step
    out, mean = np.empty_like(global_), np.empty(dim)
    limits = SumLimits(floor=k, max_update=10.0, max_participants=64, participants=k, grid_bits=16)
    applier = CheckedApplier(global_, out, per_block, limits, mean)
    for block in decrypted:
        applier.feed(block)
    applier.finish(len(decrypted))
    assert applier.total_weight == k
    np.testing.assert_array_equal(mean, exact / k)


def test_a_value_off_the_grid_is_rejected() -> None:
    global_ = np.zeros(8, dtype=np.float32)
    limits = SumLimits(floor=3, max_update=10.0, max_participants=64, participants=3, grid_bits=8)
    block = np.zeros(8 + LEADING_VALUES)
    block[:LEADING_VALUES] = 3.0
    block[LEADING_VALUES:] = np.ldexp(np.arange(8.0), -8) + 1e-9  # on the grid, CKKS error: fine
    CheckedApplier(global_, np.empty_like(global_), 16, limits).feed(block)
    block[LEADING_VALUES + 3] += 0.4 * 2.0**-8  # 0.4 of a step off: not a sum of grid values
    with pytest.raises(SumRejected) as err:
        CheckedApplier(global_, np.empty_like(global_), 16, limits).feed(block)
    assert err.value.reason == "off_grid"


def test_headroom_a_member_whose_noise_could_overflow_the_sum_sends_nothing() -> None:
    """Each member's values must stay within VALUE_RANGE / max_participants, so any sum of the
    federation's members stays within the range CKKS decodes exactly; noise counts."""
    dim = 200
    global_ = np.zeros(dim, dtype=np.float32)
    mech = MemberMechanism(50.0, 1.0, 2, 1, 8, dim)  # noise std 50 per value
    noise, rounding = DPRandom(insecure_seed=9).next_round()
    local = privatize(global_ + 0.01, global_, mech, noise, rounding)
    check_update(local, global_, 1.0, 64)  # 50-ish values x 64 members: within 2^18
    members = int(VALUE_RANGE // 100)  # a share of 100 per member: noise beyond 3 sd overflows
    with pytest.raises(UpdateError, match="sum exactly"):
        check_update(local, global_, 1.0, members)


def test_update_is_clipped_before_rounding() -> None:
    mech = MemberMechanism(1.0, 0.5, 3, 0, 12, 100)
    x = _clipped_grid(mech, np.full(100, 1.0))
    assert math.isclose(float(np.linalg.norm(x)), mech.clip_units)
    assert float(np.linalg.norm(np.ldexp(clip_update(np.full(100, 0.01), 0.5), 0))) == pytest.approx(0.1)


def test_schedule_bounds() -> None:
    with pytest.raises(ScheduleError, match="colluders"):
        PrivacySchedule("member", 5, 0.0, 1.0, 0, 1.0, min_members=3, colluders=3, grid_bits=16)
    with pytest.raises(ScheduleError, match="grid_bits"):
        PrivacySchedule("member", 5, 0.0, 1.0, 0, 1.0, min_members=3, colluders=0, grid_bits=30)
    s = PrivacySchedule("member", 5, 0.0, 1.0, 0, 1.0, min_members=3, colluders=1, grid_bits=16)
    assert PrivacySchedule.from_proto(s.for_layout(4810).to_proto()) == s.for_layout(4810)
    event = s.for_layout(4810).round_event()
    assert event.sample_rate == 1.0 and event.steps == 1


# --------------------------------------------------------------------------- the accountant and its bridge


def test_rounding_bound_theorem_1_by_hand() -> None:
    """Kairouz et al. 2021, Theorem 1 with c = 100, d = 100, β = e^-0.5 (√(2 ln 1/β) = 1):
    min((c + √d)², c² + d/4 + (c + √d/2)) = min(12100, 10000 + 25 + 105) = 10130."""
    assert rounded_l2_bound(100.0, 100) == pytest.approx(math.sqrt(10130))
    assert rounded_l2_bound(100.0, 100, beta=0) == pytest.approx(110.0)
    assert rounded_l1_bound(3.0, 100) == 9.0 and rounded_l1_bound(100.0, 4) == 200.0


def test_tau_by_hand() -> None:
    """τ = 10·Σ_{j<n} exp(-2π²σ²·j/(j+1)): 0 for one member; 10·e^{-π²} ≈ 5.1723e-4 for n = 2, σ² = 1."""
    assert tau(1.0, 1) == 0.0
    assert tau(1.0, 2) == pytest.approx(5.1723e-4, rel=1e-4)


def test_bridge_single_member_is_canonne_kamath_steinke() -> None:
    """One member (τ = 0): the discrete Gaussian is ½(Δ/σ)²-zCDP (Canonne, Kamath and Steinke 2020,
    Theorem 4), i.e. the Gaussian multiplier σ/Δ exactly."""
    assert equivalent_multiplier(5.0, 25.0, 100.0, 1, 1000) == pytest.approx(10.0 / 5.0)


def test_bridge_is_proposition_14_at_every_order() -> None:
    """dp-accounting's RDP of the bridged Gaussian equals α/2 times the smaller of the two terms of
    Kairouz et al. 2021, Proposition 14 that are linear in α, at every order (σ small enough
    for τ to matter)."""
    l2, sigma2, n, d = 4.0, 0.3, 3, 50
    l1 = rounded_l1_bound(l2, d)
    z = equivalent_multiplier(l2, l1, sigma2, n, d)
    t = tau(sigma2, n)
    a2, a1 = l2 / math.sqrt(n * sigma2), l1 / math.sqrt(n * sigma2)
    orders = [2.0, 8.0, 32.0]
    accountant = rdp.RdpAccountant(orders)
    accountant.compose(dp_accounting.GaussianDpEvent(z))
    for order, value in zip(orders, accountant._rdp, strict=True):
        prop14 = order / 2 * min(a2**2 + 2 * a1 * t + t**2 * d, (a2 + math.sqrt(d) * t) ** 2)
        assert value == pytest.approx(prop14, rel=1e-9)
        assert value >= order / 2 * a2**2  # never below the continuous Gaussian's


def _analytic_delta(mu: float, eps: float) -> float:
    """Balle and Wang, ICML 2018, Theorem 8 (= Dong, Roth and Su 2019, Corollary 2.13 for μ-GDP)."""
    return float(norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu))


def test_composed_gaussian_against_the_analytic_gaussian() -> None:
    """A member-level schedule's ε (RDP, sampling rate 1) is an upper bound on, and close to, the
    exact ε of the Gaussian mechanism its rounds compose to: T rounds of multiplier z are one
    Gaussian of multiplier z/√T, whose exact privacy profile is the closed form above. Pinned
    reference: μ = 1, ε = 1 gives δ = Φ(-0.5) - e·Φ(-1.5) = 0.126936."""
    assert _analytic_delta(1.0, 1.0) == pytest.approx(0.126936, abs=2e-6)
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0))
    assert accountant.get_delta(1.0) == pytest.approx(0.126936, rel=1e-3)
    schedule = PrivacySchedule("member", 20, 0.0, 3.0, 0, 1.0, min_members=100, colluders=0, grid_bits=16)
    schedule = schedule.for_layout(4810)
    z_eq = schedule.round_event().noise_multiplier
    assert 0.999 * 3.0 < z_eq < 3.0  # rounding costs a little, never gains
    eps = schedule.epsilon(1e-5)
    mu = math.sqrt(20) / z_eq
    assert _analytic_delta(mu, eps) <= 1e-5  # an upper bound on the exact ε …
    assert _analytic_delta(mu, eps / 1.25) > 1e-5  # … within 25 % of it


# --------------------------------------------------------------------------- the node's guard


def _guard(tmp_path: Path, floor: int, colluders: int) -> PrivacyGuard:
    config = NodeConfig(
        plugin="x:y",
        insecure=True,
        name="n1",
        state_dir=tmp_path / "state",
        max_epsilon=50.0,
        dataset="acme",
        ledger_dir=tmp_path / "ledgers",
        insecure_seed=1,
        min_participants=floor,
        colluders=colluders,
    )
    path = ledger_path(config.ledger_dir, "acme")
    if not path.exists():
        PrivacyLedger.init(path, "acme")
    return PrivacyGuard(config, "n1")


def _member_settings(k: int, t: int, dim: int = 50) -> pb.FederationSettings:
    schedule = PrivacySchedule("member", 3, 0.0, 1.0, 0, 1.0, min_members=k, colluders=t, grid_bits=10)
    return pb.FederationSettings(privacy=schedule.for_layout(dim).to_proto())


def test_guard_needs_its_own_floor_and_colluders_to_cover_the_honest_members(tmp_path: Path) -> None:
    # The schedule splits the noise over 4 - 0 = 4 honest members; this node's floor 4 minus its
    # pinned 1 colluder guarantees only 3: the noise could fall short, so it refuses.
    with pytest.raises(ScheduleRefused, match="guarantees only 3"):
        _guard(tmp_path, 4, 1).accept(_member_settings(4, 0), applied_round=0)
    _guard(tmp_path, 4, 1).accept(_member_settings(4, 1), applied_round=0)
    _guard(tmp_path, 5, 1).accept(_member_settings(4, 0), applied_round=0)  # 4 honest guaranteed
    with pytest.raises(ConfigError, match="colluders"):
        _guard(tmp_path, 3, 3)


def test_guard_charges_then_privatizes_once(tmp_path: Path) -> None:
    guard = _guard(tmp_path, 3, 0)
    guard.accept(_member_settings(3, 0), applied_round=0)
    global_ = np.zeros(50, dtype=np.float32)
    with pytest.raises(UpdateError, match="no member-level DP round was charged"):
        guard.privatize(global_ + 1, global_)
    assert guard.begin_round(1) is None  # the trainer trains as usual: no DP-SGD
    assert [e.event.sample_rate for e in guard.ledger.entries()] == [1.0]  # type: ignore[union-attr]
    sent = guard.privatize(global_ + 1, global_)
    steps = np.ldexp(sent - global_, 10)
    assert np.array_equal(steps, np.rint(steps)) and not np.array_equal(sent, global_ + 1)
    with pytest.raises(UpdateError):  # each charged round's noise is used once
        guard.privatize(global_ + 1, global_)


def test_server_settings_for_member_mode() -> None:
    server = ServerConfig(insecure=True, dp_mode="member", dp_rounds=5, dp_noise_multiplier=2.0)
    schedule = server.privacy_schedule()
    assert (schedule.min_members, schedule.colluders, schedule.grid_bits) == (3, 0, 16)
    assert schedule.for_layout(4810).epsilon(1e-5) > 0
    with pytest.raises(ConfigError, match="exceeds min_participants"):
        ServerConfig(insecure=True, dp_mode="member", dp_rounds=5, dp_noise_multiplier=2.0, dp_min_members=4)
    with pytest.raises(ConfigError, match="colluders"):
        ServerConfig(insecure=True, dp_mode="member", dp_rounds=5, dp_noise_multiplier=2.0, dp_colluders=3)
