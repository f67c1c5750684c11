"""Download a round's encrypted sum, resuming where a broken stream stopped."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import grpc

from cipherhive.runtime.transport import describe_rpc_error
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.node.fetch")
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
}


class FetchError(RuntimeError):
    """The sum stream is not the one asked for: wrong round, layout, count, order or size."""


def fetch_sum(
    stub: pb_grpc.AggregationStub,
    round_number: int,
    expected_ciphertexts: int,
    layout_hash: str,
    metadata: Sequence[tuple[str, str]] = (),
    attempts: int = 5,
    num_values: int = 0,
    participants: int = 0,
    seeds_out: list[list[bytes]] | None = None,
) -> Iterator[tuple[bytes, int]]:
    """Yield ``(ciphertext, participants)`` of the sum in order.

    Every chunk must describe the sum asked for (round, layout, ciphertext count and,
    when given, value count and participants) and continue where the last one ended;
    anything else raises :class:`FetchError` (the caller retries or rejects the sum).
    With ``seeds_out`` (a masked round), every block must come with its members' seeds,
    appended there in block order.
    """
    received = 0
    failures = 0
    while received < expected_ciphertexts:
        try:
            for chunk in stub.FetchAggregate(
                pb.FetchRequest(round=round_number, first_ciphertext=received), metadata=metadata
            ):
                if chunk.layout_hash != layout_hash or chunk.num_ciphertexts != expected_ciphertexts:
                    raise FetchError(
                        f"sum of round {round_number} has {chunk.num_ciphertexts} ciphertexts for layout "
                        f"{chunk.layout_hash[:12]}; this node expects {expected_ciphertexts} for "
                        f"{layout_hash[:12]}"
                    )
                if chunk.round != round_number:
                    raise FetchError(f"asked for the sum of round {round_number}, got round {chunk.round}")
                if num_values and chunk.num_values != num_values:
                    raise FetchError(f"sum carries {chunk.num_values} values; this node expects {num_values}")
                if participants and chunk.participants != participants:
                    raise FetchError(
                        f"sum claims {chunk.participants} participants; "
                        f"round {round_number} had {participants}"
                    )
                if chunk.first_ciphertext != received:
                    raise FetchError(f"sum chunk starts at {chunk.first_ciphertext}, expected {received}")
                if received + len(chunk.ciphertexts) > expected_ciphertexts:
                    raise FetchError(f"sum stream carries more than {expected_ciphertexts} ciphertexts")
                if seeds_out is not None and len(chunk.seeds) != len(chunk.ciphertexts):
                    raise FetchError(
                        f"sum chunk carries seeds for {len(chunk.seeds)} of its "
                        f"{len(chunk.ciphertexts)} blocks"
                    )
                for i, blob in enumerate(chunk.ciphertexts):
                    if seeds_out is not None:
                        seeds_out.append(list(chunk.seeds[i].seeds))
                    yield blob, chunk.participants
                    received += 1
            if received < expected_ciphertexts:
                raise FetchError(f"sum stream ended after {received} of {expected_ciphertexts} ciphertexts")
        except grpc.RpcError as exc:
            if exc.code() not in _TRANSIENT or failures >= attempts:
                raise
            failures += 1
            log.warning(
                "download of round %d interrupted (%s); resuming at ciphertext %d",
                round_number,
                describe_rpc_error(exc),
                received,
            )
            time.sleep(min(0.5 * 2**failures, 5.0))
