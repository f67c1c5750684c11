"""The training plug-in interface: how a data scientist's code plugs into a node.

A trainer is named in the node's configuration as ``package.module:object``.
The object is either a trainer instance, or a callable (class or function)
that the node calls with the ``[trainer] options`` table as keyword
arguments to get one. A trainer provides:

``build_model() -> torch.nn.Module``
    The initial global model. Every member must build the *same* model
    (same architecture and same initial values: use a fixed seed, or load
    a local file), because members only ever exchange differences.

``train(model, info: RoundInfo) -> TrainResult``
    Train ``model`` in place on local data, starting from the current global
    model; return the number of samples used (the FedAvg weight, encrypted
    before it leaves the node) and rounded local metrics.

    **Differential privacy.** When the federation runs record-level DP,
    ``info.privacy`` holds the round's parameters: train through
    :func:`cipherhive.node.dp_sgd.private_training` (the node refuses to send an
    update whose round did not use it), and the sample count is then unused
    (every member weighs 1).

    **Stopping.** ``info.should_stop()`` turns true once the node was asked to
    stop (SIGTERM, Ctrl-C). Check it between batches and return early with
    whatever result you have: the node sees the stop after ``train`` returns
    and then neither encrypts nor submits anything, so a partial result is
    never uploaded. A trainer that never checks it still works, but the node
    then stops only when ``train`` returns (or at once on a second signal).

Optional:

``federated_tensors(model) -> list[tuple[str, torch.Tensor]]``
    Which tensors are federated, in order. Default: every parameter with
    ``requires_grad`` plus floating-point buffers (e.g. batch-norm running
    statistics, which are averaged like weights); integer buffers such as
    ``num_batches_tracked`` stay local.

``base_model_hash() -> str``
    Hash of a frozen base the federated tensors sit on (adapters); members
    with a different base are refused at join.

``evaluate(model) -> tuple[int, dict[str, float]]``
    Evaluate ``model`` (the current global model) on local *validation* data,
    without changing it: return the number of examples and their mean metrics.
    Before training in each round the node evaluates the global model with it
    and sends ``loss`` and ``accuracy`` (the federated set; others stay in the
    node's log), weighted by the example count, inside its encrypted and masked
    update; after decrypting the sum every member sees the federation-wide
    ``Σ n·metric / Σ n`` of that model, rounded, and nobody sees a member's own
    figures (:mod:`cipherhive.node.training.federated_eval`). ``loss`` must be ≥ 0 and
    ``accuracy`` in [0, 1]; a metric that is not is left out with a warning.
    Not called under differential privacy (validation data is outside ε).

``after_round(model, applied: AppliedRound) -> None``
    Called after the decrypted average has been applied (evaluate, export);
    ``applied.federated_eval`` holds the federated evaluation the sum carried.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from cipherhive.node.training.plugin_paths import explain_missing_file
from cipherhive.runtime.errors import UserError

if TYPE_CHECKING:
    from cipherhive.node.privacy.round_info import DPRound


def _never() -> bool:
    return False


@dataclass(frozen=True)
class RoundInfo:
    round: int
    base_round: int
    node_name: str
    #: True once the node was asked to stop: return from ``train`` early (nothing is submitted).
    #: A default that never fires keeps trainers and tests that build a RoundInfo themselves working.
    should_stop: Callable[[], bool] = field(default=_never, compare=False, repr=False)
    #: Record-level DP-SGD parameters and randomness when the federation runs DP
    #: (docs/spec/privacy.md §1): pass it to :func:`cipherhive.node.dp_sgd.private_training`.
    #: None: train without DP.
    privacy: DPRound | None = field(default=None, compare=False)


@dataclass
class TrainResult:
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AppliedRound:
    round: int
    participants: int
    #: The decrypted average update per federated tensor (float64). Stays on this node.
    mean_update: dict[str, torch.Tensor]
    #: The federation-wide evaluation of this round's base model (normally round - 1's global
    #: model), rounded to 4 significant digits: ``examples`` and each metric of
    #: :data:`cipherhive.federation.layout.EVAL_METRICS` some member sent. Empty when none did.
    federated_eval: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Trainer(Protocol):
    def build_model(self) -> torch.nn.Module: ...

    def train(self, model: torch.nn.Module, info: RoundInfo) -> TrainResult: ...


class TrainerError(UserError, RuntimeError):
    """The plug-in cannot be loaded or misbehaved; the message names what to fix."""


def load_trainer(
    spec: str, options: dict[str, Any] | None = None, python_path: Sequence[str | Path] = ()
) -> Trainer:
    """Import ``package.module:object`` and return a trainer instance.

    ``python_path`` (``[trainer] python_path``) is put in front of ``sys.path`` first, for a
    plug-in that is not installed into the node's environment.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TrainerError(f"trainer {spec!r} must look like 'package.module:object'")
    for folder in reversed([str(f) for f in python_path]):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TrainerError(
            f"cannot import trainer module {module_name!r}: {exc}; install the plug-in into the node's "
            "Python environment (pip install), or add its folder to [trainer] python_path"
        ) from exc
    try:
        obj: Any = getattr(module, attr)
    except AttributeError as exc:
        raise TrainerError(f"module {module_name!r} has no attribute {attr!r}") from exc
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Trainer)):
        factory: Callable[..., Any] = obj
        try:
            obj = factory(**(options or {}))
        except TypeError as exc:
            raise TrainerError(f"{spec} does not accept the options {sorted(options or {})}: {exc}") from exc
        except OSError as exc:  # most often a relative path read from the working directory
            raise TrainerError(explain_missing_file(spec, options or {}, exc)) from exc
    elif options:
        raise TrainerError(f"{spec} is an instance; [trainer] options are only for factories")
    if not isinstance(obj, Trainer):
        raise TrainerError(f"{spec} provides no build_model() and train(model, info)")
    return obj


def federated_tensors(trainer: Trainer, model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors this federation averages, in a fixed order."""
    custom = getattr(trainer, "federated_tensors", None)
    if custom is not None:
        return list(custom(model))
    tensors: list[tuple[str, torch.Tensor]] = [
        (name, p) for name, p in model.named_parameters() if p.requires_grad
    ]
    tensors += [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
    return tensors
