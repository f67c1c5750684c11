"""What the demos show per round: decrypted against plaintext FedAvg from the trainers' records,
and a progress bar over the rounds on a terminal (shared by the digits and the DP demo)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = torch.load(path, weights_only=True)
    return data


def round_figures(records: Path, number: int, nodes: int, participants: int) -> dict[str, Any]:
    """Decrypted vs plaintext FedAvg for one round, from the trainers' records."""
    folder = records / f"round-{number}"
    updates = [_load(p) for p in sorted(folder.glob("shard-*.update.pt"))]
    applied = [_load(folder / f"shard-{i}.applied.pt") for i in range(nodes)]
    total = sum(u["samples"] for u in updates)
    plain = sum(u["samples"] * (u["local"] - u["global"]) for u in updates) / total
    decrypted = applied[0]["mean"]
    # Every node decrypted the same sum and holds the same model.
    spread = max(float((a["global"] - applied[0]["global"]).abs().max()) for a in applied)
    return {
        "round": number,
        "participants": participants,
        "max_abs_error": float((decrypted - plain).abs().max()),
        "node_model_spread": spread,
        "global": applied[0]["global"],
    }


def progress_bar(args: argparse.Namespace) -> Progress | None:
    """A progress bar over the rounds on a terminal; plain lines otherwise."""
    if args.json or not sys.stdout.isatty():
        return None
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    bar.add_task("starting the server and the nodes", total=args.rounds)
    bar.start()
    return bar
