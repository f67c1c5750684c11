"""Round events: how a round row becomes a RoundEvent, and the history a (re)connecting watcher gets.

Withdrawn rounds are replayed too, so a node that was away when a round was
withdrawn still learns about it from its next WatchRounds call.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cipherhive.server.state import RoundRow
from cipherhive.v1 import federation_pb2 as pb

if TYPE_CHECKING:
    from cipherhive.server.rounds import RoundManager


def round_event(
    m: RoundManager,
    kind: pb.RoundEvent.Kind,
    row: RoundRow,
    *,
    reason: str = "",
    participants: int | None = None,
    replay: bool = False,
) -> pb.RoundEvent:
    if not reason:
        reason = row.withdrawn_reason if kind == pb.RoundEvent.WITHDRAWN else row.reason
    return pb.RoundEvent(
        kind=kind,
        round=row.round,
        base_round=row.base_round,
        reason=reason,
        deadline_unix=row.deadline,
        expected=len(row.expected),
        participants=row.participants if participants is None else participants,
        replay=replay,
        time_unix=time.time(),
        # Rows from before the floor was recorded (schema 1) fall back to the setting.
        min_participants=row.min_participants or m.config.min_participants,
    )


def history(m: RoundManager, since_round: int) -> list[pb.RoundEvent]:
    """Events a node that last saw ``since_round`` needs to catch up, oldest first.

    Withdrawals of rounds up to ``since_round`` come first (the node may have
    applied one before it was withdrawn, and must roll back before it follows);
    a withdrawn round after ``since_round`` replays as WITHDRAWN, never as SUM_READY.
    """
    out = [
        round_event(m, pb.RoundEvent.WITHDRAWN, row, replay=True)
        for row in m.state.withdrawn_rounds()
        if row.round <= since_round
    ]
    kinds = {
        "sum_ready": pb.RoundEvent.SUM_READY,
        "failed": pb.RoundEvent.FAILED,
        "withdrawn": pb.RoundEvent.WITHDRAWN,
    }
    for row in m.state.rounds(after=since_round):
        if row.state in kinds:
            out.append(round_event(m, kinds[row.state], row, replay=True))
    opened = m.open_row()
    if opened is not None:
        out.append(round_event(m, pb.RoundEvent.OPENED, opened, replay=True))
    return out
