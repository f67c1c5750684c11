"""Fan-out of round events to every open WatchRounds stream."""

from __future__ import annotations

import queue
import threading

from cipherhive.v1 import federation_pb2 as pb


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[queue.SimpleQueue[pb.RoundEvent | None]] = set()

    def subscribe(self) -> queue.SimpleQueue[pb.RoundEvent | None]:
        q: queue.SimpleQueue[pb.RoundEvent | None] = queue.SimpleQueue()
        with self._lock:
            self._subscribers.add(q)
        return q

    def unsubscribe(self, q: queue.SimpleQueue[pb.RoundEvent | None]) -> None:
        with self._lock:
            self._subscribers.discard(q)

    def publish(self, event: pb.RoundEvent) -> None:
        with self._lock:
            for q in self._subscribers:
                q.put(event)

    def close_all(self) -> None:
        """Wake every stream so it can end (shutdown)."""
        with self._lock:
            for q in self._subscribers:
                q.put(None)
