"""`cipherhive demo --task lora`: federated LoRA fine-tuning of a pretrained transformer, checked.

Takes the real pretrained all-MiniLM-L6-v2 and the BBC News articles from
their packages (``--quick``: builds a tiny pretrained base and a synthetic
task instead; see ``lora_task``), then runs a real
federation — one server, ``--nodes`` node processes, mutual TLS — whose
members fine-tune only LoRA adapters and the classification head on their
label-skewed shards. After every round it evaluates the global model (from
the adapter history node-1 writes) on a held-out test set, and reads what
each node uploaded from the server's round list. Then, as the yardstick, it
fine-tunes the same adapters on all the members' data in one place for the
same number of epochs. The demo runs every party itself, so it can compare;
no real member sees another's data.

``--dp`` runs it with record-level DP-SGD in every member (Opacus per-record
gradients on the adapters and the head only; the frozen base needs none): the
server announces :func:`lora_schedule` calibrated to ``--epsilon`` over the
run's rounds, every node gets exactly that budget and a fresh ledger, and the
table adds each member's ε so far, computed from the public schedule. The
centralized yardstick stays the non-private one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cipherhive.ckks import codec
from cipherhive.demo.federation import LocalFederation
from cipherhive.demo.lora_task import NEWS_MAX_LEN as NEWS_MAX_LEN_DEFAULT
from cipherhive.demo.lora_task import NEWS_TEST as NEWS_TEST_DEFAULT
from cipherhive.demo.lora_task import (
    NEWS_TOPICS,
    PRETRAINED_DIST,
    PRETRAINED_NAME,
    PRETRAINED_SHA256,
    SENTIMENTS,
    PretrainedModelError,
    create_base_model,
    held_out_data,
    label_counts,
    pretrained_dir,
)
from cipherhive.demo.options import optimizer_section
from cipherhive.federation.layout import LEADING_VALUES
from cipherhive.federation.optimizer_settings import OptimizerSpec
from cipherhive.node.config import NodeConfig
from cipherhive.node.export import export_model
from cipherhive.node.trainer import RoundInfo
from cipherhive.node.trainers.lora import LoraTrainer, evaluate
from cipherhive.privacy.accountant import noise_multiplier_for
from cipherhive.privacy.schedule import PrivacySchedule
from cipherhive.runtime.config import load as load_config
from cipherhive.runtime.fsutil import removed_on_error
from cipherhive.v1 import federation_pb2 as pb

PLUGIN = "cipherhive.node.trainers.lora:LoraTrainer"

#: The LoRA demo's public DP schedule: every record joins a batch with probability 0.2 (about 57 to 148
#: of the demo members' 286-742 training records at seed 0), 30 steps a round, clipping norm 1,
#: δ = 1e-5; AdamW at a higher learning rate than without DP. Chosen in one process at ε = 8 over
#: 10 rounds (final accuracy, seed 0 / seed 1): q 0.1 lr 1e-2 0.875 / 0.70 (the federated run),
#: q 0.1 lr 3e-2 0.86 / 0.81, q 0.2 lr 2e-2 0.88 / 0.84, q 0.2 lr 3e-2 - / 0.85.
DP_SAMPLE_RATE = 0.2
DP_STEPS_PER_ROUND = 30
DP_MAX_GRAD_NORM = 1.0
DP_LR = 2e-2
DELTA = 1e-5


def lora_schedule(epsilon: float, rounds: int, delta: float = DELTA) -> PrivacySchedule:
    """The LoRA demo's schedule with the noise calibrated so that ``rounds`` rounds cost ``epsilon``."""
    z = noise_multiplier_for(epsilon, delta, DP_SAMPLE_RATE, rounds * DP_STEPS_PER_ROUND)
    return PrivacySchedule("record", rounds, DP_SAMPLE_RATE, z, DP_STEPS_PER_ROUND, DP_MAX_GRAD_NORM)


#: The real run, sized to finish within 25 minutes on 2 busy cores (measured in docs/tutorials/demo.md):
#: 1,200 of the 2,125 distinct articles for the members (15 % of them validation), 500 held out, the
#: first 64 tokens of each, LoRA r=8 on query and value plus the head, one local epoch a round.
NEWS_TRAIN, NEWS_TEST, NEWS_MAX_LEN = 1200, NEWS_TEST_DEFAULT, NEWS_MAX_LEN_DEFAULT
#: Local epochs per round and the time limit: the real model's (one epoch of a 22.7 M-weight
#: transformer takes as long as many of the tiny one's) and the --quick run's.
EPOCHS, QUICK_EPOCHS = 1, 5
TIMEOUT, QUICK_TIMEOUT = 1800.0, 600.0


