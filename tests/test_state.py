"""Tests for the server's durable state (cipherhive.server.storage): the round store, on both
databases (the ``state`` fixture: SQLite and PostgreSQL, tests/postgres.py), SQLite's own
file handling, and the spool. tests/test_state_contract.py holds the rest of the contract."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cipherhive.server.storage import spool as spool_mod
from cipherhive.server.storage.rows import RowConflict
from cipherhive.server.storage.spool import Spool, SpoolError, read_records
from cipherhive.server.storage.sqlstore import SqlStore
from cipherhive.server.storage.state import (
    MIGRATIONS,
    SCHEMA_VERSION,
    OutcomeRow,
    State,
    StateError,
    SubmissionRow,
)
from tests import postgres


@pytest.fixture()
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture(params=postgres.BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, SqlStore, str]]:
    """(database, an empty store on it, where to open it again)."""
    with postgres.store(request.param, tmp_path) as (store, where):
        yield request.param, store, where


@pytest.fixture()
def state(backend: tuple[str, SqlStore, str]) -> SqlStore:
    return backend[1]


@pytest.fixture()
def sqlite_state(db_path: Path) -> Iterator[State]:
    s = State(db_path)
    yield s
    s.close()


def _user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def _schema_version(kind: str, where: str) -> int:
    """The schema version a store of ``kind`` at ``where`` records."""
    if kind == "sqlite":
        return _user_version(Path(where))
    import psycopg

    with psycopg.connect(where) as db:
        row = db.execute("SELECT version FROM schema_version").fetchone()
    assert row is not None
    return int(row[0])


def _conflict_is_the_databases_own(kind: str, error: RowConflict) -> None:
    """SQLite's RowConflict is still an IntegrityError (callers written before the interface)."""
    if kind == "sqlite":
        assert isinstance(error, sqlite3.IntegrityError)


def _submission(round_: int, node: str, spool_file: str | None = None, **kw: object) -> SubmissionRow:
    return SubmissionRow(
        round=round_,
        node=node,
        submission_id=kw.pop("submission_id", f"sub-{node}"),  # type: ignore[arg-type]
        receipt=f"receipt-{node}",
        accepted=kw.pop("accepted", time.time()),  # type: ignore[arg-type]
        num_bytes=1234,
        spool_file=spool_file,
        metrics=kw.pop("metrics", {"loss": 0.5}),  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- schema


def test_migrates_from_empty(sqlite_state: State, db_path: Path) -> None:
    assert SCHEMA_VERSION >= 1
    assert _user_version(db_path) == SCHEMA_VERSION
    with sqlite3.connect(db_path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        journal = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"meta", "nodes", "rounds", "submissions"} <= tables
    assert journal == "wal"
    assert sqlite_state.rounds() == []
    assert sqlite_state.open_round_row() is None
    assert sqlite_state.latest_sum_round() == 0


def test_reopen_keeps_data(backend: tuple[str, SqlStore, str]) -> None:
    kind, s, where = backend
    s.set_meta("fingerprint", "abc")
    s.set_meta("fingerprint", "def")
    s.touch_node("node-a", now=100.0)
    s.touch_node("node-a", now=200.0)
    row = s.open_round(base_round=0, deadline=123.0, expected=["node-b", "node-a"])
    s.accept_submission(_submission(row.round, "node-a", "spool/round-1/node-a.ct", accepted=250.0))
    s.close()

    s = postgres.reopen(kind, where)
    try:
        assert _schema_version(kind, where) == SCHEMA_VERSION
        assert s.get_meta("fingerprint") == "def"
        assert s.get_meta("missing") is None
        [node] = s.nodes()
        assert (node.name, node.first_seen, node.last_seen) == ("node-a", 100.0, 250.0)
        assert (node.submissions, node.last_round) == (1, 1)
        reopened = s.open_round_row()
        assert reopened is not None
        assert reopened.round == 1 and reopened.expected == ["node-a", "node-b"]
        assert reopened.participants == 1
        [sub] = s.submissions(1)
        assert sub.metrics == {"loss": 0.5}
        assert sub.spool_file == "spool/round-1/node-a.ct"
    finally:
        s.close()


def test_refuses_newer_schema(db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StateError, match="newer"):
        State(db_path)
    assert _user_version(db_path) == SCHEMA_VERSION + 1


#: The first schema's rows of a server with one published round and one open, with an upload in
#: flight (both databases' migration tests start from them).
SCHEMA_1_ROWS = (
    "INSERT INTO meta VALUES ('receipt_key', 'abcd')",
    "INSERT INTO nodes (name, first_seen, last_seen, last_round, submissions) VALUES ('a', 1, 2, 1, 1)",
    "INSERT INTO rounds (round, state, base_round, opened, deadline, closed, expected, participants, "
    "reason, sum_file, num_ciphertexts, num_values) "
    "VALUES (1, 'sum_ready', 0, 10, 20, 15, '[\"a\"]', 3, 'done', 'sums/round-1.sum', 2, 99)",
    "INSERT INTO rounds (round, state, base_round, opened, deadline, expected) "
    "VALUES (2, 'open', 1, 30, 40, '[]')",
    "INSERT INTO submissions (round, node, submission_id, receipt, accepted, num_bytes, spool_file) "
    "VALUES (2, 'a', 'sub-a', 'r', 31, 10, 'spool/round-2/a.ct')",
)


def _schema_1(path: Path) -> None:
    """A database exactly as the first schema left it, with an open round in flight."""
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0])
        db.execute("PRAGMA user_version = 1")
        for row in SCHEMA_1_ROWS:
            db.execute(row)


