"""How a node stops on SIGTERM / SIGINT (Ctrl-C): promptly on the first signal, at once on the second.

Both may reach the node's whole process group (a terminal's Ctrl-C, ``timeout -s TERM``, a
service manager), so they are handled from the node command's first instructions
(:func:`guard_start_up`, called by ``cipherhive node`` before it parses its arguments) and its
crypto workers ignore them (:mod:`cipherhive.runtime.child_signals`; the node closes them itself).

* The first signal during start-up (imports, loading the trainer and the state) abandons it:
  :class:`StopAtStartup` is raised in the main thread and the command exits 0 with
  "stopped during start-up". A signal that arrives while crypto workers are being started waits
  until they are registered for closing (:func:`deferred`).
* The first signal once the node runs asks it to stop: it stops following the federation, a
  trainer that checks ``RoundInfo.should_stop`` returns early and its result is discarded
  (nothing partial is encrypted or uploaded), and the node exits 0 after closing its workers.
* A second signal exits at once, without clean-up, with :data:`EXIT_FORCED` (130), after killing
  the crypto workers, with a log line naming what the node was doing (training, encrypting,
  uploading, waiting for the server, …). Nothing is lost by that: the checkpoint on disk only
  ever holds applied rounds, written atomically.

The signals are counted and acted on by a thread woken through :func:`signal.set_wakeup_fd`, not
by the Python handler in the main thread: the main thread may be stuck in a trainer's C code, or
holding a lock that a stop step needs. See docs/reference/exit-codes.md.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

from cipherhive.runtime.logs import event

log = logging.getLogger("cipherhive.node")

#: Exit code of a node ended by a second signal (128 + SIGINT, as shells report Ctrl-C).
EXIT_FORCED = 130

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopAtStartup(KeyboardInterrupt):
    """A stop signal arrived while the node was starting: start-up is abandoned (exit 0)."""

    def __init__(self, signal_name: str, doing: str) -> None:
        super().__init__(signal_name, doing)
        self.signal_name, self.doing = signal_name, doing


@dataclass(frozen=True)
class Activity:
    """What the main thread is doing, as the stop log lines say it."""

    doing: str
    #: What a forced exit now leaves behind, for the operator ("" when nothing worth saying).
    after: str = ""


_NOTHING_SENT = "nothing of the round in progress was submitted"
_TRAINING = Activity("training", _NOTHING_SENT)
_STARTING = Activity("starting up")
_RUNNING = Activity("following the federation")

#: Where the main thread is, by the innermost frame that names an activity (``module:qualname``,
#: or ``caller>callee`` for a call made from there). tests/test_signals.py checks that each
#: name still exists, so a rename shows up as a failing test rather than a vaguer log line.
ACTIVITIES: dict[str, Activity] = {
    "importlib._bootstrap:_find_and_load": Activity("starting up: importing modules"),
    "cipherhive.node.daemon:Node.__init__": Activity(
        "starting up: loading the trainer, the model and its state"
    ),
    "cipherhive.node.crypto.pool:CryptoPool.close": Activity("stopping the crypto workers"),
    "cipherhive.node.training.federated_eval:evaluate_base": Activity(
        "evaluating the global model", _NOTHING_SENT
    ),
    "cipherhive.node.training.local_round:LocalTraining.train": _TRAINING,
    "cipherhive.node.training.local_round:LocalTraining.train_and_submit": Activity(
        "encrypting and uploading the update", "the server keeps nothing of an incomplete upload"
    ),
    "cipherhive.node.secagg.masked_round:MaskedRoundDriver._enrol": Activity("enrolling in the round"),
    "cipherhive.node.secagg.masked_round:MaskedRoundDriver._mask": Activity(
        "masking and encrypting the update", _NOTHING_SENT
    ),
    "cipherhive.node.secagg.masked_round:MaskedRoundDriver._submit": Activity(
        "uploading the masked update", "the server keeps nothing of an incomplete upload"
    ),
    "cipherhive.node.secagg.masked_round:MaskedRoundDriver._await": Activity(
        "waiting for the server (the round's roster or commits)"
    ),
    "cipherhive.node.secagg.masked_round:MaskedRoundDriver._step": Activity(
        "sending the round's commit or self-mask seed to the server"
    ),
    "cipherhive.node.secagg.masked_round:MaskedRoundDriver._withdraw": Activity("withdrawing from the round"),
    "cipherhive.node.sums.receive:SumApplier.on_sum": Activity(
        "fetching, checking and applying a published sum", "the checkpoint holds only applied rounds"
    ),
    "cipherhive.node.sums.rollback:RollbackHandler.on_withdrawn": Activity("rolling back a withdrawn round"),
    "cipherhive.node.connect:check_handshake": Activity("connecting to the server"),
    "cipherhive.node.daemon:Node._session>_UnaryUnaryMultiCallable.__call__": Activity(
        "joining the federation (waiting for the server's answer)"
    ),
    "cipherhive.node.daemon:Node._session>RoundEvents.next": Activity(
        "waiting for the server's next round event"
    ),
    "cipherhive.node.daemon:Node._session": Activity("following the server's round events"),
    "cipherhive.node.daemon:Node.run>Event.wait": Activity("waiting to reconnect to the server"),
}


def _name(frame: FrameType) -> str:
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_code.co_qualname}"


def activity(frame: FrameType | None) -> Activity:
    """What the stack ending in ``frame`` is doing (innermost named activity first)."""
    callee = ""
    while frame is not None:
        name = _name(frame)
        found = ACTIVITIES.get(f"{name}>{callee}") or ACTIVITIES.get(name)
        if found is not None and (_state.starting or not found.doing.startswith("starting up")):
            return found  # (a module a trainer imports as it trains is not the node starting)
        callee = frame.f_code.co_qualname
        frame = frame.f_back
    return _STARTING if _state.starting else _RUNNING


def _main_thread_activity() -> Activity:
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    return activity(frame)


class _State:
    """The process's stop state (signals are per process): one instance, :data:`_state`."""

    def __init__(self) -> None:
        self.guarded = False
        self.starting = True
        self.raised = False
        self.deferring = 0
        self.deferred_signal: int | None = None
        self.asked: list[str] = []
        self.request_stop: Callable[[], None] | None = None


