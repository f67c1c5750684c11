"""Command-line flags of `cipherhive bench` (kept apart so `--help` needs no torch)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

#: "unmasked" is the product's pipeline with masking off: what masks cost, side by side.
MODES = ("cipherhive", "unmasked", "plaintext", "tenseal-vector")


def parse_count(text: str) -> int:
    """``1M`` → 1_000_000; also K and G, or a plain number."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count like 500K, 10M or 1000000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    value = int(float(match.group(1)) * scale)
    if value < 1:
        raise argparse.ArgumentTypeError("the count must be at least 1")
    return value


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=parse_count, default=parse_count("1M"), help="parameters per update")
    parser.add_argument("--nodes", type=int, default=3, help="member node processes (at least 2)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per mode")
    parser.add_argument("--workers", type=int, default=0, help="crypto processes per node (0: all cores)")
    parser.add_argument(
        "--ingest-workers", type=int, default=0, help="server ingest processes (0: all cores, 1: in-process)"
    )
    parser.add_argument(
        "--sample", type=parse_count, default=parse_count("1M"), help="values for in-process figures"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES)
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--workdir", type=Path, help="keep state and logs here")
