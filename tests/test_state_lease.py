"""The lease and its fencing (docs/how-to/operator.md#standby-server), in the store contract's
style: two ``PostgresState`` on one database play the active server and its standby; the
``leader`` row is read back to show who holds the lease and that a fenced store wrote nothing.
SQLite has no standby: it only carries the same table, at the same schema version."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import psycopg
import pytest

from cipherhive.server.standby import LeaseKeeper, wait_for_lease
from cipherhive.server.storage.postgres import PostgresState
from cipherhive.server.storage.rows import Fenced
from cipherhive.server.storage.state import State

pytestmark = pytest.mark.timeout(60)


def _leader(dsn: str) -> tuple[str, int]:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT holder, token FROM leader WHERE id = 1").fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


def _meta(dsn: str, key: str) -> str | None:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
    return None if row is None else str(row[0])


def test_a_fresh_database_has_an_unheld_lease_in_both_stores(tmp_path: Path, pg_dsn: str) -> None:
    State(tmp_path / "state.db").close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("SELECT id, holder, token, expires_at FROM leader").fetchall() == [(1, "", 0, 0.0)]
    PostgresState(pg_dsn).close()
    with psycopg.connect(pg_dsn) as db:
        assert db.execute("SELECT id, holder, token, expires_at FROM leader").fetchall() == [(1, "", 0, 0.0)]


def test_one_holder_at_a_time_and_a_standby_sees_whom_it_waits_for(pg_dsn: str) -> None:
    active, standby = PostgresState(pg_dsn), PostgresState(pg_dsn)
    try:
        assert active.take_lease("a/1", 5.0) is None
        assert active.fencing_token == 1
        held = standby.take_lease("b/2", 5.0)
        assert held is not None and held.holder == "a/1" and held.token == 1 and 0 < held.seconds_left <= 5
        assert standby.fencing_token is None
        active.set_meta("k", "v")  # the holder writes
        active.renew_lease()
        assert _leader(pg_dsn) == ("a/1", 1)
    finally:
        active.close()
        standby.close()


def test_a_standby_takes_an_expired_lease_and_the_former_holder_writes_nothing(pg_dsn: str) -> None:
    active, standby = PostgresState(pg_dsn), PostgresState(pg_dsn)
    told: list[str] = []
    active.on_fenced = told.append
    try:
        assert active.take_lease("a/1", 1.0) is None
        active.set_meta("k", "before")
        time.sleep(1.2)  # not renewed: a paused leader
        assert standby.take_lease("b/2", 5.0) is None
        assert standby.fencing_token == 2 and _leader(pg_dsn) == ("b/2", 2)
        with pytest.raises(Fenced, match="no longer holds the lease"):
            active.set_meta("k", "after")
        with pytest.raises(Fenced):
            active.touch_node("node-1")
        with pytest.raises(Fenced):
            active.renew_lease()
        assert len(told) == 1 and "fencing token 1" in told[0]  # told once, the server stops
        assert _meta(pg_dsn, "k") == "before"
        with psycopg.connect(pg_dsn) as db:
            assert db.execute("SELECT COUNT(*) FROM nodes").fetchone() == (0,)
        standby.set_meta("k", "standby")
        assert _meta(pg_dsn, "k") == "standby"
        active.release_lease()  # its token is gone: releasing does not touch the new holder's lease
        assert standby.take_lease("c/3", 5.0) is not None and _leader(pg_dsn) == ("b/2", 2)
    finally:
        active.close()
        standby.close()


def test_a_leader_paused_inside_a_write_holds_the_takeover_off_until_postgresql_ends_it(
    pg_dsn: str,
) -> None:
    """The write's FOR SHARE lock on the leader row keeps the token for the whole transaction;
    a leader paused inside it loses its session after ``idle_in_transaction_session_timeout``,
    its write is rolled back, and only then does the standby take over."""
    active, standby = PostgresState(pg_dsn), PostgresState(pg_dsn)
    try:
        assert active.take_lease("a/1", 1.0) is None
        inside, resume = threading.Event(), threading.Event()
        failure: list[BaseException] = []

        def paused_write() -> None:
            try:
                with active._tx() as db:
                    db.run("INSERT INTO meta (key, value) VALUES ('paused', 'x')")
                    inside.set()
                    resume.wait(30)
                    db.run("INSERT INTO meta (key, value) VALUES ('paused2', 'x')")
            except BaseException as exc:
                failure.append(exc)

        writer = threading.Thread(target=paused_write)
        writer.start()
        assert inside.wait(10)
        time.sleep(1.2)
        started = time.monotonic()
        held = standby.take_lease("b/2", 5.0)
        assert held is not None and held.token == -1  # busy: the paused write holds the row
        assert wait_for_lease(standby, "b/2", 5.0, threading.Event())
        waited = time.monotonic() - started
        assert 1.0 < waited < 10, waited
        resume.set()
        writer.join(10)
        assert failure and isinstance(failure[0], psycopg.Error)
        assert _meta(pg_dsn, "paused") is None and _leader(pg_dsn) == ("b/2", 2)
        with pytest.raises(Fenced):  # reconnected: the token check refuses it now
            active.set_meta("k", "v")
    finally:
        active.close()
        standby.close()


def test_a_released_lease_is_taken_at_once(pg_dsn: str) -> None:
    active, standby = PostgresState(pg_dsn), PostgresState(pg_dsn)
    try:
        assert active.take_lease("a/1", 30.0) is None
        active.release_lease()
        assert active.fencing_token is None
        assert standby.take_lease("b/2", 30.0) is None and _leader(pg_dsn) == ("b/2", 2)
    finally:
        active.close()
        standby.close()


def test_the_keeper_renews_and_reports_a_lost_lease(pg_dsn: str) -> None:
    active, standby = PostgresState(pg_dsn), PostgresState(pg_dsn)
    lost = threading.Event()
    reasons: list[str] = []

    def on_lost(why: str) -> None:
        reasons.append(why)
        lost.set()

    keeper = LeaseKeeper(active, 1.0, on_lost)
    try:
        assert active.take_lease("a/1", 1.0) is None
        keeper.start()
        time.sleep(2.0)  # twice the lease: renewed all along
        assert standby.take_lease("b/2", 1.0) is not None
        with psycopg.connect(pg_dsn, autocommit=True) as db:  # the operator hands it over by force
            db.execute("UPDATE leader SET holder = 'b/2', token = token + 1")
        assert lost.wait(5)
        assert "fenced" in reasons[0]
    finally:
        keeper.stop()
        active.close()
        standby.close()


def test_lease_seconds_is_bounded(tmp_path: Path) -> None:
    from cipherhive.runtime.config import ConfigError
    from cipherhive.server.config import ServerConfig

    for bad in (0.5, 601.0):
        with pytest.raises(ConfigError, match="lease_seconds"):
            ServerConfig(insecure=True, lease_seconds=bad)
    assert ServerConfig(insecure=True).lease_seconds == 5.0
