"""The node's own record of its rounds: what it did with each sum, and the evaluation it decrypted.

Why a record of its own: ``chain.json`` forgets a round once it is rolled back, ``rejected.json``
forgets a rejection once a later round is applied, and the federated evaluation a node decrypts
(:mod:`cipherhive.node.training.federated_eval`) is otherwise only logged. A member's own report
(`cipherhive node report`, docs/how-to/member.md) is drawn from this file; nothing in it ever
leaves the node.

File ``history.json`` in the state directory (mode 0600), replaced atomically on every change
(:func:`cipherhive.runtime.fsutil.atomic_write`), so a reader (the report, while the node runs)
and a crash see the old record or the new one, never half of one. It keeps the newest
:data:`MAX_ROUNDS` rounds::

    {"format": "cipherhive/v1/round-history",
     "rounds": [{"round": 3, "outcome": "applied", "at": 1765130000.0, "participants": 3,
                 "uploaded": true, "reason": "",
                 "evaluation": {"of_round": 2, "examples": 450.0, "loss": 0.52, "accuracy": 0.88}},
                ...]}

``outcome`` is ``applied``, ``rejected`` (the node's checks refused the sum; ``reason`` says
why), ``rolled back`` (applied, then undone because a round it built on was withdrawn) or
``withdrawn`` (the server withdrew the round after this node applied or rejected it).
``uploaded``: the server acknowledged this node's update for the round (false: it sat the
round out and only applied the sum). ``evaluation`` holds the figures exactly as the node
logged them, rounded to 4 significant digits (a decrypted value at full precision next to its
ciphertext gives away the shared key, docs/spec/sum-checks.md §7).

The record is informational, not a safeguard: a write that fails is logged and the round goes
on; a damaged file is started afresh by the node and reported as damaged by the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cipherhive.runtime.errors import UserError
from cipherhive.runtime.fsutil import atomic_write
from cipherhive.runtime.logs import event

__all__ = [
    "APPLIED",
    "FILE_NAME",
    "MAX_ROUNDS",
    "REJECTED",
    "ROLLED_BACK",
    "WITHDRAWN",
    "HistoryError",
    "RoundRecord",
    "read_history",
    "record_outcome",
    "record_undone",
]

log = logging.getLogger("cipherhive.node")

FILE_NAME = "history.json"
FORMAT = "cipherhive/v1/round-history"
#: Rounds kept (the newest): a few hundred bytes each, so the file stays well under 1 MB.
MAX_ROUNDS = 1000
#: A larger file is not ours (or damaged): the report refuses it rather than read it whole.
_MAX_FILE = 8 << 20

APPLIED, REJECTED, ROLLED_BACK, WITHDRAWN = "applied", "rejected", "rolled back", "withdrawn"
OUTCOMES = (APPLIED, REJECTED, ROLLED_BACK, WITHDRAWN)


class HistoryError(UserError):
    """The history file cannot be read (damaged, or not this format)."""


@dataclass
class RoundRecord:
    """One round as this node saw it."""

    round: int
    outcome: str
    at: float = 0.0
    participants: int = 0
    uploaded: bool = False
    reason: str = ""
    #: ``of_round`` (the round whose model was evaluated), ``examples`` and each metric sent.
    evaluation: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Any) -> RoundRecord:
        if not isinstance(doc, dict) or not isinstance(doc.get("round"), int):
            raise ValueError("not a round record")
        outcome = doc.get("outcome")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        evaluation = doc.get("evaluation") or {}
        if not isinstance(evaluation, dict):
            raise ValueError("evaluation must be an object")
        return cls(
            round=doc["round"],
            outcome=outcome,
            at=float(doc.get("at", 0.0)),
            participants=int(doc.get("participants", 0)),
            uploaded=bool(doc.get("uploaded", False)),
            reason=str(doc.get("reason", "")),
            evaluation={str(k): float(v) for k, v in evaluation.items()},
        )


def read_history(state_dir: Path) -> list[RoundRecord]:
    """The recorded rounds, oldest first ([] when there is no file yet); :class:`HistoryError`
    when the file is damaged. Reads only: safe while the node runs."""
    path = state_dir / FILE_NAME
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_FILE + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise HistoryError(f"{path} cannot be read: {exc.strerror}") from None
    if len(raw) > _MAX_FILE:
        raise HistoryError(f"{path} is implausibly large")
    try:
        doc = json.loads(raw.decode("utf-8"))
        rounds = doc.get("rounds") if isinstance(doc, dict) and doc.get("format") == FORMAT else None
        if not isinstance(rounds, list):
            raise ValueError("not a round history")
        records = [RoundRecord.from_json(d) for d in rounds]
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise HistoryError(f"{path} is damaged ({exc})") from None
    return sorted(records, key=lambda r: r.round)


def _write(state_dir: Path, records: Mapping[int, RoundRecord]) -> None:
    newest = [records[n] for n in sorted(records)[-MAX_ROUNDS:]]
    doc = {"format": FORMAT, "rounds": [asdict(r) for r in newest]}
    atomic_write(state_dir / FILE_NAME, (json.dumps(doc, separators=(",", ":")) + "\n").encode(), mode=0o600)


def _load_for_update(state_dir: Path) -> dict[int, RoundRecord]:
    try:
        return {r.round: r for r in read_history(state_dir)}
    except HistoryError as exc:
        event(log, f"starting a new round history: {exc}", logging.WARNING)
        return {}


def record_outcome(
    state_dir: Path,
    round_number: int,
    outcome: str,
    *,
    participants: int = 0,
    uploaded: bool = False,
    reason: str = "",
    evaluation: Mapping[str, float] | None = None,
    of_round: int | None = None,
) -> None:
    """Record what this node did with round ``round_number``'s sum (replacing an earlier record
    of it). Never raises for a file it cannot write: the round itself has already happened."""
    figures = {k: float(v) for k, v in (evaluation or {}).items()}
    if figures and of_round is not None:
        figures = {"of_round": float(of_round), **figures}
    record = RoundRecord(round_number, outcome, time.time(), participants, uploaded, reason, figures)
    try:
        records = _load_for_update(state_dir)
        records[round_number] = record
        _write(state_dir, records)
    except OSError as exc:
        event(log, f"could not record round {round_number} in {FILE_NAME}: {exc}", logging.WARNING)


def record_undone(state_dir: Path, withdrawn: int, why: str, target: int | None = None) -> None:
    """Round ``withdrawn`` was withdrawn: mark its record, and with ``target`` (the round the model
    rolled back to) every applied round after ``target`` as rolled back. Unchanged: no write."""
    try:
        records = _load_for_update(state_dir)
        changed = False
        for number, record in records.items():
            if number == withdrawn and record.outcome != WITHDRAWN:
                note = f"withdrawn ({why})"
                earlier = f"{record.outcome}: {record.reason}" if record.reason else record.outcome
                record.reason = f"{earlier}; then {note}"
                record.outcome = WITHDRAWN
                changed = True
            elif target is not None and number > target and number != withdrawn and record.outcome == APPLIED:
                record.outcome = ROLLED_BACK
                record.reason = f"rolled back to round {target}: round {withdrawn} was withdrawn ({why})"
                changed = True
        if changed:
            _write(state_dir, records)
    except OSError as exc:
        event(log, f"could not record round {withdrawn}'s withdrawal in {FILE_NAME}: {exc}", logging.WARNING)
