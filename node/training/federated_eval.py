"""Federated evaluation under encryption (docs/spec/sum-checks.md §1, §5).

A trainer may provide ``evaluate(model) -> (num_examples, metrics)`` on its own
validation data. Why the evaluation travels the way it does:

* **It rides the update.** Each member puts ``n/u`` and ``n/u · metric`` for every
  metric of :data:`~cipherhive.federation.layout.EVAL_METRICS` into the evaluation slots of
  the vector it encrypts anyway (:mod:`cipherhive.federation.layout`; ``u`` is the
  federation's ``weight_unit``, which keeps large validation sets in range). The
  server adds them with the update, masked like it, so it costs nothing extra
  and a member's own figures are never visible to anyone: members decrypt only
  ``Σn`` and ``Σn·metric`` and show ``Σn·metric / Σn``.
* **It evaluates the round's base.** A node evaluates the current global model
  (the model it is about to train from, i.e. the last sum it applied) before
  it trains, so round r's sum carries the federation-wide validation of round
  r's base model: round r - 1's global model in a federation where no round
  failed, the initial model in round 1. No second pass, no second upload.
* **A fixed set of metrics.** Every member's vector must have the same length.
  Metrics a trainer returns beyond the set stay in its own log.
* **Checked on the way in.** A metric that is not finite, outside its bounds
  (:data:`BOUNDS`) or too large for the encoding is not sent: its slots are
  zeros, with a warning. A trainer that reports NaN must never make the other
  members reject a sum.
* **Checked on the way out** (:func:`decode`): counts must be whole and not
  negative, means within their bounds. An implausible evaluation is not shown;
  it says nothing about the update, so the sum is still applied.
* **Rounded** to 4 significant digits wherever it is shown (log, metrics, the
  ``after_round`` hook): a decrypted value at full precision next to its
  ciphertext gives away the shared key (CKKS key recovery).
* **Not under differential privacy**: validation records are outside the
  privacy accounting, so a node training with DP-SGD sends zeros.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cipherhive.ckks.codec import VALUE_RANGE
from cipherhive.federation.layout import EVAL_METRICS, EVAL_SLOT, EVAL_VALUES
from cipherhive.node import metrics
from cipherhive.runtime.logs import event
from cipherhive.v1 import federation_pb2 as pb

log = logging.getLogger("cipherhive.node")

#: The plausible range of each federated metric: what a node sends, and what a decrypted
#: mean must lie in (within :data:`MEAN_TOLERANCE`).
BOUNDS: dict[str, tuple[float, float]] = {"loss": (0.0, math.inf), "accuracy": (0.0, 1.0)}
#: Slack for CKKS error in a decrypted mean (~1e-9 / Σn·u); far below what 4 digits show.
MEAN_TOLERANCE = 1e-4
#: Largest distance of a decrypted count from a whole number (CKKS error is ~1e-9 · u).
COUNT_TOLERANCE = 0.01

assert set(BOUNDS) == set(EVAL_METRICS)

#: What a node's training step hands to the upload: (weight, TrainResult, trained values,
#: evaluation slots or None for zeros).
Trained = tuple[float, Any, np.ndarray, np.ndarray | None]


def round4(value: float) -> float:
    """4 significant digits: how every decrypted figure is shown."""
    return float(f"{value:.4g}")


@dataclass(frozen=True)
class Encoded:
    """The evaluation slots a node sends, and why any metric was left out (for the log)."""

    slots: np.ndarray
    sent: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    if not math.isfinite(number) or number < 0 or number != int(number):
        return None
    return int(number)


def encode(returned: Any, unit: float, max_participants: int) -> Encoded:
    """The slots for what ``evaluate`` returned: ``n/u`` and ``n/u · metric`` per metric.

    Anything that cannot be sent faithfully is left out (zeros), never an error.
    """
    slots = np.zeros(EVAL_VALUES)
    if not (isinstance(returned, tuple | list) and len(returned) == 2):
        return Encoded(slots, problems=["evaluate() must return (num_examples, metrics)"])
    n, values = _count(returned[0]), returned[1]
    if n is None:
        return Encoded(slots, problems=[f"num_examples {returned[0]!r} is not a whole number ≥ 0"])
    if not isinstance(values, Mapping):
        return Encoded(slots, problems=["metrics must be a dict of metric name to number"])
    if n == 0:
        return Encoded(slots)
    if not unit > 0:
        return Encoded(slots, problems=["the federation announced no weight unit"])
    share = VALUE_RANGE / max(1, max_participants)
    weight = n / unit
    if weight > share:
        return Encoded(slots, problems=[f"{n} examples are more than the encoding holds (weight_unit)"])
    sent: dict[str, float] = {}
    problems: list[str] = []
    for index, name in enumerate(EVAL_METRICS):
        if name not in values:
            continue
        raw = values[name]
        value = float(raw) if isinstance(raw, numbers.Real) and not isinstance(raw, bool) else math.nan
        low, high = BOUNDS[name]
        if not math.isfinite(value) or not low <= value <= high:
            problems.append(f"{name} = {raw!r} is not a finite number in [{low:g}, {high:g}]")
            continue
        if weight * value > share:
            problems.append(f"{name} = {value:.4g} over {n} examples is more than the encoding holds")
            continue
        slots[2 * index] = weight
        slots[2 * index + 1] = weight * value
        sent[name] = value
    return Encoded(slots, sent, problems)


def evaluate_base(
    trainer: Any, model: Any, settings: pb.FederationSettings, private: bool, fields: dict[str, Any]
) -> np.ndarray | None:
    """Evaluate the current global model with the trainer's ``evaluate``; the slots to send.

    None (zeros are sent) when the trainer has no ``evaluate``, under DP, or when it fails.
    """
    evaluate = getattr(trainer, "evaluate", None)
    if evaluate is None:
        return None
    if private:
        log.debug("no federated evaluation under DP: validation data is outside the privacy accounting")
        return None
    started = time.perf_counter()
    try:
        returned = evaluate(model)
    except Exception:
        log.exception("trainer evaluate() failed; sending no evaluation", extra={"fields": fields})
        return None
    encoded = encode(returned, settings.weight_unit, settings.max_participants)
    if encoded.problems:
        event(
            log,
            "not sending part of this node's evaluation: " + "; ".join(encoded.problems),
            logging.WARNING,
            **fields,
        )
    if encoded.sent:
        event(
            log,
            "evaluated the global model",
            eval_s=round(time.perf_counter() - started, 3),
            eval_examples=returned[0],
            metrics={k: round4(v) for k, v in encoded.sent.items()},
            **fields,
        )
    return encoded.slots


class ImplausibleEval(ValueError):
    """Decrypted evaluation slots no honest members can have sent (the message has no value)."""


@dataclass(frozen=True)
class FederatedEval:
    """The federation-wide evaluation of a round's base model, rounded to 4 significant digits."""

    metrics: dict[str, float]
    #: Validation examples behind each metric (members may send only some metrics).
    counts: dict[str, int]

    @property
    def examples(self) -> int:
        return max(self.counts.values(), default=0)

    def as_dict(self) -> dict[str, float]:
        """For ``AppliedRound.federated_eval``: ``examples`` and each metric that was sent."""
        return {"examples": float(round4(self.examples)), **self.metrics}

    def log_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"eval_examples": int(round4(self.examples))}
        for name, value in self.metrics.items():
            out[f"eval_{name}"] = value
            if self.counts[name] != self.examples:
                out[f"eval_{name}_examples"] = int(round4(self.counts[name]))
        return out


