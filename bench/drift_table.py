"""FedAvg, FedProx and SCAFFOLD side by side on the digits demo, with central training beside them.

`cipherhive demo --drift-table` runs, for every seed, the same label-skewed members as
`cipherhive demo` (Dirichlet split, concentration 0.5; same model, trainer and local epochs)
three times: plain FedAvg local training, FedProx (``proximal_mu``, Li et al., MLSys 2020) and
SCAFFOLD (``scaffold``, Karimireddy et al., ICML 2020, Algorithm 1 option II). Like
:mod:`cipherhive.demo.dp_table` it aggregates in plaintext inside one process, but through the
node's own vector arithmetic (:func:`~cipherhive.node.training.update.weighted_vector` and
:func:`~cipherhive.node.training.update.mean_from_sum`, control block included): encryption moves
the average by about 1e-9, far below what moves an accuracy. Central training is the same
trainer on the union of the members' data for rounds x epochs epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from cipherhive.node.trainer import RoundInfo, federated_tensors
from cipherhive.node.training.update import FlatParams, layout_of, mean_from_sum, weighted_vector

#: FedProx's μ for the table (Li et al. tune μ in {0.001, 0.01, 0.1, 1}).
PROXIMAL_MU = 0.01
#: FedAvg weights are sample counts over this unit (as the server's default weight_unit does).
WEIGHT_UNIT = 1000.0


def federate(
    seed: int,
    nodes: int,
    rounds: int,
    epochs: int,
    proximal_mu: float = 0.0,
    scaffold: bool = False,
) -> list[float]:
    """One plaintext federation of digits members; the test accuracy after every round."""
    from cipherhive.demo.digits import DigitsTrainer, accuracy, build_model, load_data

    data = load_data(nodes, seed)
    members = [
        DigitsTrainer(
            shard=i, shards=nodes, seed=seed, epochs=epochs, proximal_mu=proximal_mu, scaffold=scaffold
        )
        for i in range(nodes)
    ]
    models = [m.build_model() for m in members]
    flats = [FlatParams(federated_tensors(m, model)) for m, model in zip(members, models, strict=True)]
    layout = layout_of(federated_tensors(members[0], models[0]))
    global_ = flats[0].read().astype(np.float64)
    accuracies = []
    for number in range(1, rounds + 1):
        total = np.zeros(layout.num_values)
        for member, model, flat in zip(members, models, flats, strict=True):
            flat.load(global_)
            result = member.train(model, RoundInfo(number, number - 1, f"node-{member.shard + 1}"))
            total += weighted_vector(
                flat.read(),
                global_,
                result.num_samples,
                WEIGHT_UNIT,
                nodes,
                control_start=layout.control_start,
            )
        global_ = global_ + mean_from_sum(total, layout.num_params, layout.control_start)
        evaluated = build_model(seed)
        FlatParams(list(evaluated.named_parameters())).load(global_[: layout.control_start])
        accuracies.append(accuracy(evaluated, data.x_test, data.y_test))
    return accuracies


def central(seed: int, rounds: int, epochs: int) -> float:
    """The same trainer on all the members' training data at once, for rounds x epochs epochs."""
    from cipherhive.demo.digits import DigitsTrainer, accuracy, load_data

    data = load_data(1, seed)  # one shard: the whole training set
    trainer = DigitsTrainer(shard=0, shards=1, seed=seed, epochs=rounds * epochs)
    model = trainer.build_model()
    trainer.train(model, RoundInfo(1, 0, "central"))
    return accuracy(model, data.x_test, data.y_test)


def run_drift_table(args: argparse.Namespace) -> int:
    started = time.monotonic()
    mu = float(getattr(args, "proximal_mu", 0.0) or PROXIMAL_MU)
    methods: list[tuple[str, dict[str, Any]]] = [
        ("FedAvg", {}),
        (f"FedProx (μ = {mu:g})", {"proximal_mu": mu}),
        ("SCAFFOLD", {"scaffold": True}),
    ]
    seeds = list(range(args.seeds))
    rows: list[dict[str, Any]] = []
    for label, options in methods:
        finals = [federate(s, args.nodes, args.rounds, args.epochs, **options)[-1] for s in seeds]
        rows.append({"method": label, "accuracies": [round(a, 4) for a in finals]})
    rows.append(
        {
            "method": "central (all data)",
            "accuracies": [round(central(s, args.rounds, args.epochs), 4) for s in seeds],
        }
    )
    for row in rows:
        row["mean_accuracy"] = round(statistics.mean(row["accuracies"]), 4)
    result = {
        "nodes": args.nodes,
        "rounds": args.rounds,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "rows": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"digits, {args.nodes} members (Dirichlet 0.5 label skew), {args.rounds} rounds x {args.epochs} "
        "local epochs: final test accuracy"
    )
    print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for row in rows:
        cells = " | ".join(f"{a:.3f}" for a in row["accuracies"])
        print(f"| {row['method']} | {cells} | {row['mean_accuracy']:.3f} |")
    print(f"({result['seconds']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cipherhive.bench.drift_table``: the table without the demo's other flags."""
    parser = argparse.ArgumentParser(prog="python -m cipherhive.bench.drift_table", description=__doc__)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--proximal-mu", type=float, default=PROXIMAL_MU)
    parser.add_argument("--json", action="store_true")
    return run_drift_table(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
