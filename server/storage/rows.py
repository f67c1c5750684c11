"""The rows of the server's round state: what every store (SQLite today) reads and writes,
and the interface speaks (``store.RoundStore``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cipherhive.runtime.errors import UserError

__all__ = [
    "Fenced",
    "MemberRow",
    "NodeRow",
    "OffenceRow",
    "OutcomeRow",
    "RoundRow",
    "RowConflict",
    "StateError",
    "SubmissionRow",
]


@dataclass
class RoundRow:
    round: int
    state: str
    base_round: int
    opened: float
    deadline: float
    closed: float | None
    expected: list[str]
    participants: int
    reason: str
    sum_file: str | None
    num_ciphertexts: int
    num_values: int
    #: The floor the round opened with (0: opened before it was recorded; the setting applies).
    min_participants: int = 0
    withdrawn_reason: str = ""
    withdrawn_unix: float = 0.0
    #: Masked rounds (docs/spec/masked-round.md): the nonce members sign, the phase, when the roster is fixed.
    masked: int = 0
    nonce: bytes | None = None
    phase: str = ""
    enrol_deadline: float = 0.0
    roster_hash: bytes | None = None
    #: A failed round: the step that decided it, and the members named for it (§10).
    failed_step: str = ""
    culprits: list[str] = field(default_factory=list)
    #: The roster was re-formed once without a member that withdrew (§2.1).
    reformed: int = 0


@dataclass
class MemberRow:
    """One member of a masked round: its enrolment, and later its commit and released seed."""

    round: int
    node: str
    enrolment: bytes
    in_roster: bool
    commit: bytes | None
    seed: bytes | None


@dataclass
class OutcomeRow:
    """What one participant said it did with a round's sum: applied, or rejected and why."""

    round: int
    node: str
    applied: bool
    reason: str
    reported: float


@dataclass
class SubmissionRow:
    round: int
    node: str
    submission_id: str
    receipt: str
    accepted: float
    num_bytes: int
    spool_file: str | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class NodeRow:
    name: str
    first_seen: float
    last_seen: float
    last_round: int
    submissions: int
    #: Consecutive rounds the node was expected in and did not submit to.
    missed_rounds: int = 0
    #: The operator readmitted it after this round: earlier offences no longer count.
    readmitted_round: int = 0
    #: Serial (hex) of the TLS certificate it last joined with ("": not known, e.g. insecure).
    cert_serial: str = ""


@dataclass
class OffenceRow:
    """A member named for a round: a signed step it missed or sent wrong (docs/spec/masked-round.md §10)."""

    round: int
    node: str
    step: str
    reason: str
    at: float
    #: Left out of rosters up to and including this round.
    excluded_until: int


class StateError(UserError, RuntimeError):
    """The state directory cannot be used (newer schema, corrupt database)."""


class DatabaseUnavailable(StateError):
    """The round state's database cannot be reached right now (restarting, a network cut): the
    call that needed it fails, nothing of it was committed, and the caller retries
    (docs/explanation/reliability.md#the-database-fails)."""


class Fenced(StateError):
    """This server no longer holds the lease of the round state (a standby took it over while
    this one was paused or cut off): it must write nothing more and stop serving at once
    (docs/explanation/reliability.md#the-active-server-fails)."""


class RowConflict(Exception):
    """A row that conflicts with what is stored (a second submission or enrolment for the same
    node and round, or one for a round the store does not hold): every store raises this
    (SQLite's is also a ``sqlite3.IntegrityError``), so the round logic never names a database."""