def decode(leading: np.ndarray, unit: float) -> FederatedEval | None:
    """The evaluation in a decrypted sum's leading values; None when no member sent one."""
    slots = np.asarray(leading, dtype=np.float64)[EVAL_SLOT : EVAL_SLOT + EVAL_VALUES]
    if slots.shape != (EVAL_VALUES,) or not np.isfinite(slots).all():
        raise ImplausibleEval("the evaluation slots are missing or not finite")
    shown: dict[str, float] = {}
    counts: dict[str, int] = {}
    for index, name in enumerate(EVAL_METRICS):
        weight, weighted = float(slots[2 * index]), float(slots[2 * index + 1])
        count = weight * unit
        if abs(count) < 0.5:
            if abs(weighted) > MEAN_TOLERANCE:
                raise ImplausibleEval(f"{name}: a weighted sum without examples")
            continue
        if count < 0 or abs(count - round(count)) > COUNT_TOLERANCE:
            raise ImplausibleEval(f"{name}: the example count is negative or not a whole number")
        mean = weighted / weight
        low, high = BOUNDS[name]
        if not low - MEAN_TOLERANCE <= mean <= high + MEAN_TOLERANCE:
            raise ImplausibleEval(f"{name}: the mean is outside the metric's plausible range")
        shown[name] = round4(min(max(mean, low), high))
        counts[name] = round(count)
    return FederatedEval(shown, counts) if shown else None


def show(leading: np.ndarray, unit: float, base_round: int, fields: dict[str, Any]) -> dict[str, float]:
    """Read a sum's evaluation: add it to the log ``fields``, set the gauges; the hook's dict.

    An implausible evaluation is logged (without values) and left out; the sum still applies.
    """
    try:
        found = decode(leading, unit)
    except ImplausibleEval as exc:
        event(log, f"not showing the federated evaluation: {exc}", logging.WARNING, **fields)
        return {}
    if found is None:
        return {}
    fields.update(found.log_fields(), eval_of_round=base_round)
    metrics.FEDERATED_EVAL_ROUND.set(base_round)
    metrics.FEDERATED_EVAL_EXAMPLES.set(found.examples)
    for name in EVAL_METRICS:
        metrics.FEDERATED_EVAL.labels(name).set(found.metrics.get(name, math.nan))
    return found.as_dict()
