"""How a node stops on SIGTERM / Ctrl-C: promptly on the first signal, at once on the second.

The first signal asks for a stop: the daemon stops following the federation,
and a trainer that checks ``RoundInfo.should_stop`` between batches returns
early; the node then discards that result (nothing partial is encrypted or
uploaded). A trainer that does not check it, or hangs, would keep the node
alive until it returns, so a second signal ends the process at once, without
clean-up, with exit code :data:`EXIT_FORCED` and a log line saying so. Nothing
is lost by that: the checkpoint on disk only ever holds applied rounds,
written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from cipherhive.runtime.logs import event

log = logging.getLogger("cipherhive.node")

#: Exit code of a node ended by a second signal (128 + SIGINT, as shells report Ctrl-C).
EXIT_FORCED = 130


def install(request_stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT: the first calls ``request_stop``, any later one exits the process now."""
    asked: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if asked:
            event(
                log,
                f"second stop signal ({name} after {asked[0]}): exiting now, without waiting for the "
                "trainer; nothing of the round in progress was submitted",
                logging.ERROR,
                signal=name,
            )
            _flush_logs()
            os._exit(EXIT_FORCED)
        asked.append(name)
        event(
            log,
            "shutting down (training in progress stops and is not submitted; "
            "send the signal again to exit at once)",
            signal=name,
        )
        request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _flush_logs() -> None:
    """os._exit skips the interpreter's flushing: make sure the line above is written."""
    for handler in logging.getLogger().handlers + log.handlers:
        with contextlib.suppress(Exception):  # exiting anyway
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
