"""`cipherhive ctl`: the operator's command line for a running aggregator.

It speaks the server's `Admin` and `grpc.health.v1.Health` services with the
operator's admin certificate (`cipherhive certs issue --role admin`), prints
tables for people and, with --json, JSON for scripts. Scripts can rely on
the exit codes below, so a cron job or a Docker HEALTHCHECK never has to
parse messages.

Exit codes:
  0  success; for `health`, the service is SERVING
  1  the server answered but refused or failed the request, printed as
     `cipherhive ctl: error: CODE: details` (NOT_FOUND, PERMISSION_DENIED,
     FAILED_PRECONDITION, ...); for `health`, any status but SERVING
  2  usage error, or a local file is missing or unusable (which one is named):
     --cert, --key, --ca, the directory of report --out
  3  the server could not be reached (UNAVAILABLE, DEADLINE_EXCEEDED, which
     includes a failed TLS handshake), or it ended a `watch` stream: check
     --server, that the server runs, and the certificates

`round wait N` exits with the round's outcome: 0 published, 1 failed or
withdrawn, 3 the server could not be reached or --timeout passed first.

With --json, a failure is one JSON object on stdout (nothing on stderr), with
the same exit code: {"error": {"code": "NOT_FOUND", "message": "...",
"exit_code": 1, "hint": "..."}}; `round wait` and `health` add this "error"
key to their usual JSON when the exit code is not 0.

Environment (a flag given wins over its variable):
  CIPHERHIVE_CTL_SERVER       --server
  CIPHERHIVE_CTL_SERVER_NAME  --server-name
  CIPHERHIVE_CTL_CERT         --cert
  CIPHERHIVE_CTL_KEY          --key
  CIPHERHIVE_CTL_CA           --ca
  CIPHERHIVE_CTL_INSECURE     --insecure (1/0, true/false, yes/no, on/off)
  CIPHERHIVE_CTL_TIMEOUT      --timeout

Connection flags and --json may go before or after the sub-command, at any
level (`ctl --json round show 2` = `ctl round show 2 --json`); `round start`
and `round wait` have a --timeout of their own, so there the call deadline
goes before the sub-command (or in CIPHERHIVE_CTL_TIMEOUT).

Example:
  cipherhive ctl --server agg.example.com:7443 --cert operator/operator.crt \\
      --key operator/operator.key --ca operator/ca.crt rounds --limit 10
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from cipherhive.ctl import render
from cipherhive.ctl.client import (
    CODE_INTERRUPTED,
    CODE_STREAM_ENDED,
    DEFAULT_SERVER,
    DEFAULT_TIMEOUT,
    ENV_CA,
    ENV_CERT,
    ENV_INSECURE,
    ENV_KEY,
    ENV_SERVER,
    ENV_SERVER_NAME,
    ENV_TIMEOUT,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Client,
    CtlError,
    Target,
    usage_error,
)
from cipherhive.ctl.report import render_report
from cipherhive.ctl.wait import outcome, outcome_error, wait_for_round
from cipherhive.federation.layout import Layout, LayoutError
from cipherhive.v1 import federation_pb2 as pb

Handler = Callable[[Client, argparse.Namespace], int]

PROG = "cipherhive ctl"

#: Namespace attributes of the connection flags; each is absent unless its flag was given.
CONNECTION = ("server", "server_name", "cert", "key", "ca", "insecure", "timeout")


def _epilog() -> str:
    """The exit codes, environment and example from this module's docstring: one source of truth."""
    doc = __doc__ or ""
    return doc[doc.index("Exit codes:") :].strip() if "Exit codes:" in doc else ""


# ---------------------------------------------------------------- argument types


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


# ---------------------------------------------------------------- parsers


def _asks_json(words: Sequence[str]) -> bool:
    """Whether --json is among ``words`` (as an option: not after a ``--``)."""
    for word in words:
        if word == "--":
            return False
        if word == "--json":
            return True
    return False


