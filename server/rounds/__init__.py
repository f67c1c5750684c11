"""A round's life on the server: open, the masked round's phases, close at the deadline or when
everyone is in, publish or fail; events to watchers, withdrawals, and recovery after a restart."""
