"""A hostile member spoils a round; the round is withdrawn and the federation carries on.

Three real node processes (LocalFederation, mutual TLS) and one member
certificate held by this test. The member submits a well-formed encryption of
``[-100, 0, 0, …]``: a negative FedAvg weight, which the server cannot see
(it only adds ciphertexts) and every honest node must refuse to apply. Once
more than half of the round's participants report rejecting it, the server
withdraws the round; the next round builds on the last good one (the initial
model here) and its sum is the exact FedAvg of the honest updates.

Nodes that check sums and report on their own come with the node side of
issue 10; until then this test sends the nodes' reports itself, with the
nodes' own certificates (a report it sends for a node replaces the node's).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from cipherhive import certs, codec, keys
from cipherhive.demo.federation import LocalFederation
from cipherhive.layout import Layout
from cipherhive.transport import ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
NODES = ("node-1", "node-2", "node-3")


def _records(workdir: Path, number: int, kind: str) -> list[dict[str, torch.Tensor]]:
    folder = workdir / "records" / f"round-{number}"
    return [torch.load(p, weights_only=True) for p in sorted(folder.glob(f"shard-*.{kind}.pt"))]


def _wait(predicate: Callable[[], Any], timeout: float, what: str, fed: LocalFederation) -> Any:
    """Like LocalFederation.wait_for, but a node that exits is not an error here (see the docstring)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server = fed.procs["server"]
        assert server.poll() is None, fed.log("server")[-3000:]
        try:
            value = predicate()
        except grpc.RpcError:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def test_spoiled_round_is_withdrawn_and_the_next_one_is_exact(tmp_path: Path) -> None:
    fed = LocalFederation(
        tmp_path,
        nodes=3,
        node_options={"epochs": 1, "record_dir": str(tmp_path / "records")},
        rounds={"min_participants": 3, "auto_start": False, "timeout_seconds": 120.0},
    )
    fed.setup()
    certs.issue(tmp_path / "ca", "node", "mallory", tmp_path / "mallory")
    layout = Layout.read_file(fed.layout_file)
    secret = codec.SecretCodec((tmp_path / "keys" / keys.SECRET_FILE).read_bytes())
    fingerprint = keys.fingerprint_of_file(tmp_path / "keys" / keys.PUBLIC_FILE)

    def member(name: str) -> grpc.Channel:
        d = tmp_path / name
        tls = ClientTLS(d / f"{name}.crt", d / f"{name}.key", d / "ca.crt", "localhost")
        return channel(f"127.0.0.1:{fed.port}", tls)

    fed.start()
    mallory = member("mallory")
    admin_channel = fed.admin_channel()
    admin = pb_grpc.AdminStub(admin_channel)
    watch: Any = None
    try:
        hostile = pb_grpc.AggregationStub(mallory)
        hostile.Join(pb.JoinRequest(key_fingerprint=fingerprint, layout=layout.to_proto()), timeout=30)
        watch = hostile.WatchRounds(pb.WatchRequest())  # online and expected, like a real member
        threading.Thread(target=_drain, args=(watch,), daemon=True).start()
        _wait(lambda: admin.GetStatus(pb.StatusRequest(), timeout=5).nodes_online == 4, 90, "4 online", fed)

        # Round 1: the three honest nodes and mallory's well-formed, spoiled update.
        opened = admin.StartRound(pb.StartRoundRequest(), timeout=10)
        assert (opened.round, opened.base_round, opened.expected) == (1, 0, 4)
        vector = np.zeros(layout.num_values)
        vector[0] = -100.0  # the FedAvg weight comes first
        cts = list(secret.encrypt_all(vector))
        header = pb.SubmitHeader(
            round=1,
            base_round=0,
            submission_id="mallory-" + os.urandom(6).hex(),
            layout_hash=layout.hash,
            key_fingerprint=fingerprint,
            num_values=layout.num_values,
            num_ciphertexts=len(cts),
        )
        chunks = [
            pb.SubmitRequest(chunk=pb.SubmitChunk(index=i, first_ciphertext=i, ciphertexts=[c]))
            for i, c in enumerate(cts)
        ]
        hostile.SubmitUpdate(iter([pb.SubmitRequest(header=header), *chunks]), timeout=60)
        info = _wait(
            lambda: (
                (r := admin.GetRound(pb.GetRoundRequest(round=1), timeout=5)).state == pb.ROUND_SUM_READY
                and r
            ),
            120,
            "round 1's (spoiled) sum",
            fed,
        )
        assert info.participants == 4

        # Each node refuses the sum: it exits (before the node side of issue 10) or reports it.
        def handled(name: str) -> bool:
            proc = fed.procs[name]
            reported = {o.node_name for o in admin.GetRound(pb.GetRoundRequest(round=1), timeout=5).outcomes}
            return proc.poll() is not None or name in reported

        _wait(lambda: all(handled(n) for n in NODES), 120, "every node to refuse round 1", fed)
        # The nodes' reports, with the nodes' certificates.
        acks = []
        for name in NODES:
            with member(name) as ch:
                report = pb.OutcomeReport(round=1, applied=False, reason="total weight is negative")
                acks.append(pb_grpc.AggregationStub(ch).ReportOutcome(report, timeout=10).withdrawn)
        # Mallory may report too, but a report cannot carry a value, and it is one of four.
        with pytest.raises(grpc.RpcError) as err:
            hostile.ReportOutcome(pb.OutcomeReport(round=1, applied=False, reason="x" * 201), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        withdrawn = admin.GetRound(pb.GetRoundRequest(round=1), timeout=10)
        assert withdrawn.state == pb.ROUND_WITHDRAWN, withdrawn
        assert "participants rejected its sum" in withdrawn.withdrawn_reason
        assert acks.count(True) <= 1  # exactly the report that made the majority, unless the nodes did
        outcomes = {o.node_name: o for o in withdrawn.outcomes}
        assert set(NODES) <= set(outcomes) and not any(outcomes[n].applied for n in NODES)

        # Nobody can fetch it any more; a member that joins learns it was withdrawn.
        with member("node-1") as ch:
            with pytest.raises(grpc.RpcError) as err:
                list(pb_grpc.AggregationStub(ch).FetchAggregate(pb.FetchRequest(round=1), timeout=10))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert (err.value.details() or "").startswith("round 1 was withdrawn: ")
        rejoin = hostile.Join(
            pb.JoinRequest(key_fingerprint=fingerprint, layout=layout.to_proto()), timeout=30
        )
        assert list(rejoin.withdrawn_rounds) == [1] and rejoin.latest_sum_round == 0

        # Mallory leaves; nodes that exited over round 1 start again.
        watch.cancel()
        for i, name in enumerate(NODES):
            if fed.procs[name].poll() is not None:
                fed.start_node(i)
        _wait(lambda: admin.GetStatus(pb.StatusRequest(), timeout=5).nodes_online == 3, 90, "3 online", fed)

        # Round 2 builds on the last good round (0: the initial model) and is exact.
        second = admin.StartRound(pb.StartRoundRequest(), timeout=10)
        assert (second.round, second.base_round, second.expected) == (2, 0, 3)
        fed.wait_round(2, 180)
        fed.wait_for(lambda: len(_records(tmp_path, 2, "applied")) == 3, 120, "nodes to apply round 2")
        updates = _records(tmp_path, 2, "update")
        applied = _records(tmp_path, 2, "applied")
        first_round = _records(tmp_path, 1, "update")
        base = first_round[0]["global"]
        assert all(torch.equal(u["global"], base) for u in updates), "round 2 did not start from round 0"
        total = sum(int(u["samples"]) for u in updates)
        plain = sum(int(u["samples"]) * (u["local"] - u["global"]) for u in updates) / total
        for record in applied:
            assert int(record["participants"]) == 3
            assert float((record["mean"] - plain).abs().max()) < 1e-7
            assert float((record["global"] - (base + plain).float().double()).abs().max()) < 1e-6
        assert fed.wait_round(2, 5).state == pb.ROUND_SUM_READY
    finally:
        if watch is not None:
            watch.cancel()
        mallory.close()
        admin_channel.close()
        codes = fed.stop_all()
    assert codes["server"] == 0, fed.log("server")[-3000:]
    audit = fed.log("server")
    assert "round withdrawn" in audit and "actor=server" in audit


def _drain(call: Any) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError:
        pass
