"""`cipherhive node bootstrap`: the way back in for a node that fell behind the server's kept sums.

A server keeps published sums for a window (``keep_sums``); a node whose next
sum was pruned cannot catch up by replay. It can start again from another
member's global model at a recent round: ``cipherhive node export`` writes
``checkpoint.pt`` (round, layout hash, federated tensors) for exactly this, and
a node's own kept ``checkpoint-<round>.pt`` files have the same format.

Bootstrapping checks the file against the model this node's configuration
builds (layout hash, every tensor's name and shape, finite values) and installs
it as the start of a new chain of applied rounds (see
:mod:`cipherhive.node.state.checkpoint`); the node then replays the sums after it.
Run it while the node is stopped. Files are loaded with ``weights_only``, so a
file from elsewhere cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cipherhive.node.config import NodeConfig
from cipherhive.node.export import PROVENANCE
from cipherhive.node.state.checkpoint import CHECKPOINT, Checkpoint, NodeState, read_checkpoint
from cipherhive.node.sums.optimizers import OptimizerError, restored
from cipherhive.node.trainer import federated_tensors, load_trainer
from cipherhive.node.training.update import layout_of
from cipherhive.runtime.errors import UserError


class BootstrapError(UserError, RuntimeError):
    """The file cannot be installed as this node's checkpoint; the message says why."""


def _checkpoint_file(source: Path) -> Path:
    """An export folder, its cipherhive.json, or a checkpoint file itself."""
    if source.is_dir():
        return source / CHECKPOINT
    if source.name == PROVENANCE:
        return source.parent / str(json.loads(source.read_text()).get("checkpoint", CHECKPOINT))
    return source


def bootstrap(config: NodeConfig, source: Path) -> tuple[Checkpoint, int]:
    """Install ``source`` as the node's checkpoint; return it and the round the node was at."""
    path = _checkpoint_file(source)
    if not path.exists():
        raise BootstrapError(
            f"{path} does not exist: pass the checkpoint.pt of a `cipherhive node export` "
            "(or its folder), or a node's checkpoint-<round>.pt"
        )
    try:
        checkpoint = read_checkpoint(path)
    except Exception as exc:
        raise BootstrapError(f"{path} is not a cipherhive checkpoint: {exc}") from exc
    trainer = load_trainer(config.plugin, config.options, config.python_path)
    tensors = federated_tensors(trainer, trainer.build_model())
    base_hash_fn = getattr(trainer, "base_model_hash", None)
    layout = layout_of(tensors, base_hash_fn() if base_hash_fn else "")
    if checkpoint.layout_hash != layout.hash:
        raise BootstrapError(
            f"{path} holds a model of layout {checkpoint.layout_hash[:12]}, but this node's "
            f"configuration builds layout {layout.hash[:12]}: check [trainer] plugin and options "
            "(and the base model files) against the member that exported it"
        )
    for name, tensor in tensors:
        value = checkpoint.tensors.get(name)
        if value is None or tuple(value.shape) != tuple(tensor.shape):
            raise BootstrapError(f"{path}: tensor {name} is missing or has another shape")
        if not bool(torch.isfinite(value).all()):
            raise BootstrapError(f"{path}: tensor {name} holds values that are not finite")
    if checkpoint.round < 1:
        raise BootstrapError(f"{path} is at round {checkpoint.round}; bootstrap needs a federated round")
    try:  # the optimizer's moments travel with the model; the node checks them against the federation's
        restored(checkpoint.optimizer, checkpoint.round, layout.num_params, str(path))
    except OptimizerError as exc:
        raise BootstrapError(str(exc)) from exc
    store = NodeState(config.state_dir, config.keep_checkpoints)
    previous = store.load()
    # The chain hash comes along: without it the node could not enrol in masked rounds.
    clean = Checkpoint(
        checkpoint.round,
        layout.hash,
        {name: checkpoint.tensors[name] for name, _ in tensors},
        checkpoint.optimizer,
        checkpoint.chain_hash,
    )
    store.install(clean)
    return clean, previous.round if previous else 0
