"""Server ingest on 1 core against all: the masked sum's check + add, in-process and sharded.

What it measures is what the server does per uploaded block of a masked round
(:mod:`cipherhive.ckks.c0_sum`): read it back from the spool, check it, add c0
modulo q and hash it for the member's commit. ``workers = 1`` is the server's
in-process sum (one core, the GIL);
more is :class:`cipherhive.server.ingest.workers.IngestWorkers`, the members'
uploads arriving concurrently, one thread per upload as in the server.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

from cipherhive.ckks import codec
from cipherhive.secagg.commit import block_digest
from cipherhive.server.ingest.running_sum import MaskedSum
from cipherhive.server.ingest.workers import IngestWorkers, Outcome, ShardedSum
from cipherhive.server.rounds.manager import CHUNKS_IN_FLIGHT
from cipherhive.server.storage.spool import Spool

CHUNK = 16
#: Blocks the figure is measured on (~260 MB of spool in the page cache).
INGEST_BLOCKS = 4000
#: Passes per figure, the best kept: other work on the machine only ever slows a pass down.
PASSES = 5


def spool_uploads(uploads: list[list[bytes]], folder: Path) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """Each upload in its own acknowledged spool file: (path, [(block, offset, length)])."""
    spool = Spool(folder)
    out = []
    for member, blobs in enumerate(uploads):
        writer = spool.writer(1, f"m{member}")
        items = [(i, *writer.append(blob)) for i, blob in enumerate(blobs)]
        writer.commit()
        out.append((str(writer.final), items))
    return out


def measure(public: codec.PublicCodec, uploads: list[list[bytes]], workers: int) -> float:
    """Values per second added into a masked sum, with ``workers`` ingest processes (1: in-process)."""
    parser = public.upload_parser()
    blocks = len(uploads[0])
    values = len(uploads) * blocks * codec.VALUES_PER_CIPHERTEXT
    with tempfile.TemporaryDirectory(prefix="cipherhive-ingest-") as tmp:
        spooled = spool_uploads(uploads, Path(tmp))
        if workers == 1:
            best = float("inf")
            for _ in range(PASSES):
                running = MaskedSum(parser, blocks)
                started = time.perf_counter()
                for path, items in spooled:
                    with open(path, "rb") as fh:
                        for index, offset, length in items:
                            fh.seek(offset)
                            data = fh.read(length)
                            running.add(index, running.load(data))
                            block_digest(data)  # as the server does for the member's commit
                best = min(best, time.perf_counter() - started)
            return values / best
        pool = IngestWorkers(workers, parser, lambda why: None)
        try:
            best = float("inf")
            for attempt in range(PASSES):
                best = min(best, _sharded_pass(pool, blocks, spooled, attempt))
            return values / best
        finally:
            pool.close()


def _feed(
    sharded: ShardedSum, key: str, path: str, items: list[tuple[int, int, int]], errors: list[str]
) -> None:
    """One member's upload, chunk by chunk, as the server's ingest thread sends it: a few
    chunks in flight (CHUNKS_IN_FLIGHT), every one waited for before the upload ends."""
    pending: deque[list[Future[Outcome]]] = deque()
    for start in range(0, len(items), CHUNK):
        pending.append(sharded.submit("add", key, path, items[start : start + CHUNK]))
        while len(pending) > CHUNKS_IN_FLIGHT or (start + CHUNK >= len(items) and pending):
            for future in pending.popleft():
                outcome = future.result()
                if outcome.error:
                    errors.append(outcome.error)
    sharded.forget(key)


def _sharded_pass(
    pool: IngestWorkers, blocks: int, spooled: list[tuple[str, list[tuple[int, int, int]]]], attempt: int
) -> float:
    sharded = pool.attach(blocks)
    errors: list[str] = []
    threads = [
        threading.Thread(target=_feed, args=(sharded, f"{attempt}/{m}", path, items, errors))
        for m, (path, items) in enumerate(spooled)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    sharded.release()
    if errors:
        raise RuntimeError(errors[0])
    return seconds
