"""A sum is never released below min_participants: the sum of one update is that update."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cipherhive.demo.federation import LocalFederation
from cipherhive.transport import ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def test_round_below_floor_fails_and_releases_nothing(tmp_path: Path) -> None:
    fed = LocalFederation(
        tmp_path, nodes=2, node_options={"epochs": 1}, rounds={"min_participants": 3, "auto_start": False}
    )
    fed.setup()
    fed.start()
    try:
        with fed.admin_channel() as ch:
            admin = pb_grpc.AdminStub(ch)
            fed.wait_for(
                lambda: admin.GetStatus(pb.StatusRequest(), timeout=5).nodes_online == 2, 60, "nodes online"
            )
            opened = admin.StartRound(pb.StartRoundRequest(timeout_seconds=6, force=True), timeout=10)
            assert opened.state == pb.ROUND_OPEN
            info = fed.wait_for(
                lambda: (
                    (r := admin.GetRound(pb.GetRoundRequest(round=opened.round), timeout=5)).state
                    == pb.ROUND_FAILED
                    and r
                ),
                60,
                "the round to fail",
            )
        # Both members did submit: the floor, not a missing upload, is what withheld the sum.
        assert info.participants == 2
        assert "only 2 of the required 3" in info.reason
        assert list((tmp_path / "server-state" / "sums").iterdir()) == []
        assert not (tmp_path / "server-state" / "spool" / f"round-{opened.round}").exists()
        d = tmp_path / "node-1"
        tls = ClientTLS(d / "node-1.crt", d / "node-1.key", d / "ca.crt", "localhost")
        with channel(f"127.0.0.1:{fed.port}", tls) as ch:
            with pytest.raises(grpc.RpcError) as err:
                list(
                    pb_grpc.AggregationStub(ch).FetchAggregate(
                        pb.FetchRequest(round=opened.round), timeout=10
                    )
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no published sum" in (err.value.details() or "")
        fed.wait_for(lambda: "round failed" in fed.log("node-1"), 20, "the node to log the failure")
    finally:
        codes = fed.stop_all()
    assert all(c in (0, None) for c in codes.values()), codes
