"""Command-line flags of `cipherhive demo` (kept apart so `--help` needs no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cipherhive.fedopt import NAMES


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="member nodes to start (at least 2)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds to run")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data split and the model")
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--workdir", type=Path, help="keep keys, certificates, state and logs here")
    parser.add_argument("--insecure", action="store_true", help="run without TLS (not recommended)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument(
        "--task",
        choices=["digits", "lora"],
        default="digits",
        help="digits: a classifier on handwritten digits; lora: LoRA adapters on a small local transformer",
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