def test_migrates_from_schema_1(db_path: Path) -> None:
    """An upgraded server keeps its history and its open round; new columns get safe defaults."""
    _schema_1(db_path)
    s = State(db_path)
    try:
        assert _user_version(db_path) == SCHEMA_VERSION == 6
        one, two = s.rounds()
        assert (one.state, one.participants, one.sum_file, one.num_values) == (
            "sum_ready",
            3,
            "sums/round-1.sum",
            99,
        )
        # 0: opened before the floor was recorded (the server's setting applies to it).
        assert two.state == "open" and two.min_participants == 0 and two.withdrawn_reason == ""
        assert [sub.node for sub in s.submissions(2)] == ["a"]
        assert s.nodes()[0].missed_rounds == 0
        assert s.get_meta("receipt_key") == "abcd"
        # The new state is allowed, foreign keys still hold.
        assert s.withdraw([1], "spoiled", 50.0) == ["sums/round-1.sum"]
        assert s.round(1).state == "withdrawn"  # type: ignore[union-attr]
        with pytest.raises(sqlite3.IntegrityError):
            s.accept_submission(_submission(77, "a"))
        with pytest.raises(sqlite3.IntegrityError):
            s.record_outcome(OutcomeRow(77, "a", True, "", 1.0))
    finally:
        s.close()


def test_state_files_are_private(tmp_path: Path) -> None:
    """state.db holds the receipt signing key: 0600 (WAL and SHM too), its directory 0700."""
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    (folder / "state.db").touch(mode=0o644)
    (folder / "state.db").chmod(0o644)
    s = State(folder / "state.db")
    try:
        s.set_meta("k", "v")
        assert _mode(folder) == 0o700
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            assert _mode(folder / name) == 0o600, name
    finally:
        s.close()
    spool = Spool(tmp_path / "fresh")
    writer = spool.writer(1, "node-a")
    writer.append(b"x")
    writer.commit()
    assert {_mode(p) for p in (spool.root, spool.spool_dir, spool.sums_dir, spool.round_dir(1))} == {0o700}


# --------------------------------------------------------------------------- rounds


def test_paging(state: SqlStore) -> None:
    for number in range(1, 8):
        state.open_round(base_round=0, deadline=0.0, expected=[], min_participants=3)
        state.finish_round(number, state="failed", reason="", participants=0)
    page, before = state.rounds_page(3)
    assert [r.round for r in page] == [5, 6, 7] and before == 5
    page, before = state.rounds_page(3, before)
    assert [r.round for r in page] == [2, 3, 4] and before == 2
    page, before = state.rounds_page(3, before)
    assert [r.round for r in page] == [1] and before == 0
    assert state.rounds_page(3, 1) == ([], 0)
    assert [r.round for r in state.rounds_page(10, 2**64 - 1)[0]] == list(range(1, 8))
    assert state.round(4).min_participants == 3  # type: ignore[union-attr]


