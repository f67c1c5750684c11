"""One active server and a standby over one PostgreSQL database
(docs/how-to/operator.md#standby-server): the lease in the ``leader`` row decides which serves.

A server whose round state is in PostgreSQL takes the lease before it touches the round state
or the spool; while another holds it, the server waits as a standby (connected, configured, not
serving). The active one renews the lease every ``lease_seconds / 5``; a standby takes it once
it has gone ``lease_seconds`` without renewal, by the database's clock. The store fences every
write with the token it took (``postgres.PostgresState._tx``), so a former leader that comes
back after a pause writes nothing, and :class:`LeaseKeeper` stops it as soon as its renewal
finds the token gone, or once it could not renew for a whole lease (a standby may have taken
over in the meantime).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import psycopg

from cipherhive.runtime.logs import event
from cipherhive.server.storage.postgres import LeaseState, PostgresState
from cipherhive.server.storage.rows import DatabaseUnavailable, Fenced

__all__ = ["LeaseKeeper", "holder_id", "wait_for_lease"]

log = logging.getLogger("cipherhive.server")


def holder_id() -> str:
    """Who holds the lease, as logs and ``leader.holder`` name it: host (a pod's name) and pid."""
    return f"{socket.gethostname()}/{os.getpid()}"


def wait_for_lease(
    store: PostgresState, holder: str, seconds: float, stopped: threading.Event | None = None
) -> bool:
    """Take the lease, waiting as a standby while another holds it; False if ``stopped`` is set
    first. Says once per holder that it waits, and for whom."""
    waiting_for = ""
    while stopped is None or not stopped.is_set():
        held: LeaseState | None
        try:
            held = store.take_lease(holder, seconds)
        except (psycopg.Error, DatabaseUnavailable) as exc:
            log.warning("standby: cannot reach the database to take the lease (%s); retrying", exc)
            held = LeaseState("(the database is unreachable)", -1, seconds / 5)
        if held is None:
            event(log, "lease taken", holder=holder, token=store.fencing_token)
            return True
        if held.holder != waiting_for:
            waiting_for = held.holder
            log.info(
                "standby: waiting for the lease held by %s (token %d, expires in %.1f s)",
                held.holder or "nobody",
                held.token,
                max(held.seconds_left, 0.0),
            )
        pause = min(max(held.seconds_left, 0.05), seconds / 5)
        if stopped is not None:
            stopped.wait(pause)
        else:
            time.sleep(pause)
    return False


class LeaseKeeper:
    """Renews the lease every ``seconds / 5``; calls ``on_lost`` once, with the reason, when
    the token is gone or a whole lease passed without a renewal."""

    def __init__(self, store: PostgresState, seconds: float, on_lost: Callable[[str], None]) -> None:
        self._store = store
        self._seconds = seconds
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._seconds / 5):
            try:
                self._store.renew_lease()
                last = time.monotonic()
                continue
            except Fenced as exc:
                self._lost(str(exc))
                return
            except (psycopg.Error, DatabaseUnavailable) as exc:
                log.warning("cannot renew the lease: %s", str(exc).strip())
            except Exception:  # the thread must outlive any one failed renewal
                log.exception("lease renewal failed; retrying")
            if time.monotonic() - last > self._seconds:
                self._lost(
                    f"lease lost: this server could not renew its lease for {self._seconds:g} s "
                    "(the database is unreachable); a standby may have taken over, so it stops serving"
                )
                return

    def _lost(self, why: str) -> None:
        if not self._stop.is_set():
            self._on_lost(why)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
