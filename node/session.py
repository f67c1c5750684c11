"""What a node's collaborators share besides the model state: services fixed for the node's life.

:class:`cipherhive.node.daemon.Node` builds one :class:`Services` and hands it to each of its
collaborators (training, masked rounds, sums, rollbacks) so that none of them reaches into
another for its configuration, crypto pool or the round events of the current session.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cipherhive.node.config import NodeConfig
from cipherhive.node.crypto.pool import CryptoPool
from cipherhive.v1 import federation_pb2 as pb


class RoundEvents:
    """The current session's round events: the watch stream, with events put back first.

    A masked round reads ahead for its own steps and puts back what the main loop must handle.
    """

    def __init__(self) -> None:
        self._stream: Iterator[pb.RoundEvent] | None = None
        self._pending: deque[pb.RoundEvent] = deque()

    def open(self, stream: Iterable[pb.RoundEvent]) -> None:
        self._stream, self._pending = iter(stream), deque()

    def close(self) -> None:
        self._stream = None

    def next(self) -> pb.RoundEvent | None:
        """The next round event: one put back first, then the watch stream (None: it ended)."""
        if self._pending:
            return self._pending.popleft()
        if self._stream is None:
            return None
        return next(self._stream, None)

    def put_back(self, ev: pb.RoundEvent) -> None:
        self._pending.appendleft(ev)


@dataclass(frozen=True)
class Services:
    """The node's services, the same for its whole life, passed to every collaborator."""

    config: NodeConfig
    #: The federation key's fingerprint (or a benchmark codec's name).
    fingerprint: str
    pool: CryptoPool
    #: The training plug-in (trains, builds fresh models, sees applied rounds).
    trainer: Any
    #: Set when the node is asked to stop.
    stop: threading.Event
    events: RoundEvents
    #: The gRPC metadata of this node's calls (its name on an insecure channel).
    metadata: Callable[[], list[tuple[str, str]]]
