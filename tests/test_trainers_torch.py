"""Tests for the generic trainer cipherhive.node.trainers.torch_module and the export of a checkpoint."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from cipherhive.node.config import NodeConfig
from cipherhive.node.export import ExportError, export_model
from cipherhive.node.state.checkpoint import Checkpoint, NodeState
from cipherhive.node.trainer import RoundInfo, TrainerError, federated_tensors, load_trainer
from cipherhive.node.trainers.torch_module import TorchModuleTrainer
from cipherhive.node.training.update import layout_of
from tests.plugin_module import imported

PLUGIN = "cipherhive_torch_module_fixtures"
SPEC = "cipherhive.node.trainers.torch_module:TorchModuleTrainer"

# Factories a user would name in [trainer] options, imported by spec string like a node does.
FIXTURES = textwrap.dedent(
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset


    def tiny_model(hidden=8, classes=3, freeze_first=False):
        model = torch.nn.Sequential(
            torch.nn.Linear(4, hidden),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, classes),
        )
        if freeze_first:
            model[0].weight.requires_grad_(False)
        return model


    def regressor():
        return torch.nn.Linear(4, 1)


    def _blobs(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 3, (n,), generator=g)
        centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
        return centres[y] + 0.5 * torch.randn(n, 4, generator=g), y


    def loaders(n=96, seed=0, shard=0, shards=1, validation=True):
        x, y = _blobs(n, seed * 10 + shard)
        train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        vx, vy = _blobs(48, 999)
        return train, (DataLoader(TensorDataset(vx, vy), batch_size=32) if validation else None)


    def regression_loaders(n=64):
        # No seed / shard parameters: the trainer passes only what a factory accepts.
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, 4, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
        return DataLoader(TensorDataset(x, y), batch_size=16), None


    def not_a_model():
        return 42
    """
)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    with imported(tmp_path_factory.mktemp("torch_module_fixtures"), PLUGIN, FIXTURES) as module:
        yield module


def _trainer(**options: object) -> TorchModuleTrainer:
    base: dict[str, object] = {"model": f"{PLUGIN}:tiny_model", "data": f"{PLUGIN}:loaders"}
    trainer = load_trainer(SPEC, {**base, **options})
    assert isinstance(trainer, TorchModuleTrainer)
    return trainer


def _names(trainer: TorchModuleTrainer, model: torch.nn.Module) -> list[str]:
    return [name for name, _ in federated_tensors(trainer, model)]


# --------------------------------------------------------------------------- selection


def test_default_federates_trainable_params_and_float_buffers(fixtures: ModuleType) -> None:
    trainer = _trainer()
    model = trainer.build_model()
    assert _names(trainer, model) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
        "1.running_mean",
        "1.running_var",
    ]
    # The integer buffer stays local; the default equals cipherhive's own default selection.
    assert "1.num_batches_tracked" in dict(model.named_buffers())
    plain = [name for name, _ in federated_tensors(object(), model)]  # type: ignore[arg-type]
    assert _names(trainer, model) == plain


def test_frozen_parameters_are_not_federated(fixtures: ModuleType) -> None:
    trainer = _trainer(model_kwargs={"freeze_first": True})
    assert "0.weight" not in _names(trainer, trainer.build_model())


@pytest.mark.parametrize("federate", [["3.*", "1.running_*"], "3.*, 1.running_*"])
def test_explicit_patterns(fixtures: ModuleType, federate: object) -> None:
    trainer = _trainer(federate=federate)
    assert _names(trainer, trainer.build_model()) == ["3.weight", "3.bias", "1.running_mean", "1.running_var"]
    # `federated_tensors` is accepted as the option's other name.
    alias = _trainer(federated_tensors=["3.weight"])
    assert _names(alias, alias.build_model()) == ["3.weight"]