_state = _State()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The Python handler (main thread). Counting and logging are the watcher thread's job; here,
    only abandoning start-up, which must happen in the main thread."""
    if not _state.starting or _state.raised:
        return
    if _state.deferring:
        _state.deferred_signal = signum
        return
    _state.raised = True
    raise StopAtStartup(signal.Signals(signum).name, activity(frame).doing)


def _watch(reader: int) -> None:
    while True:
        try:
            data = os.read(reader, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        for number in data:
            if number in STOP_SIGNALS:
                _received(signal.Signals(number).name)


def _received(name: str) -> None:
    now = _main_thread_activity()
    if _state.asked:
        # Even if the line below cannot be written (a log handler's lock held by a stuck thread).
        threading.Timer(5.0, os._exit, args=(EXIT_FORCED,)).start()
        _kill_workers()
        event(
            log,
            f"second stop signal ({name} after {_state.asked[0]}): exiting now while {now.doing}"
            + (f"; {now.after}" if now.after else ""),
            logging.ERROR,
            signal=name,
            doing=now.doing,
        )
        _flush_logs()
        os._exit(EXIT_FORCED)
    _state.asked.append(name)
    if now is _TRAINING:
        what = "training in progress stops and is not submitted"
    else:
        what = f"the node was {now.doing}"
    event(log, f"shutting down ({what}; send the signal again to exit at once)", signal=name, doing=now.doing)
    request_stop = _state.request_stop
    if request_stop is not None:
        request_stop()


def _kill_workers() -> None:
    """Before a forced exit: the workers ignore stop signals and os._exit skips every clean-up."""
    with contextlib.suppress(Exception):
        for child in multiprocessing.active_children():
            with contextlib.suppress(Exception):
                child.kill()


def guard_start_up() -> None:
    """Handle SIGTERM and SIGINT from now on: the first abandons start-up (:class:`StopAtStartup`).

    Call it first thing, in the main thread; :func:`install` then switches to asking the running
    node to stop. Logs go to stderr until the node's configuration sets them up.
    """
    if _state.guarded:
        return
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(reader,), name="stop-signals", daemon=True).start()
    for s in STOP_SIGNALS:
        signal.signal(s, _on_signal)
    _state.guarded = True
    if not logging.getLogger().handlers:
        from cipherhive.runtime import logs

        logs.setup()


def install(request_stop: Callable[[], None]) -> None:
    """From now on the first signal calls ``request_stop`` (at once if one already arrived)."""
    guard_start_up()
    _state.request_stop = request_stop
    _state.starting = False
    if _state.asked:
        request_stop()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A stop at start-up waits for the end of this block (starting workers and registering them
    for closing must not be cut in half). Main thread only; nests."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        signum, _state.deferred_signal = _state.deferred_signal, None
        if signum is not None and not _state.deferring and _state.starting and not _state.raised:
            _state.raised = True
            raise StopAtStartup(signal.Signals(signum).name, "starting up: starting the crypto workers")


def stopped_at_start_up(interrupt: KeyboardInterrupt) -> int:
    """Log that start-up was abandoned; the node command's exit code for it (0).

    ``interrupt`` is :class:`StopAtStartup`, or Python's own KeyboardInterrupt for a SIGINT that
    came before :func:`guard_start_up`."""
    if not logging.getLogger().handlers:
        from cipherhive.runtime import logs

        logs.setup()
    if isinstance(interrupt, StopAtStartup):
        name, doing = interrupt.signal_name, interrupt.doing
    else:
        name, doing = "SIGINT", "starting up"
    event(log, f"stopped during start-up (it was {doing})", signal=name, doing=doing)
    _flush_logs()
    return 0


def _flush_logs() -> None:
    """os._exit skips the interpreter's flushing: make sure the line above is written."""
    for handler in logging.getLogger().handlers + log.handlers:
        with contextlib.suppress(Exception):  # exiting anyway
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