@dataclass(frozen=True)
class Setup:
    """Which base and task a LoRA demo run uses, and how it fine-tunes them."""

    base_dir: Path
    labels: tuple[str, ...]
    data_options: dict[str, Any] = field(default_factory=dict)
    r: int = 8
    lora_alpha: int = 16
    lr: float = 2e-3
    batch_size: int = 16
    #: Checked by every member before it loads the weights (the demo checks them first, too).
    sha256: str = ""


def real_setup() -> Setup:
    """all-MiniLM-L6-v2 from its package (weights' SHA-256 checked) on BBC News topics."""
    base = pretrained_dir()
    data = {
        "tokenizer": str(base),
        "task": "news",
        "max_len": NEWS_MAX_LEN,
        "n_train": NEWS_TRAIN,
        "n_test": NEWS_TEST,
    }
    return Setup(base, NEWS_TOPICS, data, sha256=PRETRAINED_SHA256)


def quick_setup(base_dir: Path) -> Setup:
    """The tiny base ``create_base_model`` wrote to ``base_dir``, on the synthetic sentiment task."""
    return Setup(base_dir, SENTIMENTS, {"tokenizer": str(base_dir)}, r=4, lora_alpha=8, batch_size=32)


def trainer_options(setup: Setup, seed: int, epochs: int) -> dict[str, Any]:
    """The [trainer] options every member gets (LocalFederation adds shard and shards)."""
    return {
        "base_model": str(setup.base_dir),
        "data": "cipherhive.demo.lora_task:member_data",
        "data_options": setup.data_options,
        "labels": ",".join(setup.labels),
        "r": setup.r,
        "lora_alpha": setup.lora_alpha,
        "target_modules": "query,value",
        "train_head": True,
        "seed": seed,
        "epochs": epochs,
        "lr": setup.lr,
        "batch_size": setup.batch_size,
        "threads": 1,
        **({"base_model_sha256": setup.sha256} if setup.sha256 else {}),
    }


def _history(workdir: Path, node: str, number: int) -> Path:
    return workdir / "history" / node / f"round-{number:04d}.safetensors"


def _load_into(tensors: list[tuple[str, torch.Tensor]], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in tensors:
            tensor.copy_(values[name])


def _centralized(options: dict[str, Any], rounds: int, test: Any) -> list[float]:
    """The same adapters trained on everyone's data in one place, evaluated after each round's epochs."""
    trainer = LoraTrainer(**{**options, "threads": 0}, shard=0, shards=1)
    model = trainer.build_model()
    out = []
    for number in range(1, rounds + 1):
        trainer.train(model, RoundInfo(number, number - 1, "centralized"))
        out.append(round(evaluate(model, test)["accuracy"], 4))
    return out


def run_lora_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    quick = getattr(args, "quick", False)
    if getattr(args, "epochs", None) is None:
        args.epochs = QUICK_EPOCHS if quick else EPOCHS
    if getattr(args, "timeout", None) is None:
        args.timeout = QUICK_TIMEOUT if quick else TIMEOUT
    if not quick:
        try:
            pretrained_dir()
        except PretrainedModelError as exc:
            print(f"cipherhive demo: error: {exc}", file=sys.stderr)
            return 2
    workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="cipherhive-lora-"))
    with removed_on_error(workdir, keep=args.workdir is not None):
        return _lora_demo(args, workdir, started)