def test_pattern_errors(fixtures: ModuleType) -> None:
    trainer = _trainer(federate=["3.*", "classifier.*"])
    with pytest.raises(TrainerError, match=r"classifier\.\*"):
        federated_tensors(trainer, trainer.build_model())
    with pytest.raises(TrainerError, match="not both"):
        _trainer(federate=["3.*"], federated_tensors=["1.*"])
    with pytest.raises(TrainerError, match="no tensor patterns"):
        _trainer(federate=" , ")
    # An integer buffer is never a candidate, even when a pattern names it.
    with pytest.raises(TrainerError, match="num_batches_tracked"):
        t = _trainer(federate=["1.num_batches_tracked"])
        federated_tensors(t, t.build_model())


def test_bad_options(fixtures: ModuleType) -> None:
    with pytest.raises(TrainerError, match="optimizer"):
        _trainer(optimizer="lbfgs")
    with pytest.raises(TrainerError, match="loss"):
        _trainer(loss="hinge")
    with pytest.raises(TrainerError, match="cannot import"):
        _trainer(model="no_such_package.models:net")
    with pytest.raises(TrainerError, match=r"package\.module:callable"):
        _trainer(data="loaders")
    with pytest.raises(TrainerError, match=r"not a torch\.nn\.Module"):
        _trainer(model=f"{PLUGIN}:not_a_model").build_model()


# --------------------------------------------------------------------------- training


def test_same_seed_same_initial_model(fixtures: ModuleType) -> None:
    a, b = _trainer(seed=3).build_model(), _trainer(seed=3, shard=1, shards=2).build_model()
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    c = _trainer(seed=4).build_model()
    assert not torch.equal(dict(a.named_parameters())["0.weight"], dict(c.named_parameters())["0.weight"])


def test_training_reduces_loss_and_updates_batchnorm_statistics(fixtures: ModuleType) -> None:
    trainer = _trainer(optimizer="adam", lr=0.05, epochs=4, shard=1, shards=3)
    model = trainer.build_model()
    train_loader, val_loader = fixtures.loaders(seed=0, shard=1, shards=3)
    examples, before = trainer.evaluate(model)  # the trainer interface: the validation loader
    assert examples == sum(len(batch[-1]) for batch in val_loader)
    running_mean = dict(model.named_buffers())["1.running_mean"].clone()
    result = trainer.train(model, RoundInfo(round=1, base_round=0, node_name="n"))
    after = trainer.measure(model, val_loader)[1]
    assert after["loss"] < before["loss"] * 0.5
    assert result.num_samples == len(train_loader.dataset) == 96
    assert set(result.metrics) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert result.metrics["val_accuracy"] == pytest.approx(after["accuracy"])
    assert result.metrics["val_accuracy"] > 0.8
    # Float buffers moved (and are federated); the integer counter moved too (and stays local).
    buffers = dict(model.named_buffers())
    assert not torch.equal(buffers["1.running_mean"], running_mean)
    assert int(buffers["1.num_batches_tracked"]) == 4 * 6


def test_training_returns_early_when_a_stop_is_asked(fixtures: ModuleType) -> None:
    """``should_stop`` is checked between batches: after 3 batches, training returns at once."""
    trainer = _trainer(epochs=4, shard=1, shards=3)
    model = trainer.build_model()
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 3

    result = trainer.train(model, RoundInfo(round=1, base_round=0, node_name="n", should_stop=should_stop))
    assert len(asked) == 4  # three batches trained, not 4 epochs x 6 batches
    assert result.num_samples == 0 and result.metrics == {}
    assert int(dict(model.named_buffers())["1.num_batches_tracked"]) == 3


