"""Schema 6: each member's certificate serial in the nodes table, on both databases, and the
revoked mark `cipherhive ctl nodes` shows from it (docs/how-to/operator.md)."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import psycopg
import pytest
from rich.console import Console

from cipherhive.ctl import render
from cipherhive.pki import certs
from cipherhive.server.api import handlers
from cipherhive.server.storage.postgres import PostgresState
from cipherhive.server.storage.schema import MIGRATIONS, POSTGRES_MIGRATIONS, SCHEMA_VERSION
from cipherhive.server.storage.sqlstore import SqlStore
from cipherhive.server.storage.state import State
from cipherhive.v1 import federation_pb2 as pb
from tests.test_state import SCHEMA_1_ROWS

pytestmark = pytest.mark.timeout(120)


def test_a_nodes_serial_is_kept_and_replaced(state: SqlStore) -> None:
    state.touch_node("a", now=1.0)
    assert state.nodes()[0].cert_serial == ""
    state.set_node_serial("a", "1f2e")
    state.set_node_serial("a", "abc")  # a member re-issued (`certs issue --replace`) joins again
    state.set_node_serial("nobody", "99")  # only known members are recorded
    [row] = state.nodes()
    assert (row.name, row.cert_serial) == ("a", "abc")


def _schema_5_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        for version, script in enumerate(MIGRATIONS[:5]):
            if version == 1:
                for row in SCHEMA_1_ROWS:
                    db.execute(row)
            db.executescript(script)
        db.execute("PRAGMA user_version = 5")


def test_sqlite_migrates_from_schema_5(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _schema_5_sqlite(path)
    s = State(path)
    try:
        assert SCHEMA_VERSION == 6
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == 6
        [node] = s.nodes()
        assert (node.name, node.submissions, node.cert_serial) == ("a", 1, "")
        assert [r.round for r in s.rounds()] == [1, 2] and s.get_meta("receipt_key") == "abcd"
        s.set_node_serial("a", "beef")
        assert s.nodes()[0].cert_serial == "beef"
    finally:
        s.close()


def test_postgres_migrates_from_schema_5(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as db:
        db.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (5)")
        for version, script in enumerate(POSTGRES_MIGRATIONS[:5]):
            if version == 1:
                for row in SCHEMA_1_ROWS:
                    db.execute(row)
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
    s = PostgresState(pg_dsn)
    try:
        with psycopg.connect(pg_dsn) as db:
            row = db.execute("SELECT version FROM schema_version").fetchone()
        assert row is not None and row[0] == 6
        [node] = s.nodes()
        assert (node.name, node.submissions, node.cert_serial) == ("a", 1, "")
        assert [r.round for r in s.rounds()] == [1, 2] and s.get_meta("receipt_key") == "abcd"
        s.set_node_serial("a", "beef")
        assert s.nodes()[0].cert_serial == "beef"
    finally:
        s.close()


def test_migrate_state_copies_the_serials(tmp_path: Path, pg_dsn: str) -> None:
    source = State(tmp_path / "state.db")
    target = PostgresState(pg_dsn)
    try:
        source.touch_node("a", now=1.0)
        source.set_node_serial("a", "c0ffee")
        target.copy_from(source)
        assert [(n.name, n.cert_serial) for n in target.nodes()] == [("a", "c0ffee")]
    finally:
        source.close()
        target.close()


def test_revoked_members_are_marked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    certs.create_ca(ca)
    one = certs.issue(ca, "node", "node-1", tmp_path / "node-1")
    two = certs.issue(ca, "node", "node-2", tmp_path / "node-2")
    certs.revoke(ca, "node-2", role="node")
    crl = certs.RevocationList(ca / certs.CRL, ca / certs.CA_CERT, check_interval=0)
    assert handlers.revoked_reason(crl, f"{one.serial:x}") == ""
    assert handlers.revoked_reason(crl, "") == "" and handlers.revoked_reason(None, "ab") == ""
    assert handlers.revoked_reason(crl, "not hex") == ""
    reason = handlers.revoked_reason(crl, f"{two.serial:x}")
    assert reason.startswith(f"certificate {two.serial:x} revoked on ")

    nodes = [pb.NodeInfo(name="node-1"), pb.NodeInfo(name="node-2", revoked=True, revoked_reason=reason)]
    data = render.nodes_dict(nodes)
    assert [(n["name"], n["revoked"]) for n in data["nodes"]] == [("node-1", False), ("node-2", True)]
    assert json.loads(json.dumps(data))["nodes"][1]["revoked_reason"] == reason
    render.print_nodes(Console(file=io.StringIO(), width=200), nodes)  # piped: plain lines
    text = capsys.readouterr().out
    assert "revoked" in text and "REVOKED" in text and f"node-2: {reason}" in text
