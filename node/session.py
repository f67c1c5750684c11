"""What a node's collaborators share besides the model state: services fixed for the node's life.

:class:`cipherhive.node.daemon.Node` builds one :class:`Services` and hands it to each of its
collaborators (training, masked rounds, sums, rollbacks) so that none of them reaches into
another for its configuration, crypto pool or the round events of the current session.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cipherhive.node.config import NodeConfig
from cipherhive.node.crypto.pool import CryptoPool
from cipherhive.v1 import federation_pb2 as pb


class RoundEvents:
    """The current session's round events: the watch stream, with events put back first.

    A thread reads the stream as events arrive, so a step can look at what came in while it
    was busy (a re-formed roster during training, docs/spec/masked-round.md §2.1) without
    waiting; an error of the stream is raised where the next event would have been read.
    A masked round reads ahead for its own steps and puts back what the main loop must handle.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[pb.RoundEvent | BaseException | None] | None = None
        self._pending: deque[pb.RoundEvent] = deque()
        self._error: BaseException | None = None
        self._ended: list[BaseException] = []

    def open(self, stream: Iterable[pb.RoundEvent]) -> None:
        inbox: queue.Queue[pb.RoundEvent | BaseException | None] = queue.Queue()
        ended: list[BaseException] = []  # this stream's own: a late error of an old one stays there

        def pump() -> None:
            try:
                for ev in stream:
                    inbox.put(ev)
            except BaseException as exc:  # handed to the reader, raised where it reads next
                ended.append(exc)
                inbox.put(exc)
            inbox.put(None)

        self._queue, self._pending, self._error, self._ended = inbox, deque(), None, ended
        threading.Thread(target=pump, name="round-events", daemon=True).start()

    def take_stream_error(self) -> BaseException | None:
        """The error the last stream ended with, even if no step has read it yet; once.

        A server that stops ends the stream with a status saying so while the node may be busy
        in another call that then fails for a plainer reason (a refused connection); the
        reconnect logic asks here what really happened (docs/troubleshooting.md#the-server-is-restarting).
        """
        ended, self._ended = self._ended, []
        return ended[0] if ended else None

    def close(self) -> None:
        self._queue = None

    def next(self) -> pb.RoundEvent | None:
        """The next round event: one put back first, then the watch stream (None: it ended)."""
        if self._pending:
            return self._pending.popleft()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._take(block=True)

    def ready(self) -> list[pb.RoundEvent]:
        """Every event already here, without waiting (they stay in order for :meth:`next`).

        An error of the stream is not raised here: it stays for :meth:`next`, after these
        events, so a step that only looks ahead (before masking) is never cut short by it."""
        while self._error is None and (ev := self._take(block=False)) is not None:
            self._pending.append(ev)
        return list(self._pending)

    def drop(self, ev: pb.RoundEvent) -> None:
        """Remove an event :meth:`ready` showed (the caller handled it)."""
        self._pending.remove(ev)

    def put_back(self, ev: pb.RoundEvent) -> None:
        self._pending.appendleft(ev)

    def _take(self, *, block: bool) -> pb.RoundEvent | None:
        inbox = self._queue
        if inbox is None:
            return None
        try:
            item = inbox.get(block=block)
        except queue.Empty:
            return None
        if item is None:
            self._queue = None
            return None
        if isinstance(item, BaseException):
            self._queue = None
            if not block:
                self._error = item
                return None
            raise item
        return item


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
