"""A node's handling of sums and withdrawals, in-process against a fake server stub.

The node under test is the real :class:`cipherhive.node.daemon.Node` (real keys,
real trainer, real state directory); only the gRPC stub is replaced, so each
test can hand it any sum, event or refusal and look at its state afterwards.
The end-to-end versions, against real processes, are in tests/test_sum_checks.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from cipherhive.ckks import codec, keys
from cipherhive.node import metrics
from cipherhive.node.config import NodeConfig
from cipherhive.node.daemon import Node
from cipherhive.node.state.checkpoint import Checkpoint, NodeState, kept_name
from cipherhive.node.sums.receive import CATCH_UP_SUMS_PER_SECOND, SessionEnd
from cipherhive.node.training.update import leading
from cipherhive.server.ingest.running_sum import RunningSum
from cipherhive.v1 import federation_pb2 as pb

# --------------------------------------------------------------------------- NodeState


def _ckpt(number: int, value: float) -> Checkpoint:
    return Checkpoint(number, "layout", {"w": torch.full((3,), value)})


def test_chain_keeps_the_newest_checkpoints(tmp_path: Path) -> None:
    store = NodeState(tmp_path, keep=2)
    assert store.load() is None and store.chain() == [0]
    for number in (1, 2, 3):
        store.save(_ckpt(number, float(number)))
    assert store.chain() == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == [kept_name(2), kept_name(3)]
    current = store.load()
    assert current is not None and current.round == 3
    # checkpoint.pt is the current model, a link to the kept file (no second copy on disk).
    assert (tmp_path / "checkpoint.pt").stat().st_ino == (tmp_path / kept_name(3)).stat().st_ino


def test_rollback_targets(tmp_path: Path) -> None:
    store = NodeState(tmp_path, keep=2)
    for number in (1, 2, 3, 4):
        store.save(_ckpt(number, float(number)))
    assert store.rollback_target(4) == 3
    assert store.rollback_target(3) == 0  # rounds 1 and 2 are no longer kept: the initial model
    assert store.rollback_target(1) == 0  # the initial model is always there to rebuild
    back = store.rollback(3)
    assert back is not None and back.round == 3 and float(back.tensors["w"][0]) == 3.0
    assert store.chain() == [0, 1, 2, 3]
    assert not (tmp_path / kept_name(4)).exists()
    assert store.rollback(0) is None
    assert store.chain() == [0] and not (tmp_path / "checkpoint.pt").exists()


def test_chain_is_reconciled_after_a_crash_between_commit_and_index(tmp_path: Path) -> None:
    store = NodeState(tmp_path, keep=3)
    for number in (1, 2, 3):
        store.save(_ckpt(number, float(number)))
    # A roll-back to 2 that died after its commit point (checkpoint.pt) but before chain.json.
    store._commit(tmp_path / kept_name(2))
    assert store.chain() == [0, 1, 2, 3]
    current = NodeState(tmp_path, keep=3).load()
    assert current is not None and current.round == 2
    assert store.chain() == [0, 1, 2]


def test_bootstrapped_chain_cannot_roll_back_past_its_start(tmp_path: Path) -> None:
    store = NodeState(tmp_path, keep=3)
    store.save(_ckpt(1, 1.0))
    store.remember_rejection(9, "bad_weight", "the total weight is not a positive number", "k")
    store.install(_ckpt(7, 7.0))
    assert store.chain() == [7]
    assert store.rejections() == {}
    assert store.rollback_target(7) is None
    store.save(_ckpt(8, 8.0))
    assert store.rollback_target(8) == 7


def test_state_dir_from_before_the_chain(tmp_path: Path) -> None:
    """A node upgraded in place: its single checkpoint.pt becomes the start of the chain."""
    torch.save(
        {"round": 5, "layout_hash": "layout", "tensors": {"w": torch.zeros(3)}}, tmp_path / "checkpoint.pt"
    )
    store = NodeState(tmp_path)
    current = store.load()
    assert current is not None and current.round == 5
    assert store.chain() == [5] and (tmp_path / kept_name(5)).exists()


def test_rejections_are_remembered_and_bounded(tmp_path: Path) -> None:
    store = NodeState(tmp_path)
    store.remember_rejection(4, "bad_weight", "words", "k")
    assert NodeState(tmp_path).rejections()[4]["reported"] is False
    store.mark_reported(4)
    assert NodeState(tmp_path).rejections()[4]["reported"] is True
    store.forget_rejection(4)
    assert store.rejections() == {}
    store.remember_rejection(6, "bad_weight", "words", "k")
    store.save(_ckpt(6, 0.0))  # applied after all (a later operator action): forgotten
    assert store.rejections() == {}


# --------------------------------------------------------------------------- the node, with a fake server


class _Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@dataclass
class FakeStub:
    """Serves sums the test made; records what the node asked for and reported."""

    layout_hash: str
    num_values: int
    sums: dict[int, tuple[list[bytes], int]] = field(default_factory=dict)
    fetches: list[int] = field(default_factory=list)
    reports: list[tuple[int, bool, str]] = field(default_factory=list)
    outcome_unimplemented: bool = False
    corrupt: bool = False

    def FetchAggregate(self, request: pb.FetchRequest, metadata: Any = ()) -> Iterator[pb.AggregateChunk]:
        self.fetches.append(request.round)
        blobs, participants = self.sums[request.round]
        yield pb.AggregateChunk(
            round=request.round,
            first_ciphertext=request.first_ciphertext,
            ciphertexts=blobs[request.first_ciphertext :],
            num_ciphertexts=len(blobs),
            num_values=self.num_values,
            participants=participants,
            layout_hash="0" * 64 if self.corrupt else self.layout_hash,
        )

    def ReportOutcome(
        self, request: pb.OutcomeReport, metadata: Any = (), timeout: float = 0
    ) -> pb.OutcomeAck:
        if self.outcome_unimplemented:
            raise _Refused(grpc.StatusCode.UNIMPLEMENTED)
        self.reports.append((request.round, request.applied, request.reason))
        return pb.OutcomeAck()


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> keys.KeyFiles:
    return keys.keygen(tmp_path_factory.mktemp("keys"))


def _node(key_files: keys.KeyFiles, state: Path, **settings: Any) -> Node:
    config = NodeConfig(
        secret_context=key_files.secret,
        state_dir=state,
        workers=1,
        insecure=True,
        name="node-1",
        plugin="cipherhive.demo.digits:DigitsTrainer",
        options={"epochs": 1, "hidden": 16},
        **settings,
    )
    node = Node(config)
    node.settings = pb.FederationSettings(min_participants=3, max_participants=64, weight_unit=1000.0)
    return node


def _publish(
    key_files: keys.KeyFiles, stub: FakeStub, number: int, vectors: list[np.ndarray], participants: int = 3
) -> None:
    """The server's part: add the members' ciphertexts into the round's sum."""
    secret = codec.SecretCodec(key_files.secret.read_bytes())
    public = codec.PublicCodec(key_files.public.read_bytes())
    running = RunningSum(public, codec.num_ciphertexts(vectors[0].shape[0]))
    for vector in vectors:
        for index, blob in enumerate(secret.encrypt_all(vector)):
            running.add(index, public.load(blob))
    stub.sums[number] = (list(running.serialized()), participants)


