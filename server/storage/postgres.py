"""The server's round state in PostgreSQL (a ``store.RoundStore``; ``[state] database`` chooses
it, docs/how-to/operator.md#state-in-postgresql): the same statements as SQLite's
(``sqlstore``), over one psycopg connection.

What SQLite gives for free is made explicit here. Every write is an explicit transaction,
committed durably (``synchronous_commit`` is never off) before the method returns. Opening and
withdrawing a round, a read then a write, hold a lock on ``rounds`` that one writer takes at a
time, as SQLite's single writer lock did. The schema has the same versions as SQLite's
(``schema.POSTGRES_MIGRATIONS``), recorded in ``schema_version``, and migrations run one at a
time under an advisory lock. The password never comes from the URL: ``[state] password_file``,
or libpq's own ``PGPASSWORD`` / ``~/.pgpass``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from cipherhive.runtime import fsutil
from cipherhive.server.storage.rows import RowConflict, StateError
from cipherhive.server.storage.schema import POSTGRES_MIGRATIONS, SCHEMA_VERSION
from cipherhive.server.storage.sqlstore import SqlStore, Tx

__all__ = ["PostgresRowConflict", "PostgresState", "check_url", "describe", "read_password"]

#: pg_advisory_xact_lock key of schema migrations (two servers starting at once migrate once).
_MIGRATION_LOCK = 0x43485356  # "CHSV"
#: Seconds a connection attempt may take unless the URL says (libpq's default is forever).
CONNECT_TIMEOUT = 10
_SCHEMES = ("postgresql://", "postgres://")


class PostgresRowConflict(RowConflict):
    """PostgreSQL's key clash (unique or foreign): the interface's :class:`RowConflict`."""


def check_url(url: str) -> dict[str, str]:
    """Refuse a ``[state] database`` that is not a PostgreSQL URL, or holds a password (it would
    sit in a config file and in ``ps``); its parts (libpq's keywords) if it is fine."""
    if not url.startswith(_SCHEMES):
        raise ValueError(f"{url!r} is not a postgresql://user@host:port/dbname URL")
    try:
        parts: dict[str, str] = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"{url!r} is not a valid PostgreSQL URL: {exc}") from None
    if "password" in parts:
        raise ValueError(
            "the database URL must not hold a password: put it in a file named by [state] "
            "password_file, or in PGPASSWORD (or ~/.pgpass)"
        )
    if not all(p.isdigit() for p in parts.get("port", "5432").split(",")):
        raise ValueError(f"{url!r}: the port must be a number")
    return parts


def describe(conninfo: str) -> str:
    """``user@host:port/dbname`` of a connection string, without its password, for messages."""
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(an invalid connection string)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host') or 'localhost'}{port}/{parts.get('dbname') or ''}"


def read_password(path: Path | None) -> str | None:
    """The password in ``[state] password_file`` (mode 0600, like a TLS key; one line), or None:
    then libpq looks in PGPASSWORD and ~/.pgpass."""
    if path is None:
        return None
    try:
        fsutil.require_private_file(path, "[state] password_file")
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except fsutil.PrivateFileError as exc:
        raise StateError(str(exc)) from None
    except OSError as exc:
        raise StateError(f"cannot read [state] password_file {path}: {exc.strerror}") from None
    if not password:
        raise StateError(f"[state] password_file {path} is empty")
    return password


def _sql(statement: str) -> str:
    """``sqlstore``'s ``?`` placeholders in psycopg's spelling."""
    assert "%" not in statement, statement
    return statement.replace("?", "%s")


class _PgTx:
    """``sqlstore.Tx`` over a cursor inside an open transaction."""

    def __init__(self, cursor: psycopg.Cursor[dict[str, Any]]) -> None:
        self._cur = cursor

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        return self._cur.execute(_sql(sql), params).fetchall()

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._cur.execute(_sql(sql), params).rowcount

    def run_many(self, sql: str, params: Iterable[Sequence[object]]) -> None:
        self._cur.executemany(_sql(sql), params)


class PostgresState(SqlStore):
    """The round state in a PostgreSQL database; every method is one transaction."""

    def __init__(self, conninfo: str, password: str | None = None) -> None:
        super().__init__()
        self._conninfo = conninfo
        self._password = password
        self._conn = self._connect()
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        extra: dict[str, Any] = {"application_name": "cipherhive-server"}
        try:
            if "connect_timeout" not in conninfo_to_dict(self._conninfo):
                extra["connect_timeout"] = CONNECT_TIMEOUT
            if self._password is not None:
                extra["password"] = self._password
            conn = psycopg.connect(self._conninfo, autocommit=True, row_factory=dict_row, **extra)
            # Acknowledged means durable (SQLite's synchronous=FULL): never commit with it off;
            # a stronger setting (remote_apply for a standby) is kept.
            if conn.execute("SHOW synchronous_commit").fetchone() == {"synchronous_commit": "off"}:
                conn.execute("SET synchronous_commit = on")
            return conn
        except psycopg.Error as exc:
            reason = str(exc).strip().replace("\n", " ")
            raise StateError(
                f"cannot connect to PostgreSQL at {describe(self._conninfo)} ([state] database): {reason}. "
                "Check the URL's host, port and database name, that the server is running and accepts "
                "this host (pg_hba.conf), and the password ([state] password_file, PGPASSWORD or ~/.pgpass)"
            ) from None

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        """The connection; a new one if the last was lost (a restart of PostgreSQL fails the
        call in flight, not every call after it)."""
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def _migrate(self) -> None:
        where = describe(self._conninfo)
        try:
            while True:
                with self._tx() as db:
                    db.rows("SELECT pg_advisory_xact_lock(?) AS n", (_MIGRATION_LOCK,))
                    db.run("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
                    rows = db.rows("SELECT version FROM schema_version")
                    if not rows:
                        db.run("INSERT INTO schema_version (version) VALUES (0)")
                    version = int(rows[0]["version"]) if rows else 0
                    if version > SCHEMA_VERSION:
                        raise StateError(
                            f"{where} has schema version {version}, newer than this cipherhive "
                            f"({SCHEMA_VERSION}); upgrade cipherhive or restore a backup"
                        )
                    if version == SCHEMA_VERSION:
                        return
                    for statement in POSTGRES_MIGRATIONS[version].split(";"):
                        if statement.strip():
                            db.run(statement)
                    db.run("UPDATE schema_version SET version = ?", (version + 1,))
        except psycopg.errors.DuplicateTable as exc:
            raise StateError(
                f"{where} holds tables cipherhive did not create ({exc}); give the server a database "
                "of its own"
            ) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise StateError(
                f"{where}: cannot create the server's tables ({exc}); make the server's role the "
                "database's owner (CREATE DATABASE ... OWNER ...)"
            ) from None

    @contextmanager
    def _tx(self) -> Iterator[_PgTx]:
        with self._lock:
            conn = self._connection()
            with conn.transaction(), conn.cursor() as cursor:
                yield _PgTx(cursor)

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self._connection().execute(_sql(sql), params).fetchall()

    def _conflicts(self) -> AbstractContextManager[None]:
        return _conflicts()

    def _lock_rounds(self, tx: Tx) -> None:
        """SHARE ROW EXCLUSIVE conflicts with itself and every write, not with reads: one
        round opens or is withdrawn at a time, as under SQLite's writer lock."""
        tx.run("LOCK TABLE rounds IN SHARE ROW EXCLUSIVE MODE")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@contextmanager
def _conflicts() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.IntegrityError as exc:
        raise PostgresRowConflict(str(exc)) from exc
