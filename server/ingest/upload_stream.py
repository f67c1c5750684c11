"""SubmitUpdate: validate a node's stream, spool it and add it, all or nothing.

Each ciphertext is parsed and checked against the federation's parameters
as it arrives (outside the round lock, since that is the expensive part),
then spooled and added into the running sum. Anything wrong — a malformed
header, a chunk out of order, bytes SEAL refuses, a stream that breaks off —
rolls back what this upload added, so the round's sum is untouched.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager

import grpc

from cipherhive.ckks import c0_sum, codec
from cipherhive.secagg.commit import block_digest
from cipherhive.server import metrics as server_metrics
from cipherhive.server.api.guard import Runner
from cipherhive.server.ingest.workers import ShardedSum
from cipherhive.server.rounds.errors import refuse
from cipherhive.server.rounds.manager import OpenRound, RoundError, RoundManager, Upload
from cipherhive.v1 import federation_pb2 as pb

SUBMISSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
METRIC_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
MAX_METRICS = 16


def validate_header(header: pb.SubmitHeader) -> dict[str, float]:
    """Field checks that need no server state; returns the metrics to record."""
    if header.round == 0:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, "header.round must be the open round's number (≥ 1)")
    if not SUBMISSION_ID.match(header.submission_id):
        raise refuse(
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.submission_id must be 8-64 characters of A-Z a-z 0-9 _ - "
            "(a node picks one per round and reuses it on retry)",
        )
    if len(header.metrics) > MAX_METRICS:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_METRICS} metrics per submission")
    metrics: dict[str, float] = {}
    for key, value in header.metrics.items():
        if not METRIC_KEY.match(key) or not math.isfinite(value):
            raise refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metric {key[:40]!r}={value} refused: names are 1-32 of A-Z a-z 0-9 _ . - "
                "and values finite numbers",
            )
        metrics[key] = float(value)
    return metrics


def _add_chunk(
    manager: RoundManager, current: OpenRound, upload: Upload, blobs: Sequence[bytes], first: int
) -> float:
    """In a worker thread: parse, check and add one chunk's ciphertexts; returns seconds busy."""
    if isinstance(current.running, ShardedSum):
        return manager.add_spooled(current, upload, blobs, first)  # the ingest workers check and add
    busy = 0.0
    # A few chunks are parsed at once, whatever the number of streams: parsing is
    # CPU-bound (and holds the GIL), and SEAL's memory pool keeps what its busiest moment needed.
    with manager.parse_slots:
        for offset, blob in enumerate(blobs):
            started = time.perf_counter()
            try:
                ct = current.running.load(blob)
            except (codec.CodecError, c0_sum.UploadError) as exc:
                raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"ciphertext {first + offset}: {exc}") from exc
            if upload.digests is not None:
                upload.digests.update(blob)  # the blocks of one upload arrive in order
                upload.digests.blocks[first + offset] = block_digest(blob)
            manager.add_block(current, upload, blob, ct)
            busy += time.perf_counter() - started
    return busy


async def ingest(
    manager: RoundManager,
    node: str,
    requests: AsyncIterator[pb.SubmitRequest],
    *,
    run: Runner,
    slot: Callable[[], AbstractAsyncContextManager[None]],
    revoked: Callable[[], str],
) -> pb.SubmitReceipt:
    """Consume one SubmitUpdate stream; raise RoundError to refuse it.

    The stream is read on the event loop (``requests`` carries the read deadline);
    everything that blocks or burns CPU goes to ``run``'s worker threads. The header
    is read before a transfer slot (``slot``) is taken, so a member that never sends
    one holds no slot while it idles. ``revoked`` is asked again just before the
    upload is acknowledged: a certificate revoked mid-upload gets nothing counted.
    """
    first = await anext(requests, None)
    if first is None:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: send a header first")
    if first.WhichOneof("part") != "header":
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, "the first message of an upload must be its header")
    header = first.header
    metrics = validate_header(header)
    async with slot():
        begun = await run(manager.begin_upload, node, header)
        if isinstance(begun, pb.SubmitReceipt):
            return begun  # a retry of an accepted submission: same receipt, counted once
        current, upload = begun
        try:
            return await _receive(manager, current, upload, header, metrics, requests, run, revoked)
        except RoundError as exc:
            await run.surely(manager.abort_upload, current, upload, exc.message)
            raise
        except asyncio.CancelledError:
            await run.surely(manager.abort_upload, current, upload, "the stream broke off")
            raise
        except BaseException:
            await run.surely(manager.abort_upload, current, upload, "internal error while receiving")
            raise


async def _receive(
    manager: RoundManager,
    current: OpenRound,
    upload: Upload,
    header: pb.SubmitHeader,
    metrics: dict[str, float],
    requests: AsyncIterator[pb.SubmitRequest],
    run: Runner,
    revoked: Callable[[], str],
) -> pb.SubmitReceipt:
    max_per_chunk = manager.config.max_ciphertexts_per_chunk
    received = 0
    busy = 0.0
    expected_index = 0
    async for request in requests:
        if request.WhichOneof("part") != "chunk":
            raise refuse(grpc.StatusCode.INVALID_ARGUMENT, "only one header per upload")
        chunk = request.chunk
        if chunk.index != expected_index or chunk.first_ciphertext != received:
            raise refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk {chunk.index} (first ciphertext {chunk.first_ciphertext}) out of order; "
                f"expected chunk {expected_index} starting at ciphertext {received}",
            )
        count = len(chunk.ciphertexts)
        if not 1 <= count <= max_per_chunk:
            raise refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk {chunk.index} carries {count} ciphertexts; 1 to {max_per_chunk} allowed",
            )
        if received + count > header.num_ciphertexts:
            raise refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"stream carries more than the {header.num_ciphertexts} ciphertexts announced",
            )
        busy += await run(_add_chunk, manager, current, upload, list(chunk.ciphertexts), received)
        received += count
        expected_index += 1
    if received != header.num_ciphertexts:
        raise refuse(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"stream ended after {received} of {header.num_ciphertexts} ciphertexts; nothing was added",
        )
    reason = revoked()
    if reason:
        raise refuse(grpc.StatusCode.PERMISSION_DENIED, f"{reason} during the upload; nothing was added")
    receipt = await run(manager.finish_upload, current, upload, metrics)
    busy += upload.busy  # the ingest workers' share (sharded sums)
    server_metrics.VALUES_ADDED.inc(header.num_values)
    server_metrics.INGEST_SECONDS.inc(busy)
    if busy > 0:
        server_metrics.INGEST_RATE.set(header.num_values / busy)
    return receipt
