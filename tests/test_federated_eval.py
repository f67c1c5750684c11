"""Federated evaluation slots (docs/spec/sum-checks.md §5): encoding, sanitizing, decoding, through CKKS."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cipherhive.ckks import codec, keys
from cipherhive.ckks.codec import VALUE_RANGE, PublicCodec, SecretCodec
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import EVAL_METRICS, EVAL_SLOT, EVAL_VALUES, LEADING_VALUES
from cipherhive.node import metrics
from cipherhive.node.sums.checks import CheckedApplier, SumLimits
from cipherhive.node.trainer import AppliedRound
from cipherhive.node.training import federated_eval as fe
from cipherhive.node.training.update import leading, weighted_vector
from cipherhive.server.ingest.running_sum import RunningSum
from cipherhive.v1 import federation_pb2 as pb

UNIT = 1000.0
LOSS, ACC = EVAL_METRICS.index("loss"), EVAL_METRICS.index("accuracy")


def _sum_leading(*returned: Any) -> np.ndarray:
    """The leading values of a plaintext sum of members' vectors (weight 1 each)."""
    return sum((leading(1.0, fe.encode(r, UNIT, 64).slots) for r in returned), np.zeros(LEADING_VALUES))


def test_slots_sit_between_the_check_slot_and_the_update() -> None:
    assert LEADING_VALUES == EVAL_SLOT + EVAL_VALUES == 2 + 2 * len(EVAL_METRICS)
    evaluation = fe.encode((200, {"loss": 0.5, "accuracy": 0.75}), UNIT, 64).slots
    vector = weighted_vector(np.ones(3), np.zeros(3), 100, UNIT, 64, evaluation)
    assert vector.shape == (LEADING_VALUES + 3,)
    np.testing.assert_allclose(vector[:2], [0.1, 1.0])
    np.testing.assert_allclose(vector[EVAL_SLOT + 2 * LOSS : EVAL_SLOT + 2 * LOSS + 2], [0.2, 0.1])
    np.testing.assert_allclose(vector[EVAL_SLOT + 2 * ACC : EVAL_SLOT + 2 * ACC + 2], [0.2, 0.15])
    np.testing.assert_allclose(vector[LEADING_VALUES:], [0.1] * 3)


def test_decoded_mean_is_the_weighted_mean_rounded() -> None:
    members = [(120, {"loss": 0.31234, "accuracy": 0.91}), (30, {"loss": 1.2, "accuracy": 0.5})]
    members.append((450, {"loss": 0.7, "accuracy": 0.8, "f1": 0.2}))  # f1 is not federated
    found = fe.decode(_sum_leading(*members), UNIT)
    assert found is not None
    total = sum(n for n, _ in members)
    for name in EVAL_METRICS:
        exact = sum(n * m[name] for n, m in members) / total
        assert found.metrics[name] == float(f"{exact:.4g}")
    assert found.examples == total == found.counts["loss"] == found.counts["accuracy"]
    assert found.as_dict() == {"examples": 600.0, **found.metrics}
    assert found.log_fields() == {
        "eval_examples": 600,
        "eval_loss": found.metrics["loss"],
        "eval_accuracy": found.metrics["accuracy"],
    }


def test_members_may_send_only_some_metrics() -> None:
    """A regression trainer (no accuracy) counts for the loss only."""
    found = fe.decode(_sum_leading((100, {"loss": 1.0, "accuracy": 1.0}), (300, {"loss": 2.0})), UNIT)
    assert found is not None
    assert found.metrics == {"loss": 1.75, "accuracy": 1.0}
    assert found.counts == {"loss": 400, "accuracy": 100}
    assert found.log_fields()["eval_accuracy_examples"] == 100


def test_no_evaluation_decodes_to_none() -> None:
    assert fe.decode(leading(2.5) * 3, UNIT) is None
    assert fe.decode(_sum_leading((0, {"loss": 1.0}), None, (5, {})), UNIT) is None


@pytest.mark.parametrize(
    ("returned", "words"),
    [
        ((10, {"loss": math.nan, "accuracy": 0.5}), "loss = nan"),
        ((10, {"loss": math.inf, "accuracy": 0.5}), "loss = inf"),
        ((10, {"loss": -0.1, "accuracy": 0.5}), "loss = -0.1"),
        ((10, {"loss": 0.3, "accuracy": 1.5}), "accuracy = 1.5"),
        ((10, {"loss": 0.3, "accuracy": "high"}), "accuracy = 'high'"),
    ],
)
def test_a_bad_metric_is_not_sent_and_the_others_are(returned: Any, words: str) -> None:
    encoded = fe.encode(returned, UNIT, 64)
    assert len(encoded.problems) == 1 and words in encoded.problems[0]
    bad = "loss" if "loss" in words else "accuracy"
    index = EVAL_METRICS.index(bad)
    assert encoded.slots[2 * index] == encoded.slots[2 * index + 1] == 0.0
    assert set(encoded.sent) == set(EVAL_METRICS) - {bad}
    assert np.isfinite(encoded.slots).all()