def test_digits_trainer_returns_early_when_a_stop_is_asked() -> None:
    from cipherhive.demo.digits import DigitsTrainer

    trainer = DigitsTrainer(epochs=50)
    model = trainer.build_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return True

    result = trainer.train(model, RoundInfo(round=1, base_round=0, node_name="n", should_stop=should_stop))
    # Asked once, before the first batch, and returned there: not one of the 50 epochs was trained.
    assert len(asked) == 1
    assert result.num_samples == 0 and result.metrics == {}
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_training_is_reproducible_per_round(fixtures: ModuleType) -> None:
    def run(round_number: int) -> torch.Tensor:
        trainer = _trainer(optimizer="sgd", lr=0.1, momentum=0.9)
        model = trainer.build_model()
        trainer.train(model, RoundInfo(round=round_number, base_round=round_number - 1, node_name="n"))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_mse_regression_without_validation(fixtures: ModuleType) -> None:
    trainer = _trainer(
        model=f"{PLUGIN}:regressor",
        data=f"{PLUGIN}:regression_loaders",
        loss="mse",
        optimizer="adamw",
        lr=0.05,
        epochs=30,
        shard=0,
        shards=2,
    )
    model = trainer.build_model()
    first = trainer.train(model, RoundInfo(round=1, base_round=0, node_name="n"))
    second = trainer.train(model, RoundInfo(round=2, base_round=1, node_name="n"))
    assert set(first.metrics) == {"loss"}
    assert second.metrics["loss"] < first.metrics["loss"]
    assert first.num_samples == 64
    assert trainer.evaluate(model) == (0, {})  # no validation loader: no federated evaluation


# --------------------------------------------------------------------------- export


def _config(tmp_path: Path, **options: object) -> NodeConfig:
    base: dict[str, object] = {"model": f"{PLUGIN}:tiny_model", "data": f"{PLUGIN}:loaders"}
    return NodeConfig(
        plugin=SPEC,
        options={**base, **options},
        state_dir=tmp_path / "state",
        insecure=True,
        name="n",
    )


def test_export_without_trainer_export_writes_safetensors(fixtures: ModuleType, tmp_path: Path) -> None:
    config = _config(tmp_path)
    trainer = _trainer()
    model = trainer.build_model()
    trainer.train(model, RoundInfo(round=1, base_round=0, node_name="n"))
    tensors = federated_tensors(trainer, model)
    layout = layout_of(tensors)
    NodeState(config.state_dir).save(Checkpoint(3, layout.hash, dict(tensors)))

    out = export_model(config, tmp_path / "out")
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in tensors:
        assert torch.equal(saved[name], tensor.detach())
    # The integer buffer is written from the freshly built model: it was never federated.
    assert int(saved["1.num_batches_tracked"]) == 0
    provenance = json.loads((out / "cipherhive.json").read_text())
    assert provenance["round"] == 3 and provenance["layout_hash"] == layout.hash


def test_export_refuses_without_checkpoint_or_with_another_layout(
    fixtures: ModuleType, tmp_path: Path
) -> None:
    config = _config(tmp_path)
    with pytest.raises(ExportError, match="no checkpoint"):
        export_model(config, tmp_path / "out")
    assert not config.state_dir.exists(), "a failed export must not create the state directory"
    trainer = _trainer()
    model = trainer.build_model()
    tensors = federated_tensors(trainer, model)
    NodeState(config.state_dir).save(Checkpoint(1, layout_of(tensors).hash, dict(tensors)))
    with pytest.raises(ExportError, match="another model layout"):
        export_model(_config(tmp_path, model_kwargs={"hidden": 16}), tmp_path / "out")


