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
"""

from __future__ import annotations

import logging

from cipherhive.dpschedule import PrivacySchedule, ScheduleError
from cipherhive.errors import UserError
from cipherhive.logs import event
from cipherhive.node import metrics
from cipherhive.node.config import NodeConfig
from cipherhive.node.dp_ledger import PrivacyLedger, ledger_path
from cipherhive.node.dp_random import DPRandom
from cipherhive.node.dp_round import DPRound
from cipherhive.node.update import UpdateError, sample_weight
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

    def begin_round(self, round_number: int) -> DPRound | None:
        """Charge the ledger for one round and hand out its DP parameters (None without DP).

        Raises :class:`cipherhive.node.dp_ledger.BudgetExhausted` (nothing charged) past the limit.
        """
        if self.ledger is None or self.random is None:
            return None
        schedule = self.schedule
        if not schedule.enabled:
            raise ScheduleRefused("no DP schedule was accepted from the server yet; not training")
        spent = self.ledger.charge(round_number, schedule.round_event(), self.delta, self.config.max_epsilon)
        metrics.PRIVACY_EPSILON.set(spent)
        noise, sampling = self.random.next_round()
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
