"""Prometheus metrics of the aggregator, served on ``[server] metrics_listen``.

Only counts, sizes and durations: nothing derived from a ciphertext's
content, nothing per value. Labels are bounded (status codes, round states).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

NODES_ONLINE = Gauge("cipherhive_nodes_online", "Members with an open round-event stream", registry=REGISTRY)
ROUNDS = Counter(
    "cipherhive_rounds_total", "Rounds by outcome (opened, published, failed)", ["outcome"], registry=REGISTRY
)
SUBMISSIONS = Counter(
    "cipherhive_submissions_total",
    "Uploads by result: accepted, duplicate, or the gRPC status they were refused with",
    ["result"],
    registry=REGISTRY,
)
BYTES_RECEIVED = Counter(
    "cipherhive_received_bytes_total", "Ciphertext bytes received in uploads", registry=REGISTRY
)
VALUES_ADDED = Counter(
    "cipherhive_ingested_values_total", "Encrypted values added into running sums", registry=REGISTRY
)
INGEST_SECONDS = Counter(
    "cipherhive_ingest_seconds_total",
    "CPU-side seconds spent validating and adding ciphertexts (values/seconds = ingest throughput)",
    registry=REGISTRY,
)
INGEST_RATE = Gauge(
    "cipherhive_ingest_values_per_second", "Ingest throughput of the last accepted upload", registry=REGISTRY
)
CALLS_IN_PROGRESS = Gauge(
    "cipherhive_calls_in_progress", "Calls admitted by the guard and not yet finished", registry=REGISTRY
)
CALLS_REFUSED = Counter(
    "cipherhive_calls_refused_total",
    "Calls refused by the guard before any servicer ran (identity, role, revocation, limits), by status",
    ["code"],
    registry=REGISTRY,
)
STREAMS_CUT = Counter(
    "cipherhive_streams_cut_total",
    "Client streams cut for sending nothing (deadline_exceeded) or too slowly (resource_exhausted)",
    ["code"],
    registry=REGISTRY,
)
ROUND_SECONDS = Histogram(
    "cipherhive_round_duration_seconds",
    "Time from a round opening to its sum being published or the round failing",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)


def serve(address: str) -> None:
    """Start the scrape endpoint (``host:port``) in a background thread."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=REGISTRY)
