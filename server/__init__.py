"""The aggregator daemon: receives encrypted updates, adds them, publishes encrypted sums.

Data flow of a round through this package: ``ingest`` (validate a
submission's stream, spool it, add it into the ``running_sum``) →
``rounds`` (open, close at deadline or when all are in, enforce the
participation floor) → ``publish`` (write the sum durably, serve it to
nodes). ``state`` and ``spool`` keep everything on disk so a restart
loses nothing that was acknowledged.
"""
