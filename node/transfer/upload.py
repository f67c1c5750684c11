"""Stream an encrypted update to the server: a header, then chunks of ciphertexts.

The chunks are produced lazily from the crypto pool's ordered output, so the
first chunk is on the wire while later blocks are still being encrypted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from cipherhive.runtime import failpoints
from cipherhive.v1 import federation_pb2 as pb

#: Stay well under gRPC's default 4 MiB message limit, whatever a block weighs.
MAX_CHUNK_BYTES = 3 * 1024 * 1024


def submit_requests(
    header: pb.SubmitHeader, ciphertexts: Iterable[bytes], per_chunk: int, max_bytes: int = MAX_CHUNK_BYTES
) -> Iterator[pb.SubmitRequest]:
    yield pb.SubmitRequest(header=header)
    batch: list[bytes] = []
    size = index = first = 0
    for blob in ciphertexts:
        failpoints.hit("node.upload")
        if batch and (len(batch) == per_chunk or size + len(blob) > max_bytes):
            yield pb.SubmitRequest(
                chunk=pb.SubmitChunk(index=index, first_ciphertext=first, ciphertexts=batch)
            )
            index += 1
            first += len(batch)
            batch, size = [], 0
        batch.append(blob)
        size += len(blob)
    if batch:
        yield pb.SubmitRequest(chunk=pb.SubmitChunk(index=index, first_ciphertext=first, ciphertexts=batch))
