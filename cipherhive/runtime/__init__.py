"""What every daemon and client runs on: configuration, logs, progress, errors, crash-safe
files, failpoints for fault tests, and the client channel (mutual TLS)."""