def test_bootstrap_from_an_export(fixtures: ModuleType, tmp_path: Path) -> None:
    """A member's export carries a checkpoint; another member installs it with `node bootstrap`."""
    from cipherhive.cli import main
    from cipherhive.node.state.bootstrap import BootstrapError, bootstrap

    donor = _config(tmp_path / "donor")
    trainer = _trainer()
    model = trainer.build_model()
    trainer.train(model, RoundInfo(round=1, base_round=0, node_name="n"))
    tensors = federated_tensors(trainer, model)
    layout = layout_of(tensors)
    NodeState(donor.state_dir).save(Checkpoint(12, layout.hash, dict(tensors)))
    out = export_model(donor, tmp_path / "export")
    provenance = json.loads((out / "cipherhive.json").read_text())
    assert provenance["checkpoint"] == "checkpoint.pt"

    behind = _config(tmp_path / "behind")
    NodeState(behind.state_dir).save(
        Checkpoint(2, layout.hash, dict(federated_tensors(trainer, trainer.build_model())))
    )
    with pytest.raises(BootstrapError, match="layout"):
        bootstrap(_config(tmp_path / "behind", model_kwargs={"hidden": 16}), out / "checkpoint.pt")
    with pytest.raises(BootstrapError, match="does not exist"):
        bootstrap(behind, tmp_path / "nowhere.pt")
    assert NodeState(behind.state_dir).load().round == 2  # type: ignore[union-attr]  # refused: untouched

    toml = tmp_path / "behind.toml"
    toml.write_text(
        f'[node]\nstate_dir = "{behind.state_dir}"\ninsecure = true\nname = "n"\n'
        f'[trainer]\nplugin = "{SPEC}"\n'
        f'options = {{ model = "{PLUGIN}:tiny_model", data = "{PLUGIN}:loaders" }}\n'
    )
    assert main(["node", "bootstrap", "--config", str(toml), "--from", str(out)]) == 0
    store = NodeState(behind.state_dir)
    installed = store.load()
    assert installed is not None and installed.round == 12 and store.chain() == [12]
    for name, tensor in tensors:
        assert torch.equal(installed.tensors[name], tensor.detach())


def test_export_any_kept_round_and_load_it_back(
    fixtures: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`node export --round N` for every round still kept; load_export reads the folder back."""
    from cipherhive.cli import main
    from cipherhive.node.export import load_export

    config = _config(tmp_path)
    trainer = _trainer()
    model = trainer.build_model()
    tensors = federated_tensors(trainer, model)
    layout = layout_of(tensors)
    store = NodeState(config.state_dir, keep=2)
    by_round: dict[int, dict[str, torch.Tensor]] = {}
    for number in (1, 2, 3):
        by_round[number] = {name: torch.full_like(t, float(number)) for name, t in tensors}
        store.save(Checkpoint(number, layout.hash, by_round[number]))

    out = export_model(config, tmp_path / "round-2", round_number=2)
    loaded = load_export(out)
    assert loaded.round == 2 and loaded.metadata["layout_hash"] == layout.hash
    for name, _ in tensors:
        assert torch.equal(loaded.federated[name], by_round[2][name])
        assert torch.equal(loaded.tensors[name], by_round[2][name])  # the whole state_dict
    assert "1.num_batches_tracked" in loaded.tensors and "1.num_batches_tracked" not in loaded.federated
    assert load_export(out / "cipherhive.json").round == 2
    assert load_export(export_model(config, tmp_path / "current")).round == 3

    with pytest.raises(
        ExportError, match=r"round 1 is not kept in .* \(kept rounds: 2, 3\); .*keep_checkpoints"
    ):
        export_model(config, tmp_path / "round-1", round_number=1)
    with pytest.raises(ExportError, match="not a cipherhive export"):
        load_export(tmp_path)

    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\nstate_dir = "{config.state_dir}"\ninsecure = true\nname = "n"\nkeep_checkpoints = 2\n'
        f'[trainer]\nplugin = "{SPEC}"\n'
        f'options = {{ model = "{PLUGIN}:tiny_model", data = "{PLUGIN}:loaders" }}\n'
    )
    capsys.readouterr()
    assert (
        main(["node", "export", "--config", str(toml), "--round", "3", "--out", str(tmp_path / "cli")]) == 0
    )
    assert capsys.readouterr().out == f"exported round 3's global model to {tmp_path / 'cli'}\n"
    assert load_export(tmp_path / "cli").round == 3
    assert main(["node", "export", "--config", str(toml), "--round", "1", "--out", str(tmp_path / "x")]) != 0
    assert "round 1 is not kept" in capsys.readouterr().err
