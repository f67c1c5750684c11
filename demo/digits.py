"""A complete trainer plug-in: a small classifier on scikit-learn's handwritten digits.

Each member holds a different, label-skewed slice of the training set (a
Dirichlet split over the classes, concentration 0.5), as real members'
data would be. The split is computed from the seed alone, so every process
agrees on it without exchanging data. This is also the worked example of
the trainer interface in docs/how-to/data-scientist.md.

Under differential privacy (``info.privacy`` set: `cipherhive demo --dp`) a
round is record-level DP-SGD through the helper
:func:`cipherhive.node.dp_sgd.private_training`, with plain SGD at ``dp_lr``:
the schedule's Poisson-sampled steps replace epochs and batches.

**Validation.** Each member's validation data (``evaluate``, the federated
evaluation) is a disjoint slice of the held-out test set: member k of K holds
rows k, k + K, … of it. Together they are exactly the demo's test set, so the
federated accuracy of a round's base model equals the test accuracy the demo
measured for that model (to CKKS error and rounding), which makes it easy to
check; the training data is unchanged by it.

**Client drift.** ``proximal_mu`` > 0 trains FedProx's proximal objective (Li et al.,
MLSys 2020) through :mod:`cipherhive.node.training.drift`, with and without DP;
``scaffold = true`` trains with SCAFFOLD's control variates (Karimireddy et al., ICML 2020),
which adds a control block to the layout (every member must set it alike). With momentum
0.9 the control variates are computed with the effective step ``lr / (1 - 0.9)``.

``record_dir`` is for the demo only: it lets the demo, which runs every
party itself, compare the decrypted average with the plaintext one (and the
federated evaluation with the members' own, in ``shard-K.evaluations.jsonl``).
A real node never writes its update or its own evaluation anywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cipherhive.federation.layout import CONTROL_PREFIX
from cipherhive.node.trainer import AppliedRound, RoundInfo, TrainResult
from cipherhive.node.training.drift import ProximalTerm, Scaffold, ScaffoldRound, check_mu, scaffold_lr

MOMENTUM = 0.9
TEST_FRACTION = 0.25
DIRICHLET_ALPHA = 0.5
MIN_SHARD = 30


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    shards: list[np.ndarray]


def load_data(shards: int, seed: int) -> DigitsData:
    """Held-out test set plus a label-skewed split of the rest into ``shards`` members."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(shards)]
        for label in range(10):
            idx = rng.permutation(np.flatnonzero(y_train == label))
            share = rng.dirichlet([DIRICHLET_ALPHA] * shards)
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for member, piece in enumerate(np.split(idx, cuts)):
                parts[member].extend(piece.tolist())
        if min(len(p) for p in parts) >= MIN_SHARD:
            break
    return DigitsData(x_train, y_train, x_test, y_test, [np.array(sorted(p)) for p in parts])


