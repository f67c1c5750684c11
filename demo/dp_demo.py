"""`cipherhive demo --dp`: the digits federation with record-level DP-SGD in every member.

Like the plain demo it runs every member itself and checks each round against
plaintext FedAvg; the server announces a DP schedule calibrated to ``--epsilon``
over the run's rounds, every node gets exactly that budget and a fresh privacy
ledger, and the table adds each member's ε so far (from the public schedule).
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
from cipherhive.demo.dp_table import DELTA, digits_schedule
from cipherhive.demo.federation import LocalFederation
from cipherhive.demo.round_figures import progress_bar, round_figures
from cipherhive.privacy.schedule import PrivacySchedule
from cipherhive.runtime.fsutil import removed_on_error
from cipherhive.v1 import federation_pb2 as pb


def _privacy(fed: LocalFederation, args: argparse.Namespace) -> PrivacySchedule | None:
    """With --dp: the server announces a schedule calibrated to --epsilon over the run's rounds, and
    every node gets a budget of exactly that and a fresh ledger (noise from the OS, no fixed seed)."""
    if not args.dp:
        return None
    schedule = digits_schedule(args.epsilon, args.rounds)
    fed.server_privacy = {
        "dp_mode": schedule.mode,
        "dp_rounds": schedule.rounds,
        "dp_sample_rate": schedule.sample_rate,
        "dp_noise_multiplier": schedule.noise_multiplier,
        "dp_steps_per_round": schedule.steps_per_round,
        "dp_max_grad_norm": schedule.max_grad_norm,
    }
    fed.node_privacy = {"max_epsilon": args.epsilon, "delta": DELTA}
    return schedule


def run_dp_demo(args: argparse.Namespace) -> int:
    """`cipherhive demo --dp`: the digits federation with record-level DP-SGD, ε per round."""
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cipherhive-demo-"))
    with removed_on_error(workdir, keep=args.workdir is not None):
        return _dp_demo(args, workdir)


def _dp_demo(args: argparse.Namespace, workdir: Path) -> int:
    records = workdir / "records"
    fed = LocalFederation(
        workdir,
        nodes=args.nodes,
        insecure=args.insecure,
        node_options={"seed": args.seed, "epochs": args.epochs, "record_dir": str(records)},
        rounds={"max_rounds": args.rounds},
    )
    schedule = _privacy(fed, args)
    say = (lambda *a: None) if args.json else print
    data = load_data(args.nodes, args.seed)
    model = build_model(args.seed)
    say(
        f"cipherhive demo: {args.nodes} nodes, {args.rounds} rounds, digits data "
        f"({len(data.y_train)} train / {len(data.y_test)} test), shards {[len(s) for s in data.shards]}"
    )
    say(f"work directory: {workdir}  ({'no TLS' if args.insecure else 'mutual TLS'})")
    if schedule is not None:
        say(f"differential privacy: {schedule.describe()}; each member's ε at δ = {DELTA:g} below")
    say(f"initial test accuracy: {accuracy(model, data.x_test, data.y_test):.3f}")
    eps_head = f" {'epsilon':>7}" if schedule is not None else ""
    say(f"{'round':>5} {'nodes':>5} {'accuracy':>8} {'max_abs_error':>13} {'seconds':>7}{eps_head}")
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    started = time.monotonic()
    bar = progress_bar(args)
    try:
        fed.setup()
        fed.start()
        last = started
        for number in range(1, args.rounds + 1):
            if bar is not None:
                bar.update(bar.task_ids[0], description=f"round {number}: train, encrypt, aggregate")
            remaining = args.timeout - (time.monotonic() - started)
            info = fed.wait_round(number, remaining)
            if info.state == pb.ROUND_FAILED:
                failed.append(f"round {number}: {info.reason}")
                break
            folder = records / f"round-{number}"
            fed.wait_for(
                lambda f=folder: len(list(f.glob("shard-*.applied.pt"))) == args.nodes,
                max(remaining, 1.0),
                f"every node to apply round {number}",
            )
            figures = round_figures(records, number, args.nodes, info.participants)
            load_flat(model, figures.pop("global"))
            figures["accuracy"] = round(accuracy(model, data.x_test, data.y_test), 4)
            figures["seconds"] = round(time.monotonic() - last, 2)
            last = time.monotonic()
            if schedule is not None:
                # From the public schedule alone: every member trained once per round so far.
                figures["epsilon"] = round(schedule.epsilon(DELTA, rounds=number), 3)
            rows.append(figures)
            line = (
                f"{number:>5} {info.participants:>5} {figures['accuracy']:>8.3f} "
                f"{figures['max_abs_error']:>13.2e} {figures['seconds']:>7.1f}"
                + (f" {figures['epsilon']:>7.2f}" if schedule is not None else "")
            )
            if bar is not None:
                bar.console.print(line, highlight=False)
                bar.advance(bar.task_ids[0])
            else:
                say(line)
    except (TimeoutError, RuntimeError) as exc:
        failed.append(str(exc))
    finally:
        if bar is not None:
            bar.stop()
        codes = fed.stop_all()
    bad_exits = {k: c for k, c in codes.items() if c not in (0, None)}
    if bad_exits:
        failed.append(f"processes exited uncleanly: {bad_exits}")
    result = {
        "nodes": args.nodes,
        "rounds": rows,
        "final_accuracy": rows[-1]["accuracy"] if rows else 0.0,
        "max_abs_error": max((r["max_abs_error"] for r in rows), default=None),
        "seconds": round(time.monotonic() - started, 2),
        "privacy": None
        if schedule is None
        else {
            "mode": schedule.mode,
            "delta": DELTA,
            "epsilon": rows[-1]["epsilon"] if rows else 0.0,
            "noise_multiplier": schedule.noise_multiplier,
            "sample_rate": schedule.sample_rate,
            "steps_per_round": schedule.steps_per_round,
            "max_grad_norm": schedule.max_grad_norm,
        },
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
