"""A node's side of record-level differential privacy: accept a schedule, charge, check, weigh.

The daemon asks four things of :class:`PrivacyGuard`, in this order:

1. at Join, :meth:`~PrivacyGuard.accept` the announced schedule: refused (the
   node exits) when the node's DP setting and the federation's disagree, or
   when the ε of its ledger's history plus the rounds still planned exceeds
   ``[privacy] max_epsilon`` (a comparison of ε, not of parameters);
2. before training, :meth:`~PrivacyGuard.begin_round`: the ledger charges the
   round (durably, so before anything can be sent) or refuses past the limit;
3. after training, :meth:`~PrivacyGuard.check_trained`: the trainer used the
   DP-SGD helper, once, within the charged steps, or nothing is sent;
4. :meth:`~PrivacyGuard.weight`: under DP every member weighs 1 (uniform
   FedAvg, divided by the public number of contributors): a sample count,
   raw or noised, is business information record-level DP does not cover.

In ``member`` mode (member-level distributed DP, :mod:`cipherhive.node.privacy.member_level`)
the trainer trains as usual (``RoundInfo.privacy`` stays None); the ledger
charges the round before training all the same, and :meth:`~PrivacyGuard.privatize`
replaces the trained values by the clipped, grid-rounded, noised update. At Join
the schedule must promise at least as many honest members as this node's own
floor and pinned colluders guarantee (``k - t ≤ floor - colluders``).
"""

from __future__ import annotations

import logging

import numpy as np

from cipherhive.node import metrics
from cipherhive.node.config import NodeConfig
from cipherhive.node.privacy.ledger import PrivacyLedger, ledger_path
from cipherhive.node.privacy.randomness import CryptoStream, DPRandom
from cipherhive.node.privacy.round_info import DPRound
from cipherhive.node.training.update import UpdateError, sample_weight
from cipherhive.privacy.member_level import MemberMechanism
from cipherhive.privacy.schedule import PrivacySchedule, ScheduleError
from cipherhive.runtime.errors import UserError
from cipherhive.runtime.logs import event
from cipherhive.v1 import federation_pb2 as pb

__all__ = ["PrivacyGuard", "ScheduleRefused"]

log = logging.getLogger("cipherhive.node.privacy")


class ScheduleRefused(UserError, RuntimeError):
    """The federation's DP schedule does not fit this node's own privacy settings."""


