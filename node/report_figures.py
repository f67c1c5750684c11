"""What a member's own report shows, read from what the member alone holds: its state directory
and its privacy ledger (docs/how-to/member.md, "Your own report").

Reading only: nothing here creates, locks or rewrites a file, so `cipherhive node report` runs
beside the node daemon (which holds the state directory's lock) as well as on a stopped node.
Every file read is one the node replaces atomically, so a read sees a whole version of it.

The rounds come from the node's round history (:mod:`cipherhive.node.state.round_history`), and
from ``chain.json`` and ``rejected.json`` for rounds the history does not hold (a state
directory from before the history, or rounds older than the newest it keeps). ε comes from the
privacy ledger's events, recomputed with the same accountant the node enforces its limit with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cipherhive.node.config import NodeConfig
from cipherhive.node.privacy.ledger import LedgerEntry, PrivacyLedger, PrivacyLedgerError, ledger_path
from cipherhive.node.state.round_history import (
    APPLIED,
    REJECTED,
    HistoryError,
    RoundRecord,
    read_history,
)
from cipherhive.privacy.accountant import DPEvent, epsilon
from cipherhive.runtime.errors import UserError

__all__ = ["EPSILON_POINTS", "NodeFigures", "PrivacyFigures", "read_figures"]

# The names NodeState (node/state/checkpoint.py) writes; repeated here so that reading them does
# not import torch.
CHAIN, REJECTED_FILE = "chain.json", "rejected.json"
#: ε is recomputed for at most this many ledger entries (the newest, spread evenly): each costs
#: an accountant run, and a chart needs no more points to show the curve.
EPSILON_POINTS = 25


class NothingToReport(UserError):
    """No state directory, or one in which the node has recorded no round yet."""


@dataclass(frozen=True)
class PrivacyFigures:
    """The dataset's privacy ledger as the report shows it (``enabled`` False: no DP)."""

    enabled: bool
    dataset: str = ""
    delta: float = 0.0
    limit: float = 0.0
    path: Path | None = None
    entries: list[LedgerEntry] = field(default_factory=list)
    #: ε (RDP, at ``delta``) of the history up to and including entry i, for the entries computed.
    epsilon_after: dict[int, float] = field(default_factory=dict)
    #: Why the ledger could not be read ("" when it was).
    problem: str = ""

    @property
    def spent(self) -> float | None:
        if not self.entries:
            return 0.0
        return self.epsilon_after.get(len(self.entries) - 1)


@dataclass(frozen=True)
class NodeFigures:
    """Everything `cipherhive node report` draws, read from the member's own files."""

    name: str
    state_dir: Path
    #: The rounds this node recorded, oldest first.
    rounds: list[RoundRecord]
    #: The round of the node's current global model (0: the initial model).
    current_round: int
    privacy: PrivacyFigures
    #: Why the round history could not be read ("" when it was).
    history_problem: str = ""


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read: {exc}") from None


def _chain(state_dir: Path) -> list[int]:
    doc = _read_json(state_dir / CHAIN)
    if doc is None:
        return [0]
    rounds = doc.get("rounds") if isinstance(doc, dict) else None
    if not isinstance(rounds, list) or not all(isinstance(r, int) for r in rounds):
        raise UserError(f"{state_dir / CHAIN} is not a node's chain of rounds")
    return rounds or [0]


def _rejections(state_dir: Path) -> dict[int, str]:
    doc = _read_json(state_dir / REJECTED_FILE)
    if not isinstance(doc, dict):
        return {}
    out: dict[int, str] = {}
    for key, value in doc.items():
        if str(key).isdigit() and isinstance(value, dict):
            out[int(key)] = f"{value.get('reason', '')}: {value.get('message', '')}".strip(": ")
    return out


def _runs(events: list[DPEvent]) -> list[DPEvent]:
    """Consecutive equal events as one with their steps added: the same mechanism composed, so
    the same ε, for one accountant run instead of one per round."""
    merged: list[DPEvent] = []
    for e in events:
        last = merged[-1] if merged else None
        mechanism = (e.noise_multiplier, e.sample_rate)
        if last is not None and (last.noise_multiplier, last.sample_rate) == mechanism:
            merged[-1] = DPEvent(e.noise_multiplier, e.sample_rate, last.steps + e.steps)
        else:
            merged.append(e)
    return merged


def epsilon_points(events: list[DPEvent], delta: float, points: int = EPSILON_POINTS) -> dict[int, float]:
    """ε after entry i for up to ``points`` entries spread over the history, the last included."""
    n = len(events)
    if n == 0:
        return {}
    if n <= points:
        chosen = list(range(n))
    else:
        chosen = sorted({round(k * (n - 1) / (points - 1)) for k in range(points)})
    return {i: epsilon(_runs(events[: i + 1]), delta) for i in chosen}


def _privacy(config: NodeConfig) -> PrivacyFigures:
    if config.max_epsilon <= 0:
        return PrivacyFigures(enabled=False)
    path = ledger_path(config.ledger_dir, config.dataset)
    known = (config.dataset, config.delta, config.max_epsilon, path)
    try:
        entries = PrivacyLedger(path, config.dataset).entries()  # reads only
    except PrivacyLedgerError as exc:
        return PrivacyFigures(True, *known, problem=str(exc))
    return PrivacyFigures(True, *known, entries, epsilon_points([e.event for e in entries], config.delta))


def read_figures(config: NodeConfig) -> NodeFigures:
    """The figures of ``config``'s node; :class:`NothingToReport` when it has recorded no round."""
    state_dir = Path(config.state_dir)
    if not state_dir.is_dir():
        raise NothingToReport(
            f"no node state in {state_dir} ([node] state_dir): this node has not run yet, or the "
            "configuration points at another folder"
        )
    problem = ""
    try:
        history = read_history(state_dir)
    except HistoryError as exc:
        history, problem = [], str(exc)
    records = {r.round: r for r in history}
    chain = _chain(state_dir)
    for number in chain:
        if number > 0 and number not in records:
            records[number] = RoundRecord(number, APPLIED, reason="applied before this node kept a history")
    for number, reason in _rejections(state_dir).items():
        records.setdefault(number, RoundRecord(number, REJECTED, reason=reason))
    if not records:
        raise NothingToReport(
            f"nothing to report yet: the node in {state_dir} has recorded no round (it applies or "
            "rejects a round's sum once the federation publishes one)"
        )
    return NodeFigures(
        name=config.name or state_dir.name,
        state_dir=state_dir,
        rounds=[records[n] for n in sorted(records)],
        current_round=chain[-1],
        privacy=_privacy(config),
        history_problem=problem,
    )
