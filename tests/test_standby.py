"""Integration: an active server and a standby on one PostgreSQL database and one state
directory, real processes over mutual TLS (docs/how-to/operator.md#standby-server).

Nodes and the operator reach "the server" through one address, a TCP proxy that plays the
Kubernetes Service: each new connection goes to the server whose plaintext health port reports
``cipherhive.v1.Aggregation`` SERVING, as a readiness probe keeps a standby (NOT_SERVING) out of
the Service's endpoints. The standby does not listen on its gRPC port until it takes the lease.

* takeover: the active server is killed (SIGKILL) once while uploads are acknowledged and
  others still to come, and once after every upload is in but before the sum is published;
  the other finishes each round, its sum equal to the plaintext FedAvg of the updates, every
  acknowledged submission kept and none counted twice.
* fencing: the active server is paused (SIGSTOP), the standby takes over and publishes, then
  the paused one is resumed (SIGCONT): its store is fenced, it writes nothing and exits 1 with
  a "fenced" line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cipherhive.demo.federation import LocalFederation, free_port
from cipherhive.v1 import federation_pb2 as pb
from tests import postgres
from tests.proxy import TcpProxy

pytestmark = pytest.mark.slow

LEASE = 2.0


@dataclass
class Pair:
    fed: LocalFederation
    dsn: str
    proxy: TcpProxy
    #: name -> (gRPC port, health port)
    ports: dict[str, tuple[int, int]]

    def start(self, name: str, env: dict[str, str] | None = None) -> None:
        args = ["server", "--config", str(self.fed.workdir / f"{name}.toml")]
        self.fed._spawn(name, args, f"{name}.log", env)

    def log(self, name: str) -> str:
        return (self.fed.workdir / f"{name}.log").read_text(errors="replace")

    def wait_log(self, name: str, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            proc = self.fed.procs[name]
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{name} never logged {text!r}:\n{self.log(name)[-3000:]}"
            time.sleep(0.05)

    def db(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(sql, params).fetchall()


def _health(port: int, service: str, timeout: float = 0.5) -> int | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def _ready(ports: dict[str, tuple[int, int]]) -> Callable[[], int | None]:
    """The Service: a new connection goes to the server that is ready (Aggregation SERVING)."""

    def route() -> int | None:
        for port, health in ports.values():
            if _health(health, "cipherhive.v1.Aggregation") == health_pb2.HealthCheckResponse.SERVING:
                return port
        return None

    return route


@contextmanager
def _pair(workdir: Path, max_rounds: int) -> Iterator[Pair]:
    cluster = postgres.cluster()
    if cluster.tcp is None:
        pytest.skip("needs the throwaway cluster's TCP login (CIPHERHIVE_TEST_POSTGRES is set)")
    ports = {name: (free_port(), free_port()) for name in ("server-a", "server-b")}
    proxy = TcpProxy(0, route=_ready(ports))
    fed = LocalFederation(
        workdir,
        nodes=3,
        node_options={"epochs": 1, "record_dir": str(workdir / "records")},
        rounds={"max_rounds": max_rounds},
        node_address=f"127.0.0.1:{proxy.port}",
    )
    try:
        with postgres.database(owner=postgres.LOGIN_ROLE) as dsn:
            host, port = cluster.tcp
            dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
            password = workdir / "database.pw"
            workdir.mkdir(parents=True, exist_ok=True)
            password.write_text(cluster.login_password + "\n", encoding="utf-8")
            password.chmod(0o600)
            fed.setup()
            for name, (grpc_port, health_port) in ports.items():
                fed.port = grpc_port
                fed.server_settings = {"health_listen": f"127.0.0.1:{health_port}"}
                fed.write_server_config()
                text = (workdir / "server.toml").read_text(encoding="utf-8")
                text += (
                    f'\n[state]\ndatabase = "postgresql://{postgres.LOGIN_ROLE}@{host}:{port}/{dbname}"\n'
                    f'password_file = "{password}"\nlease_seconds = {LEASE}\n'
                )
                (workdir / f"{name}.toml").write_text(text, encoding="utf-8")
            fed.port = proxy.port  # the operator's view goes through the Service too
            yield Pair(fed, dsn, proxy, ports)
    finally:
        for key in list(fed.procs):
            with_stopped = fed.procs[key]
            if with_stopped.poll() is None:
                with_stopped.send_signal(signal.SIGCONT)
        fed.stop_all()
        proxy.close()


def _records(workdir: Path, number: int, kind: str) -> list[dict[str, torch.Tensor]]:
    folder = workdir / "records" / f"round-{number}"
    return [torch.load(p, weights_only=True) for p in sorted(folder.glob(f"shard-*.{kind}.pt"))]


def _assert_exact(pair: Pair, number: int) -> None:
    """Round ``number`` published the plaintext FedAvg of exactly the three updates, once each."""
    fed = pair.fed
    fed.wait_for(lambda: len(_records(fed.workdir, number, "applied")) == 3, 90, f"nodes to apply {number}")
    updates = _records(fed.workdir, number, "update")
    assert len(updates) == 3
    total = sum(int(u["samples"]) for u in updates)
    plain = sum(int(u["samples"]) * (u["local"] - u["global"]) for u in updates) / total
    for record in _records(fed.workdir, number, "applied"):
        assert int(record["participants"]) == 3
        assert float((record["mean"] - plain).abs().max()) < 1e-6
    rows = pair.db("SELECT node FROM submissions WHERE round = %s ORDER BY node", (number,))
    assert [r[0] for r in rows] == ["node-1", "node-2", "node-3"]
    assert pair.db("SELECT state, participants FROM rounds WHERE round = %s", (number,)) == [("sum_ready", 3)]


def _kill_when(pair: Pair, name: str, number: int, acknowledged: int) -> set[str]:
    """SIGKILL ``name`` as soon as round ``number`` has ``acknowledged`` submissions in the
    database (acknowledged to their nodes) while it is still open; those submissions."""
    deadline = time.monotonic() + 120
    with psycopg.connect(pair.dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT r.state, (SELECT COUNT(*) FROM submissions s WHERE s.round = r.round) "
                "FROM rounds r WHERE r.round = %s",
                (number,),
            ).fetchone()
            if row is not None and row[1] >= acknowledged:
                break
            assert time.monotonic() < deadline, pair.log(name)[-3000:]
            time.sleep(0.002)
    pair.fed.procs[name].kill()
    pair.fed.procs[name].wait(10)
    state = pair.db("SELECT state FROM rounds WHERE round = %s", (number,))
    assert state == [("open",)], f"round {number} was already {state} when the server was killed"
    return {r[0] for r in pair.db("SELECT node FROM submissions WHERE round = %s", (number,))}


def _standby(pair: Pair, name: str, holder: str, ctl: bool = False) -> None:
    """``name`` waits as a standby: it says for whom, its health says so, its gRPC port is shut."""
    pair.wait_log(name, f"standby: waiting for the lease held by {holder}")
    grpc_port, health_port = pair.ports[name]
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(health_port, "cipherhive.v1.Aggregation", 5) == not_serving
    assert _health(health_port, "cipherhive.standby", 5) == health_pb2.HealthCheckResponse.SERVING
    assert _health(health_port, "cipherhive.live", 5) == health_pb2.HealthCheckResponse.SERVING
    assert _health(grpc_port, "", 1) is None
    if ctl:  # what an operator sees: `cipherhive ctl health` on the health port
        address = f"127.0.0.1:{health_port}"
        done = subprocess.run(
            [sys.executable, "-m", "cipherhive", "ctl", "--insecure", "--server", address, "health"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (done.returncode, done.stdout.strip()) == (
            1,
            "NOT_SERVING (standby: waiting for the lease)",
        ), done


def _holder(pair: Pair, name: str) -> str:
    return f"{os.uname().nodename}/{pair.fed.procs[name].pid}"


@pytest.mark.timeout(300)
def test_the_standby_finishes_the_rounds_of_a_killed_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    with _pair(tmp_path_factory.mktemp("standby"), max_rounds=2) as pair:
        fed = pair.fed
        pair.start("server-a")
        pair.wait_log("server-a", "lease taken")
        # server-b dies (SIGKILL) at its second publish, after writing round 2's sum file,
        # before recording it: after every upload is in, before the sum is published.
        pair.start("server-b", {"CIPHERHIVE_FAILPOINTS": "server.published:2"})
        _standby(pair, "server-b", _holder(pair, "server-a"))
        fed.wait_serving()
        for i in range(fed.nodes):
            fed.start_node(i)

        # Round 1: killed while uploads are coming in (one or two acknowledged, not all).
        acked = _kill_when(pair, "server-a", 1, 1)
        assert 1 <= len(acked) < 3, acked
        started = time.monotonic()
        pair.wait_log("server-b", "server listening", timeout=30)
        takeover = time.monotonic() - started
        assert takeover < LEASE + 10, takeover
        info = fed.wait_round(1, 120)
        assert info.state == pb.ROUND_SUM_READY and info.participants == 3, pair.log("server-b")[-3000:]
        _assert_exact(pair, 1)

        # Round 2: server-a comes back as the standby; server-b dies after every upload is in,
        # before the sum is published.
        pair.start("server-a")
        _standby(pair, "server-a", _holder(pair, "server-b"))
        assert fed.procs["server-b"].wait(120) == -signal.SIGKILL, pair.log("server-b")[-3000:]
        assert "failpoint server.published: killing process" in pair.log("server-b")
        assert pair.db("SELECT state FROM rounds WHERE round = 2") == [("open",)]
        acked = {r[0] for r in pair.db("SELECT node FROM submissions WHERE round = 2")}
        assert acked == {"node-1", "node-2", "node-3"}
        info = fed.wait_round(2, 120)
        assert info.state == pb.ROUND_SUM_READY and info.participants == 3, pair.log("server-a")[-3000:]
        _assert_exact(pair, 2)
        tokens = pair.db("SELECT token FROM leader")
        assert tokens == [(3,)]  # server-a, server-b, server-a again

        # A standby stopped while it waits held nothing: it exits 0 at once.
        pair.start("server-b")
        _standby(pair, "server-b", _holder(pair, "server-a"))
        assert fed.stop("server-b", timeout=10) == 0
        assert "stopped while standby" in pair.log("server-b")
        assert pair.db("SELECT token FROM leader") == [(3,)]


def _snapshot(pair: Pair) -> dict[str, list[tuple[Any, ...]]]:
    tables = ("meta", "nodes", "rounds", "submissions", "outcomes", "members", "offences", "leader")
    return {t: pair.db(f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}


@pytest.mark.timeout(300)
def test_a_paused_server_resumed_after_a_takeover_writes_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with _pair(tmp_path_factory.mktemp("fencing"), max_rounds=2) as pair:
        fed = pair.fed
        pair.start("server-a")
        pair.wait_log("server-a", "lease taken")
        pair.start("server-b")
        _standby(pair, "server-b", _holder(pair, "server-a"), ctl=True)
        fed.wait_serving()
        for i in range(fed.nodes):
            fed.start_node(i)
        assert fed.wait_round(1, 120).state == pb.ROUND_SUM_READY

        paused = fed.procs["server-a"]
        paused.send_signal(signal.SIGSTOP)
        pair.wait_log("server-b", "server listening", timeout=30)
        # Its peers' keepalives would notice the paused server in time; cut them now.
        pair.proxy.cut()
        info = fed.wait_round(2, 120)
        assert info.state == pb.ROUND_SUM_READY and info.participants == 3, pair.log("server-b")[-3000:]
        _assert_exact(pair, 2)
        for i in range(fed.nodes):
            assert fed.stop(fed.node_name(i)) == 0
        assert fed.stop("server-b") == 0
        before = _snapshot(pair)
        assert before["leader"][0][1:3] == (_holder(pair, "server-b"), 2)

        paused.send_signal(signal.SIGCONT)
        assert paused.wait(30) == 1, pair.log("server-a")[-3000:]
        log = pair.log("server-a")
        assert re.search(r"fenced: this server \S+ no longer holds the lease", log), log[-3000:]
        assert _snapshot(pair) == before
