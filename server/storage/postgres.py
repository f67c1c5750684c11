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

Two servers may share one database, one active and one standby
(docs/how-to/operator.md#standby-server): the active one holds the lease in the ``leader`` row
(:meth:`PostgresState.take_lease`, renewed by ``lease.LeaseKeeper``), and once it holds it every
write transaction first locks that row and checks that its fencing token is still there
(:meth:`PostgresState._tx`). A standby that took the lease over incremented the token, so a
former leader resumed after a pause writes nothing: its transaction raises :class:`Fenced`.
The lease lives on a connection of its own, so that renewing it never waits behind a slow
read of the store's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from cipherhive.runtime import fsutil
from cipherhive.server.storage.rows import DatabaseUnavailable, Fenced, RowConflict, StateError
from cipherhive.server.storage.schema import POSTGRES_MIGRATIONS, SCHEMA_VERSION
from cipherhive.server.storage.sqlstore import SqlStore, Tx

__all__ = [
    "LeaseState",
    "PostgresRowConflict",
    "PostgresState",
    "check_url",
    "describe",
    "read_password",
]

#: pg_advisory_xact_lock key of schema migrations (two servers starting at once migrate once).
_MIGRATION_LOCK = 0x43485356  # "CHSV"
#: Seconds a connection attempt may take unless the URL says (libpq's default is forever).
CONNECT_TIMEOUT = 10
_SCHEMES = ("postgresql://", "postgres://")
#: How long a session may sit idle inside a transaction before PostgreSQL ends it (ms).
IDLE_IN_TRANSACTION_MS = 3000
#: The database's clock, in seconds since the epoch: the lease's expiry is judged by one clock
#: (the database's), never by two servers' clocks that may disagree.
_DB_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"


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


class LeaseState:
    """The ``leader`` row as a standby sees it: who holds the lease, and for how much longer."""

    def __init__(self, holder: str, token: int, seconds_left: float) -> None:
        self.holder = holder
        self.token = token
        self.seconds_left = seconds_left


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
        #: The fencing token of the lease this store holds (None: it holds none; nothing is fenced).
        self._token: int | None = None
        self._holder = ""
        self._lease_seconds = 0.0
        self._lease_conn: psycopg.Connection[dict[str, Any]] | None = None
        self._lease_lock = threading.Lock()
        #: Called once with the reason when a write finds the lease gone (the server stops).
        self.on_fenced: Callable[[str], None] | None = None
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
            # A server paused (SIGSTOP) or cut off inside a transaction would hold the
            # ``leader`` row's lock, and with it a standby's takeover, for as long as its TCP
            # session lives: PostgreSQL ends such a session instead. A store's transactions
            # never wait on their client for this long.
            conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
            return conn
        except psycopg.Error as exc:
            reason = str(exc).strip().replace("\n", " ")
            raise DatabaseUnavailable(
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
        """With a lease held, the transaction starts by locking the ``leader`` row FOR SHARE
        with this store's token: a standby's takeover (an UPDATE of that row) waits until the
        transaction ends, and a transaction that finds the token gone writes nothing."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cursor:
                    tx = _PgTx(cursor)
                    if self._token is not None:
                        held = tx.rows(
                            "SELECT token FROM leader WHERE id = 1 AND token = ? FOR SHARE", (self._token,)
                        )
                        if not held:
                            raise self._fenced()
                    yield tx
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                # The connection died under the transaction (PostgreSQL restarting, a cut): it
                # rolled back; the next call connects again.
                if conn.broken or conn.closed:
                    raise self._unavailable(exc) from None
                raise

    def _unavailable(self, exc: psycopg.Error) -> DatabaseUnavailable:
        reason = str(exc).strip().replace("\n", " ")
        return DatabaseUnavailable(
            f"lost the connection to PostgreSQL at {describe(self._conninfo)} ([state] database): "
            f"{reason}; nothing of the interrupted call was kept"
        )

    def _fenced(self) -> Fenced:
        """The lease is gone: tell the server once (it stops serving) and refuse the write."""
        why = self.lease_lost_reason()
        callback, self.on_fenced = self.on_fenced, None
        if callback is not None:
            callback(why)
        return Fenced(why)

    def lease_lost_reason(self) -> str:
        return (
            f"fenced: this server ({self._holder}) no longer holds the lease of the round state "
            f"in {describe(self._conninfo)} (fencing token {self._token} was replaced: a standby "
            "took over); it writes nothing more"
        )

    # ------------------------------------------------------------ the lease

    def _lease_connection(self) -> psycopg.Connection[dict[str, Any]]:
        if self._lease_conn is None or self._lease_conn.closed or self._lease_conn.broken:
            self._lease_conn = self._connect()
        return self._lease_conn

    def take_lease(self, holder: str, seconds: float) -> LeaseState | None:
        """Take the lease if it is free or expired (by the database's clock), incrementing the
        fencing token; None if taken (this store now fences its writes), else who holds it.

        A takeover waits at most a second for the row lock: a former leader paused inside a
        transaction holds it until PostgreSQL ends that session
        (``idle_in_transaction_session_timeout``, 3 s, set on every connection)."""
        with self._lease_lock:
            conn = self._lease_connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    tx = _PgTx(cur)
                    tx.run("SET LOCAL lock_timeout = '1s'")
                    taken = tx.rows(
                        f"UPDATE leader SET holder = ?, token = token + 1, expires_at = {_DB_NOW} + ? "
                        f"WHERE id = 1 AND expires_at < {_DB_NOW} RETURNING token",
                        (holder, seconds),
                    )
                    row = tx.rows(
                        f"SELECT holder, token, expires_at - {_DB_NOW} AS seconds_left "
                        "FROM leader WHERE id = 1"
                    )[0]
            except psycopg.errors.LockNotAvailable:
                # The holder is inside a write: it is alive, or PostgreSQL ends its session soon.
                return LeaseState("(busy)", -1, seconds)
        if taken:
            with self._lock:
                self._token = int(taken[0]["token"])
                self._holder = holder
                self._lease_seconds = seconds
            return None
        return LeaseState(str(row["holder"]), int(row["token"]), float(row["seconds_left"]))

    def renew_lease(self) -> None:
        """Extend the lease by its length from now (the database's clock); :class:`Fenced` if
        the token is no longer this store's."""
        with self._lease_lock:
            conn = self._lease_connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    renewed = _PgTx(cur).rows(
                        f"UPDATE leader SET expires_at = {_DB_NOW} + ? "
                        "WHERE id = 1 AND token = ? RETURNING token",
                        (self._lease_seconds, self._token),
                    )
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if conn.broken or conn.closed:
                    raise self._unavailable(exc) from None
                raise
        if not renewed:
            raise self._fenced()

    def release_lease(self) -> None:
        """On a clean stop: expire the lease now, so that a standby takes over at once."""
        with self._lease_lock:
            if self._token is None:
                return
            try:
                conn = self._lease_connection()
                conn.execute("UPDATE leader SET expires_at = 0 WHERE id = 1 AND token = %s", (self._token,))
            except psycopg.Error:
                pass  # it expires on its own within the lease
            with self._lock:
                self._token = None

    @property
    def fencing_token(self) -> int | None:
        return self._token

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(_sql(sql), params).fetchall()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if conn.broken or conn.closed:
                    raise self._unavailable(exc) from None
                raise

    def _conflicts(self) -> AbstractContextManager[None]:
        return _conflicts()

    def _lock_rounds(self, tx: Tx) -> None:
        """SHARE ROW EXCLUSIVE conflicts with itself and every write, not with reads: one
        round opens or is withdrawn at a time, as under SQLite's writer lock."""
        tx.run("LOCK TABLE rounds IN SHARE ROW EXCLUSIVE MODE")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        with self._lease_lock:
            if self._lease_conn is not None:
                self._lease_conn.close()


@contextmanager
def _conflicts() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.IntegrityError as exc:
        raise PostgresRowConflict(str(exc)) from exc
