"""Record-level DP-SGD for a trainer: Opacus, with cryptographic randomness and enforced Poisson sampling.

DP-SGD (Abadi et al., CCS 2016): at each step every record joins the batch
independently with probability ``q`` (Poisson sampling, which the privacy
amplification in the accountant assumes: Mironov, Talwar and Zhang 2019), its
gradient is clipped to norm ``C``, the clipped gradients are summed and
Gaussian noise of standard deviation ``z·C`` is added. Opacus computes the
per-record gradients and does the clipping; this module swaps the randomness
for ChaCha20 (:mod:`cipherhive.node.privacy.randomness`) by subclassing Opacus'
optimizer and sampler, and refuses what would silently void the guarantee:

* a loader the helper did not make (shuffled batches, a custom sampler, the
  Hugging Face Trainer's loader): pass the *dataset*; the helper makes the
  Poisson loader, with exactly ``steps`` batches (a public count, so neither
  the steps nor ε reveal how many records a member has);
* BatchNorm, which mixes records inside a batch, so clipping one record's
  gradient no longer bounds its influence (use GroupNorm or LayerNorm);
* gradient accumulation across Poisson batches (several batches, one step),
  and steps without a new batch; Opacus' ``BatchMemoryManager``, which splits
  one Poisson batch into physical batches and steps once, is supported;
* a second use in one round, and δ > 1/(10·N) for a dataset of N records.

Use it in ``train(model, info)``::

    with private_training(model, optimizer, dataset, info.privacy) as dp:
        for inputs, target in dp.loader:
            dp.optimizer.zero_grad()
            loss_fn(dp.model(inputs), target).backward()
            dp.optimizer.step()
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.data_loader import wrap_collate_with_empty
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from cipherhive.node.privacy.randomness import CryptoStream
from cipherhive.node.privacy.round_info import DPRound
from cipherhive.node.trainer import TrainerError

# Opacus' hooks on a first layer whose input needs no gradient: expected, and said at every step.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

__all__ = ["CryptoDPOptimizer", "CryptoPoissonSampler", "DPUsageError", "PrivateTraining", "private_training"]


class DPUsageError(TrainerError):
    """DP-SGD used in a way that would void its guarantee; nothing of this round is sent."""


class _Tally:
    """Poisson batches drawn vs noisy steps taken: they must move in lockstep."""

    def __init__(self, privacy: DPRound) -> None:
        self.privacy = privacy
        self.batches = 0

    def drew_batch(self) -> None:
        if self.privacy.steps_taken != self.batches:
            raise DPUsageError(
                "a new Poisson batch was drawn before the optimizer stepped on the previous one: gradient "
                "accumulation across batches is not covered by the accountant (to split a batch that does "
                "not fit in memory, use opacus.utils.batch_memory_manager.BatchMemoryManager)"
            )
        if self.batches >= self.privacy.steps:
            raise DPUsageError(
                f"the round's {self.privacy.steps} steps are used up: iterate the loader once per round"
            )
        self.batches += 1

    def stepped(self) -> None:
        if self.privacy.steps_taken + 1 != self.batches:
            raise DPUsageError(
                "the optimizer stepped without a new Poisson batch: every step must follow exactly one "
                "batch from the helper's loader"
            )
        self.privacy.steps_taken += 1


class CryptoPoissonSampler(UniformWithReplacementSampler):  # type: ignore[misc]
    """Opacus' Poisson sampler, drawing from a ChaCha20 stream: each record joins each batch
    independently with probability ``sample_rate``; exactly ``steps`` batches."""

    def __init__(
        self, *, num_samples: int, sample_rate: float, steps: int, stream: CryptoStream, tally: _Tally
    ):
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self._random = stream
        self._tally = tally

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            self._tally.drew_batch()
            chosen = self._random.uniform(self.num_samples) < self.sample_rate
            yield np.flatnonzero(chosen).tolist()


class CryptoDPOptimizer(DPOptimizer):  # type: ignore[misc]
    """Opacus' DP optimizer (clip per record, sum, add noise, average), with its noise from
    a ChaCha20 stream built as Opacus' secure mode builds it."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        privacy: DPRound,
        expected_batch_size: int,
        tally: _Tally,
        loss_reduction: str = "mean",
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
        )
        self._privacy = privacy
        self._tally = tally
        #: Run after clipping, noise and scaling, before the step
        #: (:meth:`PrivateTraining.add_gradient_correction`).
        self.corrections: list[Callable[[], None]] = []

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        try:
            result: bool | None = super().pre_step(closure)
        except ValueError as exc:
            if "Per sample gradient" not in str(exc):
                raise
            raise DPUsageError(
                "Opacus computed no per-record gradient for a trainable parameter (a layer whose weights "
                "are used outside its own forward, or a parameter the model did not use): "
                "freeze it or train it in a layer Opacus supports"
            ) from exc
        if result:
            for correct in self.corrections:
                correct()
        return result

    def add_noise(self) -> None:
        # The announced parameters, not attributes a trainer could have changed.
        std = self._privacy.noise_multiplier * self._privacy.max_grad_norm
        self.max_grad_norm = self._privacy.max_grad_norm
        self._tally.stepped()
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            summed: torch.Tensor = p.summed_grad
            values = self._privacy.noise.secure_normal(summed.numel(), std)
            noise = torch.from_numpy(values).to(summed.dtype).view_as(summed)
            p.grad = (summed + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


@dataclass
class PrivateTraining:
    """What :func:`private_training` hands a trainer: train ``model`` with ``optimizer`` on ``loader``."""

    model: GradSampleModule
    optimizer: CryptoDPOptimizer
    loader: DataLoader[Any]
    num_records: int

    def add_gradient_correction(self, correct: Callable[[], None]) -> None:
        """Run ``correct`` at every step once Opacus has set ``p.grad`` to the clipped, noised,
        averaged gradient, just before the optimizer uses it. For data-independent corrections
        (FedProx's proximal term, SCAFFOLD's control variates: :mod:`cipherhive.node.training.drift`),
        which a loss term cannot carry because Opacus rebuilds ``.grad`` from per-record
        gradients. A correction must not read the batch: it is post-processing of the noisy
        gradient only when it depends on nothing but the model's values and public state."""
        self.optimizer.corrections.append(correct)


def check_model(model: nn.Module) -> None:
    """Refuse modules DP-SGD cannot protect (BatchNorm) or Opacus cannot compute per-record gradients for."""
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise DPUsageError(
            f"BatchNorm ({', '.join(norms[:4])}) mixes the records of a batch, so clipping one record's "
            "gradient does not bound its influence; use GroupNorm or LayerNorm "
            "(opacus.validators.ModuleValidator.fix does the swap)"
        )
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise DPUsageError(f"Opacus cannot train this model privately: {errors[0]}")
    # Opacus computes per-record gradients layer by layer, from a layer's input and output (functorch
    # for layers it has no rule for). Parameters held in a container that is never called as a layer
    # (peft's LoRA on an embedding keeps its matrices in a ParameterDict) would get none.
    containers = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.ParameterDict | nn.ParameterList)
        and any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    if containers:
        raise DPUsageError(
            "Opacus cannot train this model privately: the trainable parameters in "
            f"{', '.join(containers[:4])} are not used as a layer's own weights, so it cannot compute "
            "their per-record gradients "
            "(with LoRA, put adapters on linear layers only, not on embeddings)"
        )


