"""Federated fine-tuning of a pretrained Hugging Face model: only LoRA adapters (and the head) travel.

Members share a frozen pretrained base — the same files, distributed with
the federation like its keys — and federate only the small low-rank adapter
matrices peft adds to it. Updates shrink from the whole model to a few
thousand values (usually one ciphertext), and a base that differs between
members is caught at join: ``base_model_hash()`` covers the base's weight
files, the layout hash covers that hash, and the server refuses a member
whose layout hash differs from the federation's.

.. code-block:: toml

    [trainer]
    plugin = "cipherhive.node.trainers.lora:LoraTrainer"

    [trainer.options]
    base_model = "/srv/models/acme-bert"          # a LOCAL save_pretrained directory (absolute path)
    data = "acme_training.tickets:shard"          # -> (train dataset, val dataset or None)
    data_options = { root = "/data/acme" }
    r = 8
    lora_alpha = 16
    target_modules = "query,value"                # default: peft's choice for the architecture
    train_head = true
    epochs = 1
    lr = 0.001

**Base model.** ``AutoModelForSequenceClassification.from_pretrained(base_model,
local_files_only=True)``; nothing is ever downloaded (``HF_HUB_OFFLINE=1`` is
set before transformers is imported). ``labels`` (class names, a list or a
comma-separated string) or ``num_labels`` give the task's classes; a head
with another number of classes is replaced by a freshly initialised one.
Any weight the directory does not hold (such a head, or a pooler) is
initialised after ``torch.manual_seed(seed)``, and so are the adapters
(lora_A random, lora_B zero), so members with the same seed start from the
same model. The loss is single-label cross-entropy whatever problem type the
base was saved with.

**Base model hash.** SHA-256 over the directory's ``*.safetensors`` / ``*.bin``
files and ``config.json`` (sorted by name; name, size and content of each),
computed once, at the first call. Copy the directory to every member rather
than re-saving it (a re-save may change ``config.json``). Tokenizer files are
not covered: distribute them with the base. ``base_model_sha256`` (optional)
pins the base to a known file: the SHA-256 that ``model.safetensors`` must
have, checked before anything loads it (a damaged or swapped file is refused
with its path, instead of training on weights nobody chose).

**What is trained.** The LoRA matrices (``lora_dropout`` is fixed at 0, so a
member's update does not depend on dropout masks in the adapters) and, with
``train_head = true`` (the default), the classification head, which peft
keeps as a trainable copy (``modules_to_save``). For sequence classification
the head is almost always new or re-purposed, so freezing it only makes sense
when the base already carries a head trained for exactly this task;
``train_head = false`` with a head that was freshly initialised is refused.
All other base weights are frozen and never change. Each round runs
``epochs`` epochs of AdamW (``lr``, ``weight_decay``, ``batch_size``) with a
fresh optimizer state, shuffled by a seed derived from (seed, round, shard).

**What is federated.** ``federate``: glob patterns over the peft model's
parameter names (a list, or one comma-separated string). Default:
``["*lora_*"]`` plus ``["*.modules_to_save.*"]`` when the head is trained. Only
trainable tensors are selected, sorted by name; each pattern must match at
least one. A trainable tensor left out stays local to this member.

**Data.** ``data`` names a callable called with ``data_options`` plus whichever
of ``shard``, ``shards`` and ``seed`` it accepts. It returns ``(train, val)``
where each is a dataset of ``(input_ids, attention_mask, label)`` tensors
(e.g. a ``TensorDataset``); ``val`` may be ``None``. It is called on the first
round, so building the model (``cipherhive node export``) needs no data.
The sample count (the FedAvg weight) is the training set's size; metrics are
``loss`` and ``accuracy`` over the last epoch, ``val_loss`` and
``val_accuracy`` on ``val``. ``evaluate(model)`` gives ``val``'s size, loss and
accuracy: the federated evaluation (:mod:`cipherhive.node.training.federated_eval`).

**Differential privacy.** When the federation runs record-level DP
(``info.privacy`` is set), a round is DP-SGD through
:func:`cipherhive.node.dp_sgd.private_training` (Opacus, ChaCha20 noise and
Poisson sampling) instead of ``epochs`` shuffled epochs: exactly the
schedule's ``steps_per_round`` Poisson batches of the training *dataset*
(``batch_size`` is not used), AdamW on the trainable tensors only. Per-record
gradients are computed for the trainable layers alone (the LoRA matrices and
the head, all ``nn.Linear``); the frozen base needs none. The helper's
refusals apply, and so does Opacus' list of layers it can compute per-record
gradients for: a trainable layer it does not support (e.g. LoRA on an
embedding, ``target_modules = "word_embeddings"``) is refused before
anything is trained, as is BatchNorm anywhere in the model. Training metrics
are measured on the Poisson batches; they and ``val_*`` stay in the node's log.

**History.** With ``history_dir`` set, the global adapter (the federated
tensors, identical on every member) is saved after each applied round as
``round-NNNN.safetensors``, for evaluation or rollback. Only the global
model is written, never this member's own update.

**Export.** ``export(model, out_dir)`` writes the merged model (adapters folded
into the base weights, no peft needed to load it) with ``save_pretrained``
(safetensors), the adapter alone in ``out_dir/adapter`` (peft format), and
the base directory's tokenizer files. ``threads`` > 0 caps torch's threads.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Set before transformers / huggingface_hub read them at import: local files only, quiet logs.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from cipherhive.node.trainer import AppliedRound, RoundInfo, TrainerError, TrainResult
from cipherhive.node.trainers._common import (
    call_with,
    import_object,
    patterns,
    round_seed,
    select,
)

log = logging.getLogger("cipherhive.node.trainers.lora")
hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

#: Files of a base model directory that base_model_hash() covers (besides config.json).
WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: Tokenizer files export() copies next to the merged model, when the base directory has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
#: The weights file ``base_model_sha256`` pins.
PINNED_WEIGHTS = "model.safetensors"
HEAD_PATTERN = "*.modules_to_save.*"
LORA_PATTERN = "*lora_*"


def hash_base_model(directory: Path) -> str:
    """SHA-256 over the weight files (sorted by name) and config.json: name, size and content of each."""
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise TrainerError(f"base model directory {directory} holds no *.safetensors or *.bin weight files")
    outer = hashlib.sha256()
    for path in files:
        inner = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                inner.update(chunk)
        outer.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        outer.update(inner.digest())
    return outer.hexdigest()


def evaluate(model: nn.Module, dataset: Dataset[Any], batch_size: int = 128) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a sequence classifier on ``(input_ids, mask, label)`` data."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for input_ids, attention_mask, labels in DataLoader(dataset, batch_size=batch_size):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
            seen += len(labels)
    model.train(was_training)
    return {"loss": loss_sum / seen, "accuracy": correct / seen} if seen else {}


class LoraTrainer:
    """LoRA fine-tuning of a local pretrained sequence classifier; see the module docstring."""

    def __init__(
        self,
        base_model: str,
        data: str = "",
        data_options: dict[str, Any] | None = None,
        r: int = 8,
        lora_alpha: int = 16,
        target_modules: str | Sequence[str] | None = None,
        train_head: bool = True,
        federate: str | Sequence[str] | None = None,
        num_labels: int = 0,
        labels: str | Sequence[str] | None = None,
        epochs: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 32,
        seed: int = 0,
        shard: int = 0,
        shards: int = 1,
        threads: int = 0,
        history_dir: str = "",
        base_model_sha256: str = "",
    ) -> None:
        self.base_dir = Path(base_model).expanduser()
        self.base_model_sha256 = base_model_sha256.strip().lower()
        if not (self.base_dir / "config.json").is_file():
            raise TrainerError(
                f"base_model {base_model!r} is not a local model directory (no config.json); "
                "give the directory save_pretrained() wrote — nothing is downloaded"
            )
        if r < 1 or epochs < 1 or batch_size < 1:
            raise TrainerError("r, epochs and batch_size must be at least 1")
        self._data_factory = import_object(data, "data") if data else None
        self.data_options = dict(data_options or {})
        self.r, self.lora_alpha, self.train_head = r, lora_alpha, train_head
        self.target_modules = None if target_modules is None else patterns(target_modules, "target_modules")
        default = [LORA_PATTERN, HEAD_PATTERN] if train_head else [LORA_PATTERN]
        self.federate = default if federate is None else patterns(federate, "federate")
        self.labels = None if labels is None else patterns(labels, "labels")
        if self.labels is not None and num_labels and num_labels != len(self.labels):
            raise TrainerError(f"num_labels = {num_labels} but labels names {len(self.labels)} classes")
        self.num_labels = len(self.labels) if self.labels is not None else num_labels
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size
        self.seed, self.shard, self.shards = seed, shard, shards
        self.history_dir = Path(history_dir) if history_dir else None
        self._base_hash: str | None = None
        self._datasets: tuple[Dataset[Any], Dataset[Any] | None] | None = None
        if threads > 0:
            torch.set_num_threads(threads)

    # ------------------------------------------------------------ interface

    def build_model(self) -> nn.Module:
        """The base (frozen) wrapped with fresh adapters; identical on every member with the same seed."""
        self._check_weights()
        torch.manual_seed(self.seed)
        # Single-label classification whatever the base was trained for (its loss is computed here).
        extra: dict[str, Any] = {"problem_type": "single_label_classification"}
        if self.labels is not None:
            extra["id2label"] = dict(enumerate(self.labels))
            extra["label2id"] = {name: i for i, name in enumerate(self.labels)}
        if self.num_labels:
            extra.update(num_labels=self.num_labels, ignore_mismatched_sizes=True)
        try:
            base, info = AutoModelForSequenceClassification.from_pretrained(
                str(self.base_dir), local_files_only=True, output_loading_info=True, **extra
            )
        except (OSError, ValueError) as exc:
            raise TrainerError(f"cannot load the base model from {self.base_dir}: {exc}") from exc
        fresh = sorted(
            set(info.get("missing_keys", ())) | {str(m[0]) for m in info.get("mismatched_keys", ())}
        )
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            target_modules=self.target_modules,
            lora_dropout=0.0,
            task_type=TaskType.SEQ_CLS,
        )
        try:
            with warnings.catch_warnings():
                # peft 0.21 calls an API transformers 5 deprecated; nothing a member can act on.
                warnings.filterwarnings(
                    "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
                )
                model = get_peft_model(base, config)
        except ValueError as exc:
            raise TrainerError(f"cannot add LoRA adapters to {self.base_dir}: {exc}") from exc
        heads = sorted(getattr(model, "modules_to_save", None) or ())
        if fresh:
            log.info("weights new to %s, initialised from seed %d: %s", self.base_dir, self.seed, fresh)
        if not self.train_head:
            new_head = [k for k in fresh if any(k == h or k.startswith(h + ".") for h in heads)]
            if new_head:
                raise TrainerError(
                    f"the classification head {new_head} is freshly initialised (not in {self.base_dir}); "
                    "a frozen random head cannot learn: set train_head = true"
                )
            for name, param in model.named_parameters():
                if ".modules_to_save." in name:
                    param.requires_grad_(False)
        return model

    def _check_weights(self) -> None:
        if not self.base_model_sha256:
            return
        weights = self.base_dir / PINNED_WEIGHTS
        if not weights.is_file():
            raise TrainerError(f"base_model_sha256 is set but {weights} does not exist")
        digest = hashlib.sha256()
        with weights.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != self.base_model_sha256:
            raise TrainerError(
                f"{weights} has SHA-256 {digest.hexdigest()}, not base_model_sha256 = "
                f"{self.base_model_sha256}: the file is damaged or another model; put the intended "
                "base model there (or correct base_model_sha256) and start again"
            )

    def federated_tensors(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        chosen = select(trainable, self.federate, "federate")
        return sorted(chosen, key=lambda item: item[0])

    def base_model_hash(self) -> str:
        """Computed once: a member with different base files is refused at join (layout hash)."""
        if self._base_hash is None:
            self._base_hash = hash_base_model(self.base_dir)
        return self._base_hash

    def train(self, model: nn.Module, info: RoundInfo) -> TrainResult:
        train_set, val_set = self._data()
        torch.manual_seed(round_seed(self.seed, info.round, self.shard))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        model.train()
        if info.privacy is not None:
            return self._train_private(model, optimizer, info, train_set, val_set)
        loader = DataLoader(train_set, batch_size=self.batch_size, shuffle=True)
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(self.epochs):
            loss_sum, correct, seen = 0.0, 0, 0
            for input_ids, attention_mask, labels in loader:
                if info.should_stop():
                    # The node discards this result (nothing partial is uploaded): return at once.
                    return TrainResult(num_samples=0)
                optimizer.zero_grad()
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                loss = nn.functional.cross_entropy(logits, labels)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                loss_sum += float(loss.detach()) * len(labels)
                correct += int((logits.detach().argmax(dim=-1) == labels).sum())
                seen += len(labels)
        if seen == 0:
            raise TrainerError("this member's training set is empty")
        metrics = {"loss": loss_sum / seen, "accuracy": correct / seen}
        if val_set is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate(model, val_set, self.batch_size * 4).items()})
        return TrainResult(num_samples=seen, metrics=metrics)

    def _train_private(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        info: RoundInfo,
        train_set: Dataset[Any],
        val_set: Dataset[Any] | None,
    ) -> TrainResult:
        """One round of DP-SGD on the adapters (and head); see "Differential privacy"."""
        # The helper refuses a DataLoader (not Poisson-sampled) and what Opacus cannot handle.
        from cipherhive.node.dp_sgd import private_training

        loss_sum, correct, seen = 0.0, 0, 0
        with private_training(model, optimizer, train_set, info.privacy) as dp:
            for input_ids, attention_mask, labels in dp.loader:
                if info.should_stop():
                    return TrainResult(num_samples=0)
                dp.optimizer.zero_grad()
                logits = dp.model(input_ids=input_ids, attention_mask=attention_mask).logits
                loss = nn.functional.cross_entropy(logits, labels)
                loss.backward()  # type: ignore[no-untyped-call]
                dp.optimizer.step()
                if len(labels):
                    loss_sum += float(loss.detach()) * len(labels)
                    correct += int((logits.detach().argmax(dim=-1) == labels).sum())
                    seen += len(labels)
            records = dp.num_records
        metrics = {"loss": loss_sum / seen, "accuracy": correct / seen} if seen else {}
        if val_set is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate(model, val_set, self.batch_size * 4).items()})
        return TrainResult(num_samples=records, metrics=metrics)

    def evaluate(self, model: nn.Module) -> tuple[int, dict[str, float]]:
        """The federated evaluation (trainer interface): the ``val`` dataset, if the data gives one."""
        _, val_set = self._data()
        if val_set is None:
            return 0, {}
        metrics = evaluate(model, val_set, self.batch_size * 4)
        return (len(val_set) if metrics else 0), metrics  # type: ignore[arg-type]

    def after_round(self, model: nn.Module, applied: AppliedRound) -> None:
        if self.history_dir is None:
            return
        self.history_dir.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in self.federated_tensors(model)}
        path = self.history_dir / f"round-{applied.round:04d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"round": str(applied.round), "base": self.base_model_hash()})
        tmp.replace(path)

    # ------------------------------------------------------------ export

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """The merged model (loadable without peft) in ``out_dir``; the adapter alone in ``adapter/``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir / "adapter"))  # type: ignore[operator]
        merged = copy.deepcopy(model).merge_and_unload()  # type: ignore[operator]
        merged.save_pretrained(str(out_dir))  # transformers 5 always writes safetensors
        if not any(out_dir.glob("*.safetensors")):
            raise TrainerError(f"save_pretrained wrote no safetensors file into {out_dir}")
        for name in TOKENIZER_FILES:
            if (self.base_dir / name).is_file():
                shutil.copy2(self.base_dir / name, out_dir / name)

    # ------------------------------------------------------------ data

    def _data(self) -> tuple[Dataset[Any], Dataset[Any] | None]:
        if self._datasets is None:
            if self._data_factory is None:
                raise TrainerError("no data: set [trainer] options data = 'package.module:callable'")
            offered = {"shard": self.shard, "shards": self.shards, "seed": self.seed}
            result = call_with(self._data_factory, "data", self.data_options, offered)
            if not isinstance(result, tuple | list) or len(result) != 2:
                raise TrainerError("data must return (train dataset, val dataset or None)")
            self._datasets = (result[0], result[1])
        return self._datasets
