"""What a simulated node says about each round, read from its log (JSON lines).

A node reports nothing about its training to the server unless told to (that
would disclose sample counts), but in a simulation every node belongs to the
caller, so what each node logs locally is fair to show: its sample count,
rounded training metrics, and how long it trained, encrypted and uploaded,
and fetched, decrypted and applied. The same lines tell a failing trainer
apart from a slow one at once, instead of waiting for the round's deadline.
The log is read incrementally: only lines written since the last call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The node's log messages this reader understands (node/daemon.py, node/sums/receive.py).
SUBMITTED = "update submitted"
APPLIED = "applied round sum"
TRAINER_FAILED = "trainer failed in round"
NOT_SUBMITTING = "not submitting:"
REJECTED = "rejected the sum of round"


@dataclass
class NodeLog:
    path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    #: Lines that are not JSON (a start-up error printed by the command, a crash's traceback).
    plain: list[str] = field(default_factory=list)
    _offset: int = 0

    def poll(self) -> None:
        """Read the complete lines written since the last call."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._offset += end
        for raw in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and "msg" in doc:
                self.events.append(doc)
            elif raw.strip():
                self.plain.append(raw)
                del self.plain[:-200]

    def _find(self, message: str, round_number: int) -> dict[str, Any] | None:
        for doc in self.events:
            if doc.get("round") == round_number and str(doc.get("msg", "")).startswith(message):
                return doc
        return None

    def submitted(self, round_number: int) -> dict[str, Any] | None:
        return self._find(SUBMITTED, round_number)

    def applied(self, round_number: int) -> dict[str, Any] | None:
        return self._find(APPLIED, round_number)

    def failure(self, round_number: int) -> str:
        """Why this node will not submit in ``round_number`` ("" if it said nothing of the kind)."""
        for message in (TRAINER_FAILED, NOT_SUBMITTING):
            doc = self._find(message, round_number)
            if doc is not None:
                return _with_exception(doc)
        return ""

    def rejection(self, round_number: int) -> str:
        doc = self._find(REJECTED, round_number)
        return str(doc["msg"]) if doc is not None else ""

    def last_error(self) -> str:
        """The last thing this node reported as an error (for a node that exited)."""
        for raw in reversed(self.plain):
            if "error:" in raw:
                return raw.strip()
        for doc in reversed(self.events):
            if doc.get("level") in ("error", "critical"):
                return _with_exception(doc)
        if self.plain:
            return self.plain[-1].strip()
        return ""


def _with_exception(doc: dict[str, Any]) -> str:
    """The message, plus the exception's last line (``ValueError: …``) when there was one."""
    message = str(doc.get("msg", ""))
    lines = [line for line in str(doc.get("exc", "")).splitlines() if line.strip()]
    return f"{message}: {lines[-1].strip()}" if lines else message
