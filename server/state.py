"""The server's durable state in SQLite: members, rounds, accepted submissions.

Why SQLite: one file next to the spool, transactions that make "accepted"
atomic with the receipt, WAL mode so readers (Admin RPCs) never block the
writer. Ciphertexts themselves live in files (see ``spool``); rows only point
at them. The schema is versioned; ``MIGRATIONS[i]`` upgrades version i to i+1.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cipherhive.errors import UserError

MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        last_round INTEGER NOT NULL DEFAULT 0,
        submissions INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE rounds (
        round INTEGER PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('open', 'sum_ready', 'failed')),
        base_round INTEGER NOT NULL,
        opened REAL NOT NULL,
        deadline REAL NOT NULL,
        closed REAL,
        expected TEXT NOT NULL,
        participants INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        sum_file TEXT,
        num_ciphertexts INTEGER NOT NULL DEFAULT 0,
        num_values INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE submissions (
        round INTEGER NOT NULL REFERENCES rounds(round),
        node TEXT NOT NULL,
        submission_id TEXT NOT NULL,
        receipt TEXT NOT NULL,
        accepted REAL NOT NULL,
        num_bytes INTEGER NOT NULL,
        spool_file TEXT,
        metrics TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (round, node)
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
#: Round numbers arrive as uint64 from the wire; SQLite integers are signed 64-bit.
_MAX_SQL_INT = 2**63 - 1


@dataclass
class RoundRow:
    round: int
    state: str
    base_round: int
    opened: float
    deadline: float
    closed: float | None
    expected: list[str]
    participants: int
    reason: str
    sum_file: str | None
    num_ciphertexts: int
    num_values: int


@dataclass
class SubmissionRow:
    round: int
    node: str
    submission_id: str
    receipt: str
    accepted: float
    num_bytes: int
    spool_file: str | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class NodeRow:
    name: str
    first_seen: float
    last_seen: float
    last_round: int
    submissions: int


class StateError(UserError, RuntimeError):
    """The state directory cannot be used (newer schema, corrupt database)."""


class State:
    """All SQL of the server lives here; every method is one transaction."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged submission survives power loss
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate(path)

    def _migrate(self, path: Path) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{path} has schema version {version}, newer than this cipherhive "
                f"({SCHEMA_VERSION}); upgrade cipherhive or restore a backup"
            )
        for target in range(version, SCHEMA_VERSION):
            with self._tx() as db:
                # executescript() would commit on its own; run statement by statement instead.
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {target + 1}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ meta

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # ------------------------------------------------------------ nodes

    def touch_node(self, name: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "INSERT INTO nodes (name, first_seen, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET last_seen = excluded.last_seen",
                (name, now, now),
            )

    def nodes(self) -> list[NodeRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM nodes ORDER BY name").fetchall()
        return [NodeRow(**dict(r)) for r in rows]

    # ------------------------------------------------------------ rounds

    def _round(self, row: sqlite3.Row) -> RoundRow:
        data = dict(row)
        data["expected"] = json.loads(data["expected"])
        return RoundRow(**data)

    def open_round(self, base_round: int, deadline: float, expected: list[str]) -> RoundRow:
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM rounds WHERE state = 'open'").fetchone():
                raise StateError("a round is already open")
            last = db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()[0]
            db.execute(
                "INSERT INTO rounds (round, state, base_round, opened, deadline, expected) "
                "VALUES (?, 'open', ?, ?, ?, ?)",
                (last + 1, base_round, now, deadline, json.dumps(sorted(expected))),
            )
        row = self.round(last + 1)
        assert row is not None
        return row

    def round(self, number: int) -> RoundRow | None:
        if number > _MAX_SQL_INT:
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM rounds WHERE round = ?", (number,)).fetchone()
        return None if row is None else self._round(row)

    def rounds(self, limit: int = 0, after: int = 0) -> list[RoundRow]:
        after = min(after, _MAX_SQL_INT)
        sql = "SELECT * FROM rounds WHERE round > ? ORDER BY round DESC"
        params: tuple[int, ...] = (after,)
        if limit:
            sql += " LIMIT ?"
            params = (after, limit)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [self._round(r) for r in reversed(rows)]

    def open_round_row(self) -> RoundRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM rounds WHERE state = 'open'").fetchone()
        return None if row is None else self._round(row)

    def latest_sum_round(self) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(MAX(round), 0) FROM rounds WHERE state = 'sum_ready'"
            ).fetchone()
        return int(row[0])

    def count_rounds(self, state: str) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM rounds WHERE state = ?", (state,)).fetchone()[0]
            )

    def finish_round(
        self,
        number: int,
        *,
        state: str,
        reason: str,
        participants: int,
        sum_file: str | None = None,
        num_ciphertexts: int = 0,
        num_values: int = 0,
    ) -> None:
        """Mark a round published or failed; spooled submissions are no longer needed."""
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET state = ?, reason = ?, participants = ?, closed = ?, "
                "sum_file = ?, num_ciphertexts = ?, num_values = ? WHERE round = ? AND state = 'open'",
                (
                    state,
                    reason,
                    participants,
                    time.time(),
                    sum_file,
                    num_ciphertexts,
                    num_values,
                    number,
                ),
            )
            db.execute("UPDATE submissions SET spool_file = NULL WHERE round = ?", (number,))

    # ------------------------------------------------------------ submissions

    def accept_submission(self, row: SubmissionRow) -> None:
        """Record an accepted submission; raises sqlite3.IntegrityError on a second one."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO submissions (round, node, submission_id, receipt, accepted, "
                "num_bytes, spool_file, metrics) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.round,
                    row.node,
                    row.submission_id,
                    row.receipt,
                    row.accepted,
                    row.num_bytes,
                    row.spool_file,
                    json.dumps(row.metrics),
                ),
            )
            db.execute("UPDATE rounds SET participants = participants + 1 WHERE round = ?", (row.round,))
            db.execute(
                "UPDATE nodes SET submissions = submissions + 1, last_round = ?, last_seen = ? "
                "WHERE name = ?",
                (row.round, row.accepted, row.node),
            )

    def submissions(self, number: int) -> list[SubmissionRow]:
        if number > _MAX_SQL_INT:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM submissions WHERE round = ? ORDER BY accepted", (number,)
            ).fetchall()
        out = []
        for r in rows:
            data = dict(r)
            data["metrics"] = json.loads(data["metrics"])
            out.append(SubmissionRow(**data))
        return out

    def submission(self, number: int, node: str) -> SubmissionRow | None:
        return next((s for s in self.submissions(number) if s.node == node), None)
