"""The server's durable state: the round store (SQLite by default, or PostgreSQL), its SQL and
migrations, and the ciphertext files (the upload spool and the published sums)."""
