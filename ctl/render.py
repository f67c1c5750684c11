"""How `cipherhive ctl` shows replies: rich tables for people, JSON for scripts.

The JSON form is the protobuf message itself (proto field names, every field
present even when zero, 64-bit integers as numbers) plus a few derived
fields, so a script never has to recompute what the tables show.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

from cipherhive.federation.optimizer_settings import OptimizerError, OptimizerSpec
from cipherhive.v1 import federation_pb2 as pb

DASH = "—"

STATE_LABELS = {
    pb.ROUND_STATE_UNSPECIFIED: "unknown",
    pb.ROUND_OPEN: "open",
    pb.ROUND_SUM_READY: "sum ready",
    pb.ROUND_FAILED: "failed",
    pb.ROUND_WITHDRAWN: "withdrawn",
}


# ---------------------------------------------------------------- derived values


def message_dict(message: Message) -> dict[str, Any]:
    """The message as JSON-ready data; zero fields kept so scripts can rely on every key."""
    data: dict[str, Any] = json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    return data


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def mean_metric(info: pb.RoundInfo, name: str) -> float | None:
    """Mean of one metric over the submissions that reported it (None if none did)."""
    values = _finite(sub.metrics[name] for sub in info.submissions if name in sub.metrics)
    return sum(values) / len(values) if values else None


def duration(info: pb.RoundInfo) -> float | None:
    """Seconds from opening to closing; None while the round is still open."""
    if info.closed_unix <= 0 or info.opened_unix <= 0:
        return None
    return max(0.0, info.closed_unix - info.opened_unix)


@dataclass(frozen=True)
class RoundSummary:
    """What the tables, the JSON and the report show per round, computed in one place."""

    round: int
    state: str
    participants: int
    expected: int
    opened_unix: float
    closed_unix: float
    duration_seconds: float | None
    mean_accuracy: float | None
    mean_loss: float | None
    reason: str
    #: Outcome reports: participants that applied / rejected the round's sum.
    applied: int = 0
    rejected: int = 0

    @classmethod
    def of(cls, info: pb.RoundInfo) -> RoundSummary:
        return cls(
            round=info.round,
            state=STATE_LABELS.get(info.state, "unknown"),
            participants=info.participants,
            expected=info.expected,
            opened_unix=info.opened_unix,
            closed_unix=info.closed_unix,
            duration_seconds=duration(info),
            mean_accuracy=mean_metric(info, "accuracy"),
            mean_loss=mean_metric(info, "loss"),
            reason=(
                f"withdrawn: {info.withdrawn_reason}" if info.state == pb.ROUND_WITHDRAWN else info.reason
            ),
            applied=sum(o.applied for o in info.outcomes),
            rejected=sum(not o.applied for o in info.outcomes),
        )

    @property
    def outcomes(self) -> str:
        """``applied/rejected`` as the participants reported, or a dash before any report."""
        return f"{self.applied}/{self.rejected}" if self.applied or self.rejected else DASH


def as_round_info(value: pb.RoundInfo | Mapping[str, Any]) -> pb.RoundInfo:
    """Accept a RoundInfo or its JSON form (as printed by `ctl --json`, derived fields ignored)."""
    if isinstance(value, pb.RoundInfo):
        return value
    return json_format.ParseDict(dict(value), pb.RoundInfo(), ignore_unknown_fields=True)


def round_dict(info: pb.RoundInfo) -> dict[str, Any]:
    data = message_dict(info)
    summary = RoundSummary.of(info)
    data["duration_seconds"] = summary.duration_seconds
    data["mean_accuracy"] = summary.mean_accuracy
    data["mean_loss"] = summary.mean_loss
    return data


def status_dict(status: pb.StatusReply, now: float | None = None) -> dict[str, Any]:
    data = message_dict(status)
    now = time.time() if now is None else now
    data["uptime_seconds"] = max(0.0, now - status.started_unix) if status.started_unix else None
    return data


def nodes_dict(nodes: Sequence[pb.NodeInfo]) -> dict[str, Any]:
    return {"nodes": [message_dict(n) for n in nodes]}


def rounds_dict(rounds: Sequence[pb.RoundInfo]) -> dict[str, Any]:
    return {"rounds": [round_dict(r) for r in rounds]}


#: RoundEvent fields `watch --json` leaves out unless --with-blobs: a masked round's roster
#: entries and commits, a few KB of base64 per event that no operator reads.
BLOB_FIELDS = ("roster", "commits")


def event_dict(event: pb.RoundEvent, *, with_blobs: bool = False) -> dict[str, Any]:
    """The event, with counts and the roster hash in place of the blobs (unless ``with_blobs``).

    ``roster_hash`` is the protocol's hash of the roster (docs/spec/masked-round.md §2), the
    one the server's audit line `roster fixed` and the members' uploads name; "" without one.
    """
    # Imported here: only `watch` needs it, and every other ctl call starts faster without it.
    from cipherhive.secagg.roster import roster_hash

    data = message_dict(event)
    if not with_blobs:
        for name in BLOB_FIELDS:
            data.pop(name, None)
    data["roster_count"] = len(event.roster)
    data["roster_hash"] = roster_hash(list(event.roster), event.nonce).hex() if event.roster else ""
    data["commits_count"] = len(event.commits)
    return data


def dumps(data: Any, *, lines: bool = False) -> str:
    """Indented JSON for one document, compact for JSON Lines (watch)."""
    if lines:
        return json.dumps(data, separators=(",", ":"), sort_keys=False)
    return json.dumps(data, indent=2)


# ---------------------------------------------------------------- formatting


def fmt_time(unix: float) -> str:
    """Local wall-clock time, or a dash for 'never' (0)."""
    if unix <= 0:
        return DASH
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def fmt_metric(value: float | None) -> str:
    return DASH if value is None else f"{value:.4g}"


def fmt_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def make_console() -> Console:
    """Markup off (reasons are free text); piped output gets a wide page so rows stay one line."""
    console = Console(markup=False, highlight=False)
    if not console.is_terminal:
        console = Console(markup=False, highlight=False, width=max(console.width, 200))
    return console


def emit(console: Console, renderable: RenderableType) -> None:
    """Print; piped output loses rich's trailing padding so `grep`/`awk` see clean lines."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    for line in captured.get().splitlines():
        print(line.rstrip())


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False, show_edge=False)
    for column in columns:
        numeric = column in {"round", "participants", "last round", "submissions", "bytes", "base"}
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column != "reason")
    return table


