"""A hostile member spoils a round's sum; real node processes reject it and carry on.

A real server and three real digits nodes on loopback with mutual TLS; the test
holds a fourth member certificate, ``mallory``, and the federation's secret key.
In each attack round mallory submits a well-formed ciphertext next to the three
honest updates: a negative weight (``[-100, 0, 0, …]``), a ciphertext under
another key, a tiny weight carrying a huge update, an upload that does not count
itself in the check slot (the sum then disagrees with the announced
participants, as when a server lies about them). Every node must reject the
published sum, stay at its base and keep running (before the fix they exited
with code 2, again on every restart, or applied the sum and wrecked the model);
after the round is withdrawn, the next round without mallory must be the exact
plaintext FedAvg of the honest updates.
Spec: docs/spec/sum-checks.md §3, §4.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from cipherhive.ckks import codec, keys
from cipherhive.demo.digits import DigitsTrainer
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import LEADING_VALUES, Layout
from cipherhive.node.trainer import federated_tensors
from cipherhive.node.training.update import layout_of
from cipherhive.pki import certs
from cipherhive.runtime.transport import ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

NODES = 3


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    workdir = tmp_path_factory.mktemp("sum-checks")
    federation = LocalFederation(
        workdir,
        masked=False,
        nodes=NODES,
        node_options={"epochs": 1, "record_dir": str(workdir / "records")},
        rounds={"auto_start": False, "timeout_seconds": 120.0},
    )
    federation.setup()
    certs.issue(workdir / "ca", "node", "mallory", workdir / "mallory")
    keys.keygen(workdir / "other-keys")
    federation.start()
    try:
        with federation.admin_channel() as ch:
            admin = pb_grpc.AdminStub(ch)
            federation.wait_for(
                lambda: admin.GetStatus(pb.StatusRequest(), timeout=5).nodes_online == NODES,
                90,
                "nodes online",
            )
        yield federation
    finally:
        codes = federation.stop_all()
        assert all(c in (0, None) for c in codes.values()), (codes, federation.log("node-1")[-3000:])


def _mallory(fed: LocalFederation) -> grpc.Channel:
    d = fed.workdir / "mallory"
    return channel(
        f"127.0.0.1:{fed.port}", ClientTLS(d / "mallory.crt", d / "mallory.key", d / "ca.crt", "localhost")
    )


def _layout() -> tuple[int, str]:
    trainer = DigitsTrainer(shard=0, shards=NODES, epochs=1)
    layout = layout_of(federated_tensors(trainer, trainer.build_model()))
    return layout.num_values, layout.hash


def _attack_vector(kind: str, num_values: int) -> np.ndarray:
    """``[w, check slot, e…, w·Δ…]``: mallory counts itself (1.0) unless the attack is not to."""
    vector = np.zeros(num_values)
    vector[1] = 1.0
    if kind == "negative-weight":
        vector[0] = -100.0
    elif kind == "tiny-weight":
        vector[0] = 1e-6
        vector[LEADING_VALUES:] = 50.0  # the mean moves by ~40 per value: far beyond any honest update
    else:
        vector[0] = 0.5
        vector[LEADING_VALUES:] = 0.01
    if kind == "uncounted":
        # The sum then counts 3 contributors where the server announces 4: what a
        # server that inflates the participants (to pass the nodes' floor) produces.
        vector[1] = 0.0
    return vector


def _attack_round(fed: LocalFederation, kind: str) -> int:
    """Open a round; mallory (watching, so it is expected) submits its vector; wait for the sum."""
    num_values, layout_hash = _layout()
    secret_file = fed.workdir / ("other-keys" if kind == "other-key" else "keys") / keys.SECRET_FILE
    blobs = list(codec.SecretCodec(secret_file.read_bytes()).encrypt_all(_attack_vector(kind, num_values)))
    fingerprint = keys.fingerprint_of_file(fed.workdir / "keys" / keys.PUBLIC_FILE)  # mallory lies about it
    with _mallory(fed) as ch, fed.admin_channel() as ach:
        stub, admin = pb_grpc.AggregationStub(ch), pb_grpc.AdminStub(ach)
        stub.Join(pb.JoinRequest(key_fingerprint=fingerprint, layout=_layout_proto(fed)), timeout=30)
        watch = stub.WatchRounds(pb.WatchRequest(since_round=10**9))
        try:
            fed.wait_for(
                lambda: admin.GetStatus(pb.StatusRequest(), timeout=5).nodes_online == NODES + 1,
                30,
                "mallory",
            )
            opened = admin.StartRound(pb.StartRoundRequest(timeout_seconds=120), timeout=30)
            header = pb.SubmitHeader(
                round=opened.round,
                base_round=opened.base_round,
                submission_id=f"mallory-{opened.round}-{kind}",
                layout_hash=layout_hash,
                key_fingerprint=fingerprint,
                num_values=num_values,
                num_ciphertexts=len(blobs),
            )
            chunk = pb.SubmitChunk(index=0, first_ciphertext=0, ciphertexts=blobs)
            stub.SubmitUpdate(
                iter([pb.SubmitRequest(header=header), pb.SubmitRequest(chunk=chunk)]), timeout=30
            )
            info = fed.wait_round(opened.round, 120)
        finally:
            watch.cancel()
    # Published, and perhaps already withdrawn once the nodes reported rejecting it.
    assert info.state in (pb.ROUND_SUM_READY, pb.ROUND_WITHDRAWN), info
    assert info.participants == NODES + 1, info
    return int(opened.round)


def _fingerprint(fed: LocalFederation) -> str:
    return keys.fingerprint_of_file(fed.workdir / "keys" / keys.PUBLIC_FILE)


def _layout_proto(fed: LocalFederation) -> pb.Layout:
    """What the federation pinned, initial model fingerprint included: mallory is a member, it holds
    the secret key and the initial model, so it can compute the fingerprint like any member."""
    return Layout.read_file(fed.layout_file).to_proto()


def _withdrawn_by_the_nodes(fed: LocalFederation, number: int) -> None:
    """Every node reported rejecting the round, a majority of its participants: the server
    withdraws it by itself, and the next round builds on the last good one."""
    with fed.admin_channel() as ch:
        admin = pb_grpc.AdminStub(ch)
        fed.wait_for(
            lambda: admin.GetRound(pb.GetRoundRequest(round=number), timeout=10).state == pb.ROUND_WITHDRAWN,
            60,
            f"the server to withdraw round {number}",
        )
        info = admin.GetRound(pb.GetRoundRequest(round=number), timeout=10)
    rejected = sorted(o.node_name for o in info.outcomes if not o.applied)
    assert rejected == [fed.node_name(i) for i in range(NODES)], info.outcomes
    # Nobody can fetch it any more, and a member that joins learns it was withdrawn.
    with _mallory(fed) as ch:
        stub = pb_grpc.AggregationStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchAggregate(pb.FetchRequest(round=number), timeout=10))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (err.value.details() or "").startswith(f"round {number} was withdrawn: ")
        rejoin = stub.Join(
            pb.JoinRequest(key_fingerprint=_fingerprint(fed), layout=_layout_proto(fed)), timeout=30
        )
        assert number in rejoin.withdrawn_rounds


def _applied_round(fed: LocalFederation, index: int) -> int:
    path = fed.workdir / f"{fed.node_name(index)}-state" / "checkpoint.pt"
    return int(torch.load(path, weights_only=True)["round"]) if path.exists() else 0


def _records(fed: LocalFederation, number: int, kind: str) -> list[dict[str, torch.Tensor]]:
    folder = fed.workdir / "records" / f"round-{number}"
    return [torch.load(p, weights_only=True) for p in sorted(folder.glob(f"shard-*.{kind}.pt"))]


def _honest_round(fed: LocalFederation) -> None:
    """A round without mallory: every node applies exactly the plaintext FedAvg of the honest updates."""
    with fed.admin_channel() as ch:
        admin = pb_grpc.AdminStub(ch)
        fed.wait_for(
            lambda: admin.GetStatus(pb.StatusRequest(), timeout=5).nodes_online == NODES, 90, "nodes"
        )
        opened = admin.StartRound(pb.StartRoundRequest(timeout_seconds=120), timeout=30)
    info = fed.wait_round(opened.round, 120)
    assert info.state == pb.ROUND_SUM_READY and info.participants == NODES, info
    fed.wait_for(lambda: len(_records(fed, opened.round, "applied")) == NODES, 60, "nodes to apply")
    updates = _records(fed, opened.round, "update")
    base = updates[0]["global"]
    assert all(torch.equal(u["global"], base) for u in updates), "nodes trained from different bases"
    total = sum(int(u["samples"]) for u in updates)
    plain = sum(int(u["samples"]) * (u["local"] - u["global"]) for u in updates) / total
    for record in _records(fed, opened.round, "applied"):
        assert float((record["mean"] - plain).abs().max()) <= 1e-7
        assert float((record["global"] - (base + plain).float().double()).abs().max()) <= 1e-6


def _alive(fed: LocalFederation) -> None:
    for i in range(NODES):
        proc = fed.procs[fed.node_name(i)]
        assert proc.poll() is None, f"{fed.node_name(i)} exited with {proc.returncode}"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("negative-weight", "bad_weight"),
        ("other-key", None),
        ("tiny-weight", "update_too_large"),
        ("uncounted", "participants_mismatch"),
    ],
)
def test_nodes_reject_a_spoiled_sum_and_carry_on(fed: LocalFederation, kind: str, reason: str | None) -> None:
    bases = [_applied_round(fed, i) for i in range(NODES)]
    assert len(set(bases)) == 1
    number = _attack_round(fed, kind)

    def all_rejected() -> bool:
        return all(f"rejected the sum of round {number}" in fed.log(fed.node_name(i)) for i in range(NODES))

    fed.wait_for(all_rejected, 60, f"every node to reject round {number}")
    _alive(fed)
    assert [_applied_round(fed, i) for i in range(NODES)] == bases, "a node applied the spoiled sum"
    assert not _records(fed, number, "applied")
    for i in range(NODES):
        log = fed.log(fed.node_name(i))
        if reason is not None:
            assert f"round={number} reason={reason}]" in log, log[-2000:]
    _withdrawn_by_the_nodes(fed, number)
    if kind == "negative-weight":
        # A restart replays the withdrawn round: the node neither exits nor fetches it again.
        fed.stop(fed.node_name(0))
        before = len(fed.log("node-1"))
        fed.start_node(0)
        # The replay sends the round as WITHDRAWN, never as SUM_READY: once the node has logged
        # it, the node has handled every replayed event of that round.
        replayed = re.compile(rf"round withdrawn \[node=node-1 round={number}\b")
        fed.wait_for(
            lambda: replayed.search(fed.log("node-1")[before:]), 90, "node-1 to replay the withdrawal"
        )
        assert "joined federation" in fed.log("node-1")[before:]
        _alive(fed)
        assert fed.log("node-1").count(f"rejected the sum of round {number}:") == 1
    _honest_round(fed)
    _alive(fed)
    # The hostile round never reached a node's model: no exit, no traceback.
    for i in range(NODES):
        assert "Traceback" not in fed.log(fed.node_name(i))


def test_nodes_roll_back_a_withdrawn_round(fed: LocalFederation) -> None:
    """The operator withdraws a round every node applied: each rolls back to its kept checkpoint
    of the round before, and the next round builds on that one, exactly.
    """
    _honest_round(fed)
    number = _applied_round(fed, 0)
    assert [_applied_round(fed, i) for i in range(NODES)] == [number] * NODES
    with fed.admin_channel() as ch:
        pb_grpc.AdminStub(ch).WithdrawRound(
            pb.WithdrawRoundRequest(round=number, reason="operator test"), timeout=30
        )
    good = [r.round for r in fed.list_rounds() if r.state == pb.ROUND_SUM_READY and r.round < number]
    previous = max(good, default=0)
    said = f"rolled back to round {previous}: round {number} was withdrawn"
    # The checkpoint switches first, the log line follows: wait for both.
    fed.wait_for(
        lambda: all(
            _applied_round(fed, i) == previous and said in fed.log(fed.node_name(i)) for i in range(NODES)
        ),
        60,
        "every node to roll back",
    )
    _alive(fed)
    _honest_round(fed)