def _honest(node: Node, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    n = node.layout.num_params
    out = []
    for samples in (400, 600, 900):
        w = samples / 1000.0
        out.append(np.concatenate([leading(w), w * rng.normal(0.0, 0.05, n)]))  # [w, 1.0, e…, w·Δ…]
    return out


def _sum_ready(number: int, base: int, participants: int = 3) -> pb.RoundEvent:
    return pb.RoundEvent(
        kind=pb.RoundEvent.SUM_READY, round=number, base_round=base, participants=participants
    )


def _values(node: Node) -> np.ndarray:
    return node.flat.read().copy()


def _took_part(node: Node, number: int) -> None:
    """Record an acknowledged upload to round ``number`` (as the first honest member, weight 0.4):
    only a round's participants report on its sum."""
    node.store.mark_submitted(number, f"submission-{number}", f"receipt-{number}", 0.4)


def test_node_rejects_remembers_and_rolls_back(key_files: keys.KeyFiles, tmp_path: Path) -> None:
    node = _node(key_files, tmp_path / "state", keep_checkpoints=3)
    stub = FakeStub(node.layout.hash, node.layout.num_values)
    initial = _values(node)
    for number in (1, 2):
        _publish(key_files, stub, number, _honest(node, number))
        _took_part(node, number)
        node._handle(stub, _sum_ready(number, number - 1))  # type: ignore[arg-type]
        assert node.applied_round == number
    after = {1: None, 2: _values(node)}
    assert stub.reports == [(1, True, ""), (2, True, "")]

    # Round 3: one member's [-100, 0, 0, …] among the honest updates.
    hostile = np.zeros(node.layout.num_values)
    hostile[0] = -100.0
    hostile[1] = 1.0  # counts itself in the check slot, so the weight check is what catches it
    _publish(key_files, stub, 3, [*_honest(node, 3), hostile], participants=4)
    before = metrics.SUMS_REJECTED.labels("bad_weight")._value.get()
    _took_part(node, 3)
    node._handle(stub, _sum_ready(3, 2, participants=4))  # type: ignore[arg-type]
    assert node.applied_round == 2
    np.testing.assert_array_equal(_values(node), after[2])
    np.testing.assert_array_equal(node.global_values, after[2])
    assert metrics.SUMS_REJECTED.labels("bad_weight")._value.get() == before + 1
    assert stub.reports[-1][:2] == (3, False)
    assert stub.reports[-1][2].startswith("round 3 rejected: the total weight is not a positive number")

    # A sum built on the rejected round is skipped with a warning, not an exit.
    node._handle(stub, _sum_ready(4, 3))  # type: ignore[arg-type]
    assert node.applied_round == 2 and stub.fetches.count(4) == 0

    # Restart: the rejected round is not fetched again.
    node.close()
    node = _node(key_files, tmp_path / "state", keep_checkpoints=3)
    assert node.applied_round == 2
    node._handle(stub, _sum_ready(3, 2, participants=4))  # type: ignore[arg-type]
    assert stub.fetches.count(3) == 1

    # Changing the node's check settings makes it check again.
    node.close()
    node = _node(key_files, tmp_path / "state", keep_checkpoints=3, max_update_value=5.0)
    node._handle(stub, _sum_ready(3, 2, participants=4))  # type: ignore[arg-type]
    assert stub.fetches.count(3) == 2 and node.applied_round == 2

    # Round 2 is withdrawn: back to round 1's checkpoint, chain and model together.
    node._handle(stub, pb.RoundEvent(kind=pb.RoundEvent.WITHDRAWN, round=2, reason="operator"))  # type: ignore[arg-type]
    assert node.applied_round == 1 and node.state.resync
    assert node.store.chain() == [0, 1]
    after[1] = _values(node)
    assert not np.array_equal(after[1], after[2])
    # Withdrawn rounds are skipped when replaying.
    node.state.resync = False
    node._handle(stub, _sum_ready(2, 1))  # type: ignore[arg-type]
    assert node.applied_round == 1 and stub.fetches.count(2) == 1
    # Round 1 too: back to the trainer's initial model.
    node._handle(stub, pb.RoundEvent(kind=pb.RoundEvent.WITHDRAWN, round=1))  # type: ignore[arg-type]
    assert node.applied_round == 0
    np.testing.assert_array_equal(_values(node), initial)
    # A WITHDRAWN event for a round the node never applied changes nothing.
    node.state.resync = False
    node._handle(stub, pb.RoundEvent(kind=pb.RoundEvent.WITHDRAWN, round=3))  # type: ignore[arg-type]
    assert node.applied_round == 0 and not node.state.resync
    node.close()


def test_node_without_an_old_enough_checkpoint_keeps_running(
    key_files: keys.KeyFiles, tmp_path: Path
) -> None:
    node = _node(key_files, tmp_path / "fresh", keep_checkpoints=1)
    node.store.install(Checkpoint(5, node.layout.hash, {n: t.detach().clone() for n, t in node.tensors}))
    node.close()
    node = _node(key_files, tmp_path / "fresh", keep_checkpoints=1)
    assert node.applied_round == 5
    node._handle(None, pb.RoundEvent(kind=pb.RoundEvent.WITHDRAWN, round=5))  # type: ignore[arg-type]
    assert node.applied_round == 5 and node.state.idle and "cipherhive node bootstrap" in node.state.idle
    # It follows without taking part: an OPENED round is ignored, not an error.
    node._handle(None, pb.RoundEvent(kind=pb.RoundEvent.OPENED, round=6, base_round=5))  # type: ignore[arg-type]
    node.close()


def test_node_rejects_too_few_participants_without_fetching(key_files: keys.KeyFiles, tmp_path: Path) -> None:
    node = _node(key_files, tmp_path / "state")
    stub = FakeStub(node.layout.hash, node.layout.num_values, outcome_unimplemented=True)
    _publish(key_files, stub, 1, _honest(node, 1)[:2], participants=2)
    _took_part(node, 1)
    node._handle(stub, _sum_ready(1, 0, participants=2))  # type: ignore[arg-type]
    assert node.applied_round == 0 and stub.fetches == []
    assert node.store.rejections()[1]["reason"] == "too_few_participants"
    assert node.sums.outcome_unimplemented  # tolerated, asked once
    node.close()


def test_a_catching_up_node_reports_only_its_own_rounds_and_paces_its_replay(
    key_files: keys.KeyFiles, tmp_path: Path
) -> None:
    """Replayed sums of rounds it did not take part in: applied, not reported (the server would
    refuse the reports, docs/spec/sum-checks.md §4), and fetched at most CATCH_UP_SUMS_PER_SECOND."""
    node = _node(key_files, tmp_path / "state")
    stub = FakeStub(node.layout.hash, node.layout.num_values)
    for number in (1, 2, 3, 4):
        _publish(key_files, stub, number, _honest(node, number))
    _took_part(node, 4)
    started = time.monotonic()
    for number in (1, 2, 3):
        replayed = _sum_ready(number, number - 1)
        replayed.replay = True
        node._handle(stub, replayed)  # type: ignore[arg-type]
    assert time.monotonic() - started >= 2 / CATCH_UP_SUMS_PER_SECOND
    node._handle(stub, _sum_ready(4, 3))  # type: ignore[arg-type]
    assert node.applied_round == 4 and stub.fetches == [1, 2, 3, 4]
    assert stub.reports == [(4, True, "")]
    node.close()


def test_node_retries_then_rejects_a_malformed_stream(key_files: keys.KeyFiles, tmp_path: Path) -> None:
    node = _node(key_files, tmp_path / "state")
    stub = FakeStub(node.layout.hash, node.layout.num_values, corrupt=True)
    _publish(key_files, stub, 1, _honest(node, 1))
    initial = _values(node)
    node._handle(stub, _sum_ready(1, 0))  # type: ignore[arg-type]
    assert node.applied_round == 0 and stub.fetches == [1, 1, 1]
    np.testing.assert_array_equal(_values(node), initial)
    assert node.store.rejections()[1]["reason"] == "malformed"
    # A stream cut short the same way: the layout is right but a block is missing.
    stub.corrupt = False
    blobs, participants = stub.sums[1]
    stub.sums[2] = (blobs[:0], participants)
    node._handle(stub, _sum_ready(2, 0))  # type: ignore[arg-type]
    assert node.applied_round == 0
    node.close()


def test_node_refuses_to_submit_below_its_floor(key_files: keys.KeyFiles, tmp_path: Path) -> None:
    node = _node(key_files, tmp_path / "state")

    class NoSubmit:
        def SubmitUpdate(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("the node submitted to a round below its floor")

    node._handle(NoSubmit(), pb.RoundEvent(kind=pb.RoundEvent.OPENED, round=1, min_participants=2))  # type: ignore[arg-type]
    node.close()


def test_node_told_its_sums_were_pruned_names_bootstrap(
    key_files: keys.KeyFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = _node(key_files, tmp_path / "state")

    class Pruned(FakeStub):
        def FetchAggregate(self, request: pb.FetchRequest, metadata: Any = ()) -> Iterator[pb.AggregateChunk]:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f"round {request.round}'s sum was pruned")
            yield  # pragma: no cover

    with pytest.raises(SessionEnd, match="cipherhive node bootstrap"):
        node._handle(Pruned(node.layout.hash, node.layout.num_values), _sum_ready(1, 0))  # type: ignore[arg-type]
    assert node.applied_round == 0
    node._check_kept(40)
    assert "cipherhive node bootstrap" in caplog.text and "from round 40 on" in caplog.text
    caplog.clear()
    node._handle(None, _sum_ready(41, 39))  # type: ignore[arg-type]
    assert "skipping round 41" in caplog.text and "cipherhive node bootstrap" in caplog.text
    node.close()


class _Watch:
    """A WatchRounds call: yields the given events, then ends (or raises)."""

    def __init__(self, events: list[pb.RoundEvent], error: grpc.RpcError | None = None) -> None:
        self.events, self.error = events, error

    def __iter__(self) -> Iterator[pb.RoundEvent]:
        yield from self.events
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        pass


def test_join_lists_a_withdrawn_round_and_the_node_rolls_back_before_watching(
    key_files: keys.KeyFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _node(key_files, tmp_path / "state", keep_checkpoints=3)
    stub = FakeStub(node.layout.hash, node.layout.num_values)
    for number in (1, 2, 3):
        _publish(key_files, stub, number, _honest(node, number))
        node._handle(stub, _sum_ready(number, number - 1))  # type: ignore[arg-type]
    watched: list[int] = []

    class Server(FakeStub):
        def Join(self, request: pb.JoinRequest, **kwargs: Any) -> pb.JoinReply:
            settings = pb.FederationSettings(min_participants=3, max_participants=64)
            return pb.JoinReply(node_name="node-1", settings=settings, withdrawn_rounds=[2, 3])

        def WatchRounds(self, request: pb.WatchRequest, **kwargs: Any) -> _Watch:
            watched.append(request.since_round)
            # The replay still lists round 2 as published: the node must not apply it.
            return _Watch([_sum_ready(2, 1)])

    server = Server(node.layout.hash, node.layout.num_values, sums=stub.sums)
    monkeypatch.setattr("cipherhive.node.daemon.pb_grpc.AggregationStub", lambda _ch: server)
    node._session()
    assert node.applied_round == 1 and node.store.chain() == [0, 1]
    assert watched == [1] and server.fetches == []
    node.close()


def test_only_a_refusal_at_join_ends_the_node(
    key_files: keys.KeyFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch stream ended by the server with any status is a reconnect; Join refusing is an exit."""
    node = _node(key_files, tmp_path / "state")
    node.config.max_backoff_seconds = 0.01
    calls: list[str] = []

    class Server(FakeStub):
        def Join(self, request: pb.JoinRequest, **kwargs: Any) -> pb.JoinReply:
            calls.append("join")
            if calls.count("join") > 2:
                raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
            return pb.JoinReply(node_name="node-1", settings=pb.FederationSettings(min_participants=3))

        def WatchRounds(self, request: pb.WatchRequest, **kwargs: Any) -> _Watch:
            calls.append("watch")
            # A sum on another base, then the server ends the stream with a non-transient status.
            return _Watch([_sum_ready(7, 6)], _Refused(grpc.StatusCode.PERMISSION_DENIED, "revoked"))

    server = Server(node.layout.hash, node.layout.num_values)
    monkeypatch.setattr("cipherhive.node.daemon.pb_grpc.AggregationStub", lambda _ch: server)
    monkeypatch.setattr(node._stop, "wait", lambda _t=None: False)  # no back-off pauses in a test
    assert node.run() == 2
    assert calls == ["join", "watch", "join", "watch", "join"]
    node.close()
