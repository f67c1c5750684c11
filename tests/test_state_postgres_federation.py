"""Integration: a real server whose round state moves from SQLite to PostgreSQL between rounds.

A federation of three real nodes publishes a masked round on SQLite; the operator stops it,
runs `cipherhive server migrate-state` and starts the server with ``[state] database`` (the
password from ``[state] password_file``, over TCP with scram-sha-256); the next masked round is
published from PostgreSQL and every node applies it. tests/postgres.py provides the cluster.
"""

from __future__ import annotations

import re

import psycopg
import pytest

from cipherhive.demo.federation import LocalFederation
from cipherhive.v1 import federation_pb2 as pb
from tests import postgres

pytestmark = pytest.mark.slow


def _applied(fed: LocalFederation, number: int) -> bool:
    """Every node logged that it applied round ``number``'s sum."""
    marker = re.compile(rf"\bround={number}\b")
    return all(
        any(
            "applied round sum" in line and marker.search(line)
            for line in fed.log(fed.node_name(i)).splitlines()
        )
        for i in range(fed.nodes)
    )


@pytest.mark.timeout(600)
def test_a_server_moves_to_postgresql_and_publishes_a_masked_round(
    tmp_path_factory: pytest.TempPathFactory, stopper: list[LocalFederation]
) -> None:
    cluster = postgres.cluster()
    if cluster.tcp is None:
        pytest.skip("needs the throwaway cluster's TCP login (CIPHERHIVE_TEST_POSTGRES is set)")
    workdir = tmp_path_factory.mktemp("federation")
    fed = LocalFederation(workdir, nodes=3, node_options={"epochs": 1}, rounds={"max_rounds": 1})
    stopper.append(fed)
    fed.setup()
    fed.start()
    first = fed.wait_round(1, 300)
    assert first.state == pb.ROUND_SUM_READY, fed.log("server")[-3000:]
    fed.wait_for(lambda: _applied(fed, 1), 120, "every node to apply round 1")
    codes = fed.stop_all()
    assert all(c in (0, None) for c in codes.values()), codes

    host, port = cluster.tcp
    with postgres.database(owner=postgres.LOGIN_ROLE) as dsn:
        dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        url = f"postgresql://{postgres.LOGIN_ROLE}@{host}:{port}/{dbname}"
        password = workdir / "database.pw"
        password.write_text(cluster.login_password + "\n", encoding="utf-8")
        password.chmod(0o600)
        fed.rounds["max_rounds"] = 2
        fed.write_server_config()
        with open(workdir / "server.toml", "a", encoding="utf-8") as toml:
            toml.write(f'\n[state]\ndatabase = "{url}"\npassword_file = "{password}"\n')
        out = fed.run_command(
            "migrate-state", ["server", "migrate-state", "--config", str(workdir / "server.toml")]
        )
        assert "rounds: 1 rows (counts match)" in out and "members: 3 rows" in out, out
        assert not (workdir / "server-state" / "state.db").exists()

        fed.start()
        second = fed.wait_round(2, 300)
        assert second.state == pb.ROUND_SUM_READY, fed.log("server")[-3000:]
        assert second.phase == "done" and second.participants == 3
        fed.wait_for(lambda: _applied(fed, 2), 120, "every node to apply round 2")
        assert [(r.round, r.state) for r in fed.list_rounds()] == [
            (1, pb.ROUND_SUM_READY),
            (2, pb.ROUND_SUM_READY),
        ]
        with psycopg.connect(dsn) as db:
            rounds = db.execute("SELECT round, state, masked FROM rounds ORDER BY round").fetchall()
            proof = db.execute(
                "SELECT COUNT(*) FROM members WHERE round = 2 AND commit_bytes IS NOT NULL"
            ).fetchone()
        assert rounds == [(1, "sum_ready", 1), (2, "sum_ready", 1)]
        assert proof == (3,)
        assert not (workdir / "server-state" / "state.db").exists()  # nothing went to SQLite
        codes = fed.stop_all()
        assert all(c in (0, None) for c in codes.values()), (codes, fed.log("server")[-3000:])
