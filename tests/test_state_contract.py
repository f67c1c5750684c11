"""The round store's contract, on SQLite and on PostgreSQL alike (tests/postgres.py): every
``RoundStore`` method not already covered by tests/test_state.py, the two schemas kept equal,
PostgreSQL's own migrations, locks and errors, and moving a state from SQLite to PostgreSQL
(``cipherhive server migrate-state``)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cipherhive import cli
from cipherhive.ckks import keys
from cipherhive.runtime import fsutil
from cipherhive.runtime.config import ConfigError
from cipherhive.server.config import ServerConfig
from cipherhive.server.storage.backend import open_store
from cipherhive.server.storage.postgres import PostgresState, check_url, read_password
from cipherhive.server.storage.rows import (
    DatabaseUnavailable,
    OffenceRow,
    OutcomeRow,
    RowConflict,
    StateError,
    SubmissionRow,
)
from cipherhive.server.storage.schema import POSTGRES_MIGRATIONS, SCHEMA_VERSION, TABLES
from cipherhive.server.storage.sqlstore import SqlStore
from cipherhive.server.storage.state import State
from tests import postgres
from tests.test_state import SCHEMA_1_ROWS

NONCE = b"n" * 32


def _submission(round_: int, node: str, accepted: float = 10.0) -> SubmissionRow:
    return SubmissionRow(round_, node, f"sub-{node}", f"receipt-{node}", accepted, 99, f"spool/{node}.ct", {})


def _published(state: SqlStore, nodes: list[str]) -> int:
    """Open, fill and publish one round; its number."""
    row = state.open_round(base_round=state.latest_sum_round(), deadline=0.0, expected=nodes)
    for i, node in enumerate(nodes):
        state.accept_submission(_submission(row.round, node, accepted=float(i)))
    state.finish_round(
        row.round,
        state="sum_ready",
        reason="",
        participants=len(nodes),
        sum_file=f"sums/round-{row.round}.sum",
    )
    return row.round


# --------------------------------------------------------------------------- meta and nodes


def test_meta(state: SqlStore) -> None:
    state.set_meta("k", "v1")
    state.set_meta("k", "v2")
    assert state.get_meta("k") == "v2"
    state.delete_meta("k")
    state.delete_meta("k")  # already gone: no error
    assert state.get_meta("k") is None


def test_nodes_keep_their_first_sighting(state: SqlStore) -> None:
    state.touch_node("b", now=5.0)
    state.touch_node("a", now=1.0)
    state.touch_node("a", now=3.0)
    assert [(n.name, n.first_seen, n.last_seen) for n in state.nodes()] == [("a", 1.0, 3.0), ("b", 5.0, 5.0)]


# --------------------------------------------------------------------------- published rounds


def test_withdraw_and_kept_sums(state: SqlStore) -> None:
    for name in ("a", "b"):
        state.touch_node(name)
    one, two, three = (_published(state, ["a", "b"]) for _ in range(3))
    assert (state.latest_round(), state.latest_sum_round(), state.published_count()) == (3, 3, 3)
    assert state.kept_sums() == [(n, f"sums/round-{n}.sum") for n in (three, two, one)]
    assert state.oldest_kept_round() == one

    state.forget_sum(one)
    assert state.round(one).sum_file is None  # type: ignore[union-attr]
    assert state.oldest_kept_round() == two
    # A withdrawal returns the sum files to delete; a round not published is left alone.
    assert state.withdraw([two, 99, 2**64], "spoiled", 50.0) == [f"sums/round-{two}.sum"]
    assert state.withdraw([two], "again", 60.0) == []
    assert state.withdraw([one], "no file", 70.0) == []
    withdrawn = state.round(two)
    assert withdrawn is not None
    assert (withdrawn.state, withdrawn.withdrawn_reason, withdrawn.withdrawn_unix, withdrawn.sum_file) == (
        "withdrawn",
        "spoiled",
        50.0,
        None,
    )
    assert [r.round for r in state.withdrawn_rounds()] == [one, two]
    assert [r.round for r in state.withdrawn_rounds(limit=1)] == [two]
    assert state.published_count() == 3 and state.latest_sum_round() == three
    assert state.count_rounds("withdrawn") == 2 and state.count_rounds("sum_ready") == 1
    assert state.kept_sums() == [(three, f"sums/round-{three}.sum")]


def test_a_round_is_read_back_as_it_was_written(state: SqlStore) -> None:
    opened = state.open_round(
        base_round=7,
        deadline=1234.5,
        expected=["b", "a"],
        min_participants=2,
        nonce=NONCE,
        enrol_deadline=99.25,
    )
    assert opened == state.round(1) == state.open_round_row()
    assert (opened.masked, opened.nonce, opened.phase, opened.enrol_deadline) == (1, NONCE, "enrol", 99.25)
    assert (opened.base_round, opened.deadline, opened.expected, opened.min_participants) == (
        7,
        1234.5,
        ["a", "b"],
        2,
    )
    assert opened.opened == pytest.approx(time.time(), abs=60)
    assert state.round(2**64) is None and state.submissions(2**64) == [] and state.outcomes(2**64) == []


def test_between_queries_group_by_round(state: SqlStore) -> None:
    for name in ("a", "b"):
        state.touch_node(name)
    one, two = _published(state, ["a", "b"]), _published(state, ["b"])
    for number in (one, two):
        state.record_outcome(OutcomeRow(number, "b", number == one, "" if number == one else "nan", 5.0))
    state.record_outcome(OutcomeRow(one, "a", True, "", 4.0))
    subs = state.submissions_between(0, 2**64)
    assert {n: [s.node for s in rows] for n, rows in subs.items()} == {one: ["a", "b"], two: ["b"]}
    assert state.submissions_between(two, two).keys() == {two}
    outcomes = state.outcomes_between(one, two)
    assert [(o.node, o.applied) for o in outcomes[one]] == [("a", True), ("b", True)]
    assert [(o.node, o.applied, o.reason) for o in outcomes[two]] == [("b", False, "nan")]
    assert state.submission(one, "a") == SubmissionRow(one, "a", "sub-a", "receipt-a", 0.0, 99, None, {})


# --------------------------------------------------------------------------- masked rounds


def test_a_masked_rounds_members(state: SqlStore) -> None:
    number = state.open_round(base_round=0, deadline=0.0, expected=["a", "b", "c"], nonce=NONCE).round
    for node in ("c", "a", "b"):
        state.add_enrolment(number, node, f"enrol-{node}".encode())
    with pytest.raises(RowConflict):
        state.add_enrolment(number, "a", b"again")
    state.drop_enrolment(number, "c")  # withdrew before the roster
    state.fix_roster(number, ["a", "b"], b"hash-1")
    state.drop_enrolment(number, "b")  # in the roster: stays
    row = state.round(number)
    assert row is not None and (row.phase, row.roster_hash) == ("upload", b"hash-1")
    assert [(m.node, m.enrolment, m.in_roster) for m in state.members(number)] == [
        ("a", b"enrol-a", True),
        ("b", b"enrol-b", True),
    ]

    state.set_commit(number, "a", b"commit-a")
    state.set_commit(number, "a", b"other")  # a commit is written once
    state.set_commit(number, "b", b"commit-b", phase="seeds")
    state.set_seed(number, "a", b"seed-a")
    state.set_seed(number, "a", b"other")
    state.set_phase(number, "unmask")
    members = state.members(number)
    assert [(m.commit, m.seed) for m in members] == [(b"commit-a", b"seed-a"), (b"commit-b", None)]
    assert state.round(number).phase == "unmask"  # type: ignore[union-attr]

    state.reform_roster(number, ["a"], b"hash-2")
    row = state.round(number)
    assert row is not None and (row.roster_hash, row.reformed) == (b"hash-2", 1)
    assert [m.node for m in state.members(number, roster_only=True)] == ["a"]

    state.finish_round(number, state="sum_ready", reason="", participants=1, sum_file="sums/round-1.sum")
    state.set_phase(number, "enrol")  # a finished round's phase no longer moves
    assert state.round(number).phase == "done"  # type: ignore[union-attr]
    state.forget_members(number, keep_proof=True)
    assert [(m.node, m.commit, m.seed) for m in state.members(number)] == [("a", b"commit-a", None)]
    state.forget_members(number, keep_proof=False)
    assert state.members(number) == []


def test_offences_culprits_and_readmission(state: SqlStore) -> None:
    for name in ("a", "b"):
        state.touch_node(name)
    number = state.open_round(base_round=0, deadline=0.0, expected=["a", "b"], nonce=NONCE).round
    offences = [
        OffenceRow(number, "b", "commit", "missed", 1.0, 3),
        OffenceRow(number, "a", "seed", "bad", 2.0, 4),
    ]
    state.finish_round(
        number,
        state="failed",
        reason="step",
        participants=0,
        failed_step="commit",
        culprits=["b", "a"],
        offences=offences,
    )
    row = state.round(number)
    assert row is not None and (row.state, row.failed_step, row.culprits, row.phase) == (
        "failed",
        "commit",
        ["a", "b"],
        "done",
    )
    assert [(o.node, o.step) for o in state.offences()] == [("a", "seed"), ("b", "commit")]
    state.record_offence(OffenceRow(number, "b", "roster", "replaced", 3.0, 9))  # replaces
    state.record_offence(OffenceRow(5, "b", "seed", "late", 4.0, 7))
    assert state.offences("b") == [
        OffenceRow(number, "b", "roster", "replaced", 3.0, 9),
        OffenceRow(5, "b", "seed", "late", 4.0, 7),
    ]
    assert [o.round for o in state.offences("b", since_round=number)] == [5]
    assert state.offences(since_round=2**64) == []
    assert state.readmit("b", 5) and not state.readmit("nobody", 5)
    assert {n.name: n.readmitted_round for n in state.nodes()} == {"a": 0, "b": 5}


def test_a_failed_write_leaves_nothing_and_the_store_goes_on(state: SqlStore) -> None:
    state.touch_node("a")
    number = state.open_round(base_round=0, deadline=0.0, expected=["a"]).round
    state.accept_submission(_submission(number, "a"))
    with pytest.raises(RowConflict):
        state.accept_submission(_submission(number, "a"))
    with pytest.raises(StateError, match="already open"):
        state.open_round(base_round=0, deadline=0.0, expected=[])
    assert state.round(number).participants == 1  # type: ignore[union-attr]
    assert state.nodes()[0].submissions == 1
    state.set_meta("still", "writable")
    assert state.get_meta("still") == "writable"


# --------------------------------------------------------------------------- one schema, two databases


def _sqlite_columns(path: Path) -> dict[str, list[tuple[str, str, bool, str | None, int]]]:
    types = {"INTEGER": "bigint", "REAL": "double precision", "TEXT": "text", "BLOB": "bytea"}
    with sqlite3.connect(path) as db:
        return {
            t: [
                (name, types[kind], bool(notnull) or bool(pk), None if default is None else str(default), pk)
                for _, name, kind, notnull, default, pk in db.execute(f"PRAGMA table_info({t})")
            ]
            for t in TABLES
        }


def _postgres_columns(dsn: str) -> dict[str, list[tuple[str, str, bool, str | None, int]]]:
    out: dict[str, list[tuple[str, str, bool, str | None, int]]] = {}
    with psycopg.connect(dsn) as db:
        for t in TABLES:
            keys = db.execute(
                "SELECT a.attname, array_position(i.indkey, a.attnum) FROM pg_index i "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = %s::regclass AND i.indisprimary",
                (t,),
            ).fetchall()
            pk = {name: position + 1 for name, position in keys}
            rows = db.execute(
                "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns "
                "WHERE table_name = %s AND table_schema = current_schema() ORDER BY ordinal_position",
                (t,),
            ).fetchall()
            out[t] = [
                (name, kind, nullable == "NO", None if d is None else d.split("::")[0], pk.get(name, 0))
                for name, kind, nullable, d in rows
            ]
    return out


def _foreign_keys_and_indexes_sqlite(path: Path) -> set[tuple[str, ...]]:
    with sqlite3.connect(path) as db:
        keys = {
            (t, "fk", r[3], r[2], r[4]) for t in TABLES for r in db.execute(f"PRAGMA foreign_key_list({t})")
        }
        indexes = {
            (t, "index", r[1]) for t in TABLES for r in db.execute(f"PRAGMA index_list({t})") if r[3] == "c"
        }
    return keys | indexes


def _foreign_keys_and_indexes_postgres(dsn: str) -> set[tuple[str, ...]]:
    with psycopg.connect(dsn) as db:
        keys = db.execute(
            "SELECT tc.table_name, kcu.column_name, ccu.table_name, ccu.column_name "
            "FROM information_schema.table_constraints tc "
            "JOIN information_schema.key_column_usage kcu ON kcu.constraint_name = tc.constraint_name "
            "JOIN information_schema.constraint_column_usage ccu ON ccu.constraint_name = tc.constraint_name "
            "WHERE tc.constraint_type = 'FOREIGN KEY'"
        ).fetchall()
        indexes = db.execute(
            "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = current_schema() "
            "AND indexname NOT LIKE '%%_pkey'"
        ).fetchall()
    return {(t, "fk", c, rt, rc) for t, c, rt, rc in keys} | {(t, "index", i) for t, i in indexes}


def test_both_databases_have_one_schema(tmp_path: Path, pg_dsn: str) -> None:
    """Column by column (name, type, NOT NULL, default, key), foreign keys and indexes: a
    migration written for one database and not the other fails here."""
    State(tmp_path / "state.db").close()
    PostgresState(pg_dsn).close()
    assert len(POSTGRES_MIGRATIONS) == SCHEMA_VERSION
    assert _postgres_columns(pg_dsn) == _sqlite_columns(tmp_path / "state.db")
    assert _foreign_keys_and_indexes_postgres(pg_dsn) == _foreign_keys_and_indexes_sqlite(
        tmp_path / "state.db"
    )


# --------------------------------------------------------------------------- PostgreSQL's own


def _version(dsn: str) -> int:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT version FROM schema_version").fetchone()
    assert row is not None
    return int(row[0])


def test_postgres_migrates_from_schema_1(pg_dsn: str) -> None:
    """An upgraded server keeps its history and its open round, as on SQLite
    (tests/test_state.py::test_migrates_from_schema_1)."""
    with psycopg.connect(pg_dsn, autocommit=True) as db:
        db.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        for statement in POSTGRES_MIGRATIONS[0].split(";"):
            if statement.strip():
                db.execute(statement)
        for row in SCHEMA_1_ROWS:
            db.execute(row)
    s = PostgresState(pg_dsn)
    try:
        assert _version(pg_dsn) == SCHEMA_VERSION == 6
        one, two = s.rounds()
        assert (one.state, one.participants, one.sum_file, one.num_values) == (
            "sum_ready",
            3,
            "sums/round-1.sum",
            99,
        )
        assert two.state == "open" and two.min_participants == 0 and two.withdrawn_reason == ""
        assert two.masked == 0 and two.culprits == [] and two.reformed == 0
        assert [sub.node for sub in s.submissions(2)] == ["a"]
        assert s.nodes()[0].missed_rounds == 0 and s.get_meta("receipt_key") == "abcd"
        assert s.withdraw([1], "spoiled", 50.0) == ["sums/round-1.sum"]  # the new state is allowed
        with pytest.raises(RowConflict):
            s.accept_submission(_submission(77, "a"))
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            s.record_outcome(OutcomeRow(77, "a", True, "", 1.0))
    finally:
        s.close()


def test_postgres_refuses_a_newer_schema(pg_dsn: str) -> None:
    PostgresState(pg_dsn).close()
    with psycopg.connect(pg_dsn, autocommit=True) as db:
        db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StateError, match="newer"):
        PostgresState(pg_dsn)
    assert _version(pg_dsn) == SCHEMA_VERSION + 1


def test_postgres_refuses_tables_it_did_not_make(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as db:
        db.execute("CREATE TABLE rounds (x INTEGER)")
    with pytest.raises(StateError, match="did not create"):
        PostgresState(pg_dsn)


def _at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run each call on its own thread, released together; their results or exceptions."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_two_servers_on_one_database_open_one_round(pg_dsn: str) -> None:
    """Opening a round reads then writes: two connections at once get one round and one
    "already open", never a key clash or two open rounds (SQLite's writer lock, made explicit)."""
    stores = [PostgresState(pg_dsn) for _ in range(4)]
    try:
        for _ in range(3):
            results = _at_once([lambda s=s: s.open_round(0, 0.0, []) for s in stores])  # type: ignore[misc]
            opened = [r for r in results if not isinstance(r, Exception)]
            refused = [r for r in results if isinstance(r, Exception)]
            assert len(opened) == 1 and all(isinstance(e, StateError) for e in refused), results
            stores[0].finish_round(opened[0].round, state="failed", reason="", participants=0)
        assert [r.round for r in stores[0].rounds()] == [1, 2, 3]
        _published(stores[0], [])
        files = _at_once([lambda s=s: s.withdraw([4], "x", 1.0) for s in stores])  # type: ignore[misc]
        assert sorted(map(len, files)) == [0, 0, 0, 1], files
    finally:
        for s in stores:
            s.close()


def test_commits_are_durable_even_where_the_database_says_otherwise(pg_dsn: str) -> None:
    s = PostgresState(psycopg.conninfo.make_conninfo(pg_dsn, options="-c synchronous_commit=off"))
    try:
        assert s._read("SHOW synchronous_commit") == [{"synchronous_commit": "on"}]
    finally:
        s.close()


def _cut_sessions(pg_dsn: str) -> None:
    with psycopg.connect(postgres.cluster().admin, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'cipherhive-server' AND datname = %s",
            (psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"],),
        )


def test_a_lost_connection_fails_one_call_not_every_later_one(pg_dsn: str) -> None:
    """A write and a read whose connection died each fail as DatabaseUnavailable (the server
    answers UNAVAILABLE), and the next call connects again."""
    s = PostgresState(pg_dsn)
    try:
        _cut_sessions(pg_dsn)
        with pytest.raises(DatabaseUnavailable, match="lost the connection to PostgreSQL"):
            s.set_meta("k", "v")
        s.set_meta("k", "v")
        _cut_sessions(pg_dsn)
        with pytest.raises(DatabaseUnavailable, match="lost the connection to PostgreSQL"):
            s.get_meta("k")
        assert s.get_meta("k") == "v"
    finally:
        s.close()


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("postgresql://user:secret@host/db", "must not hold a password"),
        ("postgresql://user@host/db?password=secret", "must not hold a password"),
        ("mysql://user@host/db", "not a postgresql://"),
        ("host=db user=x", "not a postgresql://"),
        ("postgresql://user@host:port/db", "port must be a number"),
        ("postgresql://user@host/db?nonsense=1", "not a valid PostgreSQL URL"),
    ],
)
def test_a_bad_database_url_is_refused(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        check_url(url)
    with pytest.raises(ConfigError, match=complaint):
        ServerConfig(insecure=True, database=url)


def test_a_good_database_url_and_the_password_file(tmp_path: Path) -> None:
    assert check_url("postgresql://ch@db.example:5433/rounds")["port"] == "5433"
    assert ServerConfig(insecure=True, database="postgres://ch@db/rounds").database
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n", encoding="utf-8")
    pw.chmod(0o644)
    with pytest.raises(StateError, match="chmod 600"):
        read_password(pw)
    pw.chmod(0o600)
    assert read_password(pw) == "s3cret" and read_password(None) is None
    with pytest.raises(StateError, match="does not exist"):
        read_password(tmp_path / "missing")


def test_an_unreachable_database_says_what_to_check() -> None:
    from cipherhive.demo.federation import free_port

    url = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing?connect_timeout=5"
    with pytest.raises(
        StateError, match=re.escape("cannot connect to PostgreSQL at postgresql://nobody@127.0.0.1")
    ) as caught:
        PostgresState(url)
    assert "Check the URL" in str(caught.value) and "password_file" in str(caught.value)


def test_the_password_comes_from_the_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's URL names no password; a wrong one is refused with the hint."""
    c = postgres.cluster()
    if c.tcp is None:
        pytest.skip("the password check needs the throwaway cluster's TCP login")
    host, port = c.tcp
    with postgres.database(owner=postgres.LOGIN_ROLE) as dsn:
        dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        url = f"postgresql://{postgres.LOGIN_ROLE}@{host}:{port}/{dbname}"
        monkeypatch.delenv("PGPASSWORD", raising=False)
        with pytest.raises(StateError, match="password"):
            PostgresState(url, "wrong")
        PostgresState(url, c.login_password).close()
        monkeypatch.setenv("PGPASSWORD", c.login_password)
        PostgresState(url).close()


# --------------------------------------------------------------------------- which store, and moving one


def _history(state: SqlStore) -> dict[str, Any]:
    """Everything a store answers about its rounds."""
    return {
        "rounds": state.rounds(),
        "nodes": state.nodes(),
        "subs": state.submissions_between(0, 2**63),
        "outcomes": state.outcomes_between(0, 2**63),
        "members": [state.members(r.round) for r in state.rounds()],
        "offences": state.offences(),
        "meta": state.get_meta("key_fingerprint"),
        "missed": state.missed_rounds(),
    }


def _sqlite_with_rounds(path: Path) -> dict[str, Any]:
    s = State(path)
    try:
        s.set_meta("key_fingerprint", "f" * 64)
        for name in ("a", "b", "c"):
            s.touch_node(name, now=1.5)
        one = _published(s, ["a", "b"])
        s.record_outcome(OutcomeRow(one, "a", True, "", 3.0))
        masked = s.open_round(base_round=one, deadline=9.0, expected=["a", "b", "c"], nonce=NONCE).round
        for node in ("a", "b", "c"):
            s.add_enrolment(masked, node, b"\x00\xff" + node.encode())
        s.fix_roster(masked, ["a", "b"], b"\x01" * 32)
        s.set_commit(masked, "a", b"\x02" * 16)
        s.finish_round(
            masked,
            state="failed",
            reason="commit missed",
            participants=0,
            failed_step="commit",
            culprits=["b"],
            offences=[OffenceRow(masked, "b", "commit", "missed", 8.0, masked + 2)],
        )
        s.forget_members(masked, keep_proof=True)
        s.record_missed(masked, ["a", "b", "c"], {"a"})
        s.open_round(base_round=one, deadline=20.0, expected=["a"], min_participants=2)
        s.accept_submission(_submission(masked + 1, "a"))
        return _history(s)
    finally:
        s.close()


def test_copy_from_sqlite_keeps_every_answer(tmp_path: Path, pg_dsn: str) -> None:
    before = _sqlite_with_rounds(tmp_path / "state.db")
    source, target = State(tmp_path / "state.db"), PostgresState(pg_dsn)
    try:
        copied = target.copy_from(source)
        assert copied == source.row_counts() == target.row_counts()
        assert copied["rounds"] == 3 and copied["members"] == 2 and copied["offences"] == 1
        assert _history(target) == before
        with pytest.raises(StateError, match="already holds round state"):
            target.copy_from(source)
        assert target.row_counts() == copied
        # The copy goes on as the server would: the open round closes, the next opens.
        target.finish_round(3, state="failed", reason="", participants=1)
        assert target.open_round(base_round=1, deadline=0.0, expected=[]).round == 4
    finally:
        source.close()
        target.close()


def _server_toml(tmp_path: Path, **state: str) -> Path:
    path = tmp_path / "server.toml"
    lines = ["[server]", f'state_dir = "{tmp_path / "server-state"}"', "insecure = true"]
    if state:
        lines += ["[state]", *(f'{k} = "{v}"' for k, v in state.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_migrate_state_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cipherhive server migrate-state`: copies, checks and renames; then refuses to run again,
    and refuses a target that holds rows."""
    c = postgres.cluster()
    if c.tcp is None:
        pytest.skip("the command's URL needs the throwaway cluster's TCP login")
    host, port = c.tcp
    state_dir = tmp_path / "server-state"
    state_dir.mkdir()
    before = _sqlite_with_rounds(state_dir / "state.db")
    password = tmp_path / "pw"
    password.write_text(c.login_password + "\n", encoding="utf-8")
    password.chmod(0o600)
    with postgres.database(owner=postgres.LOGIN_ROLE) as dsn:
        url = f"postgresql://{postgres.LOGIN_ROLE}@{host}:{port}/{psycopg.conninfo.conninfo_to_dict(dsn)['dbname']}"
        config = _server_toml(tmp_path, password_file=str(password))
        held = fsutil.StateDirLock(state_dir, "server")  # a server running on it
        try:
            assert cli.main(["server", "migrate-state", "--config", str(config), "--to", url]) == 2
        finally:
            held.release()
        assert "in use by another cipherhive server" in capsys.readouterr().err
        assert (state_dir / "state.db").exists()
        assert cli.main(["server", "migrate-state", "--config", str(config), "--to", url]) == 0
        out = capsys.readouterr().out
        assert "in one transaction" in out and "rounds: 3 rows (counts match)" in out
        assert "renamed state.db to state.db.migrated" in out
        assert not (state_dir / "state.db").exists() and (state_dir / "state.db.migrated").exists()

        # The server now refuses SQLite on this directory, and opens the copy from the config.
        with pytest.raises(StateError, match="moved to PostgreSQL"):
            open_store(state_dir)
        store = open_store(state_dir, url, password)
        try:
            assert _history(store) == before
        finally:
            store.close()

        assert cli.main(["server", "migrate-state", "--config", str(config), "--to", url]) == 2
        assert "no SQLite round state to move" in capsys.readouterr().err
        (state_dir / "state.db.migrated").rename(state_dir / "state.db")
        with pytest.raises(StateError, match="holds this server's round state in SQLite"):
            open_store(state_dir, url, password)
        assert (
            cli.main(
                [
                    "server",
                    "migrate-state",
                    "--config",
                    str(_server_toml(tmp_path, database=url, password_file=str(password))),
                ]
            )
            == 2
        )
        assert "already holds round state" in capsys.readouterr().err
        assert (state_dir / "state.db").exists()  # a refused move renames nothing
        assert (
            cli.main(["server", "migrate-state", "--config", str(config), "--to", url.replace("@", ":pw@")])
            == 2
        )
        assert "must not hold a password" in capsys.readouterr().err


# --------------------------------------------------------------------------- without PostgreSQL


@pytest.mark.parametrize(("ci", "outcome"), [("", "1 skipped"), ("true", "1 error")])
def test_without_postgresql_a_test_skips_locally_and_fails_in_ci(ci: str, outcome: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", postgres.ENV_DSN, postgres.ENV_REQUIRED)}
    env.update({"CI": ci, postgres.ENV_BIN: "/nonexistent"})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_meta[postgres]"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
        timeout=240,
        check=False,
    )
    assert outcome in done.stdout, done.stdout + done.stderr
    assert "holds no initdb" in done.stdout


def test_the_server_exits_2_on_a_bad_or_unreachable_database(
    tmp_path: Path, key_files: keys.KeyFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    from cipherhive.demo.federation import free_port

    def serve(database: str) -> str:
        config = tmp_path / "server.toml"
        config.write_text(
            f'[server]\nstate_dir = "{tmp_path / "state"}"\npublic_context = "{key_files.public}"\n'
            f'insecure = true\n[state]\ndatabase = "{database}"\n',
            encoding="utf-8",
        )
        assert cli.main(["server", "--config", str(config)]) == 2
        return capsys.readouterr().err

    assert "[state] database: the database URL must not hold a password" in serve("postgresql://a:b@h/d")
    err = serve(f"postgresql://nobody@127.0.0.1:{free_port()}/nothing")
    assert "cannot connect to PostgreSQL at postgresql://nobody@127.0.0.1" in err
    assert "Check the URL's host, port and database name" in err
