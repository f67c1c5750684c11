"""After a restart: drop unacknowledged uploads and spools of finished rounds, and rebuild
the open round's running sum from its acknowledged (fsynced) submissions."""

from __future__ import annotations

import logging

from cipherhive.runtime.logs import event
from cipherhive.server.rounds import masked
from cipherhive.server.rounds.context import OpenRound, RoundContext, RoundControl
from cipherhive.server.storage.spool import read_records

log = logging.getLogger("cipherhive.server.rounds")


def recover(ctx: RoundContext, control: RoundControl) -> OpenRound | None:
    """The open round as it was acknowledged before the restart (None: no round was open)."""
    for path in ctx.spool.drop_partials():
        event(log, "discarded an unacknowledged upload from before the restart", path=str(path))
    for path in ctx.spool.drop_unnamed_sums(f for _, f in ctx.state.kept_sums()):
        event(log, "discarded a sum file no round record names", path=str(path))
    for done in ctx.state.rounds():
        if done.state != "open":
            ctx.spool.drop_round(done.round)
    row = ctx.state.open_round_row()
    layout = ctx.layout()
    if row is None or layout is None:
        return None
    running = control.new_sum(ctx.blocks(layout.num_values), masked=bool(row.masked))
    restored = OpenRound(row, running, layout.num_values)
    for sub in ctx.state.submissions(row.round):
        if sub.spool_file is None:
            continue
        for index, blob in enumerate(read_records(ctx.spool.path(sub.spool_file))):
            running.add(index, running.load(blob))
        restored.accepted[sub.node] = sub
    if row.masked:
        masked.restore(ctx, restored)
    event(
        log,
        "resumed open round after restart",
        round=row.round,
        accepted=len(restored.accepted),
        deadline=round(row.deadline, 3),
    )
    return restored
