"""The privacy ledger: every DP-SGD round a member ran on one dataset, durably, failing closed.

ε is a property of a dataset's whole history: one accountant for the node's
lifetime, composing every round it trained in (Abadi et al. 2016; the
accounting itself is :mod:`cipherhive.privacy.accountant`). So the ledger stores the
mechanism's *events* (noise multiplier, sample rate, steps), not an ε: ε is
recomputed from them at any δ. Its rules, in the style of the release ledger
(:mod:`cipherhive.node.secagg.release_ledger`):

* **Charge before training.** :meth:`PrivacyLedger.charge` checks that the
  history plus the next round stays within the limit, then writes the round's
  event (fsync, atomic rename) *before* the trainer sees a record, so before
  the update can be sent. A round that is aborted, crashes, or whose upload
  fails still counts, which is the safe side: there is no window in which an
  update is out and the ledger does not know.
* **Fail closed.** A missing, unreadable, corrupt, hand-edited or
  group/other-writable ledger refuses every charge (:class:`PrivacyLedgerError`)
  and is never reset; only :meth:`PrivacyLedger.init` creates one, and never
  over an existing file (``cipherhive node privacy-init``).
* **Keyed to the dataset.** The ledger names the dataset it accounts for, and
  its file lives under ``[privacy] ledger_dir`` (outside the node's state
  directory), so a new state directory, a new federation or a reinstalled node
  on the same data continues the same budget. Opening it for another dataset is
  refused.

File format (JSON, mode 0600)::

    {"format": "cipherhive/v1/privacy-ledger", "dataset": "...",
     "events": [{"round": 1, "kind": "dp-sgd", "noise_multiplier": 1.1, "sample_rate": 0.07,
                 "steps": 70}, ...],
     "check": "<sha256 hex>"}
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipherhive.privacy.accountant import DPEvent, epsilon
from cipherhive.runtime.fsutil import atomic_write, read_guarded

__all__ = ["BudgetExhausted", "LedgerEntry", "PrivacyLedger", "PrivacyLedgerError", "ledger_path"]

FORMAT = "cipherhive/v1/privacy-ledger"
_MAX_FILE = 64 << 20
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PrivacyLedgerError(RuntimeError):
    """The ledger cannot vouch for this dataset's privacy history; training is refused."""


class BudgetExhausted(PrivacyLedgerError):
    """The next round would take the dataset past its ε limit."""


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    event: DPEvent
    kind: str = "dp-sgd"

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "kind": self.kind,
            "noise_multiplier": self.event.noise_multiplier,
            "sample_rate": self.event.sample_rate,
            "steps": self.event.steps,
        }

    @classmethod
    def from_json(cls, doc: Any) -> LedgerEntry:
        if not isinstance(doc, dict) or doc.get("kind") != "dp-sgd" or not isinstance(doc.get("round"), int):
            raise ValueError("not a ledger entry")
        steps = doc["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool):
            raise ValueError("steps must be an integer")
        return cls(doc["round"], DPEvent(float(doc["noise_multiplier"]), float(doc["sample_rate"]), steps))


def valid_dataset(name: str) -> str:
    if not isinstance(name, str) or not _DATASET.match(name):
        raise ValueError(
            f"dataset name {name!r}: 1 to 128 letters, digits, '.', '_' or '-', not starting with a symbol"
        )
    return name


def ledger_path(ledger_dir: Path, dataset: str) -> Path:
    """The ledger file of ``dataset`` (one file per dataset)."""
    return Path(ledger_dir) / f"{valid_dataset(dataset)}.privacy-ledger.json"


def _check(dataset: str, entries: list[dict[str, Any]]) -> str:
    body = json.dumps([FORMAT, dataset, entries], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


class PrivacyLedger:
    """Durable history of the DP events spent on one dataset."""

    def __init__(self, path: Path, dataset: str) -> None:
        """Open an existing ledger; refuses at once if it is missing, damaged or of another dataset."""
        self._path = Path(path)
        self._dataset = valid_dataset(dataset)
        self._lock = threading.Lock()
        self._read()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def dataset(self) -> str:
        return self._dataset

    @classmethod
    def init(cls, path: Path, dataset: str) -> PrivacyLedger:
        """Create an empty ledger for a dataset that was never trained on with DP; never over a file."""
        path = Path(path)
        if path.exists() or path.is_symlink():
            raise FileExistsError(
                f"{path} already exists; a privacy ledger is never reset (that would hand the dataset "
                "a fresh budget)"
            )
        cls._write(path, valid_dataset(dataset), [])
        return cls(path, dataset)

    @staticmethod
    def _write(path: Path, dataset: str, entries: list[LedgerEntry]) -> None:
        docs = [e.to_json() for e in entries]
        doc = {"format": FORMAT, "dataset": dataset, "events": docs, "check": _check(dataset, docs)}
        atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600)

    def _refuse(self, why: str) -> PrivacyLedgerError:
        return PrivacyLedgerError(
            f"privacy ledger {self._path} {why}; refusing to train with DP until it is restored from a "
            "backup (never recreate it for a dataset that was trained on: that would reset its budget)"
        )

    def _read(self) -> list[LedgerEntry]:
        raw = read_guarded(
            self._path,
            _MAX_FILE,
            self._refuse,
            "for a dataset never trained on with DP, create it with `cipherhive node privacy-init`",
        )
        try:
            doc = json.loads(raw.decode("utf-8"))
            docs = doc["events"]
            ok = (
                isinstance(doc, dict)
                and doc.get("format") == FORMAT
                and isinstance(docs, list)
                and doc.get("check") == _check(str(doc.get("dataset")), docs)
            )
            entries = [LedgerEntry.from_json(d) for d in docs] if ok else []
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise self._refuse("is corrupt")
        if doc.get("dataset") != self._dataset:
            raise self._refuse(f"accounts for dataset {doc.get('dataset')!r}, not {self._dataset!r}")
        return entries

    def entries(self) -> list[LedgerEntry]:
        """Every event recorded, oldest first (re-read from disk: a deleted ledger is noticed)."""
        with self._lock:
            return self._read()

    def epsilon(self, delta: float) -> float:
        """ε (RDP) at ``delta`` of the whole history."""
        return epsilon([e.event for e in self.entries()], delta)

    def charge(self, round_number: int, event: DPEvent, delta: float, max_epsilon: float) -> float:
        """Record ``event`` for ``round_number`` if the history plus it stays within ``max_epsilon``.

        Call it *before* training: it is the only way to spend, and what it
        returns (the ε the dataset has spent, this round included) is already
        durable. Raises :class:`BudgetExhausted` (nothing written) past the limit.
        """
        with self._lock:
            history = self._read()
            spent = epsilon([*(e.event for e in history), event], delta)
            if spent > max_epsilon:
                raise BudgetExhausted(
                    f"round {round_number} would take dataset {self._dataset!r} to ε = {spent:.3f} "
                    f"(δ = {delta:g}), beyond its limit of {max_epsilon:g}; this node trains no more with it"
                )
            self._write(self._path, self._dataset, [*history, LedgerEntry(round_number, event)])
            return spent
