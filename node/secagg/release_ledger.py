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

**Bounded.** The node records a release for a base-model *version*,
``<base round>:<chain hash>:w<withdrawn>``
(:meth:`cipherhive.node.secagg.masked_round.MaskedRoundDriver._ledger_key`), where
``withdrawn`` is the newest round withdrawn above the base: a round withdrawn above a
base makes a new version of it (that round's sum was published). A member that spoils
every round, each then withdrawn (docs/spec/sum-checks.md §8), would otherwise add one
record per withdrawn round to every honest member's ledger, forever. For one base round
and chain hash only the newest version can ever be asked for again: ``withdrawn`` is the
maximum of the withdrawn rounds the node knows of, a withdrawn round stays withdrawn, and
a restarted node learns the newest ones again at Join before it takes part in a round
(:class:`cipherhive.node.state.model_state.WithdrawnRounds` keeps that maximum). So once
(base, chain, w') is recorded, every version (base, chain, w) with w < w' is
*superseded*: the ledger refuses it exactly as if it were recorded, and drops its record
in the same write that records the newer one, which changes no answer the ledger gives.
A superseded version could only be asked for by a server whose history went back (a
server restored from a backup re-running a base): the case §6 is there for, refused.
Versions of *other* bases are never dropped: a base the node moved past can be a base
again (a rollback to the initial model, a bootstrap from an older export, a restored
server), so the ledger holds one record per base the node released on. That grows with
the federation's published rounds, not with its withdrawn ones. A key of any other form
is kept as it is.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from cipherhive.runtime.fsutil import atomic_write, read_guarded
from cipherhive.secagg.wire import field, fields

__all__ = ["FILE_NAME", "LedgerError", "ReleaseLedger"]

FILE_NAME = "release-ledger.json"
FORMAT = "cipherhive/v1/release-ledger"
_MAX_BASE = 256
_MAX_FILE = 16 << 20
#: A versioned base, as MaskedRoundDriver._ledger_key writes it: "<round>:<chain hash>" and w.
_VERSION = re.compile(r"((?:0|[1-9][0-9]*):[0-9a-f]{64}):w(0|[1-9][0-9]*)")


class LedgerError(RuntimeError):
    """The ledger cannot vouch for this node's past releases; release and upload are refused."""


def _check(bases: list[str]) -> str:
    body = fields(FORMAT.encode(), *(field(b.encode()) for b in sorted(bases)))
    return hashlib.sha256(body).hexdigest()


def _valid_base(base: str) -> str:
    if not isinstance(base, str) or not 0 < len(base) <= _MAX_BASE or not base.isprintable():
        raise ValueError(f"a base-model version is 1 to {_MAX_BASE} printable characters, got {base!r}")
    return base


def _version(base: str) -> tuple[str, int] | None:
    """(``<round>:<chain hash>``, w) of a versioned base; None for a key of another form."""
    match = _VERSION.fullmatch(base)
    return (match.group(1), int(match.group(2))) if match else None


def _newest(bases: Iterable[str]) -> dict[str, int]:
    """The newest version recorded of each base round and chain hash."""
    newest: dict[str, int] = {}
    for base in bases:
        version = _version(base)
        if version is not None and version[1] > newest.get(version[0], -1):
            newest[version[0]] = version[1]
    return newest


def _superseded(base: str, newest: dict[str, int]) -> bool:
    """A newer version of the same base round and chain hash has a release recorded."""
    version = _version(base)
    return version is not None and version[1] < newest.get(version[0], -1)


def _refused(base: str, bases: frozenset[str]) -> bool:
    return base in bases or _superseded(base, _newest(bases))


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
        """True if this node has not released a self-mask seed on ``base`` (nor on a newer version
        of it); raises if unsure."""
        return not _refused(_valid_base(base), self.released())

    def may_upload(self, base: str) -> bool:
        """True if this node may upload on ``base``: never after a release on it (or on a newer
        version of it); raises if unsure."""
        return not _refused(_valid_base(base), self.released())

    def record_release(self, base: str) -> None:
        """Record, durably, a release on ``base``; call it *before* sending the seed.

        Raises :class:`LedgerError` if ``base`` already has a release, or a newer
        version of it has: the caller must then not send. The same write drops
        the records this one supersedes (see the module's docstring).
        """
        _valid_base(base)
        with self._lock:
            bases = self._read()
            if base in bases:
                raise LedgerError(f"a self-mask was already released on base {base!r}; not again")
            if _superseded(base, _newest(bases)):
                raise LedgerError(
                    f"a self-mask was already released on a newer version of base {base!r}; not on an "
                    "older one"
                )
            recorded = [*bases, base]
            newest = _newest(recorded)
            self._write(self._path, [b for b in recorded if not _superseded(b, newest)])
