"""Shared-memory slots that carry blocks between a node and its crypto workers.

Why: a block is 64 KB of float64 one way and a 64-131 KB ciphertext the other.
Pickled through a pool's pipes (64 KB of kernel buffer, so every block is
several wake-ups of both processes), that cost the node's main process about
0.4 ms per block, a third of the encryption itself, and on a shared machine
it is CPU the other daemons do not get. Here the pool's tasks carry only slot
numbers: the node copies a block into a slot, the worker reads it there and
writes its result back into the same slot, and the node copies it out.

A slot belongs to one block from :meth:`Slots.put` to :meth:`Slots.take`; the
pool never has more blocks in flight than there are slots. A result larger
than a slot (a baseline codec in the benchmark) travels inline instead.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

#: Bytes per slot: the largest block either way (a full N=8192 ciphertext is ~131 KB).
SLOT_BYTES = 140_000

_area: memoryview | None = None


def attach(area: Any) -> None:
    """In a worker: the shared area it was started with."""
    global _area
    _area = memoryview(area).cast("B") if area is not None else None


def worker_view(slot: int, length: int) -> memoryview:
    assert _area is not None
    start = slot * SLOT_BYTES
    return _area[start : start + length]


def worker_put(slot: int, data: bytes | np.ndarray) -> int | bytes | np.ndarray:
    """Write a result into ``slot``; returns its length, or the result itself if it is too big."""
    buffer: Any = data if isinstance(data, bytes) else np.ascontiguousarray(data)
    raw = memoryview(buffer).cast("B")
    if raw.nbytes > SLOT_BYTES or _area is None:
        return data
    start = slot * SLOT_BYTES
    _area[start : start + raw.nbytes] = raw
    return raw.nbytes


class Slots:
    """The node's side: ``count`` slots of :data:`SLOT_BYTES` in one shared array."""

    def __init__(self, ctx: Any, count: int) -> None:
        self.area = ctx.RawArray("B", count * SLOT_BYTES)
        self._view = memoryview(self.area).cast("B")
        self.count = count
        self._free: deque[int] = deque(range(count))

    def put(self, data: bytes | np.ndarray) -> tuple[int, int] | None:
        """Copy ``data`` into a free slot: (slot, length), or None if it does not fit one."""
        buffer: Any = data
        raw = memoryview(buffer).cast("B")
        if raw.nbytes > SLOT_BYTES:
            return None
        slot = self._free.popleft()
        start = slot * SLOT_BYTES
        self._view[start : start + raw.nbytes] = raw
        return slot, raw.nbytes

    def take(self, slot: int, length: int) -> bytes:
        """The result a worker left in ``slot``, copied out; the slot is free again."""
        start = slot * SLOT_BYTES
        data = bytes(self._view[start : start + length])
        self._free.append(slot)
        return data

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def reset(self) -> None:
        """Every slot free (after a stream ended early and its tasks were waited for)."""
        self._free = deque(range(self.count))
