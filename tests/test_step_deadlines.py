"""Step deadlines and named culprits against real processes (docs/spec/masked-round.md §2.1, §10).

A real server and real node processes on loopback with mutual TLS and masked rounds.
A member is lost for real (SIGKILL through a failpoint, right after it enrolled or right
after its upload's receipt), or played by the test (:mod:`tests.member`) as a hostile
member with a valid certificate: it never uploads, lies in its commit, refuses every
roster, or withdraws after uploading. Each test fails if a lost member costs the
training deadline, if a hostile one keeps failing rounds, or if the server does not
name it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from cipherhive.bench.hostile import Hostile
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import Layout
from cipherhive.secagg.chain import sum_digest
from cipherhive.secagg.withdrawal import make_withdrawal
from cipherhive.v1 import federation_pb2 as pb
from tests.federations import admin, wait_online
from tests.member import Member

pytestmark = pytest.mark.slow

#: Long enough that a round which waited for it is obvious; every step after training is short.
TRAINING_SECONDS = 120.0
STEP_SECONDS = 3.0


def _federation(workdir: Path, nodes: int = 4, **rounds: object) -> LocalFederation:
    fed = LocalFederation(
        workdir,
        nodes=nodes,
        node_options={"epochs": 1, "record_dir": str(workdir / "records")},
        rounds={
            "auto_start": False,
            "timeout_seconds": TRAINING_SECONDS,
            "enrol_seconds": 20.0,
            "step_seconds": STEP_SECONDS,
            **rounds,
        },
    )
    fed.setup()
    return fed


def _applied(fed: LocalFederation, number: int, names: list[str]) -> None:
    """Every named node applied round ``number`` (the demo trainer records it), so the next round
    finds them at its base."""
    shards = [int(name.split("-")[1]) - 1 for name in names]
    folder = fed.workdir / "records" / f"round-{number}"
    fed.wait_for(
        lambda: all((folder / f"shard-{s}.applied.pt").exists() for s in shards),
        60,
        f"{', '.join(names)} to apply round {number}",
    )


def _start(fed: LocalFederation) -> int:
    """Open the next round; the last one may still be finishing its close (its record says failed
    a moment before the server lets go of it), which StartRound refuses: ask again."""

    def start() -> int | None:
        try:
            return int(admin(fed).StartRound(pb.StartRoundRequest(), timeout=30).round)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "still open" in (exc.details() or ""):
                return None
            raise

    number: int = fed.wait_for(start, 30, "the next round to open")
    return number


def _node(fed: LocalFederation, name: str) -> pb.NodeInfo:
    [info] = [n for n in admin(fed).ListNodes(pb.ListNodesRequest(), timeout=10).nodes if n.name == name]
    return info


def _quick(info: pb.RoundInfo) -> float:
    """Seconds the round was open."""
    return info.closed_unix - info.opened_unix


# --------------------------------------------------------------------------- a member lost for real


def test_a_member_lost_after_enrolling_or_after_uploading_costs_seconds_not_the_training_deadline(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """Killed right after enrolling: the round goes on without it (re-formed) or fails at its
    upload step naming it, seconds after its connection dropped. Killed right after its upload's
    receipt: the round fails at the commit step, naming it. The operator readmits both, and the
    next round publishes with all four."""
    fed = _federation(tmp_path)
    stopper.append(fed)
    fed.start_server()
    fed.wait_serving()
    for i in range(3):
        fed.start_node(i)
    fed.start_node(3, env={"CIPHERHIVE_FAILPOINTS": "node.enrolled"})
    wait_online(fed, 4)
    honest = [fed.node_name(i) for i in range(3)]

    first = _start(fed)
    info = fed.wait_round(first, 90)
    assert fed.procs["node-4"].wait(10) != 0, "the failpoint must have killed node-4"
    assert _quick(info) < TRAINING_SECONDS / 2, f"round {first} waited for the training deadline: {info}"
    if info.state == pb.ROUND_SUM_READY:
        assert info.reformed and info.participants == 3, info
        assert "roster re-formed" in fed.log("server")
        _applied(fed, first, honest)
    else:
        # The honest members uploaded before the loss was certain: the round cannot be re-formed.
        assert info.state == pb.ROUND_FAILED and info.failed_step == "upload", info
        assert list(info.culprits) == ["node-4"], info
        assert "lost its connection" in info.reason, info.reason

    # node-3 dies right after its upload's receipt, before its commit.
    fed.stop("node-3")
    fed.start_node(2, env={"CIPHERHIVE_FAILPOINTS": "node.submitted"})
    wait_online(fed, 3)
    second = _start(fed)
    info = fed.wait_round(second, 90)
    assert fed.procs["node-3"].wait(10) != 0
    assert info.state == pb.ROUND_FAILED and info.failed_step == "commit", info
    assert list(info.culprits) == ["node-3"], info
    assert _quick(info) < TRAINING_SECONDS / 2, info
    named = _node(fed, "node-3")
    assert named.offences == 1 and named.last_offence_step == "commit" and named.excluded_until_round > second
    assert "member named" in fed.log("server")

    # Readmitted, restarted: all four take part again.
    operator = admin(fed)
    for name in ("node-3", "node-4"):
        operator.ReadmitNode(pb.ReadmitNodeRequest(name=name), timeout=10)
        assert _node(fed, name).excluded_until_round == 0
    fed.start_node(2)
    fed.start_node(3)
    wait_online(fed, 4)
    base = max((r.round for r in fed.list_rounds() if r.state == pb.ROUND_SUM_READY), default=0)
    if base:
        _applied(fed, base, [fed.node_name(i) for i in range(4)])
    third = _start(fed)
    info = fed.wait_round(third, 120)
    assert info.state == pb.ROUND_SUM_READY and info.participants == 4, info


# --------------------------------------------------------------------------- withdrawals


def test_a_signed_refusal_reforms_the_round_before_any_upload_and_it_publishes(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """A member that refuses the roster withdraws, signed; forged or misdirected withdrawals are
    refused with their status; the real one re-forms the round at once, the honest members check
    the new roster and the round publishes without it; the member is named."""
    fed = _federation(tmp_path)
    stopper.append(fed)
    fed.start_server()
    fed.wait_serving()
    for i in range(3):
        fed.start_node(i)
    layout = Layout.read_file(fed.layout_file)
    names = [fed.node_name(i) for i in range(4)]
    member = Member(fed, "node-4", layout, names)
    member.join()
    wait_online(fed, 4)
    number = _start(fed)
    opened = member.wait(pb.RoundEvent.OPENED, number)

    def code(request: pb.WithdrawRequest) -> grpc.StatusCode:
        try:
            member.stub.Withdraw(request, timeout=30)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        raise AssertionError("accepted")

    # Not enrolled yet: nothing to withdraw from.
    unsigned = make_withdrawal(
        round_number=number,
        nonce=opened.nonce,
        cert_fingerprint=member.setup.tls_fingerprint,
        reason="refused the roster",
        key=member.setup.enrol_key,
    )
    assert code(pb.WithdrawRequest(round=number, withdrawal=unsigned.encode())) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    part = member.enrol(opened)
    member.wait(pb.RoundEvent.ROSTER, number)
    garbage = pb.WithdrawRequest(round=number, withdrawal=b"\x00" * 64)
    assert code(garbage) == grpc.StatusCode.INVALID_ARGUMENT
    other_round = make_withdrawal(
        round_number=number,
        nonce=bytes(32),
        cert_fingerprint=member.setup.tls_fingerprint,
        reason="refused the roster",
        key=member.setup.enrol_key,
    )
    assert code(pb.WithdrawRequest(round=number, withdrawal=other_round.encode())) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    reply = member.stub.Withdraw(
        pb.WithdrawRequest(round=number, withdrawal=part.withdrawal("refused the roster: test")), timeout=30
    )
    assert reply.round_continues
    info = fed.wait_round(number, 90)
    assert info.state == pb.ROUND_SUM_READY and info.reformed and info.participants == 3, info
    for i in range(3):
        assert "roster re-formed and verified" in fed.log(fed.node_name(i)) or "roster verified" in fed.log(
            fed.node_name(i)
        )
    named = _node(fed, "node-4")
    assert named.offences == 1 and named.last_offence_step == "withdraw", named
    assert "refused the roster: test" in named.last_offence_reason
    server_log = fed.log("server")
    assert "withdrew" in server_log and "roster re-formed" in server_log
    member.close()


# --------------------------------------------------------------------------- one hostile member


STEP_OF = {
    "never-upload": "upload",
    "lying-commit": "commit",
    "refuse-roster": "withdraw",
    "withdraw-late": "withdraw",
}


@pytest.mark.timeout(420)
@pytest.mark.parametrize("behaviour", sorted(STEP_OF))
def test_one_hostile_member_fails_at_most_two_of_eight_rounds_and_is_named(
    behaviour: str, tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """Eight consecutive rounds with one hostile member: at most two fail, every round after the
    last failure publishes, and the audit log and ``ListNodes`` name it with its step."""
    fed = _federation(tmp_path, timeout_seconds=12.0, enrol_seconds=8.0)
    stopper.append(fed)
    fed.start_server()
    fed.wait_serving()
    honest = [fed.node_name(i) for i in range(3)]
    for i in range(3):
        fed.start_node(i)
    layout = Layout.read_file(fed.layout_file)
    member = Member(fed, "node-4", layout, [fed.node_name(i) for i in range(4)])
    member.join()
    wait_online(fed, 4)
    hostile = Hostile(member, behaviour, layout)
    states: list[int] = []
    for _ in range(8):
        wait_online(fed, 4)  # an honest node whose upload a failed round cut short reconnects first
        number = _start(fed)
        player = threading.Thread(target=hostile.play, args=(number,), daemon=True)
        player.start()
        info = fed.wait_round(number, 90)
        player.join(60)
        states.append(info.state)
        if info.state == pb.ROUND_SUM_READY:
            _applied(fed, number, honest)
            # The hostile member follows the federation's history like any member (its chain
            # hash), so that it is not simply left out of the next rosters for being behind.
            member.chain.apply(sum_digest(member.fetch_sum(number)[0]))
        else:
            assert info.failed_step == STEP_OF[behaviour] and list(info.culprits) == ["node-4"], info
    assert not hostile.errors, hostile.errors
    failed = [i for i, s in enumerate(states) if s != pb.ROUND_SUM_READY]
    assert len(failed) <= 2, f"{behaviour}: rounds {[i + 1 for i in failed]} failed"
    after = states[(failed[-1] + 1) if failed else 0 :]
    assert all(s == pb.ROUND_SUM_READY for s in after), states
    assert len(hostile.enrolled) >= 2, "the hostile member must have been let in again after its exclusion"
    named = _node(fed, "node-4")
    assert named.offences >= 2 and named.last_offence_step == STEP_OF[behaviour], named
    assert "member named" in fed.log("server") and "node-4" in fed.log("server")
    for name in honest:
        assert fed.procs[name].poll() is None, f"{name} exited:\n{fed.log(name)[-2000:]}"
    member.close()
