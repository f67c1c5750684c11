"""The round scheduler: close rounds at their deadline or when every expected node is in,
open the next one when enough joined nodes are online."""

from __future__ import annotations

import logging
import threading
import time

from cipherhive.server.rounds import deadlines, leaving, masked
from cipherhive.server.rounds.context import RoundContext, RoundControl, Verdict
from cipherhive.server.rounds.errors import RoundError
from cipherhive.server.storage.rows import DatabaseUnavailable

log = logging.getLogger("cipherhive.server.rounds")


def run(ctx: RoundContext, control: RoundControl, stop: threading.Event) -> None:
    """The scheduler thread: a step whenever woken (an upload, a join, a close), else every 0.2 s."""
    while not stop.is_set():
        ctx.wait_for_wake(0.2)
        try:
            tick(ctx, control)
        except RoundError as exc:
            log.debug("scheduler: %s", exc.message)
        except DatabaseUnavailable as exc:
            log.warning("scheduler step waits for the round state database: %s", exc)
            stop.wait(1.0)
        except Exception:
            log.exception("scheduler step failed; retrying")
            stop.wait(1.0)


def tick(ctx: RoundContext, control: RoundControl) -> None:
    now = time.time()
    with ctx.lock:
        current = ctx.open
        due: tuple[int, str] | None = None
        roster = False
        step: Verdict | deadlines.Reform | None = None
        if current is not None and not current.closing:
            if now >= current.row.deadline:
                due = (current.number, "deadline reached")
            elif current.mask is not None:
                roster = masked.roster_due(current, now)
                if masked.complete(current):
                    due = (current.number, "every member released its self-mask")
                else:
                    step = deadlines.check(ctx, current, now)
            elif current.row.expected and set(current.row.expected) <= set(current.accepted):
                due = (current.number, "every expected node submitted")
    if roster and current is not None:
        why = masked.fix_roster(ctx, current.number)
        if why:
            control.close_round(
                current.number, "enrol deadline", fail_reason=why, verdict=Verdict("enrol", why)
            )
        return
    if isinstance(step, deadlines.Reform) and current is not None:
        if not leaving.reform(ctx, current.number, set(step.leaving), step.why):
            control.close_round(current.number, "step deadline", verdict=Verdict("upload", step.why))
        return
    if isinstance(step, Verdict) and current is not None:
        control.close_round(current.number, f"{step.step} step", verdict=step)
        return
    if due is not None:
        control.close_round(*due)
        return
    if current is None and should_start(ctx, now):
        control.start_round()


def should_start(ctx: RoundContext, now: float) -> bool:
    """Only joined, watching nodes count: a watch stream alone never starts a round."""
    if not ctx.config.auto_start or ctx.layout() is None:
        return False
    if ctx.config.max_rounds and ctx.state.count_rounds("sum_ready") >= ctx.config.max_rounds:
        return False
    if now - ctx.last_closed < ctx.config.interval_seconds:
        return False
    return len(ctx.online()) >= ctx.config.min_participants
