"""The `cipherhive` command: one entry point, one sub-command per job.

Heavy imports (torch, the daemons) happen inside each sub-command so that
`cipherhive --help` and `cipherhive keygen` start fast, and so that the server,
`ctl`, `keygen` and `certs` run on the bare package, without the `node` extra
(torch); a command that needs it says so up front (cipherhive.extras). Every error a user
can fix is printed as one line, ``cipherhive <command>: error: …``, with
exit code 2; tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from cipherhive import __version__, extras
from cipherhive.pki import certs
from cipherhive.runtime.errors import UserError


def _keygen(args: argparse.Namespace) -> int:
    from cipherhive.ckks import keys

    files = keys.keygen(args.out, force=args.force)
    print(f"secret context (member nodes only, mode 0600): {files.secret}")
    print(f"public context (the server):                   {files.public}")
    print(f"fingerprint: {files.fingerprint}")
    return 0


def _server_start_up_guard(words: Sequence[str]) -> threading.Event | None:
    """For `cipherhive server`: a stop signal during start-up (parsing, imports, recovery,
    starting the ingest workers) is kept, and honoured once the server is built: exit 0, its
    workers ended (docs/reference/exit-codes.md). Installed before anything slow."""
    if not words or words[0] != "server" or "migrate-state" in words[1:]:
        return None
    stopped = threading.Event()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda _s, _f: stopped.set())
    return stopped


def _server(args: argparse.Namespace) -> int:
    stopped: threading.Event = getattr(args, "stopped", None) or threading.Event()
    from cipherhive.runtime import config, logs
    from cipherhive.server.config import ServerConfig
    from cipherhive.server.daemon import Server, StoppedInStandby

    cfg = config.load(ServerConfig, args)
    logs.setup(cfg.log_level, cfg.log_json, cfg.audit_file)
    if stopped.is_set():
        return 0
    try:
        # It holds its state directory (StateDirLock), or with PostgreSQL the lease, for
        # which a standby waits here (docs/how-to/operator.md#standby-server).
        server = Server(cfg, stopped=stopped)
    except StoppedInStandby:
        logs.event(logging.getLogger("cipherhive.server"), "stopped while standby")
        return 0
    return server.serve_forever(stopped)


def _server_migrate_state(args: argparse.Namespace) -> int:
    from cipherhive.server.storage.migrate_state import run

    return run(args)


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
    drift = args.scaffold or args.proximal_mu != 0.0
    if (drift or args.drift_table) and (args.task != "digits" or args.dp):
        print(
            "cipherhive demo: error: --drift-table, --scaffold and --proximal-mu work with the digits "
            "task without --dp only; in a federation of your own they are options of the built-in "
            "torch trainer, DP included (docs/reference/client-drift.md)",
            file=sys.stderr,
        )
        return 2
    if args.proximal_mu < 0:
        print("cipherhive demo: error: --proximal-mu must be 0 (off) or positive", file=sys.stderr)
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


def _node_key(args: argparse.Namespace) -> int:
    from cipherhive.node.config import NodeConfig
    from cipherhive.node.crypto import federation_key
    from cipherhive.pki.key_transfer import KeyTransferError
    from cipherhive.runtime import config, logs

    cfg = config.load(NodeConfig, args)
    logs.setup(cfg.log_level, cfg.log_json)
    try:
        if args.node_command == "key-request":
            print(federation_key.request(cfg, args.public_context, args.out))
        elif args.node_command == "key-grant":
            print(federation_key.grant(cfg, args.request, args.out))
        else:
            print(federation_key.accept(cfg, args.grant, args.public_context))
    except KeyTransferError as exc:
        raise UserError(f"refused: {exc}") from None
    return 0


def _node_report(args: argparse.Namespace) -> int:
    from cipherhive.node.config import NodeConfig
    from cipherhive.node.report import render_node_report
    from cipherhive.node.report_figures import read_figures
    from cipherhive.runtime import config, logs
    from cipherhive.runtime.fsutil import atomic_write

    cfg = config.load(NodeConfig, args)
    logs.setup(cfg.log_level, cfg.log_json)
    out: Path = args.out
    if not out.parent.is_dir():
        raise UserError(f"--out: directory {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise UserError(f"--out: {str(out)!r} is a directory; give a file name")
    # Reads only, without the state directory's lock: the running node keeps it.
    figures = read_figures(cfg)
    # 0600: the decrypted figures are the member's, like its log.
    atomic_write(out, render_node_report(figures).encode("utf-8"), mode=0o600)
    count = len(figures.rounds)
    print(f"wrote {out} ({count} round{'s' if count != 1 else ''})")
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

    p = sub.add_parser("server", help="run the aggregator daemon (or: server migrate-state)")
    config.add_arguments(p, ServerConfig)
    p.set_defaults(func=_server)
    m = p.add_subparsers(dest="server_command", metavar="[migrate-state]").add_parser(
        "migrate-state", help="move a stopped server's round state from SQLite to an empty PostgreSQL"
    )
    config.add_arguments(m, ServerConfig)
    m.add_argument(
        "--to",
        metavar="URL",
        help="the empty PostgreSQL database, postgresql://user@host:5432/dbname (default: [state] "
        "database); the password comes from [state] password_file or PGPASSWORD",
    )
    m.set_defaults(func=_server_migrate_state)

    p = sub.add_parser(
        "node",
        help="run a member node daemon (or: node export|layout|bootstrap|privacy-init|privacy|report|"
        "key-request|key-grant|key-accept)",
    )
    config.add_arguments(p, NodeConfig)
    p.set_defaults(func=_node)
    node_sub = p.add_subparsers(
        dest="node_command",
        metavar="[export|layout|bootstrap|privacy-init|privacy|report|key-request|key-grant|key-accept]",
    )
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
    k = node_sub.add_parser(
        "key-request",
        help="a new member asks for the federation key: write a signed request (then key-accept)",
    )
    config.add_arguments(k, NodeConfig)
    k.add_argument("--public-context", type=Path, required=True, help="the federation's public.ctx")
    k.add_argument("--out", type=Path, required=True, help="the request file to give a member")
    k.set_defaults(func=_node_key)
    k = node_sub.add_parser(
        "key-grant", help="seal this member's federation key to a new member's checked request"
    )
    config.add_arguments(k, NodeConfig)
    k.add_argument("--request", type=Path, required=True, help="the new member's request file")
    k.add_argument("--out", type=Path, required=True, help="the grant file to give back")
    k.set_defaults(func=_node_key)
    k = node_sub.add_parser(
        "key-accept", help="open and check a grant; write secret.ctx ([node] secret_context)"
    )
    config.add_arguments(k, NodeConfig)
    k.add_argument("--grant", type=Path, required=True, help="the grant file a member wrote")
    k.add_argument("--public-context", type=Path, required=True, help="the federation's public.ctx")
    k.set_defaults(func=_node_key)
    r = node_sub.add_parser(
        "report",
        help="write this member's own report (HTML): the evaluation it decrypted, ε, applied and "
        "rejected rounds; runs beside the node",
    )
    config.add_arguments(r, NodeConfig)
    r.add_argument("--out", type=Path, required=True, help="HTML file to write the report to")
    r.set_defaults(func=_node_report)

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


#: Commands that train or run member nodes: they need the `node` extra (torch and the rest); the
#: server, `ctl`, `keygen` and `certs` run on the bare package.
NODE_ROLE_COMMANDS = frozenset({"node", "demo", "simulate", "bench"})


#: `cipherhive node`'s one-off sub-commands; any other `cipherhive node …` runs the daemon.
NODE_TOOLS = frozenset(
    {
        "export",
        "layout",
        "bootstrap",
        "privacy-init",
        "privacy",
        "report",
        "key-request",
        "key-grant",
        "key-accept",
    }
)


def _runs_node_daemon(words: Sequence[str]) -> bool:
    return bool(words) and words[0] == "node" and not NODE_TOOLS.intersection(words[1:])


def _interrupted(interrupt: KeyboardInterrupt, node_daemon: bool) -> int:
    """Ctrl-C before a command's own handling: 130, but the node daemon exits cleanly (0)."""
    if not node_daemon:
        return 130
    from cipherhive.node import stopping

    return stopping.stopped_at_start_up(interrupt)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The stop signal behind an ImportError, if one caused it: a signal that lands while a C
    extension initialises (TenSEAL's, torch's) surfaces as "initialization failed", and the
    module's fallback import then fails again; the signal is in the chain of causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    node_daemon = _runs_node_daemon(sys.argv[1:] if argv is None else argv)
    server_stopped = _server_start_up_guard(sys.argv[1:] if argv is None else argv)
    if node_daemon:  # stop signals handled before the slow imports (docs/reference/exit-codes.md)
        from cipherhive.node import stopping

        stopping.guard_start_up()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt as interrupt:
        return _interrupted(interrupt, node_daemon)
    except ImportError as exc:
        if (behind := _interrupt_behind(exc)) is None:
            raise
        return _interrupted(behind, node_daemon)
    if server_stopped is not None:
        args.stopped = server_stopped
    try:
        if args.command in NODE_ROLE_COMMANDS:  # before they import torch
            task = getattr(args, "task", "")
            extras.require("lora" if task == "lora" else "node", "this command")
        code: int = args.func(args)
        return code
    except (UserError, FileExistsError, FileNotFoundError, PermissionError) as exc:
        print(f"cipherhive {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        return _interrupted(interrupt, node_daemon)
    except ImportError as exc:
        if (behind := _interrupt_behind(exc)) is None:
            raise
        return _interrupted(behind, node_daemon)


if __name__ == "__main__":
    sys.exit(main())