def test_outcomes_replace_and_missed_rounds(state: SqlStore) -> None:
    state.touch_node("a")
    state.touch_node("b")
    row = state.open_round(base_round=0, deadline=0.0, expected=["a", "b"])
    state.accept_submission(_submission(row.round, "a"))
    state.record_missed(row.round, ["a", "b"], {"a"})
    state.record_missed(row.round, ["a", "b"], {"a"})
    assert state.missed_rounds() == {"a": 0, "b": 2}
    state.accept_submission(_submission(row.round, "b"))  # submitting again resets it
    assert state.missed_rounds()["b"] == 0
    state.record_outcome(OutcomeRow(row.round, "a", False, "bad weight", 1.0))
    state.record_outcome(OutcomeRow(row.round, "a", True, "", 2.0))
    [outcome] = state.outcomes(row.round)
    assert (outcome.applied, outcome.reason, outcome.reported) == (True, "", 2.0)


def test_open_round_numbering(state: SqlStore) -> None:
    first = state.open_round(base_round=0, deadline=time.time() + 60, expected=["b", "a"])
    assert (first.round, first.state, first.base_round) == (1, "open", 0)
    assert first.expected == ["a", "b"]
    assert first.closed is None and first.sum_file is None and first.participants == 0

    with pytest.raises(StateError, match="already open"):
        state.open_round(base_round=0, deadline=time.time() + 60, expected=["a"])

    state.finish_round(1, state="failed", reason="too few", participants=1)
    second = state.open_round(base_round=0, deadline=time.time() + 60, expected=["a"])
    assert second.round == 2
    state.finish_round(2, state="sum_ready", reason="", participants=2, sum_file="sums/round-2.sum")
    assert state.open_round(base_round=2, deadline=0.0, expected=[]).round == 3

    assert [r.round for r in state.rounds()] == [1, 2, 3]
    assert [r.round for r in state.rounds(limit=2)] == [2, 3]
    assert [r.round for r in state.rounds(after=1)] == [2, 3]
    assert state.latest_sum_round() == 2
    assert state.count_rounds("failed") == 1
    assert state.count_rounds("open") == 1
    assert state.round(99) is None


def test_duplicate_submission_is_refused(backend: tuple[str, SqlStore, str]) -> None:
    kind, state, _ = backend
    for name in ("a", "b"):
        state.touch_node(name)
    state.open_round(base_round=0, deadline=0.0, expected=["a", "b"])
    state.accept_submission(_submission(1, "a", submission_id="first"))
    with pytest.raises(RowConflict) as caught:
        state.accept_submission(_submission(1, "a", submission_id="second"))
    _conflict_is_the_databases_own(kind, caught.value)

    # The failed transaction left nothing behind and the database is still usable.
    row = state.round(1)
    assert row is not None and row.participants == 1
    assert [s.submission_id for s in state.submissions(1)] == ["first"]
    state.accept_submission(_submission(1, "b"))
    row = state.round(1)
    assert row is not None and row.participants == 2
    assert {n.name: n.submissions for n in state.nodes()} == {"a": 1, "b": 1}
    assert state.submission(1, "b") is not None
    assert state.submission(1, "c") is None


def test_submission_needs_existing_round(backend: tuple[str, SqlStore, str]) -> None:
    kind, state, _ = backend
    with pytest.raises(RowConflict) as caught:
        state.accept_submission(_submission(42, "a"))
    _conflict_is_the_databases_own(kind, caught.value)


