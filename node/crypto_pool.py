"""Encrypt and decrypt on every core.

TenSEAL holds the GIL, so threads do not help: this pool uses processes,
started with *spawn* (gRPC's threads do not survive fork), each given the
serialized secret context once. Work is handed out one ciphertext block at a
time with a bounded window, so results stream out in order while later
blocks are still being encrypted (the upload overlaps the encryption) and
memory stays a few blocks per worker, not a copy of the whole update.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import numpy as np

from cipherhive.codec import VALUES_PER_CIPHERTEXT, SecretCodec

_worker_codec: SecretCodec | None = None


def _init_worker(secret_context: bytes) -> None:
    global _worker_codec
    _worker_codec = SecretCodec(secret_context)


def _encrypt(block: np.ndarray) -> bytes:
    assert _worker_codec is not None
    return _worker_codec.encrypt(block)


def _decrypt(blob: bytes) -> np.ndarray:
    assert _worker_codec is not None
    return _worker_codec.decrypt(blob)


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


class CryptoPool:
    """``workers == 1`` runs in this process; more start that many spawned processes."""

    def __init__(self, secret_context: bytes, workers: int = 0) -> None:
        self.workers = workers or default_workers()
        self._local = SecretCodec(secret_context)  # validates the key before any worker starts
        self._pool: Pool | None = None
        if self.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(secret_context,))

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
        window: deque[AsyncResult[Any]] = deque()
        limit = 4 * self.workers
        for item in items:
            window.append(self._pool.apply_async(fn, (item,)))
            if len(window) >= limit:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def encrypt(self, vector: np.ndarray) -> Iterator[bytes]:
        """Seeded ciphertexts of ``vector``, VALUES_PER_CIPHERTEXT values each, in order."""
        blocks = (
            vector[start : start + VALUES_PER_CIPHERTEXT]
            for start in range(0, vector.shape[0], VALUES_PER_CIPHERTEXT)
        )
        return self._ordered(_encrypt, blocks)

    def decrypt(self, blobs: Iterable[bytes]) -> Iterator[np.ndarray]:
        return self._ordered(_decrypt, blobs)
