"""Encrypt and decrypt on every core.

TenSEAL holds the GIL, so threads do not help: this pool uses processes,
started with *spawn* (gRPC's threads do not survive fork), each given the
serialized secret context once. Work is handed out one ciphertext block at a
time with a bounded window, so results stream out in order while later
blocks are still being encrypted (the upload overlaps the encryption) and
memory stays a few batches per worker, not a copy of the whole update.

Masked uploads (SecAgg, Bonawitz et al., CCS 2017, §4; see
:mod:`cipherhive.secagg.masking`): the round's :class:`~cipherhive.secagg.masking.MaskPlan`
reaches the workers once per round, not with every block. It is written into a
small shared-memory area that every worker inherited at start
(:meth:`CryptoPool.set_mask_plan`), with a generation number; tasks carry only
that number, and a worker re-reads the plan when it changes. The area is zeroed
by :meth:`CryptoPool.clear_mask_plan` once the upload is encrypted.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import multiprocessing
import os
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import numpy as np

from cipherhive.ckks.codec import NodeCodec, SecretCodec
from cipherhive.node import stopping
from cipherhive.node.crypto import slots
from cipherhive.runtime.child_signals import ignored_in_children
from cipherhive.secagg import masking

#: The product's encoding; the benchmark names its baselines here instead.
DEFAULT_CODEC = "cipherhive.ckks.codec:SecretCodec"

_worker_codec: NodeCodec | None = None

#: Largest roster a mask plan is sized for in the shared area (pairs = members - 1).
MAX_MASK_PAIRS = 4095
_PLAN_SLOT = struct.Struct("<QI")  # generation, plan length
_PLAN_AREA = _PLAN_SLOT.size + 12 + masking.SEED_BYTES + MAX_MASK_PAIRS * (masking.SEED_BYTES + 1)
_worker_area: Any = None
_worker_plan: tuple[int, masking.MaskPlan] | None = None


def make_codec(factory: str, key: bytes) -> NodeCodec:
    module, _, name = factory.partition(":")
    codec: NodeCodec = getattr(importlib.import_module(module), name)(key)
    return codec


def _init_worker(factory: str, key: bytes, area: Any = None, slot_area: Any = None) -> None:
    global _worker_codec, _worker_area
    # Ctrl-C in a terminal, or SIGTERM to the unit or group, reaches the workers too: one killed in
    # the middle of a task would leave the node waiting for it. They started with both blocked
    # (runtime.child_signals); ignoring them discards any that came meanwhile. The node closes its
    # workers itself (close), or kills them on a forced exit (node.stopping).
    for stop_signal in stopping.STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    _worker_codec = make_codec(factory, key)
    _worker_area = area
    slots.attach(slot_area)


def _read_plan(area: Any) -> tuple[int, masking.MaskPlan | None]:
    view = memoryview(area).cast("B")
    generation, length = _PLAN_SLOT.unpack_from(view)
    if not length:
        return generation, None
    data = bytes(view[_PLAN_SLOT.size : _PLAN_SLOT.size + length])
    return generation, masking.MaskPlan.from_bytes(data)


def _plan_for(generation: int) -> masking.MaskPlan:
    """The worker's copy of the plan of ``generation``, read from shared memory when new."""
    global _worker_plan
    if _worker_plan is None or _worker_plan[0] != generation:
        current, plan = _read_plan(_worker_area)
        if current != generation or plan is None:
            raise masking.MaskError("the mask plan changed or was cleared while blocks were being encrypted")
        _worker_plan = (generation, plan)
    return _worker_plan[1]


#: One block of a task: (block index, slot or None, length, inline input or None, extra).
Item = tuple[int, int | None, int, Any, Any]


def _run(kind: str, generation: int, items: list[Item]) -> list[Any]:
    """In a worker: each block's input from its slot (or inline), its result back into the slot."""
    codec = _worker_codec
    assert codec is not None
    out: list[Any] = []
    for index, slot, length, inline, extra in items:
        data = inline if slot is None else slots.worker_view(slot, length)
        if kind in ("encrypt", "encrypt_masked"):
            values: np.ndarray = np.asarray(data) if slot is None else np.frombuffer(data, np.float64)
            if kind == "encrypt":
                result: Any = codec.encrypt(values)
            else:
                assert isinstance(codec, SecretCodec)
                result = codec.encrypt_masked(values, index, _plan_for(generation))
        elif kind == "decrypt":
            result = np.asarray(codec.decrypt(bytes(data)), dtype=np.float64)
        elif kind == "decrypt_c0":
            assert isinstance(codec, SecretCodec)
            result = codec.decrypt_c0_sum(bytes(data), extra, index)
        else:
            assert isinstance(codec, SecretCodec)
            codec.check_seeds(bytes(data), extra, index)
            result = b""
        out.append(slots.worker_put(slot, result) if slot is not None else result)
    return out


#: Blocks per task sent to a worker: amortises a task's round trip through the pool.
BATCH = 16
#: Tasks in flight per worker: one being worked on, one waiting.
WINDOW_PER_WORKER = 2


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


