"""The digits demo with and without record-level DP, over several seeds
(the table in docs/explanation/privacy.md).

`cipherhive demo --dp-table` runs, for every seed, the same members as
`cipherhive demo` (same data split, model, trainer, DP-SGD helper, ledger
accounting and uniform FedAvg weights under DP) but aggregates in plaintext
inside one process: encryption changes the average by about 1e-9 (the demo
measures it every round), far below what moves an accuracy, and the in-process
run needs none of the processes, TLS and CKKS work, so twenty federations fit
in a few minutes of one core. Noise and sampling come from fixed seeds
(INSECURE, like every reproducible table).

ε counts every release: each member's every DP-SGD step in every round
(RDP accountant, δ = 1e-5). Nothing else leaves a member: weights are uniform
and metrics stay local.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from cipherhive.demo.options import DP_ROUNDS, ROUNDS
from cipherhive.node.privacy.randomness import DPRandom
from cipherhive.node.privacy.round_info import DPRound
from cipherhive.node.trainer import RoundInfo
from cipherhive.privacy.accountant import noise_multiplier_for
from cipherhive.privacy.schedule import PrivacySchedule

#: The digits federation's public DP schedule: every record joins a batch with probability 0.07
#: (about 32 of a 450-record member's records), 18 steps a round for 20 rounds (about 14 epochs of
#: such a member in all). Under DP, frequent averaging matters more than long local training with
#: the demo's label skew (measured at ε = 8 over three seeds: 20 x 18 steps 0.91, 10 x 35 0.88,
#: 5 x 70 0.84).
SAMPLE_RATE = 0.07
STEPS_PER_ROUND = 18
MAX_GRAD_NORM = 1.0
DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)


def digits_schedule(epsilon: float, rounds: int, delta: float = DELTA) -> PrivacySchedule:
    """The demo's schedule with the noise calibrated so that ``rounds`` rounds cost ``epsilon``."""
    z = noise_multiplier_for(epsilon, delta, SAMPLE_RATE, rounds * STEPS_PER_ROUND)
    return PrivacySchedule("record", rounds, SAMPLE_RATE, z, STEPS_PER_ROUND, MAX_GRAD_NORM)


@dataclass
class Run:
    seed: int
    epsilon: float | None
    accuracies: list[float]
    spent: float


def simulate(seed: int, schedule: PrivacySchedule | None, nodes: int = 3, rounds: int = 5) -> Run:
    """One federation: ``nodes`` digits members, FedAvg in plaintext (uniform under DP)."""
    from cipherhive.demo.digits import DigitsTrainer, accuracy, build_model, load_data

    data = load_data(nodes, seed)
    members = [DigitsTrainer(shard=i, shards=nodes, seed=seed) for i in range(nodes)]
    randoms = [DPRandom(insecure_seed=seed, label=f"node-{i + 1}") for i in range(nodes)]
    model = build_model(seed)
    accuracies = []
    for number in range(1, rounds + 1):
        base = [p.detach().clone() for p in model.parameters()]
        deltas, weights = [], []
        for member, random in zip(members, randoms, strict=True):
            local = copy.deepcopy(model)
            dp = None
            if schedule is not None:
                noise, sampling = random.next_round()
                dp = DPRound(
                    number,
                    schedule.sample_rate,
                    schedule.noise_multiplier,
                    schedule.max_grad_norm,
                    schedule.steps_per_round,
                    DELTA,
                    noise,
                    sampling,
                    insecure=True,
                )
            info = RoundInfo(number, number - 1, f"node-{member.shard + 1}", privacy=dp)
            result = member.train(local, info)
            deltas.append([p.detach() - b for p, b in zip(local.parameters(), base, strict=True)])
            weights.append(1.0 if schedule is not None else float(result.num_samples))
        total = sum(weights)
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.copy_(base[i] + sum(w * d[i] for w, d in zip(weights, deltas, strict=True)) / total)
        accuracies.append(accuracy(model, data.x_test, data.y_test))
    spent = schedule.epsilon(DELTA) if schedule is not None else 0.0
    return Run(seed, spent if schedule is not None else None, accuracies, spent)


def run_table(args: argparse.Namespace) -> int:
    logging.getLogger("cipherhive.node.privacy").setLevel(logging.ERROR)  # the seeds are fixed on purpose
    started = time.monotonic()
    targets: list[float | None] = [None, *EPSILONS]
    rows: list[dict[str, Any]] = []
    for target in targets:
        rounds = DP_ROUNDS if target is not None else ROUNDS
        schedule = digits_schedule(target, rounds) if target is not None else None
        runs = [simulate(seed, schedule, args.nodes, rounds) for seed in range(args.seeds)]
        finals = [r.accuracies[-1] for r in runs]
        rows.append(
            {
                "rounds": rounds,
                "epsilon_target": target,
                "epsilon": round(runs[0].spent, 3) if target is not None else None,
                "noise_multiplier": round(schedule.noise_multiplier, 4) if schedule else None,
                "mean_accuracy": round(statistics.mean(finals), 4),
                "stdev_accuracy": round(statistics.stdev(finals), 4) if len(finals) > 1 else 0.0,
                "accuracies": [round(a, 4) for a in finals],
            }
        )
    result = {
        "nodes": args.nodes,
        "seeds": args.seeds,
        "sample_rate": SAMPLE_RATE,
        "steps_per_round": STEPS_PER_ROUND,
        "max_grad_norm": MAX_GRAD_NORM,
        "delta": DELTA,
        "rows": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"| privacy | rounds | noise multiplier | test accuracy, mean of {args.seeds} seeds (± sd) |")
    print("|---|---|---|---|")
    for row in rows:
        label = "no DP" if row["epsilon"] is None else f"ε = {row['epsilon']:.2f}, δ = {DELTA:g}"
        z = "—" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.3f}"
        mean, sd = row["mean_accuracy"], row["stdev_accuracy"]
        print(f"| {label} | {row['rounds']} | {z} | {mean:.3f} (± {sd:.3f}) |")
    print(f"({result['seconds']:.0f} s)")
    return 0
