"""A sum is never released below min_participants: the sum of one update is that update.

And the floor cannot be moved under a round (it keeps the floor it opened with),
a member that only watches is neither online nor expected, and one that keeps
missing rounds stops being waited for until it submits again.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cipherhive.ckks import codec, keys
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import Layout, TensorSpec
from cipherhive.runtime.transport import ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def test_round_below_floor_fails_and_releases_nothing(tmp_path: Path) -> None:
    fed = LocalFederation(
        tmp_path,
        masked=False,
        nodes=2,
        node_options={"epochs": 1},
        rounds={"min_participants": 3, "auto_start": False},
    )
    fed.setup()
    fed.start()
    try:
        with fed.admin_channel() as ch:
            admin = pb_grpc.AdminStub(ch)
            fed.wait_for(
                lambda: admin.GetStatus(pb.StatusRequest(), timeout=5).nodes_online == 2, 60, "nodes online"
            )
            opened = admin.StartRound(pb.StartRoundRequest(timeout_seconds=60, force=True), timeout=10)
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
        # The round is recorded failed first, then its spool is deleted unread (a crash between
        # the two is cleaned up at restart): wait for the deletion, do not race it.
        spool = tmp_path / "server-state" / "spool" / f"round-{opened.round}"
        fed.wait_for(lambda: not spool.exists(), 30, "the failed round's spool to be deleted")
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


# ---------------------------------------------------------------- the floor a round opened with, presence

LAYOUT = Layout((TensorSpec("w", (10,)),))


class Members:
    """Test-held members of a real server: join, watch, submit with their own certificates."""

    def __init__(self, fed: LocalFederation) -> None:
        self.fed = fed
        self.secret = codec.SecretCodec((fed.workdir / "keys" / keys.SECRET_FILE).read_bytes())
        self.fingerprint = keys.fingerprint_of_file(fed.workdir / "keys" / keys.PUBLIC_FILE)
        self.watches: list[Any] = []

    def channel(self, name: str) -> grpc.Channel:
        d = self.fed.workdir / name
        return channel(
            f"127.0.0.1:{self.fed.port}",
            ClientTLS(d / f"{name}.crt", d / f"{name}.key", d / "ca.crt", "localhost"),
        )

    def join(self, name: str) -> pb.JoinReply:
        with self.channel(name) as ch:
            request = pb.JoinRequest(key_fingerprint=self.fingerprint, layout=LAYOUT.to_proto())
            reply: pb.JoinReply = pb_grpc.AggregationStub(ch).Join(request, timeout=10)
            return reply

    def watch(self, name: str) -> None:
        """Open a WatchRounds stream and keep it open (read in a thread) until close()."""
        ch = self.channel(name)
        call = pb_grpc.AggregationStub(ch).WatchRounds(pb.WatchRequest())
        threading.Thread(target=_drain, args=(call,), daemon=True).start()
        self.watches.append((ch, call))

    def submit(self, name: str, number: int, base: int = 0) -> pb.SubmitReceipt:
        cts = list(self.secret.encrypt_all(np.full(LAYOUT.num_values, 0.5)))
        header = pb.SubmitHeader(
            round=number,
            base_round=base,
            submission_id=f"{name}-{number}-" + os.urandom(4).hex(),
            layout_hash=LAYOUT.hash,
            key_fingerprint=self.fingerprint,
            num_values=LAYOUT.num_values,
            num_ciphertexts=len(cts),
        )
        messages = [pb.SubmitRequest(header=header)] + [
            pb.SubmitRequest(chunk=pb.SubmitChunk(index=i, first_ciphertext=i, ciphertexts=[c]))
            for i, c in enumerate(cts)
        ]
        with self.channel(name) as ch:
            receipt: pb.SubmitReceipt = pb_grpc.AggregationStub(ch).SubmitUpdate(iter(messages), timeout=30)
            return receipt

    def close(self) -> None:
        for ch, call in self.watches:
            call.cancel()
            ch.close()
        self.watches.clear()


def _drain(call: Any) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError:
        pass  # cancelled by close(), or the server stopped


def _admin(fed: LocalFederation) -> Any:
    return pb_grpc.AdminStub(fed.admin_channel())


def test_a_round_keeps_the_floor_it_opened_with(tmp_path: Path) -> None:
    """Opened under 3, the server restarted with min_participants = 2: two submissions still fail it."""
    fed = LocalFederation(
        tmp_path, masked=False, nodes=3, rounds={"min_participants": 3, "auto_start": False}, layout=LAYOUT
    )
    fed.setup()
    fed.start_server()
    try:
        fed.wait_serving()
        opened = _admin(fed).StartRound(pb.StartRoundRequest(timeout_seconds=600, force=True), timeout=10)
        assert opened.min_participants == 3
        fed.stop("server")
        fed.rounds["min_participants"] = 2
        fed.write_server_config()
        fed.start_server()
        fed.wait_serving()
        members = Members(fed)
        for name in ("node-1", "node-2"):
            members.join(name)
            members.submit(name, opened.round)
        admin = _admin(fed)
        assert admin.GetRound(pb.GetRoundRequest(round=opened.round), timeout=10).min_participants == 3
        closed = admin.CloseRound(pb.CloseRoundRequest(round=opened.round), timeout=30)
        assert closed.state == pb.ROUND_FAILED and closed.participants == 2
        assert "only 2 of the required 3" in closed.reason
        assert list((tmp_path / "server-state" / "sums").iterdir()) == []
        # A round opened now takes the new setting.
        again = admin.StartRound(pb.StartRoundRequest(timeout_seconds=600, force=True), timeout=10)
        assert again.min_participants == 2
    finally:
        codes = fed.stop_all()
    assert codes["server"] == 0


def test_presence_needs_a_join_and_absent_members_stop_being_expected(tmp_path: Path) -> None:
    fed = LocalFederation(
        tmp_path,
        masked=False,
        nodes=3,
        rounds={"min_participants": 2, "auto_start": True, "missed_rounds_limit": 2, "interval_seconds": 0.2},
        layout=LAYOUT,
    )
    fed.setup()
    fed.start_server()
    members = Members(fed)
    try:
        fed.wait_serving()
        admin = _admin(fed)
        # Two members that only watch: not online, not expected, and no round starts by itself.
        members.watch("node-1")
        members.watch("node-2")
        fed.wait_for(
            lambda: all(f"node online [node={name}]" in fed.log("server") for name in ("node-1", "node-2")),
            60,
            "the server to register both watch streams",
        )
        # Not synchronisation: the scenario. The scheduler looks every 0.2 s (interval_seconds)
        # whether to open a round; it gets several looks at the two watchers, and must not open one.
        time.sleep(1.0)
        status = admin.GetStatus(pb.StatusRequest(), timeout=10)
        assert status.nodes_online == 0 and status.latest_round == 0
        refused = None
        try:
            admin.StartRound(pb.StartRoundRequest(timeout_seconds=1.0), timeout=10)
        except grpc.RpcError as exc:
            refused = exc
        assert refused is not None and refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only 0 node(s) are online" in (refused.details() or "")
        assert "--force" in (refused.details() or "")
        assert "round start refused" in fed.log("server") and "actor=operator" in fed.log("server")

        # Join makes them online (the stream already open counts now): a round starts by itself.
        members.join("node-1")
        members.join("node-2")
        first = fed.wait_for(
            lambda: admin.GetStatus(pb.StatusRequest(), timeout=10).open_round, 20, "a round"
        )
        info = admin.GetRound(pb.GetRoundRequest(round=first), timeout=10)
        assert info.expected == 2
        # node-2 never submits; node-1 does. Closed by the operator, the round fails (1 < 2).
        members.submit("node-1", first)
        admin.CloseRound(pb.CloseRoundRequest(round=first), timeout=30)
        second = admin.StartRound(pb.StartRoundRequest(timeout_seconds=600, force=True), timeout=10)
        members.submit("node-1", second.round)
        admin.CloseRound(pb.CloseRoundRequest(round=second.round), timeout=30)
        nodes = {n.name: n for n in admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes}
        assert nodes["node-2"].missed_rounds == 2 and not nodes["node-2"].expected and nodes["node-2"].online
        assert nodes["node-1"].missed_rounds == 0 and nodes["node-1"].expected

        # Missed two in a row: the next round does not wait for node-2 ...
        third = admin.StartRound(pb.StartRoundRequest(timeout_seconds=600, force=True), timeout=10)
        assert third.expected == 1
        # ... until it submits again.
        members.submit("node-2", third.round)
        nodes = {n.name: n for n in admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes}
        assert nodes["node-2"].missed_rounds == 0 and nodes["node-2"].expected
    finally:
        members.close()
        codes = fed.stop_all()
    assert codes["server"] == 0
