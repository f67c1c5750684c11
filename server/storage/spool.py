"""Ciphertext files on the server's disk: the submission spool and the published sums.

Layout under the state directory::

    spool/round-<R>/<node>.partial   an upload in progress (discarded on restart)
    spool/round-<R>/<node>.ct        an acknowledged submission (until the sum is final)
    sums/round-<R>.sum               a published encrypted sum (kept for catch-up)
    sums/round-<R>.seeds             a masked round's per-block seeds, beside its sum

With the round state in PostgreSQL, every name carries the writer's fencing token
(``<node>.t<token>.ct``, ``round-<R>.t<token>.sum``): the database names the files it
counts, so a former leader that was paused while a standby took over, and resumes in the middle
of writing a file, can only write names no row refers to, and never replaces a file of the
server that now holds the lease (docs/explanation/reliability.md#the-active-server-fails).

A file is in the one ciphertext file format (``cipherhive.runtime.records``).
A submission becomes ``.ct`` only after fsync, and only then is it
acknowledged; the spool of a round is deleted once its sum is final, so no
individual ciphertext outlives its round.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from cipherhive.runtime import records as record_file
from cipherhive.runtime.fsutil import atomic_write, fsync_dir, private_dir
from cipherhive.runtime.records import MAGIC, RecordsError, encode_records

__all__ = ["MAGIC", "Spool", "SpoolError", "encode_records", "read_records"]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class SpoolError(RecordsError):
    """A spool or sum file that is missing, truncated or not ours, or an unsafe name."""


def read_records(path: Path, skip: int = 0) -> Iterator[bytes]:
    """The ciphertexts stored in ``path`` after the first ``skip`` (runtime.records' format)."""
    try:
        yield from record_file.read_records(path, skip)
    except SpoolError:
        raise
    except RecordsError as exc:
        raise SpoolError(str(exc)) from None


class Spool:
    """Owns the ``spool/`` and ``sums/`` folders of one state directory."""

    def __init__(self, state_dir: Path, fencing_token: int | None = None) -> None:
        self.root = state_dir
        self._suffix = "" if fencing_token is None else f".t{fencing_token}"
        self.spool_dir = state_dir / "spool"
        self.sums_dir = state_dir / "sums"
        # Private: sums and spooled updates are ciphertexts, but nobody else's business.
        for folder in (state_dir, self.spool_dir, self.sums_dir):
            private_dir(folder)

    def round_dir(self, number: int) -> Path:
        return self.spool_dir / f"round-{number}"

    def writer(self, number: int, node: str) -> SubmissionWriter:
        if not _SAFE_NAME.match(node):
            raise SpoolError(f"unsafe node name {node!r}")
        return SubmissionWriter(self.round_dir(number), node + self._suffix, self.root)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def write_sum(self, number: int, blobs: Iterable[bytes]) -> tuple[str, int]:
        """Durably write a round's sum; returns (path relative to the state dir, bytes)."""
        path = self.sums_dir / f"round-{number}{self._suffix}.sum"
        size = atomic_write(path, encode_records(blobs), mode=0o600)
        return str(path.relative_to(self.root)), size

    def write_seeds(self, number: int, records: Iterable[bytes]) -> Path:
        """Durably write a masked round's per-block member seeds, next to its sum."""
        path = self.seeds_path(number)
        atomic_write(path, encode_records(records), mode=0o600)
        return path

    def seeds_path(self, number: int) -> Path:
        return self.sums_dir / f"round-{number}{self._suffix}.seeds"

    def delete_sum(self, relative: str) -> None:
        """Remove a published sum (pruned, or its round withdrawn), and its seeds if masked."""
        path = self.path(relative)
        if path.parent == self.sums_dir:
            path.unlink(missing_ok=True)
            path.with_suffix(".seeds").unlink(missing_ok=True)
            fsync_dir(self.sums_dir)

    def drop_round(self, number: int) -> None:
        """Delete every individual submission of a round (its sum is final)."""
        shutil.rmtree(self.round_dir(number), ignore_errors=True)
        fsync_dir(self.spool_dir)

    def drop_unnamed_sums(self, named: Iterable[str]) -> list[Path]:
        """Remove sum and seeds files no round record names: written by a server that died (or
        was fenced) between writing a sum and recording it; the round is published again."""
        keep = {self.path(relative) for relative in named}
        keep |= {path.with_suffix(".seeds") for path in keep}
        removed = sorted(
            path
            for pattern in ("round-*.sum", "round-*.seeds")
            for path in self.sums_dir.glob(pattern)
            if path not in keep
        )
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            fsync_dir(self.sums_dir)
        return removed

    def drop_partials(self) -> list[Path]:
        """Remove uploads that were never acknowledged (after a crash)."""
        removed = sorted(self.spool_dir.glob("round-*/*.partial"))
        for path in removed:
            path.unlink(missing_ok=True)
        return removed


class SubmissionWriter:
    """Appends one node's ciphertexts; :meth:`commit` makes them durable."""

    def __init__(self, directory: Path, node: str, root: Path) -> None:
        private_dir(directory)
        self._root = root
        self.partial = directory / f"{node}.partial"
        self.final = directory / f"{node}.ct"
        self._fh: BinaryIO | None = open(self.partial, "wb")  # noqa: SIM115 - closed in commit/discard
        os.fchmod(self._fh.fileno(), 0o600)
        self._fh.write(record_file.MAGIC)
        self.count = 0
        self.num_bytes = 0
        self._position = len(record_file.MAGIC)

    def append(self, blob: bytes) -> tuple[int, int]:
        """Append one ciphertext; returns (offset of its bytes in the file, length)."""
        assert self._fh is not None
        record_file.write_record(self._fh, blob)
        self.count += 1
        self.num_bytes += len(blob)
        offset = self._position + record_file.LENGTH.size
        self._position = offset + len(blob)
        return offset, len(blob)

    def flush(self) -> None:
        """Hand what was appended to the kernel, so another process can read it back."""
        if self._fh is not None:
            self._fh.flush()

    def written(self) -> Iterator[bytes]:
        """Read back what was appended so far (for rollback of a partial addition)."""
        if self._fh is not None:
            self._fh.flush()
        yield from read_records(self.partial if self._fh is not None else self.final)

    def commit(self) -> str:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        os.replace(self.partial, self.final)
        fsync_dir(self.final.parent)
        return str(self.final.relative_to(self._root))

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.partial.unlink(missing_ok=True)
