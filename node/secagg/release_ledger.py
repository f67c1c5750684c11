"""The release ledger: a self-mask is released at most once per base model, durably.

In SecAgg (Bonawitz et al., CCS 2017, §4, "double masking") the server may
learn either a member's self-mask seed or the pairwise masks that hide it,
never both. cipherhive's rounds have no dropout recovery, but a server can
still fail a round after some members released their self-mask seeds and
then run the round again on the same base model: two rounds on one base,
with one member's seed released in the first, would let the server
difference the two sums. So (docs/spec/masked-round.md §6) a member

* releases its self-mask seed at most once per base-model version, and
* never uploads again on a base it has released for,

and keeps this across restarts. The ledger is that memory. Its rules:

* :meth:`ReleaseLedger.record_release` is written (fsync, atomic rename)
  **before** the seed is sent: a crash between the record and the send leaves
  a record of a release that may not have happened, which is the safe side.
* It fails closed: a missing, unreadable, corrupt or group/other-writable
  ledger file refuses every release and every upload (:class:`LedgerError`)
  and is never reset automatically; only :meth:`ReleaseLedger.init` creates
  one, for a brand-new node state directory, and it refuses to overwrite.
* Every question re-reads the file, so a ledger deleted or damaged while the
  node runs is noticed at the next question, not after a restart.

File format (JSON, mode 0600)::

    {"format": "cipherhive/v1/release-ledger", "released": ["<base>", ...], "check": "<sha256 hex>"}

where ``check`` is the SHA-256 of the format tag and the sorted bases, so a
hand-edited or truncated file is refused rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from cipherhive.runtime.fsutil import atomic_write, read_guarded
from cipherhive.secagg.wire import field, fields

__all__ = ["FILE_NAME", "LedgerError", "ReleaseLedger"]

FILE_NAME = "release-ledger.json"
FORMAT = "cipherhive/v1/release-ledger"
_MAX_BASE = 256
_MAX_FILE = 16 << 20


class LedgerError(RuntimeError):
    """The ledger cannot vouch for this node's past releases; release and upload are refused."""


def _check(bases: list[str]) -> str:
    body = fields(FORMAT.encode(), *(field(b.encode()) for b in sorted(bases)))
    return hashlib.sha256(body).hexdigest()


def _valid_base(base: str) -> str:
    if not isinstance(base, str) or not 0 < len(base) <= _MAX_BASE or not base.isprintable():
        raise ValueError(f"a base-model version is 1 to {_MAX_BASE} printable characters, got {base!r}")
    return base


class ReleaseLedger:
    """Durable record of the bases this node has released a self-mask seed for."""

    def __init__(self, path: Path) -> None:
        """Open an existing ledger (``path`` is the file); refuses at once if it is not usable."""
        self._path = Path(path)
        self._lock = threading.Lock()
        self._read()

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @classmethod
    def init(cls, path: Path) -> ReleaseLedger:
        """Create an empty ledger for a brand-new node state; never over an existing one."""
        path = Path(path)
        if path.exists() or path.is_symlink():
            raise FileExistsError(
                f"{path} already exists; a release ledger is never reset (that would allow a second "
                "release on a base this node already released for)"
            )
        cls._write(path, [])
        return cls(path)

    @staticmethod
    def _write(path: Path, bases: list[str]) -> None:
        doc = {"format": FORMAT, "released": sorted(bases), "check": _check(bases)}
        atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600)

    def _refuse(self, why: str) -> LedgerError:
        return LedgerError(
            f"release ledger {self._path} {why}; refusing to release a self-mask or upload until it is "
            "restored from a backup (never recreate it for a node that has taken part in rounds)"
        )

    def _read(self) -> frozenset[str]:
        raw = read_guarded(
            self._path,
            _MAX_FILE,
            self._refuse,
            "for a brand-new node state directory, create it with ReleaseLedger.init",
        )
        try:
            doc = json.loads(raw.decode("utf-8"))
            bases = doc["released"]
            ok = (
                isinstance(doc, dict)
                and doc.get("format") == FORMAT
                and isinstance(bases, list)
                and all(isinstance(b, str) for b in bases)
                and doc.get("check") == _check(bases)
            )
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise self._refuse("is corrupt")
        return frozenset(bases)

    def released(self) -> frozenset[str]:
        """Every base this node has recorded a release for."""
        with self._lock:
            return self._read()

    def may_release(self, base: str) -> bool:
        """True if this node has not released a self-mask seed on ``base``; raises if unsure."""
        return _valid_base(base) not in self.released()

    def may_upload(self, base: str) -> bool:
        """True if this node may upload on ``base``: never after a release on it; raises if unsure."""
        return _valid_base(base) not in self.released()

    def record_release(self, base: str) -> None:
        """Record, durably, a release on ``base``; call it *before* sending the seed.

        Raises :class:`LedgerError` if ``base`` already has a release: the
        caller must then not send.
        """
        _valid_base(base)
        with self._lock:
            bases = self._read()
            if base in bases:
                raise LedgerError(f"a self-mask was already released on base {base!r}; not again")
            self._write(self._path, [*bases, base])
