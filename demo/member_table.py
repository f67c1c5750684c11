"""How much noise member-level DP puts on the average, by number of members
(the table in docs/explanation/privacy.md).

`cipherhive demo --member-table` calibrates, for each federation size n, the
member-level schedule (every member in every round, floor k = n, t colluders
tolerated, 20 rounds, clip C = 1, grid 2^-16) to ε = 8 at δ = 1e-5 with the
same accountant and bridge the nodes use (:mod:`cipherhive.privacy.member_level`), and
reports the norm of the noise on the *mean* update relative to C: the sum
carries honest noise of std z·C per value, every one of the n members adds
its share, and the mean divides by n. A clipped mean update has norm at most
C, so a ratio near or above 1 means the noise is at least as large as any
signal. For the digits model the smaller federations are also drawn with the
real mechanism (clip, randomized rounding, the exact discrete Gaussian sampler),
in process, to check the computed figure. No federation, no CKKS: seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from cipherhive.node.privacy.member_level import noised_integers
from cipherhive.node.privacy.randomness import DPRandom
from cipherhive.privacy.schedule import PrivacySchedule

#: (name, federated values): the digits MLP 64-64-10, and a LoRA-sized adapter set.
MODELS = (("digits MLP 64-64-10", 4810), ("LoRA-sized", 1_000_000))
MEMBERS = (10, 30, 100, 300, 1000, 3000, 10_000)
#: Federations the digits row is also drawn for with the real mechanism (n x 4,810 exact samples).
SAMPLED = (10, 30)
EPSILON, DELTA, ROUNDS, CLIP, GRID_BITS = 8.0, 1e-5, 20, 1.0, 16


def schedule(z: float, members: int, colluders: int, dim: int) -> PrivacySchedule:
    return PrivacySchedule(
        "member",
        ROUNDS,
        0.0,
        z,
        0,
        CLIP,
        min_members=members,
        colluders=colluders,
        grid_bits=GRID_BITS,
        dimension=dim,
    )


def calibrate(members: int, colluders: int, dim: int) -> PrivacySchedule:
    """The smallest noise multiplier (to 0.1 %) whose schedule costs at most ε = 8."""
    lo, hi = 0.1, 100.0
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if schedule(mid, members, colluders, dim).epsilon(DELTA) <= EPSILON:
            hi = mid
        else:
            lo = mid
    return schedule(hi, members, colluders, dim)


def computed_ratio(s: PrivacySchedule, members: int) -> float:
    """‖noise on the mean‖ / C: √(d · n · σ²) · γ / n (rounding adds ≤ γ²/4 per value: negligible)."""
    mech = s.mechanism()
    return math.sqrt(s.dimension * members * float(mech.sigma2)) * mech.gamma / members / CLIP


def sampled_ratio(s: PrivacySchedule, members: int, seed: int = 0) -> float:
    """The same, measured: ``members`` real members with zero updates (noise only, from fixed
    INSECURE seeds), summed, divided by n."""
    mech = s.mechanism()
    total = np.zeros(s.dimension, dtype=np.int64)
    for i in range(members):
        noise, rounding = DPRandom(insecure_seed=seed, label=f"member-{i}").next_round()
        total += noised_integers(np.zeros(s.dimension), mech, noise, rounding)
    return float(np.linalg.norm(total)) * mech.gamma / members / CLIP


def run_member_table(args: argparse.Namespace) -> int:
    import logging

    logging.getLogger("cipherhive.node.privacy").setLevel(logging.ERROR)  # the insecure-seed warning
    t0 = time.perf_counter()
    rows = []
    for n in MEMBERS:
        row: dict[str, object] = {"members": n}
        for name, dim in MODELS:
            for label, t in (("t=0", 0), ("t=n/2", n // 2)):
                s = calibrate(n, t, dim)
                row[f"{name} {label} z"] = round(s.noise_multiplier, 3)
                row[f"{name} {label}"] = round(computed_ratio(s, n), 4)
                if dim == MODELS[0][1] and t == 0 and n in SAMPLED:
                    row[f"{name} {label} sampled"] = round(sampled_ratio(s, n), 4)
        rows.append(row)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"epsilon": EPSILON, "delta": DELTA, "rounds": ROUNDS, "rows": rows}, indent=2))
        return 0
    digits, lora = (m[0] for m in MODELS)
    print(
        "| members n | z (every column) | digits (4,810 values), t = 0 | digits, t = n/2 | "
        "LoRA-sized (1 M values), t = 0 | LoRA-sized, t = n/2 |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        sampled = row.get(f"{digits} t=0 sampled")
        cell = f"{row[f'{digits} t=0']:.3g}" + (f" (sampled {sampled:.3g})" if sampled is not None else "")
        print(
            f"| {row['members']:,} | {row[f'{digits} t=0 z']:.4g} | {cell} | {row[f'{digits} t=n/2']:.3g} | "
            f"{row[f'{lora} t=0']:.3g} | {row[f'{lora} t=n/2']:.3g} |"
        )
    print(
        f"\nnorm of the noise on the mean update / C, at ε = {EPSILON:g}, δ = {DELTA:g}, {ROUNDS} rounds, "
        f"every member in every round ({seconds:.0f} s)"
    )
    return 0
