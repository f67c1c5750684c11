"""The `cipherhive` command: one entry point, one sub-command per job.

Heavy imports (torch, the daemons) happen inside each sub-command so that
`cipherhive --help` and `cipherhive keygen` start fast. Every error a user
can fix is printed as one line, ``cipherhive <command>: error: …``, with
exit code 2; tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cipherhive import __version__
from cipherhive.pki import certs
from cipherhive.runtime.errors import UserError


def _keygen(args: argparse.Namespace) -> int:
    from cipherhive.ckks import keys

    files = keys.keygen(args.out, force=args.force)
    print(f"secret context (member nodes only, mode 0600): {files.secret}")
    print(f"public context (the server):                   {files.public}")
    print(f"fingerprint: {files.fingerprint}")
    return 0


def _server(args: argparse.Namespace) -> int:
    from cipherhive.runtime import config, logs
    from cipherhive.server.config import ServerConfig
    from cipherhive.server.daemon import Server

    cfg = config.load(ServerConfig, args)
    logs.setup(cfg.log_level, cfg.log_json, cfg.audit_file)
    return Server(cfg).serve_forever()  # it holds its state directory (StateDirLock)


def _node(args: argparse.Namespace) -> int:
    from cipherhive.node.config import NodeConfig
    from cipherhive.node.daemon import Node
    from cipherhive.runtime import config, logs
    from cipherhive.runtime.fsutil import StateDirInUse, exclusive_state_dir

    cfg = config.load(NodeConfig, args)
    logs.setup(cfg.log_level, cfg.log_json)
    node = Node(cfg)  # refuses a bad configuration before anything is held
    try:
        with exclusive_state_dir(cfg.state_dir, "node"):
            return node.serve_forever()  # which closes the node
    except StateDirInUse:
        node.close()  # its crypto workers
        raise


def _demo(args: argparse.Namespace) -> int:
    if args.nodes < 2:
        print(
            "cipherhive demo: error: --nodes must be at least 2 (a sum of one update is that update)",
            file=sys.stderr,
        )
        return 2
    from cipherhive.federation.optimizer_settings import OptimizerError, OptimizerSpec

    try:
        OptimizerSpec.make(args.optimizer, args.server_lr, where="--optimizer/--server-lr:")
    except OptimizerError as exc:
        print(f"cipherhive demo: error: {exc}", file=sys.stderr)
        return 2
    from cipherhive.demo.options import DP_ROUNDS, LORA_DP_ROUNDS, ROUNDS

    if args.rounds is None:
        args.rounds = (LORA_DP_ROUNDS if args.task == "lora" else DP_ROUNDS) if args.dp else ROUNDS
    if (args.dp_table or args.member_table) and args.task != "digits":
        print("cipherhive demo: error: the DP tables run the digits task only", file=sys.stderr)
        return 2
    if args.dp and not args.epsilon > 0:
        print("cipherhive demo: error: --epsilon must be positive", file=sys.stderr)
        return 2
    if args.member_table:
        from cipherhive.demo.member_table import run_member_table

        return run_member_table(args)
    if args.dp_table:
        from cipherhive.demo.dp_table import run_table

        return run_table(args)
    if args.task == "lora":
        from cipherhive.demo.lora_run import run_lora_demo

        return run_lora_demo(args)
    from cipherhive.demo.run import run_demo

    return run_demo(args)


def _simulate(args: argparse.Namespace) -> int:
    from cipherhive.demo.simulate_cli import run

    return run(args)


def _node_export(args: argparse.Namespace) -> int:
    from cipherhive.node.config import NodeConfig
    from cipherhive.node.export import export_model
    from cipherhive.runtime import config, logs

    cfg = config.load(NodeConfig, args)
    logs.setup(cfg.log_level, cfg.log_json)
    out = export_model(cfg, args.out, args.round)
    which = f"round {args.round}'s" if args.round is not None else "the node's current"
    print(f"exported {which} global model to {out}")
    return 0


def _node_layout(args: argparse.Namespace) -> int:
    from cipherhive.node.config import NodeConfig
    from cipherhive.node.state.layout_file import write_layout
    from cipherhive.runtime import config, logs

    cfg = config.load(NodeConfig, args)
    logs.setup(cfg.log_level, cfg.log_json)
    layout = write_layout(cfg, args.out)
    print(f"wrote the model layout to {args.out}")
    print(f"layout hash: {layout.hash}")
    print(f"size: {layout.num_params} values in {len(layout.tensors)} tensors")
    print(f"initial model fingerprint: {layout.initial_model_hash[:16]}… (keyed by the federation's secret)")
    print(f"pin it with: cipherhive ctl federation init --layout {args.out}")
    return 0


def _node_bootstrap(args: argparse.Namespace) -> int:
    from cipherhive.node.config import NodeConfig
    from cipherhive.node.state.bootstrap import bootstrap
    from cipherhive.runtime import config, logs

    cfg = config.load(NodeConfig, args)
    logs.setup(cfg.log_level, cfg.log_json)
    checkpoint, previous = bootstrap(cfg, args.source)
    print(
        f"installed round {checkpoint.round} as the checkpoint of {cfg.state_dir} (it was at round "
        f"{previous}); start the node to replay the sums after round {checkpoint.round}"
    )
    return 0


def _node_privacy(args: argparse.Namespace) -> int:
    from cipherhive.node.config import NodeConfig
    from cipherhive.node.privacy.ledger import PrivacyLedger, ledger_path
    from cipherhive.runtime import config, logs

    cfg = config.load(NodeConfig, args)
    logs.setup(cfg.log_level, cfg.log_json)
    if not cfg.dataset:
        raise config.ConfigError("set [privacy] dataset: the name of the dataset the ledger accounts for")
    path = ledger_path(cfg.ledger_dir, cfg.dataset)
    if args.node_command == "privacy-init":
        PrivacyLedger.init(path, cfg.dataset)
        print(f"created the privacy ledger of dataset {cfg.dataset!r}: {path} (back it up; never delete it)")
        return 0
    ledger = PrivacyLedger(path, cfg.dataset)
    entries = ledger.entries()
    for e in entries:
        print(
            f"round {e.round}: {e.event.steps} steps, sample rate {e.event.sample_rate:g}, "
            f"noise multiplier {e.event.noise_multiplier:g}"
        )
    spent = ledger.epsilon(cfg.delta)
    print(f"dataset {cfg.dataset!r}: {len(entries)} rounds, ε = {spent:.4f} at δ = {cfg.delta:g}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from cipherhive.bench.run import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    from cipherhive.bench.options import add_bench_arguments
    from cipherhive.demo.options import add_demo_arguments
    from cipherhive.demo.simulate_cli import add_arguments as add_simulate_arguments
    from cipherhive.node.config import NodeConfig
    from cipherhive.runtime import config
    from cipherhive.server.config import ServerConfig

    parser = argparse.ArgumentParser(
        prog="cipherhive",
        description="Secure aggregation for federated learning: the server only adds ciphertexts.",
    )
    parser.add_argument("--version", action="version", version=f"cipherhive {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="create the federation's secret and public contexts")
    p.add_argument("--out", type=Path, required=True, help="directory to write secret.ctx and public.ctx to")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite existing keys (locks members out of history)",
    )
    p.set_defaults(func=_keygen)

    p = sub.add_parser("server", help="run the aggregator daemon")
    config.add_arguments(p, ServerConfig)
    p.set_defaults(func=_server)

    p = sub.add_parser(
        "node", help="run a member node daemon (or: node export|layout|bootstrap|privacy-init|privacy)"
    )
    config.add_arguments(p, NodeConfig)
    p.set_defaults(func=_node)
    node_sub = p.add_subparsers(dest="node_command", metavar="[export|layout|bootstrap|privacy-init|privacy]")
    e = node_sub.add_parser("export", help="write the node's current global model to a folder")
    config.add_arguments(e, NodeConfig)
    e.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    e.add_argument(
        "--round",
        type=int,
        default=None,
        metavar="N",
        help="export round N, if its checkpoint is still kept (default: the current global model)",
    )
    e.set_defaults(func=_node_export)
    e = node_sub.add_parser(
        "layout", help="write the model layout this node joins with (JSON), for `ctl federation init`"
    )
    config.add_arguments(e, NodeConfig)
    e.add_argument("--out", type=Path, required=True, help="JSON file to write the layout to")
    e.set_defaults(func=_node_layout)
    b = node_sub.add_parser(
        "bootstrap",
        help="start this node (stopped) from another member's export at a recent round",
    )
    config.add_arguments(b, NodeConfig)
    b.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        help="checkpoint.pt of `cipherhive node export` (or its folder), or a checkpoint-<round>.pt",
    )
    b.set_defaults(func=_node_bootstrap)
    for name, text in (
        ("privacy-init", "create the privacy ledger of [privacy] dataset (once, before its first DP round)"),
        ("privacy", "show the privacy ledger of [privacy] dataset and the ε it has spent"),
    ):
        b = node_sub.add_parser(name, help=text)
        config.add_arguments(b, NodeConfig)
        b.set_defaults(func=_node_privacy)

    p = sub.add_parser("demo", help="run a local federation of three nodes on real data")
    add_demo_arguments(p)
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "simulate",
        help="run your trainer plug-in in a real local federation (temporary keys, certificates, processes)",
    )
    add_simulate_arguments(p)
    p.set_defaults(func=_simulate)

    p = sub.add_parser("bench", help="measure rounds against plaintext and per-layer TenSEAL baselines")
    add_bench_arguments(p)
    p.set_defaults(func=_bench)

    from cipherhive.ctl.cli import register as register_ctl

    register_ctl(sub)
    certs.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except (UserError, FileExistsError, FileNotFoundError, PermissionError) as exc:
        print(f"cipherhive {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
