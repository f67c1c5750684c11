"""The node's mutable model and round state, in one object its collaborators share.

Training, masked rounds, applying sums and rolling back all read and change the same
model, chain hash, optimizer and round bookkeeping; keeping them here (rather than as
attributes each part re-declares) makes what is shared, and who changes it, explicit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableSet
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

#: Withdrawn rounds a node remembers (the newest): see :class:`WithdrawnRounds`.
KEEP_WITHDRAWN = 64


class WithdrawnRounds(MutableSet[int]):
    """The rounds the server withdrew that this node still needs to know of: the newest ones.

    A member that spoils every round makes every round withdrawn (docs/spec/sum-checks.md §8),
    so remembering all of them would grow without end. What the node asks of them:

    * the release ledger's version of a base (``MaskedRoundDriver._ledger_key``,
      docs/spec/masked-round.md §6) is the newest withdrawn round above the base, and the
      newest round above the base, if any round is, is the newest of all: only the newest one
      counts, and it is always kept;
    * the sum applier skips a SUM_READY of a withdrawn round. The server sends SUM_READY for a
      round before its WITHDRAWN on the same stream, never after (a withdrawn round stays
      withdrawn, its sum is deleted, a replay sends WITHDRAWN in its place), so this guards
      events in flight, and only recent rounds can be in flight. An older one, if a server
      announced it again, could not be fetched from an honest server, and a dishonest one can
      announce any sum under a new round number anyway: the sum checks stand either way.

    So the newest :data:`KEEP_WITHDRAWN` are kept (a Join lists up to 1000 of them); the
    oldest go first.
    """

    def __init__(self, rounds: Iterable[int] = (), keep: int = KEEP_WITHDRAWN) -> None:
        self._keep = max(1, keep)
        self._rounds: set[int] = set()
        self.update(rounds)

    def __contains__(self, value: object) -> bool:
        return value in self._rounds

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._rounds))

    def __len__(self) -> int:
        return len(self._rounds)

    def __repr__(self) -> str:
        return f"WithdrawnRounds({sorted(self._rounds)!r})"

    def add(self, value: int) -> None:
        self._rounds.add(int(value))
        if len(self._rounds) > self._keep:
            self._rounds.remove(min(self._rounds))

    def discard(self, value: int) -> None:
        self._rounds.discard(value)

    def update(self, rounds: Iterable[int]) -> None:
        for number in rounds:
            self.add(number)


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
    #: Rounds the server withdrew (from Join and WITHDRAWN events): never applied on replay;
    #: the newest ones only (:class:`WithdrawnRounds`).
    withdrawn: WithdrawnRounds = field(default_factory=WithdrawnRounds)
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
