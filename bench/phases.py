"""Where a bench round's time goes: per phase (from the daemons' JSON logs) and per process (CPU).

The server and the nodes log every step of a masked round with a millisecond
timestamp (``[log] log_json``); the phases below are the spans between those
steps, so they add up to the round's wall time. CPU seconds are read from
``/proc`` for each daemon and every process it spawned (crypto and ingest
workers), just before the federation stops.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Ticks per second of /proc/<pid>/stat's utime and stime.
_TICKS = os.sysconf("SC_CLK_TCK")


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _first(records: Iterable[dict[str, Any]], msg: str, **match: Any) -> float | None:
    times = [r["ts"] for r in records if r.get("msg") == msg and all(r.get(k) == v for k, v in match.items())]
    return min(times) if times else None


def _last(records: Iterable[dict[str, Any]], msg: str, **match: Any) -> float | None:
    times = [r["ts"] for r in records if r.get("msg") == msg and all(r.get(k) == v for k, v in match.items())]
    return max(times) if times else None


def round_phases(workdir: Path, nodes: list[str], number: int) -> dict[str, float]:
    """Seconds per phase of round ``number``: enrol, train, encrypt+upload, commit+release,
    unmask+publish, download+decrypt+apply (the last ends when the last node applied)."""
    server = _records(workdir / "server.log")
    per_node = {n: _records(workdir / f"{n}.log") for n in nodes}
    opened = _first(server, "round opened", round=number)
    roster = _first(server, "roster fixed", round=number) or opened
    accepted = _last(server, "submission accepted", round=number)
    released = _last(server, "self-mask released", round=number) or accepted
    closed = _first(server, "round closed", round=number)
    applied = [_last(r, "applied round sum", round=number) for r in per_node.values()]
    trained = [r.get("train_s", 0.0) for recs in per_node.values() for r in recs if r.get("msg") == "trained"]
    if None in (opened, accepted, closed) or None in applied:
        return {}
    assert opened is not None and accepted is not None and closed is not None and roster is not None
    assert released is not None
    train = max(trained, default=0.0)
    last_applied = max(a for a in applied if a is not None)
    return {
        "enrol_roster": roster - opened,
        "train": train,
        "encrypt_upload": max(0.0, accepted - roster - train),
        "commit_release": released - accepted,
        "unmask_publish": closed - released,
        "download_decrypt_apply": last_applied - closed,
        "total": last_applied - opened,
    }


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and of every live process below it."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15).
        total += sum(int(x) for x in fields[11:15]) / _TICKS
        stack.extend(_children(current))
    return total