def _dataset(data: Any) -> Dataset[Any]:
    if isinstance(data, DataLoader):
        origin = type(data).__module__.split(".")[0]
        hint = (
            " (the Hugging Face Trainer's own loader is not Poisson-sampled either)"
            if origin in ("transformers", "accelerate")
            else ""
        )
        raise DPUsageError(
            "pass the training *dataset*, not a DataLoader: DP-SGD's accounting assumes Poisson sampling, "
            f"which the helper's own loader does; a shuffled or custom loader would void it{hint}"
        )
    if isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise DPUsageError(
            f"{type(data).__name__} is not a map-style dataset (len and indexing): Poisson sampling "
            "needs to pick each record independently"
        )
    dataset: Dataset[Any] = data
    return dataset


def _empty_shapes(dataset: Dataset[Any]) -> tuple[list[tuple[int, ...]] | None, list[Any] | None]:
    first = dataset[0]
    items = first if isinstance(first, tuple | list) else [first]
    if not all(isinstance(t, torch.Tensor) for t in items):
        return None, None
    return [(0, *t.shape) for t in items], [t.dtype for t in items]


@contextmanager
def private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Any,
    privacy: DPRound | None,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    loss_reduction: str = "mean",
) -> Iterator[PrivateTraining]:
    """DP-SGD for one round: a per-record-gradient model, a noisy optimizer, a Poisson loader.

    ``data`` is a map-style dataset; ``privacy`` is ``info.privacy`` (the node charged its
    ledger for exactly these parameters before calling the trainer). ``loss_reduction`` is
    the reduction of the trainer's loss ("mean", the default of torch's losses, or "sum").
    On exit the model is plain again (Opacus' hooks removed).
    """
    if privacy is None:
        raise DPUsageError("this round has no DP parameters (info.privacy is None): the node does not run DP")
    if privacy.used:
        raise DPUsageError("private_training was used already in this round; the ledger charged one use")
    if isinstance(optimizer, DPOptimizer):
        raise DPUsageError("pass the plain torch optimizer; the helper wraps it")
    check_model(model)
    dataset = _dataset(data)
    records = len(dataset)  # type: ignore[arg-type]
    if records < 1:
        raise DPUsageError("the training dataset is empty")
    if privacy.delta > 1.0 / (10 * records):
        raise DPUsageError(
            f"δ = {privacy.delta:g} is too large for {records} records: δ must be at most 1/(10·N) = "
            f"{1.0 / (10 * records):.3g} (a δ near 1/N allows leaking a whole record)"
        )
    privacy.used = True
    tally = _Tally(privacy)
    sampler = CryptoPoissonSampler(
        num_samples=records,
        sample_rate=privacy.sample_rate,
        steps=privacy.steps,
        stream=privacy.sampling,
        tally=tally,
    )
    shapes, dtypes = _empty_shapes(dataset)
    collate = wrap_collate_with_empty(
        collate_fn=collate_fn or default_collate, sample_empty_shapes=shapes, dtypes=dtypes
    )
    loader: DataLoader[Any] = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    wrapped = GradSampleModule(model, loss_reduction=loss_reduction)
    dp_optimizer = CryptoDPOptimizer(
        optimizer,
        privacy=privacy,
        expected_batch_size=max(1, round(records * privacy.sample_rate)),
        tally=tally,
        loss_reduction=loss_reduction,
    )
    try:
        yield PrivateTraining(wrapped, dp_optimizer, loader, records)
    finally:
        wrapped._close()
        for p in model.parameters():
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
