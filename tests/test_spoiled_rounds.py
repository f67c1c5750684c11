"""A member that spoils every round: the honest members' state stays bounded.

SecAgg hides who spoiled a sum, so a hostile member can make every round fail its
checks and be withdrawn (docs/spec/sum-checks.md §8). Each withdrawn round used to leave
records on every honest member that never went away: a release-ledger entry for a new
version of the same base, an entry in the node's set of withdrawn rounds, and files of
rounds the node only heard withdrawn. Here two honest members go through 200 spoiled and
withdrawn rounds: one rejects every sum, one (with a lax ``max_update_value``) applies it
and rolls back, and both take part in every round as a masked round's node does (the
release ledger's real file, ``MaskedRoundDriver._ledger_key``, the real sum applier and
roll-back handler, restarts and reconnects replaying every withdrawn round). Their
records are counted after every round. The last test does a few such rounds with real
processes: three real nodes and a hostile member the test plays (:mod:`tests.member`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cipherhive.ckks import keys
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import LEADING_VALUES, Layout
from cipherhive.node.daemon import Node
from cipherhive.node.secagg.participation import part_path
from cipherhive.node.secagg.release_ledger import FILE_NAME, LedgerError, ReleaseLedger
from cipherhive.node.state.checkpoint import REJECTED
from cipherhive.node.state.model_state import KEEP_WITHDRAWN, WithdrawnRounds
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc
from tests.member import Member
from tests.test_node_state import FakeStub, _honest, _node, _publish, _sum_ready, _Watch

SPOILED = 200
KEEP_CHECKPOINTS = 3
#: Good rounds among the spoiled ones (after these many spoiled rounds): each moves the base on.
GOOD_AFTER = (80, 150)
#: Spoiled rounds a member misses the end of (away while it was published and withdrawn),
#: then restarts and reconnects.
AWAY_AT = (40, 120, 190)
CHAIN = "0" * 64


# --------------------------------------------------------------------------- the ledger's rule


def _key(base: int, withdrawn: int, chain: str = CHAIN) -> str:
    return f"{base}:{chain}:w{withdrawn}"


@pytest.mark.timeout(30)
def test_a_newer_version_of_a_base_supersedes_the_older_ones(tmp_path: Path) -> None:
    """Recording (base, chain, w') drops every (base, chain, w < w') and refuses it still."""
    ledger = ReleaseLedger.init(tmp_path / FILE_NAME)
    other = "1" * 64
    for key in (_key(0, 0), _key(0, 3), _key(0, 0, other), "opaque-1", "opaque-2", _key(5, 0)):
        ledger.record_release(key)
    assert ledger.released() == {_key(0, 3), _key(0, 0, other), "opaque-1", "opaque-2", _key(5, 0)}
    ledger.record_release(_key(0, 9))
    assert ledger.released() == {_key(0, 9), _key(0, 0, other), "opaque-1", "opaque-2", _key(5, 0)}
    # Every version recorded, dropped or not, is refused; so is any older version never recorded.
    for key in (_key(0, 0), _key(0, 3), _key(0, 7), _key(0, 9), _key(5, 0), "opaque-1"):
        assert not ledger.may_release(key) and not ledger.may_upload(key), key
        with pytest.raises(LedgerError, match="already released"):
            ledger.record_release(key)
    # A newer version, another chain, another base: a new version of the model.
    for key in (_key(0, 10), _key(0, 3, "2" * 64), _key(4, 0), _key(5, 6), "opaque-3"):
        assert ledger.may_release(key) and ledger.may_upload(key), key
    # A restarted node reads the same answers from the file.
    again = ReleaseLedger(ledger.path)
    assert again.released() == ledger.released() and not again.may_upload(_key(0, 3))


@pytest.mark.timeout(30)
def test_the_pruned_ledger_still_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    ledger = ReleaseLedger.init(path)
    for w in range(5):
        ledger.record_release(_key(0, w))
    assert ledger.released() == {_key(0, 4)}
    # Dropping the newest record by hand (to release on it again) breaks the check.
    doc = json.loads(path.read_text())
    doc["released"] = []
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="corrupt"):
        ledger.may_upload(_key(0, 5))
    path.unlink()
    with pytest.raises(LedgerError, match="missing"):
        ledger.may_release(_key(0, 5))


@pytest.mark.timeout(30)
def test_withdrawn_rounds_keep_the_newest() -> None:
    rounds = WithdrawnRounds(range(1, 1001))  # what a Join lists at most
    assert len(rounds) == KEEP_WITHDRAWN and max(rounds) == 1000 and min(rounds) == 1001 - KEEP_WITHDRAWN
    rounds.add(3)  # an old one, replayed: not kept
    assert 3 not in rounds and len(rounds) == KEEP_WITHDRAWN
    rounds.add(1002)
    assert 1002 in rounds and 1001 - KEEP_WITHDRAWN not in rounds
    assert list(rounds) == sorted(rounds)


# --------------------------------------------------------------------------- 200 spoiled rounds


def _spoiled_vector(num_values: int) -> np.ndarray:
    """A tiny weight carrying a huge update: the mean moves by ~26 per value."""
    vector = np.zeros(num_values)
    vector[0], vector[1] = 1e-6, 1.0
    vector[LEADING_VALUES:] = 50.0
    return vector


def _withdrawn(number: int, replay: bool = False) -> pb.RoundEvent:
    return pb.RoundEvent(
        kind=pb.RoundEvent.WITHDRAWN, round=number, reason="3 of its 4 participants", replay=replay
    )


@dataclass
class Honest:
    """One honest member, and every ledger key it ever recorded."""

    key_files: keys.KeyFiles
    state_dir: Path
    settings: dict[str, Any]
    node: Node = field(init=False)
    recorded: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node = _node(self.key_files, self.state_dir, keep_checkpoints=KEEP_CHECKPOINTS, **self.settings)

    def restart(self) -> None:
        self.node.close()
        self.node = _node(self.key_files, self.state_dir, keep_checkpoints=KEEP_CHECKPOINTS, **self.settings)

    def take_part(self, number: int) -> None:
        """What ``MaskedRoundDriver.run`` leaves in the ledger and the state directory, up to the
        release: may it upload on the base, its upload and participation files, its submission,
        and the release recorded before the seed goes."""
        node = self.node
        base = node.applied_round
        key = node.masked._ledger_key(base)
        assert node.state.ledger.may_upload(key), f"round {number}: refused base {key}"
        (self.state_dir / f"upload-{number}.ct").write_bytes(b"masked ciphertexts")
        part_path(self.state_dir, number).write_text("{}")
        node.store.mark_submitted(number, node.store.submission_id(number), f"receipt-{number}", 0.4)
        node.state.ledger.record_release(key)
        self.recorded.append(key)

    def handle(self, stub: Any, ev: pb.RoundEvent) -> None:
        self.node._handle(stub, ev)
        self.node.state.resync = False  # the daemon would follow the federation again from here

    def reconnect(self, withdrawn: list[int], monkeypatch: pytest.MonkeyPatch, stub: FakeStub) -> None:
        """A session as the server gives one: Join lists the newest withdrawn rounds, and the
        watch replays withdrawn rounds as server/rounds/replay.py does."""
        node = self.node

        class Server(FakeStub):
            def Join(self, request: pb.JoinRequest, **kwargs: Any) -> pb.JoinReply:
                settings = pb.FederationSettings(min_participants=3, max_participants=64, weight_unit=1000.0)
                return pb.JoinReply(node_name="node-1", settings=settings, withdrawn_rounds=withdrawn[-1000:])

            def WatchRounds(self, request: pb.WatchRequest, **kwargs: Any) -> _Watch:
                # The newest withdrawals up to the node's round first, then every one after it.
                before = [r for r in withdrawn if r <= request.since_round][-1000:]
                after = [r for r in withdrawn if r > request.since_round]
                return _Watch([_withdrawn(r, replay=True) for r in before + after])

        server = Server(stub.layout_hash, stub.num_values, sums=stub.sums)
        monkeypatch.setattr("cipherhive.node.daemon.pb_grpc.AggregationStub", lambda _ch: server)
        node._session()
        node.state.resync = False

    def records(self) -> dict[str, int]:
        files = sorted(p.name for p in self.state_dir.iterdir())
        return {
            "ledger": len(self.node.state.ledger.released()),
            "withdrawn": len(self.node.state.withdrawn),
            "rejections": len(json.loads((self.state_dir / REJECTED).read_text() or "{}"))
            if (self.state_dir / REJECTED).exists()
            else 0,
            "files": len(files),
            "round files": sum(bool(re.match(r"(upload|round|sum)-", f)) for f in files),
        }


@pytest.mark.timeout(90)
def test_two_hundred_spoiled_rounds_leave_bounded_state(
    key_files: keys.KeyFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strict = Honest(key_files, tmp_path / "strict", {})
    lax = Honest(key_files, tmp_path / "lax", {"max_update_value": 100.0})
    members = (strict, lax)
    stub = FakeStub(strict.node.layout.hash, strict.node.layout.num_values)
    node = strict.node
    spoiled_sum = [*_honest(node, 7), _spoiled_vector(node.layout.num_values)]
    _publish(key_files, stub, 0, spoiled_sum, participants=4)  # the same sum serves every round
    blobs = stub.sums.pop(0)
    withdrawn: list[int] = []
    good = 0
    number = 0
    worst: dict[str, dict[str, int]] = {"strict": {}, "lax": {}}
    for spoiled in range(1, SPOILED + 1):
        number += 1
        base = strict.node.applied_round
        assert lax.node.applied_round == base
        for member in members:
            member.take_part(number)
        stub.sums[number] = blobs
        away = spoiled in AWAY_AT
        if not away:
            for member in members:
                member.handle(stub, _sum_ready(number, base, participants=4))
            assert strict.node.applied_round == base and lax.node.applied_round == number
        else:
            for member in members:
                # A restart while the round is open: the Join brings the newest withdrawn round
                # back, so the version asked for is the one released on, and it is refused.
                member.restart()
                member.reconnect(withdrawn, monkeypatch, stub)
                assert member.node.masked._ledger_key(base) == member.recorded[-1]
                assert not member.node.state.ledger.may_upload(member.recorded[-1])
                # Then the round is published, the download is cut short with the connection,
                # and the round is withdrawn while the member is away.
                (member.state_dir / f"sum-{number}.download").write_bytes(b"half a sum")
                (member.state_dir / f"upload-{number}.partial").write_bytes(b"")
        withdrawn.append(number)
        stub.sums.pop(number)
        for member in members:
            if away:  # it learns of the withdrawal only from the next session's Join and replay
                member.reconnect(withdrawn, monkeypatch, stub)
            else:
                member.handle(stub, _withdrawn(number))
            assert member.node.applied_round == base
            # The next round on the base is a new version of it, named by the newest withdrawal.
            version = member.node.masked._ledger_key(base)
            assert version == f"{member.recorded[-1].rpartition(':w')[0]}:w{number}"
            assert member.node.state.ledger.may_upload(version)

        if spoiled in GOOD_AFTER:  # a round without the hostile member: everybody applies it
            number += 1
            good += 1
            for member in members:
                member.take_part(number)
            _publish(key_files, stub, number, _honest(node, number))
            for member in members:
                member.handle(stub, _sum_ready(number, base))
                assert member.node.applied_round == number

        for name, member in (("strict", strict), ("lax", lax)):
            now = member.records()
            worst[name] = {k: max(v, worst[name].get(k, 0)) for k, v in now.items()}
            # One record per base the member released on: the good rounds' bases and the first.
            assert now["ledger"] <= 1 + good, (name, number, member.node.state.ledger.released())
            assert now["withdrawn"] <= KEEP_WITHDRAWN
            assert now["rejections"] <= 1
            assert now["round files"] == 0, sorted(p.name for p in member.state_dir.iterdir())
            # checkpoint.pt, the kept ones, chain.json, pending.json, rejected.json, the ledger, and
            # history.json (its newest round_history.MAX_ROUNDS rounds).
            assert now["files"] <= 6 + KEEP_CHECKPOINTS, sorted(p.name for p in member.state_dir.iterdir())

    assert strict.records()["ledger"] == lax.records()["ledger"] == 1 + len(GOOD_AFTER)
    assert max(strict.node.state.withdrawn) == max(withdrawn)
    # No weakening: every version either member ever released on is still refused.
    for member in members:
        assert len(member.recorded) == SPOILED + len(GOOD_AFTER)
        assert len(set(member.recorded)) == len(member.recorded)
        refused = [not member.node.state.ledger.may_release(key) for key in member.recorded]
        assert all(refused), [k for k, r in zip(member.recorded, refused, strict=True) if not r]
    # The bounds are reached, and hold: 3 bases released on, the newest withdrawn rounds.
    for name in ("strict", "lax"):
        assert worst[name]["ledger"] == 1 + len(GOOD_AFTER) and worst[name]["withdrawn"] == KEEP_WITHDRAWN
    for member in members:
        member.node.close()


# --------------------------------------------------------------------------- real processes

HONEST = 3
REAL_ROUNDS = 5


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[LocalFederation]:
    fed = LocalFederation(
        tmp_path,
        nodes=HONEST + 1,
        node_options={"epochs": 1},
        rounds={"auto_start": False, "timeout_seconds": 60.0, "enrol_seconds": 20.0},
    )
    fed.setup()
    try:
        yield fed
    finally:
        fed.stop_all()


def _state(fed: LocalFederation, index: int) -> tuple[list[str], list[str]]:
    """An honest member's release-ledger entries and the files in its state directory."""
    state_dir = fed.workdir / f"{fed.node_name(index)}-state"
    released = json.loads((state_dir / FILE_NAME).read_text())["released"]
    return sorted(released), sorted(p.name for p in state_dir.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_spoiled_and_withdrawn_masked_rounds_leave_no_trace(federation: LocalFederation) -> None:
    fed = federation
    fed.start_server()
    fed.wait_serving()
    for i in range(HONEST):
        fed.start_node(i)
    layout = Layout.read_file(fed.layout_file)
    mallory = Member(fed, fed.node_name(HONEST), layout, [fed.node_name(i) for i in range(HONEST + 1)])
    mallory.join()
    admin = pb_grpc.AdminStub(fed.admin_channel())
    fed.wait_for(
        lambda: sum(n.online for n in admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes) == HONEST + 1,
        90,
        "every member online",
    )
    spoiled = np.zeros(layout.num_values)
    spoiled[0], spoiled[1] = -100.0, 1.0  # a negative weight: every honest member rejects the sum
    after_first: list[tuple[list[str], list[str]]] = []
    for attempt in range(REAL_ROUNDS):
        opened = admin.StartRound(pb.StartRoundRequest(), timeout=30)
        assert opened.base_round == 0, "every round builds on the same base"
        number = int(opened.round)
        part = mallory.enrol(mallory.wait(pb.RoundEvent.OPENED, number))
        part.accept_roster(list(mallory.wait(pb.RoundEvent.ROSTER, number).roster))
        mallory.upload(part, spoiled, number, 0)
        mallory.commit(part, number)
        mallory.release(part, mallory.wait(pb.RoundEvent.COMMITS, number))
        mallory.wait(pb.RoundEvent.WITHDRAWN, number, timeout=60)

        def settled(number: int = number) -> bool:
            pattern = re.compile(rf"round withdrawn \[node={{}} round={number}\b")
            return all(
                re.search(pattern.pattern.format(fed.node_name(i)), fed.log(fed.node_name(i)))
                for i in range(HONEST)
            )

        fed.wait_for(settled, 60, f"every honest member to handle the withdrawal of round {number}")
        for i in range(HONEST):
            name = fed.node_name(i)
            assert fed.procs[name].poll() is None, f"{name} exited:\n{fed.log(name)[-2000:]}"
            assert f"rejected the sum of round {number}" in fed.log(name)
        states = [_state(fed, i) for i in range(HONEST)]
        for released, _files in states:
            assert len(released) == 1 and released[0].endswith(f":w{number - 1}" if attempt else ":w0")
        if attempt == 0:
            after_first = states
        else:  # the same single ledger entry (a newer version), the same files
            assert [files for _, files in states] == [files for _, files in after_first]
    mallory.close()
    for i in range(HONEST):
        assert fed.stop(fed.node_name(i)) == 0, fed.log(fed.node_name(i))[-2000:]
