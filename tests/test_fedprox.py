"""FedProx (Li et al., MLSys 2020): the proximal term μ (w - w_global) on the gradients, without
and with record-level DP-SGD (where it is added after clipping and noise)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from cipherhive.node.privacy.randomness import DPRandom
from cipherhive.node.privacy.round_info import DPRound
from cipherhive.node.trainer import RoundInfo, TrainerError
from cipherhive.node.trainers.torch_module import TorchModuleTrainer
from cipherhive.node.training.drift import ProximalTerm
from tests.plugin_module import imported

pytestmark = pytest.mark.timeout(60)

PLUGIN = "cipherhive_fedprox_fixtures"
FIXTURES = textwrap.dedent(
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset


    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


    def loaders(seed=0, shard=0):
        g = torch.Generator().manual_seed(seed * 10 + shard)
        y = torch.randint(0, 3, (128,), generator=g)
        x = torch.nn.functional.one_hot(y, 4).float() * 2 + 0.5 * torch.randn(128, 4, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), None
    """
)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    with imported(tmp_path_factory.mktemp("fedprox_fixtures"), PLUGIN, FIXTURES) as module:
        yield module


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _update(mu: float, privacy: DPRound | None = None, epochs: int = 3, lr: float = 0.1) -> torch.Tensor:
    trainer = TorchModuleTrainer(
        f"{PLUGIN}:mlp", f"{PLUGIN}:loaders", lr=lr, epochs=epochs, proximal_mu=mu, seed=0
    )
    model = trainer.build_model()
    start = _flat(model)
    trainer.train(model, RoundInfo(1, 0, "node-1", privacy=privacy))
    return _flat(model) - start


def _dp_round(steps: int) -> DPRound:
    noise, sampling = DPRandom(insecure_seed=7).next_round()
    return DPRound(1, 0.2, 1.0, 1.0, steps, 1e-4, noise, sampling, insecure=True)


def test_proximal_term_adds_mu_times_distance_to_the_anchor() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    prox = ProximalTerm([p], 0.5)
    with torch.no_grad():
        p.add_(torch.tensor([2.0, 4.0]))
    prox.apply()  # no gradient yet: the term alone
    assert p.grad is not None
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0]))
    p.grad = torch.tensor([10.0, 10.0])
    prox.apply()
    assert torch.equal(p.grad, torch.tensor([11.0, 12.0]))
    assert prox.penalty() == pytest.approx(0.5 * 0.5 * 20.0)
    off = ProximalTerm([p], 0.0)
    off.apply()
    assert torch.equal(p.grad, torch.tensor([11.0, 12.0])) and not off.active


def test_bad_mu_is_refused(fixtures: ModuleType) -> None:
    for mu in (-0.1, float("nan"), float("inf")):
        with pytest.raises(TrainerError, match="proximal_mu"):
            TorchModuleTrainer(f"{PLUGIN}:mlp", f"{PLUGIN}:loaders", proximal_mu=mu)


def test_without_dp_the_term_pulls_the_update_towards_the_global_model(fixtures: ModuleType) -> None:
    plain, again = _update(0.0), _update(0.0)
    assert torch.equal(plain, again)  # same seed, same update: the difference below is μ's
    prox = _update(1.0)
    assert not torch.equal(plain, prox)
    assert float(prox.norm()) < 0.9 * float(plain.norm())
    assert float(_update(10.0).norm()) < float(prox.norm())


def test_under_dp_sgd_the_term_is_added_after_clipping_and_noise(fixtures: ModuleType) -> None:
    """Same noise and Poisson batches: the first step starts at w_global (no pull); the second
    step's difference is exactly -lr·μ·(w₁ - w_global), w₁ the model after one step. A loss term
    would have been dropped by Opacus (zero difference)."""
    lr, mu = 0.1, 2.0
    first = _update(0.0, _dp_round(1), lr=lr)  # w₁ - w_global
    plain = _update(0.0, _dp_round(2), lr=lr)
    prox = _update(mu, _dp_round(2), lr=lr)
    assert torch.equal(_update(mu, _dp_round(1), lr=lr), first)
    assert not torch.equal(plain, prox)
    torch.testing.assert_close(prox - plain, -lr * mu * first, atol=1e-6, rtol=1e-4)
    assert float(prox.norm()) < float(plain.norm())
