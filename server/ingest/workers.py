"""Ingest on every core: worker processes that each own a stripe of a masked sum's blocks.

Why: parsing and adding uploads is CPU work that holds the GIL, so one server
process adds on one core however many it has. Here a masked round's running
Σ c0 (:class:`cipherhive.server.ingest.running_sum.MaskedSum`) lives in shared memory,
and block ``i`` belongs to worker ``(i // STRIPE) % workers``: only its owner
ever writes that block, so no two processes touch the same row and no lock
is needed between them. A stripe is one upload chunk (16 blocks), so one
stream's consecutive chunks go to different workers and even a single upload
spreads over every core.

The gRPC process stays the only one that talks to members. It spools each
chunk first (as before), then hands its owners *where* the blocks are in the
spool file, not the bytes: a worker reads them back from the page cache
(``pread``), checks and adds them, and answers with the blocks it added. The
guarantees are those of the in-process sum:

* all or nothing per upload: the round records which blocks each upload got
  added, and a rollback sends the owners the same spooled blocks to subtract;
  requests to one worker are served in order, so a subtraction always follows
  the addition it undoes;
* nothing is acknowledged before it is durable: acknowledgement still waits
  for the spool's fsync, after every block was added;
* crash recovery: the sum is rebuilt from the acknowledged spool files, as
  before; a worker that dies takes the sum's consistency with it, so the
  server stops with an error (``on_lost``) and recovers on restart;
* memory bounded by the model size: one shared copy of Σ c0, whatever the
  number of members or workers (each worker adds only its interpreter).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from cipherhive.ckks import c0_sum
from cipherhive.ckks.c0_sum import UploadParser
from cipherhive.runtime import failpoints
from cipherhive.runtime.child_signals import ignored_in_children
from cipherhive.secagg.commit import block_digest
from cipherhive.server.ingest.running_sum import MaskedSum

log = logging.getLogger("cipherhive.server.ingest")

#: Blocks per stripe: a chunk's worth (the node sends 16 ciphertexts per chunk).
STRIPE = 16

#: (block index, offset in the spool file, length) of one spooled block.
Item = tuple[int, int, int]


def owner(index: int, workers: int) -> int:
    return (index // STRIPE) % workers


def shared_memory_free(path: str = "/dev/shm") -> int:
    """Bytes free where shared memory lives (a container's is 64 MB unless it is given more)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


@dataclass
class Outcome:
    """What one request did: blocks added (or subtracted), CPU seconds, why it stopped, and
    the hash of each block added (cipherhive.secagg.commit.block_digest, for the member's commit)."""

    done: list[int]
    busy: float
    error: str = ""
    digests: list[bytes] = field(default_factory=list)


# ----------------------------------------------------------------------------- worker process


#: What a terminal or a service manager sends the whole process group to stop the server.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _serve(conn: Connection, parms_id: tuple[int, ...], scale: float, modulus: int) -> None:
    """A worker's loop: one reply per request, in order.

    Stop signals are the server's to handle: Ctrl-C in a terminal, or a service manager that
    signals the whole process group, reaches the workers too, and a worker that died of it
    would look to the server like a lost worker (it would exit 1). The server stops its
    workers itself, with a "stop" message and a kill after a grace period."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parser = UploadParser(parms_id, scale, modulus)
    shm: SharedMemory | None = None
    running: MaskedSum | None = None
    files: dict[str, int] = {}
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        op = message[0]
        if op == "attach":
            _, name, blocks = message
            shm = SharedMemory(name=name)
            running = MaskedSum(parser, blocks, buffer=shm.buf, zero=False)
            conn.send(Outcome([], 0.0))
        elif op in ("add", "subtract"):
            _, key, path, items = message
            conn.send(_apply(op, running, files, key, path, items))
        elif op == "forget":
            fd = files.pop(message[1], None)
            if fd is not None:
                os.close(fd)
            conn.send(Outcome([], 0.0))
        elif op == "detach":
            running = None
            if shm is not None:
                shm.close()
                shm = None
            for fd in files.values():
                os.close(fd)
            files.clear()
            conn.send(Outcome([], 0.0))
        else:  # "stop"
            conn.send(Outcome([], 0.0))
            return


def _apply(
    op: str, running: MaskedSum | None, files: dict[str, int], key: str, path: str, items: Sequence[Item]
) -> Outcome:
    started = time.process_time()
    done: list[int] = []
    digests: list[bytes] = []
    if running is None:
        return Outcome(done, 0.0, "no round is attached to this ingest worker")
    try:
        fd = files.get(key)
        if fd is None:
            fd = files[key] = os.open(path, os.O_RDONLY)
        for index, offset, length in items:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                why = f"ciphertext {index}: the spool file is short"
                return Outcome(done, time.process_time() - started, why, digests)
            try:
                c0 = running.load(data)
            except c0_sum.UploadError as exc:
                return Outcome(done, time.process_time() - started, f"ciphertext {index}: {exc}", digests)
            if op == "add":
                failpoints.hit("ingest.worker")  # tests: a worker dying in the middle of an upload
                running.add(index, c0)
                digests.append(block_digest(data))
            else:
                running.subtract_one(index, c0)
            done.append(index)
    except OSError as exc:
        why = f"the spooled upload cannot be read: {exc}"
        return Outcome(done, time.process_time() - started, why, digests)
    return Outcome(done, time.process_time() - started, "", digests)


# ----------------------------------------------------------------------------- the pool


class WorkerLost(RuntimeError):
    """An ingest worker died: the shared sum can no longer be trusted."""


class _Worker:
    def __init__(self, ctx: Any, index: int, args: tuple[Any, ...], on_lost: Callable[[str], None]) -> None:
        parent, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve, args=(child, *args), name=f"cipherhive-ingest-{index}", daemon=True
        )
        with ignored_in_children(*STOP_SIGNALS):  # from its first instruction (runtime.child_signals)
            self.process.start()
        child.close()
        self.conn: Connection = parent
        self.index = index
        self._pending: deque[Future[Outcome]] = deque()
        self._send_lock = threading.Lock()
        self._on_lost = on_lost
        self._closing = False
        self._reader = threading.Thread(target=self._read, name=f"ingest-reply-{index}", daemon=True)
        self._reader.start()

    def request(self, message: tuple[Any, ...]) -> Future[Outcome]:
        future: Future[Outcome] = Future()
        with self._send_lock:
            if not self.process.is_alive():
                future.set_exception(WorkerLost(f"ingest worker {self.index} is not running"))
                return future
            self._pending.append(future)
            try:
                self.conn.send(message)
            except OSError as exc:
                self._pending.pop()
                future.set_exception(WorkerLost(f"ingest worker {self.index}: {exc}"))
        return future

    def _read(self) -> None:
        while True:
            try:
                outcome = self.conn.recv()
            except (EOFError, OSError):
                break
            # Only this thread pops; deque operations are atomic, and requests were queued
            # under the send lock in the order they were sent.
            self._pending.popleft().set_result(outcome)
        with self._send_lock:
            pending, self._pending = list(self._pending), deque()
        lost = WorkerLost(f"ingest worker {self.index} (pid {self.process.pid}) exited")
        for future in pending:
            future.set_exception(lost)
        if not self._closing:
            self._on_lost(str(lost))

    def stop(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):  # stopping anyway
            self.request(("stop",)).result(timeout=5)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()


class IngestWorkers:
    """``workers`` spawned processes; :meth:`attach` gives a round's shared :class:`ShardedSum`."""

    def __init__(self, workers: int, parser: UploadParser, on_lost: Callable[[str], None]) -> None:
        ctx = multiprocessing.get_context("spawn")  # gRPC and fork do not mix
        args = (parser.parms_id, parser.scale, parser.modulus)
        self.parser = parser
        self.workers = [_Worker(ctx, i, args, on_lost) for i in range(workers)]

    def __len__(self) -> int:
        return len(self.workers)

    def broadcast(self, message: tuple[Any, ...]) -> None:
        for future in [w.request(message) for w in self.workers]:
            future.result()

    def attach(self, num_blocks: int) -> ShardedSum:
        shm = SharedMemory(create=True, size=max(1, num_blocks * c0_sum.RECORD_BYTES))
        try:
            running = ShardedSum(self, shm, num_blocks)
            self.broadcast(("attach", shm.name, num_blocks))
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        return running

    def submit(self, op: str, key: str, path: str, items: Sequence[Item]) -> list[Future[Outcome]]:
        """Send each owner its blocks; one future per owner, in the order they were sent."""
        parts: dict[int, list[Item]] = {}
        for item in items:
            parts.setdefault(owner(item[0], len(self.workers)), []).append(item)
        return [self.workers[w].request((op, key, path, part)) for w, part in parts.items()]

    def dispatch(self, op: str, key: str, path: str, items: Sequence[Item]) -> Outcome:
        """Send each owner its blocks, wait for all; ``done`` in block order."""
        futures = self.submit(op, key, path, items)
        added: dict[int, bytes] = {}
        busy = 0.0
        errors: list[str] = []
        for future in futures:
            outcome = future.result()
            added.update(zip(outcome.done, outcome.digests or [b""] * len(outcome.done), strict=True))
            busy += outcome.busy
            if outcome.error:
                errors.append(outcome.error)
        done = sorted(added)
        return Outcome(done, busy, errors[0] if errors else "", [added[i] for i in done])

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()


class ShardedSum(MaskedSum):
    """A :class:`MaskedSum` in shared memory whose blocks the workers add.

    Reads and unmasking happen in this process, when no request is in flight
    (the round is closing and every upload is accepted or rolled back).
    """

    def __init__(self, pool: IngestWorkers, shm: SharedMemory, num_blocks: int) -> None:
        super().__init__(pool.parser, num_blocks, buffer=shm.buf)
        self.pool = pool
        self._shm = shm

    def add_spooled(self, key: str, path: str, items: Sequence[Item]) -> Outcome:
        return self.pool.dispatch("add", key, path, items)

    def submit(self, op: str, key: str, path: str, items: Sequence[Item]) -> list[Future[Outcome]]:
        return self.pool.submit(op, key, path, items)

    def subtract_spooled(self, key: str, path: str, items: Sequence[Item]) -> None:
        outcome = self.pool.dispatch("subtract", key, path, items)
        if outcome.error or len(outcome.done) != len(items):
            raise WorkerLost(f"rolling back an upload failed: {outcome.error or 'blocks missing'}")

    def forget(self, key: str) -> None:
        self.pool.broadcast(("forget", key))

    def release(self) -> None:
        """The round is over: workers unmap it, and its shared memory is freed."""
        with contextlib.suppress(WorkerLost):
            self.pool.broadcast(("detach",))
        self._rows = np.zeros((0, c0_sum.DEGREE), dtype="<u8")  # drop the view of the shared buffer
        self._shm.close()
        self._shm.unlink()
