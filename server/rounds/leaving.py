"""A member leaving a masked round: signed withdrawals, and re-forming the roster without it
(docs/spec/masked-round.md §2.1).

Re-forming is allowed only before any upload arrived, once per round, and with the floor
still met: no member's update masked for the replaced roster ever reaches the server, so
nothing leaks. Otherwise a member that leaves fails the round at once, charged to it (§10).
The step deadlines (``deadlines``) re-form the round the same way for a roster member whose
connection is gone before it uploaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from cipherhive.runtime.logs import audit
from cipherhive.secagg.roster import roster_hash
from cipherhive.secagg.wire import WireError
from cipherhive.secagg.withdrawal import Withdrawal
from cipherhive.server.rounds import culprits
from cipherhive.server.rounds.context import OpenRound, RoundContext, Verdict
from cipherhive.server.rounds.errors import refuse
from cipherhive.server.rounds.masked import open_masked, roster_event
from cipherhive.v1 import federation_pb2 as pb

if TYPE_CHECKING:
    from cipherhive.server.api.identity import Caller

__all__ = ["can_reform", "reform", "withdraw"]


def floor_of(ctx: RoundContext, current: OpenRound) -> int:
    return max(current.row.min_participants or ctx.config.min_participants, 2)


def can_reform(ctx: RoundContext, current: OpenRound, leaving: set[str]) -> bool:
    """A round may be re-formed without ``leaving`` only before anything was uploaded, once,
    and with the floor still met (docs/spec/masked-round.md §2.1; caller holds the lock)."""
    mask = current.mask
    return (
        mask is not None
        and mask.phase == "upload"
        and not mask.reformed
        and not current.accepted
        and not current.uploads
        and len(set(mask.roster) - leaving) >= floor_of(ctx, current)
    )


def _reform_locked(ctx: RoundContext, current: OpenRound, leaving: set[str]) -> None:
    """The roster without ``leaving``, durable, with its new hash (caller holds the lock)."""
    mask = current.mask
    assert mask is not None
    remaining = {n: e for n, e in mask.roster.items() if n not in leaving}
    digest = roster_hash(sorted(e.encoded for e in remaining.values()), mask.nonce)
    ctx.state.reform_roster(current.number, sorted(remaining), digest)
    mask.superseded.add(mask.roster_hash)
    mask.roster, mask.roster_hash, mask.reformed = remaining, digest, True
    row = ctx.state.round(current.number)
    assert row is not None
    current.row = row


def reform(ctx: RoundContext, number: int, leaving: set[str], why: str) -> bool:
    """Re-form the open round without ``leaving`` and send the new roster; False if it may not be."""
    with ctx.lock:
        current, mask = open_masked(ctx, number)
        if not can_reform(ctx, current, leaving):
            return False
        _reform_locked(ctx, current, leaving)
    audit(
        "roster re-formed",
        "scheduler",
        round=number,
        without=sorted(leaving),
        members=sorted(mask.roster),
        why=why,
        hash=mask.roster_hash.hex()[:16],
    )
    ctx.bus.publish(roster_event(ctx, current))
    return True


def withdraw(ctx: RoundContext, who: Caller, request: pb.WithdrawRequest) -> pb.WithdrawReply:
    """Withdraw: a member leaves the round it enrolled in, on its own signed word (§2.1).

    Enrolling: it is forgotten and not waited for. In the roster, before any upload: the
    round is re-formed without it (once). Otherwise the round cannot finish: it fails at
    the scheduler's next step, charged to the member."""
    published = charged = False
    with ctx.lock:
        current, mask = open_masked(ctx, request.round)
        if who.name in mask.withdrawn:
            return pb.WithdrawReply(round_continues=True)
        entry = mask.enrolled.get(who.name)
        if entry is None:
            raise refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{who.name!r} is not enrolled in round {current.number}; there is nothing to withdraw from",
            )
        try:
            withdrawal = Withdrawal.decode(request.withdrawal)
        except WireError as exc:
            raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed withdrawal ({exc})") from None
        if (
            withdrawal.round != current.number
            or withdrawal.nonce != mask.nonce
            or withdrawal.cert_fingerprint != entry.cert_fingerprint
        ):
            raise refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the withdrawal was made for another round or another member",
            )
        if not withdrawal.verify(entry.enrol_key):
            raise refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the withdrawal is not signed by this member's enrolment key",
            )
        if mask.phase == "enrol":
            del mask.enrolled[who.name]
            mask.withdrawn.add(who.name)
            ctx.state.drop_enrolment(current.number, who.name)
            outcome, continues = "left before the roster was fixed", True
        elif who.name not in mask.roster:
            outcome, continues = "not in the roster", True
        elif can_reform(ctx, current, {who.name}):
            _reform_locked(ctx, current, {who.name})
            mask.withdrawn.add(who.name)
            outcome, continues, published, charged = "the roster is re-formed without it", True, True, True
        else:
            if current.verdict is None:
                current.verdict = Verdict(
                    "withdraw",
                    f"{who.name} withdrew ({withdrawal.reason}) when the round could no longer go on "
                    f"without it (phase {mask.phase})",
                    (who.name,),
                )
            outcome, continues, charged = "the round fails", False, True
    audit("withdrew", who.name, round=current.number, reason=withdrawal.reason, outcome=outcome)
    if charged:
        # Leaving a roster costs the others a re-forming or the round: named and left out of the
        # next rosters like a missed step (§10), so one member cannot do it every round.
        culprits.record(ctx, current.number, who.name, "withdraw", f"withdrew: {withdrawal.reason}")
    if published:
        audit(
            "roster re-formed",
            "scheduler",
            round=current.number,
            without=[who.name],
            members=sorted(mask.roster),
            why="withdrawal",
            hash=mask.roster_hash.hex()[:16],
        )
        ctx.bus.publish(roster_event(ctx, current))
    ctx.wake()
    return pb.WithdrawReply(round_continues=continues)
