"""Privacy accounting for DP-SGD: ε from the mechanism's public parameters, with dp-accounting.

A member that trains with DP-SGD (Abadi et al., CCS 2016) runs, at every local
step, the *sampled Gaussian mechanism*: a Poisson sample of its records (each
kept with probability ``sample_rate``), per-record gradients clipped to
``max_grad_norm``, Gaussian noise of standard deviation
``noise_multiplier · max_grad_norm`` added to their sum. One round is that step
repeated ``steps`` times; a member's lifetime is every round it trained in,
composed (the global model a round produces is post-processing of what was
released, so it costs nothing more).

ε is computed with Google's dp-accounting: the Rényi-DP accountant (Mironov,
CSF 2017; Mironov, Talwar and Zhang 2019 for the sampled Gaussian mechanism) is
what a node reports and enforces, the privacy-loss-distribution accountant
(Meiser and Mohammadi 2018; Koskela et al. 2020) is tighter and serves as a
cross-check. Only parameters enter: never a record count, so an ε computed from
a federation's public schedule can be shown anywhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["DPEvent", "epsilon", "noise_multiplier_for"]

#: dp-accounting warns about orders it cannot evaluate and drops them (the bound stays valid).
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass(frozen=True)
class DPEvent:
    """``steps`` runs of the Poisson-sampled Gaussian mechanism (one round of DP-SGD on one member)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise multiplier must be a positive number, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a whole number >= 0, got {self.steps}")


def _dp_event(events: Iterable[DPEvent]) -> object:
    import dp_accounting

    parts = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
            ),
            e.steps,
        )
        for e in events
        if e.steps > 0
    ]
    return dp_accounting.ComposedDpEvent(parts)


def epsilon(events: Sequence[DPEvent], delta: float, method: str = "rdp") -> float:
    """ε at ``delta`` of all ``events`` composed (0 for none); ``method`` is "rdp" or "pld"."""
    from dp_accounting import pld, rdp

    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not any(e.steps for e in events):
        return 0.0
    accountant: rdp.RdpAccountant | pld.PLDAccountant
    if method == "rdp":
        accountant = rdp.RdpAccountant()
    elif method == "pld":
        accountant = pld.PLDAccountant()
    else:
        raise ValueError(f"unknown accountant {method!r} (rdp or pld)")
    accountant.compose(_dp_event(events))
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose RDP ε over ``steps`` steps is at most ``target_epsilon``."""
    import dp_accounting
    from dp_accounting import rdp

    found = dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant,
        lambda z: _dp_event([DPEvent(float(z), sample_rate, steps)]),
        target_epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(0.3, 1.0),
        tol=1e-4,
    )
    # The bisection returns a value within tol of the boundary on the safe side.
    return float(found)
