"""Tests for the training plug-in loader, cipherhive.node.trainer."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from cipherhive.node.trainer import (
    RoundInfo,
    Trainer,
    TrainerError,
    TrainResult,
    federated_tensors,
    load_trainer,
)
from tests.plugin_module import imported

PLUGIN = "cipherhive_test_plugins"

# A plug-in module written to disk, imported the way a node imports one (by spec string).
PLUGIN_SOURCE = textwrap.dedent(
    """
    import torch

    from cipherhive.node.trainer import TrainResult


    class Factory:
        def __init__(self, lr=0.1, hidden=4):
            self.lr = lr
            self.hidden = hidden

        def build_model(self):
            torch.manual_seed(0)
            return torch.nn.Sequential(
                torch.nn.Linear(3, self.hidden),
                torch.nn.BatchNorm1d(self.hidden),
                torch.nn.Linear(self.hidden, 2),
            )

        def train(self, model, info):
            return TrainResult(num_samples=10, metrics={"loss": 0.25})


    class Custom(Factory):
        def federated_tensors(self, model):
            return [("2.bias", model[2].bias), ("0.weight", model[0].weight)]


    class CallableInstance(Factory):
        def __call__(self, *args, **kwargs):
            raise AssertionError("a trainer instance must not be called")


    class NoTrain:
        def build_model(self):
            return torch.nn.Linear(1, 1)


    def make(seed=0):
        return Factory(hidden=seed + 1)


    def make_nothing():
        return NoTrain()


    instance = Factory(lr=0.5)
    callable_instance = CallableInstance()
    no_train = NoTrain()
    NUMBER = 3
    """
)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    with imported(tmp_path_factory.mktemp("plugins"), PLUGIN, PLUGIN_SOURCE) as module:
        yield module


# --------------------------------------------------------------------------- load_trainer


def test_factory_class_with_options(plugin: ModuleType) -> None:
    trainer = load_trainer(f"{PLUGIN}:Factory", {"lr": 0.01, "hidden": 8})
    assert isinstance(trainer, plugin.Factory)
    assert isinstance(trainer, Trainer)
    assert (trainer.lr, trainer.hidden) == (0.01, 8)  # type: ignore[attr-defined]
    result = trainer.train(trainer.build_model(), RoundInfo(round=1, base_round=0, node_name="n"))
    assert result == TrainResult(10, {"loss": 0.25})


def test_factory_class_without_options(plugin: ModuleType) -> None:
    for options in (None, {}):
        trainer = load_trainer(f"{PLUGIN}:Factory", options)
        assert (trainer.lr, trainer.hidden) == (0.1, 4)  # type: ignore[attr-defined]


def test_factory_function(plugin: ModuleType) -> None:
    trainer = load_trainer(f"{PLUGIN}:make", {"seed": 2})
    assert isinstance(trainer, plugin.Factory)
    assert trainer.hidden == 3  # type: ignore[attr-defined]


def test_instance(plugin: ModuleType) -> None:
    assert load_trainer(f"{PLUGIN}:instance") is plugin.instance
    # A callable object that already is a trainer is used as it is, not called.
    assert load_trainer(f"{PLUGIN}:callable_instance") is plugin.callable_instance


def test_instance_refuses_options(plugin: ModuleType) -> None:
    with pytest.raises(TrainerError, match=r"is an instance; .*options are only for factories"):
        load_trainer(f"{PLUGIN}:instance", {"lr": 1.0})


def test_factory_refuses_unknown_options(plugin: ModuleType) -> None:
    with pytest.raises(TrainerError, match=r"does not accept the options \['bogus', 'lr'\]") as info:
        load_trainer(f"{PLUGIN}:Factory", {"lr": 1.0, "bogus": 2})
    assert "bogus" in str(info.value.__cause__)


@pytest.mark.parametrize("spec", ["", "no_colon", ":Factory", f"{PLUGIN}:", ":"])
def test_bad_spec(spec: str) -> None:
    with pytest.raises(TrainerError, match=r"must look like 'package\.module:object'"):
        load_trainer(spec)


def test_missing_module() -> None:
    with pytest.raises(TrainerError, match=r"cannot import trainer module 'no_such_pkg_xyz\.mod'") as info:
        load_trainer("no_such_pkg_xyz.mod:Trainer")
    assert "no_such_pkg_xyz" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_missing_attribute(plugin: ModuleType) -> None:
    with pytest.raises(TrainerError, match=f"module '{PLUGIN}' has no attribute 'Missing'"):
        load_trainer(f"{PLUGIN}:Missing")


@pytest.mark.parametrize("name", ["no_train", "NoTrain", "make_nothing", "NUMBER"])
def test_object_without_train(plugin: ModuleType, name: str) -> None:
    with pytest.raises(TrainerError, match=r"provides no build_model\(\) and train\(model, info\)"):
        load_trainer(f"{PLUGIN}:{name}")


def test_trainer_error_is_a_user_error() -> None:
    from cipherhive.runtime.errors import UserError

    with pytest.raises(UserError):
        load_trainer("bad")


# --------------------------------------------------------------------------- federated_tensors


def test_default_federated_tensors(plugin: ModuleType) -> None:
    trainer = load_trainer(f"{PLUGIN}:Factory")
    model = trainer.build_model()
    model[2].bias.requires_grad_(False)  # a frozen parameter stays local
    names = [name for name, _ in federated_tensors(trainer, model)]
    assert names == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "2.weight",
        "1.running_mean",
        "1.running_var",
    ]
    assert "1.num_batches_tracked" in dict(model.named_buffers())
    # The returned tensors are the model's own (so applying an update changes the model).
    tensors = dict(federated_tensors(trainer, model))
    assert tensors["1.running_mean"] is model[1].running_mean
    assert all(t.is_floating_point() for t in tensors.values())


def test_custom_federated_tensors(plugin: ModuleType) -> None:
    trainer = load_trainer(f"{PLUGIN}:Custom")
    model = trainer.build_model()
    tensors = federated_tensors(trainer, model)
    assert isinstance(tensors, list)
    assert [name for name, _ in tensors] == ["2.bias", "0.weight"]
    assert tensors[1][1] is model[0].weight


def test_federated_tensors_without_buffers() -> None:
    class Plain:
        def build_model(self) -> torch.nn.Module:
            return torch.nn.Linear(2, 1)

        def train(self, model: torch.nn.Module, info: RoundInfo) -> TrainResult:
            return TrainResult(1)

    trainer = Plain()
    assert [n for n, _ in federated_tensors(trainer, trainer.build_model())] == ["weight", "bias"]
