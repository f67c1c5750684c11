"""A trainer plug-in whose "training" adds a reproducible random update: the benchmark's load.

Its update for (round, shard) is drawn from a seed, so the benchmark knows
every member's update without any member writing it anywhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cipherhive.node.trainer import AppliedRound, RoundInfo, TrainResult

MAGNITUDE = 0.05


_CHUNK = 1 << 20


def member_update_chunks(params: int, seed: int, round_number: int, shard: int) -> Iterator[np.ndarray]:
    """The update in float32 chunks, so a 100 M-parameter update never exists twice."""
    rng = np.random.default_rng([seed, round_number, shard])
    for start in range(0, params, _CHUNK):
        chunk = rng.standard_normal(min(_CHUNK, params - start), dtype=np.float32)
        chunk *= MAGNITUDE
        yield chunk


def member_update(params: int, seed: int, round_number: int, shard: int) -> np.ndarray:
    return np.concatenate(list(member_update_chunks(params, seed, round_number, shard)))


def member_samples(shard: int) -> int:
    return 100 * (shard + 1)


class SyntheticTrainer:
    #: The benchmark reads timings, not the decrypted average: skip keeping a float64 copy.
    wants_mean_update = False

    def __init__(
        self, params: int, shard: int = 0, shards: int = 1, seed: int = 0, record_dir: str = ""
    ) -> None:
        self.params, self.shard, self.seed = params, shard, seed
        self.record_dir = Path(record_dir) if record_dir else None

    def build_model(self) -> nn.Module:
        model = nn.Module()
        model.weight = nn.Parameter(torch.zeros(self.params))
        return model

    def train(self, model: nn.Module, info: RoundInfo) -> TrainResult:
        with torch.no_grad():
            weight = model.get_parameter("weight")
            offset = 0
            for chunk in member_update_chunks(self.params, self.seed, info.round, self.shard):
                weight[offset : offset + chunk.shape[0]].add_(torch.from_numpy(chunk))
                offset += chunk.shape[0]
        return TrainResult(num_samples=member_samples(self.shard))

    def after_round(self, model: nn.Module, applied: AppliedRound) -> None:
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            path = self.record_dir / f"round-{applied.round}-shard-{self.shard}.json"
            path.write_text(json.dumps({"applied_unix": time.time(), "participants": applied.participants}))
