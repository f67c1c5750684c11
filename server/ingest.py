"""SubmitUpdate: validate a node's stream, spool it and add it, all or nothing.

Each ciphertext is parsed and checked against the federation's parameters
as it arrives (outside the round lock, since that is the expensive part),
then spooled and added into the running sum. Anything wrong — a malformed
header, a chunk out of order, bytes SEAL refuses, a stream that breaks off —
rolls back what this upload added, so the round's sum is untouched.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator

import grpc

from cipherhive import codec
from cipherhive.server import metrics as server_metrics
from cipherhive.server.rounds import RoundError, RoundManager
from cipherhive.v1 import federation_pb2 as pb

SUBMISSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
METRIC_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
MAX_METRICS = 16


def _refuse(code: grpc.StatusCode, message: str) -> RoundError:
    return RoundError(code, message)


def validate_header(header: pb.SubmitHeader) -> dict[str, float]:
    """Field checks that need no server state; returns the metrics to record."""
    if header.round == 0:
        raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, "header.round must be the open round's number (≥ 1)")
    if not SUBMISSION_ID.match(header.submission_id):
        raise _refuse(
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.submission_id must be 8-64 characters of A-Z a-z 0-9 _ - "
            "(a node picks one per round and reuses it on retry)",
        )
    if len(header.metrics) > MAX_METRICS:
        raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_METRICS} metrics per submission")
    metrics: dict[str, float] = {}
    for key, value in header.metrics.items():
        if not METRIC_KEY.match(key) or not math.isfinite(value):
            raise _refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metric {key[:40]!r}={value} refused: names are 1-32 of A-Z a-z 0-9 _ . - "
                "and values finite numbers",
            )
        metrics[key] = float(value)
    return metrics


def ingest(
    manager: RoundManager, node: str, requests: Iterator[pb.SubmitRequest], max_per_chunk: int
) -> pb.SubmitReceipt:
    """Consume one SubmitUpdate stream; raise RoundError to refuse it."""
    try:
        first = next(requests)
    except StopIteration:
        raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: send a header first") from None
    if first.WhichOneof("part") != "header":
        raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, "the first message of an upload must be its header")
    header = first.header
    metrics = validate_header(header)
    begun = manager.begin_upload(node, header)
    if isinstance(begun, pb.SubmitReceipt):
        return begun  # a retry of an accepted submission: same receipt, counted once
    current, upload = begun
    try:
        received = 0
        busy = 0.0
        for expected_index, request in enumerate(requests):
            if request.WhichOneof("part") != "chunk":
                raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, "only one header per upload")
            chunk = request.chunk
            if chunk.index != expected_index or chunk.first_ciphertext != received:
                raise _refuse(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"chunk {chunk.index} (first ciphertext {chunk.first_ciphertext}) out of order; "
                    f"expected chunk {expected_index} starting at ciphertext {received}",
                )
            count = len(chunk.ciphertexts)
            if not 1 <= count <= max_per_chunk:
                raise _refuse(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"chunk {chunk.index} carries {count} ciphertexts; 1 to {max_per_chunk} allowed",
                )
            if received + count > header.num_ciphertexts:
                raise _refuse(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"stream carries more than the {header.num_ciphertexts} ciphertexts announced",
                )
            # A few chunks are parsed at once, whatever the number of streams: parsing is
            # CPU-bound, and SEAL's memory pool keeps what its busiest moment needed.
            with manager.parse_slots:
                for offset, blob in enumerate(chunk.ciphertexts):
                    started = time.perf_counter()
                    try:
                        ct = manager.codec.load(blob)
                    except codec.CodecError as exc:
                        raise _refuse(
                            grpc.StatusCode.INVALID_ARGUMENT, f"ciphertext {received + offset}: {exc}"
                        ) from exc
                    manager.add_block(current, upload, blob, ct)
                    busy += time.perf_counter() - started
            received += count
        if received != header.num_ciphertexts:
            raise _refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"stream ended after {received} of {header.num_ciphertexts} ciphertexts; nothing was added",
            )
        receipt = manager.finish_upload(current, upload, metrics)
        server_metrics.VALUES_ADDED.inc(header.num_values)
        server_metrics.INGEST_SECONDS.inc(busy)
        if busy > 0:
            server_metrics.INGEST_RATE.set(header.num_values / busy)
        return receipt
    except RoundError as exc:
        manager.abort_upload(current, upload, exc.message)
        raise
    except grpc.RpcError:
        manager.abort_upload(current, upload, "the stream broke off")
        raise
    except BaseException:
        manager.abort_upload(current, upload, "internal error while receiving")
        raise
