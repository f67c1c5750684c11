"""The DP-SGD helper: cryptographic randomness, enforced Poisson sampling, refusals.
Spec: docs/spec/privacy.md §1, §1.4."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from cipherhive.node.dp_sgd import DPUsageError, private_training
from cipherhive.node.privacy.randomness import CryptoStream, DPRandom
from cipherhive.node.privacy.round_info import DPRound

RECORDS = 400


def _round(steps: int = 5, z: float = 1.0, q: float = 0.1, delta: float = 1e-5, seed: int = 3) -> DPRound:
    noise, sampling = DPRandom(insecure_seed=seed).next_round()
    return DPRound(1, q, z, 1.0, steps, delta, noise, sampling, insecure=True)


def _data(n: int = RECORDS) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(model: nn.Module, data: Any, dp_round: DPRound, lr: float = 0.1) -> list[int]:
    sizes = []
    with private_training(model, torch.optim.SGD(model.parameters(), lr=lr), data, dp_round) as dp:
        for x, y in dp.loader:
            sizes.append(len(y))
            dp.optimizer.zero_grad()
            nn.functional.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
    return sizes


def forbid_default_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's default generator (and torch's) raise: DP randomness must come from the stream."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a default random generator was used in DP mode")

    for name in ("default_rng", "random", "rand", "randn", "normal", "uniform", "binomial", "permutation"):
        monkeypatch.setattr(np.random, name, refuse)
    monkeypatch.setattr(np.random, "Generator", refuse)
    monkeypatch.setattr(np.random, "RandomState", refuse)
    for name in ("rand", "randn", "normal", "randint", "randperm", "bernoulli"):
        monkeypatch.setattr(torch, name, refuse)


def test_a_round_uses_only_the_cryptographic_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _model(), _data()
    before = [p.detach().clone() for p in model.parameters()]
    forbid_default_generators(monkeypatch)
    with pytest.raises(AssertionError, match="default random generator"):
        np.random.default_rng(0)  # the trap works
    dp_round = _round(steps=6)
    sizes = _train(model, data, dp_round)
    assert dp_round.used and dp_round.steps_taken == 6 and len(sizes) == 6
    assert 0 < sum(sizes) / len(sizes) < 2 * RECORDS * 0.1  # Poisson batches around q·N = 40
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # Opacus' hooks and per-record gradients are gone: the model is plain again.
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_fixed_seed_reproduces_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        a, b = _model(), _model()
        _train(a, _data(), _round(seed=5))
        _train(b, _data(), _round(seed=5))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert "INSECURE" in caplog.text and "FIXED seed 5" in caplog.text
    c = _model()
    _train(c, _data(), _round(seed=6))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))
    # Without a seed every key is fresh.
    assert not np.array_equal(DPRandom().next_round()[0].words(4), DPRandom().next_round()[0].words(4))


def test_update_variance_matches_the_noise_the_accountant_assumed() -> None:
    """With every gradient zero, the update is pure noise: per value, steps · (lr · z · C / (q·N))²."""

    class Zero(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 250)  # 2,250 values

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * 0.0

    model = Zero()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    steps, z, q, lr = 20, 1.3, 0.1, 0.5
    dp_round = _round(steps=steps, z=z, q=q)
    with private_training(model, torch.optim.SGD(model.parameters(), lr=lr), _data(), dp_round) as dp:
        for x, _ in dp.loader:
            dp.optimizer.zero_grad()
            dp.model(x).sum().backward()
            dp.optimizer.step()
    delta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    expected = steps * (lr * z * 1.0 / (q * RECORDS)) ** 2
    # 2,250 values: the sample variance is within ~3 % (1 sd) of the truth; allow 10 %.
    assert float(delta.var()) == pytest.approx(expected, rel=0.10)
    assert abs(float(delta.mean())) < 4 * math.sqrt(expected / delta.numel())


def test_stream_statistics() -> None:
    stream = CryptoStream(bytes(32), 1, 1)
    u = stream.uniform(200_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    g = stream.secure_normal(200_000, 2.0)
    assert abs(g.mean()) < 0.03 and g.std() == pytest.approx(2.0, rel=0.01)
    # Same key and nonce, same stream; another nonce, another stream.
    assert np.array_equal(CryptoStream(bytes(32), 1, 1).words(8), CryptoStream(bytes(32), 1, 1).words(8))
    assert not np.array_equal(CryptoStream(bytes(32), 1, 1).words(8), CryptoStream(bytes(32), 2, 1).words(8))


def test_refuses_loaders_the_helper_did_not_make() -> None:
    data = _data()
    for loader in (DataLoader(data, batch_size=32, shuffle=True), DataLoader(data, batch_size=32)):
        with pytest.raises(DPUsageError, match="not a DataLoader"):
            _train(_model(), loader, _round())

    class Stream(IterableDataset[Any]):
        def __iter__(self) -> Iterator[Any]:
            return iter(data)

    with pytest.raises(DPUsageError, match="not a map-style dataset"):
        _train(_model(), Stream(), _round())


def test_refuses_batchnorm() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    with pytest.raises(DPUsageError, match="BatchNorm"):
        _train(model, _data(), _round())


def test_refuses_accumulation_across_poisson_batches() -> None:
    model, dp_round = _model(), _round(steps=4)
    with private_training(model, torch.optim.SGD(model.parameters(), lr=0.1), _data(), dp_round) as dp:
        batches = iter(dp.loader)
        x, y = next(batches)
        nn.functional.cross_entropy(dp.model(x), y).backward()
        with pytest.raises(DPUsageError, match="accumulation"):
            next(batches)  # a second batch before the first one's step: accumulation
    assert dp_round.steps_taken == 0


def test_refuses_a_step_without_a_batch_and_a_second_pass() -> None:
    model, dp_round = _model(), _round(steps=2)
    with private_training(model, torch.optim.SGD(model.parameters(), lr=0.1), _data(), dp_round) as dp:
        for x, y in dp.loader:
            dp.optimizer.zero_grad()
            nn.functional.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
        with pytest.raises(DPUsageError, match="used up"):
            next(iter(dp.loader))  # a second epoch: more steps than were charged
        dp.optimizer.zero_grad()
        nn.functional.cross_entropy(dp.model(x), y).backward()
        with pytest.raises(DPUsageError, match="without a new Poisson batch"):
            dp.optimizer.step()
    with pytest.raises(DPUsageError, match="used already"):
        _train(model, _data(), dp_round)


def test_batch_memory_manager_is_supported() -> None:
    """Opacus' BatchMemoryManager splits one Poisson batch and steps once: that is not accumulation."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    model, dp_round = _model(), _round(steps=3, q=0.2)
    physical = 0
    with (
        private_training(model, torch.optim.SGD(model.parameters(), lr=0.1), _data(), dp_round) as dp,
        BatchMemoryManager(
            data_loader=dp.loader, max_physical_batch_size=16, optimizer=dp.optimizer
        ) as loader,
    ):
        for x, y in loader:
            physical += 1
            dp.optimizer.zero_grad()
            nn.functional.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
    assert dp_round.steps_taken == 3 and physical > 3


def test_refuses_a_delta_too_large_for_the_dataset() -> None:
    with pytest.raises(DPUsageError, match=r"1/\(10·N\)"):
        _train(_model(), _data(), _round(delta=1.0 / (10 * RECORDS) * 1.01))
    _train(_model(), _data(), _round(delta=1.0 / (10 * RECORDS)))
