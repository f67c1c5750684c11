"""Per-caller admission: a request rate limit and a cap on concurrent streams.

A broken or hostile member must not be able to starve the others: each
certificate identity gets a token bucket for new calls and a bounded number
of calls in progress at once; beyond either it is told RESOURCE_EXHAUSTED
with how to back off, and everybody else is unaffected.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    active: int = 0


class Limiter:
    def __init__(self, rate: float, burst: int, max_active: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_active = max_active
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    @contextmanager
    def admit(self, who: str, context: grpc.ServicerContext) -> Iterator[None]:
        """Hold one of ``who``'s call slots for the duration of a call, or abort it."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(who, _Bucket(float(self.burst), now))
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens < 1.0:
                refused = f"{who!r} exceeds {self.rate:g} calls per second; retry after a pause"
            elif bucket.active >= self.max_active:
                refused = (
                    f"{who!r} already has {bucket.active} calls in progress (limit {self.max_active}); "
                    "close idle streams before opening more"
                )
            else:
                refused = ""
                bucket.tokens -= 1.0
                bucket.active += 1
        if refused:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        try:
            yield
        finally:
            with self._lock:
                bucket.active -= 1
