"""Progress of long work: a bar on a terminal, a few plain log lines otherwise.

Encrypting and uploading a large update or downloading and decrypting a sum
can take minutes; an operator watching a terminal sees a `rich` progress bar,
while a daemon under systemd or Kubernetes logs a line at each quarter.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("cipherhive.runtime.progress")


def track(items: Iterable[T], total: int, description: str, **fields: object) -> Iterator[T]:
    """Yield ``items`` while showing how many of ``total`` are done."""
    if total <= 0:
        yield from items
        return
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        columns = (
            *Progress.get_default_columns()[:1],
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    started = time.monotonic()
    next_mark = 1
    for done, item in enumerate(items, start=1):
        yield item
        if done * 4 >= next_mark * total:
            while done * 4 >= next_mark * total:
                next_mark += 1
            log.info(
                "%s: %d/%d (%.0f%%) in %.1fs",
                description,
                done,
                total,
                100 * done / total,
                time.monotonic() - started,
                extra={"fields": dict(fields)},
            )
