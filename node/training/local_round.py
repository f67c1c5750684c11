"""Local training and the unmasked upload: train on the global model, weigh, check, encrypt, send.

The masked round (:mod:`cipherhive.node.secagg.masked_round`) uses :meth:`LocalTraining.train`
and :meth:`LocalTraining.header` too; only a federation run with masking off sends
through :meth:`LocalTraining.train_and_submit`, encrypting as it uploads.
Differential privacy (:mod:`cipherhive.node.privacy.record_level`) is charged before a record
is touched and checked after training.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from cipherhive.ckks import codec
from cipherhive.node import metrics
from cipherhive.node.privacy.ledger import BudgetExhausted, PrivacyLedgerError
from cipherhive.node.privacy.record_level import PrivacyGuard, ScheduleRefused
from cipherhive.node.session import Services
from cipherhive.node.state.model_state import ModelState
from cipherhive.node.sums.receive import TRANSIENT
from cipherhive.node.trainer import RoundInfo
from cipherhive.node.training.federated_eval import Trained, evaluate_base
from cipherhive.node.training.update import (
    UpdateError,
    check_update,
    rounded_metrics,
    unweight_control,
    weighted_blocks,
)
from cipherhive.node.transfer.upload import submit_requests
from cipherhive.runtime import failpoints
from cipherhive.runtime.logs import event
from cipherhive.runtime.progress import track
from cipherhive.runtime.transport import describe_rpc_error
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.node")


class LocalTraining:
    """Trains the global model for a round and, in an unmasked round, encrypts and uploads the update."""

    def __init__(self, services: Services, state: ModelState, privacy: PrivacyGuard) -> None:
        self._services = services
        self._state = state
        self._privacy = privacy

    def restore_model(self) -> None:
        """Back to the global model: the trained values were only ever an input to an update."""
        self._state.flat.load(self._state.global_values)

    def train(self, ev: pb.RoundEvent, fields: dict[str, Any]) -> Trained | None:
        """Evaluate and train the global model; (weight, result, trained values, evaluation slots)."""
        t0 = time.perf_counter()
        try:
            dp = self._privacy.begin_round(ev.round)  # charged (durably) before a record is touched
        except (PrivacyLedgerError, ScheduleRefused) as exc:
            level = logging.WARNING if isinstance(exc, BudgetExhausted) else logging.ERROR
            event(log, f"not taking part: {exc}", level, **fields)
            return None
        if dp is not None:
            fields["epsilon"] = round(self._privacy.spent(), 4)
        # The base model's evaluation rides this round's upload (docs/spec/sum-checks.md §5).
        evaluation = evaluate_base(
            self._services.trainer, self._state.model, self._state.settings, dp is not None, fields
        )
        try:
            info = RoundInfo(
                ev.round, ev.base_round, self._state.name, should_stop=self._services.stop.is_set, privacy=dp
            )
            result = self._services.trainer.train(self._state.model, info)
            if self._services.stop.is_set():
                event(log, "stop requested during training: not submitting this round", **fields)
                return None
            self._privacy.check_trained(dp)
            weight = self._privacy.weight(int(result.num_samples), self._state.settings.weight_unit)
            # The trained values are read in place (no copy) while they are encrypted.
            local = self._privacy.privatize(
                self._state.flat.read(), self._state.global_values
            )  # member-level DP
            # SCAFFOLD's control block travels unweighted (after member-level DP, which clips and
            # noises update and control block as one vector; its weight is 1, so this is a no-op there).
            local = unweight_control(
                local, self._state.global_values, weight, self._state.layout.control_start
            )
            check_update(local, self._state.global_values, weight, self._state.settings.max_participants)
        except UpdateError as exc:
            event(log, f"not submitting: {exc}", logging.ERROR, **fields)
            return None
        except Exception:
            if self._services.stop.is_set():  # a trainer cut short may fail on its way out: not a fault
                event(log, "stop requested during training: not submitting this round", **fields)
                return None
            log.exception("trainer failed in round %d; not submitting", ev.round, extra={"fields": fields})
            return None
        t_train = time.perf_counter() - t0
        metrics.PHASE_SECONDS.labels("train").observe(t_train)
        event(
            log,
            "trained",
            samples=result.num_samples,
            train_s=round(t_train, 3),
            metrics=rounded_metrics(result.metrics),
            **fields,
        )
        return weight, result, local, evaluation

    def header(self, ev: pb.RoundEvent, result: Any) -> pb.SubmitHeader:
        return pb.SubmitHeader(
            round=ev.round,
            base_round=ev.base_round,
            submission_id=self._state.store.submission_id(ev.round),
            layout_hash=self._state.layout.hash,
            key_fingerprint=self._services.fingerprint,
            num_values=self._state.layout.num_values,
            num_ciphertexts=codec.blocks_for(
                self._state.layout.num_values, self._services.pool.values_per_block
            ),
            # Off by default: rounded accuracies reveal sample counts (docs/explanation/trust-model.md).
            metrics=rounded_metrics(result.metrics) if self._services.config.report_metrics else {},
        )

    def train_and_submit(
        self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent, fields: dict[str, Any]
    ) -> None:
        """An unmasked round (a server run with masking off): train, encrypt as it uploads."""
        t0 = time.perf_counter()
        trained = self.train(ev, fields)
        if trained is None:
            return
        weight, result, local, evaluation = trained
        blocks = weighted_blocks(
            local, self._state.global_values, weight, self._services.pool.values_per_block, evaluation
        )
        header = self.header(ev, result)
        t1 = time.perf_counter()
        per_chunk = max(1, min(self._state.settings.max_ciphertexts_per_chunk, 16))
        try:
            receipt = stub.SubmitUpdate(
                submit_requests(
                    header,
                    track(
                        self._services.pool.encrypt(blocks),
                        header.num_ciphertexts,
                        f"round {ev.round}: encrypt+upload",
                        node=self._state.name,
                        round=ev.round,
                    ),
                    per_chunk,
                ),
                metadata=self._services.metadata(),
            )
        except grpc.RpcError as exc:
            if exc.code() in TRANSIENT:
                raise
            event(log, f"server refused the update: {describe_rpc_error(exc)}", logging.WARNING, **fields)
            return
        failpoints.hit("node.submitted")
        self._state.store.mark_submitted(ev.round, header.submission_id, receipt.receipt, weight)
        metrics.ROUNDS_JOINED.inc()
        metrics.PHASE_SECONDS.labels("encrypt_upload").observe(time.perf_counter() - t1)
        event(
            log,
            "update submitted",
            samples=result.num_samples,
            train_s=round(t1 - t0, 3),
            encrypt_upload_s=round(time.perf_counter() - t1, 3),
            bytes=receipt.num_bytes,
            duplicate=receipt.duplicate,
            metrics=rounded_metrics(result.metrics),
            **fields,
        )
