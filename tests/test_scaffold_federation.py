"""Integration: SCAFFOLD on real processes (a server, two nodes, CKKS, masks, mutual TLS): the
control block travels in the same encrypted, masked sum, and every member ends with the same
bits, model and global control variates alike, and keeps its own control variate on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cipherhive.demo.simulation import simulate
from cipherhive.federation.layout import CONTROL_PREFIX
from cipherhive.node.training.drift import LOCAL_CONTROL_FILE

pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)
def test_scaffold_round_leaves_every_member_with_identical_bits(tmp_path: Path) -> None:
    result = simulate(
        "cipherhive.demo.digits:DigitsTrainer",
        nodes=2,
        rounds=2,
        options={"scaffold": True, "epochs": 1, "hidden": 16, "shards": 2},
        node_options=[{"shard": 0}, {"shard": 1}],
        workdir=tmp_path / "run",
        timeout=200,
    )
    assert [len(r.participants) for r in result.rounds] == [2, 2]
    states = [tmp_path / "run" / f"{name}-state" for name in result.nodes]
    checkpoints = [torch.load(s / "checkpoint.pt", weights_only=True) for s in states]
    assert all(c["round"] == 2 for c in checkpoints)
    first, second = (c["tensors"] for c in checkpoints)
    assert set(first) == set(second) and any(n.startswith(CONTROL_PREFIX) for n in first)
    for name in first:
        assert torch.equal(first[name], second[name]), name  # the same bits on every member
    assert any(float(t.abs().max()) > 0 for n, t in first.items() if n.startswith(CONTROL_PREFIX))
    # Round 2 started from round 1's model: each member's own c_i (round 1's) is on disk, and differs.
    own = [torch.load(s / LOCAL_CONTROL_FILE, weights_only=True)["controls"] for s in states]
    assert not all(torch.equal(own[0][n], own[1][n]) for n in own[0])
