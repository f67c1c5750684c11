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
"""

from __future__ import annotations

import logging

import grpc

from cipherhive.node.sums.receive import SessionEnd
from cipherhive.runtime.logs import event
from cipherhive.runtime.transport import ClientTLS, describe_rpc_error, diagnose_tls, wait_connected

log = logging.getLogger("cipherhive.node")

#: How long a channel may take to connect before the node looks for a TLS problem.
CONNECT_CHECK_SECONDS = 3.0


def check_handshake(ch: grpc.Channel, address: str, tls: ClientTLS | None) -> None:
    """Raise SessionEnd (reconnect after back-off) with a logged cause and fix if TLS cannot work."""
    if tls is None or wait_connected(ch, CONNECT_CHECK_SECONDS):
        return
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