def build_model(seed: int, hidden: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


class DigitsTrainer:
    """Trains on one member's shard. Options come from the node's ``[trainer] options``."""

    def __init__(
        self,
        shard: int = 0,
        shards: int = 3,
        seed: int = 0,
        epochs: int = 5,
        lr: float = 0.05,
        batch_size: int = 32,
        record_dir: str = "",
        hidden: int = 64,
        dp_lr: float = 0.5,
        proximal_mu: float = 0.0,
        scaffold: bool = False,
    ) -> None:
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
        self.seed, self.epochs, self.lr, self.batch_size = seed, epochs, lr, batch_size
        self.hidden, self.dp_lr = hidden, dp_lr
        self.proximal_mu = check_mu(proximal_mu)
        self.scaffold = Scaffold() if scaffold else None
        # One thread: training is then bit-for-bit repeatable, so a node that retrains a
        # round after a crash sends the same update (the fault-injection tests rely on it).
        torch.set_num_threads(1)
        data = load_data(shards, seed)
        rows = data.shards[shard]
        self.x = torch.from_numpy(data.x_train[rows])
        self.y = torch.from_numpy(data.y_train[rows]).long()
        self.x_val = data.x_test[shard::shards]
        self.y_val = data.y_test[shard::shards]
        self.shard = shard
        self.record_dir = Path(record_dir) if record_dir else None
        self._applied = 0  # the last round applied: the model evaluate() sees next

    def build_model(self) -> nn.Module:
        return build_model(self.seed, self.hidden)

    def federated_tensors(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """Every parameter (the node's default); with SCAFFOLD, then their control variates."""
        params: list[tuple[str, torch.Tensor]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad
        ]
        tensors = params + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        return tensors if self.scaffold is None else tensors + self.scaffold.control_tensors(params)

    def attach_state_dir(self, state_dir: str) -> None:
        """The node's state directory, where SCAFFOLD keeps this member's control variate."""
        if self.scaffold is not None:
            self.scaffold.attach_state_dir(state_dir)

    def train(self, model: nn.Module, info: RoundInfo) -> TrainResult:
        start = _flat(model) if self.record_dir else None
        if info.privacy is not None:
            result = self._train_private(model, info)
            if self.record_dir is not None and start is not None:
                self._record(info.round, start, model, 1)  # uniform weights under DP
            return result
        generator = torch.Generator().manual_seed(self.seed * 1000 + info.round * 10 + self.shard)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=MOMENTUM)
        prox = ProximalTerm(model.parameters(), self.proximal_mu)
        scaffold = self._begin_scaffold(model, info)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        total_loss = 0.0
        for _ in range(self.epochs):
            order = torch.randperm(len(self.y), generator=generator)
            total_loss = 0.0
            for begin in range(0, len(order), self.batch_size):
                if info.should_stop():
                    # The node discards this result (nothing partial is uploaded): return at once.
                    return TrainResult(num_samples=0)
                batch = order[begin : begin + self.batch_size]
                optimizer.zero_grad()
                loss = loss_fn(model(self.x[batch]), self.y[batch])
                loss.backward()
                prox.apply()
                if scaffold is not None:
                    scaffold.apply()
                optimizer.step()
                total_loss += float(loss) * len(batch)
        if scaffold is not None:
            scaffold.finish(scaffold_lr("sgd", self.lr, MOMENTUM))
        n = len(self.y)
        acc = accuracy(model, self.x.numpy(), self.y.numpy())
        if self.record_dir is not None and start is not None:
            self._record(info.round, start, model, n)
        return TrainResult(num_samples=n, metrics={"loss": total_loss / n, "accuracy": acc})

    def _train_private(self, model: nn.Module, info: RoundInfo) -> TrainResult:
        """One round of DP-SGD: the helper's Poisson loader, clipping and noise; no momentum."""
        from torch.utils.data import TensorDataset

        from cipherhive.node.dp_sgd import private_training

        optimizer = torch.optim.SGD(model.parameters(), lr=self.dp_lr)
        prox = ProximalTerm(model.parameters(), self.proximal_mu)
        scaffold = self._begin_scaffold(model, info)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        with private_training(model, optimizer, TensorDataset(self.x, self.y), info.privacy) as dp:
            if prox.active:
                dp.add_gradient_correction(prox.apply)
            if scaffold is not None:
                dp.add_gradient_correction(scaffold.apply)  # after clipping and noise
            for inputs, target in dp.loader:
                if info.should_stop():
                    return TrainResult(num_samples=0)
                dp.optimizer.zero_grad()
                loss_fn(dp.model(inputs), target).backward()
                dp.optimizer.step()
        if scaffold is not None:
            scaffold.finish(self.dp_lr)
        # Accuracy on the member's own training data: it stays in the node's log.
        return TrainResult(len(self.y), {"accuracy": accuracy(model, self.x.numpy(), self.y.numpy())})

    def _begin_scaffold(self, model: nn.Module, info: RoundInfo) -> ScaffoldRound | None:
        if self.scaffold is None:
            return None
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.scaffold.control_tensors(params)
        return self.scaffold.begin(params, info.round, info.base_round)

    def _record(self, round_number: int, start: torch.Tensor, model: nn.Module, weight: int) -> None:
        assert self.record_dir is not None
        _save(
            self.record_dir / f"round-{round_number}" / f"shard-{self.shard}.update.pt",
            {"global": start, "local": _flat(model), "samples": weight},
        )

    def evaluate(self, model: nn.Module) -> tuple[int, dict[str, float]]:
        """Mean cross-entropy and accuracy of ``model`` on this member's validation slice."""
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(self.x_val))
            target = torch.from_numpy(self.y_val).long()
            loss = float(nn.functional.cross_entropy(logits, target))
            acc = float((logits.argmax(dim=1) == target).double().mean())
        n = len(self.y_val)
        if self.record_dir is not None:
            line = json.dumps({"base_round": self._applied, "examples": n, "loss": loss, "accuracy": acc})
            self.record_dir.mkdir(parents=True, exist_ok=True)
            with open(self.record_dir / f"shard-{self.shard}.evaluations.jsonl", "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        return n, {"loss": loss, "accuracy": acc}

    def after_round(self, model: nn.Module, applied: AppliedRound) -> None:
        self._applied = applied.round
        if self.record_dir is not None:
            mean = torch.cat(
                [t.reshape(-1) for n, t in applied.mean_update.items() if not n.startswith(CONTROL_PREFIX)]
            )
            _save(
                self.record_dir / f"round-{applied.round}" / f"shard-{self.shard}.applied.pt",
                {
                    "mean": mean,
                    "global": _flat(model),
                    "participants": applied.participants,
                    "federated_eval": applied.federated_eval,
                },
            )


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _save(path: Path, data: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = math.prod(p.shape)
            p.copy_(flat[offset : offset + n].reshape(p.shape).to(p.dtype))
            offset += n
