"""A member's side of member-level distributed DP: clip, round to the grid, add integer noise.

What a node encrypts in ``member`` mode (see :mod:`cipherhive.privacy.member_level` for the
mechanism and its accounting) is ``γ·(round(clip(Δ)/γ) + noise)``: integers on
the grid γ = 2^-grid_bits, carried in model units so that the existing range
checks apply. Every such value is exact in float64; CKKS adds an error of
~1e-9, which :func:`cipherhive.node.sums.checks.CheckedApplier` removes by rounding
the decrypted sum back to the grid before anything uses it, so the sum every
member applies is exactly the sum of the members' integers, and CKKS error is
never counted as noise. The weight is 1 (uniform FedAvg over the public number
of contributors).
"""

from __future__ import annotations

import math

import numpy as np

from cipherhive.node.privacy.discrete_gaussian import randomized_round
from cipherhive.node.privacy.randomness import CryptoStream
from cipherhive.node.privacy.vector_gaussian import VectorSampler
from cipherhive.node.training.update import UpdateError
from cipherhive.privacy.member_level import MemberMechanism

__all__ = ["clip_update", "noised_integers", "privatize"]


def clip_update(delta: np.ndarray, clip: float) -> np.ndarray:
    """Δ scaled down to L2 norm ``clip`` if it is longer (float64)."""
    norm = float(np.linalg.norm(delta))
    if not math.isfinite(norm):
        raise UpdateError("update contains NaN or infinite values; training diverged, nothing was sent")
    return delta * (clip / norm) if norm > clip else delta.astype(np.float64, copy=True)


def noised_integers(
    delta: np.ndarray, mech: MemberMechanism, noise: CryptoStream, rounding: CryptoStream
) -> np.ndarray:
    """The member's integer vector: conditional randomized rounding of clip(Δ)/γ plus exact
    discrete Gaussian noise (:class:`VectorSampler`)."""
    if delta.shape[0] != mech.dimension:
        raise UpdateError(
            f"the update has {delta.shape[0]} values but the federation's DP schedule covers "
            f"{mech.dimension}; nothing was sent"
        )
    scaled = np.ldexp(clip_update(delta, mech.clip), mech.grid_bits)
    rounded = randomized_round(scaled, mech.l2_bound, rounding)
    out: np.ndarray = rounded + VectorSampler(noise).noise(mech.dimension, mech.sigma2)
    return out


def privatize(
    local: np.ndarray,
    global_: np.ndarray,
    mech: MemberMechanism,
    noise: CryptoStream,
    rounding: CryptoStream,
) -> np.ndarray:
    """A float64 'local model' whose difference from ``global_`` is γ·(noised integers).

    :func:`cipherhive.node.training.update.weighted_blocks` subtracts ``global_`` again; that
    float64 round trip moves a value by ~1e-16 relative, far below half a grid step,
    and the rounding of the sum removes it.
    """
    delta = local.astype(np.float64) - global_
    values = np.ldexp(noised_integers(delta, mech, noise, rounding).astype(np.float64), -mech.grid_bits)
    return global_.astype(np.float64) + values
