"""FetchAggregate: serve a finished round's encrypted sum, in chunks, resumable.

Only sums are ever served: there is no path from here to an individual
node's spooled ciphertext, and a round that did not reach the participation
floor has no sum file at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from cipherhive.secagg.wire import split_fields
from cipherhive.server.rounds.errors import RoundError
from cipherhive.server.rounds.withdrawal import pruned_message
from cipherhive.server.storage.spool import Spool, read_records
from cipherhive.server.storage.store import RoundStore
from cipherhive.v1 import federation_pb2 as pb

#: A chunk closes once it passes this size (a block is far smaller), keeping
#: every message well under gRPC's default 4 MiB limit.
MAX_CHUNK_BYTES = 2 * 1024 * 1024


def stream_sum(
    state: RoundStore,
    spool: Spool,
    request: pb.FetchRequest,
    layout_hash: str,
    per_chunk: int,
    keep_sums: int = 0,
) -> Iterator[pb.AggregateChunk]:
    row = state.round(request.round)
    if row is None:
        raise RoundError(grpc.StatusCode.NOT_FOUND, f"round {request.round} does not exist")
    if row.state == "withdrawn":
        raise RoundError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"round {request.round} was withdrawn: {row.withdrawn_reason}",
        )
    if row.state == "sum_ready" and row.sum_file is None:
        raise RoundError(grpc.StatusCode.FAILED_PRECONDITION, pruned_message(request.round, keep_sums))
    if row.state != "sum_ready" or row.sum_file is None:
        why = "is still open" if row.state == "open" else f"failed: {row.reason}"
        raise RoundError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"round {request.round} has no published sum (it {why})",
        )
    if request.first_ciphertext >= max(row.num_ciphertexts, 1):
        raise RoundError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"first_ciphertext {request.first_ciphertext} is past the end of the sum "
            f"({row.num_ciphertexts} ciphertexts)",
        )

    def chunk(first: int, blobs: list[bytes], block_seeds: list[pb.BlockSeeds]) -> pb.AggregateChunk:
        return pb.AggregateChunk(
            seeds=block_seeds,
            round=row.round,
            first_ciphertext=first,
            ciphertexts=blobs,
            num_ciphertexts=row.num_ciphertexts,
            num_values=row.num_values,
            participants=row.participants,
            layout_hash=layout_hash,
        )

    sum_path = spool.path(row.sum_file)
    blobs = read_records(sum_path, skip=request.first_ciphertext)
    # Masked rounds: each block's member seeds travel with it (nodes check c1 against them).
    seeds: Iterator[list[bytes]] | None = None
    if row.masked:
        seeds = (
            split_fields(record, "block seeds")
            for record in read_records(sum_path.with_suffix(".seeds"), skip=request.first_ciphertext)
        )
    batch: list[bytes] = []
    batch_seeds: list[pb.BlockSeeds] = []
    size = 0
    first = request.first_ciphertext
    for blob in blobs:
        batch.append(blob)
        if seeds is not None:
            batch_seeds.append(pb.BlockSeeds(seeds=next(seeds)))
        size += len(blob)
        if len(batch) == per_chunk or size > MAX_CHUNK_BYTES:
            yield chunk(first, batch, batch_seeds)
            first += len(batch)
            batch, batch_seeds, size = [], [], 0
    if batch:
        yield chunk(first, batch, batch_seeds)
