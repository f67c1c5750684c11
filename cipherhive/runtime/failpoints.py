"""Named crash points for fault-injection tests: ``CIPHERHIVE_FAILPOINTS="name:n,other"``.

At the n-th time (default: first) the code passes a named point, the process
kills itself with SIGKILL — no cleanup, no flushing, exactly like ``kill -9``
or a power cut at that instant. With the variable unset (always, outside
tests) a check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_lock = threading.Lock()


def _parse(text: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        points[name] = int(count or 1)
    return points


_armed = _parse(os.environ.get("CIPHERHIVE_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Die here if the point ``name`` is armed and its count is reached."""
    if not _armed:
        return
    with _lock:
        left = _armed.get(name)
        if left is None:
            return
        left -= 1
        _armed[name] = left
    if left == 0:
        sys.stderr.write(f"failpoint {name}: killing process {os.getpid()}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
