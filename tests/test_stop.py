"""Stopping a node during training: real server and node processes.

The plug-in below is written into the federation's folder (the node processes
run there, so it is importable as ``slow_trainer``). It sleeps per batch and
checks ``RoundInfo.should_stop``; with ``hang = true`` it ignores it, like a
plug-in written before the stop existed, or one stuck in a long call.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cipherhive.demo.federation import LocalFederation
from cipherhive.node.stopping import EXIT_FORCED
from cipherhive.v1 import federation_pb2 as pb

pytestmark = pytest.mark.slow

PLUGIN = """
import time
from pathlib import Path

import torch
from torch import nn

from cipherhive.node.trainer import TrainResult


class SlowTrainer:
    def __init__(self, hang: bool = False, shard: int = 0, shards: int = 1) -> None:
        self.hang = hang

    def build_model(self):
        torch.manual_seed(0)
        return nn.Linear(4, 2)

    def train(self, model, info):
        Path(f"training-{info.node_name}").write_text(str(info.round))
        for _batch in range(10_000):
            if not self.hang and info.should_stop():
                return TrainResult(num_samples=0)
            time.sleep(0.1)
            with torch.no_grad():
                model.weight.add_(0.001)
        return TrainResult(num_samples=10)
"""


def _exit_code(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """The process's exit code; fails if it is still running after ``timeout`` seconds."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout:g} s after the stop signal")


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[LocalFederation]:
    (tmp_path / "slow_trainer.py").write_text(PLUGIN, encoding="utf-8")
    fed = LocalFederation(
        tmp_path, nodes=2, plugin="slow_trainer:SlowTrainer", rounds={"min_participants": 2}
    )
    fed.setup()
    fed.write_node_config(1, hang=True)
    try:
        fed.start()
        yield fed
    finally:
        fed.stop_all()


def test_sigterm_stops_training_promptly_and_submits_nothing(federation: LocalFederation) -> None:
    fed = federation
    fed.wait_for(lambda: all((fed.workdir / f"training-node-{i}").exists() for i in (1, 2)), 120, "training")

    # Both trainers are in train(), which would take 10,000 batches of 0.1 s (over 16 minutes) to
    # finish: a node that exits within the waits below did not wait for its training to end.

    # node-1's trainer checks should_stop: the first signal ends the training, and the node exits 0.
    cooperative = fed.procs["node-1"]
    cooperative.send_signal(signal.SIGTERM)
    assert _exit_code(cooperative) == 0, fed.log("node-1")[-3000:]
    log1 = fed.log("node-1")
    assert "stop requested during training: not submitting this round" in log1
    assert "update submitted" not in log1

    # node-2's trainer ignores it: the first signal is logged and only asks ...
    hung = fed.procs["node-2"]
    hung.send_signal(signal.SIGTERM)
    fed.wait_for(
        lambda: "shutting down (training in progress stops" in fed.log("node-2"), 60, "the first stop"
    )
    assert hung.poll() is None  # still in train(): the first signal only asks
    # ... the second one exits at once, from within train() (the line and the code say so).
    hung.send_signal(signal.SIGTERM)
    assert _exit_code(hung) == EXIT_FORCED, fed.log("node-2")[-3000:]
    log2 = fed.log("node-2")
    assert "second stop signal (SIGTERM after SIGTERM): exiting now" in log2
    assert "update submitted" not in log2
    assert "stop requested during training" not in log2  # its train() never returned

    # The server received nothing from either node.
    rounds = fed.list_rounds()
    assert rounds and all(not r.submissions for r in rounds), rounds
    # node-1 withdrew, signed, as it stopped: with two members and a floor of two the round cannot
    # be re-formed, so it fails at once instead of waiting for its deadline
    # (docs/spec/masked-round.md §2.1), and names node-1.
    assert "withdrew from round" in log1 and "this node is stopping" in log1
    assert rounds[0].state == pb.ROUND_FAILED and rounds[0].failed_step == "withdraw", rounds[0]
    assert list(rounds[0].culprits) == ["node-1"]
