"""The server's durable state in SQLite (a ``store.RoundStore``; the default, and
``postgres.PostgresState`` the other): members, rounds, accepted submissions.

Why SQLite: one file next to the spool, transactions that make "accepted"
atomic with the receipt, WAL mode so readers (Admin RPCs) never block the
writer. Ciphertexts themselves live in files (see ``spool``); rows only point
at them. The statements are ``sqlstore``'s, shared with PostgreSQL; this module holds the
connection. The schema is versioned; ``MIGRATIONS[i]`` (in ``schema``) upgrades version i to i+1.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from cipherhive.runtime.fsutil import private_dir, private_file
from cipherhive.server.storage.rows import (
    MemberRow,
    NodeRow,
    OutcomeRow,
    RoundRow,
    RowConflict,
    StateError,
    SubmissionRow,
)
from cipherhive.server.storage.schema import MIGRATIONS, SCHEMA_VERSION
from cipherhive.server.storage.sqlstore import SqlStore

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


class _SqliteTx:
    """``sqlstore.Tx`` over the connection, inside ``BEGIN IMMEDIATE``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute(sql, params).fetchall()]

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    def run_many(self, sql: str, params: Iterable[Sequence[object]]) -> None:
        self._db.executemany(sql, params)


class State(SqlStore):
    """The round state in one SQLite file; every method is one transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__()
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
                            db.run(statement)
                    if db.rows("PRAGMA foreign_key_check"):
                        raise StateError(f"{path}: migration to schema {target + 1} left dangling rows")
                    db.run(f"PRAGMA user_version = {target + 1}")
        finally:
            self._db.execute("PRAGMA foreign_keys=ON")

    @contextmanager
    def _tx(self) -> Iterator[_SqliteTx]:
        """``BEGIN IMMEDIATE`` takes SQLite's one writer lock: a read-modify-write is whole."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, params).fetchall()]

    def _conflicts(self) -> AbstractContextManager[None]:
        return _conflicts()

    def _lock_rounds(self, tx: object) -> None:
        """Nothing to add: the transaction already holds the database's only writer lock."""

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SqliteRowConflict(RowConflict, sqlite3.IntegrityError):
    """SQLite's conflict: the interface's :class:`RowConflict`, still an IntegrityError."""


@contextmanager
def _conflicts() -> Iterator[None]:
    """A key clash on insert (primary or foreign) becomes the interface's :class:`RowConflict`."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise SqliteRowConflict(*exc.args) from exc
