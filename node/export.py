"""Export the federation's global model from a node's checkpoint, for use outside cipherhive.

Any round the node still keeps can be exported (``--round N``: the file
``checkpoint-N.pt`` in its state directory; ``keep_checkpoints`` decides how
many applied rounds are kept), by default the current one.

**The export folder** (read it back with :func:`load_export`):

* ``model.safetensors`` — the whole model's ``state_dict`` (metadata ``round``),
  unless the trainer writes its own export (the LoRA trainer's merged model,
  also ``model.safetensors`` from ``save_pretrained``, plus ``adapter/``);
* ``checkpoint.pt`` — ``{"round", "layout_hash", "tensors", "optimizer"}``: the
  federated tensors only, and the server-side optimizer's state at that round,
  what ``cipherhive node bootstrap`` installs;
* ``cipherhive.json`` — ``round``, ``layout_hash``, ``base_model_hash``,
  ``federated_tensors`` (count), ``federated_values``, ``plugin``,
  ``written_by`` and ``checkpoint`` (the file name above).

The checkpoint holds only the federated tensors (for a LoRA trainer: the
adapters and the head). Exporting rebuilds the full model the way the node
does — the same trainer, the same options, the same base — puts the
checkpoint's tensors into it, and writes it: through the trainer's own
``export(model, out_dir)`` when it has one (the LoRA trainer writes a merged,
peft-free model plus the adapter alone), otherwise as ``model.safetensors``
holding the model's ``state_dict``. ``cipherhive.json`` beside it records which
round and which layout it came from, and ``checkpoint.pt`` holds what a node's
checkpoint holds (``{"round", "layout_hash", "tensors"}``: the federated tensors
only), so another member that fell behind the server's kept sums can start from
it with ``cipherhive node bootstrap --from DIR/checkpoint.pt``. The node's state
is only read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cipherhive.node.config import NodeConfig
from cipherhive.node.state.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    kept_name,
    read_checkpoint,
    write_checkpoint,
)
from cipherhive.node.trainer import federated_tensors, load_trainer
from cipherhive.node.training.update import layout_of
from cipherhive.runtime.errors import UserError
from cipherhive.runtime.fsutil import atomic_write

PROVENANCE = "cipherhive.json"
MODEL_FILE = "model.safetensors"


class ExportError(UserError, RuntimeError):
    """The node's state cannot be exported as asked; the message says why."""


def kept_rounds(state_dir: Path) -> list[int]:
    """The rounds whose checkpoints ``state_dir`` still holds, oldest first."""
    rounds = []
    for path in state_dir.glob("checkpoint-*.pt"):
        suffix = path.stem.split("-", 1)[1]
        if suffix.isdigit():
            rounds.append(int(suffix))
    return sorted(rounds)


def _checkpoint_file(config: NodeConfig, round_number: int | None) -> Path:
    """The checkpoint to export; ExportError naming the kept rounds when ``round_number`` is gone."""
    if round_number is None:
        path = config.state_dir / CHECKPOINT
        if not path.exists():
            # Checked before NodeState(), which would create a missing state directory.
            raise ExportError(
                f"no checkpoint in {config.state_dir}: this node has not applied a federated round yet "
                "(or --state-dir points elsewhere); there is no global model to export"
            )
        return path
    path = config.state_dir / kept_name(round_number)
    if not path.exists():
        kept = kept_rounds(config.state_dir)
        listed = ", ".join(map(str, kept)) if kept else "none"
        raise ExportError(
            f"round {round_number} is not kept in {config.state_dir} (kept rounds: {listed}); "
            f"the node keeps its newest keep_checkpoints = {config.keep_checkpoints} applied rounds: "
            "export one of those, or raise keep_checkpoints for the future"
        )
    return path


def export_model(config: NodeConfig, out: Path, round_number: int | None = None) -> Path:
    """Write the global model of round ``round_number`` (None: the current one) into ``out``."""
    checkpoint_path = _checkpoint_file(config, round_number)
    trainer = load_trainer(config.plugin, config.options, config.python_path)
    model = trainer.build_model()
    tensors = federated_tensors(trainer, model)
    base_hash_fn = getattr(trainer, "base_model_hash", None)
    layout = layout_of(tensors, base_hash_fn() if base_hash_fn else "")
    checkpoint = read_checkpoint(checkpoint_path)
    if checkpoint.layout_hash != layout.hash:
        raise ExportError(
            f"the checkpoint in {config.state_dir} was made for another model layout "
            f"({checkpoint.layout_hash[:12]}) than this configuration builds ({layout.hash[:12]}): "
            "check [trainer] plugin and options (and the base model files) against the node's"
        )
    missing = [name for name, _ in tensors if name not in checkpoint.tensors]
    if missing:
        raise ExportError(f"the checkpoint in {config.state_dir} lacks tensors {missing[:3]}")
    with torch.no_grad():
        for name, tensor in tensors:
            tensor.copy_(checkpoint.tensors[name])
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    exporter = getattr(trainer, "export", None)
    if exporter is not None:
        exporter(model, out)
        written = "trainer export"
    else:
        try:
            from safetensors.torch import save_file
        except ImportError as exc:
            raise ExportError(
                "writing model.safetensors needs the safetensors package (pip install safetensors)"
            ) from exc
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(out / MODEL_FILE), metadata={"round": str(checkpoint.round)})
        written = MODEL_FILE
    write_checkpoint(
        out / CHECKPOINT,
        Checkpoint(
            checkpoint.round,
            layout.hash,
            {name: checkpoint.tensors[name] for name, _ in tensors},
            checkpoint.optimizer,  # a member bootstrapped from it continues with the same moments
            checkpoint.chain_hash,
        ),
    )
    provenance = {
        "round": checkpoint.round,
        "layout_hash": layout.hash,
        "base_model_hash": layout.base_model_hash,
        "federated_tensors": len(tensors),
        "federated_values": layout.num_params,
        "plugin": config.plugin,
        "written_by": written,
        # For `cipherhive node bootstrap`: round, layout hash and federated tensors.
        "checkpoint": CHECKPOINT,
    }
    atomic_write(out / PROVENANCE, (json.dumps(provenance, indent=2) + "\n").encode(), mode=0o644)
    return out


@dataclass(frozen=True)
class Export:
    """What :func:`load_export` reads back from an export folder."""

    #: ``cipherhive.json``: round, layout_hash, base_model_hash, plugin, ...
    metadata: dict[str, Any]
    #: ``model.safetensors``: the whole model's state_dict (empty if the folder has none).
    tensors: dict[str, torch.Tensor]
    #: ``checkpoint.pt``: the federated tensors only.
    federated: dict[str, torch.Tensor]

    @property
    def round(self) -> int:
        return int(self.metadata["round"])


def load_export(path: str | Path) -> Export:
    """Read an export folder (or its ``cipherhive.json``) without cipherhive's trainer or config.

    For analysis outside a node: ``model.load_state_dict(load_export(d).tensors)``.
    """
    folder = Path(path)
    if folder.name == PROVENANCE:
        folder = folder.parent
    try:
        metadata = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ExportError(
            f"{folder} is not a cipherhive export (no {PROVENANCE}): make one with `cipherhive node export`"
        ) from exc
    tensors: dict[str, torch.Tensor] = {}
    if (folder / MODEL_FILE).exists():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / MODEL_FILE))
    checkpoint = read_checkpoint(folder / str(metadata.get("checkpoint", CHECKPOINT)))
    return Export(metadata, tensors, dict(checkpoint.tensors))