class CtlParser(argparse.ArgumentParser):
    """The parser of each ctl sub-command: under --json, its usage errors are the JSON error too.

    Its sub-commands are :class:`_Commands`, which tell it before it parses whether --json
    was given anywhere on the line (docs/reference/cli.md#cipherhive-ctl).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Commands)
        self.json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            problem = usage_error(message, hint=f"see `{self.prog} --help`")
            print(render.dumps({"error": problem.as_dict()}))
            self.exit(EXIT_USAGE)
        super().error(message)


if TYPE_CHECKING:
    _SubCommands = argparse._SubParsersAction[CtlParser]
else:  # not subscriptable at run time
    _SubCommands = argparse._SubParsersAction


class _Commands(_SubCommands):
    """Sub-commands that learn, before they parse, whether --json was asked for.

    argparse parses a sub-command into a namespace of its own, so without this a sub-command
    would not know of a --json given before it when it reports a usage error; and an
    unrecognized argument would be reported by the top-level `cipherhive` parser, as text.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        words = [str(v) for v in values] if isinstance(values, list) else []
        chosen = self.choices.get(words[0]) if isinstance(self.choices, dict) and words else None
        wants_json = (
            bool(getattr(namespace, "json", False))
            or bool(getattr(parser, "json_errors", False))
            or _asks_json(words[1:])
        )
        if isinstance(chosen, CtlParser):
            chosen.json_errors = wants_json
        super().__call__(parser, namespace, values, option_string)
        extras = getattr(namespace, argparse._UNRECOGNIZED_ARGS_ATTR, None)
        if wants_json and extras and isinstance(chosen, CtlParser):
            chosen.error(f"unrecognized arguments: {' '.join(extras)}")


def _options(call_timeout: bool = True) -> CtlParser:
    """The connection flags and --json, for `ctl` and every sub-command (argparse parents).

    Every default is SUPPRESS: a flag not given leaves no attribute, so a sub-command never
    resets what was given before it, and :class:`Target` applies variable, then default.
    """
    parser = CtlParser(add_help=False, argument_default=argparse.SUPPRESS)
    group = parser.add_argument_group("connection (before or after the sub-command)")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"aggregator address (env {ENV_SERVER}; default {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help=f"host name to expect in the server certificate, if not the one in --server "
        f"(env {ENV_SERVER_NAME})",
    )
    group.add_argument("--cert", metavar="FILE", help=f"admin certificate, PEM (env {ENV_CERT})")
    group.add_argument("--key", metavar="FILE", help=f"admin private key, PEM (env {ENV_KEY})")
    group.add_argument("--ca", metavar="FILE", help=f"federation CA certificate, PEM (env {ENV_CA})")
    group.add_argument(
        "--insecure",
        action=argparse.BooleanOptionalAction,
        help="plaintext, no certificates: a server started with --insecure, or its health_listen "
        f"port (env {ENV_INSECURE}=1; --no-insecure overrides it)",
    )
    if call_timeout:
        group.add_argument(
            "--timeout",
            metavar="SECONDS",
            help=f"deadline of each call (env {ENV_TIMEOUT}; default {DEFAULT_TIMEOUT:g})",
        )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON for scripts, errors included (before or after the sub-command)",
    )
    return parser


def _leaf(
    sub: argparse._SubParsersAction[CtlParser],
    name: str,
    handler: Handler,
    help_text: str,
    *,
    call_timeout: bool = True,
    lines: bool = False,
) -> CtlParser:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=help_text[:1].upper() + help_text[1:] + ".",
        parents=[_options(call_timeout)],
    )
    parser.set_defaults(func=_command(handler, lines=lines))
    return parser


