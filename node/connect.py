"""Before a node's first call on a new channel: explain a TLS handshake that cannot succeed.

gRPC reports a failed handshake to a call that waits for the connection only as
DEADLINE_EXCEEDED, after the whole deadline (30 s of silence, then
"reconnecting", forever). So the node first gives the channel a few seconds to
connect; if it does not, it redoes the handshake itself
(:func:`cipherhive.runtime.transport.diagnose_tls`, the same diagnosis `cipherhive ctl`
prints) and, for a TLS problem, logs the cause and the fix at once. It still
retries with back-off, because the other side may be fixed meanwhile (a new
server certificate, a corrected CA file). A server that is simply not up yet
is not a TLS problem: the node then waits for it as before.

When the connection is lost, :class:`Reconnects` decides when to try again and
what to tell the operator. A server that stops ends every open stream with
UNAVAILABLE :data:`SERVER_SHUTTING_DOWN`; the node then logs once that the
server is restarting and tries again about every second, so it is back within
about a second of the server serving again. Any other loss is logged with what
it means, not only gRPC's status (docs/troubleshooting.md#the-server-is-restarting).
"""

from __future__ import annotations

import logging
import random
import time

import grpc

from cipherhive.node.sums.receive import SessionEnd
from cipherhive.runtime.logs import event
from cipherhive.runtime.transport import ClientTLS, describe_rpc_error, diagnose_tls, wait_connected

log = logging.getLogger("cipherhive.node")

#: How long a channel may take to connect before the node looks for a TLS problem.
CONNECT_CHECK_SECONDS = 3.0
#: The details of the UNAVAILABLE status a stopping server ends every open stream with: the
#: same words as ``cipherhive.server.api.guard.SHUTTING_DOWN`` (a wire contract between versions).
SERVER_SHUTTING_DOWN = "the server is shutting down"
#: After that notice the node tries again about this often (a channel's own reconnect back-off
#: would grow to many seconds) ...
QUICK_RETRY_SECONDS = 1.0
#: ... for this long; then with the usual back-off (up to ``max_backoff_seconds``).
QUICK_PERIOD_SECONDS = 30.0


def check_handshake(ch: grpc.Channel, address: str, tls: ClientTLS | None, quick: bool = False) -> None:
    """Raise SessionEnd (reconnect after back-off) with a logged cause and fix if TLS cannot work.

    ``quick`` (the server said it is restarting): give the channel only
    :data:`QUICK_RETRY_SECONDS` to connect, and end the attempt quietly if the server is not
    listening yet, instead of letting Join wait for it on the channel's growing back-off.
    """
    if quick:
        if wait_connected(ch, QUICK_RETRY_SECONDS):
            return
        problem = diagnose_tls(address, tls) if tls is not None else None
        if problem is None:
            raise SessionEnd("the server is not back yet")  # quiet: the restart was logged once
    elif tls is None or wait_connected(ch, CONNECT_CHECK_SECONDS):
        return
    else:
        problem = diagnose_tls(address, tls)
    if problem is None:
        return  # not reachable yet, or a transient failure: Join waits for it
    event(
        log,
        f"cannot connect to {address}: TLS handshake fails: {problem} (retrying with back-off)",
        logging.ERROR,
        server=address,
    )
    raise SessionEnd


def refusal_with_fix(exc: grpc.RpcError) -> str:
    """A Join refusal as ``CODE: details``, plus what to do when the server's words do not say it.

    A revoked certificate passes the TLS handshake (the server checks its revocation list
    on every call), so it is refused here rather than diagnosed above.
    """
    text = describe_rpc_error(exc)
    if exc.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in text:
        text += (
            "; fix: this member's certificate is no longer accepted: ask the federation's CA holder "
            "for a new one (`cipherhive certs issue --role node`) and set tls_cert and tls_key to it"
        )
    return text


