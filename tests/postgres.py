"""A PostgreSQL for the tests: a throwaway cluster (initdb, pg_ctl) in a temporary folder on a
free port, started once per test process, or the server named by ``CIPHERHIVE_TEST_POSTGRES``
(a libpq URL of a role that may create databases). Each test gets a database of its own.
The cluster is one per process (stopped and removed at exit), as a session fixture would be,
so that every test module shares it without an entry in conftest.py.

Without PostgreSQL a test that needs it is skipped, but under ``CI=true`` (or
``CIPHERHIVE_TEST_POSTGRES_REQUIRED=1``, which .ci/run sets) it fails: CI installs PostgreSQL,
so a skip there would hide a store that was never tested.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cipherhive.demo.federation import free_port
from cipherhive.server.storage.sqlstore import SqlStore
from cipherhive.server.storage.state import State

ENV_DSN = "CIPHERHIVE_TEST_POSTGRES"
ENV_REQUIRED = "CIPHERHIVE_TEST_POSTGRES_REQUIRED"
#: A folder holding initdb and pg_ctl, if they are neither on PATH nor where Debian puts them.
ENV_BIN = "CIPHERHIVE_TEST_POSTGRES_BIN"
#: The role and password of the cluster's TCP login (scram-sha-256), for tests that connect as
#: an operator would: a URL without a password, and the password from a file.
LOGIN_ROLE = "cipherhive"


@dataclass
class Cluster:
    #: Connection string of a role that may create databases and roles.
    admin: str
    #: Host and port of its TCP listener, when this process started it (else None).
    tcp: tuple[str, int] | None = None
    #: The password of LOGIN_ROLE over TCP (our own cluster only).
    login_password: str = ""
    #: How to stop and start it again (our own cluster only): pg_ctl and its arguments.
    control: list[str] | None = None


class Unavailable(Exception):
    """No PostgreSQL to test against; the message says why."""


_cluster: Cluster | None = None
_failure: str = ""


def _bindir() -> Path:
    """Where initdb and pg_ctl are: $CIPHERHIVE_TEST_POSTGRES_BIN, on PATH, or Debian's
    /usr/lib/postgresql/<version>/bin."""
    given = os.environ.get(ENV_BIN)
    if given:
        if not (Path(given) / "initdb").is_file():
            raise Unavailable(f"{ENV_BIN}={given} holds no initdb")
        return Path(given)
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not versions:
        raise Unavailable(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
            "apt-get install postgresql, or set CIPHERHIVE_TEST_POSTGRES to a server's URL"
        )
    return Path(versions[-1]).parent


def _as_owner(args: list[str], owner: str | None) -> list[str]:
    """initdb refuses to run as root: run the cluster as the ``postgres`` user then."""
    return ["runuser", "-u", owner, "--", *args] if owner else args


def _start() -> Cluster:
    bindir = _bindir()
    owner = None
    root = Path(tempfile.mkdtemp(prefix="cipherhive-pg-"))
    if os.geteuid() == 0:
        owner = "postgres"
        shutil.chown(root, owner, owner)
    atexit.register(_stop, bindir, root, owner)
    data, password = root / "data", secrets.token_hex(16)
    pwfile = root / "superuser.pw"
    pwfile.write_text(password + "\n", encoding="utf-8")
    if owner:
        shutil.chown(pwfile, owner, owner)
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile)]
    initdb += ["-E", "UTF8", "--no-locale", "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256"]
    _run(_as_owner(initdb, owner), "initdb")
    start = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60"]
    for attempt in range(3):  # another process may take the free port first
        port = free_port()
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        try:
            _run(_as_owner([*start, "-o", options, "start"], owner), "pg_ctl start", root / "server.log")
            break
        except Unavailable:
            if attempt == 2:
                raise
    admin = make_conninfo(host=str(root), port=port, user="postgres", dbname="postgres")
    login_password = secrets.token_hex(16)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {LOGIN_ROLE} LOGIN CREATEDB PASSWORD '{login_password}'")
    control = _as_owner([*start, "-o", options], owner)
    return Cluster(admin, ("127.0.0.1", port), login_password, control)


@contextlib.contextmanager
def outage() -> Iterator[None]:
    """PostgreSQL is down inside the block: stopped fast (open sessions are cut) and started
    again on the same port with the same data when the block ends."""
    control = cluster().control
    if control is None:
        pytest.skip("needs the throwaway cluster (CIPHERHIVE_TEST_POSTGRES is set)")
    _run([*control, "-m", "fast", "stop"], "pg_ctl stop")
    try:
        yield
    finally:
        _run([*control, "start"], "pg_ctl start")


def _run(args: list[str], what: str, log: Path | None = None) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        raise Unavailable(f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}{tail}")


def _stop(bindir: Path, root: Path, owner: str | None) -> None:
    if (root / "data" / "postmaster.pid").exists():
        stop = [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"]
        subprocess.run(_as_owner(stop, owner), capture_output=True, check=False, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def _required() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("CI", ENV_REQUIRED))


def cluster() -> Cluster:
    """The PostgreSQL of this test process (started on first use), or skip / fail the test."""
    global _cluster, _failure
    if _cluster is None and not _failure:
        try:
            given = os.environ.get(ENV_DSN)
            _cluster = Cluster(given) if given else _start()
        except (Unavailable, OSError, LookupError, psycopg.Error, subprocess.SubprocessError) as exc:
            _failure = str(exc)
    if _cluster is None:
        if _required():
            pytest.fail(f"PostgreSQL is required here (CI or {ENV_REQUIRED}) but: {_failure}")
        pytest.skip(f"no PostgreSQL: {_failure}")
    return _cluster


@contextlib.contextmanager
def database(owner: str | None = None) -> Iterator[str]:
    """A new empty database for one test (owned by ``owner``); its connection string.
    It is dropped afterwards."""
    admin = cluster().admin
    name = f"cipherhive_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else ""))
    try:
        yield make_conninfo(admin, dbname=name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


#: The backends the contract tests run against.
BACKENDS = ("sqlite", "postgres")


@contextlib.contextmanager
def store(kind: str, tmp_path: Path) -> Iterator[tuple[SqlStore, str]]:
    """An empty store of ``kind`` and how to open it again (a SQLite path or a connection string)."""
    if kind == "sqlite":
        path = tmp_path / "state.db"
        s: SqlStore = State(path)
        try:
            yield s, str(path)
        finally:
            s.close()
        return
    from cipherhive.server.storage.postgres import PostgresState

    with database() as dsn:
        s = PostgresState(dsn)
        try:
            yield s, dsn
        finally:
            s.close()


def reopen(kind: str, where: str) -> SqlStore:
    """Open a store of ``kind`` again, as a restarted server would."""
    if kind == "sqlite":
        return State(Path(where))
    from cipherhive.server.storage.postgres import PostgresState

    return PostgresState(where)
