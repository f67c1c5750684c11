"""Member-level DP noise on one core: the node's exact discrete Gaussian sampler against the reference.

What a node does in member mode before it encrypts
(:func:`cipherhive.node.privacy.member_level.noised_integers`: clip, randomized rounding, exact
discrete Gaussian noise, docs/spec/privacy.md §2), on an update of ``--values`` values (default
1 M), with the server's default mechanism (z = 1, C = 1, floor 3, no colluders, grid 2^-16:
σ ≈ 37,837 grid units):

* the vectorised sampler (:mod:`cipherhive.node.privacy.vector_gaussian`) alone, and the whole
  step, on the full update: µs per value and seconds, best of 3;
* the reference sampler (:mod:`cipherhive.node.privacy.discrete_gaussian`, pure Python) on
  ``--reference-values`` values only (default 20 k: the full update would take about a minute):
  its µs per value, and the seconds that rate makes for the full update.

The process is pinned to one core (numpy's element-wise operations use one thread anyway). Goal:
the whole step for 1 M values in at most 2 s.

Run with ``python -m cipherhive.bench.dp_noise [--values 1M] [--reference-values 20k] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cipherhive.bench.options import parse_count
from cipherhive.node.privacy.discrete_gaussian import ExactSampler
from cipherhive.node.privacy.member_level import noised_integers
from cipherhive.node.privacy.randomness import DPRandom
from cipherhive.node.privacy.vector_gaussian import VectorSampler
from cipherhive.privacy.member_level import MemberMechanism

#: The whole member-level step for 1 M values, on one core.
GOAL_SECONDS = 2.0
REPEATS = 3


def _best(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Fastest of ``repeats`` passes: other work on the machine only ever slows a pass down."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(values: int, reference_values: int) -> dict[str, Any]:
    mech = MemberMechanism(1.0, 1.0, 3, 0, 16, values)
    sigma2 = mech.sigma2
    rng = np.random.default_rng(0)
    delta = rng.normal(0.0, 0.05, values)
    dp = DPRandom()  # a fresh key from os.urandom, as a node has

    def vector() -> None:
        VectorSampler(dp.next_round()[0]).noise(values, sigma2)

    def whole_step() -> None:
        noise, rounding = dp.next_round()
        noised_integers(delta, mech, noise, rounding)

    vector_s = _best(vector)
    step_s = _best(whole_step)
    reference_s = _best(lambda: ExactSampler(dp.next_round()[0]).noise(reference_values, sigma2), 1)
    reference_us = 1e6 * reference_s / reference_values
    return {
        "values": values,
        "reference_values": reference_values,
        "sigma2": float(sigma2),
        "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
        "reference_us_per_value": reference_us,
        "reference_seconds_extrapolated": reference_us * values / 1e6,
        "vector_us_per_value": 1e6 * vector_s / values,
        "vector_seconds": vector_s,
        "speedup": reference_us / (1e6 * vector_s / values),
        "noised_integers_seconds": step_s,
        "goal_seconds": GOAL_SECONDS * values / 1_000_000,
    }


def render(f: dict[str, Any]) -> str:
    n, r = f["values"], f["reference_values"]
    met = "met" if f["noised_integers_seconds"] <= f["goal_seconds"] else "NOT met"
    return "\n".join(
        [
            f"member-level DP noise, {n:,} values, σ² = {f['sigma2']:.4g} grid units² "
            f"(z = 1, C = 1, floor 3, grid 2^-16), on cores {f['cores']}",
            f"reference sampler (pure Python), measured on {r:,} values: "
            f"{f['reference_us_per_value']:.1f} µs/value = {f['reference_seconds_extrapolated']:.1f} s "
            f"for {n:,} (extrapolated)",
            f"vectorised sampler, on all {n:,}: {f['vector_us_per_value']:.3f} µs/value = "
            f"{f['vector_seconds']:.3f} s ({f['speedup']:.0f}x)",
            f"the node's whole step (clip, randomized rounding, noise): {f['noised_integers_seconds']:.3f} s "
            f"(goal ≤ {f['goal_seconds']:.3g} s: {met})",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cipherhive.bench.dp_noise", description=__doc__)
    parser.add_argument("--values", type=parse_count, default=1_000_000, help="values in the update")
    parser.add_argument(
        "--reference-values", type=parse_count, default=20_000, help="values the reference sampler draws"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    figures = measure(args.values, args.reference_values)
    print(json.dumps(figures, indent=2) if args.json else render(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
