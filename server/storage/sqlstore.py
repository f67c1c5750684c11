"""The round state's SQL, written once for both databases (``state.State``, SQLite, and
``postgres.PostgresState``): every ``store.RoundStore`` method as statements over a
transaction, with rows decoded into ``rows``' dataclasses.

A database supplies only its connection: a transaction that holds its writers' lock
(``_tx``), a read outside one (``_read``), its key clash as :class:`RowConflict`
(``_conflicts``) and a lock for the read-modify-write of opening or withdrawing a round
(``_lock_rounds``). Statements use ``?`` placeholders and the SQL both databases speak
(``ON CONFLICT ... DO UPDATE`` rather than SQLite's ``INSERT OR REPLACE``), so the two stores
cannot drift apart; see docs/explanation/reliability.md for why every method is one transaction.
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from cipherhive.server.storage.rows import (
    MemberRow,
    NodeRow,
    OffenceRow,
    OutcomeRow,
    RoundRow,
    StateError,
    SubmissionRow,
)
from cipherhive.server.storage.schema import TABLES

__all__ = ["MAX_SQL_INT", "SqlStore", "Tx"]

#: Round numbers arrive as uint64 from the wire; both databases' integers are signed 64-bit.
MAX_SQL_INT = 2**63 - 1

Row = dict[str, Any]


class Tx(Protocol):
    """One open transaction of a store's database."""

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        """Execute a statement; the number of rows it changed."""
        ...

    def run_many(self, sql: str, params: Iterable[Sequence[object]]) -> None: ...


def _round(row: Row) -> RoundRow:
    data = dict(row)
    data["expected"] = json.loads(data["expected"])
    data["culprits"] = json.loads(data["culprits"])
    return RoundRow(**data)


def _submission(row: Row) -> SubmissionRow:
    data = dict(row)
    data["metrics"] = json.loads(data["metrics"])
    return SubmissionRow(**data)


def _outcome(row: Row) -> OutcomeRow:
    return OutcomeRow(**{**row, "applied": bool(row["applied"])})


def _member(row: Row) -> MemberRow:
    return MemberRow(
        row["round"],
        row["node"],
        bytes(row["enrolment"]),
        bool(row["in_roster"]),
        None if row["commit_bytes"] is None else bytes(row["commit_bytes"]),
        None if row["seed"] is None else bytes(row["seed"]),
    )


def _offence_upsert(rows: Iterable[OffenceRow]) -> tuple[str, list[tuple[object, ...]]]:
    """One offence per member per round: a later one replaces the earlier."""
    sql = (
        "INSERT INTO offences (round, node, step, reason, at, excluded_until) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (round, node) DO UPDATE SET step = excluded.step, reason = excluded.reason, "
        "at = excluded.at, excluded_until = excluded.excluded_until"
    )
    return sql, [(o.round, o.node, o.step, o.reason, o.at, o.excluded_until) for o in rows]


