"""Fixtures several test modules share: one federation key per module, and its two codecs; and
logging put back after every test, so no test depends on the order they run in. The ``stopper`` fixture
stops every local federation a test appends to it. ``state`` is an empty round store on each
backend in turn (SQLite, PostgreSQL), and ``pg_dsn`` an empty PostgreSQL database
(tests/postgres.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from cipherhive.ckks import keys
from cipherhive.ckks.codec import PublicCodec, SecretCodec
from cipherhive.demo.federation import LocalFederation
from cipherhive.runtime import logs
from cipherhive.server.storage.sqlstore import SqlStore
from tests import postgres


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> keys.KeyFiles:
    return keys.keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def secret(key_files: keys.KeyFiles) -> SecretCodec:
    return SecretCodec(key_files.secret.read_bytes())


@pytest.fixture(scope="module")
def public(key_files: keys.KeyFiles) -> PublicCodec:
    return PublicCodec(key_files.public.read_bytes())


@pytest.fixture(autouse=True)
def _logging_put_back() -> Iterator[None]:
    """A command run in-process (``cipherhive.cli.main``) points the root logger at the
    sys.stderr of its test, which pytest closes afterwards: a later test that logs would then
    print "--- Logging error ---" into its own captured output. Take that handler (and any audit
    file handler) away again, and the root level back; pytest's own handlers are its business."""
    root, audit = logging.getLogger(), logging.getLogger("cipherhive.audit")
    level, audit_handlers = root.level, list(audit.handlers)
    yield
    for handler in [h for h in root.handlers if h.get_name() == logs.HANDLER_NAME]:
        root.removeHandler(handler)
    for handler in [h for h in audit.handlers if h not in audit_handlers]:
        audit.removeHandler(handler)
        handler.close()
    root.setLevel(level)


@pytest.fixture
def stopper() -> Iterator[list[LocalFederation]]:
    """Append a local federation to it: every process of it is stopped when the test ends."""
    feds: list[LocalFederation] = []
    yield feds
    for fed in feds:
        fed.stop_all()


@pytest.fixture(params=postgres.BACKENDS)
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    with postgres.store(request.param, tmp_path) as (store, _):
        yield store


@pytest.fixture()
def pg_dsn() -> Iterator[str]:
    """An empty PostgreSQL database of its own."""
    with postgres.database() as dsn:
        yield dsn