def test_finish_round(state: SqlStore) -> None:
    state.open_round(base_round=0, deadline=0.0, expected=["a", "b"])
    state.accept_submission(_submission(1, "a", "spool/round-1/a.ct"))
    state.accept_submission(_submission(1, "b", "spool/round-1/b.ct"))
    state.finish_round(
        1,
        state="sum_ready",
        reason="",
        participants=2,
        sum_file="sums/round-1.sum",
        num_ciphertexts=3,
        num_values=20_000,
    )
    row = state.round(1)
    assert row is not None
    assert row.state == "sum_ready"
    assert row.closed is not None and row.closed >= row.opened
    assert (row.sum_file, row.num_ciphertexts, row.num_values, row.participants) == (
        "sums/round-1.sum",
        3,
        20_000,
        2,
    )
    assert [s.spool_file for s in state.submissions(1)] == [None, None]
    assert state.open_round_row() is None

    # A finished round is final: finishing it again changes nothing.
    state.finish_round(1, state="failed", reason="late", participants=0)
    again = state.round(1)
    assert again is not None and again.state == "sum_ready" and again.reason == ""


# --------------------------------------------------------------------------- spool


BLOBS = [b"first", b"", b"x" * 70_000, b"\x00\x01\x02"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writer_append_commit(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.spool_dir.is_dir() and spool.sums_dir.is_dir()
    writer = spool.writer(3, "node-a")
    for blob in BLOBS:
        writer.append(blob)
    assert writer.partial.exists() and not writer.final.exists()
    assert writer.count == len(BLOBS)
    assert writer.num_bytes == sum(len(b) for b in BLOBS)
    assert list(writer.written()) == BLOBS

    relative = writer.commit()
    assert relative == "spool/round-3/node-a.ct"
    assert spool.path(relative) == writer.final
    assert not writer.partial.exists()
    assert _mode(writer.final) == 0o600
    assert list(read_records(writer.final)) == BLOBS
    assert list(writer.written()) == BLOBS


def test_writer_discard(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    writer = spool.writer(1, "node-a")
    writer.append(b"abc")
    writer.discard()
    writer.discard()  # idempotent
    assert not writer.partial.exists() and not writer.final.exists()


def test_files_of_a_fenced_writer_never_take_the_names_of_the_current_one(tmp_path: Path) -> None:
    """Two servers on one shared state directory, a former leader (token 1) and the one that took
    its lease (token 2): the former one, resumed mid-write, finishes files under names no round
    record of the new one refers to, and cannot replace the new one's files."""
    old, new = Spool(tmp_path, fencing_token=1), Spool(tmp_path, fencing_token=2)
    ours = new.writer(4, "node-a")
    ours.append(b"new")
    stale = old.writer(4, "node-a")
    stale.append(b"old")
    assert stale.commit() == "spool/round-4/node-a.t1.ct"
    assert ours.commit() == "spool/round-4/node-a.t2.ct"
    assert list(read_records(new.path("spool/round-4/node-a.t2.ct"))) == [b"new"]
    new_sum, _ = new.write_sum(4, [b"sum of 2"])
    new.write_seeds(4, [b"seeds of 2"])
    old.write_sum(4, [b"sum of 1"])
    old.write_seeds(4, [b"seeds of 1"])
    assert new_sum == "sums/round-4.t2.sum"
    assert list(read_records(new.path(new_sum))) == [b"sum of 2"]
    assert list(read_records(new.path(new_sum).with_suffix(".seeds"))) == [b"seeds of 2"]
    # On its next start the server drops the sums no record names (here: the stale ones).
    removed = new.drop_unnamed_sums([new_sum])
    assert [p.name for p in removed] == ["round-4.t1.seeds", "round-4.t1.sum"]
    assert sorted(p.name for p in new.sums_dir.iterdir()) == ["round-4.t2.seeds", "round-4.t2.sum"]
    # SQLite's single server keeps the plain names.
    assert Spool(tmp_path / "solo").write_sum(4, [b"s"])[0] == "sums/round-4.sum"


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "x" * 65, "bad name"])
def test_writer_refuses_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(SpoolError, match="unsafe"):
        Spool(tmp_path).writer(1, name)


def _write(path: Path, blobs: list[bytes]) -> Path:
    path.write_bytes(b"".join(spool_mod.encode_records(blobs)))
    return path


def test_read_records_skip(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.ct", BLOBS)
    for skip in range(len(BLOBS) + 2):
        assert list(read_records(path, skip=skip)) == BLOBS[skip:]


def test_read_records_empty_file(tmp_path: Path) -> None:
    assert list(read_records(_write(tmp_path / "f.ct", []))) == []


@pytest.mark.parametrize("cut", [1, 2, 3, 100])
def test_read_records_truncated(tmp_path: Path, cut: int) -> None:
    path = _write(tmp_path / "f.ct", [b"a" * 50, b"b" * 200])
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(SpoolError, match="truncated"):
        list(read_records(path))


def test_read_records_truncated_length_prefix(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.ct", [b"a" * 50])
    path.write_bytes(path.read_bytes() + b"\x05\x00")
    with pytest.raises(SpoolError, match="truncated"):
        list(read_records(path))


def test_read_records_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "f.ct"
    path.write_bytes(b"SEAL?" + bytes(20))
    with pytest.raises(SpoolError, match="not a cipherhive"):
        list(read_records(path))


def test_read_records_truncated_inside_skipped_record(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.sum", [b"a" * 50, b"b" * 200, b"c" * 50])
    data = path.read_bytes()
    path.write_bytes(data[: len(spool_mod.MAGIC) + 4 + 50 + 4 + 100])  # cut inside record 1
    with pytest.raises(SpoolError, match="truncated"):
        list(read_records(path, skip=2))


def test_drop_partials(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.writer(1, "done")
    kept.append(b"ok")
    kept.commit()
    partials = [spool.writer(1, "crashed"), spool.writer(2, "other")]
    for w in partials:
        w.append(b"half")
    removed = spool.drop_partials()
    assert removed == sorted(w.partial for w in partials)
    assert not any(w.partial.exists() for w in partials)
    assert kept.final.exists()
    assert spool.drop_partials() == []
    for w in partials:
        w.discard()


def test_drop_round(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for number in (1, 2):
        w = spool.writer(number, "a")
        w.append(b"x")
        w.commit()
    spool.drop_round(1)
    assert not spool.round_dir(1).exists()
    assert (spool.round_dir(2) / "a.ct").exists()
    spool.drop_round(1)  # already gone: no error
    spool.drop_round(7)


def test_write_sum_atomic(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    relative, size = spool.write_sum(4, iter(BLOBS))
    path = spool.path(relative)
    assert relative == "sums/round-4.sum"
    assert path.exists()
    assert size == path.stat().st_size == len(spool_mod.MAGIC) + sum(4 + len(b) for b in BLOBS)
    assert _mode(path) == 0o600  # sums are private to the server
    assert list(read_records(path)) == BLOBS

    # Rewriting replaces the file whole and leaves no temporary files.
    spool.write_sum(4, [b"new"])
    assert list(read_records(path)) == [b"new"]
    assert os.listdir(spool.sums_dir) == ["round-4.sum"]


def test_write_sum_failure_keeps_old_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    relative, _ = spool.write_sum(1, [b"old"])

    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        spool.write_sum(1, broken())
    assert list(read_records(spool.path(relative))) == [b"old"]
    assert os.listdir(spool.sums_dir) == ["round-1.sum"]


def test_a_conflicting_row_is_the_interfaces_error(state: SqlStore) -> None:
    """The round logic catches RowConflict (storage.rows), whatever the database; SQLite's is
    still an IntegrityError."""
    with pytest.raises(RowConflict):
        state.accept_submission(_submission(77, "a"))  # no such round


def test_one_ciphertext_file_format_on_both_sides(tmp_path: Path) -> None:
    """The node's upload and downloaded-sum files and the server's spool are one format
    (cipherhive.runtime.records): what one side writes, the other's reader reads."""
    from cipherhive.node.sums.receive import read_records as node_read
    from cipherhive.runtime import records

    path = tmp_path / "upload.ct"
    with open(path, "wb") as fh:
        fh.write(records.MAGIC)
        for blob in BLOBS:
            records.write_record(fh, blob)
    assert list(read_records(path)) == list(node_read(path)) == BLOBS
    assert path.read_bytes() == b"".join(spool_mod.encode_records(BLOBS))
