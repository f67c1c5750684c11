"""A generic trainer for any ``torch.nn.Module``, configured entirely by ``[trainer] options``.

Members who already have a PyTorch model and data loaders need not write a
plug-in: they name a model factory and a data factory and pick an optimizer.

.. code-block:: toml

    [trainer]
    plugin = "cipherhive.node.trainers.torch_module:TorchModuleTrainer"

    [trainer.options]
    model = "acme_models.vision:small_cnn"        # called with model_kwargs
    model_kwargs = { channels = 16 }
    data = "acme_models.vision:loaders"           # -> (train_loader, val_loader or None)
    data_kwargs = { root = "/data/acme" }
    optimizer = "adamw"                           # sgd | adam | adamw
    lr = 0.001
    epochs = 2
    loss = "cross_entropy"                        # cross_entropy | mse
    seed = 0
    federate = "trainable"                        # or a list of tensor-name globs
    proximal_mu = 0.0                             # FedProx's μ (0: off)
    scaffold = false                              # SCAFFOLD's control variates (sgd only)

**Model.** ``model`` is called with ``model_kwargs`` after ``torch.manual_seed(seed)``,
so every member builds the same initial model (the federation only exchanges
differences from it). Use the same seed on every member.

**Data.** ``data`` is called with ``data_kwargs`` plus whichever of ``shard``,
``shards`` and ``seed`` its signature accepts (``shard``/``shards`` are set by
options too, e.g. by the demo's launcher). It returns ``(train_loader,
val_loader)``, either an iterable of batches; ``val_loader`` may be ``None``.
Each batch is a tuple or list ``(input, ..., target)``: every element but the
last is passed positionally to the model, the last is the target. The data
factory is called on the first round, not at start-up, so a node (or
``cipherhive node export``) can build the model without the data.

**Loss.** ``cross_entropy`` (classification: targets are class indices,
accuracy is reported) or ``mse`` (regression: targets are reshaped to the
output's shape when they have as many values).

**What is federated.** ``federate = "trainable"`` (the default) federates every
parameter with ``requires_grad`` plus every *floating-point* buffer, in module
order. Floating buffers such as BatchNorm's ``running_mean`` and
``running_var`` are averaged like weights (FedAvg of the running statistics
the members computed locally, weighted by sample count); *integer* buffers
such as ``num_batches_tracked`` cannot be averaged meaningfully and stay
local. Frozen parameters (``requires_grad = False``) are never federated:
they never change. ``federate`` may instead be a list of glob patterns over
tensor names (``["features.*", "classifier.weight"]``, or one comma-separated
string): only matching trainable parameters and floating buffers are
federated, each pattern must match at least one, and everything trainable
that is not selected stays local to this member (personalised layers).
``federated_tensors`` is accepted as another name for the pattern list.

**Differential privacy.** When the federation runs record-level DP
(``info.privacy`` is set), a round is DP-SGD through
:func:`cipherhive.node.dp_sgd.private_training`: the trainer takes the *dataset*
of ``train_loader`` (and its ``collate_fn``; its batch size, shuffling and
sampler are not used) and runs exactly the schedule's ``steps_per_round``
Poisson-sampled steps instead of ``epochs``. The model must not contain
BatchNorm. Training metrics are then measured on the Poisson batches as they are
trained on; they stay in the node's own log.

**Client drift.** ``proximal_mu = μ > 0`` trains FedProx's local objective
(Li et al., MLSys 2020): ``μ (w - w_global)`` is added to every trainable parameter's
gradient before each step, also under DP-SGD where it is added after clipping and noise
(:mod:`cipherhive.node.training.drift`). μ is a member's own choice (it only changes how
the member trains), but the federation gets FedProx only when every member uses it.
``scaffold = true`` trains with SCAFFOLD's control variates (Karimireddy et al., ICML 2020,
Algorithm 1, option II; optimizer ``sgd``): the global control variates become federated
tensors after the model's (``control:<name>``), so the layout and its hash change and every
member must set it alike (a member that does not is refused at join); each member's own
control variate is kept in the node's state directory. See
:class:`cipherhive.node.training.drift.Scaffold`.

**Metrics** (rounded before they leave the node): ``loss`` and, for
``cross_entropy``, ``accuracy`` over the last local epoch; ``val_loss`` and
``val_accuracy`` on the validation loader when there is one.

**Federated evaluation.** ``evaluate(model)`` returns the validation loader's
example count with ``loss`` (and ``accuracy`` for ``cross_entropy``), which the
node sends encrypted with each update (the evaluation of the global model before
training; see :mod:`cipherhive.node.training.federated_eval`). Without a validation loader it
returns no examples, and the member's slots are zeros. The sample
count (the FedAvg weight) is ``len(train_loader.dataset)`` when the loader
has a sized dataset, else the number of samples in one epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Any

import torch
from torch import nn

from cipherhive.federation.layout import CONTROL_PREFIX
from cipherhive.node.trainer import RoundInfo, TrainerError, TrainResult
from cipherhive.node.trainers._common import call_with, import_object, patterns, round_seed, select
from cipherhive.node.training.drift import ProximalTerm, Scaffold, ScaffoldRound, check_mu, scaffold_lr

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("cross_entropy", "mse")


def trainable_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Trainable parameters, then floating-point buffers, in module order (the default selection)."""
    tensors: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    return tensors


