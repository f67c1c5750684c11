"""The interface of the server's round state, as Flower keeps its link state behind one: the
round logic and the API speak to a :class:`RoundStore`; ``state.State`` (SQLite) and
``postgres.PostgresState`` implement it with the same statements (``sqlstore``), and
tests/test_state_contract.py holds both to it.

Every method is one transaction: nothing a method writes is visible, or acknowledged, before it
returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cipherhive.server.storage.rows import (
    MemberRow,
    NodeRow,
    OffenceRow,
    OutcomeRow,
    RoundRow,
    SubmissionRow,
)

__all__ = ["RoundStore"]


class RoundStore(Protocol):
    """Nodes, rounds, submissions, outcomes and the masked round's members, durably."""

    def close(self) -> None: ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def delete_meta(self, key: str) -> None: ...

    def touch_node(self, name: str, now: float | None = None) -> None: ...

    def set_node_serial(self, name: str, serial: str) -> None:
        """Record the serial (hex) of the certificate ``name`` joined with."""
        ...

    def nodes(self) -> list[NodeRow]: ...

    def open_round(
        self,
        base_round: int,
        deadline: float,
        expected: list[str],
        min_participants: int = 0,
        *,
        nonce: bytes | None = None,
        enrol_deadline: float = 0.0,
    ) -> RoundRow:
        """Open the next round; with a ``nonce`` it is masked and starts in the enrol phase."""
        ...

    def round(self, number: int) -> RoundRow | None: ...

    def rounds(self, limit: int = 0, after: int = 0) -> list[RoundRow]: ...

    def rounds_page(self, limit: int, before: int = 0) -> tuple[list[RoundRow], int]:
        """Up to ``limit`` rounds numbered below ``before`` (0: the newest), oldest first,
        and the ``before`` of the next older page (0: none)."""
        ...

    def latest_round(self) -> int: ...

    def published_count(self) -> int:
        """Rounds whose sum was ever released (withdrawn ones included)."""
        ...

    def withdrawn_rounds(self, limit: int = 1000) -> list[RoundRow]:
        """The most recent ``limit`` withdrawn rounds, oldest first."""
        ...

    def withdraw(self, numbers: list[int], reason: str, now: float) -> list[str]:
        """Mark published rounds withdrawn; returns their sum files (to delete)."""
        ...

    def kept_sums(self) -> list[tuple[int, str]]:
        """(round, sum file) of every published, not withdrawn round whose sum is on disk, newest first."""
        ...

    def forget_sum(self, number: int) -> None:
        """The sum file of a published round was pruned: the row stays, the file is gone."""
        ...

    def oldest_kept_round(self) -> int: ...

    def open_round_row(self) -> RoundRow | None: ...

    def latest_sum_round(self) -> int: ...

    def count_rounds(self, state: str) -> int: ...

    def finish_round(
        self,
        number: int,
        *,
        state: str,
        reason: str,
        participants: int,
        sum_file: str | None = None,
        num_ciphertexts: int = 0,
        num_values: int = 0,
        failed_step: str = "",
        culprits: Sequence[str] = (),
        offences: Sequence[OffenceRow] = (),
    ) -> None:
        """Mark a round published or failed, with the step that decided a failure, whom it
        names, and their offences (one transaction); spooled submissions are no longer needed."""
        ...

    def accept_submission(self, row: SubmissionRow) -> None:
        """Record an accepted submission; raises :class:`RowConflict` on a second one."""
        ...

    def submissions(self, number: int) -> list[SubmissionRow]: ...

    def submission(self, number: int, node: str) -> SubmissionRow | None: ...

    def submissions_between(self, first: int, last: int) -> dict[int, list[SubmissionRow]]:
        """Submissions of rounds ``first``..``last`` in one query (a page of ListRounds)."""
        ...

    def record_missed(self, number: int, expected: list[str], submitted: set[str]) -> None:
        """After a round closes: expected nodes that did not submit missed one more in a row."""
        ...

    def missed_rounds(self) -> dict[str, int]: ...

    def record_outcome(self, row: OutcomeRow) -> None:
        """One report per node per round: a later one replaces the earlier."""
        ...

    def outcomes_between(self, first: int, last: int) -> dict[int, list[OutcomeRow]]: ...

    def outcomes(self, number: int) -> list[OutcomeRow]: ...

    def members(self, number: int, roster_only: bool = False) -> list[MemberRow]:
        """A masked round's enrolled members (or only its roster), by name."""
        ...

    def add_enrolment(self, number: int, node: str, enrolment: bytes) -> None:
        """Record an enrolment; raises :class:`RowConflict` if the node already enrolled."""
        ...

    def fix_roster(self, number: int, nodes: list[str], roster_hash: bytes) -> None:
        """The roster is fixed: these members, this hash; the round moves to its upload phase."""
        ...

    def reform_roster(self, number: int, nodes: list[str], roster_hash: bytes) -> None:
        """The roster is re-formed (once) with only these members and this hash (§2.1)."""
        ...

    def drop_enrolment(self, number: int, node: str) -> None:
        """A member withdrew before the roster was fixed: its enrolment is forgotten."""
        ...

    def offences(self, node: str | None = None, since_round: int = 0) -> list[OffenceRow]:
        """Offences after ``since_round`` (of one member, or of all), oldest first."""
        ...

    def record_offence(self, row: OffenceRow) -> None:
        """One offence per member per round: a later one replaces the earlier."""
        ...

    def readmit(self, node: str, after_round: int) -> bool:
        """Offences up to ``after_round`` no longer count for ``node``; False if it is unknown."""
        ...

    def set_phase(self, number: int, phase: str) -> None: ...

    def set_commit(self, number: int, node: str, commit: bytes, *, phase: str | None = None) -> None:
        """Record a member's commit; with ``phase``, move the round to it in the same
        transaction, so a crash can never leave every commit stored but the phase behind."""
        ...

    def set_seed(self, number: int, node: str, seed: bytes) -> None: ...

    def forget_members(self, number: int, keep_proof: bool) -> None:
        """At a round's end: released seeds are dropped; a published round keeps its proof
        (enrolments and commits), a failed one keeps nothing."""
        ...