class SqlStore(ABC):
    """Every ``RoundStore`` method; each is one transaction (or one read)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # ------------------------------------------------------------ what a database supplies

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Tx]:
        """A transaction that writers take one at a time; committed when the block ends."""

    @abstractmethod
    def _read(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """One read, outside a transaction."""

    @abstractmethod
    def _conflicts(self) -> AbstractContextManager[None]:
        """Turn the database's key clash (primary or foreign) into a :class:`RowConflict`."""

    @abstractmethod
    def _lock_rounds(self, tx: Tx) -> None:
        """Hold off other writers of ``rounds`` until ``tx`` ends (a read, then a write on it)."""

    @abstractmethod
    def close(self) -> None: ...

    def _value(self, sql: str, params: Sequence[object] = ()) -> Any:
        """The ``n`` column of a one-row read."""
        return self._read(sql, params)[0]["n"]

    # ------------------------------------------------------------ meta

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return None if not rows else str(rows[0]["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.run(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def delete_meta(self, key: str) -> None:
        with self._tx() as db:
            db.run("DELETE FROM meta WHERE key = ?", (key,))

    # ------------------------------------------------------------ nodes

    def touch_node(self, name: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.run(
                "INSERT INTO nodes (name, first_seen, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen",
                (name, now, now),
            )

    def set_node_serial(self, name: str, serial: str) -> None:
        with self._tx() as db:
            db.run("UPDATE nodes SET cert_serial = ? WHERE name = ?", (serial, name))

    def nodes(self) -> list[NodeRow]:
        return [NodeRow(**r) for r in self._read("SELECT * FROM nodes ORDER BY name")]

    # ------------------------------------------------------------ rounds

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
            self._lock_rounds(db)
            if db.rows("SELECT 1 AS n FROM rounds WHERE state = 'open'"):
                raise StateError("a round is already open")
            last = int(db.rows("SELECT COALESCE(MAX(round), 0) AS n FROM rounds")[0]["n"])
            db.run(
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
        if number > MAX_SQL_INT:
            return None
        rows = self._read("SELECT * FROM rounds WHERE round = ?", (number,))
        return None if not rows else _round(rows[0])

    def rounds(self, limit: int = 0, after: int = 0) -> list[RoundRow]:
        after = min(after, MAX_SQL_INT)
        sql = "SELECT * FROM rounds WHERE round > ? ORDER BY round DESC"
        params: tuple[int, ...] = (after,)
        if limit:
            sql += " LIMIT ?"
            params = (after, limit)
        return [_round(r) for r in reversed(self._read(sql, params))]

    def rounds_page(self, limit: int, before: int = 0) -> tuple[list[RoundRow], int]:
        """Up to ``limit`` rounds numbered below ``before`` (0: the newest), oldest first,
        and the ``before`` of the next older page (0: none)."""
        before = MAX_SQL_INT if before <= 0 else min(before, MAX_SQL_INT)
        rows = self._read(
            "SELECT * FROM rounds WHERE round < ? ORDER BY round DESC LIMIT ?", (before, limit + 1)
        )
        more = len(rows) > limit
        page = [_round(r) for r in reversed(rows[:limit])]
        return page, (page[0].round if more and page else 0)

    def latest_round(self) -> int:
        return int(self._value("SELECT COALESCE(MAX(round), 0) AS n FROM rounds"))

    def published_count(self) -> int:
        """Rounds whose sum was ever released (withdrawn ones included)."""
        return int(self._value("SELECT COUNT(*) AS n FROM rounds WHERE state IN ('sum_ready', 'withdrawn')"))

    def withdrawn_rounds(self, limit: int = 1000) -> list[RoundRow]:
        """The most recent ``limit`` withdrawn rounds, oldest first."""
        rows = self._read(
            "SELECT * FROM rounds WHERE state = 'withdrawn' ORDER BY round DESC LIMIT ?", (limit,)
        )
        return [_round(r) for r in reversed(rows)]

    def withdraw(self, numbers: list[int], reason: str, now: float) -> list[str]:
        """Mark published rounds withdrawn; returns their sum files (to delete)."""
        files: list[str] = []
        with self._tx() as db:
            self._lock_rounds(db)
            for number in numbers:
                rows = db.rows(
                    "SELECT sum_file FROM rounds WHERE round = ? AND state = 'sum_ready'",
                    (min(number, MAX_SQL_INT),),
                )
                if not rows:
                    continue
                if rows[0]["sum_file"]:
                    files.append(str(rows[0]["sum_file"]))
                db.run(
                    "UPDATE rounds SET state = 'withdrawn', withdrawn_reason = ?, withdrawn_unix = ?, "
                    "sum_file = NULL WHERE round = ?",
                    (reason, now, number),
                )
        return files

    def kept_sums(self) -> list[tuple[int, str]]:
        """(round, sum file) of every published, not withdrawn round whose sum is on disk, newest first."""
        rows = self._read(
            "SELECT round, sum_file FROM rounds WHERE state = 'sum_ready' AND sum_file IS NOT NULL "
            "ORDER BY round DESC"
        )
        return [(int(r["round"]), str(r["sum_file"])) for r in rows]

    def forget_sum(self, number: int) -> None:
        """The sum file of a published round was pruned: the row stays, the file is gone."""
        with self._tx() as db:
            db.run("UPDATE rounds SET sum_file = NULL WHERE round = ?", (number,))

    def oldest_kept_round(self) -> int:
        return int(
            self._value(
                "SELECT COALESCE(MIN(round), 0) AS n FROM rounds "
                "WHERE state = 'sum_ready' AND sum_file IS NOT NULL"
            )
        )

    def open_round_row(self) -> RoundRow | None:
        rows = self._read("SELECT * FROM rounds WHERE state = 'open'")
        return None if not rows else _round(rows[0])

    def latest_sum_round(self) -> int:
        return int(self._value("SELECT COALESCE(MAX(round), 0) AS n FROM rounds WHERE state = 'sum_ready'"))

    def count_rounds(self, state: str) -> int:
        return int(self._value("SELECT COUNT(*) AS n FROM rounds WHERE state = ?", (state,)))

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
            db.run(
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
            if offences:
                db.run_many(*_offence_upsert(offences))
            db.run("UPDATE submissions SET spool_file = NULL WHERE round = ?", (number,))

    # ------------------------------------------------------------ submissions

    def accept_submission(self, row: SubmissionRow) -> None:
        """Record an accepted submission; raises :class:`RowConflict` on a second one."""
        with self._conflicts(), self._tx() as db:
            db.run(
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
            db.run("UPDATE rounds SET participants = participants + 1 WHERE round = ?", (row.round,))
            db.run(
                "UPDATE nodes SET submissions = submissions + 1, last_round = ?, last_seen = ?, "
                "missed_rounds = 0 WHERE name = ?",
                (row.round, row.accepted, row.node),
            )

    def submissions(self, number: int) -> list[SubmissionRow]:
        if number > MAX_SQL_INT:
            return []
        rows = self._read("SELECT * FROM submissions WHERE round = ? ORDER BY accepted", (number,))
        return [_submission(r) for r in rows]

    def submission(self, number: int, node: str) -> SubmissionRow | None:
        return next((s for s in self.submissions(number) if s.node == node), None)

    def submissions_between(self, first: int, last: int) -> dict[int, list[SubmissionRow]]:
        """Submissions of rounds ``first``..``last`` in one query (a page of ListRounds)."""
        rows = self._read(
            "SELECT * FROM submissions WHERE round BETWEEN ? AND ? ORDER BY round, accepted",
            (min(first, MAX_SQL_INT), min(last, MAX_SQL_INT)),
        )
        out: dict[int, list[SubmissionRow]] = {}
        for r in rows:
            out.setdefault(r["round"], []).append(_submission(r))
        return out

    # ------------------------------------------------------------ participation

    def record_missed(self, number: int, expected: list[str], submitted: set[str]) -> None:
        """After a round closes: expected nodes that did not submit missed one more in a row."""
        with self._tx() as db:
            for node in expected:
                if node in submitted:
                    db.run("UPDATE nodes SET missed_rounds = 0 WHERE name = ?", (node,))
                else:
                    db.run("UPDATE nodes SET missed_rounds = missed_rounds + 1 WHERE name = ?", (node,))

    def missed_rounds(self) -> dict[str, int]:
        rows = self._read("SELECT name, missed_rounds FROM nodes")
        return {str(r["name"]): int(r["missed_rounds"]) for r in rows}

    # ------------------------------------------------------------ outcomes

    def record_outcome(self, row: OutcomeRow) -> None:
        """One report per node per round: a later one replaces the earlier."""
        with self._tx() as db:
            db.run(
                "INSERT INTO outcomes (round, node, applied, reason, reported) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (round, node) DO UPDATE SET applied = excluded.applied, "
                "reason = excluded.reason, reported = excluded.reported",
                (row.round, row.node, int(row.applied), row.reason, row.reported),
            )

    def outcomes_between(self, first: int, last: int) -> dict[int, list[OutcomeRow]]:
        rows = self._read(
            "SELECT * FROM outcomes WHERE round BETWEEN ? AND ? ORDER BY round, node",
            (min(first, MAX_SQL_INT), min(last, MAX_SQL_INT)),
        )
        out: dict[int, list[OutcomeRow]] = {}
        for r in rows:
            out.setdefault(r["round"], []).append(_outcome(r))
        return out

    def outcomes(self, number: int) -> list[OutcomeRow]:
        if number > MAX_SQL_INT:
            return []
        return self.outcomes_between(number, number).get(number, [])

    # ------------------------------------------------------------ masked rounds

    def members(self, number: int, roster_only: bool = False) -> list[MemberRow]:
        """A masked round's enrolled members (or only its roster), by name."""
        sql = "SELECT * FROM members WHERE round = ?" + (" AND in_roster = 1" if roster_only else "")
        return [_member(r) for r in self._read(sql + " ORDER BY node", (min(number, MAX_SQL_INT),))]

    def add_enrolment(self, number: int, node: str, enrolment: bytes) -> None:
        """Record an enrolment; raises :class:`RowConflict` if the node already enrolled."""
        with self._conflicts(), self._tx() as db:
            db.run("INSERT INTO members (round, node, enrolment) VALUES (?, ?, ?)", (number, node, enrolment))

    def fix_roster(self, number: int, nodes: list[str], roster_hash: bytes) -> None:
        """The roster is fixed: these members, this hash; the round moves to its upload phase."""
        with self._tx() as db:
            db.run_many(
                "UPDATE members SET in_roster = 1 WHERE round = ? AND node = ?", [(number, n) for n in nodes]
            )
            db.run(
                "UPDATE rounds SET phase = 'upload', roster_hash = ? WHERE round = ? AND state = 'open'",
                (roster_hash, number),
            )

    def reform_roster(self, number: int, nodes: list[str], roster_hash: bytes) -> None:
        """The roster is re-formed (once) with only these members and this hash (§2.1)."""
        with self._tx() as db:
            db.run("UPDATE members SET in_roster = 0 WHERE round = ?", (number,))
            db.run_many(
                "UPDATE members SET in_roster = 1 WHERE round = ? AND node = ?", [(number, n) for n in nodes]
            )
            db.run(
                "UPDATE rounds SET roster_hash = ?, reformed = 1 WHERE round = ? AND state = 'open'",
                (roster_hash, number),
            )

    def drop_enrolment(self, number: int, node: str) -> None:
        """A member withdrew before the roster was fixed: its enrolment is forgotten."""
        with self._tx() as db:
            db.run("DELETE FROM members WHERE round = ? AND node = ? AND in_roster = 0", (number, node))

    # ------------------------------------------------------------ offences

    def offences(self, node: str | None = None, since_round: int = 0) -> list[OffenceRow]:
        """Offences after ``since_round`` (of one member, or of all), oldest first."""
        sql = "SELECT * FROM offences WHERE round > ?"
        params: tuple[object, ...] = (min(since_round, MAX_SQL_INT),)
        if node is not None:
            sql += " AND node = ?"
            params += (node,)
        return [OffenceRow(**r) for r in self._read(sql + " ORDER BY round, node", params)]

    def record_offence(self, row: OffenceRow) -> None:
        """One offence per member per round: a later one replaces the earlier."""
        with self._tx() as db:
            db.run_many(*_offence_upsert([row]))

    def readmit(self, node: str, after_round: int) -> bool:
        """Offences up to ``after_round`` no longer count for ``node``; False if it is unknown."""
        with self._tx() as db:
            return db.run("UPDATE nodes SET readmitted_round = ? WHERE name = ?", (after_round, node)) > 0

    def set_phase(self, number: int, phase: str) -> None:
        with self._tx() as db:
            db.run("UPDATE rounds SET phase = ? WHERE round = ? AND state = 'open'", (phase, number))

    def set_commit(self, number: int, node: str, commit: bytes, *, phase: str | None = None) -> None:
        """Record a member's commit; with ``phase``, move the round to it in the same
        transaction, so a crash can never leave every commit stored but the phase behind."""
        with self._tx() as db:
            db.run(
                "UPDATE members SET commit_bytes = ? WHERE round = ? AND node = ? AND commit_bytes IS NULL",
                (commit, number, node),
            )
            if phase is not None:
                db.run("UPDATE rounds SET phase = ? WHERE round = ? AND state = 'open'", (phase, number))

    def set_seed(self, number: int, node: str, seed: bytes) -> None:
        with self._tx() as db:
            db.run(
                "UPDATE members SET seed = ? WHERE round = ? AND node = ? AND seed IS NULL",
                (seed, number, node),
            )

    def forget_members(self, number: int, keep_proof: bool) -> None:
        """At a round's end: released seeds are dropped; a published round keeps its proof
        (enrolments and commits), a failed one keeps nothing."""
        with self._tx() as db:
            if keep_proof:
                db.run("DELETE FROM members WHERE round = ? AND in_roster = 0", (number,))
                db.run("UPDATE members SET seed = NULL WHERE round = ?", (number,))
            else:
                db.run("DELETE FROM members WHERE round = ?", (number,))

    # ------------------------------------------------------------ whole tables (migrate-state)

    def table_rows(self, table: str) -> list[Row]:
        """Every row of one of the state's tables (``schema.TABLES``)."""
        if table not in TABLES:
            raise ValueError(f"not a table of the round state: {table!r}")
        return self._read(f"SELECT * FROM {table}")

    def row_counts(self) -> dict[str, int]:
        """Rows in each of the state's tables."""
        return {t: int(self._value(f"SELECT COUNT(*) AS n FROM {t}")) for t in TABLES}

    def copy_from(self, source: SqlStore) -> dict[str, int]:
        """Copy every row of ``source`` into this store, which must hold none, in one
        transaction that commits only if every table's count matches the source's."""
        held = {t: n for t, n in self.row_counts().items() if n}
        if held:
            raise StateError(
                "the target already holds round state ("
                + ", ".join(f"{n} rows in {t}" for t, n in held.items())
                + "); copy only into an empty database"
            )
        copied: dict[str, int] = {}
        with self._tx() as db:
            for table in TABLES:
                rows = source.table_rows(table)
                if rows:
                    columns = list(rows[0])
                    marks = ", ".join("?" for _ in columns)
                    db.run_many(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                        [tuple(r[c] for c in columns) for r in rows],
                    )
                stored = int(db.rows(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])
                if stored != len(rows):
                    raise StateError(
                        f"{table}: {len(rows)} rows read but {stored} stored; nothing was copied"
                    )
                copied[table] = stored
        return copied
