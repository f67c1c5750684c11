"""A node's privacy guard, settings and built-in trainer under DP (docs/spec/privacy.md §1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cipherhive.node.config import NodeConfig
from cipherhive.node.privacy.ledger import BudgetExhausted, PrivacyLedger, PrivacyLedgerError, ledger_path
from cipherhive.node.privacy.record_level import PrivacyGuard, ScheduleRefused
from cipherhive.node.trainer import RoundInfo
from cipherhive.node.trainers.torch_module import TorchModuleTrainer
from cipherhive.node.training.update import UpdateError
from cipherhive.privacy.schedule import PrivacySchedule
from cipherhive.runtime.config import ConfigError
from cipherhive.server.config import ServerConfig
from cipherhive.v1 import federation_pb2 as pb

SCHEDULE = PrivacySchedule("record", 4, 0.1, 1.5, 5, 1.0)


def _config(tmp_path: Path, max_epsilon: float, **kw: Any) -> NodeConfig:
    return NodeConfig(
        plugin="x:y",
        insecure=True,
        name="n1",
        state_dir=tmp_path / "state",
        max_epsilon=max_epsilon,
        dataset="acme",
        ledger_dir=tmp_path / "ledgers",
        **kw,
    )


def _guard(tmp_path: Path, max_epsilon: float) -> PrivacyGuard:
    config = _config(tmp_path, max_epsilon, insecure_seed=1)
    path = ledger_path(config.ledger_dir, "acme")
    if not path.exists():
        PrivacyLedger.init(path, "acme")
    return PrivacyGuard(config, "n1")


def _settings(schedule: PrivacySchedule = SCHEDULE) -> pb.FederationSettings:
    return pb.FederationSettings(privacy=schedule.to_proto())


def test_refuses_a_schedule_whose_projected_epsilon_exceeds_the_limit(tmp_path: Path) -> None:
    full = SCHEDULE.epsilon(1e-5)
    with pytest.raises(ScheduleRefused, match="beyond this node's limit"):
        _guard(tmp_path, full * 0.99).accept(_settings(), applied_round=0)
    guard = _guard(tmp_path, full * 1.001)
    guard.accept(_settings(), applied_round=0)
    # A schedule with other parameters but a lower ε is accepted: ε is compared, not parameters.
    cheaper = PrivacySchedule("record", 4, 0.1, 3.0, 5, 1.0)
    guard.accept(_settings(cheaper), applied_round=0)
    # Spent rounds count: after two rounds charged, a node still at round 0 would overrun.
    guard.accept(_settings(), applied_round=0)
    guard.begin_round(1)
    guard.begin_round(2)
    with pytest.raises(ScheduleRefused, match="beyond"):
        guard.accept(_settings(), applied_round=0)
    guard.accept(_settings(), applied_round=2)  # two rounds to go: fits


def test_modes_must_agree(tmp_path: Path) -> None:
    with pytest.raises(ScheduleRefused, match="announces no DP schedule"):
        _guard(tmp_path, 8.0).accept(pb.FederationSettings(), 0)
    plain = PrivacyGuard(NodeConfig(plugin="x:y", insecure=True, name="n"), "n")
    with pytest.raises(ScheduleRefused, match="no privacy budget"):
        plain.accept(_settings(), 0)
    plain.accept(pb.FederationSettings(), 0)
    assert plain.begin_round(1) is None and plain.weight(500, 1000.0) == 0.5


def test_rounds_are_charged_before_training_and_stop_at_the_limit(tmp_path: Path) -> None:
    limit = SCHEDULE.epsilon(1e-5, rounds=2) + 1e-9
    guard = _guard(tmp_path, limit)
    guard.accept(_settings(PrivacySchedule("record", 2, 0.1, 1.5, 5, 1.0)), 0)
    first = guard.begin_round(1)
    assert first is not None and (first.steps, first.sample_rate, first.noise_multiplier) == (5, 0.1, 1.5)
    assert first.insecure and guard.weight(500, 1000.0) == 1.0  # uniform weights under DP
    assert [e.round for e in guard.ledger.entries()] == [1]  # type: ignore[union-attr]
    with pytest.raises(UpdateError, match="did not train through"):
        guard.check_trained(first)  # the trainer ignored info.privacy: nothing is sent
    guard.begin_round(2)
    with pytest.raises(BudgetExhausted):
        guard.begin_round(3)
    assert guard.spent() == pytest.approx(limit, abs=1e-6)
    # A restarted node continues the same budget.
    restarted = _guard(tmp_path, limit)
    with pytest.raises(ScheduleRefused, match="no DP schedule"):
        restarted.begin_round(3)  # not before a schedule was accepted at Join
    restarted.accept(_settings(PrivacySchedule("record", 2, 0.1, 1.5, 5, 1.0)), applied_round=2)
    with pytest.raises(BudgetExhausted):
        restarted.begin_round(3)


def test_a_missing_ledger_stops_the_node_at_start(tmp_path: Path) -> None:
    with pytest.raises(PrivacyLedgerError, match="privacy-init"):
        PrivacyGuard(_config(tmp_path, 8.0), "n1")


def test_privacy_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="dataset"):
        NodeConfig(plugin="x:y", insecure=True, name="n", max_epsilon=8.0)
    with pytest.raises(ConfigError, match="report_metrics"):
        NodeConfig(plugin="x:y", insecure=True, name="n", max_epsilon=8.0, dataset="d", report_metrics=True)
    server = ServerConfig(
        insecure=True,
        dp_mode="record",
        dp_rounds=5,
        dp_sample_rate=0.1,
        dp_noise_multiplier=1.0,
        dp_steps_per_round=10,
    )
    assert server.max_rounds == 5 and server.privacy_schedule().epsilon(1e-5) > 0
    with pytest.raises(ConfigError, match="max_rounds"):
        ServerConfig(
            insecure=True,
            dp_mode="record",
            dp_rounds=5,
            max_rounds=6,
            dp_sample_rate=0.1,
            dp_noise_multiplier=1.0,
            dp_steps_per_round=10,
        )
    with pytest.raises(ConfigError, match="sample_rate"):
        ServerConfig(
            insecure=True, dp_mode="record", dp_rounds=5, dp_noise_multiplier=1.0, dp_steps_per_round=1
        )


# ---------------------------------------------------------------- the built-in torch trainer under DP


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def make_data(seed: int = 0) -> tuple[DataLoader[Any], None]:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(300, 6, generator=g), torch.randint(0, 2, (300,), generator=g))
    return DataLoader(data, batch_size=10, shuffle=True), None


def test_torch_module_trainer_runs_dp_sgd(tmp_path: Path) -> None:
    trainer = TorchModuleTrainer(model=f"{__name__}:make_model", data=f"{__name__}:make_data", lr=0.1)
    model = trainer.build_model()
    before = [p.detach().clone() for p in model.parameters()]
    guard = _guard(tmp_path, 8.0)
    guard.accept(_settings(), 0)
    dp = guard.begin_round(1)
    result = trainer.train(model, RoundInfo(1, 0, "n1", privacy=dp))
    assert dp is not None and dp.used and dp.steps_taken == SCHEDULE.steps_per_round  # steps, not epochs
    guard.check_trained(dp)
    assert result.num_samples == 300
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