def _scaffolded(model: nn.Module, chosen: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The federated tensors SCAFFOLD corrects: trainable parameters (buffers get no gradient)."""
    params = {id(p) for p in model.parameters() if p.requires_grad}
    return [(n, t) for n, t in chosen if id(t) in params]


def _split_batch(batch: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise TrainerError("each batch must be a tuple (input, ..., target)")
    return tuple(batch[:-1]), batch[-1]


class TorchModuleTrainer:
    """Trains any ``nn.Module`` from named factories; see the module docstring for the options."""

    def __init__(
        self,
        model: str,
        data: str,
        model_kwargs: dict[str, Any] | None = None,
        data_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        epochs: int = 1,
        loss: str = "cross_entropy",
        seed: int = 0,
        federate: str | Sequence[str] = "trainable",
        federated_tensors: str | Sequence[str] | None = None,
        shard: int | None = None,
        shards: int | None = None,
        threads: int = 0,
        proximal_mu: float = 0.0,
        scaffold: bool = False,
    ) -> None:
        if optimizer.lower() not in OPTIMIZERS:
            raise TrainerError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if loss not in LOSSES:
            raise TrainerError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")
        if epochs < 1:
            raise TrainerError("epochs must be at least 1")
        if federated_tensors is not None:
            if federate != "trainable":
                raise TrainerError("give either federate or federated_tensors, not both")
            federate = federated_tensors
        self._patterns = None if federate == "trainable" else patterns(federate, "federate")
        self._model_factory: Callable[..., Any] = import_object(model, "model")
        self._data_factory: Callable[..., Any] = import_object(data, "data")
        self.model_kwargs = dict(model_kwargs or {})
        self.data_kwargs = dict(data_kwargs or {})
        self.optimizer, self.lr, self.momentum = optimizer.lower(), lr, momentum
        self.weight_decay, self.epochs, self.loss, self.seed = weight_decay, epochs, loss, seed
        self.shard, self.shards = shard, shards
        self.proximal_mu = check_mu(proximal_mu)
        self.scaffold = Scaffold() if scaffold else None
        self._scaffold_lr = scaffold_lr(self.optimizer, lr, momentum) if scaffold else 0.0
        self._loaders: tuple[Iterable[Any], Iterable[Any] | None] | None = None
        if threads > 0:
            torch.set_num_threads(threads)

    # ------------------------------------------------------------ interface

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        model = call_with(self._model_factory, "model", self.model_kwargs, {})
        if not isinstance(model, nn.Module):
            raise TrainerError(f"model factory returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def federated_tensors(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        candidates = trainable_tensors(model)
        chosen = candidates if self._patterns is None else select(candidates, self._patterns, "federate")
        if self.scaffold is None:
            return chosen
        return chosen + self.scaffold.control_tensors(_scaffolded(model, chosen))

    def attach_state_dir(self, state_dir: str) -> None:
        """The node's state directory, where SCAFFOLD keeps this member's control variate."""
        if self.scaffold is not None:
            self.scaffold.attach_state_dir(state_dir)

    def train(self, model: nn.Module, info: RoundInfo) -> TrainResult:
        train_loader, val_loader = self._data()
        torch.manual_seed(round_seed(self.seed, info.round, self.shard or 0))
        optimizer = self._make_optimizer(model)
        prox = ProximalTerm(model.parameters(), self.proximal_mu)  # anchored at the global model
        scaffold = self._begin_scaffold(model, info)
        model.train()
        if info.privacy is not None:
            return self._train_private(model, optimizer, info, train_loader, val_loader, prox, scaffold)
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(self.epochs):
            loss_sum, correct, seen = 0.0, 0, 0
            for batch in train_loader:
                if info.should_stop():
                    # The node discards this result (nothing partial is uploaded): return at once.
                    return TrainResult(num_samples=0)
                inputs, target = _split_batch(batch)
                optimizer.zero_grad()
                output = model(*inputs)
                loss = self._loss(output, target)
                loss.backward()  # type: ignore[no-untyped-call]
                prox.apply()
                if scaffold is not None:
                    scaffold.apply()
                optimizer.step()
                n = int(target.shape[0])
                loss_sum += float(loss.detach()) * n
                seen += n
                if self.loss == "cross_entropy":
                    correct += int((output.detach().argmax(dim=1) == target).sum())
        if seen == 0:
            raise TrainerError("the training loader yielded no batches")
        if scaffold is not None:
            scaffold.finish(self._scaffold_lr)
        metrics = {"loss": loss_sum / seen}
        if self.loss == "cross_entropy":
            metrics["accuracy"] = correct / seen
        if val_loader is not None:
            metrics.update({f"val_{k}": v for k, v in self.measure(model, val_loader)[1].items()})
        dataset = getattr(train_loader, "dataset", None)
        num_samples = len(dataset) if isinstance(dataset, Sized) else seen
        return TrainResult(num_samples=num_samples, metrics=metrics)

    def _train_private(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        info: RoundInfo,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None,
        prox: ProximalTerm,
        scaffold: ScaffoldRound | None,
    ) -> TrainResult:
        """One round of DP-SGD on the training loader's dataset (see "Differential privacy")."""
        from torch.utils.data import DataLoader

        from cipherhive.node.dp_sgd import private_training

        if not isinstance(train_loader, DataLoader):
            raise TrainerError("under DP the data factory must return a torch DataLoader over a dataset")
        loss_sum, correct, seen = 0.0, 0, 0
        with private_training(
            model, optimizer, train_loader.dataset, info.privacy, collate_fn=train_loader.collate_fn
        ) as dp:
            if prox.active:
                dp.add_gradient_correction(prox.apply)  # after clipping and noise, before the step
            if scaffold is not None:
                dp.add_gradient_correction(scaffold.apply)
            for batch in dp.loader:
                if info.should_stop():
                    return TrainResult(num_samples=0)
                inputs, target = _split_batch(batch)
                dp.optimizer.zero_grad()
                output = dp.model(*inputs)
                loss = self._loss(output, target)
                loss.backward()  # type: ignore[no-untyped-call]
                dp.optimizer.step()
                n = int(target.shape[0])
                if n:
                    loss_sum += float(loss.detach()) * n
                    seen += n
                    if self.loss == "cross_entropy":
                        correct += int((output.detach().argmax(dim=1) == target).sum())
            records = dp.num_records
        if scaffold is not None:
            scaffold.finish(self._scaffold_lr)
        metrics = {"loss": loss_sum / seen} if seen else {}
        if seen and self.loss == "cross_entropy":
            metrics["accuracy"] = correct / seen
        if val_loader is not None:
            metrics.update({f"val_{k}": v for k, v in self.measure(model, val_loader)[1].items()})
        return TrainResult(num_samples=records, metrics=metrics)

    # ------------------------------------------------------------ helpers

    def _begin_scaffold(self, model: nn.Module, info: RoundInfo) -> ScaffoldRound | None:
        if self.scaffold is None:
            return None
        chosen = [(n, t) for n, t in self.federated_tensors(model) if not n.startswith(CONTROL_PREFIX)]
        return self.scaffold.begin(_scaffolded(model, chosen), info.round, info.base_round)

    def evaluate(self, model: nn.Module) -> tuple[int, dict[str, float]]:
        """The trainer interface's evaluation: :meth:`measure` on the validation loader, if any."""
        _, val_loader = self._data()
        return (0, {}) if val_loader is None else self.measure(model, val_loader)

    def measure(self, model: nn.Module, loader: Iterable[Any]) -> tuple[int, dict[str, float]]:
        """Examples, and mean loss (and accuracy for classification) over ``loader``, in eval mode."""
        was_training = model.training
        model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        with torch.no_grad():
            for batch in loader:
                inputs, target = _split_batch(batch)
                output = model(*inputs)
                n = int(target.shape[0])
                loss_sum += float(self._loss(output, target)) * n
                seen += n
                if self.loss == "cross_entropy":
                    correct += int((output.argmax(dim=1) == target).sum())
        model.train(was_training)
        if seen == 0:
            return 0, {}
        out = {"loss": loss_sum / seen}
        if self.loss == "cross_entropy":
            out["accuracy"] = correct / seen
        return seen, out

    def _data(self) -> tuple[Iterable[Any], Iterable[Any] | None]:
        if self._loaders is None:
            offered: dict[str, Any] = {"seed": self.seed}
            if self.shard is not None:
                offered["shard"] = self.shard
            if self.shards is not None:
                offered["shards"] = self.shards
            result = call_with(self._data_factory, "data", self.data_kwargs, offered)
            if not isinstance(result, tuple | list) or len(result) != 2:
                raise TrainerError("data factory must return (train_loader, val_loader or None)")
            self._loaders = (result[0], result[1])
        return self._loaders

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainerError("the model has no trainable parameters")
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss == "cross_entropy":
            return nn.functional.cross_entropy(output, target)
        target = target.to(output.dtype)
        if target.shape != output.shape and target.numel() == output.numel():
            target = target.reshape(output.shape)
        return nn.functional.mse_loss(output, target)
