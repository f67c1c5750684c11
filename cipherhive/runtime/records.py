"""The one file format for ciphertexts on disk: a magic header, then length-prefixed records.

Used for the server's spool and published sums, and for a node's masked upload and downloaded
sum, so one reader serves every ciphertext file, and a truncated or foreign file is refused
the same way everywhere.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["LENGTH", "MAGIC", "RecordsError", "encode_records", "read_records", "write_record"]

MAGIC = b"CHCT\x01"
LENGTH = struct.Struct("<I")


class RecordsError(RuntimeError):
    """A ciphertext file that is missing, truncated or not ours."""


def encode_records(blobs: Iterable[bytes]) -> Iterator[bytes]:
    """The file's bytes, piece by piece: the magic header, then each record with its length."""
    yield MAGIC
    for blob in blobs:
        yield LENGTH.pack(len(blob))
        yield blob


def write_record(fh: BinaryIO, blob: bytes) -> int:
    """Append one record to an open file (after :data:`MAGIC`); returns the bytes written."""
    fh.write(LENGTH.pack(len(blob)))
    fh.write(blob)
    return LENGTH.size + len(blob)


def read_records(path: Path, skip: int = 0) -> Iterator[bytes]:
    """Yield the records stored in ``path``, after the first ``skip``."""
    size_on_disk = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise RecordsError(f"{path} is not a cipherhive ciphertext file")
        index = 0
        while True:
            head = fh.read(LENGTH.size)
            if not head:
                return
            if len(head) != LENGTH.size:
                raise RecordsError(f"{path} is truncated")
            (size,) = LENGTH.unpack(head)
            if index < skip:
                if fh.seek(size, os.SEEK_CUR) > size_on_disk:
                    raise RecordsError(f"{path} is truncated")
            else:
                blob = fh.read(size)
                if len(blob) != size:
                    raise RecordsError(f"{path} is truncated")
                yield blob
            index += 1
