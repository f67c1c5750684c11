"""A federation on one machine: keys, certificates, configs and real processes.

The demo and the integration tests both use this, so what the tests check
is exactly what a user sees with `cipherhive demo`: a real server process
and real node processes talking gRPC with mutual TLS over loopback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cipherhive.ckks import keys
from cipherhive.federation.layout import Layout
from cipherhive.pki import certs
from cipherhive.runtime.transport import ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

#: A one-off command (`node layout`, `node export`) still running after this many seconds is stuck:
#: it is killed and reported as failed. Generous, as a plug-in may build a large model.
COMMAND_TIMEOUT = 1800.0
#: How long to wait for a process to be gone once it has been sent SIGKILL.
KILL_WAIT = 60.0


class ProcessFailed(RuntimeError):
    """A process of the federation (or a one-off command such as `node layout`) failed.

    Says which one and where its output is, so a caller can point a person at the log.
    """

    def __init__(self, who: str, code: int | None, log: Path, output: str) -> None:
        self.who, self.code, self.log, self.output = who, code, log, output
        super().__init__(f"{who} exited with {code}:\n{output[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, once DEL (which TOML wants escaped) is escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    """``value`` as TOML (a user's trainer options may hold any JSON but null, which TOML lacks)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        raise ValueError("TOML has no null: leave the option out instead of setting it to null/None")
    return _toml_string(str(value))


def _decoded(output: str | bytes | None) -> str:
    """What a killed command had written (TimeoutExpired holds bytes, or None, even in text mode)."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


@dataclass
class LocalFederation:
    workdir: Path
    nodes: int = 3
    insecure: bool = False
    plugin: str = "cipherhive.demo.digits:DigitsTrainer"
    node_options: dict[str, Any] = field(default_factory=dict)
    #: Options for one node each (index i for node i), on top of ``node_options``.
    per_node_options: list[dict[str, Any]] = field(default_factory=list)
    #: Give every node ``shard`` (its index) and ``shards`` (the node count) as options, as the
    #: built-in demo trainers expect; a user's own plug-in gets only the options it is given.
    shard_options: bool = True
    #: ``[trainer] python_path`` of every node: folders the plug-in is imported from.
    python_path: list[str] = field(default_factory=list)
    #: Nodes log JSON lines (``[log] log_json``), for a caller that reads their logs.
    node_log_json: bool = False
    #: Working directory of every process (default: ``workdir``); relative paths a plug-in
    #: reads are read from here.
    cwd: Path | None = None
    rounds: dict[str, Any] = field(default_factory=dict)
    #: The server's [optimizer] section (empty: FedAvg).
    optimizer: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    #: Module run as ``python -m`` for every process (the benchmark swaps in its launcher).
    launcher: str = "cipherhive"
    #: Environment added to every process.
    env: dict[str, str] = field(default_factory=dict)
    #: Extra keys for the server's [server] and every node's [node] section.
    server_settings: dict[str, Any] = field(default_factory=dict)
    node_settings: dict[str, Any] = field(default_factory=dict)
    #: The server's and every node's [privacy] section (differential privacy; empty: none). A node's
    #: ``dataset`` defaults to "<node name>-data" and its ledger folder to the work directory's.
    server_privacy: dict[str, Any] = field(default_factory=dict)
    node_privacy: dict[str, Any] = field(default_factory=dict)
    #: Extra keys for every node's [masking] section.
    masking_settings: dict[str, Any] = field(default_factory=dict)
    #: The server's [state] section (empty: SQLite in its state directory); e.g. ``database`` and
    #: ``password_file`` for round state in PostgreSQL.
    state_settings: dict[str, Any] = field(default_factory=dict)
    #: Masked rounds (docs/spec/masked-round.md); off only for tests that play members sending
    #: unmasked uploads.
    masked: bool = True
    #: Where nodes dial (a proxy in network-fault tests); default: the server itself.
    node_address: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: The layout the operator pins (tests that play the members); default: node 1's model,
    #: from `cipherhive node layout`, as a user would do it.
    layout: Layout | None = None

    # ------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Keys, a CA with server, node and admin certificates, and config files."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        keydir = self.workdir / "keys"
        if not (keydir / keys.SECRET_FILE).exists():
            keys.keygen(keydir)
        ca = self.workdir / "ca"
        if not self.insecure and not (ca / certs.CA_KEY).exists():
            certs.create_ca(ca)
            certs.issue(ca, "server", "server", self.workdir / "server", hosts=["localhost", "127.0.0.1"])
            certs.issue(ca, "admin", "operator", self.workdir / "admin")
            for i in range(self.nodes):
                certs.issue(ca, "node", self.node_name(i), self.workdir / self.node_name(i))
        for i in range(self.nodes):
            self.write_node_config(i)
        if self.node_privacy:
            self.init_privacy_ledgers()
        self.pin_layout()
        self.write_server_config()

    @property
    def layout_file(self) -> Path:
        return self.workdir / "layout.json"

    def pin_layout(self) -> None:
        """Write the layout the server pins at start (``[federation] layout`` in server.toml).

        Like an operator would: `cipherhive node layout` on a member's configuration (a
        subprocess, so the trainer's imports and model stay out of this process).
        """
        if self.layout is not None:
            self.layout_file.write_text(self.layout.pretty(), encoding="utf-8")
            return
        config = str(self.workdir / f"{self.node_name(0)}.toml")
        self.run_command("layout", ["node", "layout", "--config", config, "--out", str(self.layout_file)])

    def export_model(self, index: int, out: Path) -> Path:
        """`cipherhive node export` of node ``index``'s current global model into ``out`` (a subprocess,
        like `node layout`: the trainer is imported by the node's configuration, not here)."""
        config = str(self.workdir / f"{self.node_name(index)}.toml")
        self.run_command("export", ["node", "export", "--config", config, "--out", str(out)])
        return out

    def run_command(self, what: str, args: list[str], timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``cipherhive ARGS`` to completion, its output in ``WHAT.log``; ProcessFailed if it fails
        or is still running after ``timeout`` seconds (it is killed then)."""
        log = self.workdir / f"{what}.log"
        who = f"`cipherhive {' '.join(args[:2])}`"
        try:
            done = subprocess.run(
                [sys.executable, "-m", "cipherhive", *args],
                capture_output=True,
                text=True,
                env=dict(os.environ, **self.env),
                cwd=self.cwd or self.workdir,
                check=False,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            output = _decoded(exc.stdout) + _decoded(exc.stderr)
            log.write_text(output, encoding="utf-8")
            raise ProcessFailed(f"{who} (killed after {timeout:g} s)", None, log, output) from exc
        log.write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            raise ProcessFailed(who, done.returncode, log, done.stdout + done.stderr)
        return done.stdout

    def node_name(self, index: int) -> str:
        return f"node-{index + 1}"

    def _tls(self, who: str) -> dict[str, Any]:
        if self.insecure:
            return {}
        d = self.workdir / who
        return {
            "tls_cert": str(d / f"{who}.crt"),
            "tls_key": str(d / f"{who}.key"),
            "tls_ca": str(d / "ca.crt"),
        }

    def write_server_config(self) -> None:
        rounds = {
            "min_participants": min(self.nodes, 3),
            "timeout_seconds": 120.0,
            "interval_seconds": 0.2,
            **({} if self.masked else {"masked": False}),
            **self.rounds,
        }
        tls = self._tls("server")
        if tls and (self.workdir / "ca" / certs.CRL).exists():
            tls["tls_crl"] = str(self.workdir / "ca" / certs.CRL)
        write_toml(
            self.workdir / "server.toml",
            {
                "server": {
                    "listen": f"127.0.0.1:{self.port}",
                    "state_dir": str(self.workdir / "server-state"),
                    "public_context": str(self.workdir / "keys" / keys.PUBLIC_FILE),
                    "insecure": self.insecure,
                    "grace_seconds": 5.0,
                    **self.server_settings,
                },
                **({"tls": tls} if tls else {}),
                "federation": {"layout": str(self.layout_file)},
                "rounds": rounds,
                **({"optimizer": self.optimizer} if self.optimizer else {}),
                **({"privacy": self.server_privacy} if self.server_privacy else {}),
                **({"state": self.state_settings} if self.state_settings else {}),
            },
        )

    def write_node_config(self, index: int, **options: Any) -> None:
        name = self.node_name(index)
        own = self.per_node_options[index] if index < len(self.per_node_options) else {}
        shard = {"shard": index, "shards": self.nodes} if self.shard_options else {}
        opts = {**shard, **self.node_options, **own, **options}
        tls = self._tls(name)
        masking: dict[str, Any] = {}
        if tls:
            tls["tls_server_name"] = "localhost"
        if tls and self.masked:
            # Each member pins the federation's membership itself (docs/spec/masked-round.md §2);
            # the CRL is the CA's.
            masking = {
                "members": [self.node_name(i) for i in range(self.nodes)],
                "crl": str(self.workdir / "ca" / certs.CRL),
                **self.masking_settings,
            }
        write_toml(
            self.workdir / f"{name}.toml",
            {
                "node": {
                    "server": self.node_address or f"127.0.0.1:{self.port}",
                    "secret_context": str(self.workdir / "keys" / keys.SECRET_FILE),
                    "state_dir": str(self.workdir / f"{name}-state"),
                    "workers": 1,
                    "insecure": self.insecure,
                    "name": name,
                    "max_backoff_seconds": 2.0,
                    # The nodes' own floor matches the server's (a 2-node demo runs at 2).
                    "min_participants": min(self.nodes, 3, int(self.rounds.get("min_participants", 3))),
                    **self.node_settings,
                },
                **({"tls": tls} if tls else {}),
                **({"masking": masking} if masking else {}),
                **({"log": {"log_json": True}} if self.node_log_json else {}),
                "trainer": {
                    "plugin": self.plugin,
                    **({"python_path": self.python_path} if self.python_path else {}),
                    "options": opts,
                },
                **({"privacy": self.privacy_section(index)} if self.node_privacy else {}),
            },
        )

    def privacy_section(self, index: int) -> dict[str, Any]:
        """Node ``index``'s [privacy] settings (see ``node_privacy``)."""
        return {
            "dataset": f"{self.node_name(index)}-data",
            "ledger_dir": str(self.workdir / "privacy-ledgers"),
            **self.node_privacy,
        }

    def init_privacy_ledgers(self) -> None:
        """Create every node's privacy ledger, as a member does once with `cipherhive node privacy-init`."""
        from cipherhive.node.privacy.ledger import PrivacyLedger, ledger_path

        for i in range(self.nodes):
            section = self.privacy_section(i)
            path = ledger_path(Path(section["ledger_dir"]), section["dataset"])
            if not path.exists():
                PrivacyLedger.init(path, section["dataset"])

    # ------------------------------------------------------------ processes

    def _spawn(
        self, key: str, args: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.workdir / log_name, "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env, **(env or {}))
        proc = subprocess.Popen(
            [sys.executable, "-m", self.launcher, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd or self.workdir,
        )
        log.close()
        self.procs[key] = proc
        return proc

    def start_server(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        args = ["server", "--config", str(self.workdir / "server.toml")]
        return self._spawn("server", args, "server.log", env)

    def start_node(self, index: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        name = self.node_name(index)
        return self._spawn(name, ["node", "--config", str(self.workdir / f"{name}.toml")], f"{name}.log", env)

    def start(self) -> None:
        self.start_server()
        self.wait_serving()
        for i in range(self.nodes):
            self.start_node(i)

    def stop(self, key: str, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        proc = self.procs.get(key)
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(KILL_WAIT)

    def stop_all(self) -> dict[str, int | None]:
        codes = {key: self.stop(key) for key in list(self.procs) if key != "server"}
        codes["server"] = self.stop("server")
        return codes

    def log_file(self, key: str) -> Path:
        return self.workdir / ("server.log" if key == "server" else f"{key}.log")

    def log(self, key: str) -> str:
        path = self.log_file(key)
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------ operator view

    def admin_channel(self) -> grpc.Channel:
        tls = None
        if not self.insecure:
            d = self.workdir / "admin"
            tls = ClientTLS(d / "operator.crt", d / "operator.key", d / "ca.crt", "localhost")
        return channel(f"127.0.0.1:{self.port}", tls)

    def wait_serving(self, timeout: float = 60.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with self.admin_channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                server = self.procs.get("server")
                if server is not None and server.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {server.returncode}:\n{self.log('server')[-3000:]}"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not serving after {timeout}s:\n{self.log('server')[-3000:]}")

    def list_rounds(self) -> list[pb.RoundInfo]:
        """Every round, oldest first (ListRounds pages: newest page first)."""
        pages: list[list[pb.RoundInfo]] = []
        with self.admin_channel() as ch:
            stub, before = pb_grpc.AdminStub(ch), 0
            while True:
                reply = stub.ListRounds(pb.ListRoundsRequest(limit=500, before_round=before), timeout=10)
                pages.append(list(reply.rounds))
                before = reply.next_before_round
                if not before:
                    return [info for page in reversed(pages) for info in page]

    def get_round(self, number: int) -> pb.RoundInfo | None:
        """Round ``number`` as the operator sees it; None while it has not been opened."""
        with self.admin_channel() as ch:
            try:
                info: pb.RoundInfo = pb_grpc.AdminStub(ch).GetRound(
                    pb.GetRoundRequest(round=number), timeout=10
                )
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise
        return info

    def wait_round(self, number: int, timeout: float) -> pb.RoundInfo:
        """Wait until round ``number`` has published its sum (perhaps withdrawn since) or failed."""

        def finished() -> pb.RoundInfo | None:
            for info in self.list_rounds():
                if info.round == number and info.state in (
                    pb.ROUND_SUM_READY,
                    pb.ROUND_FAILED,
                    pb.ROUND_WITHDRAWN,
                ):
                    return info
            return None

        info: pb.RoundInfo = self.wait_for(finished, timeout, f"round {number}")
        return info

    def wait_for(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for key, proc in self.procs.items():
                if proc.poll() is not None and proc.returncode not in (
                    0,
                    -signal.SIGTERM,
                    -signal.SIGKILL,
                ):
                    raise ProcessFailed(key, proc.returncode, self.log_file(key), self.log(key))
            try:
                value = predicate()
            except grpc.RpcError:
                value = None
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
