"""The round scheduler: close rounds at their deadline or when every expected node is in,
open the next one when enough joined nodes are online."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from cipherhive.server.rounds import masked
from cipherhive.server.rounds.errors import RoundError

if TYPE_CHECKING:
    from cipherhive.server.rounds.manager import RoundManager

log = logging.getLogger("cipherhive.server.rounds")


def run(m: RoundManager, stop: threading.Event) -> None:
    while not stop.is_set():
        m._wake.wait(0.2)
        m._wake.clear()
        try:
            tick(m)
        except RoundError as exc:
            log.debug("scheduler: %s", exc.message)
        except Exception:
            log.exception("scheduler step failed; retrying")
            stop.wait(1.0)


def tick(m: RoundManager) -> None:
    now = time.time()
    with m._lock:
        current = m._open
        due: tuple[int, str] | None = None
        roster = False
        if current is not None and not current.closing:
            if now >= current.row.deadline:
                due = (current.number, "deadline reached")
            elif current.mask is not None:
                roster = masked.roster_due(current, now)
                if masked.complete(current):
                    due = (current.number, "every member released its self-mask")
            elif current.row.expected and set(current.row.expected) <= set(current.accepted):
                due = (current.number, "every expected node submitted")
    if roster and current is not None:
        why = masked.fix_roster(m, current.number)
        if why:
            m.close_round(current.number, "enrol deadline", fail_reason=why)
        return
    if due is not None:
        m.close_round(*due)
        return
    if current is None and should_start(m, now):
        m.start_round()


def should_start(m: RoundManager, now: float) -> bool:
    """Only joined, watching nodes count: a watch stream alone never starts a round."""
    if not m.config.auto_start or m.layout() is None:
        return False
    if m.config.max_rounds and m.state.count_rounds("sum_ready") >= m.config.max_rounds:
        return False
    if now - m._last_closed < m.config.interval_seconds:
        return False
    return len(m.online()) >= m.config.min_participants
