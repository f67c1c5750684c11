"""After a restart: drop unacknowledged uploads and spools of finished rounds, and rebuild
the open round's running sum from its acknowledged (fsynced) submissions."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from cipherhive.runtime.logs import event
from cipherhive.server.rounds import masked
from cipherhive.server.storage.spool import read_records

if TYPE_CHECKING:
    from cipherhive.server.rounds.manager import OpenRound, RoundManager

log = logging.getLogger("cipherhive.server.rounds")


def recover(m: RoundManager) -> OpenRound | None:
    """The open round as it was acknowledged before the restart (None: no round was open)."""
    from cipherhive.server.rounds.manager import OpenRound

    for path in m.spool.drop_partials():
        event(log, "discarded an unacknowledged upload from before the restart", path=str(path))
    for done in m.state.rounds():
        if done.state != "open":
            m.spool.drop_round(done.round)
    row = m.state.open_round_row()
    layout = m.layout()
    if row is None or layout is None:
        return None
    running = m.new_sum(m._blocks(layout.num_values), masked=bool(row.masked))
    restored = OpenRound(row, running, layout.num_values)
    for sub in m.state.submissions(row.round):
        if sub.spool_file is None:
            continue
        for index, blob in enumerate(read_records(m.spool.path(sub.spool_file))):
            running.add(index, running.load(blob))
        restored.accepted[sub.node] = sub
    if row.masked:
        masked.restore(m, restored)
    event(
        log,
        "resumed open round after restart",
        round=row.round,
        accepted=len(restored.accepted),
        deadline=round(row.deadline, 3),
    )
    return restored
