"""The node's durable state: the global model it applied, the chain of rounds behind it, and
what it remembers about rounds (its own submission, the sums it rejected).

Files in ``state_dir``:

* ``checkpoint-<round>.pt`` — the federated tensors after applying that round
  (``{"round", "layout_hash", "tensors"}``, and ``"optimizer"``: the server-side
  optimizer's settings and moments after that round, see
  :mod:`cipherhive.node.sums.optimizers`; absent in checkpoints from before optimizers,
  which were plain FedAvg); the newest ``keep`` are kept so a node can roll back
  when a round it applied is withdrawn, and the moments roll back with the model.
* ``checkpoint.pt`` — the current global model: a hard link to the newest applied
  ``checkpoint-<round>.pt`` (or a copy where links are not supported). Replacing
  it is the *commit point* of applying, rolling back and bootstrapping: the model
  and the round it belongs to live in one file, renamed atomically.
* ``chain.json`` — the rounds the model went through, oldest first: the first
  entry is where the chain starts (0: the trainer's initial model, or the round a
  node was bootstrapped at), each later one a round whose sum was applied. It is
  written right after the commit point; on load it is reconciled with
  ``checkpoint.pt`` (truncated after its round, or extended with it), so a crash
  between the two never leaves them disagreeing.
* ``pending.json`` — the submission id (and, once acknowledged, the receipt and
  this node's weight) of the last upload, so a retry reuses the id and the sum
  check knows the node's own share of the total weight.
* ``rejected.json`` — sums this node rejected, with the reason and the settings
  that rejected them, so a restart does not download and check them again.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cipherhive.runtime.fsutil import atomic_file, atomic_write, fsync_dir

CHECKPOINT = "checkpoint.pt"
CHAIN = "chain.json"
PENDING = "pending.json"
REJECTED = "rejected.json"
#: Rejections remembered at most (newest kept): bounded by the federation's rounds anyway.
MAX_REJECTIONS = 256


def kept_name(round_number: int) -> str:
    return f"checkpoint-{round_number}.pt"


@dataclass
class Checkpoint:
    round: int
    layout_hash: str
    tensors: dict[str, torch.Tensor]
    #: The optimizer's state after this round (:meth:`ServerOptimizer.record`); None: not recorded.
    optimizer: dict[str, Any] | None = None
    #: The chain hash after this round (:mod:`cipherhive.secagg.chain`); empty in checkpoints from
    #: before masked rounds, which cannot enrol (bootstrap from a member's export instead).
    chain_hash: str = ""


def read_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint file (``weights_only``: a file from elsewhere cannot run code)."""
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(data, dict) or not {"round", "layout_hash", "tensors"} <= set(data):
        raise ValueError(f"{path} is not a cipherhive checkpoint (round, layout_hash, tensors)")
    optimizer = data.get("optimizer")
    return Checkpoint(
        int(data["round"]),
        str(data["layout_hash"]),
        dict(data["tensors"]),
        dict(optimizer) if isinstance(optimizer, dict) else None,
        str(data.get("chain_hash", "")),
    )


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Streamed to a temporary file, fsynced, renamed: no in-memory copy of the model."""
    data: dict[str, Any] = {
        "round": checkpoint.round,
        "layout_hash": checkpoint.layout_hash,
        "tensors": {k: v.detach() for k, v in checkpoint.tensors.items()},
    }
    if checkpoint.optimizer is not None:
        data["optimizer"] = checkpoint.optimizer
    if checkpoint.chain_hash:
        data["chain_hash"] = checkpoint.chain_hash
    with atomic_file(path, mode=0o600) as fh:
        torch.save(data, fh)


class NodeState:
    def __init__(self, directory: Path, keep: int = 5) -> None:
        self.dir = directory
        self.keep = max(1, keep)
        directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ model and chain

    def load(self) -> Checkpoint | None:
        """The current global model (None: the trainer's initial model), chain reconciled."""
        path = self.dir / CHECKPOINT
        current = read_checkpoint(path) if path.exists() else None
        self._reconcile(current.round if current else 0)
        if current is not None and not (self.dir / kept_name(current.round)).exists():
            self._link(path, self.dir / kept_name(current.round))  # a state dir from before the chain
        return current

    def chain(self) -> list[int]:
        path = self.dir / CHAIN
        if not path.exists():
            return [0]
        rounds = [int(r) for r in json.loads(path.read_text())["rounds"]]
        return rounds or [0]

    def save(self, checkpoint: Checkpoint) -> None:
        """Record a newly applied round: kept file, commit (``checkpoint.pt``), chain, prune."""
        kept = self.dir / kept_name(checkpoint.round)
        write_checkpoint(kept, checkpoint)
        self._commit(kept)
        chain = [r for r in self.chain() if r < checkpoint.round] + [checkpoint.round]
        self._write_chain(chain)
        self._prune(chain)
        self._drop_rejections(lambda r: r <= checkpoint.round)

    def rollback_target(self, withdrawn: int) -> int | None:
        """The newest round before ``withdrawn`` this node can return to, or None."""
        chain = self.chain()
        for r in reversed(chain):
            if r >= withdrawn:
                continue
            if r == 0 and chain[0] == 0:
                return 0  # the trainer rebuilds the initial model
            if (self.dir / kept_name(r)).exists():
                return r
        return None

    def rollback(self, target: int) -> Checkpoint | None:
        """Make ``target`` the current round (atomically); None means the initial model."""
        if target == 0:
            path = self.dir / CHECKPOINT
            if path.exists():
                path.unlink()
                fsync_dir(self.dir)
            checkpoint = None
        else:
            kept = self.dir / kept_name(target)
            checkpoint = read_checkpoint(kept)
            self._commit(kept)
        chain = [r for r in self.chain() if r <= target] or [target]
        self._write_chain(chain)
        self._prune(chain)
        return checkpoint

    def install(self, checkpoint: Checkpoint) -> None:
        """Bootstrap: ``checkpoint`` becomes the start of a new chain; old memory is dropped."""
        for path in self.dir.glob("checkpoint-*.pt"):
            path.unlink()
        kept = self.dir / kept_name(checkpoint.round)
        write_checkpoint(kept, checkpoint)
        self._commit(kept)
        self._write_chain([checkpoint.round])
        for name in (PENDING, REJECTED):
            (self.dir / name).unlink(missing_ok=True)
        fsync_dir(self.dir)

    def _commit(self, kept: Path) -> None:
        tmp = self.dir / f".{CHECKPOINT}.{secrets.token_hex(4)}.tmp"
        self._link(kept, tmp)
        os.replace(tmp, self.dir / CHECKPOINT)
        fsync_dir(self.dir)

    @staticmethod
    def _link(src: Path, dst: Path) -> None:
        try:
            os.link(src, dst)
        except OSError:
            with atomic_file(dst) as fh, open(src, "rb") as source:
                while data := source.read(1 << 20):
                    fh.write(data)

    def _write_chain(self, rounds: list[int]) -> None:
        atomic_write(self.dir / CHAIN, json.dumps({"rounds": rounds}).encode())

    def _reconcile(self, current: int) -> None:
        if not (self.dir / CHAIN).exists():
            # A new state directory, or one from before the chain: its history is unknown,
            # so the chain starts at its checkpoint (0: the trainer's initial model).
            self._write_chain([current])
            return
        chain = self.chain()
        if current in chain:
            fixed = chain[: chain.index(current) + 1]
        elif current > chain[-1]:
            fixed = [*chain, current]
        else:
            fixed = [current]
        if fixed != chain:
            self._write_chain(fixed)

    def _prune(self, chain: list[int]) -> None:
        keep = set(chain[-self.keep :])
        for path in self.dir.glob("checkpoint-*.pt"):
            try:
                number = int(path.stem.split("-", 1)[1])
            except ValueError:
                continue
            if number not in keep:
                path.unlink()

    # ------------------------------------------------------------ submissions

    def submission_id(self, round_number: int) -> str:
        """The id for this round's upload: reused across retries, new for a new round."""
        data = self._pending()
        if data.get("round") == round_number:
            return str(data["submission_id"])
        sid = secrets.token_hex(16)
        atomic_write(self.dir / PENDING, json.dumps({"round": round_number, "submission_id": sid}).encode())
        return sid

    def submitted_round(self) -> int:
        """The round of the last upload the server acknowledged (0: none)."""
        data = self._pending()
        return int(data["round"]) if data.get("receipt") else 0

    def own_weight(self, round_number: int) -> float:
        """This node's FedAvg weight in ``round_number`` if it contributed (0.0: it did not)."""
        data = self._pending()
        if data.get("round") == round_number and data.get("receipt"):
            return float(data.get("weight", 0.0))
        return 0.0

    def mark_submitted(
        self, round_number: int, submission_id: str, receipt: str, weight: float = 0.0
    ) -> None:
        record = {"round": round_number, "submission_id": submission_id, "receipt": receipt, "weight": weight}
        atomic_write(self.dir / PENDING, json.dumps(record).encode())

    def _pending(self) -> dict[str, Any]:
        path = self.dir / PENDING
        return dict(json.loads(path.read_text())) if path.exists() else {}

    # ------------------------------------------------------------ rejected sums

    def rejections(self) -> dict[int, dict[str, Any]]:
        path = self.dir / REJECTED
        if not path.exists():
            return {}
        return {int(k): dict(v) for k, v in json.loads(path.read_text()).items()}

    def remember_rejection(self, round_number: int, reason: str, message: str, checks: str) -> None:
        data = self.rejections()
        data[round_number] = {"reason": reason, "message": message, "checks": checks, "reported": False}
        self._write_rejections(data)

    def mark_reported(self, round_number: int) -> None:
        data = self.rejections()
        if round_number in data:
            data[round_number]["reported"] = True
            self._write_rejections(data)

    def forget_rejection(self, round_number: int) -> None:
        self._drop_rejections(lambda r: r == round_number)

    def _drop_rejections(self, which: Any) -> None:
        data = self.rejections()
        kept = {r: v for r, v in data.items() if not which(r)}
        if kept != data:
            self._write_rejections(kept)

    def _write_rejections(self, data: dict[int, dict[str, Any]]) -> None:
        newest = dict(sorted(data.items())[-MAX_REJECTIONS:])
        atomic_write(self.dir / REJECTED, json.dumps({str(k): v for k, v in newest.items()}).encode())
