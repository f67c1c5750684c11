"""The federation's differential-privacy schedule: what the server announces, what a node checks.

The server announces the mechanism's parameters (``FederationSettings.privacy``);
every member trains with exactly these and accounts for them itself. A node
compares the *ε* the schedule would cost it (its ledger's history plus the
rounds still planned) with its own limit, not individual parameters: a larger
sample rate with more noise may cost less than the schedule it expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cipherhive.dpaccount import DPEvent, epsilon
from cipherhive.v1 import federation_pb2 as pb

__all__ = ["MODES", "PrivacySchedule", "ScheduleError"]

MODES = ("off", "record")
_MODE_TO_PB = {"off": pb.PrivacySchedule.OFF, "record": pb.PrivacySchedule.RECORD}
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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ScheduleError(f"privacy mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "off":
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

    def round_event(self) -> DPEvent:
        """What one round of this schedule costs a member (its privacy event)."""
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
        )

    def describe(self) -> str:
        if not self.enabled:
            return "no differential privacy"
        return (
            f"{self.mode}-level DP-SGD: {self.rounds} rounds x {self.steps_per_round} steps, sample rate "
            f"{self.sample_rate:g}, noise multiplier {self.noise_multiplier:g}, clip {self.max_grad_norm:g}"
        )
