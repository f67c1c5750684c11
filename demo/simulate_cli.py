"""`cipherhive simulate`: the command-line face of `cipherhive.simulate`.

Flags and their parsing are kept apart from the run so that ``--help`` and a
mistyped ``--options`` answer at once, without torch. Exit codes: 0 every
round finished; 1 the run started and a trainer, node or round failed;
2 the run could not start (flags, a plug-in that cannot be imported or created).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cipherhive.runtime.errors import UserError

EXAMPLE = (
    "cipherhive simulate --plugin my_trainer:MyTrainer --options '{\"epochs\": 2}' "
    '--node-options \'[{"shard": 0}, {"shard": 1}, {"shard": 2}]\' --nodes 3 --rounds 5'
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        required=True,
        metavar="MODULE:OBJECT",
        help="your trainer plug-in, e.g. my_trainer:MyTrainer (imported by every node process)",
    )
    parser.add_argument("--options", default="{}", metavar="JSON", help="options every node's trainer gets")
    parser.add_argument(
        "--node-options",
        action="append",
        default=[],
        metavar="JSON",
        help="per-node options on top of --options: a JSON list with one object per node, "
        "or the flag once per node with one object each",
    )
    parser.add_argument("--nodes", type=int, default=3, help="member nodes to start (at least 2)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds to run")
    parser.add_argument(
        "--python-path",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="folder to import the plug-in from (repeatable; default: the current directory)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep keys, certificates, state, logs and the final model (model/) here"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def _json_object(text: str, flag: str) -> dict[str, Any]:
    value = _json(text, flag)
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object such as '{{\"epochs\": 2}}', not {text!r}")
    return value


def _json(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UserError(
            f"{flag} is not valid JSON ({exc}): {text!r}; quote it for the shell, e.g. {EXAMPLE}"
        ) from exc


def node_options(values: list[str], nodes: int) -> list[dict[str, Any]] | None:
    """``--node-options``: one JSON list of objects, or one object per flag; None if not given."""
    if not values:
        return None
    if len(values) == 1 and isinstance(_json(values[0], "--node-options"), list):
        parsed = _json(values[0], "--node-options")
    else:
        parsed = [_json_object(v, "--node-options") for v in values]
    if len(parsed) != nodes or not all(isinstance(o, dict) for o in parsed):
        raise UserError(
            f"--node-options gives {len(parsed)} entries for --nodes {nodes}: give one JSON object per node, "
            'as a list (\'[{"shard": 0}, {"shard": 1}]\') or one --node-options per node'
        )
    return list(parsed)


def run(args: argparse.Namespace) -> int:
    from cipherhive.demo.sim_result import SimulationError
    from cipherhive.demo.simulation import check_arguments, simulate

    options = _json_object(args.options, "--options")
    per_node = node_options(args.node_options, args.nodes)
    python_path = args.python_path or [Path.cwd()]
    try:
        check_arguments(
            args.plugin, args.nodes, args.rounds, options, per_node, python_path, timeout=args.timeout
        )
    except SimulationError as exc:
        print(f"cipherhive simulate: error: {exc}", file=sys.stderr)
        return 2
    say = (lambda *a: None) if args.json else print
    say(
        f"cipherhive simulate: {args.plugin}, {args.nodes} nodes, {args.rounds} rounds "
        "(a real server and node processes, CKKS, mutual TLS on loopback)"
    )
    say(HEADER)
    try:
        result = simulate(
            args.plugin,
            args.nodes,
            args.rounds,
            options=options,
            node_options=per_node,
            workdir=args.workdir,
            python_path=python_path,
            timeout=args.timeout,
            on_round=None if args.json else _print_round,
        )
    except SimulationError as exc:
        if args.json and exc.result is not None:
            print(json.dumps({**exc.result.to_dict(), "error": str(exc)}, indent=2))
        print(f"cipherhive simulate: error: {exc}", file=sys.stderr)
        return 1 if exc.started else 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if result.model_dir is not None:
        where = f"exported to {result.model_dir} (read it with cipherhive.node.export.load_export)"
    else:
        where = "pass --workdir DIR to keep it (DIR/model) with the keys, state and logs"
    print(f"final global model: round {result.model_round}, {where}; {result.seconds:.1f}s in all")
    return 0


HEADER = (
    f"{'round':>5} {'nodes':>5} {'seconds':>7}  {'node':<8} {'samples':>7} {'train_s':>7} {'upload_s':>8} "
    f"{'apply_s':>7}  local metrics"
)


def _print_round(record: Any) -> None:
    """One line per node; the first also shows the round, its participants and its wall time."""
    lead = f"{record.round:>5} {len(record.participants):>5} {record.seconds:>7.1f}"
    for name, node in record.nodes.items():
        shown = " ".join(f"{k}={v:g}" for k, v in sorted(node.metrics.items())) or "-"
        print(
            f"{lead}  {name:<8} {_n(node.samples):>7} {_s(node.train_seconds):>7} "
            f"{_s(node.encrypt_upload_seconds):>8} {_s(node.apply_seconds):>7}  "
            f"{shown if node.submitted else 'did not take part'}",
            flush=True,
        )
        lead = " " * len(lead)
    evaluation = record.federated_eval
    if evaluation:
        # Decrypted by the members only; the server never sees it (docs/spec/sum-checks.md §5).
        shown = " ".join(f"{k}={evaluation[k]:g}" for k in ("loss", "accuracy") if k in evaluation)
        print(
            f"{'':>19}federated validation of round {int(evaluation.get('of_round', 0))}'s model "
            f"({int(evaluation['examples'])} examples): {shown}",
            flush=True,
        )


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
