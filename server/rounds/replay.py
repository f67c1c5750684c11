"""Round events: the history a (re)connecting watcher gets (a row's RoundEvent is ``RoundContext.event``).

Withdrawn rounds are replayed too, so a node that was away when a round was
withdrawn still learns about it from its next WatchRounds call.
"""

from __future__ import annotations

from cipherhive.server.rounds import masked
from cipherhive.server.rounds.context import RoundContext
from cipherhive.v1 import federation_pb2 as pb


def history(ctx: RoundContext, since_round: int) -> list[pb.RoundEvent]:
    """Events a node that last saw ``since_round`` needs to catch up, oldest first.

    Withdrawals of rounds up to ``since_round`` come first (the node may have
    applied one before it was withdrawn, and must roll back before it follows);
    a withdrawn round after ``since_round`` replays as WITHDRAWN, never as SUM_READY.
    """
    out = [
        ctx.event(pb.RoundEvent.WITHDRAWN, row, replay=True)
        for row in ctx.state.withdrawn_rounds()
        if row.round <= since_round
    ]
    kinds = {
        "sum_ready": pb.RoundEvent.SUM_READY,
        "failed": pb.RoundEvent.FAILED,
        "withdrawn": pb.RoundEvent.WITHDRAWN,
    }
    for row in ctx.state.rounds(after=since_round):
        if row.state in kinds:
            out.append(ctx.event(kinds[row.state], row, replay=True))
    with ctx.lock:
        current = ctx.open if ctx.open is not None and not ctx.open.closing else None
        if current is not None:
            out.append(ctx.event(pb.RoundEvent.OPENED, current.row, replay=True))
            # A masked round's later steps too: a node that reconnects mid-round carries on.
            phase = current.mask.phase if current.mask is not None else ""
            if phase in ("upload", "release"):
                out.append(masked.roster_event(ctx, current))
            if phase == "release":
                out.append(masked.commits_event(ctx, current))
    return out
