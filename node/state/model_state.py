"""The node's mutable model and round state, in one object its collaborators share.

Training, masked rounds, applying sums and rolling back all read and change the same
model, chain hash, optimizer and round bookkeeping; keeping them here (rather than as
attributes each part re-declares) makes what is shared, and who changes it, explicit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cipherhive.federation.layout import Layout
from cipherhive.node.secagg.participation import MaskingSetup, Participation
from cipherhive.node.secagg.release_ledger import ReleaseLedger
from cipherhive.node.state.checkpoint import NodeState
from cipherhive.node.sums.optimizers import ServerOptimizer
from cipherhive.node.training.update import FlatParams
from cipherhive.secagg.chain import ChainHash
from cipherhive.v1 import federation_pb2 as pb


@dataclass(eq=False)
class ModelState:
    """The model, its history and this node's place in the federation's rounds."""

    #: This node's name (the server's at Join).
    name: str
    #: The federation's settings (from Join).
    settings: pb.FederationSettings
    #: The trainer's model, trained in place.
    model: Any
    #: The model's federated tensors, by name.
    tensors: list[tuple[str, torch.Tensor]]
    layout: Layout
    #: The federated tensors' values as one float32 buffer.
    flat: FlatParams
    #: The last applied global model (float32, the only other full-size copy); changed in place.
    global_values: np.ndarray
    #: The checkpoints, submissions and rejections on disk.
    store: NodeState
    #: The round whose sum the model is at.
    applied_round: int
    #: The server-side optimizer the federation announced (set at Join, before any sum is applied).
    optimizer: ServerOptimizer
    #: The chain hash of the applied model (None: a checkpoint from before masked rounds).
    chain: ChainHash | None
    #: The release ledger: a self-mask is released at most once per base model.
    ledger: ReleaseLedger
    #: Masked rounds: this node's pinned membership and keys (None: not configured).
    masking: MaskingSetup | None
    #: Rounds the server withdrew (from Join and WITHDRAWN events): never applied on replay.
    withdrawn: set[int] = field(default_factory=set)
    #: Why this node follows the federation without taking part (None: it takes part).
    idle: str | None = None
    #: Rolled back: the session restarts to follow the federation from the new model.
    resync: bool = False
    #: The oldest round whose sum the server keeps (0: not told).
    oldest_kept: int = 0
    #: This node's part in the round it is taking part in (masked rounds).
    part: Participation | None = None

    def pruned_behind(self) -> bool:
        """The server no longer keeps the sum this node needs next."""
        return bool(self.oldest_kept) and self.oldest_kept > self.applied_round + 1
