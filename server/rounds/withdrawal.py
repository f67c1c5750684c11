"""After publication: what nodes did with a sum, withdrawing spoiled rounds, pruning old sums.

A hostile member can spoil a round's sum (a negative weight, a huge update):
the server cannot see that, it only adds ciphertexts. The nodes can: each
checks a sum before applying it and reports "applied" or "rejected: reason"
(words only, never a decrypted value). Once more than half of a round's
participants rejected it (``withdraw_on_majority``), or when the operator says
so, the round is **withdrawn**, together with every published round built on
it; an open round built on it is failed unread. The next round then builds on
the latest round that is published and not withdrawn, and nodes that applied
a withdrawn round roll back (WITHDRAWN events, replayed to reconnecting
nodes, and ``JoinReply.withdrawn_rounds``).

Pruning keeps the newest ``keep_sums`` published sums on disk; a node that
fell further behind cannot catch up by replay and is told how to bootstrap.
"""

from __future__ import annotations

import contextlib
import logging
import time
import unicodedata

import grpc

from cipherhive.runtime.logs import audit, event
from cipherhive.server.rounds.context import RoundContext, RoundControl
from cipherhive.server.rounds.errors import RoundError
from cipherhive.server.storage.rows import OutcomeRow, RoundRow
from cipherhive.v1 import federation_pb2 as pb

log = logging.getLogger("cipherhive.server.rounds")

MAX_REASON_CHARS = 200


class NotAParticipant(RoundError):
    """An outcome report on a round the node did not take part in (docs/spec/sum-checks.md §4):
    refused, and told apart so that the handler logs it once per node rather than once per round
    of a catch-up."""


def clean_text(text: str, what: str, *, required: bool = False) -> str:
    """A client-supplied reason, safe for logs and tables: bounded, control characters escaped.

    Escaping (rather than refusing) keeps a node's report; a newline can no longer
    forge a line of the readable audit log.
    """
    if len(text) > MAX_REASON_CHARS:
        raise RoundError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{what} has {len(text)} characters; at most {MAX_REASON_CHARS} are allowed",
        )
    cleaned = "".join(
        ch if unicodedata.category(ch)[0] != "C" or ch == " " else ch.encode("unicode_escape").decode()
        for ch in text
    ).strip()
    if required and not cleaned:
        raise RoundError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{what} is required (1-{MAX_REASON_CHARS} characters)"
        )
    return cleaned


def report_outcome(
    ctx: RoundContext, control: RoundControl, node: str, number: int, applied: bool, reason: str
) -> bool:
    """Record what ``node`` did with round ``number``'s sum; True if this withdrew the round."""
    reason = "" if applied else clean_text(reason, "reason")
    row = ctx.state.round(number)
    if row is None:
        raise RoundError(grpc.StatusCode.NOT_FOUND, f"round {number} does not exist")
    if row.state not in ("sum_ready", "withdrawn"):
        raise RoundError(
            grpc.StatusCode.FAILED_PRECONDITION, f"round {number} has no published sum (it is {row.state})"
        )
    if ctx.state.submission(number, node) is None:
        raise NotAParticipant(
            grpc.StatusCode.PERMISSION_DENIED,
            f"node {node!r} did not submit to round {number}; only its participants report on its sum",
        )
    ctx.state.record_outcome(OutcomeRow(number, node, applied, reason, time.time()))
    audit("outcome reported", node, round=number, applied=applied, reason=reason)
    if applied or not ctx.config.withdraw_on_majority or row.state != "sum_ready":
        return False
    rejected = sum(not o.applied for o in ctx.state.outcomes(number))
    if rejected * 2 <= row.participants:
        return False
    why = f"{rejected} of its {row.participants} participants rejected its sum"
    try:
        withdraw_round(ctx, control, number, why, "server")
    except RoundError:
        return False  # withdrawn meanwhile (by the operator or another report)
    return True


def withdraw_round(
    ctx: RoundContext, control: RoundControl, number: int, reason: str, actor: str
) -> RoundRow:
    """Withdraw a published round and every published round built on it (transitively)."""
    reason = clean_text(reason, "reason", required=True)
    with ctx.lock:
        row = ctx.state.round(number)
        if row is None:
            raise RoundError(grpc.StatusCode.NOT_FOUND, f"round {number} does not exist")
        if row.state != "sum_ready":
            raise RoundError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {number} is {row.state}; only a published round (sum ready) can be withdrawn",
            )
        gone = {number}
        for later in ctx.state.rounds(after=number):
            if later.state == "sum_ready" and later.base_round in gone:
                gone.add(later.round)
        cascade = sorted(gone)
        now = time.time()
        for number_ in cascade:
            why = reason if number_ == number else f"it builds on withdrawn round {number}: {reason}"
            for sum_file in ctx.state.withdraw([number_], why, now):
                ctx.spool.delete_sum(sum_file)
        opened = ctx.open_row()
    audit("round withdrawn", actor, round=number, cascade=cascade[1:], reason=reason)
    for number_ in cascade:
        withdrawn = ctx.state.round(number_)
        assert withdrawn is not None
        ctx.bus.publish(ctx.event(pb.RoundEvent.WITHDRAWN, withdrawn))
    if opened is not None and opened.base_round in gone:
        # Closed meanwhile? close_round fails a round whose base is withdrawn anyway.
        with contextlib.suppress(RoundError):
            control.close_round(
                opened.round,
                "base round withdrawn",
                actor,
                fail_reason=f"it builds on round {opened.base_round}, which was withdrawn: {reason}",
            )
    result = ctx.state.round(number)
    assert result is not None
    return result


def prune_sums(ctx: RoundContext) -> list[int]:
    """Delete published sums beyond ``keep_sums``, oldest first; never the newest one."""
    keep = ctx.config.keep_sums
    if keep <= 0:
        return []
    pruned = []
    for number, sum_file in ctx.state.kept_sums()[keep:]:
        ctx.state.forget_sum(number)
        ctx.spool.delete_sum(sum_file)
        pruned.append(number)
    if pruned:
        event(log, "pruned old sums", rounds=f"{pruned[-1]}..{pruned[0]}", keep_sums=keep)
    return pruned


def pruned_message(number: int, keep: int) -> str:
    return (
        f"round {number}'s sum was pruned (the server keeps the last {keep}); this node cannot catch up "
        "by replay: bootstrap it from another member's export, see `cipherhive node bootstrap`"
    )
