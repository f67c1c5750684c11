"""The Admin and Health calls `cipherhive ctl` makes, with errors mapped to exit codes.

Every failure leaves this module as a :class:`CtlError` carrying the exit
code scripts rely on (see :mod:`cipherhive.ctl.cli`), so the command layer
never has to inspect gRPC status codes itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cipherhive.runtime.transport import ClientTLS, TLSSettings, channel, describe_rpc_error, diagnose_tls
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

EXIT_OK = 0
EXIT_REFUSED = 1  # the server answered, with an error or a "no"
EXIT_USAGE = 2  # bad arguments or local files
EXIT_UNREACHABLE = 3  # no answer: network, TLS handshake, deadline

DEFAULT_SERVER = "127.0.0.1:7443"
DEFAULT_TIMEOUT = 10.0
#: One variable per connection flag (docs/reference/cli.md#cipherhive-ctl); a flag given wins.
ENV_SERVER = "CIPHERHIVE_CTL_SERVER"
ENV_SERVER_NAME = "CIPHERHIVE_CTL_SERVER_NAME"
ENV_CERT = "CIPHERHIVE_CTL_CERT"
ENV_KEY = "CIPHERHIVE_CTL_KEY"
ENV_CA = "CIPHERHIVE_CTL_CA"
ENV_INSECURE = "CIPHERHIVE_CTL_INSECURE"
ENV_TIMEOUT = "CIPHERHIVE_CTL_TIMEOUT"

#: ``error.code`` of failures that carry no gRPC status (docs/reference/cli.md#cipherhive-ctl).
CODE_USAGE = "USAGE"
CODE_TIMEOUT = "TIMEOUT"
CODE_INTERRUPTED = "INTERRUPTED"
CODE_STREAM_ENDED = "STREAM_ENDED"

#: Rounds asked for per ListRounds call (the server's own limit is 500).
PAGE_SIZE = 200

#: Status codes that mean "no answer from the server" rather than "the server said no".
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class CtlError(Exception):
    """A failure to report (a line on stderr, or the JSON error object), with its exit code.

    ``code`` is the gRPC status name when the call failed (NOT_FOUND, UNAVAILABLE, ...) or one
    of the ``CODE_*`` words, so a script can branch on it without parsing ``message``.
    """

    def __init__(self, code: str, message: str, exit_code: int, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code
        self.hint = hint

    def as_dict(self) -> dict[str, object]:
        """The ``--json`` form: one object whatever failed (docs/reference/cli.md#cipherhive-ctl)."""
        return {
            "code": self.code,
            "message": self.message,
            "exit_code": self.exit_code,
            "hint": self.hint,
        }


def usage_error(message: str, hint: str = "") -> CtlError:
    return CtlError(CODE_USAGE, message, EXIT_USAGE, hint)


def _chosen(flag_value: str | None, environ: Mapping[str, str], env: str) -> tuple[str | None, str]:
    """The value and where it came from: the flag if given, else a non-empty variable."""
    if flag_value is not None:
        return flag_value, ""
    value = environ.get(env) or None
    return value, env if value is not None else ""


def _timeout(flag_value: str | None, environ: Mapping[str, str]) -> float:
    """Checked here rather than by argparse so the variable and the flag fail alike (exit 2)."""
    text, source = _chosen(flag_value, environ, ENV_TIMEOUT)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise usage_error(f"{source or '--timeout'}: must be a positive number of seconds, got {text!r}")
    return value


def _insecure(flag_value: bool | None, environ: Mapping[str, str]) -> bool:
    """The spellings ``cipherhive server`` accepts for its boolean variables."""
    if flag_value is not None:
        return flag_value
    text = environ.get(ENV_INSECURE, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise usage_error(f"{ENV_INSECURE}: expected true or false (1/0, yes/no, on/off), got {text!r}")


@dataclass(frozen=True)
class Target:
    """Where and how to connect: resolved from flags, then environment, then defaults."""

    address: str
    tls: ClientTLS | None
    timeout: float

    @classmethod
    def resolve(
        cls,
        server: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        ca: str | None = None,
        server_name: str | None = None,
        insecure: bool | None = None,
        timeout: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Target:
        """Flags (None: not given) win over ``environ`` (default: os.environ), then the defaults.

        The certificate files are checked up front so a typo is reported by name, the flag's or
        the variable's, not as a TLS failure.
        """
        env = os.environ if environ is None else environ
        address = _chosen(server, env, ENV_SERVER)[0] or DEFAULT_SERVER
        seconds = _timeout(timeout, env)
        if _insecure(insecure, env):
            return cls(address, None, seconds)
        paths: dict[str, Path] = {}
        for flag, value, var in (("--cert", cert, ENV_CERT), ("--key", key, ENV_KEY), ("--ca", ca, ENV_CA)):
            chosen, source = _chosen(value, env, var)
            if not chosen:
                raise usage_error(
                    f"{flag} is required: pass {flag} FILE or set {var} (the admin certificate, key "
                    "and federation CA from `cipherhive certs issue --role admin`); use --insecure "
                    f"or {ENV_INSECURE}=1 for a plaintext server"
                )
            name = source or flag
            path = Path(chosen).expanduser()
            if not path.is_file():
                what = "does not exist" if not path.exists() else "is not a file"
                raise usage_error(f"{name} file {str(path)!r} {what}")
            if not os.access(path, os.R_OK):
                raise usage_error(f"{name} file {str(path)!r} is not readable")
            paths[flag] = path
        expected_name = _chosen(server_name, env, ENV_SERVER_NAME)[0] or ""
        tls = ClientTLS(paths["--cert"], paths["--key"], paths["--ca"], expected_name)
        return cls(address, tls, seconds)


#: ctl's names for the TLS settings, so a diagnosis names the flag to change.
CTL_TLS_SETTINGS = TLSSettings(cert="--cert", key="--key", ca="--ca", server_name="--server-name")


def rpc_error(exc: grpc.RpcError, address: str, tls: ClientTLS | None = None) -> CtlError:
    """Map a gRPC failure to exit 3 (no answer) or exit 1 (the server refused).

    With TLS, "no answer" is often a handshake that cannot succeed: the shared
    diagnosis (:func:`cipherhive.runtime.transport.diagnose_tls`, which the node uses too)
    then names the cause and the flag to change.
    """
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    if code in _UNREACHABLE:
        problem = diagnose_tls(address, tls, CTL_TLS_SETTINGS) if tls is not None else None
        if problem is not None:
            return CtlError(
                name,
                f"{describe_rpc_error(exc)} (TLS handshake with {address} fails: {problem.cause})",
                EXIT_UNREACHABLE,
                hint=problem.fix,
            )
        tls_files = (
            ", and the TLS files (--cert/--key/--ca must come from the server's CA; "
            "--server-name must match its certificate)"
            if tls is not None
            else ""
        )
        return CtlError(
            name,
            describe_rpc_error(exc),
            EXIT_UNREACHABLE,
            hint=f"could not reach the server at {address}: check --server, that the server is "
            f"running{tls_files}",
        )
    return CtlError(name, describe_rpc_error(exc), EXIT_REFUSED)


class Client:
    """One channel to the server; each method is one call with the configured deadline."""

    def __init__(self, target: Target) -> None:
        self.target = target
        try:
            self._channel: grpc.Channel = channel(target.address, target.tls)
        except FileNotFoundError as exc:  # read after the check above, e.g. removed meanwhile
            raise usage_error(str(exc)) from exc
        except PermissionError as exc:  # a private key readable by group or others
            raise usage_error(str(exc)) from exc
        except ValueError as exc:  # grpc refuses malformed addresses and PEM files this way
            raise usage_error(f"cannot set up the connection: {exc}") from exc
        self._admin = pb_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.target.timeout)
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.target.address, self.target.tls) from None

    def status(self) -> pb.StatusReply:
        reply: pb.StatusReply = self._unary(self._admin.GetStatus, pb.StatusRequest())
        return reply

    def nodes(self) -> list[pb.NodeInfo]:
        reply: pb.ListNodesReply = self._unary(self._admin.ListNodes, pb.ListNodesRequest())
        return list(reply.nodes)

    def readmit_node(self, name: str) -> pb.NodeInfo:
        reply: pb.NodeInfo = self._unary(self._admin.ReadmitNode, pb.ReadmitNodeRequest(name=name))
        return reply

    def rounds(self, limit: int = 0) -> list[pb.RoundInfo]:
        """The newest ``limit`` rounds (0: all), oldest first, fetched page by page."""
        pages: list[list[pb.RoundInfo]] = []
        count, before = 0, 0
        while True:
            want = PAGE_SIZE if not limit else min(PAGE_SIZE, limit - count)
            request = pb.ListRoundsRequest(limit=want, before_round=before)
            reply: pb.ListRoundsReply = self._unary(self._admin.ListRounds, request)
            pages.append(list(reply.rounds))
            count += len(reply.rounds)
            before = reply.next_before_round
            if not before or not reply.rounds or (limit and count >= limit):
                break
        return [info for page in reversed(pages) for info in page]

    def round(self, number: int) -> pb.RoundInfo:
        reply: pb.RoundInfo = self._unary(self._admin.GetRound, pb.GetRoundRequest(round=number))
        return reply

    def start_round(self, timeout_seconds: float = 0.0, force: bool = False) -> pb.RoundInfo:
        request = pb.StartRoundRequest(timeout_seconds=timeout_seconds, force=force)
        reply: pb.RoundInfo = self._unary(self._admin.StartRound, request)
        return reply

    def withdraw_round(self, number: int, reason: str) -> pb.RoundInfo:
        request = pb.WithdrawRoundRequest(round=number, reason=reason)
        reply: pb.RoundInfo = self._unary(self._admin.WithdrawRound, request)
        return reply

    def set_layout(self, layout: pb.Layout, replace: bool = False) -> pb.LayoutReply:
        request = pb.SetLayoutRequest(layout=layout, replace=replace)
        reply: pb.LayoutReply = self._unary(self._admin.SetLayout, request)
        return reply

    def reset_layout(self) -> pb.LayoutReply:
        reply: pb.LayoutReply = self._unary(self._admin.ResetLayout, pb.ResetLayoutRequest())
        return reply

    def close_round(self, number: int) -> pb.RoundInfo:
        reply: pb.RoundInfo = self._unary(self._admin.CloseRound, pb.CloseRoundRequest(round=number))
        return reply

    def health(self, service: str = "") -> str:
        """The status name (SERVING, NOT_SERVING, …) the server reports for ``service``."""
        try:
            reply = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.target.timeout
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # the health service sends no details
                raise CtlError(
                    "NOT_FOUND",
                    f"NOT_FOUND: the server reports no health for service {service!r} (known: '' for the "
                    "whole server, cipherhive.v1.Admin, cipherhive.v1.Aggregation)",
                    EXIT_REFUSED,
                ) from None
            raise rpc_error(exc, self.target.address, self.target.tls) from None
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return name

    def watch(self, since_round: int | None = None) -> EventStream:
        """Replay after ``since_round`` (None: only the open round), then live events, without deadline."""
        # A unary call first: an unreachable server or a refused certificate fails within
        # --timeout with the server's own message instead of the stream waiting to connect.
        status = self.status()
        if since_round is None:
            since_round = status.latest_round
        try:
            call = self._admin.WatchEvents(pb.WatchRequest(since_round=since_round))
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.target.address, self.target.tls) from None
        return EventStream(call, self.target.address, self.target.tls)


class EventStream:
    """Iterates a WatchEvents call, mapping errors, and can be cancelled from the consumer."""

    def __init__(self, call: Any, address: str, tls: ClientTLS | None = None) -> None:
        self._call = call
        self._address = address
        self._tls = tls
        self._cancelled = False

    def __iter__(self) -> Iterator[pb.RoundEvent]:
        try:
            for item in self._call:
                event: pb.RoundEvent = item
                yield event
        except grpc.RpcError as exc:
            if self._cancelled:
                return  # we cancelled it ourselves (count reached, Ctrl-C)
            raise rpc_error(exc, self._address, self._tls) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()
