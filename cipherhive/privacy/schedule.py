"""The federation's differential-privacy schedule: what the server announces, what a node checks.

The server announces the mechanism's parameters (``FederationSettings.privacy``);
every member trains with exactly these and accounts for them itself. A node
compares the *ε* the schedule would cost it (its ledger's history plus the
rounds still planned) with its own limit, not individual parameters: a larger
sample rate with more noise may cost less than the schedule it expected.

In ``member`` mode (member-level distributed DP, :mod:`cipherhive.privacy.member_level`)
one round is one Gaussian event at sampling rate 1 with the multiplier the
mechanism guarantees; ``sample_rate`` and ``steps_per_round`` are unused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from cipherhive.privacy.accountant import DPEvent, epsilon
from cipherhive.privacy.member_level import MemberMechanism
from cipherhive.v1 import federation_pb2 as pb

__all__ = ["MODES", "PrivacySchedule", "ScheduleError"]

MODES = ("off", "record", "member")
_MODE_TO_PB = {
    "off": pb.PrivacySchedule.OFF,
    "record": pb.PrivacySchedule.RECORD,
    "member": pb.PrivacySchedule.MEMBER,
}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}


class ScheduleError(ValueError):
    """A schedule a node cannot follow (unknown mode, parameters out of range)."""


@dataclass(frozen=True)
class PrivacySchedule:
    mode: str = "off"
    rounds: int = 0
    sample_rate: float = 0.0
    noise_multiplier: float = 0.0
    steps_per_round: int = 0
    max_grad_norm: float = 0.0
    # Member mode only (see cipherhive.privacy.member_level): floor k, colluders t, grid 2^-grid_bits, values.
    min_members: int = 0
    colluders: int = 0
    grid_bits: int = 0
    #: The pinned layout's parameter count (0 until the server knows it; needed to account).
    dimension: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ScheduleError(f"privacy mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "off":
            return
        if self.mode == "member":
            if self.rounds < 1:
                raise ScheduleError("a DP schedule needs rounds >= 1")
            try:
                MemberMechanism(
                    self.noise_multiplier,
                    self.max_grad_norm,
                    self.min_members,
                    self.colluders,
                    self.grid_bits,
                    max(self.dimension, 1),
                )
            except ValueError as exc:
                raise ScheduleError(str(exc)) from exc
            return
        if self.rounds < 1 or self.steps_per_round < 1:
            raise ScheduleError("a DP schedule needs rounds >= 1 and steps_per_round >= 1")
        if not 0 < self.sample_rate <= 1:
            raise ScheduleError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not self.noise_multiplier > 0 or not self.max_grad_norm > 0:
            raise ScheduleError("noise_multiplier and max_grad_norm must be positive")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def member(self) -> bool:
        return self.mode == "member"

    def for_layout(self, num_params: int) -> PrivacySchedule:
        """Member mode: the schedule with the pinned layout's dimension (the server announces it)."""
        return dataclasses.replace(self, dimension=num_params) if self.member else self

    def mechanism(self) -> MemberMechanism:
        """Member mode: the mechanism one round runs (needs ``dimension``)."""
        if not self.member or self.dimension < 1:
            raise ScheduleError("a member-level schedule needs the layout's dimension to be accounted")
        return MemberMechanism(
            self.noise_multiplier,
            self.max_grad_norm,
            self.min_members,
            self.colluders,
            self.grid_bits,
            self.dimension,
        )

    def round_event(self) -> DPEvent:
        """What one round of this schedule costs a member (its privacy event)."""
        if self.member:
            return DPEvent(self.mechanism().multiplier(), 1.0, 1)
        return DPEvent(self.noise_multiplier, self.sample_rate, self.steps_per_round)

    def epsilon(self, delta: float, rounds: int | None = None, history: Sequence[DPEvent] = ()) -> float:
        """RDP ε of ``history`` plus ``rounds`` (default: all planned) rounds of this schedule."""
        if not self.enabled:
            return epsilon(list(history), delta)
        count = self.rounds if rounds is None else rounds
        return epsilon([*history, *[self.round_event()] * max(count, 0)], delta)

    def to_proto(self) -> pb.PrivacySchedule:
        return pb.PrivacySchedule(
            mode=_MODE_TO_PB[self.mode],
            rounds=self.rounds,
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            steps_per_round=self.steps_per_round,
            max_grad_norm=self.max_grad_norm,
            min_members=self.min_members,
            colluders=self.colluders,
            grid_bits=self.grid_bits,
            dimension=self.dimension,
        )

    @classmethod
    def from_proto(cls, msg: pb.PrivacySchedule) -> PrivacySchedule:
        mode = _MODE_FROM_PB.get(msg.mode)
        if mode is None:
            raise ScheduleError(
                f"the server announces privacy mode {msg.mode}, which this node does not know"
            )
        if mode == "off":
            return cls()
        return cls(
            mode,
            int(msg.rounds),
            float(msg.sample_rate),
            float(msg.noise_multiplier),
            int(msg.steps_per_round),
            float(msg.max_grad_norm),
            int(msg.min_members),
            int(msg.colluders),
            int(msg.grid_bits),
            int(msg.dimension),
        )

    def describe(self) -> str:
        if not self.enabled:
            return "no differential privacy"
        if self.member:
            return (
                f"member-level distributed DP: {self.rounds} rounds, noise multiplier "
                f"{self.noise_multiplier:g}, clip {self.max_grad_norm:g}, floor {self.min_members}, "
                f"{self.colluders} colluders tolerated, grid 2^-{self.grid_bits}"
            )
        return (
            f"{self.mode}-level DP-SGD: {self.rounds} rounds x {self.steps_per_round} steps, sample rate "
            f"{self.sample_rate:g}, noise multiplier {self.noise_multiplier:g}, clip {self.max_grad_norm:g}"
        )