def _group(
    sub: argparse._SubParsersAction[CtlParser], name: str, help_text: str, description: str
) -> CtlParser:
    """A sub-command with actions of its own (`round`, `federation`); it takes the flags too."""
    return sub.add_parser(name, help=help_text, description=description, parents=[_options()])


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``ctl`` command and its sub-commands to the cipherhive CLI."""
    ctl = subparsers.add_parser(
        "ctl",
        help="operate a running server: status, nodes, rounds, layout, events, health, report",
        description="Query and steer a running aggregator through its Admin gRPC service.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_options()],
    )
    sub = ctl.add_subparsers(
        dest="ctl_command", metavar="COMMAND", required=True, parser_class=CtlParser, action=_Commands
    )

    _leaf(sub, "status", _status, "show the server's version, settings, nodes online and latest rounds")
    nodes_parser = _leaf(
        sub, "nodes", _nodes, "list the member nodes the server knows, online or not, and whom it named"
    )
    nodes_sub = nodes_parser.add_subparsers(dest="nodes_command", metavar="ACTION")
    p = _leaf(
        nodes_sub,
        "readmit",
        _nodes_readmit,
        "lift a member's exclusion after missed or refused steps and forget its earlier offences",
    )
    p.add_argument("name", metavar="NAME", help="the member's name (as `ctl nodes` lists it)")

    p = _leaf(sub, "rounds", _rounds, "list rounds with participants, duration and mean accuracy/loss")
    p.add_argument(
        "--limit", type=_int_at_least(0), default=0, metavar="N", help="most recent N (default: all)"
    )

    round_parser = _group(sub, "round", "show, start, close or withdraw one round", "One round.")
    round_sub = round_parser.add_subparsers(dest="round_command", metavar="ACTION", required=True)
    p = _leaf(round_sub, "show", _round_show, "show a round's details and each node's submission")
    p.add_argument("number", type=_int_at_least(1), metavar="N", help="round number")
    p = _leaf(
        round_sub, "start", _round_start, "open a round now (refused while one is open)", call_timeout=False
    )
    p.add_argument(
        "--timeout",
        dest="round_timeout",
        type=_positive_float,
        default=0.0,
        metavar="SECONDS",
        help="close this round after SECONDS (default: the server's round timeout); "
        "the call's own deadline is `ctl --timeout`",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="open it even with fewer online nodes than the participation floor (it will likely fail)",
    )
    p = _leaf(
        round_sub,
        "wait",
        _round_wait,
        "wait until a round ends; exit 0 published, 1 failed or withdrawn, 3 unreachable or timed out",
        call_timeout=False,
    )
    p.add_argument("number", type=_int_at_least(1), metavar="N", help="round number (may not be open yet)")
    p.add_argument(
        "--timeout",
        dest="wait_timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="give up after SECONDS with exit 3 (default: wait as long as it takes); "
        "each call's own deadline is `ctl --timeout`",
    )
    p = _leaf(round_sub, "close", _round_close, "close the open round now: publish its sum or fail it")
    p.add_argument("number", type=_int_at_least(1), metavar="N", help="round number")
    p = _leaf(
        round_sub,
        "withdraw",
        _round_withdraw,
        "withdraw a published round (and the rounds built on it): nodes roll it back",
    )
    p.add_argument("number", type=_int_at_least(1), metavar="N", help="round number")
    p.add_argument(
        "--reason", required=True, metavar="TEXT", help="why, 1-200 characters (shown to every node)"
    )

    fed_parser = _group(
        sub,
        "federation",
        "pin or reset the federation's model layout",
        "The federation's model layout, pinned by the operator.",
    )
    fed_sub = fed_parser.add_subparsers(dest="federation_command", metavar="ACTION", required=True)
    p = _leaf(
        fed_sub,
        "init",
        _federation_init,
        "pin the model layout (JSON from `cipherhive node layout`) every member must join with",
    )
    p.add_argument("--layout", type=Path, required=True, metavar="FILE", help="layout JSON file")
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace a different pinned layout (refused once a round has been published)",
    )
    _leaf(
        fed_sub, "reset", _federation_reset, "forget the pinned layout (refused once a round was published)"
    )

    p = _leaf(
        sub, "watch", _watch, "follow round events live, one line each (Ctrl-C stops, exit 0)", lines=True
    )
    p.add_argument(
        "--since",
        type=_int_at_least(0),
        default=None,
        metavar="N",
        help="first replay finished rounds after round N (default: live events only)",
    )
    p.add_argument(
        "--count",
        type=_int_at_least(1),
        default=0,
        metavar="K",
        help="stop after K events, heartbeats not counted (default: follow until Ctrl-C)",
    )
    p.add_argument(
        "--with-blobs",
        action="store_true",
        help="with --json, keep each masked round's roster entries and commits (base64, a few KB "
        "per event); by default they are left out, replaced by their counts and the roster hash",
    )

    p = _leaf(sub, "health", _health, "check grpc.health.v1: exit 0 if SERVING, else 1")
    p.add_argument("--service", default="", metavar="NAME", help='service name (default "": the server)')

    p = _leaf(sub, "report", _report, "write one self-contained HTML file with per-round charts")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="HTML file to write")
    p.add_argument(
        "--limit", type=_int_at_least(0), default=0, metavar="N", help="most recent N (default: all)"
    )


# ---------------------------------------------------------------- dispatch


def _fail(exc: CtlError, as_json: bool, lines: bool = False) -> int:
    """Text on stderr for people; under --json one object on stdout, where the script reads."""
    if as_json:
        print(render.dumps({"error": exc.as_dict()}, lines=lines), flush=True)
        return exc.exit_code
    print(f"{PROG}: error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"{PROG}: hint: {exc.hint}", file=sys.stderr)
    return exc.exit_code


def _command(handler: Handler, lines: bool = False) -> Callable[[argparse.Namespace], int]:
    """Resolve the connection, run ``handler``, turn every CtlError into its exit code.

    ``lines``: the command prints JSON Lines (watch), so its error is one line too.
    """

    def run(args: argparse.Namespace) -> int:
        args.json = bool(getattr(args, "json", False))
        given = {name: getattr(args, name) for name in CONNECTION if hasattr(args, name)}
        try:
            target = Target.resolve(**given)
            with Client(target) as client:
                return handler(client, args)
        except CtlError as exc:
            return _fail(exc, args.json, lines)
        except BrokenPipeError:
            # `ctl watch | head -1`: the reader has what it wanted; no traceback for that.
            _silence_stdout()
            return EXIT_OK

    return run


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def _status(client: Client, args: argparse.Namespace) -> int:
    status = client.status()
    if args.json:
        print(render.dumps(render.status_dict(status)))
    else:
        render.print_status(render.make_console(), status)
    return EXIT_OK


def _emit(args: argparse.Namespace, value: Any, as_dict: Any, as_table: Any) -> int:
    """JSON for scripts, a table for people: the same data either way."""
    if args.json:
        print(render.dumps(as_dict(value)))
    else:
        as_table(render.make_console(), value)
    return EXIT_OK


def _nodes(client: Client, args: argparse.Namespace) -> int:
    return _emit(args, client.nodes(), render.nodes_dict, render.print_nodes)


def _nodes_readmit(client: Client, args: argparse.Namespace) -> int:
    info = client.readmit_node(args.name)
    return _emit(args, [info], render.nodes_dict, render.print_nodes)


def _rounds(client: Client, args: argparse.Namespace) -> int:
    return _emit(args, client.rounds(args.limit), render.rounds_dict, render.print_rounds)


def _round_show(client: Client, args: argparse.Namespace) -> int:
    return _emit(args, client.round(args.number), render.round_dict, render.print_round)


def _round_start(client: Client, args: argparse.Namespace) -> int:
    info = client.start_round(args.round_timeout, force=args.force)
    print(render.dumps(render.round_dict(info)) if args.json else render.round_line("opened", info))
    return EXIT_OK


def _round_withdraw(client: Client, args: argparse.Namespace) -> int:
    info = client.withdraw_round(args.number, args.reason)
    print(render.dumps(render.round_dict(info)) if args.json else render.round_line("withdrawn", info))
    return EXIT_OK


def _federation_init(client: Client, args: argparse.Namespace) -> int:
    try:
        layout = Layout.read_file(args.layout)
    except LayoutError as exc:
        raise usage_error(f"--layout: {exc}") from None
    reply = client.set_layout(layout.to_proto(), args.replace)
    if args.json:
        print(render.dumps(render.message_dict(reply)))
    else:
        print(
            f"layout pinned: {reply.layout_hash} ({reply.num_params} values in {reply.num_tensors} tensors)"
        )
    return EXIT_OK


def _federation_reset(client: Client, args: argparse.Namespace) -> int:
    reply = client.reset_layout()
    print(render.dumps(render.message_dict(reply)) if args.json else "layout reset: no layout is pinned")
    return EXIT_OK


def _round_wait(client: Client, args: argparse.Namespace) -> int:
    try:
        info = wait_for_round(client, args.number, args.wait_timeout)
    except KeyboardInterrupt:
        raise CtlError(
            CODE_INTERRUPTED, f"interrupted before round {args.number} ended", EXIT_UNREACHABLE
        ) from None
    word, code = outcome(info)
    if args.json:
        data = {**render.round_dict(info), "outcome": word}
        failed = outcome_error(info)
        if failed is not None:
            data["error"] = failed.as_dict()
        print(render.dumps(data))
    else:
        render.print_round(render.make_console(), info)
    return code


def _round_close(client: Client, args: argparse.Namespace) -> int:
    info = client.close_round(args.number)
    print(render.dumps(render.round_dict(info)) if args.json else render.round_line("closed", info))
    return EXIT_OK


@contextlib.contextmanager
def _cancelled_on_ctrl_c(stream: Any) -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) or SIGTERM ends a watch by cancelling its stream, from another thread.

    Python's default raises KeyboardInterrupt wherever the main thread is, possibly inside
    gRPC's stream code while it holds the stream's lock; the cancel that followed then waited
    for that lock for ever. The handler only starts the cancel; the loop ends with CANCELLED.
    """
    interrupted = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        if not interrupted.is_set():
            interrupted.set()
            threading.Thread(target=stream.cancel, name="cancel-watch", daemon=True).start()

    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupted
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _watch(client: Client, args: argparse.Namespace) -> int:
    stream = client.watch(args.since)
    seen = 0
    with _cancelled_on_ctrl_c(stream) as interrupted:
        try:
            for event in stream:
                if event.kind == pb.RoundEvent.HEARTBEAT:
                    continue
                line = (
                    render.dumps(render.event_dict(event, with_blobs=args.with_blobs), lines=True)
                    if args.json
                    else render.event_line(event)
                )
                print(line, flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    stream.cancel()
                    return EXIT_OK
        except KeyboardInterrupt:  # not in the main thread: no handler of ours
            stream.cancel()
            return EXIT_OK
        except grpc.RpcError:
            if interrupted.is_set():
                return EXIT_OK
            raise
        if interrupted.is_set():
            return EXIT_OK
    raise CtlError(
        CODE_STREAM_ENDED, "the server ended the event stream (is it shutting down?)", EXIT_UNREACHABLE
    )


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    code = EXIT_OK if status == "SERVING" else EXIT_REFUSED
    # A standby server (docs/how-to/operator.md#standby-server) is not serving, on purpose.
    standby = code != EXIT_OK and not args.service and _is_standby(client)
    if args.json:
        data: dict[str, Any] = {"service": args.service, "status": status}
        if standby:
            data["standby"] = True
        if code != EXIT_OK:
            why = " (a standby, waiting for the lease)" if standby else ""
            data["error"] = CtlError(status, f"service {args.service!r} is {status}{why}", code).as_dict()
        print(render.dumps(data))
    else:
        print(f"{status} (standby: waiting for the lease)" if standby else status)
    return code


def _is_standby(client: Client) -> bool:
    try:
        return client.health("cipherhive.standby") == "SERVING"
    except CtlError:
        return False


def _report(client: Client, args: argparse.Namespace) -> int:
    out: Path = args.out
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise usage_error(f"--out: directory {str(folder)!r} does not exist")
    if out.is_dir():
        raise usage_error(f"--out: {str(out)!r} is a directory; give a file name")
    status = client.status()
    rounds = client.rounds(args.limit)
    document = render_report(rounds, status)
    _write_atomically(out, document)
    if args.json:
        print(render.dumps({"out": str(out), "rounds": len(rounds)}))
    else:
        print(f"wrote {out} ({len(rounds)} round{'s' if len(rounds) != 1 else ''})")
    return EXIT_OK


def _write_atomically(path: Path, text: str) -> None:
    """Write next to the target then rename, so a browser never opens half a report."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise usage_error(f"--out: cannot write {str(path)!r}: {exc.strerror or exc}") from exc
