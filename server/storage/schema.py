"""The server database's schema, as migrations, once per database: ``MIGRATIONS[i]`` (SQLite)
and ``POSTGRES_MIGRATIONS[i]`` (PostgreSQL) upgrade version i to i+1.

Append a migration for every change to both lists, as the same version; never edit one that
has shipped (a database that ran it would not run it again). Statements are split on ";".
The two must leave the same tables, columns, defaults and keys (tests/test_state_contract.py
compares them); PostgreSQL spells SQLite's 64-bit INTEGER as BIGINT, REAL as DOUBLE PRECISION
and BLOB as BYTEA.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        last_round INTEGER NOT NULL DEFAULT 0,
        submissions INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE rounds (
        round INTEGER PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('open', 'sum_ready', 'failed')),
        base_round INTEGER NOT NULL,
        opened REAL NOT NULL,
        deadline REAL NOT NULL,
        closed REAL,
        expected TEXT NOT NULL,
        participants INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        sum_file TEXT,
        num_ciphertexts INTEGER NOT NULL DEFAULT 0,
        num_values INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE submissions (
        round INTEGER NOT NULL REFERENCES rounds(round),
        node TEXT NOT NULL,
        submission_id TEXT NOT NULL,
        receipt TEXT NOT NULL,
        accepted REAL NOT NULL,
        num_bytes INTEGER NOT NULL,
        spool_file TEXT,
        metrics TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (round, node)
    );
    """,
    # 1 -> 2: withdrawn rounds, the floor each round opened with, outcome reports,
    # missed rounds per node. SQLite cannot alter a CHECK constraint, so `rounds` is
    # rebuilt (foreign keys are off while migrating; see `_migrate`).
    """
    CREATE TABLE rounds_v2 (
        round INTEGER PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('open', 'sum_ready', 'failed', 'withdrawn')),
        base_round INTEGER NOT NULL,
        opened REAL NOT NULL,
        deadline REAL NOT NULL,
        closed REAL,
        expected TEXT NOT NULL,
        participants INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        sum_file TEXT,
        num_ciphertexts INTEGER NOT NULL DEFAULT 0,
        num_values INTEGER NOT NULL DEFAULT 0,
        min_participants INTEGER NOT NULL DEFAULT 0,
        withdrawn_reason TEXT NOT NULL DEFAULT '',
        withdrawn_unix REAL NOT NULL DEFAULT 0
    );
    INSERT INTO rounds_v2 (round, state, base_round, opened, deadline, closed, expected,
        participants, reason, sum_file, num_ciphertexts, num_values)
        SELECT round, state, base_round, opened, deadline, closed, expected,
        participants, reason, sum_file, num_ciphertexts, num_values FROM rounds;
    DROP TABLE rounds;
    ALTER TABLE rounds_v2 RENAME TO rounds;
    CREATE INDEX rounds_by_state ON rounds (state, round);
    ALTER TABLE nodes ADD COLUMN missed_rounds INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE outcomes (
        round INTEGER NOT NULL REFERENCES rounds(round),
        node TEXT NOT NULL,
        applied INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        reported REAL NOT NULL,
        PRIMARY KEY (round, node)
    );
    """,
    # 2 -> 3: masked rounds (docs/spec/masked-round.md): the round's nonce and phase, and per member its
    # enrolment, commit and released self-mask seed.
    """
    ALTER TABLE rounds ADD COLUMN masked INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rounds ADD COLUMN nonce BLOB;
    ALTER TABLE rounds ADD COLUMN phase TEXT NOT NULL DEFAULT '';
    ALTER TABLE rounds ADD COLUMN enrol_deadline REAL NOT NULL DEFAULT 0;
    ALTER TABLE rounds ADD COLUMN roster_hash BLOB;
    CREATE TABLE members (
        round INTEGER NOT NULL REFERENCES rounds(round),
        node TEXT NOT NULL,
        enrolment BLOB NOT NULL,
        in_roster INTEGER NOT NULL DEFAULT 0,
        commit_bytes BLOB,
        seed BLOB,
        PRIMARY KEY (round, node)
    );
    """,
    # 3 -> 4: step deadlines and named culprits (docs/spec/masked-round.md §10): which step
    # decided a failed round and whom it names, a roster re-formed once, every member's
    # offences (each with the round its exclusion lasts to), and when the operator last
    # readmitted a member.
    """
    ALTER TABLE rounds ADD COLUMN failed_step TEXT NOT NULL DEFAULT '';
    ALTER TABLE rounds ADD COLUMN culprits TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE rounds ADD COLUMN reformed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN readmitted_round INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE offences (
        round INTEGER NOT NULL,
        node TEXT NOT NULL,
        step TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL,
        excluded_until INTEGER NOT NULL,
        PRIMARY KEY (round, node)
    );
    CREATE INDEX offences_by_node ON offences (node, round);
    """,
    # 4 -> 5: the lease of the active server (docs/how-to/operator.md#standby-server): who
    # holds it, its fencing token and when it expires (seconds since the epoch, by the
    # database's clock). Only PostgreSQL uses it (SQLite has no standby); the table is the same
    # in both so that their schemas stay one.
    """
    CREATE TABLE leader (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        token INTEGER NOT NULL,
        expires_at REAL NOT NULL
    );
    INSERT INTO leader (id, holder, token, expires_at) VALUES (1, '', 0, 0);
    """,
    # 5 -> 6: the serial (hex) of the TLS certificate each member last joined with, so the
    # operator sees which members the CRL revokes (`cipherhive ctl nodes`; docs/how-to/operator.md).
    # Text, not INTEGER: a certificate serial has up to 159 bits.
    """
    ALTER TABLE nodes ADD COLUMN cert_serial TEXT NOT NULL DEFAULT '';
    """,
]