@pytest.mark.parametrize(
    "returned",
    [(-1, {"loss": 0.1}), (2.5, {"loss": 0.1}), (True, {"loss": 0.1}), (math.nan, {"loss": 0.1}),
     ("10", {"loss": 0.1}), (10, [0.1]), 0.5, (10,), None],
)  # fmt: skip
def test_a_bad_return_value_sends_zeros(returned: Any) -> None:
    encoded = fe.encode(returned, UNIT, 64)
    assert not encoded.slots.any() and not encoded.sent
    assert encoded.problems or returned is None


def test_values_the_encoding_cannot_hold_are_not_sent() -> None:
    share = VALUE_RANGE / 64
    too_many = fe.encode((int(share * UNIT) + 1, {"loss": 0.1}), UNIT, 64)
    assert not too_many.slots.any() and "more than the encoding holds" in too_many.problems[0]
    huge_loss = fe.encode((1000, {"loss": share * 2, "accuracy": 0.5}), UNIT, 64)
    assert set(huge_loss.sent) == {"accuracy"}
    assert not fe.encode((10, {"loss": 0.1}), 0.0, 64).slots.any()


def _slots(**values: float) -> np.ndarray:
    out = np.zeros(LEADING_VALUES)
    for key, value in values.items():
        name, _, part = key.rpartition("_")
        out[EVAL_SLOT + 2 * EVAL_METRICS.index(name) + (part == "sum")] = value
    return out


@pytest.mark.parametrize(
    "hostile",
    [
        _slots(loss_n=-0.3, loss_sum=-0.1),  # a negative count
        _slots(loss_n=0.1234567, loss_sum=0.1),  # not a whole number of examples
        _slots(accuracy_n=0.3, accuracy_sum=0.6),  # a mean accuracy of 2
        _slots(loss_n=0.3, loss_sum=-0.6),  # a negative mean loss
        _slots(loss_sum=5.0),  # a weighted sum over no examples
        _slots(loss_n=math.nan),
    ],
)
def test_implausible_slots_are_refused(hostile: np.ndarray) -> None:
    with pytest.raises(fe.ImplausibleEval) as err:
        fe.decode(hostile, UNIT)
    assert not any(ch.isdigit() for ch in str(err.value)), "the message must hold no decrypted value"


def test_show_sets_fields_and_gauges_and_hides_an_implausible_evaluation(caplog: Any) -> None:
    fields: dict[str, Any] = {"round": 4}
    shown = fe.show(_sum_leading((100, {"loss": 0.25, "accuracy": 0.5})), UNIT, 3, fields)
    assert shown == {"examples": 100.0, "loss": 0.25, "accuracy": 0.5}
    assert fields == {
        "round": 4,
        "eval_examples": 100,
        "eval_loss": 0.25,
        "eval_accuracy": 0.5,
        "eval_of_round": 3,
    }
    assert metrics.FEDERATED_EVAL.labels("accuracy")._value.get() == 0.5
    assert metrics.FEDERATED_EVAL_EXAMPLES._value.get() == 100
    assert metrics.FEDERATED_EVAL_ROUND._value.get() == 3
    fields = {"round": 5}
    with caplog.at_level(logging.WARNING, logger="cipherhive.node"):
        assert fe.show(_slots(accuracy_n=0.3, accuracy_sum=0.6), UNIT, 4, fields) == {}
    assert fields == {"round": 5}
    assert "not showing the federated evaluation" in caplog.text


class _Trainer:
    def __init__(self, returned: Any = None, fails: bool = False) -> None:
        self.returned, self.fails, self.calls = returned, fails, 0

    def evaluate(self, model: Any) -> Any:
        self.calls += 1
        if self.fails:
            raise RuntimeError("broken validation loader")
        return self.returned


def _settings() -> pb.FederationSettings:
    return pb.FederationSettings(weight_unit=UNIT, max_participants=64)


def test_evaluate_base_sanitizes_on_the_way_in(caplog: Any) -> None:
    assert fe.evaluate_base(object(), None, _settings(), False, {}) is None  # no evaluate(): zeros
    private = _Trainer((10, {"loss": 0.1}))
    assert fe.evaluate_base(private, None, _settings(), True, {}) is None
    assert private.calls == 0, "under DP validation data is outside ε: not even evaluated"
    with caplog.at_level(logging.WARNING, logger="cipherhive.node"):
        assert fe.evaluate_base(_Trainer(fails=True), None, _settings(), False, {}) is None
        slots = fe.evaluate_base(
            _Trainer((10, {"loss": math.nan, "accuracy": 0.5})), None, _settings(), False, {}
        )
    assert "evaluate() failed" in caplog.text and "loss = nan" in caplog.text
    assert slots is not None and np.isfinite(slots).all()
    assert slots[2 * LOSS] == 0.0 and slots[2 * ACC] == pytest.approx(0.01)


