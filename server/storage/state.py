"""The server's durable state in SQLite (the ``store.RoundStore`` implementation): members,
rounds, accepted submissions.

Why SQLite: one file next to the spool, transactions that make "accepted"
atomic with the receipt, WAL mode so readers (Admin RPCs) never block the
writer. Ciphertexts themselves live in files (see ``spool``); rows only point
at them. The schema is versioned; ``MIGRATIONS[i]`` (in ``schema``) upgrades version i to i+1.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cipherhive.runtime.fsutil import private_dir, private_file
from cipherhive.server.storage.rows import (
    MemberRow,
    NodeRow,
    OffenceRow,
    OutcomeRow,
    RoundRow,
    RowConflict,
    StateError,
    SubmissionRow,
)
from cipherhive.server.storage.schema import MIGRATIONS

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "MemberRow",
    "NodeRow",
    "OutcomeRow",
    "RoundRow",
    "State",
    "StateError",
    "SubmissionRow",
]
SCHEMA_VERSION = len(MIGRATIONS)
#: Round numbers arrive as uint64 from the wire; SQLite integers are signed 64-bit.
_MAX_SQL_INT = 2**63 - 1


class State:
    """All SQL of the server lives here; every method is one transaction."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        # The database holds the receipt signing key: private directory, private file
        # (SQLite gives its -wal and -shm files the database file's mode).
        private_dir(path.parent)
        private_file(path)
        for suffix in ("-wal", "-shm"):
            extra = path.with_name(path.name + suffix)
            if extra.exists():
                extra.chmod(0o600)
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
        if version == SCHEMA_VERSION:
            return
        # Rebuilding a table that others reference needs foreign keys off (it is a no-op
        # inside a transaction, hence here); the check below proves nothing dangles.
        self._db.execute("PRAGMA foreign_keys=OFF")
        try:
            for target in range(version, SCHEMA_VERSION):
                with self._tx() as db:
                    # executescript() would commit on its own; run statement by statement instead.
                    for statement in MIGRATIONS[target].split(";"):
                        if statement.strip():
                            db.execute(statement)
                    broken = db.execute("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise StateError(f"{path}: migration to schema {target + 1} left dangling rows")
                    db.execute(f"PRAGMA user_version = {target + 1}")
        finally:
            self._db.execute("PRAGMA foreign_keys=ON")

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

    def delete_meta(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM meta WHERE key = ?", (key,))

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
        data["culprits"] = json.loads(data["culprits"])
        return RoundRow(**data)

    def open_round(
        self,
        base_round: int,
        deadline: float,
        expected: list[str],
        min_participants: int = 0,
        *,
        nonce: bytes | None = None,
        enrol_deadline: float = 0.0,
    ) -> RoundRow:
        """Open the next round; with a ``nonce`` it is masked and starts in the enrol phase."""
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM rounds WHERE state = 'open'").fetchone():
                raise StateError("a round is already open")
            last = db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()[0]
            db.execute(
                "INSERT INTO rounds (round, state, base_round, opened, deadline, expected, "
                "min_participants, masked, nonce, phase, enrol_deadline) "
                "VALUES (?, 'open', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    last + 1,
                    base_round,
                    now,
                    deadline,
                    json.dumps(sorted(expected)),
                    min_participants,
                    int(nonce is not None),
                    nonce,
                    "enrol" if nonce is not None else "",
                    enrol_deadline,
                ),
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

    def rounds_page(self, limit: int, before: int = 0) -> tuple[list[RoundRow], int]:
        """Up to ``limit`` rounds numbered below ``before`` (0: the newest), oldest first,
        and the ``before`` of the next older page (0: none)."""
        before = _MAX_SQL_INT if before <= 0 else min(before, _MAX_SQL_INT)
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM rounds WHERE round < ? ORDER BY round DESC LIMIT ?", (before, limit + 1)
            ).fetchall()
        more = len(rows) > limit
        page = [self._round(r) for r in reversed(rows[:limit])]
        return page, (page[0].round if more and page else 0)

    def latest_round(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()[0])

    def published_count(self) -> int:
        """Rounds whose sum was ever released (withdrawn ones included)."""
        with self._lock:
            return int(
                self._db.execute(
                    "SELECT COUNT(*) FROM rounds WHERE state IN ('sum_ready', 'withdrawn')"
                ).fetchone()[0]
            )

    def withdrawn_rounds(self, limit: int = 1000) -> list[RoundRow]:
        """The most recent ``limit`` withdrawn rounds, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM rounds WHERE state = 'withdrawn' ORDER BY round DESC LIMIT ?", (limit,)
            ).fetchall()
        return [self._round(r) for r in reversed(rows)]

    def withdraw(self, numbers: list[int], reason: str, now: float) -> list[str]:
        """Mark published rounds withdrawn; returns their sum files (to delete)."""
        files: list[str] = []
        with self._tx() as db:
            for number in numbers:
                row = db.execute(
                    "SELECT sum_file FROM rounds WHERE round = ? AND state = 'sum_ready'", (number,)
                ).fetchone()
                if row is None:
                    continue
                if row[0]:
                    files.append(str(row[0]))
                db.execute(
                    "UPDATE rounds SET state = 'withdrawn', withdrawn_reason = ?, withdrawn_unix = ?, "
                    "sum_file = NULL WHERE round = ?",
                    (reason, now, number),
                )
        return files

    def kept_sums(self) -> list[tuple[int, str]]:
        """(round, sum file) of every published, not withdrawn round whose sum is on disk, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT round, sum_file FROM rounds WHERE state = 'sum_ready' AND sum_file IS NOT NULL "
                "ORDER BY round DESC"
            ).fetchall()
        return [(int(r[0]), str(r[1])) for r in rows]

    def forget_sum(self, number: int) -> None:
        """The sum file of a published round was pruned: the row stays, the file is gone."""
        with self._tx() as db:
            db.execute("UPDATE rounds SET sum_file = NULL WHERE round = ?", (number,))

    def oldest_kept_round(self) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(MIN(round), 0) FROM rounds "
                "WHERE state = 'sum_ready' AND sum_file IS NOT NULL"
            ).fetchone()
        return int(row[0])

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
        failed_step: str = "",
        culprits: Sequence[str] = (),
        offences: Sequence[OffenceRow] = (),
    ) -> None:
        """Mark a round published or failed, with the step that decided a failure, whom it
        names, and their offences (one transaction); spooled submissions are no longer needed."""
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET state = ?, reason = ?, participants = ?, closed = ?, "
                "sum_file = ?, num_ciphertexts = ?, num_values = ?, failed_step = ?, culprits = ?, "
                "phase = CASE WHEN masked = 1 THEN 'done' ELSE phase END "
                "WHERE round = ? AND state = 'open'",
                (
                    state,
                    reason,
                    participants,
                    time.time(),
                    sum_file,
                    num_ciphertexts,
                    num_values,
                    failed_step,
                    json.dumps(sorted(culprits)),
                    number,
                ),
            )
            for o in offences:
                db.execute(
                    "INSERT OR REPLACE INTO offences (round, node, step, reason, at, excluded_until) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (o.round, o.node, o.step, o.reason, o.at, o.excluded_until),
                )
            db.execute("UPDATE submissions SET spool_file = NULL WHERE round = ?", (number,))

    # ------------------------------------------------------------ submissions

    def accept_submission(self, row: SubmissionRow) -> None:
        """Record an accepted submission; raises :class:`RowConflict` on a second one."""
        with _conflicts(), self._tx() as db:
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
                "UPDATE nodes SET submissions = submissions + 1, last_round = ?, last_seen = ?, "
                "missed_rounds = 0 WHERE name = ?",
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

    def submissions_between(self, first: int, last: int) -> dict[int, list[SubmissionRow]]:
        """Submissions of rounds ``first``..``last`` in one query (a page of ListRounds)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM submissions WHERE round BETWEEN ? AND ? ORDER BY round, accepted",
                (min(first, _MAX_SQL_INT), min(last, _MAX_SQL_INT)),
            ).fetchall()
        out: dict[int, list[SubmissionRow]] = {}
        for r in rows:
            data = dict(r)
            data["metrics"] = json.loads(data["metrics"])
            out.setdefault(data["round"], []).append(SubmissionRow(**data))
        return out

    # ------------------------------------------------------------ participation

    def record_missed(self, number: int, expected: list[str], submitted: set[str]) -> None:
        """After a round closes: expected nodes that did not submit missed one more in a row."""
        with self._tx() as db:
            for node in expected:
                if node in submitted:
                    db.execute("UPDATE nodes SET missed_rounds = 0 WHERE name = ?", (node,))
                else:
                    db.execute("UPDATE nodes SET missed_rounds = missed_rounds + 1 WHERE name = ?", (node,))

    def missed_rounds(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT name, missed_rounds FROM nodes").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    # ------------------------------------------------------------ outcomes

    def record_outcome(self, row: OutcomeRow) -> None:
        """One report per node per round: a later one replaces the earlier."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO outcomes (round, node, applied, reason, reported) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(round, node) DO UPDATE SET applied = excluded.applied, "
                "reason = excluded.reason, reported = excluded.reported",
                (row.round, row.node, int(row.applied), row.reason, row.reported),
            )

    def outcomes_between(self, first: int, last: int) -> dict[int, list[OutcomeRow]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outcomes WHERE round BETWEEN ? AND ? ORDER BY round, node",
                (min(first, _MAX_SQL_INT), min(last, _MAX_SQL_INT)),
            ).fetchall()
        out: dict[int, list[OutcomeRow]] = {}
        for r in rows:
            data = dict(r)
            data["applied"] = bool(data["applied"])
            out.setdefault(data["round"], []).append(OutcomeRow(**data))
        return out

    def outcomes(self, number: int) -> list[OutcomeRow]:
        if number > _MAX_SQL_INT:
            return []
        return self.outcomes_between(number, number).get(number, [])

    # ------------------------------------------------------------ masked rounds

    def _member(self, row: sqlite3.Row) -> MemberRow:
        return MemberRow(
            row["round"],
            row["node"],
            row["enrolment"],
            bool(row["in_roster"]),
            row["commit_bytes"],
            row["seed"],
        )

    def members(self, number: int, roster_only: bool = False) -> list[MemberRow]:
        """A masked round's enrolled members (or only its roster), by name."""
        sql = "SELECT * FROM members WHERE round = ?" + (" AND in_roster = 1" if roster_only else "")
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY node", (number,)).fetchall()
        return [self._member(r) for r in rows]

    def add_enrolment(self, number: int, node: str, enrolment: bytes) -> None:
        """Record an enrolment; raises :class:`RowConflict` if the node already enrolled."""
        with _conflicts(), self._tx() as db:
            db.execute(
                "INSERT INTO members (round, node, enrolment) VALUES (?, ?, ?)", (number, node, enrolment)
            )

    def fix_roster(self, number: int, nodes: list[str], roster_hash: bytes) -> None:
        """The roster is fixed: these members, this hash; the round moves to its upload phase."""
        with self._tx() as db:
            db.executemany(
                "UPDATE members SET in_roster = 1 WHERE round = ? AND node = ?", [(number, n) for n in nodes]
            )
            db.execute(
                "UPDATE rounds SET phase = 'upload', roster_hash = ? WHERE round = ? AND state = 'open'",
                (roster_hash, number),
            )

    def reform_roster(self, number: int, nodes: list[str], roster_hash: bytes) -> None:
        """The roster is re-formed (once) with only these members and this hash (§2.1)."""
        with self._tx() as db:
            db.execute("UPDATE members SET in_roster = 0 WHERE round = ?", (number,))
            db.executemany(
                "UPDATE members SET in_roster = 1 WHERE round = ? AND node = ?", [(number, n) for n in nodes]
            )
            db.execute(
                "UPDATE rounds SET roster_hash = ?, reformed = 1 WHERE round = ? AND state = 'open'",
                (roster_hash, number),
            )

    def drop_enrolment(self, number: int, node: str) -> None:
        """A member withdrew before the roster was fixed: its enrolment is forgotten."""
        with self._tx() as db:
            db.execute("DELETE FROM members WHERE round = ? AND node = ? AND in_roster = 0", (number, node))

    # ------------------------------------------------------------ offences

    def offences(self, node: str | None = None, since_round: int = 0) -> list[OffenceRow]:
        """Offences after ``since_round`` (of one member, or of all), oldest first."""
        sql = "SELECT * FROM offences WHERE round > ?"
        params: tuple[object, ...] = (min(since_round, _MAX_SQL_INT),)
        if node is not None:
            sql += " AND node = ?"
            params += (node,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY round, node", params).fetchall()
        return [OffenceRow(**dict(r)) for r in rows]

    def record_offence(self, row: OffenceRow) -> None:
        """One offence per member per round: a later one replaces the earlier."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO offences (round, node, step, reason, at, excluded_until) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (row.round, row.node, row.step, row.reason, row.at, row.excluded_until),
            )

    def readmit(self, node: str, after_round: int) -> bool:
        """Offences up to ``after_round`` no longer count for ``node``; False if it is unknown."""
        with self._tx() as db:
            cur = db.execute("UPDATE nodes SET readmitted_round = ? WHERE name = ?", (after_round, node))
            return cur.rowcount > 0

    def set_phase(self, number: int, phase: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE rounds SET phase = ? WHERE round = ? AND state = 'open'", (phase, number))

    def set_commit(self, number: int, node: str, commit: bytes, *, phase: str | None = None) -> None:
        """Record a member's commit; with ``phase``, move the round to it in the same
        transaction, so a crash can never leave every commit stored but the phase behind."""
        with self._tx() as db:
            db.execute(
                "UPDATE members SET commit_bytes = ? WHERE round = ? AND node = ? AND commit_bytes IS NULL",
                (commit, number, node),
            )
            if phase is not None:
                db.execute("UPDATE rounds SET phase = ? WHERE round = ? AND state = 'open'", (phase, number))

    def set_seed(self, number: int, node: str, seed: bytes) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE members SET seed = ? WHERE round = ? AND node = ? AND seed IS NULL",
                (seed, number, node),
            )

    def forget_members(self, number: int, keep_proof: bool) -> None:
        """At a round's end: released seeds are dropped; a published round keeps its proof
        (enrolments and commits), a failed one keeps nothing."""
        with self._tx() as db:
            if keep_proof:
                db.execute("DELETE FROM members WHERE round = ? AND in_roster = 0", (number,))
                db.execute("UPDATE members SET seed = NULL WHERE round = ?", (number,))
            else:
                db.execute("DELETE FROM members WHERE round = ?", (number,))


class SqliteRowConflict(RowConflict, sqlite3.IntegrityError):
    """SQLite's conflict: the interface's :class:`RowConflict`, still an IntegrityError."""


@contextmanager
def _conflicts() -> Iterator[None]:
    """A key clash on insert (primary or foreign) becomes the interface's :class:`RowConflict`."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise SqliteRowConflict(*exc.args) from exc
