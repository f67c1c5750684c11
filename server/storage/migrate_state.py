"""`cipherhive server migrate-state`: move a stopped server's round state from SQLite
(``state.db`` in its state directory) to an empty PostgreSQL database
(docs/how-to/operator.md#state-in-postgresql).

It holds the state directory's lock (a running server on it is refused), refuses a target that
holds any row, copies every table in one transaction that commits only if each table's row
count matches, and then renames ``state.db`` to ``state.db.migrated``: a server configured for
SQLite by mistake then refuses to start rather than serve the old copy, and nothing is deleted.
Spool and sums stay where they are.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cipherhive.runtime import fsutil
from cipherhive.server.storage.backend import MOVED_SUFFIX, SQLITE_FILE
from cipherhive.server.storage.postgres import PostgresState, check_url, describe, read_password
from cipherhive.server.storage.rows import StateError
from cipherhive.server.storage.state import State

__all__ = ["Moved", "migrate_state", "run"]


@dataclass
class Moved:
    """What one migration did."""

    source: Path
    target: str
    renamed_to: Path
    rows: dict[str, int]


def migrate_state(state_dir: Path, database: str, password: str | None = None) -> Moved:
    """Copy ``state_dir``'s SQLite round state into the empty PostgreSQL ``database``."""
    source_path = state_dir / SQLITE_FILE
    if not source_path.is_file():
        raise StateError(f"{source_path} does not exist: there is no SQLite round state to move")
    lock = fsutil.StateDirLock(state_dir, "server")
    try:
        source = State(source_path)
        try:
            target = PostgresState(database, password)
            try:
                rows = target.copy_from(source)
            finally:
                target.close()
        finally:
            source.close()
        moved = source_path.with_name(SQLITE_FILE + MOVED_SUFFIX)
        for suffix in ("-wal", "-shm"):  # gone once SQLite closed cleanly; kept with it if not
            extra = source_path.with_name(SQLITE_FILE + suffix)
            if extra.exists():
                extra.rename(moved.with_name(moved.name + suffix))
        source_path.rename(moved)
    finally:
        lock.release()
    return Moved(source_path, describe(database), moved, rows)


def run(args: argparse.Namespace) -> int:
    """The command (its ``--to`` is in cipherhive/cli.py): the server's configuration says
    where the state directory is."""
    from cipherhive.runtime import config
    from cipherhive.server.config import ServerConfig

    cfg = config.load(ServerConfig, args)
    target = args.to or cfg.database
    if not target:
        raise config.ConfigError("name the PostgreSQL database: --to URL, or [state] database")
    try:
        check_url(target)
    except ValueError as exc:
        raise config.ConfigError(f"--to: {exc}") from None
    done = migrate_state(cfg.state_dir, target, read_password(cfg.password_file))
    print(f"copied the round state of {done.source} to {done.target} in one transaction:")
    for table, count in done.rows.items():
        print(f"  {table}: {count} rows (counts match)")
    print(f"renamed {done.source.name} to {done.renamed_to.name}; spool/ and sums/ stay in {cfg.state_dir}")
    if target != cfg.database:
        print(f'start the server with [state] database = "{target}" in its configuration')
    return 0
