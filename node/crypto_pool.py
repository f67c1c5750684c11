"""Encrypt and decrypt on every core.

TenSEAL holds the GIL, so threads do not help: this pool uses processes,
started with *spawn* (gRPC's threads do not survive fork), each given the
serialized secret context once. Work is handed out one ciphertext block at a
time with a bounded window, so results stream out in order while later
blocks are still being encrypted (the upload overlaps the encryption) and
memory stays a few batches per worker, not a copy of the whole update.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import numpy as np

from cipherhive.codec import NodeCodec

#: The product's encoding; the benchmark names its baselines here instead.
DEFAULT_CODEC = "cipherhive.codec:SecretCodec"

_worker_codec: NodeCodec | None = None


def make_codec(factory: str, key: bytes) -> NodeCodec:
    module, _, name = factory.partition(":")
    codec: NodeCodec = getattr(importlib.import_module(module), name)(key)
    return codec


def _init_worker(factory: str, key: bytes) -> None:
    global _worker_codec
    _worker_codec = make_codec(factory, key)


def _encrypt(blocks: list[np.ndarray]) -> list[bytes]:
    assert _worker_codec is not None
    return [_worker_codec.encrypt(block) for block in blocks]


def _decrypt(blobs: list[bytes]) -> list[np.ndarray]:
    assert _worker_codec is not None
    return [_worker_codec.decrypt(blob) for blob in blobs]


#: Blocks per task sent to a worker: amortises the pickling round trip (~0.5 MB a task).
BATCH = 8


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


class CryptoPool:
    """``workers == 1`` runs in this process; more start that many spawned processes."""

    def __init__(self, secret_context: bytes, workers: int = 0, factory: str = DEFAULT_CODEC) -> None:
        self.workers = workers or default_workers()
        self._local = make_codec(factory, secret_context)  # validates the key before workers start
        self.values_per_block = self._local.values_per_block
        self._pool: Pool | None = None
        if self.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(factory, secret_context))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> CryptoPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ordered(self, fn: Any, items: Iterable[Any]) -> Iterator[Any]:
        if self._pool is None:
            local = self._local.encrypt if fn is _encrypt else self._local.decrypt
            for item in items:
                yield local(item)
            return
        window: deque[AsyncResult[list[Any]]] = deque()
        limit = 2 * self.workers
        for batch in _batches(items, BATCH):
            window.append(self._pool.apply_async(fn, (batch,)))
            if len(window) >= limit:
                yield from window.popleft().get()
        while window:
            yield from window.popleft().get()

    def encrypt(self, blocks: Iterable[np.ndarray]) -> Iterator[bytes]:
        """Encrypt blocks of ``values_per_block`` values, in order, as they are produced."""
        return self._ordered(_encrypt, blocks)

    def encrypt_vector(self, vector: np.ndarray) -> Iterator[bytes]:
        step = self.values_per_block
        return self.encrypt(vector[start : start + step] for start in range(0, vector.shape[0], step))

    def decrypt(self, blobs: Iterable[bytes]) -> Iterator[np.ndarray]:
        return self._ordered(_decrypt, blobs)