def test_applied_round_defaults_to_no_evaluation() -> None:
    assert AppliedRound(1, 3, {}).federated_eval == {}


@pytest.fixture(scope="module")
def codecs(tmp_path_factory: pytest.TempPathFactory) -> tuple[SecretCodec, PublicCodec]:
    files = keys.keygen(tmp_path_factory.mktemp("keys"))
    return SecretCodec(files.secret.read_bytes()), PublicCodec(files.public.read_bytes())


def test_through_encryption_the_sum_decodes_to_the_plaintext_mean(
    codecs: tuple[SecretCodec, PublicCodec], tmp_path: Path
) -> None:
    """Members' vectors, encrypted and added as the server does: the node reads the weighted mean."""
    secret, public = codecs
    rng = np.random.default_rng(5)
    global_ = rng.normal(0, 1, 300).astype(np.float32)
    members = [(37, {"loss": 2.2913, "accuracy": 0.1351}), (1, {"loss": 0.05, "accuracy": 1.0})]
    members += [(4096, {"loss": 0.123456, "accuracy": 0.98765}), (0, {})]
    running = RunningSum(public, 1)
    for n, values in members:
        local = global_ + rng.normal(0, 0.05, 300).astype(np.float32)
        evaluation = fe.encode((n, values), UNIT, 64).slots
        vector = weighted_vector(local, global_, 500, UNIT, 64, evaluation)
        running.add(0, public.load(next(iter(secret.encrypt_all(vector)))))
    out = global_.copy()
    limits = SumLimits(floor=3, max_update=10.0, max_participants=64, participants=len(members))
    applier = CheckedApplier(global_, out, codec.VALUES_PER_CIPHERTEXT, limits)
    for blob in running.serialized():
        applier.feed(secret.decrypt(blob))
    applier.finish(1)
    found = fe.decode(applier.leading, UNIT)
    assert found is not None
    total = sum(n for n, _ in members)
    assert found.examples == total
    for name in EVAL_METRICS:
        exact = sum(n * m.get(name, 0.0) for n, m in members) / total
        assert found.metrics[name] == float(f"{exact:.4g}")


# --------------------------------------------------------------------------- real processes

EVAL_PLUGIN = """
import json
import math
from pathlib import Path

import torch
from torch import nn

from cipherhive.node.trainer import TrainResult

# shard -> what evaluate() returns: shard 2's trainer reports a NaN loss (and a metric not federated).
EVALUATIONS = {
    0: (100, {"loss": 0.5, "accuracy": 0.9}),
    1: (300, {"loss": 1.5, "accuracy": 0.6}),
    2: (50, {"loss": math.nan, "accuracy": 0.8, "f1": 0.3}),
}


class FixedEvalTrainer:
    def __init__(self, shard: int = 0, shards: int = 3) -> None:
        self.shard = shard

    def build_model(self):
        torch.manual_seed(0)
        return nn.Linear(4, 2)

    def train(self, model, info):
        with torch.no_grad():
            model.weight.add_(0.01 * (self.shard + 1))
        return TrainResult(num_samples=10 * (self.shard + 1))

    def evaluate(self, model):
        return EVALUATIONS[self.shard]

    def after_round(self, model, applied):
        Path(f"applied-{self.shard}-{applied.round}.json").write_text(json.dumps(applied.federated_eval))
"""


@pytest.mark.slow
def test_a_trainer_reporting_nan_does_not_spoil_the_round(tmp_path: Path) -> None:
    """Real processes, masked round: node-3's NaN loss is not sent (a warning), the sum is applied
    everywhere, the loss is the mean over the two others and the accuracy over all three."""
    (tmp_path / "fixed_eval.py").write_text(EVAL_PLUGIN, encoding="utf-8")
    fed = LocalFederation(tmp_path, nodes=3, plugin="fixed_eval:FixedEvalTrainer", rounds={"max_rounds": 1})
    fed.setup()
    try:
        fed.start()
        assert fed.wait_round(1, 180).state == pb.ROUND_SUM_READY
        fed.wait_for(lambda: all((tmp_path / f"applied-{i}-1.json").exists() for i in range(3)), 60, "apply")
    finally:
        codes = fed.stop_all()
    assert all(c in (0, None) for c in codes.values()), codes
    expected = {"examples": 450.0, "loss": 1.25, "accuracy": float(f"{310 / 450:.4g}")}
    for i in range(3):
        assert json.loads((tmp_path / f"applied-{i}-1.json").read_text()) == expected
        log = fed.log(fed.node_name(i))
        assert "rejected" not in log
        line = next(x for x in log.splitlines() if "applied round sum" in x)
        for field in ("eval_examples=450", "eval_loss=1.25", "eval_loss_examples=400"):
            assert field in line, line
        assert "eval_accuracy=0.6889" in line and "eval_accuracy_examples" not in line, line
    assert "not sending part of this node's evaluation: loss = nan" in fed.log("node-3")
