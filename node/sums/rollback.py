"""Withdrawn rounds on the node: roll the model back to a kept checkpoint and replay from there.

A round the server withdrew (its participants rejected its sum, or the operator
withdrew it) is never applied on replay; if this node already applied it, the
model returns to the newest kept checkpoint from before it, with the chain hash
that checkpoint recorded, and the session restarts to follow the federation
again from there. Without such a checkpoint the node stops taking part and
says how to recover (`cipherhive node bootstrap`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from cipherhive.federation.layout import Layout
from cipherhive.node import metrics
from cipherhive.node.config import NodeConfig
from cipherhive.node.state.checkpoint import Checkpoint, NodeState
from cipherhive.node.sums.optimizers import OptimizerError, ServerOptimizer
from cipherhive.node.sums.receive import BOOTSTRAP_HINT
from cipherhive.node.trainer import federated_tensors
from cipherhive.node.training.update import FlatParams
from cipherhive.runtime.logs import event
from cipherhive.secagg.chain import ChainHash
from cipherhive.v1 import federation_pb2 as pb

log = logging.getLogger("cipherhive.node")


class Rollbacks:
    """The withdrawal half of :class:`cipherhive.node.daemon.Node` (a mixin)."""

    config: NodeConfig
    name: str
    store: NodeState
    trainer: Any
    tensors: list[tuple[str, torch.Tensor]]
    flat: FlatParams
    global_values: np.ndarray
    applied_round: int
    withdrawn: set[int]
    chain: ChainHash | None
    fingerprint: str
    _idle: str | None
    _resync: bool
    layout: Layout
    optimizer: ServerOptimizer

    def _reset_chain(self, checkpoint: Checkpoint | None) -> None:
        """The chain hash goes back with the model: the one the target checkpoint recorded."""
        try:
            if checkpoint is None:
                self.chain = ChainHash.genesis(self.fingerprint, self.layout.hash)
            else:
                self.chain = ChainHash.from_hex(checkpoint.chain_hash) if checkpoint.chain_hash else None
        except ValueError:
            self.chain = None  # cannot enrol in masked rounds; logged when one opens

    def _on_withdrawn(self, ev: pb.RoundEvent) -> None:
        self.withdrawn.add(ev.round)
        self.store.forget_rejection(ev.round)  # nothing left to remember about it
        event(log, "round withdrawn", logging.WARNING, node=self.name, round=ev.round, reason=ev.reason)
        self._roll_back(ev.round, ev.reason or "withdrawn")

    def _roll_back(self, withdrawn: int, why: str) -> bool:
        """Return to the newest kept checkpoint from before ``withdrawn`` if the model went
        through it; True when the model changed (the session then restarts to replay from there)."""
        chain = self.store.chain()
        if withdrawn == 0 or withdrawn not in chain:
            return False
        target = self.store.rollback_target(withdrawn)
        fields: dict[str, Any] = {"node": self.name, "round": withdrawn, "applied_round": self.applied_round}
        if target is None:
            self._idle = (
                f"round {withdrawn}, which this node's model went through, was withdrawn ({why}) and no "
                f"kept checkpoint is older (keep_checkpoints = {self.config.keep_checkpoints}): "
                f"{BOOTSTRAP_HINT}"
            )
            event(log, self._idle, logging.ERROR, **fields)
            return False
        checkpoint = self.store.rollback(target)
        if checkpoint is None:
            fresh = self.trainer.build_model()
            values = dict(federated_tensors(self.trainer, fresh))
            self.optimizer.reset()
        else:
            values = checkpoint.tensors
            try:  # the optimizer's moments go back with the model
                self.optimizer.load(checkpoint.optimizer, f"the kept checkpoint of round {target}")
            except OptimizerError as exc:
                self._idle = f"cannot roll back to round {target}: {exc}; {BOOTSTRAP_HINT}"
                event(log, self._idle, logging.ERROR, **fields)
                return False
        with torch.no_grad():
            for name, tensor in self.tensors:
                tensor.copy_(values[name])
        self.global_values[:] = self.flat.read()
        self.applied_round = target
        self._reset_chain(checkpoint)
        metrics.APPLIED_ROUND.set(target)
        metrics.ROLLBACKS.inc()
        event(
            log,
            f"rolled back to round {target}: round {withdrawn} was withdrawn ({why})",
            logging.WARNING,
            **fields,
        )
        self._resync = True
        return True