#: The tables of the round state, parents before the tables that reference them (the order
#: `cipherhive server migrate-state` copies them in). Not ``leader``: a lease belongs to the
#: database it was taken in, and each database starts with an unheld one.
TABLES: tuple[str, ...] = ("meta", "nodes", "rounds", "submissions", "outcomes", "members", "offences")

POSTGRES_MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        first_seen DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        last_round BIGINT NOT NULL DEFAULT 0,
        submissions BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE rounds (
        round BIGINT PRIMARY KEY,
        state TEXT NOT NULL CONSTRAINT rounds_state CHECK (state IN ('open', 'sum_ready', 'failed')),
        base_round BIGINT NOT NULL,
        opened DOUBLE PRECISION NOT NULL,
        deadline DOUBLE PRECISION NOT NULL,
        closed DOUBLE PRECISION,
        expected TEXT NOT NULL,
        participants BIGINT NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        sum_file TEXT,
        num_ciphertexts BIGINT NOT NULL DEFAULT 0,
        num_values BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE submissions (
        round BIGINT NOT NULL REFERENCES rounds(round),
        node TEXT NOT NULL,
        submission_id TEXT NOT NULL,
        receipt TEXT NOT NULL,
        accepted DOUBLE PRECISION NOT NULL,
        num_bytes BIGINT NOT NULL,
        spool_file TEXT,
        metrics TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (round, node)
    );
    """,
    # 1 -> 2: as SQLite's; PostgreSQL alters the CHECK constraint in place of rebuilding `rounds`.
    """
    ALTER TABLE rounds DROP CONSTRAINT rounds_state;
    ALTER TABLE rounds ADD CONSTRAINT rounds_state
        CHECK (state IN ('open', 'sum_ready', 'failed', 'withdrawn'));
    ALTER TABLE rounds
        ADD COLUMN min_participants BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN withdrawn_reason TEXT NOT NULL DEFAULT '',
        ADD COLUMN withdrawn_unix DOUBLE PRECISION NOT NULL DEFAULT 0;
    CREATE INDEX rounds_by_state ON rounds (state, round);
    ALTER TABLE nodes ADD COLUMN missed_rounds BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE outcomes (
        round BIGINT NOT NULL REFERENCES rounds(round),
        node TEXT NOT NULL,
        applied BIGINT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        reported DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (round, node)
    );
    """,
    # 2 -> 3: masked rounds, as SQLite's.
    """
    ALTER TABLE rounds
        ADD COLUMN masked BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN nonce BYTEA,
        ADD COLUMN phase TEXT NOT NULL DEFAULT '',
        ADD COLUMN enrol_deadline DOUBLE PRECISION NOT NULL DEFAULT 0,
        ADD COLUMN roster_hash BYTEA;
    CREATE TABLE members (
        round BIGINT NOT NULL REFERENCES rounds(round),
        node TEXT NOT NULL,
        enrolment BYTEA NOT NULL,
        in_roster BIGINT NOT NULL DEFAULT 0,
        commit_bytes BYTEA,
        seed BYTEA,
        PRIMARY KEY (round, node)
    );
    """,
    # 3 -> 4: step deadlines and named culprits, as SQLite's.
    """
    ALTER TABLE rounds
        ADD COLUMN failed_step TEXT NOT NULL DEFAULT '',
        ADD COLUMN culprits TEXT NOT NULL DEFAULT '[]',
        ADD COLUMN reformed BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN readmitted_round BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE offences (
        round BIGINT NOT NULL,
        node TEXT NOT NULL,
        step TEXT NOT NULL,
        reason TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        excluded_until BIGINT NOT NULL,
        PRIMARY KEY (round, node)
    );
    CREATE INDEX offences_by_node ON offences (node, round);
    """,
    # 4 -> 5: the lease of the active server, as SQLite's.
    """
    CREATE TABLE leader (
        id BIGINT PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        token BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    INSERT INTO leader (id, holder, token, expires_at) VALUES (1, '', 0, 0);
    """,
    # 5 -> 6: the serial of each member's TLS certificate, as SQLite's.
    """
    ALTER TABLE nodes ADD COLUMN cert_serial TEXT NOT NULL DEFAULT '';
    """,
]

#: The version both databases are migrated to.
SCHEMA_VERSION = len(MIGRATIONS)
assert len(POSTGRES_MIGRATIONS) == SCHEMA_VERSION, "every migration is written for both databases"
