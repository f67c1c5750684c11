"""`cipherhive ctl round wait N`: block until a round ends, for scripts that drive a federation.

It asks for the round once per ``poll`` seconds (GetRound, a cheap unary call)
rather than following the event stream: a poll survives a server restart in
the middle of the wait, and a round that does not exist yet (``wait 5`` typed
while round 3 is open) is simply not finished yet. The outcome is the exit
code: 0 published, 1 failed or withdrawn, 3 unreachable or --timeout.
"""

from __future__ import annotations

import time

from cipherhive.ctl.client import CODE_TIMEOUT, EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, Client, CtlError
from cipherhive.v1 import federation_pb2 as pb

#: Round states that end a wait, with the word scripts and people see and the exit code.
OUTCOMES: dict[int, tuple[str, int]] = {
    pb.ROUND_SUM_READY: ("published", EXIT_OK),
    pb.ROUND_FAILED: ("failed", EXIT_REFUSED),
    pb.ROUND_WITHDRAWN: ("withdrawn", EXIT_REFUSED),
}


def wait_for_round(client: Client, number: int, timeout: float | None, poll: float = 0.5) -> pb.RoundInfo:
    """The round's info once it has ended; CtlError (exit 3) at ``timeout`` seconds.

    NOT_FOUND means "not opened yet" and is waited through. With a timeout, an unreachable
    server is retried until it passes (a server restarting is not the round's outcome);
    without one it ends the wait at once (exit 3) rather than hang a script forever. A
    refusal (a wrong certificate, say) ends the wait at once with its own exit code.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last_problem = ""
    while True:
        try:
            info = client.round(number)
            if info.state in OUTCOMES:
                return info
            last_problem = ""
        except CtlError as exc:
            if exc.code == "NOT_FOUND":
                last_problem = ""
            elif exc.exit_code == EXIT_UNREACHABLE and deadline is not None:
                last_problem = exc.message
            else:
                raise
        if deadline is not None and time.monotonic() + poll > deadline:
            why = f" (last error: {last_problem})" if last_problem else ""
            raise CtlError(
                CODE_TIMEOUT,
                f"round {number} did not end within {timeout:g}s{why}",
                EXIT_UNREACHABLE,
                hint="wait longer (--timeout), or look at it with `cipherhive ctl round show "
                f"{number}` and `cipherhive ctl status`",
            )
        time.sleep(poll)


def outcome(info: pb.RoundInfo) -> tuple[str, int]:
    """The word and exit code for an ended round (one table, so text, JSON and code agree)."""
    return OUTCOMES.get(info.state, ("open", EXIT_UNREACHABLE))


def outcome_error(info: pb.RoundInfo) -> CtlError | None:
    """A failed or withdrawn round as the error ``--json`` adds to it (None: published).

    A script then tells success from failure the same way for every command: an ``error``
    key in the JSON (docs/reference/cli.md#cipherhive-ctl).
    """
    word, code = outcome(info)
    if code == EXIT_OK:
        return None
    why = info.withdrawn_reason if info.state == pb.ROUND_WITHDRAWN else info.reason
    detail = f": {why}" if why else ""
    return CtlError(f"ROUND_{word.upper()}", f"round {info.round} {word}{detail}", code)