class PrivacyGuard:
    def __init__(self, config: NodeConfig, label: str) -> None:
        """Opens the dataset's ledger when DP is on (raises :class:`PrivacyLedgerError` if unusable)."""
        self.config = config
        self.enabled = config.max_epsilon > 0
        self.delta = config.delta
        self.schedule = PrivacySchedule()
        self.ledger: PrivacyLedger | None = None
        self.random: DPRandom | None = None
        #: Member mode: the charged round's mechanism and (noise, rounding) streams, until used.
        self._member: tuple[MemberMechanism, CryptoStream, CryptoStream] | None = None
        metrics.PRIVACY_EPSILON_LIMIT.set(config.max_epsilon)
        if self.enabled:
            self.ledger = PrivacyLedger(ledger_path(config.ledger_dir, config.dataset), config.dataset)
            self.random = DPRandom(insecure_seed=config.insecure_seed, label=label)
            metrics.PRIVACY_EPSILON.set(self.ledger.epsilon(self.delta))

    def spent(self) -> float:
        """ε the dataset has spent (0 without DP)."""
        return self.ledger.epsilon(self.delta) if self.ledger is not None else 0.0

    def accept(self, settings: pb.FederationSettings, applied_round: int) -> None:
        """Take the schedule announced at Join, or raise :class:`ScheduleRefused`."""
        try:
            schedule = PrivacySchedule.from_proto(settings.privacy)
        except ScheduleError as exc:
            raise ScheduleRefused(str(exc)) from exc
        if schedule.enabled and not self.enabled:
            raise ScheduleRefused(
                f"the federation runs {schedule.describe()}, but this node has no privacy budget: set "
                "[privacy] max_epsilon and dataset, and create its ledger (`cipherhive node privacy-init`)"
            )
        if self.enabled and not schedule.enabled:
            raise ScheduleRefused(
                "this node trains only with differential privacy ([privacy] max_epsilon is set), but the "
                "federation announces no DP schedule"
            )
        if schedule.member:
            self._check_member(schedule)
        self.schedule = schedule
        if self.ledger is None:
            return
        history = [e.event for e in self.ledger.entries()]
        remaining = max(0, schedule.rounds - applied_round)
        spent = schedule.epsilon(self.delta, 0, history)
        projected = schedule.epsilon(self.delta, remaining, history)
        event(
            log,
            "privacy schedule",
            schedule=schedule.describe(),
            epsilon_spent=round(spent, 4),
            epsilon_projected=round(projected, 4),
            max_epsilon=self.config.max_epsilon,
            delta=self.delta,
            rounds_left=remaining,
        )
        metrics.PRIVACY_EPSILON.set(spent)
        if projected > self.config.max_epsilon:
            raise ScheduleRefused(
                f"the federation's schedule ({schedule.describe()}) would take dataset "
                f"{self.config.dataset!r} to ε = {projected:.3f} at δ = {self.delta:g} ({spent:.3f} spent, "
                f"{remaining} rounds to go), beyond this node's limit of {self.config.max_epsilon:g}"
            )

    def _check_member(self, schedule: PrivacySchedule) -> None:
        """The honest members the schedule splits its noise over must be guaranteed by this node's
        own floor and pinned colluders, or the sum's noise could fall short of z·C."""
        if schedule.dimension < 1:
            raise ScheduleRefused("the member-level DP schedule does not say how many values it covers")
        honest = schedule.min_members - schedule.colluders
        own = self.config.min_participants - self.config.colluders
        if honest > own:
            raise ScheduleRefused(
                f"the federation's schedule ({schedule.describe()}) splits the noise over {honest} honest "
                f"members, but this node's floor ({self.config.min_participants}) minus its pinned "
                f"colluders ({self.config.colluders}) guarantees only {own}"
            )

    def begin_round(self, round_number: int) -> DPRound | None:
        """Charge the ledger for one round and hand out its DP parameters (None without DP).

        Raises :class:`cipherhive.node.privacy.ledger.BudgetExhausted` (nothing charged) past the limit.
        """
        if self.ledger is None or self.random is None:
            return None
        schedule = self.schedule
        if not schedule.enabled:
            raise ScheduleRefused("no DP schedule was accepted from the server yet; not training")
        spent = self.ledger.charge(round_number, schedule.round_event(), self.delta, self.config.max_epsilon)
        metrics.PRIVACY_EPSILON.set(spent)
        noise, sampling = self.random.next_round()
        if schedule.member:
            self._member = (schedule.mechanism(), noise, sampling)
            event(log, "member-level DP round charged", round=round_number, epsilon=round(spent, 4))
            return None
        return DPRound(
            round=round_number,
            sample_rate=schedule.sample_rate,
            noise_multiplier=schedule.noise_multiplier,
            max_grad_norm=schedule.max_grad_norm,
            steps=schedule.steps_per_round,
            delta=self.delta,
            noise=noise,
            sampling=sampling,
            insecure=self.random.insecure,
        )

    def privatize(self, local: np.ndarray, global_: np.ndarray) -> np.ndarray:
        """Member mode: the values to send instead of ``local`` (clipped, on the grid, noised);
        otherwise ``local`` itself. Each charged round's noise is used once."""
        if self._member is None:
            if self.schedule.member:
                raise UpdateError("no member-level DP round was charged; nothing was sent")
            return local
        from cipherhive.node.privacy.member_level import privatize

        mech, noise, rounding = self._member
        self._member = None
        return privatize(local, global_, mech, noise, rounding)

    @staticmethod
    def check_trained(dp: DPRound | None) -> None:
        """Refuse to send an update that was not trained through the DP-SGD helper as charged."""
        if dp is None:
            return
        if not dp.used:
            raise UpdateError(
                "the trainer did not train through cipherhive.node.dp_sgd.private_training although the "
                "federation runs DP; nothing was sent"
            )
        if dp.steps_taken > dp.steps:
            raise UpdateError(f"the trainer took {dp.steps_taken} DP steps, more than the {dp.steps} charged")

    def weight(self, num_samples: int, weight_unit: float) -> float:
        """The FedAvg weight to encrypt: 1.0 under DP (uniform), else samples / weight_unit."""
        return 1.0 if self.enabled else sample_weight(num_samples, weight_unit)
