"""Fan-out of round events to every open WatchRounds / WatchEvents stream.

The round manager publishes from the scheduler thread or a worker thread;
the streams live on the server's event loop. Each subscriber is an
``asyncio.Queue`` owned by that loop, fed with ``loop.call_soon_threadsafe``,
so publishing never blocks on a slow stream and a stream costs no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from cipherhive.v1 import federation_pb2 as pb

#: Events a stream may fall behind by before it is ended (a client that stopped reading).
MAX_BACKLOG = 1000


class Subscription:
    """One stream's queue; ``None`` in it means: end the stream (shutdown or overflow)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[pb.RoundEvent | None] = asyncio.Queue()
        self.overflowed = False

    def _put(self, item: pb.RoundEvent | None) -> None:
        """On the loop: queue ``item``; a stream too far behind is told to end instead."""
        if self.overflowed:
            return
        if item is not None and self.queue.qsize() >= MAX_BACKLOG:
            self.overflowed = True
            item = None
        self.queue.put_nowait(item)

    async def get(self) -> pb.RoundEvent | None:
        return await self.queue.get()


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        """Call on the event loop that will read the subscription."""
        sub = Subscription(asyncio.get_running_loop())
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def _send(self, item: pb.RoundEvent | None) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            with contextlib.suppress(RuntimeError):  # its loop is closed: the server is stopping
                sub.loop.call_soon_threadsafe(sub._put, item)

    def publish(self, event: pb.RoundEvent) -> None:
        """Thread-safe: queue ``event`` for every subscriber."""
        self._send(event)

    def close_all(self) -> None:
        """Wake every stream so it can end (shutdown)."""
        self._send(None)
