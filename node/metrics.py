"""Prometheus metrics of a member node, served on ``[node] metrics_listen``.

Durations, round numbers and the privacy budget only: never a model value, a
sample count or anything computed from decrypted data. ε is computed from the
DP mechanism's parameters and this node's ledger, not from data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cipherhive.node.checks import REASONS

REGISTRY = CollectorRegistry()

ROUNDS_JOINED = Counter(
    "cipherhive_node_rounds_joined_total", "Rounds this node submitted an update to", registry=REGISTRY
)
PHASE_SECONDS = Histogram(
    "cipherhive_node_phase_seconds",
    "Duration of each phase of a round (train, encrypt_upload, download_decrypt, apply)",
    ["phase"],
    buckets=(0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
    registry=REGISTRY,
)
APPLIED_ROUND = Gauge(
    "cipherhive_node_applied_round",
    "Last round whose sum this node applied (its global version)",
    registry=REGISTRY,
)
PRIVACY_EPSILON = Gauge(
    "cipherhive_node_privacy_epsilon",
    "ε (at the node's δ, RDP accountant) its dataset has spent on DP-SGD, the current round included",
    registry=REGISTRY,
)
PRIVACY_EPSILON_LIMIT = Gauge(
    "cipherhive_node_privacy_epsilon_limit",
    "The node's ε limit ([privacy] max_epsilon; 0: no DP)",
    registry=REGISTRY,
)

SUMS_REJECTED = Counter(
    "cipherhive_node_sums_rejected_total",
    "Round sums this node rejected instead of applying, by reason (a fixed set, see node/checks.py)",
    ["reason"],
    registry=REGISTRY,
)
ROLLBACKS = Counter(
    "cipherhive_node_rollbacks_total",
    "Times this node rolled its model back because a round it had applied was withdrawn",
    registry=REGISTRY,
)
MASKED_REFUSALS = Counter(
    "cipherhive_node_masked_rounds_refused_total",
    "Masked rounds this node did not take part in (a roster it refused, a step the server refused, "
    "a base it already released a self-mask on); the log says why",
    registry=REGISTRY,
)

for _reason in REASONS:
    SUMS_REJECTED.labels(_reason)  # every label shows, at 0, before the first rejection


def serve(address: str) -> None:
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=REGISTRY)
