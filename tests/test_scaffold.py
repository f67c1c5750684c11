"""SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1, option II): the control block of the
encrypted vector, its arithmetic against a plaintext reference, the layout hash without it, the
member's control variate across a restart, and one real federation."""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from cipherhive.federation.layout import CONTROL_PREFIX
from cipherhive.node.sums.checks import CheckedApplier, SumLimits
from cipherhive.node.trainer import RoundInfo, TrainerError, federated_tensors
from cipherhive.node.trainers.torch_module import TorchModuleTrainer
from cipherhive.node.training.drift import LOCAL_CONTROL_FILE, Scaffold
from cipherhive.node.training.update import FlatParams, layout_of, mean_from_sum, weighted_vector
from tests.plugin_module import imported

pytestmark = pytest.mark.timeout(60)

PLUGIN = "cipherhive_scaffold_fixtures"
FIXTURES = textwrap.dedent(
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    SIZES = (24, 40, 64)  # unequal: the model update is weighted, the control block is not


    def data(shard):
        g = torch.Generator().manual_seed(100 + shard)
        y = (torch.arange(SIZES[shard]) + shard) % 3  # a different label mix per member
        noise = 0.5 * torch.randn(SIZES[shard], 4, generator=g)
        x = torch.nn.functional.one_hot(y, 4).float() * (1 + shard) + noise
        return x, y


    def linear():
        return torch.nn.Linear(4, 3)


    def loaders(shard=0):
        x, y = data(shard)
        return DataLoader(TensorDataset(x, y), batch_size=len(y)), None  # full batch, fixed order
    """
)
LR, STEPS, MEMBERS, ROUNDS, UNIT = 0.3, 4, 3, 3, 100.0


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    with imported(tmp_path_factory.mktemp("scaffold_fixtures"), PLUGIN, FIXTURES) as module:
        yield module


def _trainer(shard: int, scaffold: bool = True) -> TorchModuleTrainer:
    return TorchModuleTrainer(
        f"{PLUGIN}:linear", f"{PLUGIN}:loaders", lr=LR, epochs=STEPS, shard=shard, scaffold=scaffold
    )


def _reference(fixtures: ModuleType) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Algorithm 1 in plain float64: x <- x + Σ n_i Δy_i / Σ n_i (the federation's FedAvg
    weighting), c <- c + mean Δc_i (|S| = N), local steps y <- y - η (g - c_i + c), option II."""
    model = fixtures.linear()
    torch.manual_seed(0)
    model = fixtures.linear()
    x = [p.detach().double().clone() for p in model.parameters()]
    c = [torch.zeros_like(t) for t in x]
    c_local = [[torch.zeros_like(t) for t in x] for _ in range(MEMBERS)]
    for _ in range(ROUNDS):
        dys, dcs, ns = [], [], []
        for i in range(MEMBERS):
            data, target = fixtures.data(i)
            y = [t.clone().requires_grad_(True) for t in x]
            for _ in range(STEPS):
                loss = torch.nn.functional.cross_entropy(data.double() @ y[0].T + y[1], target)
                grads = torch.autograd.grad(loss, y)
                with torch.no_grad():
                    for t, g, ct, ci in zip(y, grads, c, c_local[i], strict=True):
                        t -= LR * (g - ci + ct)
            c_plus = [
                ci - ct + (xt - yt.detach()) / (STEPS * LR)
                for ci, ct, xt, yt in zip(c_local[i], c, x, y, strict=True)
            ]
            dys.append([yt.detach() - xt for yt, xt in zip(y, x, strict=True)])
            dcs.append([cp - ci for cp, ci in zip(c_plus, c_local[i], strict=True)])
            c_local[i] = c_plus
            ns.append(float(len(target)))
        x = [xt + sum(n * dy[k] for n, dy in zip(ns, dys, strict=True)) / sum(ns) for k, xt in enumerate(x)]
        c = [ct + sum(dc[k] for dc in dcs) / MEMBERS for k, ct in enumerate(c)]
    return x, c


def test_layout_without_scaffold_is_unchanged(fixtures: ModuleType) -> None:
    plain = _trainer(0, scaffold=False)
    model = plain.build_model()
    layout = layout_of(federated_tensors(plain, model))
    canonical = '{"tensors":[["weight",[3,4]],["bias",[3]]],"base_model_hash":""}'
    assert layout.canonical() == canonical
    assert layout.hash == hashlib.sha256(canonical.encode()).hexdigest()
    assert layout.control_values == 0 and layout.control_start == layout.num_params == 15
    # The digits demo's layout (stored states and published sums are tied to this hash).
    from cipherhive.demo.digits import DigitsTrainer

    digits = DigitsTrainer(shard=0, shards=3)
    digits_layout = layout_of(federated_tensors(digits, digits.build_model()))
    assert (
        digits_layout.hash
        == hashlib.sha256(
            json.dumps(
                {
                    "tensors": [
                        ["0.weight", [64, 64]],
                        ["0.bias", [64]],
                        ["2.weight", [10, 64]],
                        ["2.bias", [10]],
                    ],
                    "base_model_hash": "",
                },
                separators=(",", ":"),
            ).encode()
        ).hexdigest()
    )
    # The same vector with or without the (empty) control block.
    local, global_ = np.linspace(-1, 1, 15), np.zeros(15)
    assert np.array_equal(
        weighted_vector(local, global_, 30, UNIT, 10),
        weighted_vector(local, global_, 30, UNIT, 10, control_start=15),
    )


def test_scaffold_extends_the_layout_with_a_control_block(fixtures: ModuleType) -> None:
    trainer = _trainer(0)
    tensors = federated_tensors(trainer, trainer.build_model())
    layout = layout_of(tensors)
    assert [n for n, _ in tensors] == ["weight", "bias", f"{CONTROL_PREFIX}weight", f"{CONTROL_PREFIX}bias"]
    assert layout.control_start == 15 and layout.control_values == 15 and layout.num_params == 30
    assert layout.hash != layout_of(federated_tensors(_trainer(0, False), trainer.build_model())).hash
    with pytest.raises(TrainerError, match="sgd"):
        TorchModuleTrainer(f"{PLUGIN}:linear", f"{PLUGIN}:loaders", optimizer="adam", scaffold=True)


def test_control_block_is_unweighted_and_skips_the_server_optimizer() -> None:
    """[w, 1, e…, w·Δ…, Δc…]: the sum's control block divided by the contributors, not Σw, and
    added as it is while the model gets the server-side optimizer's step."""
    global_ = np.zeros(4)
    members = [(np.array([1.0, 2.0, 0.5, -1.0]), 10), (np.array([3.0, 0.0, 1.5, 1.0]), 30)]
    summed = sum(weighted_vector(v, global_, n, UNIT, 10, control_start=2) for v, n in members)
    assert isinstance(summed, np.ndarray)
    np.testing.assert_allclose(mean_from_sum(summed, 4, control_start=2), [2.5, 0.5, 1.0, 0.0])
    out, mean = np.zeros(4, dtype=np.float32), np.zeros(4)
    limits = SumLimits(floor=2, max_update=10.0, max_participants=10, participants=2)
    applier = CheckedApplier(global_, out, summed.shape[0], limits, mean, lambda lo, hi, part: 2 * part, 2)
    applier.feed(summed)
    applier.finish(1)
    np.testing.assert_allclose(mean, [2.5, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(out, [5.0, 1.0, 1.0, 0.0])


def test_scaffold_matches_a_plaintext_reference_of_algorithm_1(fixtures: ModuleType) -> None:
    """Three members, unequal sizes, three rounds through the encrypted vector's arithmetic."""
    trainers = [_trainer(i) for i in range(MEMBERS)]
    models = [t.build_model() for t in trainers]
    flats = [FlatParams(federated_tensors(t, m)) for t, m in zip(trainers, models, strict=True)]
    layout = layout_of(federated_tensors(trainers[0], models[0]))
    global_ = flats[0].read().copy()
    for number in range(1, ROUNDS + 1):
        vectors = []
        for trainer, model, flat in zip(trainers, models, flats, strict=True):
            flat.load(global_)
            result = trainer.train(model, RoundInfo(number, number - 1, "node"))
            local = flat.read().copy()
            vectors.append(
                weighted_vector(
                    local, global_, result.num_samples, UNIT, 10, control_start=layout.control_start
                )
            )
        summed = np.sum(vectors, axis=0)
        out = global_.copy()
        limits = SumLimits(floor=2, max_update=10.0, max_participants=10, participants=MEMBERS)
        applier = CheckedApplier(global_, out, summed.shape[0], limits, control_start=layout.control_start)
        applier.feed(summed)
        applier.finish(1)
        global_ = out
    x, c = _reference(fixtures)
    expected = torch.cat([t.reshape(-1) for t in x + c]).numpy()
    assert float(np.abs(expected[15:]).max()) > 0.01  # the control variates moved
    np.testing.assert_allclose(global_, expected, atol=2e-5)


def test_member_control_variate_survives_a_restart(fixtures: ModuleType, tmp_path: Path) -> None:
    trainer = _trainer(1)
    trainer.attach_state_dir(str(tmp_path))
    model = trainer.build_model()
    flat = FlatParams(federated_tensors(trainer, model))
    global_ = flat.read().copy()
    trainer.train(model, RoundInfo(1, 0, "node"))
    assert trainer.scaffold is not None
    staged = [t.clone() for t in trainer.scaffold.local_controls()]  # round 1 not applied yet: c_i = 0
    assert all(float(t.abs().max()) == 0 for t in staged)
    flat.load(global_)
    trainer.train(model, RoundInfo(2, 1, "node"))  # starts from round 1's model: c_i+ of round 1 settles
    settled = trainer.scaffold.local_controls()
    assert (tmp_path / LOCAL_CONTROL_FILE).exists()
    assert float(settled[0].abs().max()) > 0

    restarted = _trainer(1)
    restarted.attach_state_dir(str(tmp_path))
    federated_tensors(restarted, restarted.build_model())
    assert restarted.scaffold is not None
    for a, b in zip(restarted.scaffold.local_controls(), settled, strict=True):
        assert torch.equal(a, b)
    # Round 2's c_i+ was staged durably too: a restart settles it when round 3 starts from round 2.
    restarted.scaffold.begin([(n, p) for n, p in restarted.build_model().named_parameters()], 3, 2)
    assert not all(
        torch.equal(a, b) for a, b in zip(restarted.scaffold.local_controls(), settled, strict=True)
    )
    other = Scaffold(tmp_path)
    with pytest.raises(TrainerError, match="another model"):
        other.control_tensors([("weight", torch.zeros(2, 2))])
        other.local_controls()


def test_member_level_dp_clips_and_noises_update_and_control_block_as_one_vector(
    fixtures: ModuleType,
) -> None:
    """The federation's member-level schedule covers the layout's values, control block included
    (one dimension, one clip norm): Δc is scaled by the same factor as Δ."""
    from cipherhive.node.privacy.member_level import privatize
    from cipherhive.node.privacy.randomness import DPRandom
    from cipherhive.node.training.update import UpdateError
    from cipherhive.privacy.member_level import MemberMechanism

    trainer = _trainer(2)
    model = trainer.build_model()
    flat = FlatParams(federated_tensors(trainer, model))
    layout = layout_of(federated_tensors(trainer, model))
    global_ = flat.read().astype(np.float64)
    trainer.train(model, RoundInfo(1, 0, "node"))
    delta = flat.read().astype(np.float64) - global_
    clip = 0.05
    mech = MemberMechanism(0.01, clip, 2, 0, 16, layout.num_params)
    noise, rounding = DPRandom(insecure_seed=1).next_round()
    sent = privatize(flat.read(), global_, mech, noise, rounding) - global_
    scale = clip / float(np.linalg.norm(delta))
    assert scale < 0.5  # the joint vector was clipped
    cs = layout.control_start
    np.testing.assert_allclose(sent[cs:], delta[cs:] * scale, atol=2e-3)
    np.testing.assert_allclose(sent[:cs], delta[:cs] * scale, atol=2e-3)
    model_only = MemberMechanism(0.01, clip, 2, 0, 16, cs)
    with pytest.raises(UpdateError, match="covers"):
        privatize(flat.read(), global_, model_only, noise, rounding)


def test_under_dp_sgd_the_correction_is_added_to_the_noised_gradient(fixtures: ModuleType) -> None:
    """Same noise and Poisson batch: one step with SCAFFOLD differs from one without by exactly
    -lr·(c - c_i); Opacus would have dropped a loss term."""
    from cipherhive.node.privacy.randomness import DPRandom
    from cipherhive.node.privacy.round_info import DPRound

    def one_step(scaffold: bool) -> torch.Tensor:
        trainer = _trainer(2, scaffold)
        model = trainer.build_model()
        tensors = federated_tensors(trainer, model)
        with torch.no_grad():
            for name, t in tensors:
                if name.startswith(CONTROL_PREFIX):
                    t.copy_(torch.linspace(-1, 1, t.numel()).reshape(t.shape))  # a global c
        start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        noise, sampling = DPRandom(insecure_seed=5).next_round()
        privacy = DPRound(1, 0.3, 1.0, 1.0, 1, 1e-4, noise, sampling, insecure=True)
        trainer.train(model, RoundInfo(1, 0, "node", privacy=privacy))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start

    c = torch.cat([torch.linspace(-1, 1, 12), torch.linspace(-1, 1, 3)])
    torch.testing.assert_close(one_step(True) - one_step(False), -LR * c, atol=1e-6, rtol=1e-5)


def test_drift_table_runs_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from cipherhive.bench.drift_table import run_drift_table

    args = argparse.Namespace(nodes=2, rounds=1, epochs=1, seeds=1, json=True, proximal_mu=0.1)
    assert run_drift_table(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["method"] for r in rows] == ["FedAvg", "FedProx (μ = 0.1)", "SCAFFOLD", "central (all data)"]
    assert all(0.0 <= r["mean_accuracy"] <= 1.0 for r in rows)
