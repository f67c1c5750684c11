"""Worker processes that a stop signal meant for their parent does not kill.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group, and a service manager
may signal every process of a unit: the daemons' worker processes get the signal too. A worker
that dies of it mid-task looks to its daemon like a crashed worker. So a daemon starts its
workers with the stop signals ignored: an ignored disposition survives the spawn's exec, and
Python leaves an ignored SIGINT alone at start-up, so the worker is never interrupted, not even
while it imports. The daemon stops its workers itself.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ignored_in_children"]


@contextmanager
def ignored_in_children(*signals: signal.Signals) -> Iterator[None]:
    """Ignore ``signals`` while the block starts child processes, then restore the handlers.

    Python handles signals in the main thread only; from another thread this does nothing
    (the worker then ignores them as its first step instead). A signal that arrives in the
    few milliseconds of the block is lost to the parent too: the operator presses again.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
