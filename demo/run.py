"""Run the demo federation and report accuracy and encryption error per round.

The demo is one use of `cipherhive.simulate`: the digits trainer, one shard
per node. It is also the only party that sees everything (it runs every
member), so it can check the product: after each round it compares the
average every node decrypted with the plaintext weighted average of the same
updates, and evaluates the global model on a held-out test set. ``--dp`` runs
the record-level DP variant (:mod:`cipherhive.demo.dp_demo`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cipherhive.demo.digits import accuracy, build_model, load_data, load_flat
from cipherhive.demo.options import EPOCHS, TIMEOUT, drift_options, optimizer_section
from cipherhive.demo.round_figures import progress_bar, round_figures
from cipherhive.demo.sim_result import RoundRecord, SimulationError
from cipherhive.demo.simulation import simulate
from cipherhive.federation.optimizer_settings import OptimizerSpec
from cipherhive.runtime.fsutil import removed_on_error


def run_demo(args: argparse.Namespace) -> int:
    """The digits demo: `cipherhive.simulate` of the digits trainer, checked after every round."""
    if getattr(args, "epochs", None) is None:
        args.epochs = EPOCHS
    if getattr(args, "timeout", None) is None:
        args.timeout = TIMEOUT
    if getattr(args, "drift_table", False):
        from cipherhive.bench.drift_table import run_drift_table

        return run_drift_table(args)
    if getattr(args, "dp", False):
        from cipherhive.demo.dp_demo import run_dp_demo

        return run_dp_demo(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cipherhive-demo-"))
    with removed_on_error(workdir, keep=args.workdir is not None):
        return _digits_demo(args, workdir)


def _digits_demo(args: argparse.Namespace, workdir: Path) -> int:
    records = workdir / "records"
    say = (lambda *a: None) if args.json else print
    data = load_data(args.nodes, args.seed)
    model = build_model(args.seed)
    say(
        f"cipherhive demo: {args.nodes} nodes, {args.rounds} rounds, digits data "
        f"({len(data.y_train)} train / {len(data.y_test)} test), shards {[len(s) for s in data.shards]}"
    )
    say(f"work directory: {workdir}  ({'no TLS' if args.insecure else 'mutual TLS'})")
    spec = OptimizerSpec.make(args.optimizer, args.server_lr)
    say(f"server-side optimizer (run on every node): {spec.describe()}")
    say(f"initial test accuracy: {accuracy(model, data.x_test, data.y_test):.3f}")
    say(f"{'round':>5} {'nodes':>5} {'accuracy':>8} {'max_abs_error':>13} {'seconds':>7}")
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    started = time.monotonic()
    bar = progress_bar(args)

    def check_round(record: RoundRecord) -> None:
        """Compare what the nodes decrypted with plaintext FedAvg, and test the global model."""
        if bar is not None:
            bar.update(bar.task_ids[0], description=f"round {record.round + 1}: train, encrypt, aggregate")
        folder = records / f"round-{record.round}"
        deadline = started + args.timeout
        # after_round (which writes these files) runs once a node has reported the round applied.
        while len(list(folder.glob("shard-*.applied.pt"))) < args.nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for every node to record round {record.round}")
            time.sleep(0.1)
        figures = round_figures(records, record.round, args.nodes, len(record.participants))
        load_flat(model, figures.pop("global"))
        figures["accuracy"] = round(accuracy(model, data.x_test, data.y_test), 4)
        figures["seconds"] = record.seconds
        rows.append(figures)
        line = (
            f"{record.round:>5} {figures['participants']:>5} {figures['accuracy']:>8.3f} "
            f"{figures['max_abs_error']:>13.2e} {figures['seconds']:>7.1f}"
        )
        if bar is not None:
            bar.console.print(line, highlight=False)
            bar.advance(bar.task_ids[0])
        else:
            say(line)

    try:
        simulate(
            "cipherhive.demo.digits:DigitsTrainer",
            args.nodes,
            args.rounds,
            options={
                "seed": args.seed,
                "epochs": args.epochs,
                "record_dir": str(records),
                "shards": args.nodes,
                **drift_options(args),
            },
            node_options=[{"shard": i} for i in range(args.nodes)],
            workdir=workdir,
            timeout=args.timeout,
            insecure=args.insecure,
            optimizer=optimizer_section(args),
            on_round=check_round,
        )
    except (SimulationError, TimeoutError) as exc:
        failed.append(str(exc))
    finally:
        if bar is not None:
            bar.stop()
    result = {
        "nodes": args.nodes,
        "optimizer": spec.canonical_dict(),
        "rounds": rows,
        "final_accuracy": rows[-1]["accuracy"] if rows else 0.0,
        "max_abs_error": max((r["max_abs_error"] for r in rows), default=None),
        "seconds": round(time.monotonic() - started, 2),
        "workdir": str(workdir),
        "errors": failed,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"final test accuracy {result['final_accuracy']:.3f} after {len(rows)} rounds "
            f"in {result['seconds']:.1f}s; largest decryption error {result['max_abs_error']}"
        )
        for problem in failed:
            print(f"error: {problem}", file=sys.stderr)
    if not failed and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failed:
        print(f"logs kept in {workdir}", file=sys.stderr)
    return 1 if failed or len(rows) < args.rounds else 0
