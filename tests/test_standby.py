"""Integration: an active server and a standby on one PostgreSQL database and one state
directory, real processes over mutual TLS (docs/how-to/operator.md#standby-server).

Nodes and the operator reach "the server" through one address, a TCP proxy that plays the
Kubernetes Service: each new connection goes to the server whose plaintext health port reports
``cipherhive.v1.Aggregation`` SERVING, as a readiness probe keeps a standby (NOT_SERVING) out of
the Service's endpoints. The standby does not listen on its gRPC port until it takes the lease.

* takeover: one federation, five masked rounds, the active server killed (SIGKILL) at a
  different phase of each and coming back as the standby of the one that took over:
  round 1 while uploads are acknowledged and others still to come (from outside);
  round 2 after every upload and commit, the sum file written but not recorded
  (``server.published``); round 3 once the roster is fixed, before any upload
  (``server.roster``); round 4 once the last commit and the release phase are recorded, before
  any self-mask seed (``server.committed``); round 5 in the release step, one seed of three
  recorded (``server.released``). Each time the standby takes the lease, resumes the round in
  the phase the database holds and publishes it: its sum equal to the plaintext FedAvg of the
  updates, every acknowledged submission kept and none counted twice.
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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    #: name -> where its log file stood when it was last started (a restart appends to it)
    marks: dict[str, int] = field(default_factory=dict)

    def start(self, name: str, env: dict[str, str] | None = None) -> None:
        args = ["server", "--config", str(self.fed.workdir / f"{name}.toml")]
        path = self.fed.workdir / f"{name}.log"
        self.marks[name] = path.stat().st_size if path.exists() else 0
        self.fed._spawn(name, args, f"{name}.log", env)

    def log(self, name: str) -> str:
        """What ``name`` has logged since it was last started."""
        with (self.fed.workdir / f"{name}.log").open("rb") as f:
            f.seek(self.marks.get(name, 0))
            return f.read().decode(errors="replace")

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


@dataclass
class Death:
    """The database as a server left it when it died, read before anyone took its lease."""

    returncode: int
    #: the newest round: (number, state, phase)
    round: tuple[int, str, str]
    token: int
    roster: list[str]
    committed: list[str]
    released: list[str]
    acked: set[str]


def _watch(pair: Pair, name: str) -> Future[Death]:
    """Read the database the instant ``name`` (as now running) exits: the takeover waits for
    the lease to expire, so this sees exactly what the killed server made durable."""
    proc = pair.fed.procs[name]

    def at_death() -> Death:
        code = proc.wait(300)
        with psycopg.connect(pair.dsn) as conn:  # one transaction, one snapshot
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            number, state, phase = conn.execute(
                "SELECT round, state, phase FROM rounds ORDER BY round DESC LIMIT 1"
            ).fetchone() or (0, "", "")
            (token,) = conn.execute("SELECT token FROM leader").fetchone() or (0,)
            rows = conn.execute(
                "SELECT node, commit_bytes IS NOT NULL, seed IS NOT NULL FROM members "
                "WHERE round = %s AND in_roster <> 0 ORDER BY node",
                (number,),
            ).fetchall()
            acked = {r[0] for r in conn.execute("SELECT node FROM submissions WHERE round = %s", (number,))}
        return Death(
            code,
            (number, state, phase),
            token,
            [r[0] for r in rows],
            [r[0] for r in rows if r[1]],
            [r[0] for r in rows if r[2]],
            acked,
        )

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(at_death)
    finally:
        pool.shutdown(wait=False)


def _back(pair: Pair, name: str, failpoints: str, other: str) -> None:
    """Restart the killed ``name`` as the standby once ``other`` has taken the lease."""
    pair.wait_log(other, "lease taken", timeout=30)
    holder = _holder(pair, other)
    pair.start(name, {"CIPHERHIVE_FAILPOINTS": failpoints} if failpoints else None)
    deadline = time.monotonic() + 60
    while f"standby: waiting for the lease held by {holder}" not in pair.log(name):
        # ``other`` was killed before this one got to wait: it takes the lease itself.
        if "lease taken" in pair.log(name) and pair.fed.procs[other].poll() is not None:
            break
        assert pair.fed.procs[name].poll() is None, pair.log(name)[-3000:]
        assert time.monotonic() < deadline, pair.log(name)[-3000:]
        time.sleep(0.05)


def _killed_at(pair: Pair, name: str, point: str, watch: Future[Death]) -> Death:
    """``name`` died (SIGKILL) at its armed failpoint ``point``; the database it left."""
    death = watch.result(120)
    assert death.returncode == -signal.SIGKILL, pair.log(name)[-3000:]
    assert f"failpoint {point}: killing process" in pair.log(name), pair.log(name)[-3000:]
    return death


def _published_by(pair: Pair, name: str, number: int) -> None:
    """Round ``number`` was published by ``name``, the plaintext FedAvg of the three updates."""
    info = pair.fed.wait_round(number, 120)
    assert info.state == pb.ROUND_SUM_READY and info.participants == 3, pair.log(name)[-3000:]
    _assert_exact(pair, number)


NODES = ["node-1", "node-2", "node-3"]


@pytest.mark.timeout(300)
def test_the_standby_finishes_the_rounds_of_a_killed_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One federation, five masked rounds; the active server is killed (SIGKILL) at a different
    phase of each, the killed one coming back as the standby, and each round is finished by the
    server that took over."""
    with _pair(tmp_path_factory.mktemp("standby"), max_rounds=5) as pair:
        fed = pair.fed
        pair.start("server-a")
        pair.wait_log("server-a", "lease taken")
        # server-b dies (SIGKILL) at its second publish, after writing round 2's sum file,
        # before recording it: after every upload is in, before the sum is published.
        pair.start("server-b", {"CIPHERHIVE_FAILPOINTS": "server.published:2"})
        b_dies = _watch(pair, "server-b")
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

        # Each killed server comes back as the standby as soon as the other has the lease: the
        # rounds go on meanwhile, so a server may die before its successor's standby said so.
        # server-a dies in round 3 once the roster is fixed (durable), before any upload.
        _back(pair, "server-a", "server.roster:1", "server-b")
        a_dies = _watch(pair, "server-a")

        # Round 2: server-b dies after every upload, commit and seed is in, the sum file
        # written, before the sum is recorded.
        death = _killed_at(pair, "server-b", "server.published", b_dies)
        assert (death.round, death.token) == ((2, "open", "release"), 2), death
        assert (death.roster, death.committed, death.released) == (NODES, NODES, NODES), death
        assert death.acked == set(NODES), death
        # server-b dies in the first round whose last commit it records (round 3 is the first),
        # the release phase durable, no seed released yet.
        _back(pair, "server-b", "server.committed:2", "server-a")
        b_dies = _watch(pair, "server-b")

        # Round 3: killed after enrolment, the roster fixed, before any upload.
        death = _killed_at(pair, "server-a", "server.roster", a_dies)
        assert (death.round, death.token) == ((3, "open", "upload"), 3), death
        assert (death.roster, death.committed, death.released, death.acked) == (NODES, [], [], set()), death
        # server-a dies once the first seed of round 5 is recorded (three of round 4 before).
        _back(pair, "server-a", "server.released:4", "server-b")
        a_dies = _watch(pair, "server-a")
        assert "resumed masked round [round=3 phase=upload enrolled=3]" in pair.log("server-b")

        # Round 4: killed after the last commit, the release phase recorded, before any seed.
        death = _killed_at(pair, "server-b", "server.committed", b_dies)
        assert (death.round, death.token) == ((4, "open", "release"), 4), death
        assert (death.roster, death.committed, death.released) == (NODES, NODES, []), death
        assert death.acked == set(NODES), death
        _back(pair, "server-b", "", "server-a")
        assert "resumed masked round [round=4 phase=release enrolled=3]" in pair.log("server-a")

        # Round 5: killed during the release step, one seed recorded and two still to come.
        death = _killed_at(pair, "server-a", "server.released", a_dies)
        assert (death.round, death.token) == ((5, "open", "release"), 5), death
        assert (death.roster, death.committed, len(death.released)) == (NODES, NODES, 1), death
        assert death.acked == set(NODES), death
        pair.wait_log("server-b", "server listening", timeout=30)
        assert "resumed masked round [round=5 phase=release enrolled=3]" in pair.log("server-b")

        # Every round published by the server that took it over: exact, nothing lost or doubled.
        for number, name in (
            (1, "server-b"),
            (2, "server-a"),
            (3, "server-b"),
            (4, "server-a"),
            (5, "server-b"),
        ):
            _published_by(pair, name, number)
        assert pair.db("SELECT token FROM leader") == [(6,)]
        assert [r[0] for r in pair.db("SELECT state FROM rounds ORDER BY round")] == ["sum_ready"] * 5

        # A standby stopped while it waits held nothing: it exits 0 at once.
        pair.start("server-a")
        _standby(pair, "server-a", _holder(pair, "server-b"))
        assert fed.stop("server-a", timeout=10) == 0
        assert "stopped while standby" in pair.log("server-a")
        assert pair.db("SELECT token FROM leader") == [(6,)]


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
