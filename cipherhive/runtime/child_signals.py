"""Worker processes that a stop signal meant for their parent does not kill.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group, and a service manager
(or ``timeout``) may signal every process of a unit: the daemons' worker processes get the signal
too. A worker that dies of it mid-task looks to its daemon like a crashed worker, and a task it
never finishes can leave the daemon waiting. So a daemon starts its workers with the stop signals
*blocked*: the mask survives the spawn's exec, so a signal that reaches a worker before its first
instruction waits, and the worker's first step ignores the signals, which discards it. The daemon
stops its workers itself (a message or closing their queue, then SIGKILL after a grace period;
SIGTERM no longer works on them). See docs/reference/exit-codes.md.

Blocking, not ignoring, in the parent: a signal that arrives while the parent starts its workers
is delivered to it once the block ends (or at once to another of its threads), never lost.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker

__all__ = ["ignored_in_children"]


@contextmanager
def ignored_in_children(*signals: signal.Signals) -> Iterator[None]:
    """Start the block's child processes with ``signals`` blocked; each must ignore them first thing.

    Works in any thread (the mask is the calling thread's). The resource tracker is started
    first, outside the block: multiprocessing starts it on first use with the stop signals
    blocked and then *unblocks* them, which would undo this block.
    """
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
