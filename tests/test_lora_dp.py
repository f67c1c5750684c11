"""Record-level DP-SGD in the LoRA trainer: the helper trains the adapters, the ledger is charged,
what Opacus or DP-SGD cannot protect is refused. Tiny base model, as in test_lora.py.
Spec: docs/spec/privacy.md §1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from cipherhive.demo.lora_task import create_base_model, member_data
from cipherhive.node.config import NodeConfig
from cipherhive.node.dp_sgd import DPUsageError
from cipherhive.node.privacy.ledger import PrivacyLedger, ledger_path
from cipherhive.node.privacy.randomness import DPRandom
from cipherhive.node.privacy.record_level import PrivacyGuard
from cipherhive.node.privacy.round_info import DPRound
from cipherhive.node.trainer import RoundInfo
from cipherhive.node.trainers.lora import LoraTrainer
from cipherhive.privacy.schedule import PrivacySchedule
from cipherhive.v1 import federation_pb2 as pb
from tests.test_dp_sgd import forbid_default_generators

SCHEDULE = PrivacySchedule("record", 3, 0.05, 1.2, 3, 1.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lora-dp") / "base"
    create_base_model(directory, seed=0, steps=20, hidden=32, layers=2, heads=4, intermediate=64)
    return directory


def _trainer(base: Path, **extra: Any) -> LoraTrainer:
    options: dict[str, Any] = {
        "base_model": str(base),
        "data": "cipherhive.demo.lora_task:member_data",
        "data_options": {"tokenizer": str(base)},
        "labels": "negative,neutral,positive",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": "query,value",
        "lr": 5e-3,
        "shard": 0,
        "shards": 3,
        **extra,
    }
    return LoraTrainer(**options)


def _guard(tmp_path: Path) -> PrivacyGuard:
    config = NodeConfig(
        plugin="x:y",
        insecure=True,
        name="n1",
        state_dir=tmp_path / "state",
        max_epsilon=8.0,
        dataset="acme",
        ledger_dir=tmp_path / "ledgers",
        insecure_seed=1,
    )
    PrivacyLedger.init(ledger_path(config.ledger_dir, "acme"), "acme")
    guard = PrivacyGuard(config, "n1")
    guard.accept(pb.FederationSettings(privacy=SCHEDULE.to_proto()), 0)
    return guard


def _dp_round(steps: int = 2) -> DPRound:
    noise, sampling = DPRandom(insecure_seed=4).next_round()
    return DPRound(1, 0.05, 1.0, 1.0, steps, 1e-5, noise, sampling, insecure=True)


def test_a_dp_round_trains_the_adapters_through_the_helper(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(base)
    model = trainer.build_model()
    trainer._data()  # the data factory draws its split with numpy's generator before DP starts
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    guard = _guard(tmp_path)
    dp = guard.begin_round(1)
    assert dp is not None
    assert [e.round for e in guard.ledger.entries()] == [1]  # type: ignore[union-attr]
    assert guard.spent() == pytest.approx(SCHEDULE.epsilon(1e-5, rounds=1), rel=1e-6)
    forbid_default_generators(monkeypatch)  # sampling and noise come from the ChaCha20 streams only
    result = trainer.train(model, RoundInfo(1, 0, "n1", privacy=dp))
    monkeypatch.undo()
    assert dp.used and dp.steps_taken == SCHEDULE.steps_per_round  # the schedule's steps, not epochs
    guard.check_trained(dp)
    assert result.num_samples == len(trainer._data()[0])
    assert "val_accuracy" in result.metrics
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trained  # the frozen base did not move
    assert any("lora_B" in n for n in changed)  # lora_B starts at zero: only noisy steps move it
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus' hooks are gone
    # The federated tensors are what was trained; the model still trains without DP afterwards.
    assert {n for n, _ in trainer.federated_tensors(model)} <= trained
    trainer.train(model, RoundInfo(2, 1, "n1"))


def test_a_layer_opacus_cannot_handle_is_refused(base: Path) -> None:
    # LoRA on the word embeddings: peft's lora.Embedding holds its matrices as bare parameters,
    # for which Opacus has no per-record gradient.
    trainer = _trainer(base, target_modules="word_embeddings")
    model = trainer.build_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp = _dp_round()
    with pytest.raises(DPUsageError, match="Opacus cannot train this model privately"):
        trainer.train(model, RoundInfo(1, 0, "n1", privacy=dp))
    assert not dp.used and all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_batchnorm_and_loaders_are_refused(base: Path) -> None:
    trainer = _trainer(base)
    model = trainer.build_model()
    model.base_model.model.bert.extra_norm = nn.BatchNorm1d(4)  # type: ignore[union-attr]
    with pytest.raises(DPUsageError, match="BatchNorm"):
        trainer.train(model, RoundInfo(1, 0, "n1", privacy=_dp_round()))

    def loader_data(**kw: Any) -> Any:
        train, val = member_data(**kw)
        return DataLoader(train, batch_size=8, shuffle=True), val

    shuffled = _trainer(base)
    shuffled._datasets = loader_data(tokenizer=str(base), shard=0, shards=3)
    with pytest.raises(DPUsageError, match="not a DataLoader"):
        shuffled.train(shuffled.build_model(), RoundInfo(1, 0, "n1", privacy=_dp_round()))


def test_demo_accepts_dp_for_the_lora_task(monkeypatch: pytest.MonkeyPatch) -> None:
    import cipherhive.demo.lora_run as lora_run
    from cipherhive.cli import main

    seen: list[Any] = []
    monkeypatch.setattr(lora_run, "run_lora_demo", lambda args: seen.append(args) or 0)
    assert main(["demo", "--task", "lora", "--dp", "--epsilon", "3"]) == 0
    assert seen[0].dp and seen[0].epsilon == 3.0 and seen[0].rounds == 10
    schedule = lora_run.lora_schedule(3.0, seen[0].rounds)
    assert schedule.epsilon(1e-5) == pytest.approx(3.0, rel=0.01)
    assert main(["demo", "--task", "lora", "--dp-table"]) == 2  # the DP tables are digits only
