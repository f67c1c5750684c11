"""Withdrawn rounds on the node: roll the model back to a kept checkpoint and replay from there.

A round the server withdrew (its participants rejected its sum, or the operator
withdrew it) is never applied on replay; if this node already applied it, the
model returns to the newest kept checkpoint from before it, with the chain hash
that checkpoint recorded, and the session restarts to follow the federation
again from there. Without such a checkpoint the node stops taking part and
says how to recover (`cipherhive node bootstrap`).

A withdrawn round is over for good (its sum is deleted, it is never published again), so
whatever this node kept for it goes too: its rejection, its participation and upload files
and a download of its sum cut short. A member that spoils every round then leaves no trace
behind on the honest members but a bounded one (docs/spec/sum-checks.md §8).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cipherhive.node import metrics
from cipherhive.node.secagg.participation import Participation
from cipherhive.node.session import Services
from cipherhive.node.state import round_history
from cipherhive.node.state.checkpoint import Checkpoint
from cipherhive.node.state.model_state import ModelState
from cipherhive.node.sums.optimizers import OptimizerError
from cipherhive.node.sums.receive import BOOTSTRAP_HINT
from cipherhive.node.trainer import federated_tensors
from cipherhive.runtime.logs import event
from cipherhive.secagg.chain import ChainHash
from cipherhive.v1 import federation_pb2 as pb

log = logging.getLogger("cipherhive.node")


class RollbackHandler:
    """Handles withdrawn rounds: rolls the model, optimizer and chain hash back together."""

    def __init__(self, services: Services, state: ModelState) -> None:
        self._services = services
        self._state = state

    def _reset_chain(self, checkpoint: Checkpoint | None) -> None:
        """The chain hash goes back with the model: the one the target checkpoint recorded."""
        try:
            if checkpoint is None:
                self._state.chain = ChainHash.genesis(self._services.fingerprint, self._state.layout.hash)
            else:
                self._state.chain = (
                    ChainHash.from_hex(checkpoint.chain_hash) if checkpoint.chain_hash else None
                )
        except ValueError:
            self._state.chain = None  # cannot enrol in masked rounds; logged when one opens

    def on_withdrawn(self, ev: pb.RoundEvent) -> None:
        """Never apply the round again, and undo it if the model went through it."""
        self._state.withdrawn.add(ev.round)
        self._state.store.forget_rejection(ev.round)  # nothing left to remember about it
        self._forget_files(ev.round)
        round_history.record_undone(self._services.config.state_dir, ev.round, ev.reason or "withdrawn")
        event(
            log, "round withdrawn", logging.WARNING, node=self._state.name, round=ev.round, reason=ev.reason
        )
        self.roll_back(ev.round, ev.reason or "withdrawn")

    def _forget_files(self, number: int) -> None:
        """Round ``number`` is over for good: drop what is left of it on disk, and this node's
        part in memory of any round up to it (a withdrawn round was published, so no round up
        to it is still open).

        SUM_READY normally ends a round's part (``MaskedRoundDriver.end_part``), but a node
        that was away when the round was published and withdrawn only ever hears WITHDRAWN,
        and a download cut short leaves its file: both would otherwise stay while the model
        sits below the round (``remove_stale_files`` keeps files of rounds above the model's).
        """
        part = self._state.part
        if part is not None and part.round <= number:
            part.discard()
            self._state.part = None
        state_dir = self._services.config.state_dir
        Participation.forget(state_dir, number)
        # Names written by Participation.write_upload (before its rename) and SumApplier._masked.
        for name in (f"upload-{number}.partial", f"sum-{number}.download"):
            (state_dir / name).unlink(missing_ok=True)

    def roll_back(self, withdrawn: int, why: str) -> bool:
        """Return to the newest kept checkpoint from before ``withdrawn`` if the model went
        through it; True when the model changed (the session then restarts to replay from there)."""
        chain = self._state.store.chain()
        if withdrawn == 0 or withdrawn not in chain:
            return False
        target = self._state.store.rollback_target(withdrawn)
        fields: dict[str, Any] = {
            "node": self._state.name,
            "round": withdrawn,
            "applied_round": self._state.applied_round,
        }
        if target is None:
            self._state.idle = (
                f"round {withdrawn}, which this node's model went through, was withdrawn ({why}) and no "
                f"kept checkpoint is older (keep_checkpoints = {self._services.config.keep_checkpoints}): "
                f"{BOOTSTRAP_HINT}"
            )
            event(log, self._state.idle, logging.ERROR, **fields)
            return False
        checkpoint = self._state.store.rollback(target)
        if checkpoint is None:
            fresh = self._services.trainer.build_model()
            values = dict(federated_tensors(self._services.trainer, fresh))
            self._state.optimizer.reset()
        else:
            values = checkpoint.tensors
            try:  # the optimizer's moments go back with the model
                self._state.optimizer.load(checkpoint.optimizer, f"the kept checkpoint of round {target}")
            except OptimizerError as exc:
                self._state.idle = f"cannot roll back to round {target}: {exc}; {BOOTSTRAP_HINT}"
                event(log, self._state.idle, logging.ERROR, **fields)
                return False
        with torch.no_grad():
            for name, tensor in self._state.tensors:
                tensor.copy_(values[name])
        self._state.global_values[:] = self._state.flat.read()
        self._state.applied_round = target
        self._reset_chain(checkpoint)
        metrics.APPLIED_ROUND.set(target)
        metrics.ROLLBACKS.inc()
        round_history.record_undone(self._services.config.state_dir, withdrawn, why, target)
        event(
            log,
            f"rolled back to round {target}: round {withdrawn} was withdrawn ({why})",
            logging.WARNING,
            **fields,
        )
        self._state.resync = True
        return True
