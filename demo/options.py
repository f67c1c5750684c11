"""Command-line flags of `cipherhive demo` (kept apart so `--help` needs no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cipherhive.federation.optimizer_settings import NAMES

#: Rounds of the digits demo; under DP more, shorter rounds (18 steps each) train better for the same ε.
ROUNDS, DP_ROUNDS = 5, 20
#: Local epochs per round and the time limit of the digits demo (the LoRA demo's: lora_run).
EPOCHS, TIMEOUT = 5, 600.0
#: Rounds of the LoRA demo under DP (30 steps each; see cipherhive.demo.lora_run.lora_schedule).
LORA_DP_ROUNDS = 10


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="member nodes to start (at least 2)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="federated rounds to run (default 5; with --dp 20, or 10 with --task lora)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the data split and the model")
    parser.add_argument(
        "--epochs", type=int, default=None, help="local epochs per round (default 5; 1 with --task lora)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--workdir", type=Path, help="keep keys, certificates, state and logs here")
    parser.add_argument("--insecure", action="store_true", help="run without TLS (not recommended)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default 600; 1800 with --task lora)",
    )
    parser.add_argument(
        "--dp",
        action="store_true",
        help="record-level differential privacy: DP-SGD on every member, each with its own ledger",
    )
    parser.add_argument(
        "--epsilon", type=float, default=8.0, help="with --dp: the members' ε over all rounds (δ = 1e-5)"
    )
    parser.add_argument(
        "--dp-table",
        action="store_true",
        help="print the documentation's table: accuracy without DP and at ε = 1, 3, 8 over --seeds seeds "
        "(in one process, aggregating in plaintext)",
    )
    parser.add_argument(
        "--seeds", type=int, default=5, help="with --dp-table or --drift-table: seeds per row"
    )
    parser.add_argument(
        "--drift-table",
        action="store_true",
        help="print FedAvg, FedProx and SCAFFOLD side by side with central training, over --seeds seeds "
        "(digits; in one process, aggregating in plaintext)",
    )
    parser.add_argument(
        "--proximal-mu",
        type=float,
        default=0.0,
        help="FedProx: every member adds mu/2 ||w - w_global||^2 to its local objective (0: off; "
        "with --drift-table: the FedProx row's mu, default 0.01)",
    )
    parser.add_argument(
        "--scaffold",
        action="store_true",
        help="SCAFFOLD: control variates correct every local step; they travel in the encrypted sum",
    )
    parser.add_argument(
        "--member-table",
        action="store_true",
        help="print the documentation's member-level DP table: noise on the mean update relative to the "
        "clipping norm, by number of members, at ε = 8 (in one process, seconds)",
    )
    parser.add_argument(
        "--task",
        choices=["digits", "lora"],
        default="digits",
        help="digits: a classifier on handwritten digits; lora: LoRA adapters on a pretrained "
        "transformer (all-MiniLM-L6-v2, BBC News topics)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="with --task lora: a tiny BERT pretrained on the spot and a synthetic task, in a few minutes",
    )
    parser.add_argument(
        "--optimizer",
        choices=NAMES,
        default="fedavg",
        help="server-side optimizer every node runs on the decrypted average (Reddi et al., ICLR 2021)",
    )
    parser.add_argument(
        "--server-lr",
        type=float,
        default=0.0,
        help="the optimizer's learning rate η (0: 1 for fedavg and fedavgm, 0.01 for fedadam and fedyogi)",
    )


def optimizer_section(args: argparse.Namespace) -> dict[str, object]:
    """The server's [optimizer] section for the demo's flags."""
    return {"optimizer": args.optimizer, "learning_rate": args.server_lr}


def drift_options(args: argparse.Namespace) -> dict[str, object]:
    """The digits trainer's client-drift options for the demo's flags (none when they are off)."""
    options: dict[str, object] = {}
    if getattr(args, "proximal_mu", 0.0):
        options["proximal_mu"] = args.proximal_mu
    if getattr(args, "scaffold", False):
        options["scaffold"] = True
    return options
