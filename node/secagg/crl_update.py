"""Keep this member's crl.pem current from the server, without trusting the server with it.

After each Join and before each masked round (where the roster is checked
against crl.pem) the node asks the server for the CRL it loaded
(``GetRevocationList``) and replaces its own file only with one that
:func:`cipherhive.pki.crl_check.check_crl` accepts: signed by the federation
CA, not stale, and numbered strictly above the CRL it holds, so a hostile
server can neither forge one nor replay an older one to take a member off it
(docs/how-to/member.md#keep-the-revocation-list-current). A refused CRL is
logged once with the reason and the node keeps its own; nothing the server
sends here can stop the daemon.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import grpc
from cryptography import x509

from cipherhive.node.config import NodeConfig
from cipherhive.pki.crl_check import CrlRefused, check_crl, crl_number
from cipherhive.runtime.fsutil import atomic_write
from cipherhive.runtime.logs import event
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.node")

#: How long the node waits for the server's CRL before going on with its own.
FETCH_TIMEOUT = 5.0
#: Digests of CRLs already refused, per crl.pem path: a refusal is logged once, not every round.
_refused: dict[Path, bytes] = {}


def held_number(path: Path) -> int | None:
    """The number of the CRL this member holds (None: no readable CRL with a number)."""
    try:
        return crl_number(x509.load_pem_x509_crl(path.read_bytes()))
    except (OSError, ValueError):
        return None


def offer(data: bytes, crl_path: Path, ca_path: Path, node: str = "") -> bool:
    """Replace ``crl_path`` with ``data`` if it passes every check; True if it did.

    Never raises for anything in ``data``: a refusal is logged (once per distinct CRL).
    """
    if not data:
        return False  # the server runs without a CRL: nothing to offer
    try:
        if crl_path.read_bytes() == data:
            return False  # the CRL this member already holds
    except OSError:
        pass
    digest = hashlib.sha256(data).digest()
    try:
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        checked = check_crl(data, ca, held_number=held_number(crl_path))
    except (CrlRefused, OSError, ValueError) as exc:
        if _refused.get(crl_path) != digest:
            _refused[crl_path] = digest
            event(
                log,
                "refused the CRL from the server; keeping this member's own",
                logging.WARNING,
                node=node,
                path=str(crl_path),
                reason=str(exc)[:300],
            )
        return False
    try:
        atomic_write(crl_path, data, mode=0o644)
    except OSError as exc:
        if _refused.get(crl_path) != digest:
            _refused[crl_path] = digest
            why = str(exc)
            event(log, "cannot write the CRL", logging.WARNING, node=node, path=str(crl_path), reason=why)
        return False
    _refused.pop(crl_path, None)
    event(
        log,
        "CRL updated from the server",
        node=node,
        number=checked.number if checked.number is not None else "none",
        revoked=len(checked.revoked),
    )
    return True


def update_crl(stub: pb_grpc.AggregationStub, config: NodeConfig, node: str = "") -> bool:
    """Fetch the server's CRL and :func:`offer` it; False (and the node goes on) on any failure."""
    if config.insecure or config.tls_ca is None or config.tls_cert is None or config.tls_key is None:
        return False  # no federation CA to check a CRL against
    _, _, crl_path = config.enrolment_files()
    try:
        reply = stub.GetRevocationList(pb.RevocationListRequest(), timeout=FETCH_TIMEOUT)
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        # An older server without the call: nothing to update, say it once at debug level.
        level = logging.DEBUG if code == grpc.StatusCode.UNIMPLEMENTED else logging.WARNING
        event(log, "cannot fetch the CRL from the server", level, node=node, reason=str(code))
        return False
    try:
        return offer(bytes(reply.crl_pem), crl_path, config.tls_ca, node)
    except Exception as exc:  # nothing from the network may stop the daemon
        event(log, "CRL update failed", logging.WARNING, node=node, reason=repr(exc)[:300])
        return False
