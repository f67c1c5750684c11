"""Which database holds the round state: ``[state] database`` names a PostgreSQL, otherwise
SQLite's ``state.db`` in the state directory (docs/reference/configuration.md). Spool and sums
are files in the state directory either way.

A state directory whose round state lives in the other database is refused, not started
empty: its sums and spool belong to the rounds over there, and a fresh round 1 would
overwrite them.
"""

from __future__ import annotations

from pathlib import Path

from cipherhive.server.storage.rows import StateError
from cipherhive.server.storage.sqlstore import SqlStore
from cipherhive.server.storage.state import State

__all__ = ["MOVED_SUFFIX", "SQLITE_FILE", "open_store"]

SQLITE_FILE = "state.db"
#: What `cipherhive server migrate-state` renames ``state.db`` to once it is copied.
MOVED_SUFFIX = ".migrated"


def open_store(state_dir: Path, database: str = "", password_file: Path | None = None) -> SqlStore:
    """The server's round state: PostgreSQL if ``database`` is set, else SQLite in ``state_dir``."""
    sqlite = state_dir / SQLITE_FILE
    if not database:
        moved = sqlite.with_name(SQLITE_FILE + MOVED_SUFFIX)
        if moved.exists() and not sqlite.exists():
            raise StateError(
                f"the round state of {state_dir} was moved to PostgreSQL ({moved.name}): set [state] "
                f"database to it, or rename {moved.name} back to {SQLITE_FILE} to go on with SQLite"
            )
        return State(sqlite)
    from cipherhive.server.storage.postgres import PostgresState, read_password

    if sqlite.exists():
        raise StateError(
            f"{sqlite} holds this server's round state in SQLite, but [state] database chooses "
            "PostgreSQL: copy it there first with `cipherhive server migrate-state --config ...`, "
            "or unset [state] database"
        )
    return PostgresState(database, read_password(password_file))
