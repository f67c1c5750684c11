"""Outcome reports, withdrawn rounds and pruned sums, on an in-process RoundManager.

The round manager is driven exactly as the RPC handlers drive it (join, start,
ingest, close, report), with real ciphertexts, so the published sums and the
files on disk are the real ones. The end-to-end version, with real node
processes and a hostile member, is in tests/test_withdrawal_federation.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from cipherhive.ckks import codec, keys
from cipherhive.federation.layout import Layout, LayoutError, TensorSpec, check_bounds
from cipherhive.server.api.sum_stream import stream_sum
from cipherhive.server.config import ServerConfig
from cipherhive.server.rounds.events import Subscription
from cipherhive.server.rounds.manager import RoundError, RoundManager
from cipherhive.server.storage.spool import Spool
from cipherhive.server.storage.state import State
from cipherhive.v1 import federation_pb2 as pb
from tests.ingesting import ingest_messages

LAYOUT = Layout((TensorSpec("w", (10,)),))


@dataclass
class World:
    manager: RoundManager
    secret: codec.SecretCodec
    fingerprint: str
    state_dir: Path

    def publish(self, nodes: tuple[str, ...] = ("a", "b", "c")) -> int:
        """One round in which ``nodes`` submit; returns its number (published)."""
        m = self.manager
        row = m.start_round(timeout=3600, actor="test", force=True)
        for node in nodes:
            self.submit(row.round, row.base_round, node)
        closed = m.close_round(row.round, "test", actor="test")
        assert closed.state == "sum_ready", closed.reason
        return row.round

    def submit(self, number: int, base: int, node: str) -> None:
        cts = list(self.secret.encrypt_all(np.full(LAYOUT.num_values, 0.5)))
        header = pb.SubmitHeader(
            round=number,
            base_round=base,
            submission_id=f"{node}-{number}-{os.urandom(4).hex()}",
            layout_hash=LAYOUT.hash,
            key_fingerprint=self.fingerprint,
            num_values=LAYOUT.num_values,
            num_ciphertexts=len(cts),
        )
        chunks = [
            pb.SubmitRequest(chunk=pb.SubmitChunk(index=i, first_ciphertext=i, ciphertexts=[c]))
            for i, c in enumerate(cts)
        ]
        ingest_messages(self.manager, node, [pb.SubmitRequest(header=header), *chunks])

    def fetch_error(self, number: int) -> RoundError:
        m = self.manager
        with pytest.raises(RoundError) as err:
            list(
                stream_sum(
                    m.state, m.spool, pb.FetchRequest(round=number), LAYOUT.hash, 16, m.config.keep_sums
                )
            )
        return err.value


@pytest.fixture(scope="module")
def keyfiles(tmp_path_factory: pytest.TempPathFactory) -> keys.KeyFiles:
    return keys.keygen(tmp_path_factory.mktemp("keys") / "keys")


def _world(tmp_path: Path, files: keys.KeyFiles, **settings: object) -> World:
    config = ServerConfig(
        insecure=True,
        state_dir=tmp_path / "state",
        public_context=files.public,
        min_participants=2,
        **settings,  # type: ignore[arg-type]
    )
    state = State(config.state_dir / "state.db")
    public = codec.PublicCodec(files.public.read_bytes())
    manager = RoundManager(config, state, Spool(config.state_dir), public, files.fingerprint)
    manager.set_layout(LAYOUT, actor="test")
    for node in ("a", "b", "c", "d"):
        manager.join(node, files.fingerprint, LAYOUT)
    return World(manager, codec.SecretCodec(files.secret.read_bytes()), files.fingerprint, config.state_dir)


@pytest.fixture
def world(tmp_path: Path, keyfiles: keys.KeyFiles) -> Iterator[World]:
    w = _world(tmp_path, keyfiles)
    yield w
    w.manager.state.close()


def test_majority_of_rejections_withdraws_the_round_and_what_built_on_it(world: World) -> None:
    m = world.manager
    one = world.publish()
    two = world.publish()
    opened = m.start_round(timeout=3600, actor="test", force=True)
    assert opened.base_round == two
    world.submit(opened.round, two, "a")
    # The bus feeds asyncio streams: subscribe from a loop, as a WatchRounds stream does.
    loop = asyncio.new_event_loop()

    async def subscribe() -> Subscription:
        return m.bus.subscribe()

    events = loop.run_until_complete(subscribe())

    assert m.report_outcome("a", one, False, "total weight -98.2 is not positive") is False
    with pytest.raises(RoundError) as err:
        m.report_outcome("d", one, False, "I was not there")
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert m.report_outcome("c", one, True, "ignored when applied") is False
    # One rejection (reported twice: the later report replaces the earlier) is not a majority of
    # three participants; a second rejecting node makes more than half.
    assert m.report_outcome("a", one, False, "weight again") is False
    assert m.report_outcome("b", one, False, "weight") is True

    rows = {r.round: r for r in m.state.rounds()}
    assert rows[one].state == rows[two].state == "withdrawn"
    assert rows[one].withdrawn_reason == "2 of its 3 participants rejected its sum"
    assert rows[two].withdrawn_reason.startswith(f"it builds on withdrawn round {one}")
    assert rows[opened.round].state == "failed" and "which was withdrawn" in rows[opened.round].reason
    assert not list((world.state_dir / "sums").iterdir())  # withdrawn sums are deleted
    assert not (world.state_dir / "spool" / f"round-{opened.round}").exists()  # unread
    outcomes = {o.node: o for o in m.state.outcomes(one)}
    assert outcomes["c"].applied and outcomes["c"].reason == ""
    assert outcomes["a"].reason == "weight again"

    async def delivered() -> None:
        """Nothing to do: before this coroutine's first step, the loop runs every callback the bus
        queued on it from this thread (call_soon_threadsafe; the loop runs callbacks in order)."""

    loop.run_until_complete(delivered())
    loop.close()
    kinds = []
    while not events.queue.empty():
        ev = events.queue.get_nowait()
        assert ev is not None
        kinds.append((pb.RoundEvent.Kind.Name(ev.kind), ev.round))
    assert ("WITHDRAWN", one) in kinds and ("WITHDRAWN", two) in kinds and ("FAILED", opened.round) in kinds
    replay = [(pb.RoundEvent.Kind.Name(e.kind), e.round) for e in m.history(two)]
    assert replay == [("WITHDRAWN", one), ("WITHDRAWN", two), ("FAILED", opened.round)]
    assert all(e.replay and e.min_participants == 2 for e in m.history(0))

    err_ = world.fetch_error(one)
    assert err_.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err_.message == f"round {one} was withdrawn: 2 of its 3 participants rejected its sum"
    # The next round builds on the last round that is published and not withdrawn.
    assert m.start_round(timeout=3600, actor="test", force=True).base_round == 0
    with pytest.raises(RoundError, match="only a published round"):
        m.withdraw_round(one, "again", actor="test")


def test_operator_withdrawal_keeps_earlier_rounds(world: World) -> None:
    m = world.manager
    one, two, three = world.publish(), world.publish(), world.publish()
    row = m.withdraw_round(two, "spoiled\nforged line", actor="operator")
    assert row.state == "withdrawn" and row.withdrawn_reason == "spoiled\\nforged line"
    states = {r.round: r.state for r in m.state.rounds()}
    assert states == {one: "sum_ready", two: "withdrawn", three: "withdrawn"}
    assert m.state.latest_sum_round() == one
    assert [r.round for r in m.state.withdrawn_rounds()] == [two, three]
    for bad, code in [("", grpc.StatusCode.INVALID_ARGUMENT), ("x" * 201, grpc.StatusCode.INVALID_ARGUMENT)]:
        with pytest.raises(RoundError) as err:
            m.withdraw_round(one, bad, actor="operator")
        assert err.value.code == code
    with pytest.raises(RoundError) as err:
        m.withdraw_round(99, "none", actor="operator")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_no_withdrawal_without_withdraw_on_majority(tmp_path: Path, keyfiles: keys.KeyFiles) -> None:
    w = _world(tmp_path, keyfiles, withdraw_on_majority=False)
    one = w.publish(("a", "b"))
    assert w.manager.report_outcome("a", one, False, "no") is False
    assert w.manager.report_outcome("b", one, False, "no") is False
    assert w.manager.state.round(one).state == "sum_ready"  # type: ignore[union-attr]
    w.manager.state.close()


def test_pruning_keeps_the_newest_sums(tmp_path: Path, keyfiles: keys.KeyFiles) -> None:
    w = _world(tmp_path, keyfiles, keep_sums=2)
    numbers = [w.publish(("a", "b")) for _ in range(4)]
    sums = sorted(p.name for p in (w.state_dir / "sums").iterdir())
    assert sums == [f"round-{n}.sum" for n in numbers[2:]]
    assert w.manager.state.oldest_kept_round() == numbers[2]
    assert w.manager.settings().oldest_kept_round == numbers[2]
    err = w.fetch_error(numbers[0])
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.message == (
        f"round {numbers[0]}'s sum was pruned (the server keeps the last 2); this node cannot catch up "
        "by replay: bootstrap it from another member's export, see `cipherhive node bootstrap`"
    )
    # Withdrawing the newest leaves the one before as the newest kept; a new round prunes again.
    w.manager.withdraw_round(numbers[3], "spoiled", actor="operator")
    fresh = w.publish(("a", "b"))
    assert fresh == numbers[3] + 1
    assert [n for n, _ in w.manager.state.kept_sums()] == [fresh, numbers[2]]
    w.manager.state.close()


@pytest.mark.parametrize(
    ("tensors", "base", "message"),
    [
        ([("w", [2**19, 2**19])], "", "past 2147483648 values"),
        ([(f"t{i}", [1]) for i in range(10_001)], "", "more than 10000 tensors"),
        ([("a b", [2])], "", "'a b': a name must be 1-200"),
        ([("a\nb", [2])], "", "a name must be"),
        (([("x" * 201, [2])]), "", "a name must be 1-200"),
        ([("w", [])], "", "has 0 dimensions"),
        ([("w", [1] * 9)], "", "has 9 dimensions"),
        ([("w", [0])], "", "dimension 0 must be"),
        ([("w", [-1])], "", "dimension -1 must be"),
        ([("w", [2]), ("w", [3])], "", "appears twice"),
        ([("w", [2])], "xyz", "base_model_hash"),
    ],
)
def test_layout_bounds(tensors: list[tuple[str, list[int]]], base: str, message: str) -> None:
    with pytest.raises(LayoutError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_bounds(tensors, base)


def test_layout_file_bounds(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (4 * 1024 * 1024 + 1))
    with pytest.raises(LayoutError, match="at most 4194304"):
        Layout.read_file(big)
    assert Layout.read_file(_write(tmp_path / "ok.json", LAYOUT.pretty())) == LAYOUT
    for text in ("[]", "{}", '{"tensors": [["w"]]}', "not json"):
        with pytest.raises(LayoutError):
            Layout.checked_from_json(text)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_node_layout_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keyfiles: keys.KeyFiles
) -> None:
    """`cipherhive node layout` writes what the node joins with, and says how to pin it."""
    from cipherhive.cli import main

    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\ninsecure = true\nname = "n"\nsecret_context = "{keyfiles.secret}"\n'
        '[trainer]\nplugin = "cipherhive.demo.digits:DigitsTrainer"\n'
        "options = { shard = 0, shards = 3 }\n",
        encoding="utf-8",
    )
    out = tmp_path / "layout.json"
    assert main(["node", "layout", "--config", str(toml), "--out", str(out)]) == 0
    layout = Layout.read_file(out)
    printed = capsys.readouterr().out
    assert f"layout hash: {layout.hash}" in printed
    assert f"size: {layout.num_params} values in {len(layout.tensors)} tensors" in printed
    assert "cipherhive ctl federation init --layout" in printed
    assert len(layout.initial_model_hash) == 64  # the initial values' fingerprint is in the file
    assert f"initial model fingerprint: {layout.initial_model_hash[:16]}" in printed
    assert [t.name for t in layout.tensors] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not (tmp_path / "node-state").exists()  # nothing of the node's state is touched


def test_configured_layout_is_pinned_at_start_and_cannot_move_once_published(
    tmp_path: Path, keyfiles: keys.KeyFiles
) -> None:
    w = _world(tmp_path, keyfiles)
    w.publish(("a", "b"))
    w.manager.state.close()
    other = _write(tmp_path / "other.json", Layout((TensorSpec("v", (3,)),)).pretty())
    same = _write(tmp_path / "same.json", LAYOUT.pretty())
    public = codec.PublicCodec(keyfiles.public.read_bytes())

    def start(layout_file: Path) -> RoundManager:
        config = ServerConfig(
            insecure=True, state_dir=tmp_path / "state", public_context=keyfiles.public, layout=layout_file
        )
        state = State(config.state_dir / "state.db")
        try:
            return RoundManager(config, state, Spool(config.state_dir), public, keyfiles.fingerprint)
        except BaseException:
            state.close()
            raise

    with pytest.raises(
        LayoutError, match=r"other.json: cannot replace the layout: 1 round\(s\) have been published"
    ):
        start(other)
    manager = start(same)  # the same layout again: nothing to do
    assert manager.layout() == LAYOUT
    manager.state.close()
