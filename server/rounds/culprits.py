"""Named culprits and their exclusion from later rosters (docs/spec/masked-round.md §10).

A member that missed a signed step it had committed to (enrolled and never uploaded,
uploaded and never committed, committed and never released its seed), sent a step
the server had to refuse (a lying commit, a seed that is not the committed one, an
enrolment signed for someone else), or withdrew when that could only fail the round,
is *named*: an offence row, an audit line, ``ctl nodes`` and ``ctl round show``.
It is then left out of the next ``exclude_rounds`` rounds, doubled for each earlier
offence within ``exclude_window`` rounds and never longer than that window; the
operator lifts it with ``ctl nodes readmit``.

Exclusion is what keeps one hostile member from failing every round: SecAgg can only
finish with every roster member's steps, so the server stops enrolling the member
that keeps withholding them. It cannot name a member that spoils a sum inside the
encryption (§10): that is what the masks hide.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import grpc

from cipherhive.runtime.logs import audit
from cipherhive.server.rounds.context import RoundContext
from cipherhive.server.rounds.errors import RoundError
from cipherhive.server.storage.rows import OffenceRow

__all__ = ["exclusions", "offence_rows", "readmit", "record", "standing"]


def _recent(ctx: RoundContext, node: str, number: int) -> list[OffenceRow]:
    """The member's offences that still count at round ``number``."""
    readmitted = next((n.readmitted_round for n in ctx.state.nodes() if n.name == node), 0)
    since = max(readmitted, number - ctx.config.exclude_window)
    return ctx.state.offences(node, since_round=since)


def _until(ctx: RoundContext, number: int, earlier: int) -> int:
    """The last round an offence in round ``number`` keeps its member out of."""
    base = ctx.config.exclude_rounds
    if base == 0:
        return number
    length: int = base << min(earlier, 30)
    return number + min(length, ctx.config.exclude_window)


def offence_rows(
    ctx: RoundContext, number: int, culprits: Iterable[str], step: str, reason: str
) -> list[OffenceRow]:
    """The offences a failure of round ``number`` charges to ``culprits``, with their exclusion."""
    now = time.time()
    rows = []
    for node in sorted(set(culprits)):
        earlier = [o for o in _recent(ctx, node, number) if o.round != number]
        rows.append(OffenceRow(number, node, step, reason, now, _until(ctx, number, len(earlier))))
    return rows


def record(ctx: RoundContext, number: int, node: str, step: str, reason: str) -> OffenceRow:
    """Name ``node`` now for a step the server refused (it keeps its round open for the others)."""
    (row,) = offence_rows(ctx, number, [node], step, reason)
    ctx.state.record_offence(row)
    announce(row)
    return row


def announce(row: OffenceRow) -> None:
    audit(
        "member named",
        row.node,
        round=row.round,
        step=row.step,
        reason=row.reason,
        excluded_until_round=row.excluded_until,
    )


def exclusions(ctx: RoundContext, number: int) -> dict[str, OffenceRow]:
    """Members left out of round ``number``, each with the offence that keeps it out."""
    readmitted = {n.name: n.readmitted_round for n in ctx.state.nodes()}
    since = max(0, number - ctx.config.exclude_window)
    out: dict[str, OffenceRow] = {}
    for row in ctx.state.offences(since_round=since):
        if row.round <= readmitted.get(row.node, 0) or not row.round < number <= row.excluded_until:
            continue  # readmitted since, over, or this round's own (it excludes from the next ones)
        kept = out.get(row.node)
        if kept is None or row.excluded_until >= kept.excluded_until:
            out[row.node] = row
    return out


def standing(ctx: RoundContext, node: str, number: int) -> tuple[list[OffenceRow], OffenceRow | None]:
    """(offences that count at round ``number``, the one excluding it from that round or None)."""
    recent = _recent(ctx, node, number)
    excluding = max(
        (o for o in recent if o.round < number <= o.excluded_until),
        key=lambda o: o.excluded_until,
        default=None,
    )
    return recent, excluding


def readmit(ctx: RoundContext, node: str, actor: str) -> None:
    """The operator lifts ``node``'s exclusion; its earlier offences no longer count."""
    latest = ctx.state.latest_round()
    if not ctx.state.readmit(node, latest):
        raise RoundError(grpc.StatusCode.NOT_FOUND, f"no member named {node!r} has ever joined this server")
    audit("member readmitted", actor, node=node, after_round=latest)
