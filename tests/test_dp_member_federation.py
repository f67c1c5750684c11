"""Member-level distributed DP with real processes (docs/spec/privacy.md §2): a server announcing the
``member`` schedule and three nodes, masked rounds, mutual TLS.

The applied mean must lie on the grid (the sum rounded back before use), be the same on every
node, differ from the clipped plaintext mean by noise of the announced size, and each node's
ledger must hold one Gaussian event per round at sampling rate 1 with the bridged multiplier.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cipherhive.demo.federation import LocalFederation
from cipherhive.node.privacy.ledger import PrivacyLedger, ledger_path
from cipherhive.privacy.schedule import PrivacySchedule
from cipherhive.v1 import federation_pb2 as pb

pytestmark = pytest.mark.slow

#: The digits MLP 64-64-10: 64·64 + 64 + 64·10 + 10 federated values.
DIGITS_PARAMS = 4810
SCHEDULE = PrivacySchedule(
    "member", 2, 0.0, 1.0, 0, 1.0, min_members=3, colluders=0, grid_bits=16, dimension=DIGITS_PARAMS
)


def _records(workdir: Path, number: int, kind: str) -> list[dict[str, torch.Tensor]]:
    folder = workdir / "records" / f"round-{number}"
    return [torch.load(p, weights_only=True) for p in sorted(folder.glob(f"shard-*.{kind}.pt"))]


def test_a_member_level_round_with_real_processes(tmp_path: Path) -> None:
    budget = SCHEDULE.epsilon(1e-5) * 1.0001
    fed = LocalFederation(
        tmp_path,
        nodes=3,
        node_options={"epochs": 1, "record_dir": str(tmp_path / "records")},
        rounds={"timeout_seconds": 120.0},
        server_privacy={
            "dp_mode": "member",
            "dp_rounds": SCHEDULE.rounds,
            "dp_noise_multiplier": SCHEDULE.noise_multiplier,
            "dp_max_grad_norm": SCHEDULE.max_grad_norm,
            "dp_colluders": SCHEDULE.colluders,
            "dp_grid_bits": SCHEDULE.grid_bits,
        },
        node_privacy={"max_epsilon": budget},
    )
    fed.setup()
    fed.start()
    try:
        for number in (1, 2):
            info = fed.wait_round(number, 240)
            assert info.state == pb.ROUND_SUM_READY and info.participants == 3, fed.log("server")[-3000:]
        fed.wait_for(lambda: len(_records(tmp_path, 2, "applied")) == 3, 120, "nodes to apply round 2")
        gamma = 2.0**-SCHEDULE.grid_bits
        for number in (1, 2):
            updates = _records(tmp_path, number, "update")
            applied = _records(tmp_path, number, "applied")
            means = [a["mean"].double() for a in applied]
            assert all(torch.equal(m, means[0]) for m in means)  # the same sum on every node
            # Σ of the members' integers; the recorded mean is float32, so equal after that cast.
            steps = torch.round(means[0] * 3 / gamma)
            assert torch.equal(applied[0]["mean"], (steps * gamma / 3).to(applied[0]["mean"].dtype))
            deltas = [(u["local"] - u["global"]).double() for u in updates]
            clipped = [d * min(1.0, SCHEDULE.max_grad_norm / float(d.norm())) for d in deltas]
            noise = means[0] - sum(clipped) / 3
            # The sum carries noise of std z·C·√(3/(k - t)) = z·C; the mean a third of it.
            expected = SCHEDULE.noise_multiplier * SCHEDULE.max_grad_norm / 3
            assert abs(float(noise.std()) / expected - 1) < 0.06
            assert abs(float(noise.mean())) < 4 * expected / math.sqrt(DIGITS_PARAMS)
        event = SCHEDULE.round_event()
        for i in range(3):
            section = fed.privacy_section(i)
            ledger = PrivacyLedger(
                ledger_path(Path(section["ledger_dir"]), section["dataset"]), section["dataset"]
            )
            entries = ledger.entries()
            assert [e.round for e in entries] == [1, 2]
            assert all(e.event == event for e in entries), entries
            assert "member-level DP round charged" in fed.log(fed.node_name(i))
    finally:
        codes = fed.stop_all()
    assert all(c in (0, None) for c in codes.values()), codes
