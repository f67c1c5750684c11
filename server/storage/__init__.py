"""The server's durable state: the SQLite store and its migrations, and the ciphertext files
(the upload spool and the published sums)."""