def _optimizer(announced: pb.ServerOptimizer) -> str:
    """The server-side optimizer every node runs (an unset field: a server from before them, FedAvg)."""
    try:
        return OptimizerSpec.from_proto(announced).describe()
    except OptimizerError:
        return announced.name or DASH


def print_status(console: Console, status: pb.StatusReply, now: float | None = None) -> None:
    now = time.time() if now is None else now
    s = status.settings
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    uptime = fmt_seconds(now - status.started_unix) if status.started_unix else DASH
    rows = [
        ("server version", status.version or DASH),
        ("started", f"{fmt_time(status.started_unix)} (up {uptime})"),
        ("nodes online / known", f"{status.nodes_online} / {status.nodes_known}"),
        ("open round", str(status.open_round) if status.open_round else "none"),
        ("latest round", str(status.latest_round) if status.latest_round else "none"),
        ("latest published sum", str(status.latest_sum_round) if status.latest_sum_round else "none"),
        ("failed rounds", str(status.rounds_failed)),
        ("withdrawn rounds", str(status.rounds_withdrawn)),
        ("oldest kept sum", str(status.oldest_kept_round) if status.oldest_kept_round else "none"),
        ("auto start", "on" if status.auto_start else "off"),
        ("max rounds", str(status.max_rounds) if status.max_rounds else "unlimited"),
        ("min participants", str(s.min_participants)),
        ("max participants", str(s.max_participants)),
        ("round timeout", fmt_seconds(s.round_timeout_seconds)),
        ("masked rounds", "on" if s.masked else "off"),
        ("optimizer", _optimizer(s.optimizer)),
        ("key fingerprint", s.key_fingerprint or DASH),
        (
            "layout",
            f"{status.layout_hash} ({status.layout_params} values)"
            if status.layout_hash
            else "not pinned: `cipherhive node layout`, then `cipherhive ctl federation init --layout`",
        ),
    ]
    for label, value in rows:
        grid.add_row(label, value)
    emit(console, grid)


def print_nodes(console: Console, nodes: Sequence[pb.NodeInfo]) -> None:
    if not nodes:
        emit(console, "no node has joined yet")
        return
    table = _table(
        "node",
        "online",
        "expected",
        "first seen",
        "last seen",
        "last round",
        "submissions",
        "missed",
        "offences",
        "excluded until",
        "revoked",
    )
    for n in nodes:
        table.add_row(
            n.name,
            "yes" if n.online else "no",
            "yes" if n.expected else "no",
            fmt_time(n.first_seen_unix),
            fmt_time(n.last_seen_unix),
            str(n.last_round) if n.last_round else DASH,
            str(n.submissions),
            str(n.missed_rounds),
            str(n.offences),
            f"round {n.excluded_until_round}" if n.excluded_until_round else DASH,
            "REVOKED" if n.revoked else "no",
        )
    emit(console, table)
    # A revoked member's calls are refused; say which certificate the server's CRL names.
    for n in nodes:
        if n.revoked:
            emit(console, f"{n.name}: {n.revoked_reason or 'certificate revoked'} (on the server's CRL)")
    named = [n for n in nodes if n.offences]
    if named:
        emit(console, "")
        offences = _table("node", "round", "step", "reason", title="latest offence of each named member")
        for n in named:
            offences.add_row(n.name, str(n.last_offence_round), n.last_offence_step, n.last_offence_reason)
        emit(console, offences)