#: Seconds :meth:`CryptoPool.close` lets the workers finish the task in hand before killing them.
CLOSE_GRACE = 5.0
#: Seconds it then keeps killing workers (and any the pool started in their place) until all are gone.
KILL_WAIT = 5.0


def _processes(pool: Pool) -> list[Any]:
    """The pool's worker processes (``Pool`` keeps them in ``_pool``; it has no public accessor)."""
    return list(getattr(pool, "_pool", []))


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


class CryptoPool:
    """``workers == 1`` runs in this process; more start that many spawned processes."""

    def __init__(self, secret_context: bytes, workers: int = 0, factory: str = DEFAULT_CODEC) -> None:
        self.workers = workers or default_workers()
        self._local = make_codec(factory, secret_context)  # validates the key before workers start
        self.values_per_block = self._local.values_per_block
        self._pool: Pool | None = None
        self._plan: masking.MaskPlan | None = None
        self._generation = 0
        self._area: Any = None
        self._slots: slots.Slots | None = None
        if self.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self._area = ctx.RawArray("B", _PLAN_AREA) if isinstance(self._local, SecretCodec) else None
            # Enough slots for every block in flight: the window, plus the task being filled.
            self._slots = slots.Slots(ctx, (WINDOW_PER_WORKER * self.workers + 1) * BATCH)
            # A stop at start-up waits until the workers are registered for closing (atexit: a
            # pool left open would hang the exit, as multiprocessing ends workers with SIGTERM).
            with stopping.deferred(), ignored_in_children(*stopping.STOP_SIGNALS):
                self._pool = ctx.Pool(
                    self.workers,
                    initializer=_init_worker,
                    initargs=(factory, secret_context, self._area, self._slots.area),
                )
                atexit.register(self.close)

    @property
    def modulus(self) -> int:
        """The data prime q masks are reduced by (masked rounds need the product's codec)."""
        if not isinstance(self._local, SecretCodec):
            raise masking.MaskError("masked encryption needs the product's codec (SecretCodec)")
        return self._local.modulus

    def set_mask_plan(self, plan: masking.MaskPlan) -> None:
        """Hand this upload's masks to every worker (once per round; not while encrypting)."""
        if not isinstance(self._local, SecretCodec):
            raise masking.MaskError("masked encryption needs the product's codec (SecretCodec)")
        if len(plan.pairs) > MAX_MASK_PAIRS:
            raise masking.MaskError(f"a mask plan holds at most {MAX_MASK_PAIRS} pairs")
        self._generation += 1
        self._plan = plan
        if self._area is not None:
            self._write_area(plan.to_bytes())

    def clear_mask_plan(self) -> None:
        """Forget the plan here and in the workers' shared area (its keys are secrets)."""
        self._plan = None
        self._generation += 1
        if self._area is not None:
            self._write_area(b"")

    def _write_area(self, data: bytes) -> None:
        view = memoryview(self._area).cast("B")
        view[:] = bytes(len(view))
        view[_PLAN_SLOT.size : _PLAN_SLOT.size + len(data)] = data
        _PLAN_SLOT.pack_into(view, 0, self._generation, len(data))

    def encrypt_masked(self, blocks: Iterable[np.ndarray]) -> Iterator[bytes]:
        """:meth:`encrypt` with the current plan's masks; block ``i`` of the update gets stream ``i``."""
        plan, generation = self._plan, self._generation
        if plan is None:
            raise masking.MaskError("no mask plan: call set_mask_plan first")
        if self._pool is None:
            local = self._local
            assert isinstance(local, SecretCodec)
            return (local.encrypt_masked(block, index, plan) for index, block in enumerate(blocks))
        return self._ordered_masked(generation, blocks)

    def _ordered_masked(self, generation: int, blocks: Iterable[np.ndarray]) -> Iterator[bytes]:
        return self._stream("encrypt_masked", ((b, None) for b in blocks), generation)

    def _stream(self, kind: str, items: Iterable[tuple[Any, Any]], generation: int = 0) -> Iterator[Any]:
        """Results of ``kind`` over ``(input, extra)`` items, in order, through the slots.

        At most ``WINDOW_PER_WORKER`` tasks per worker are in flight, so memory stays a
        few batches whatever the update's size, and results stream out while later
        blocks are still with the workers.
        """
        assert self._pool is not None and self._slots is not None
        pool, shared = self._pool, self._slots
        window: deque[tuple[list[Item], AsyncResult[list[Any]]]] = deque()
        floats = kind in ("decrypt", "decrypt_c0")
        encrypting = kind.startswith("encrypt")

        def collect(task: list[Item], pending: AsyncResult[list[Any]]) -> Iterator[Any]:
            results = pending.get()
            for (_, slot, _, _, _), result in zip(task, results, strict=True):
                if isinstance(result, int) and slot is not None:
                    data = shared.take(slot, result)
                    yield np.frombuffer(data, dtype=np.float64) if floats else data
                else:
                    if slot is not None:
                        shared.release(slot)
                    yield result

        try:
            for batch in _batches(enumerate(items), BATCH):
                task: list[Item] = []
                for index, (payload, extra) in batch:
                    data = np.ascontiguousarray(payload, dtype=np.float64) if encrypting else payload
                    placed = shared.put(data)
                    if placed is None:
                        task.append((index, None, 0, data, extra))
                    else:
                        task.append((index, placed[0], placed[1], None, extra))
                window.append((task, pool.apply_async(_run, (kind, generation, task))))
                if len(window) >= WINDOW_PER_WORKER * self.workers:
                    yield from collect(*window.popleft())
            while window:
                yield from collect(*window.popleft())
        finally:
            if window:  # stopped early: let the workers finish with the slots before reusing them
                for _, pending in window:
                    pending.wait()
                shared.reset()

    def close(self) -> None:
        """End the workers; never hangs (at most :data:`CLOSE_GRACE` + :data:`KILL_WAIT` seconds).

        They ignore SIGTERM (runtime.child_signals), so ``Pool.terminate`` alone would wait for
        them forever: each is given the rest of its task in hand to exit by itself, then killed.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return
        atexit.unregister(self.close)
        pool.close()  # no more tasks: an idle worker exits at once, a busy one after its task
        deadline = time.monotonic() + CLOSE_GRACE
        for worker in _processes(pool):
            worker.join(max(0.0, deadline - time.monotonic()))
        # terminate() stops the pool from replacing workers and joins its threads; it runs in a
        # thread of its own because it waits for the workers, which ignore its SIGTERM: this one
        # kills those still alive (any the pool started in their place too). If it waits on a
        # lock a killed worker held, it is left behind, a daemon thread, the workers gone.
        finisher = threading.Thread(target=pool.terminate, name="crypto-pool-close", daemon=True)
        finisher.start()
        deadline = time.monotonic() + KILL_WAIT
        while time.monotonic() < deadline:
            alive = [w for w in _processes(pool) if w.exitcode is None]
            for worker in alive:
                with contextlib.suppress(OSError):
                    worker.kill()
            finisher.join(0.05)
            if not alive and not finisher.is_alive():
                return

    def __enter__(self) -> CryptoPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encrypt(self, blocks: Iterable[np.ndarray]) -> Iterator[bytes]:
        """Encrypt blocks of ``values_per_block`` values, in order, as they are produced."""
        if self._pool is None:
            return (self._local.encrypt(block) for block in blocks)
        return self._stream("encrypt", ((b, None) for b in blocks))

    def encrypt_vector(self, vector: np.ndarray) -> Iterator[bytes]:
        step = self.values_per_block
        return self.encrypt(vector[start : start + step] for start in range(0, vector.shape[0], step))

    def check_seeds(self, blobs: Iterable[bytes], seeds: Sequence[list[bytes]], count: int) -> None:
        """Raise :class:`cipherhive.secagg.masking.SeedCheckFailed` unless every block's c1 is Σ expand(seed).

        ``seeds`` gives, block by block, the roster's seeds of that block. Call it on
        the *whole* sum before :meth:`decrypt` sees any block of it: nothing about a
        decryption may be observable before every block passed (docs/spec/masked-round.md §8;
        Li and Micciancio, EUROCRYPT 2021). Spread over the workers like encryption.
        """
        if not isinstance(self._local, SecretCodec):
            raise masking.MaskError("the seed check needs the product's codec (SecretCodec)")
        if len(seeds) != count:
            raise masking.SeedCheckFailed(
                min(len(seeds), count), f"the sum has {count} blocks but seeds for {len(seeds)}"
            )
        items = (
            (index, blob, list(block_seeds))
            for index, (blob, block_seeds) in enumerate(zip(blobs, seeds, strict=True))
        )
        if self._pool is None:
            for index, blob, block_seeds in items:
                self._local.check_seeds(blob, block_seeds, index)
            return
        for _ in self._stream("check_seeds", ((blob, block_seeds) for _, blob, block_seeds in items)):
            pass

    def decrypt_c0_sum(self, records: Iterable[bytes], seeds: Sequence[list[bytes]]) -> Iterator[np.ndarray]:
        """Decrypt a masked round's Σ c0 records, c1 rebuilt from each block's seeds (in order).

        ``seeds`` must already match the members' signed commits (cipherhive.node.secagg.sum_proof).
        Raises :class:`cipherhive.secagg.masking.SeedCheckFailed` for a block SEAL refuses.
        """
        if not isinstance(self._local, SecretCodec):
            raise masking.MaskError("a masked sum needs the product's codec (SecretCodec)")
        local = self._local
        items = (
            (index, record, list(block_seeds))
            for index, (record, block_seeds) in enumerate(zip(records, seeds, strict=True))
        )
        if self._pool is None:
            return (local.decrypt_c0_sum(record, block_seeds, index) for index, record, block_seeds in items)
        return self._stream("decrypt_c0", ((record, block_seeds) for _, record, block_seeds in items))

    def decrypt(self, blobs: Iterable[bytes]) -> Iterator[np.ndarray]:
        if self._pool is None:
            return (self._local.decrypt(blob) for blob in blobs)
        return self._stream("decrypt", ((blob, None) for blob in blobs))
