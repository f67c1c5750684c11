"""Round events: how a round row becomes a RoundEvent, and the history a (re)connecting watcher gets.

Withdrawn rounds are replayed too, so a node that was away when a round was
withdrawn still learns about it from its next WatchRounds call.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cipherhive.server.rounds import masked
from cipherhive.server.storage.state import RoundRow
from cipherhive.v1 import federation_pb2 as pb

if TYPE_CHECKING:
    from cipherhive.server.rounds.manager import RoundManager


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
        masked=bool(row.masked),
        nonce=row.nonce or b"",
        enrol_deadline_unix=row.enrol_deadline,
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
    with m._lock:
        current = m._open if m._open is not None and not m._open.closing else None
        if current is not None:
            out.append(round_event(m, pb.RoundEvent.OPENED, current.row, replay=True))
            # A masked round's later steps too: a node that reconnects mid-round carries on.
            phase = current.mask.phase if current.mask is not None else ""
            if phase in ("upload", "release"):
                out.append(masked.roster_event(m, current))
            if phase == "release":
                out.append(masked.commits_event(m, current))
    return out
