"""Prometheus metrics of a member node, served on ``[node] metrics_listen``.

Durations, round numbers, the privacy budget and the federated evaluation only:
never a model value or a sample count. ε is computed from the DP mechanism's
parameters and this node's ledger, not from data. The federated evaluation
(docs/spec/sum-checks.md §5) is the one figure computed from decrypted data, and it is shown rounded
to 4 significant digits (:mod:`cipherhive.node.training.federated_eval`), like in the log.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cipherhive.federation.layout import EVAL_METRICS
from cipherhive.node.sums.checks import REASONS

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
    "Round sums this node rejected instead of applying, by reason (a fixed set, see node/sums/checks.py)",
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

FEDERATED_EVAL = Gauge(
    "cipherhive_node_federated_eval",
    "Federation-wide validation metric (Σ n·metric / Σ n over every member that evaluated, rounded to "
    "4 significant digits) of the model of cipherhive_node_federated_eval_round; NaN: not sent",
    ["metric"],
    registry=REGISTRY,
)
FEDERATED_EVAL_EXAMPLES = Gauge(
    "cipherhive_node_federated_eval_examples",
    "Validation examples behind cipherhive_node_federated_eval (Σ n, rounded to 4 significant digits)",
    registry=REGISTRY,
)
FEDERATED_EVAL_ROUND = Gauge(
    "cipherhive_node_federated_eval_round",
    "The round whose global model the federated evaluation measured (the base of the last sum applied)",
    registry=REGISTRY,
)
for _metric in EVAL_METRICS:
    FEDERATED_EVAL.labels(_metric).set(float("nan"))

for _reason in REASONS:
    SUMS_REJECTED.labels(_reason)  # every label shows, at 0, before the first rejection


def serve(address: str) -> None:
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=REGISTRY)
