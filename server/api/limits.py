"""Per-caller admission, transfer slots: what stops one member from starving the others.

Each identity, keyed by ``(role, name)`` so that a node certificate named like
the operator cannot use up the operator's allowance, gets a token bucket for
new calls and a bounded number of calls in progress. Calls in progress that
are not from admin certificates are capped at ``max_concurrent_rpcs`` for the
whole server; admin calls may take the total ``admin_reserved_rpcs`` higher,
so the operator can always look and act during a flood.
Beyond any limit the caller is told RESOURCE_EXHAUSTED and how to back off;
everybody else is unaffected.

Everything here runs on the server's event loop (one thread), so the counters
need no lock; the semaphores are asyncio ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from cipherhive.server import metrics
from cipherhive.server.api.identity import Caller, Refusal

#: How long a transfer waits for a slot before the caller is told to retry.
TRANSFER_WAIT_SECONDS = 60.0


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    active: int = 0


class Admission:
    def __init__(
        self, rate: float, burst: int, per_identity: int, max_calls: int, admin_reserved: int
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.per_identity = per_identity
        self.max_calls = max_calls
        self.admin_reserved = admin_reserved
        self.active = 0  # calls in progress
        self.others = 0  # of which not from admin certificates
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def enter(self, caller: Caller) -> None:
        """Take one of ``caller``'s call slots, or raise Refusal (RESOURCE_EXHAUSTED)."""
        now = time.monotonic()
        bucket = self._buckets.setdefault(caller.key, _Bucket(float(self.burst), now))
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        who = f"{caller.role} {caller.name!r}"
        admin = caller.role == "admin"
        if (self.active if admin else self.others) >= self.max_calls + (self.admin_reserved if admin else 0):
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server has {self.active} calls in progress (max_concurrent_rpcs {self.max_calls}); "
                "retry in a few seconds",
            )
        if bucket.tokens < 1.0:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{who} exceeds {self.rate:g} calls per second; retry after a pause",
            )
        if bucket.active >= self.per_identity:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{who} already has {bucket.active} calls in progress (limit {self.per_identity}); "
                "close idle streams before opening more",
            )
        bucket.tokens -= 1.0
        bucket.active += 1
        self.active += 1
        self.others += not admin
        metrics.CALLS_IN_PROGRESS.set(self.active)

    def leave(self, caller: Caller) -> None:
        self.active -= 1
        self.others -= caller.role != "admin"
        metrics.CALLS_IN_PROGRESS.set(self.active)
        bucket = self._buckets[caller.key]
        bucket.active -= 1
        refilled = bucket.tokens + (time.monotonic() - bucket.stamp) * self.rate
        if bucket.active == 0 and refilled >= self.burst:
            del self._buckets[caller.key]  # idle and full again: forget it, the table stays small


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


class Transfers:
    """One upload and one download per identity at a time, and a few in the whole server.

    A second concurrent upload (or download) from the same identity is refused at
    once: a member needs only one, and a hostile one must not fill the slots with
    idle streams. The shared slots bound memory by the model size, not the number
    of members; a stream that waits for one is not read, so flow control keeps its
    data on the sender's side.
    """

    def __init__(self, slots: int) -> None:
        self._slots = asyncio.Semaphore(slots)
        self._busy: dict[tuple[str, str, str], grpc.aio.ServicerContext] = {}

    def claim(self, caller: Caller, kind: str, context: grpc.aio.ServicerContext) -> None:
        """Mark ``caller``'s one ``kind`` ("upload"/"download") as in progress, or raise Refusal.

        A call that already ended on the wire (the client gave up, or the transport
        refused a message) no longer counts, even while its handler is still unwinding:
        the member's next attempt must not be refused because of it.
        """
        key = (caller.role, caller.name, kind)
        holder = self._busy.get(key)
        if holder is not None and not holder.done():
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller.role} {caller.name!r} already has {_a(kind)} in progress; one {kind} per "
                f"member at a time: finish or cancel it first",
            )
        self._busy[key] = context

    def release(self, caller: Caller, kind: str, context: grpc.aio.ServicerContext) -> None:
        key = (caller.role, caller.name, kind)
        if self._busy.get(key) is context:
            del self._busy[key]

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the shared transfer slots, waiting up to TRANSFER_WAIT_SECONDS."""
        try:
            await asyncio.wait_for(self._slots.acquire(), TRANSFER_WAIT_SECONDS)
        except TimeoutError:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is busy with other transfers; retry"
            ) from None
        try:
            yield
        finally:
            self._slots.release()
