"""Tests for federated LoRA fine-tuning: cipherhive.node.trainers.lora, export, and join-time refusals.

The base model is a tiny BERT (hidden 32) built and briefly pretrained in a
fixture, under a temporary directory: nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from cipherhive.demo.federation import LocalFederation
from cipherhive.demo.lora_task import create_base_model
from cipherhive.node.config import NodeConfig
from cipherhive.node.export import ExportError, export_model
from cipherhive.node.state.checkpoint import Checkpoint, NodeState
from cipherhive.node.trainer import RoundInfo, TrainerError, federated_tensors, load_trainer
from cipherhive.node.trainers.lora import LoraTrainer, hash_base_model
from cipherhive.node.training.update import layout_of

SPEC = "cipherhive.node.trainers.lora:LoraTrainer"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lora") / "base"
    create_base_model(directory, seed=0, steps=20, hidden=32, layers=2, heads=4, intermediate=64)
    return directory


def _options(base: Path, **extra: Any) -> dict[str, Any]:
    return {
        "base_model": str(base),
        "data": "cipherhive.demo.lora_task:member_data",
        "data_options": {"tokenizer": str(base)},
        "labels": "negative,neutral,positive",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": "query,value",
        "epochs": 1,
        "lr": 5e-3,
        "shard": 0,
        "shards": 3,
        **extra,
    }


def _trainer(base: Path, **extra: Any) -> LoraTrainer:
    trainer = load_trainer(SPEC, _options(base, **extra))
    assert isinstance(trainer, LoraTrainer)
    return trainer


def _round(number: int = 1) -> RoundInfo:
    return RoundInfo(round=number, base_round=number - 1, node_name="test")


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 1000, (4, 20), generator=g)
    ids[:, 0] = 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# --------------------------------------------------------------------------- what is federated


def test_federates_only_adapters_and_head_sorted(base: Path) -> None:
    trainer = _trainer(base)
    model = trainer.build_model()
    names = [name for name, _ in federated_tensors(trainer, model)]
    assert names == sorted(names)
    assert len([n for n in names if "lora_" in n]) == 2 * 2 * 2  # layers x (query, value) x (A, B)
    head = [n for n in names if "lora_" not in n]
    assert head and all(".modules_to_save." in n and "classifier" in n for n in head)
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_head_and_explicit_patterns(base: Path) -> None:
    # The tiny base has a 6-tag head; with labels for 3 classes it is re-initialised, so it must train.
    with pytest.raises(TrainerError, match="train_head = true"):
        _trainer(base, train_head=False).build_model()
    trainer = _trainer(base, labels=None, train_head=False)  # keep the pretrained 6-way head, frozen
    model = trainer.build_model()
    names = [name for name, _ in federated_tensors(trainer, model)]
    assert names and all("lora_" in n for n in names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
    only_a = _trainer(base, federate="*lora_A*")
    names = [name for name, _ in federated_tensors(only_a, only_a.build_model())]
    assert len(names) == 4 and all("lora_A" in n for n in names)
    typo = _trainer(base, federate=["*lora_*", "*scorer*"])
    with pytest.raises(TrainerError, match=r"\*scorer\*"):
        federated_tensors(typo, typo.build_model())


def test_same_seed_same_initial_model(base: Path) -> None:
    """Members only exchange differences, so adapters and the new head must start identical."""
    a = federated_tensors(t := _trainer(base, shard=0), t.build_model())
    b = federated_tensors(u := _trainer(base, shard=2), u.build_model())
    assert [n for n, _ in a] == [n for n, _ in b]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))


def test_training_keeps_the_base_frozen(base: Path) -> None:
    trainer = _trainer(base)
    model = trainer.build_model()
    federated = {n for n, _ in federated_tensors(trainer, model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train(model, _round())
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= federated
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapter really learned
    assert result.num_samples > 100
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(result.metrics)
    examples, evaluation = trainer.evaluate(model)  # the federated evaluation: the val set
    assert examples > 0 and evaluation == pytest.approx(
        {"loss": result.metrics["val_loss"], "accuracy": result.metrics["val_accuracy"]}
    )


def test_base_model_hash(base: Path, tmp_path: Path) -> None:
    copy_dir = tmp_path / "copy"
    shutil.copytree(base, copy_dir)
    trainer = _trainer(copy_dir)
    digest = trainer.base_model_hash()
    assert digest == hash_base_model(base) and len(digest) == 64
    # Tokenizer files are not weights: touching them does not change the hash.
    (copy_dir / "tokenizer_config.json").write_text("{}")
    assert hash_base_model(copy_dir) == digest
    weights = load_file(str(copy_dir / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, str(copy_dir / "model.safetensors"), metadata={"format": "pt"})
    assert hash_base_model(copy_dir) != digest
    assert trainer.base_model_hash() == digest  # computed once, at start
    config = copy_dir / "config.json"
    shutil.copy2(base / "model.safetensors", copy_dir / "model.safetensors")
    assert hash_base_model(copy_dir) == digest
    config.write_text(config.read_text().replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    assert hash_base_model(copy_dir) != digest
    (copy_dir / "model.safetensors").unlink()
    with pytest.raises(TrainerError, match=r"no .*weight files"):
        hash_base_model(copy_dir)


def test_base_model_must_be_a_local_directory(tmp_path: Path) -> None:
    with pytest.raises(TrainerError, match="not a local model directory"):
        LoraTrainer(base_model="bert-base-uncased")
    with pytest.raises(TrainerError, match="not a local model directory"):
        LoraTrainer(base_model=str(tmp_path))


# --------------------------------------------------------------------------- export


def test_export_writes_a_loadable_merged_model(base: Path, tmp_path: Path) -> None:
    trainer = _trainer(base)
    model = trainer.build_model()
    trainer.train(model, _round())
    model.eval()
    batch = _batch()
    with torch.no_grad():
        expected = copy.deepcopy(model).merge_and_unload()(**batch).logits  # type: ignore[operator]
        adapted = model(**batch).logits
    out = tmp_path / "out"
    trainer.export(model, out)
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        logits = loaded(**batch).logits
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(logits, adapted, atol=1e-4)
    assert loaded.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (out / "adapter").iterdir()
    }
    assert (out / "tokenizer.json").exists()
    # Exporting does not merge the live model: it keeps training as a LoRA model.
    assert any("lora_A" in n for n, _ in model.named_parameters())


def _node_config(tmp_path: Path, base: Path, **extra: Any) -> NodeConfig:
    return NodeConfig(
        plugin=SPEC, options=_options(base, **extra), state_dir=tmp_path / "state", insecure=True, name="n"
    )


def test_export_model_from_a_node_checkpoint(base: Path, tmp_path: Path) -> None:
    config = _node_config(tmp_path, base)
    with pytest.raises(ExportError, match="no checkpoint"):
        export_model(config, tmp_path / "out")
    trainer = _trainer(base)
    model = trainer.build_model()
    trainer.train(model, _round())
    tensors = federated_tensors(trainer, model)
    layout = layout_of(tensors, trainer.base_model_hash())
    NodeState(config.state_dir).save(Checkpoint(4, layout.hash, dict(tensors)))
    with pytest.raises(ExportError, match="another model layout"):
        export_model(_node_config(tmp_path, base, r=8), tmp_path / "out")

    out = export_model(config, tmp_path / "out")
    model.eval()
    batch = _batch()
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-4)
    assert '"round": 4' in (out / "cipherhive.json").read_text()


# --------------------------------------------------------------------------- join-time refusals (real server)


@pytest.fixture(scope="module")
def federation(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """A server whose layout is fixed by node-1; node-2 is started by each test with other options."""
    workdir = tmp_path_factory.mktemp("lora-federation")
    fed = LocalFederation(
        workdir,
        nodes=2,
        plugin=SPEC,
        node_options={k: v for k, v in _options(base).items() if "shard" not in k},
    )
    fed.setup()
    fed.start_server()
    fed.wait_serving()
    fed.start_node(0)
    try:
        fed.wait_for(lambda: "joined federation" in fed.log("node-1"), 60, "node-1 to join")
        yield fed
    finally:
        codes = fed.stop_all()
        assert codes.get("server") in (0, None), fed.log("server")


def _refused(fed: LocalFederation, **options: Any) -> str:
    """Start node-2 with other options; it must stop with exit code 2. Returns its new log lines."""
    seen = len(fed.log("node-2"))
    fed.write_node_config(1, **options)
    proc = fed.start_node(1)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    log = fed.log("node-2")[seen:]
    assert code == 2, log
    assert "FAILED_PRECONDITION" in log, log
    return log


@pytest.mark.slow
def test_node_with_another_lora_rank_is_refused_at_join(federation: LocalFederation) -> None:
    log = _refused(federation, r=8)
    assert "layout differs" in log
    assert "lora_A.default.weight[8," in log and "[4," in log  # names the differing tensor


@pytest.mark.slow
def test_node_with_another_base_model_is_refused_at_join(
    federation: LocalFederation, base: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-base"
    model = AutoModelForSequenceClassification.from_pretrained(str(base), local_files_only=True)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[7, 0] += 0.01
    model.save_pretrained(str(other))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(base / name, other / name)
    log = _refused(federation, base_model=str(other), data_options={"tokenizer": str(other)})
    assert "layout differs" in log and "base model hash" in log
    # The node itself is still healthy: the refusal was about the base, not the layout's tensors.
    assert "node-1" in federation.procs and federation.procs["node-1"].poll() is None
