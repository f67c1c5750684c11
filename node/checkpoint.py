"""The node's durable state: the global model it last applied, written atomically.

``checkpoint.pt`` holds the federated tensors after the last applied sum and
that round's number; a node killed at any moment restarts from it and
replays the sums it missed. ``pending.json`` remembers the submission id of
an upload in progress so a retry after a reconnect reuses it and the server
counts the update once.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from cipherhive.fsutil import atomic_file, atomic_write

CHECKPOINT = "checkpoint.pt"
PENDING = "pending.json"


@dataclass
class Checkpoint:
    round: int
    layout_hash: str
    tensors: dict[str, torch.Tensor]


class NodeState:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def load(self) -> Checkpoint | None:
        path = self.dir / CHECKPOINT
        if not path.exists():
            return None
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return Checkpoint(int(data["round"]), str(data["layout_hash"]), dict(data["tensors"]))

    def save(self, checkpoint: Checkpoint) -> None:
        """Streamed to a temporary file, fsynced, renamed: no in-memory copy of the model."""
        with atomic_file(self.dir / CHECKPOINT, mode=0o600) as fh:
            torch.save(
                {
                    "round": checkpoint.round,
                    "layout_hash": checkpoint.layout_hash,
                    "tensors": {k: v.detach() for k, v in checkpoint.tensors.items()},
                },
                fh,
            )

    def submission_id(self, round_number: int) -> str:
        """The id for this round's upload: reused across retries, new for a new round."""
        path = self.dir / PENDING
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("round") == round_number:
                return str(data["submission_id"])
        sid = secrets.token_hex(16)
        atomic_write(path, json.dumps({"round": round_number, "submission_id": sid}).encode())
        return sid

    def submitted_round(self) -> int:
        """The round of the last upload the server acknowledged (0: none)."""
        path = self.dir / PENDING
        if not path.exists():
            return 0
        data = json.loads(path.read_text())
        return int(data["round"]) if data.get("receipt") else 0

    def mark_submitted(self, round_number: int, submission_id: str, receipt: str) -> None:
        atomic_write(
            self.dir / PENDING,
            json.dumps({"round": round_number, "submission_id": submission_id, "receipt": receipt}).encode(),
        )
