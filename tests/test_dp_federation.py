"""Differential privacy with real processes: a crash after sending, or a deleted ledger,
leads to refusal, never to a fresh budget.
Spec: docs/spec/privacy.md §1.3."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from cipherhive.demo.federation import LocalFederation
from cipherhive.node.privacy.ledger import PrivacyLedger, ledger_path
from cipherhive.privacy.schedule import PrivacySchedule
from cipherhive.v1 import federation_pb2 as pb

pytestmark = pytest.mark.slow

#: One round of 4 DP-SGD steps: the whole budget each node has.
SCHEDULE = PrivacySchedule("record", 1, 0.1, 1.0, 4, 1.0)


def _exit(fed: LocalFederation, key: str, timeout: float = 120.0) -> int:
    """``key``'s exit code, waiting for it to exit; fails if it still runs after ``timeout`` seconds."""
    try:
        return fed.procs[key].wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{key} did not exit within {timeout:g} s:\n{fed.log(key)[-2000:]}")


def test_crash_after_sending_and_a_deleted_ledger_are_refused(tmp_path: Path) -> None:
    budget = SCHEDULE.epsilon(1e-5) * 1.0001
    fed = LocalFederation(
        tmp_path,
        nodes=3,
        insecure=True,
        node_options={"epochs": 1},
        rounds={"timeout_seconds": 60.0},
        server_privacy={
            "dp_mode": "record",
            "dp_rounds": SCHEDULE.rounds,
            "dp_sample_rate": SCHEDULE.sample_rate,
            "dp_noise_multiplier": SCHEDULE.noise_multiplier,
            "dp_steps_per_round": SCHEDULE.steps_per_round,
            "dp_max_grad_norm": SCHEDULE.max_grad_norm,
        },
        node_privacy={"max_epsilon": budget},
    )
    fed.setup()
    try:
        fed.start_server()
        fed.wait_serving()
        # node-1 dies (kill -9) right after the server acknowledged its update.
        fed.start_node(0, env={"CIPHERHIVE_FAILPOINTS": "node.submitted"})
        fed.start_node(1)
        fed.start_node(2)
        assert _exit(fed, "node-1") == -signal.SIGKILL, fed.log("node-1")[-2000:]
        info = fed.wait_round(1, 120)
        assert info.state == pb.ROUND_SUM_READY and info.participants == 3
        section = fed.privacy_section(0)
        ledger = PrivacyLedger(
            ledger_path(Path(section["ledger_dir"]), section["dataset"]), section["dataset"]
        )
        assert [e.round for e in ledger.entries()] == [1]  # written before the update left
        # Restarted, node-1 finds its budget spent and refuses the schedule: no second round for it.
        fed.start_node(0)
        assert _exit(fed, "node-1") == 2
        assert "beyond this node's limit" in fed.log("node-1")
        assert [e.round for e in ledger.entries()] == [1]
        # node-2's ledger is deleted: it refuses to start rather than begin a fresh budget.
        assert fed.stop("node-2") == 0
        section = fed.privacy_section(1)
        ledger_path(Path(section["ledger_dir"]), section["dataset"]).unlink()
        fed.start_node(1)
        assert _exit(fed, "node-2") == 2
        assert "is missing" in fed.log("node-2")
        assert not ledger_path(Path(section["ledger_dir"]), section["dataset"]).exists()
        # The node that kept its ledger logged its ε.
        assert "epsilon=" in fed.log("node-3")
    finally:
        fed.stop_all()
