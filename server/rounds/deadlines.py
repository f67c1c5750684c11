"""Step deadlines of a masked round (docs/spec/masked-round.md §10).

Training may take the round's whole ``timeout_seconds``; every step after it is
short (``step_seconds``), so a member lost after training costs seconds:

* upload: a roster member whose connection is gone for ``step_seconds`` before its
  upload arrived is lost: the round is re-formed without it if nothing was uploaded
  yet (§2.1), and fails at once otherwise;
* commit: ``step_seconds`` after its upload's receipt;
* release: ``step_seconds`` after the COMMITS event.

Each check returns what the scheduler does: nothing, re-form without some members,
or fail now with a :class:`~cipherhive.server.rounds.context.Verdict` that names the
step and the members who missed it. A deadline that counts from before a server
restart counts from the restart instead, so a restart never fails a round by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from cipherhive.server.rounds import leaving
from cipherhive.server.rounds.context import OpenRound, RoundContext, Verdict

__all__ = ["Reform", "check"]


@dataclass(frozen=True)
class Reform:
    """Re-form the round without these members (lost before anything was uploaded)."""

    leaving: frozenset[str]
    why: str


def _names(nodes: list[str]) -> str:
    return ", ".join(sorted(nodes))


def check(ctx: RoundContext, current: OpenRound, now: float) -> Verdict | Reform | None:
    """What the open masked round's step deadlines ask for now (caller holds the lock)."""
    if current.verdict is not None:
        return current.verdict
    mask = current.mask
    if mask is None:
        return None
    step = ctx.config.step_seconds
    if mask.phase == "upload":
        lost = [
            n
            for n in mask.roster
            if n not in current.accepted and n not in current.uploads and ctx.absent_for(n, now) >= step
        ]
        if lost:
            why = f"{_names(lost)} lost its connection for {step:g} s before uploading"
            if leaving.can_reform(ctx, current, set(lost)):
                return Reform(frozenset(lost), why)
            return Verdict("upload", why + "; the round cannot finish without it", tuple(sorted(lost)))
        late = [
            n
            for n, sub in current.accepted.items()
            if n not in mask.commits and now >= max(sub.accepted, ctx.started) + step
        ]
        if late:
            return Verdict(
                "commit",
                f"{_names(late)} did not commit within {step:g} s of its upload's receipt; "
                "no self-mask was released",
                tuple(sorted(late)),
            )
    elif mask.phase == "release" and mask.release_started and now >= mask.release_started + step:
        missing = mask.missing(mask.seeds)
        if missing:
            return Verdict(
                "release",
                f"{_names(missing)} did not release its self-mask within {step:g} s of the COMMITS "
                "event; the sum stays masked",
                tuple(missing),
            )
    return None