def _lora_demo(args: argparse.Namespace, workdir: Path, started: float) -> int:
    say = (lambda *a: None) if args.json else print
    workdir.mkdir(parents=True, exist_ok=True)
    pretraining: dict[str, Any]
    if getattr(args, "quick", False):
        base_dir = workdir / "base-model"
        pretraining = {"model": "tiny synthetic BERT", "reused": True}
        if not (base_dir / "config.json").exists():
            pre = create_base_model(base_dir, seed=args.seed)
            pretraining.update(
                reused=False, steps=pre.steps, tag_accuracy=pre.tag_accuracy, seconds=pre.seconds
            )
            say(
                f"base model: small BERT pretrained to tag word categories in {pre.seconds:.1f}s "
                f"({pre.steps} steps, tag accuracy {pre.tag_accuracy:.3f}) -> {base_dir}"
            )
        else:
            say(f"base model: reusing {base_dir}")
        setup = quick_setup(base_dir)
        task = "synthetic sentiment,"
    else:
        setup = real_setup()
        pretraining = {"model": PRETRAINED_NAME, "package": PRETRAINED_DIST, "dir": str(setup.base_dir)}
        say(f"base model: {PRETRAINED_NAME} from {PRETRAINED_DIST} (SHA-256 checked) -> {setup.base_dir}")
        task = f"BBC News topic (first {setup.data_options['max_len']} tokens),"
    base_dir = setup.base_dir
    data = {k: v for k, v in setup.data_options.items() if k != "tokenizer"}
    split = {k: v for k, v in data.items() if k != "max_len"}
    options = trainer_options(setup, args.seed, args.epochs)
    schedule = lora_schedule(args.epsilon, args.rounds) if getattr(args, "dp", False) else None
    node_options = options if schedule is None else {**options, "lr": DP_LR}
    test = held_out_data(str(base_dir), args.seed, **data)
    probe = LoraTrainer(**{**options, "threads": 0}, shard=0, shards=args.nodes)
    model = probe.build_model()
    tensors = probe.federated_tensors(model)
    num_values = sum(t.numel() for _, t in tensors)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # The pretrained encoder alone: not the adapters, nor either copy of the new head.
    base_parameters = sum(
        p.numel() for n, p in model.named_parameters() if "lora_" not in n and "classifier" not in n
    )
    pretraining["parameters"] = base_parameters
    initial = round(evaluate(model, test)["accuracy"], 4)
    say(
        f"task: {len(setup.labels)}-way {task} {len(test)} held-out test texts; "
        f"train examples per member by label {label_counts(args.nodes, args.seed, **split)}"
    )
    say(
        f"federated: {len(tensors)} tensors, {num_values} values (LoRA r={setup.r} on query/value + head; "
        f"{frozen:,} weights frozen, {base_parameters:,} in the pretrained base) -> "
        f"{codec.num_ciphertexts(num_values + LEADING_VALUES)} ciphertext(s) per update"
    )
    say(f"work directory: {workdir}  ({'no TLS' if args.insecure else 'mutual TLS'})")
    spec = OptimizerSpec.make(args.optimizer, args.server_lr)
    say(f"server-side optimizer (run on every node): {spec.describe()}")
    if schedule is not None:
        say(
            f"differential privacy: {schedule.describe()}, AdamW lr {DP_LR:g}; each member's ε at "
            f"δ = {DELTA:g} below (the centralized column is without DP)"
        )
    say(f"initial test accuracy: {initial:.3f}")

    fed = LocalFederation(
        workdir,
        nodes=args.nodes,
        insecure=args.insecure,
        plugin=PLUGIN,
        node_options=node_options,
        rounds={"max_rounds": args.rounds},
        optimizer=optimizer_section(args),
    )
    if schedule is not None:
        fed.server_privacy = {
            "dp_mode": schedule.mode,
            "dp_rounds": schedule.rounds,
            "dp_sample_rate": schedule.sample_rate,
            "dp_noise_multiplier": schedule.noise_multiplier,
            "dp_steps_per_round": schedule.steps_per_round,
            "dp_max_grad_norm": schedule.max_grad_norm,
        }
        fed.node_privacy = {"max_epsilon": args.epsilon, "delta": DELTA}
    names = [fed.node_name(i) for i in range(args.nodes)]
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    t_fed = time.monotonic()
    try:
        fed.setup()
        for i, name in enumerate(names):
            fed.write_node_config(i, history_dir=str(workdir / "history" / name))
        fed.start()
        last = time.monotonic()
        for number in range(1, args.rounds + 1):
            remaining = args.timeout - (time.monotonic() - started)
            info = fed.wait_round(number, remaining)
            if info.state == pb.ROUND_FAILED:
                failed.append(f"round {number}: {info.reason}")
                break
            fed.wait_for(
                lambda n=number: all(_history(workdir, name, n).exists() for name in names),
                max(remaining, 1.0),
                f"every node to apply round {number}",
            )
            states = [load_file(str(_history(workdir, name, number))) for name in names]
            spread = max(
                float((s[k].double() - states[0][k].double()).abs().max()) for s in states for k in states[0]
            )
            _load_into(tensors, states[0])
            rows.append(
                {
                    "round": number,
                    "participants": info.participants,
                    "federated_accuracy": round(evaluate(model, test)["accuracy"], 4),
                    "bytes_per_node": {
                        s.node_name: int(s.num_bytes)
                        for s in sorted(info.submissions, key=lambda s: s.node_name)
                    },
                    "node_model_spread": spread,
                    "seconds": round(time.monotonic() - last, 2),
                }
            )
            if schedule is not None:
                # From the public schedule alone: every member trained once per round so far.
                rows[-1]["epsilon"] = round(schedule.epsilon(DELTA, rounds=number), 3)
            last = time.monotonic()
    except (TimeoutError, RuntimeError) as exc:
        failed.append(str(exc))
    finally:
        codes = fed.stop_all()
    bad_exits = {k: c for k, c in codes.items() if c not in (0, None)}
    if bad_exits:
        failed.append(f"processes exited uncleanly: {bad_exits}")
    fed_seconds = round(time.monotonic() - t_fed, 2)

    export: dict[str, Any] = {}
    if rows and not failed:
        node_config = load_config(NodeConfig, argparse.Namespace(config=workdir / f"{names[0]}.toml"), {})
        out = export_model(node_config, workdir / "export")
        from transformers import AutoModelForSequenceClassification

        merged = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True)
        export = {"accuracy": round(evaluate(merged, test)["accuracy"], 4)}
        if args.workdir is not None:
            export["dir"] = str(out)

    t_central = time.monotonic()
    central = _centralized(options, len(rows), test) if rows else []
    for row, accuracy in zip(rows, central, strict=True):
        row["centralized_accuracy"] = accuracy
    central_seconds = round(time.monotonic() - t_central, 2)

    result = {
        "task": "lora",
        "nodes": args.nodes,
        "optimizer": spec.canonical_dict(),
        "epochs_per_round": args.epochs,
        "pretraining": pretraining,
        "base_parameters": base_parameters,
        "data": task.rstrip(","),
        "labels": list(setup.labels),
        "test_examples": len(test),
        "federated_tensors": len(tensors),
        "federated_values": num_values,
        "ciphertexts_per_update": codec.num_ciphertexts(num_values + LEADING_VALUES),
        "initial_accuracy": initial,
        "rounds": rows,
        "final_accuracy": rows[-1]["federated_accuracy"] if rows else 0.0,
        "final_centralized_accuracy": central[-1] if central else 0.0,
        "export": export,
        "privacy": None
        if schedule is None
        else {
            "mode": schedule.mode,
            "delta": DELTA,
            "epsilon": rows[-1]["epsilon"] if rows else 0.0,
            "noise_multiplier": schedule.noise_multiplier,
            "sample_rate": schedule.sample_rate,
            "steps_per_round": schedule.steps_per_round,
            "max_grad_norm": schedule.max_grad_norm,
            "lr": DP_LR,
        },
        "federation_seconds": fed_seconds,
        "centralized_seconds": central_seconds,
        "seconds": round(time.monotonic() - started, 2),
        "workdir": str(workdir),
        "errors": failed,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        header = ("round", 5), ("nodes", 5), ("federated", 9), ("centralized", 11), ("bytes/node", 13)
        eps_head = f" {'epsilon':>7}" if schedule is not None else ""
        print(" ".join(f"{name:>{width}}" for name, width in header), f"{'seconds':>7}{eps_head}")
        for row in rows:
            sizes = sorted(row["bytes_per_node"].values())
            shown = f"{sizes[0]:,}" if sizes[0] == sizes[-1] else f"{sizes[0]:,}-{sizes[-1]:,}"
            print(
                f"{row['round']:>5} {row['participants']:>5} {row['federated_accuracy']:>9.3f} "
                f"{row.get('centralized_accuracy', float('nan')):>11.3f} {shown:>13} {row['seconds']:>7.1f}"
                + (f" {row['epsilon']:>7.2f}" if "epsilon" in row else "")
            )
        if export:
            where = f" in {export['dir']}" if "dir" in export else ""
            print(f"exported merged model (round {len(rows)}){where}: test accuracy {export['accuracy']:.3f}")
        print(
            f"final test accuracy: federated {result['final_accuracy']:.3f}"
            + (f" at ε = {rows[-1]['epsilon']:.2f}" if schedule is not None and rows else "")
            + f", centralized {result['final_centralized_accuracy']:.3f}, after {len(rows)} rounds x "
            + (f"{schedule.steps_per_round} DP steps" if schedule is not None else f"{args.epochs} epochs")
            + (f" (centralized: {args.epochs} epochs, no DP)" if schedule is not None else "")
            + f"; {result['seconds']:.1f}s in all (federation {fed_seconds:.1f}s, "
            f"centralized {central_seconds:.1f}s)"
        )
        for problem in failed:
            print(f"error: {problem}", file=sys.stderr)
    if not failed and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failed:
        print(f"logs kept in {workdir}", file=sys.stderr)
    return 1 if failed or len(rows) < args.rounds else 0