def says_shutting_down(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the status a stopping server ends its streams with."""
    return (
        isinstance(exc, grpc.RpcError)
        and exc.code() == grpc.StatusCode.UNAVAILABLE
        and (exc.details() or "") == SERVER_SHUTTING_DOWN
    )


#: Words of gRPC's details for a connection that was cut, not refused.
_CUT = ("socket closed", "connection reset", "broken pipe", "end of file", "goaway", "connection closed")


def explain(exc: grpc.RpcError) -> str:
    """What a lost connection means, then gRPC's status: ``DEADLINE_EXCEEDED: Deadline Exceeded``
    alone does not tell an operator that the server was down or unreachable."""
    code, details = exc.code(), (exc.details() or "").lower()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        why = (
            "the server did not answer in time: it is down or unreachable, or the network in between "
            "drops traffic"
        )
    elif code != grpc.StatusCode.UNAVAILABLE:
        return describe_rpc_error(exc)
    elif "refused" in details:
        why = "nothing is listening at that address: the server is not running (or not yet)"
    elif "keepalive" in details:
        why = "the server stopped answering keepalive pings: the network or the server's machine is down"
    elif any(word in details for word in _CUT):
        why = "the connection was cut: the server stopped without notice, or the network dropped it"
    elif "dns" in details or "resolv" in details:
        why = "the server's name does not resolve"
    else:
        why = "the server cannot be reached"
    return f"{why} ({describe_rpc_error(exc)})"


class Reconnects:
    """When a node tries the server again after a session ended, and what it logs about it.

    After the server said it is shutting down, the node logs once that the server is
    restarting and tries again about every :data:`QUICK_RETRY_SECONDS` for
    :data:`QUICK_PERIOD_SECONDS`, quietly; then, as for any other lost connection, it backs
    off exponentially (doubling, jittered, up to ``max_backoff``) and logs each failure with
    what it means. A session that lasted a minute starts the back-off again from one second.
    """

    def __init__(self, address: str, max_backoff: float, rng: random.Random | None = None) -> None:
        self.address = address
        self.max_backoff = max_backoff
        self._rng = rng or random.Random()
        self._backoff = 1.0
        #: When (monotonic) the server said it is restarting; None once the node is back.
        self._restart_noticed: float | None = None
        self._overdue_said = False

    def quick(self) -> bool:
        """Whether the next attempt is one of the quick ones after a restart notice."""
        noticed = self._restart_noticed
        return noticed is not None and time.monotonic() - noticed < QUICK_PERIOD_SECONDS

    def lost(self, exc: grpc.RpcError, stream_error: BaseException | None, started: float) -> float:
        """The session ``started`` (monotonic) ended with ``exc``: log it, return the wait."""
        if says_shutting_down(exc) or says_shutting_down(stream_error):
            return self._restarting()
        if self.quick():
            log.debug("the server at %s is not back yet (%s)", self.address, describe_rpc_error(exc))
            return self._quick_wait(started)
        wait = self._backoff_wait(started)
        event(
            log,
            f"connection to {self.address} lost: {explain(exc)}; reconnecting in {wait:.1f}s",
            logging.WARNING,
            server=self.address,
        )
        return wait

    def ended(self, stream_error: BaseException | None, started: float, *, clean: bool) -> float:
        """The session ended without a call failing: a SessionEnd logged where it was raised,
        or (``clean``) the round-event stream ended with OK, which only an older server does,
        as it stops. Return the wait."""
        if says_shutting_down(stream_error):
            return self._restarting()
        if self.quick():
            return self._quick_wait(started)
        wait = self._backoff_wait(started)
        if clean:
            event(
                log,
                f"the server at {self.address} ended the round-event stream without saying why "
                f"(an older server stopping?); reconnecting in {wait:.1f}s",
                server=self.address,
            )
        return wait

    def joined(self) -> None:
        """Joined again: a restart is over."""
        noticed, self._restart_noticed = self._restart_noticed, None
        if noticed is not None:
            event(
                log,
                f"the server at {self.address} is back after its restart",
                server=self.address,
                down_s=round(time.monotonic() - noticed, 1),
            )

    def _restarting(self) -> float:
        if self._restart_noticed is None:  # once per restart, however many calls it cut
            self._restart_noticed = time.monotonic()
            self._overdue_said = False
            self._backoff = 1.0
            event(
                log,
                f"the server is restarting: {self.address} ended this node's connection with "
                f'"{SERVER_SHUTTING_DOWN}"; reconnecting about every {QUICK_RETRY_SECONDS:g} s',
                server=self.address,
            )
        return QUICK_RETRY_SECONDS * (0.75 + 0.5 * self._rng.random())

    def _quick_wait(self, started: float) -> float:
        """What is left of a jittered second since the attempt ``started``."""
        spent = time.monotonic() - started
        return max(0.1, QUICK_RETRY_SECONDS * (0.75 + 0.5 * self._rng.random()) - spent)

    def _backoff_wait(self, started: float) -> float:
        if self._restart_noticed is not None and not self._overdue_said:
            self._overdue_said = True
            event(
                log,
                f"the server at {self.address} is not back {QUICK_PERIOD_SECONDS:g} s after it said it "
                f"was restarting; retrying with back-off (up to {self.max_backoff:g} s)",
                logging.WARNING,
                server=self.address,
            )
        if time.monotonic() - started > 60:
            self._backoff = 1.0
        wait = self._backoff * (0.5 + self._rng.random())
        self._backoff = min(self._backoff * 2, self.max_backoff)
        return wait
