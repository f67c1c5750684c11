"""Helpers for tests that play a member themselves.

:class:`Member` lives in the installed package (:mod:`cipherhive.bench.scripted_member`),
since the hostile-member benchmark plays it too; it is re-exported here so the
tests keep importing it from one place. The helpers below read the server's
spool and database as its operator could, which only tests do.
"""

from __future__ import annotations

from pathlib import Path

from cipherhive.bench.scripted_member import Member

__all__ = ["Member", "released_seeds", "spooled"]


def spooled(workdir: Path, number: int) -> dict[str, list[bytes]]:
    """Every member's spooled ciphertexts of an open round, as the server's operator can read them."""
    from cipherhive.server.storage.spool import read_records

    folder = workdir / "server-state" / "spool" / f"round-{number}"
    return {p.stem: list(read_records(p)) for p in sorted(folder.glob("*.ct"))}


def released_seeds(workdir: Path, number: int) -> dict[str, bytes]:
    """Self-mask seeds the server holds for an open round (its database, as the operator reads it)."""
    import sqlite3

    db = sqlite3.connect(workdir / "server-state" / "state.db")
    try:
        rows = db.execute("SELECT node, seed FROM members WHERE round = ? AND seed IS NOT NULL", (number,))
        return {node: bytes(seed) for node, seed in rows}
    finally:
        db.close()