def print_rounds(console: Console, rounds: Sequence[pb.RoundInfo]) -> None:
    if not rounds:
        emit(console, "no round yet")
        return
    table = _table(
        "round",
        "state",
        "participants",
        "applied/rejected",
        "opened",
        "duration",
        "accuracy",
        "loss",
        "reason",
    )
    for info in rounds:
        s = RoundSummary.of(info)
        table.add_row(
            str(s.round),
            s.state,
            f"{s.participants}/{s.expected}",
            s.outcomes,
            fmt_time(s.opened_unix),
            fmt_seconds(s.duration_seconds),
            fmt_metric(s.mean_accuracy),
            fmt_metric(s.mean_loss),
            s.reason or DASH,
        )
    emit(console, table)


def print_round(console: Console, info: pb.RoundInfo) -> None:
    s = RoundSummary.of(info)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [
        ("round", str(s.round)),
        ("state", s.state),
        ("base round", str(info.base_round) if info.base_round else "0 (initial model)"),
        ("participants / expected", f"{s.participants} / {s.expected}"),
        ("participation floor", str(info.min_participants) if info.min_participants else DASH),
        ("opened", fmt_time(info.opened_unix)),
        ("deadline", fmt_time(info.deadline_unix)),
        ("closed", fmt_time(info.closed_unix) if info.closed_unix else "still open"),
        ("duration", fmt_seconds(s.duration_seconds)),
        ("mean accuracy", fmt_metric(s.mean_accuracy)),
        ("mean loss", fmt_metric(s.mean_loss)),
        ("reason", s.reason or DASH),
    ]
    if info.state == pb.ROUND_WITHDRAWN:
        rows.append(("withdrawn", fmt_time(info.withdrawn_unix)))
    if info.failed_step:
        rows.append(("failed at step", info.failed_step))
    if info.culprits:
        rows.append(("named", ", ".join(info.culprits)))
    if info.reformed:
        rows.append(("roster", "re-formed once without a member that left"))
    if info.phase:
        # Masked rounds: how far the protocol got (counts only; nothing members sent).
        rows.append(
            (
                "masked round",
                f"phase {info.phase}: {info.enrolled} enrolled, {info.committed} committed, "
                f"{info.released} released",
            )
        )
    for label, value in rows:
        grid.add_row(label, value)
    emit(console, grid)
    if info.outcomes:
        emit(console, "")
        outcomes = _table("node", "outcome", "reported", title="what each node did with the sum")
        for o in info.outcomes:
            verdict = "applied" if o.applied else f"rejected: {o.reason or DASH}"
            outcomes.add_row(o.node_name, verdict, fmt_time(o.reported_unix))
        emit(console, outcomes)
    if not info.submissions:
        emit(console, "no submissions")
        return
    metric_names = sorted({name for sub in info.submissions for name in sub.metrics})
    emit(console, "")
    table = _table("node", *metric_names, "bytes", "accepted", title="submissions")
    for sub in info.submissions:
        metrics = [fmt_metric(sub.metrics[m]) if m in sub.metrics else DASH for m in metric_names]
        table.add_row(sub.node_name, *metrics, fmt_bytes(sub.num_bytes), fmt_time(sub.accepted_unix))
    emit(console, table)


def round_line(verb: str, info: pb.RoundInfo) -> str:
    """One line after start/close: what the operator needs to know next."""
    s = RoundSummary.of(info)
    if info.state == pb.ROUND_OPEN:
        return (
            f"round {s.round} {verb}: base round {info.base_round}, expects {s.expected} node(s), "
            f"deadline {fmt_time(info.deadline_unix)}"
        )
    detail = f", {s.reason}" if s.reason else ""
    return f"round {s.round} {verb}: {s.state}, {s.participants}/{s.expected} participants{detail}"


def event_line(event: pb.RoundEvent) -> str:
    """One line per event for `watch`, greppable by kind and round."""
    kind = pb.RoundEvent.Kind.Name(event.kind)
    parts = [fmt_time(event.time_unix) if event.time_unix else fmt_time(time.time()), f"{kind:<9}"]
    if event.round:
        parts.append(f"round {event.round}")
    if event.kind == pb.RoundEvent.OPENED:
        parts.append(f"base {event.base_round}, expects {event.expected}")
        if event.deadline_unix:
            parts.append(f"deadline {fmt_time(event.deadline_unix)}")
    elif event.kind in (pb.RoundEvent.CLOSED, pb.RoundEvent.SUM_READY, pb.RoundEvent.FAILED):
        parts.append(f"participants {event.participants}/{event.expected}")
    if event.min_participants and event.kind == pb.RoundEvent.OPENED:
        parts.append(f"floor {event.min_participants}")
    if event.reason:
        parts.append(f"({event.reason})")
    if event.replay:
        parts.append("[replay]")
    return "  ".join(parts)
