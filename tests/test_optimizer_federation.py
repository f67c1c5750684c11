"""Integration: FedAdam on real processes keeps every member's model bit-identical, through a
member that catches up from round 0 and one that replays from its checkpoint after a restart.

A real server (``[optimizer] optimizer = "fedadam"``) and four real node processes with mutual
TLS on loopback; the operator drives the rounds (``auto_start = false``) so that who is online
in which round is certain:

* round 1: nodes 1-3; then node 1 stops;
* node 4 starts and replays round 1 (its moments start from zero, like everybody's did);
* round 2: nodes 2-4; then node 1 restarts and replays round 2 from its round-1 checkpoint
  (moments read back from disk);
* round 3: all four.

Then every node's checkpoint (model and moments) must be the same bits, and the model must be
what FedAdam makes of the plaintext averages of the recorded updates, not what FedAvg makes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.optimizer_settings import OptimizerSpec
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

ADAM: dict[str, Any] = {"optimizer": "fedadam", "learning_rate": 0.02}


def _checkpoint(fed: LocalFederation, index: int) -> dict[str, Any] | None:
    path = fed.workdir / f"{fed.node_name(index)}-state" / "checkpoint.pt"
    if not path.exists():
        return None
    data: dict[str, Any] = torch.load(path, weights_only=True)
    return data


def _at(fed: LocalFederation, indexes: list[int], number: int) -> bool:
    return all((c := _checkpoint(fed, i)) is not None and c["round"] == number for i in indexes)


def _online(fed: LocalFederation) -> set[str]:
    with fed.admin_channel() as ch:
        nodes = pb_grpc.AdminStub(ch).ListNodes(pb.ListNodesRequest(), timeout=10).nodes
    return {n.name for n in nodes if n.online}


def _round(fed: LocalFederation, members: list[int], timeout: float = 180) -> int:
    """Open a round once exactly ``members`` are online; wait until each of them applied it."""
    names = {fed.node_name(i) for i in members}
    fed.wait_for(lambda: _online(fed) == names, timeout, f"exactly {sorted(names)} online")
    with fed.admin_channel() as ch:
        number = pb_grpc.AdminStub(ch).StartRound(pb.StartRoundRequest(), timeout=10).round
    info = fed.wait_round(number, timeout)
    assert info.state == pb.ROUND_SUM_READY and info.participants == len(members), info
    fed.wait_for(lambda: _at(fed, members, number), timeout, f"{sorted(names)} to apply round {number}")
    return int(number)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    workdir = tmp_path_factory.mktemp("fedadam")
    fed = LocalFederation(
        workdir,
        nodes=4,
        node_options={"epochs": 1, "record_dir": str(workdir / "records")},
        rounds={"min_participants": 3, "auto_start": False},
        optimizer=ADAM,
    )
    fed.setup()
    fed.start_server()
    fed.wait_serving()
    try:
        for i in range(3):
            fed.start_node(i)
        assert _round(fed, [0, 1, 2]) == 1
        assert fed.stop(fed.node_name(0)) == 0
        fed.start_node(3)
        fed.wait_for(lambda: _at(fed, [3], 1), 180, "node-4 to replay round 1")
        assert _round(fed, [1, 2, 3]) == 2
        fed.start_node(0)
        fed.wait_for(lambda: _at(fed, [0], 2), 180, "node-1 to replay round 2 from its checkpoint")
        assert _round(fed, [0, 1, 2, 3]) == 3
        yield fed
    finally:
        codes = fed.stop_all()
        assert all(c in (0, None) for c in codes.values()), (codes, fed.log("server"))


def test_every_member_holds_the_same_bits_after_fedadam_rounds(federation: LocalFederation) -> None:
    checkpoints = [_checkpoint(federation, i) for i in range(4)]
    assert all(c is not None and c["round"] == 3 for c in checkpoints)
    first = checkpoints[0]
    assert first is not None and first["optimizer"]["spec"]["name"] == "fedadam"
    assert first["optimizer"]["rounds"] == 3
    for index, other in enumerate(checkpoints[1:], start=2):
        assert other is not None
        for name, tensor in first["tensors"].items():
            assert torch.equal(tensor, other["tensors"][name]), f"node-{index} differs in {name}"
        for a, b in zip(first["optimizer"]["buffers"], other["optimizer"]["buffers"], strict=True):
            assert torch.equal(a, b), f"node-{index}'s FedAdam moments differ"
    # Each node logged the optimizer the server announced.
    assert "fedadam (η=0.02" in federation.log("node-4")


def test_the_model_is_fedadam_of_the_plaintext_averages(federation: LocalFederation) -> None:
    """Replay FedAdam in the clear on the recorded updates: the nodes' model is that (to CKKS error)."""
    spec = OptimizerSpec.make(ADAM["optimizer"], float(ADAM["learning_rate"]))
    records = federation.workdir / "records"
    participants = {1: [0, 1, 2], 2: [1, 2, 3], 3: [0, 1, 2, 3]}
    x: np.ndarray | None = None
    m = v = np.zeros(0)
    fedavg: np.ndarray | None = None
    for number, shards in participants.items():
        updates = [torch.load(records / f"round-{number}" / f"shard-{s}.update.pt") for s in shards]
        base = updates[0]["global"].numpy()
        if x is None:
            x, fedavg = base.copy(), base.copy()
            m, v = np.zeros_like(x), np.full_like(x, spec.tau**2)
        assert fedavg is not None
        total = sum(int(u["samples"]) for u in updates)
        delta = sum(int(u["samples"]) * (u["local"] - u["global"]).numpy() for u in updates) / total
        m = spec.beta1 * m + (1 - spec.beta1) * delta
        v = spec.beta2 * v + (1 - spec.beta2) * delta * delta
        x = x + spec.learning_rate * m / (np.sqrt(v) + spec.tau)
        fedavg = fedavg + delta
    final = _checkpoint(federation, 0)
    assert final is not None and x is not None and fedavg is not None
    got = torch.cat([t.reshape(-1).double() for t in final["tensors"].values()]).numpy()
    assert float(np.abs(got - x).max()) < 1e-4
    assert float(np.abs(got - fedavg).max()) > 1e-2, "the nodes applied plain FedAvg"


def test_server_status_announces_the_optimizer(federation: LocalFederation) -> None:
    with federation.admin_channel() as ch:
        status = pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10)
    assert status.settings.optimizer.name == "fedadam"
    assert status.settings.optimizer.learning_rate == pytest.approx(0.02)
