"""Bodies of the RPCs, as plain synchronous functions: validate, call the manager, build the reply.

They know nothing of gRPC servicers or contexts, so the same functions serve
a thread-pool servicer or an asyncio one: a handler identifies the caller,
calls one function here, and turns a :class:`RoundError` into its status.
Every refusal is audited here with the caller's name (outcome reports on rounds the caller did
not take part in: once per node).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc

from cipherhive import __version__
from cipherhive.federation.layout import Layout, LayoutError
from cipherhive.pki import certs
from cipherhive.pki.enrolment_certs import RevocationCheck
from cipherhive.runtime.logs import audit
from cipherhive.server.rounds.errors import RoundError
from cipherhive.server.rounds.manager import STATE_NAMES, RoundManager
from cipherhive.server.rounds.withdrawal import NotAParticipant
from cipherhive.server.storage.rows import NodeRow, OutcomeRow, RoundRow, SubmissionRow
from cipherhive.v1 import federation_pb2 as pb

#: ListRounds pages: the default and the most one call returns (64 members' submissions
#: per round keep 500 rounds under gRPC's 4 MiB message limit).
DEFAULT_PAGE = 100
MAX_PAGE = 500
#: JoinReply.withdrawn_rounds lists at most this many (the newest).
MAX_WITHDRAWN_LISTED = 1000
R = TypeVar("R")
log = logging.getLogger("cipherhive.server.api")


@contextmanager
def refusals_audited(action: str, actor: str, **fields: object) -> Iterator[None]:
    """Audit a refusal (with who asked) on its way out to the caller."""
    try:
        yield
    except LayoutError as exc:
        audit(f"{action} refused", actor, code="INVALID_ARGUMENT", reason=str(exc), **fields)
        raise RoundError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    except RoundError as exc:
        audit(f"{action} refused", actor, code=exc.code.name, reason=exc.message, **fields)
        raise


def audited(action: str, actor: str, call: Callable[[], R]) -> R:
    with refusals_audited(action, actor):
        return call()


# ---------------------------------------------------------------- shared messages


def round_info(
    manager: RoundManager,
    row: RoundRow,
    with_submissions: bool = True,
    submissions: list[SubmissionRow] | None = None,
    outcomes: list[OutcomeRow] | None = None,
) -> pb.RoundInfo:
    info = pb.RoundInfo(
        round=row.round,
        state=STATE_NAMES[row.state],
        base_round=row.base_round,
        opened_unix=row.opened,
        deadline_unix=row.deadline,
        closed_unix=row.closed or 0.0,
        expected=len(row.expected),
        participants=row.participants,
        reason=row.reason,
        min_participants=row.min_participants or manager.config.min_participants,
        withdrawn_reason=row.withdrawn_reason,
        withdrawn_unix=row.withdrawn_unix,
        phase=row.phase,
        failed_step=row.failed_step,
        culprits=row.culprits,
        reformed=bool(row.reformed),
    )
    if row.masked:
        manager.masked_progress(row, info)
    if not with_submissions:
        return info
    if submissions is None:
        submissions = manager.state.submissions(row.round)
    if outcomes is None:
        outcomes = manager.state.outcomes(row.round)
    for sub in submissions:
        info.submissions.append(
            pb.SubmissionInfo(
                node_name=sub.node, accepted_unix=sub.accepted, num_bytes=sub.num_bytes, metrics=sub.metrics
            )
        )
    for out in outcomes:
        info.outcomes.append(
            pb.NodeOutcome(
                node_name=out.node, applied=out.applied, reason=out.reason, reported_unix=out.reported
            )
        )
    return info


def layout_reply(layout: Layout | None) -> pb.LayoutReply:
    if layout is None:
        return pb.LayoutReply()
    return pb.LayoutReply(
        layout_hash=layout.hash, num_params=layout.num_params, num_tensors=len(layout.tensors)
    )


# ---------------------------------------------------------------- Aggregation


def join_reply(manager: RoundManager, node: str, request: pb.JoinRequest, serial: int = 0) -> pb.JoinReply:
    """Join: bounds-check the layout before anything is sized from it, then admit the node.

    The serial of the certificate it joined with is kept, so ``ctl nodes`` can mark a member
    the CRL revokes (docs/how-to/operator.md); 0 (insecure mode) records nothing."""
    with refusals_audited("join", node):
        layout = Layout.checked_from_proto(request.layout)
        manager.join(node, request.key_fingerprint, layout)
    if serial:
        manager.state.set_node_serial(node, f"{serial:x}")
    audit("join", node, version=request.software_version[:40])  # the log formatter escapes it
    withdrawn = manager.state.withdrawn_rounds(MAX_WITHDRAWN_LISTED)
    return pb.JoinReply(
        node_name=node,
        settings=manager.settings(),
        latest_round=manager.state.latest_round(),
        latest_sum_round=manager.state.latest_sum_round(),
        withdrawn_rounds=[r.round for r in withdrawn],
    )


#: Per server, the nodes whose outcome report on a round they did not take part in was already
#: audited: a node from before such reports stopped sends one per round it catches up on, and the
#: refusal is logged once with who sent it, not once per round (docs/spec/sum-checks.md §4).
_NOT_PARTICIPANTS: weakref.WeakKeyDictionary[RoundManager, set[str]] = weakref.WeakKeyDictionary()


def report_outcome(manager: RoundManager, node: str, request: pb.OutcomeReport) -> pb.OutcomeAck:
    try:
        withdrawn = manager.report_outcome(node, request.round, request.applied, request.reason)
    except NotAParticipant as exc:
        told = _NOT_PARTICIPANTS.setdefault(manager, set())
        if node in told:
            log.debug("refused %s (again from node %r)", exc.message, node)
            raise
        told.add(node)
        reason = f"{exc.message}; its further reports on rounds it did not take part in are refused unlogged"
        audit("outcome report refused", node, code=exc.code.name, reason=reason, round=request.round)
        raise
    except RoundError as exc:
        audit("outcome report refused", node, code=exc.code.name, reason=exc.message, round=request.round)
        raise
    return pb.OutcomeAck(withdrawn=withdrawn)


# ---------------------------------------------------------------- Admin


def status(manager: RoundManager, started: float) -> pb.StatusReply:
    layout = manager.layout()
    return pb.StatusReply(
        version=__version__,
        started_unix=started,
        settings=manager.settings(),
        nodes_known=len(manager.state.nodes()),
        nodes_online=len(manager.online()),
        open_round=manager.open_round_number(),
        latest_round=manager.state.latest_round(),
        latest_sum_round=manager.state.latest_sum_round(),
        rounds_failed=manager.state.count_rounds("failed"),
        auto_start=manager.config.auto_start,
        max_rounds=manager.config.max_rounds,
        layout_hash=layout.hash if layout else "",
        layout_params=layout.num_params if layout else 0,
        rounds_withdrawn=manager.state.count_rounds("withdrawn"),
        oldest_kept_round=manager.state.oldest_kept_round(),
    )


def node_info(manager: RoundManager, n: NodeRow, online: set[str], expected: set[str]) -> pb.NodeInfo:
    """One member as the operator sees it, with its offences (docs/spec/masked-round.md §10)."""
    offences, excluding = manager.standing(n.name)
    info = pb.NodeInfo(
        name=n.name,
        online=n.name in online,
        first_seen_unix=n.first_seen,
        last_seen_unix=n.last_seen,
        last_round=n.last_round,
        submissions=n.submissions,
        missed_rounds=n.missed_rounds,
        expected=n.name in expected,
        offences=len(offences),
        excluded_until_round=excluding.excluded_until if excluding is not None else 0,
    )
    info.revoked_reason = revoked_reason(manager.revocations, n.cert_serial)
    info.revoked = bool(info.revoked_reason)
    if offences:
        last = offences[-1]
        info.last_offence_round, info.last_offence_step, info.last_offence_reason = (
            last.round,
            last.step,
            last.reason,
        )
    return info


def revoked_reason(revocations: RevocationCheck | None, serial_hex: str) -> str:
    """Why the member's last certificate is revoked, per the server's CRL ("": it is not, or the
    serial is unknown)."""
    if revocations is None or not serial_hex:
        return ""
    try:
        serial = int(serial_hex, 16)
    except ValueError:
        return ""
    if not revocations.is_revoked(serial):
        return ""
    when = revocations.revoked_at(serial) if isinstance(revocations, certs.RevocationList) else None
    return f"certificate {serial_hex} revoked" + (f" on {when:%Y-%m-%d %H:%M:%S} UTC" if when else "")


def revocation_list(crl: certs.RevocationList | None) -> pb.RevocationList:
    """The CRL file as the server loaded it, bytes unchanged: members check it themselves
    (docs/how-to/member.md#keep-the-revocation-list-current), so the server adds nothing."""
    return pb.RevocationList(crl_pem=crl.pem() if crl is not None else b"")


def list_nodes(manager: RoundManager) -> pb.ListNodesReply:
    online = set(manager.online())
    expected = set(manager.expected_nodes())
    return pb.ListNodesReply(nodes=[node_info(manager, n, online, expected) for n in manager.state.nodes()])


def readmit_node(manager: RoundManager, name: str, actor: str) -> pb.NodeInfo:
    if not name or len(name) > 200:
        raise RoundError(grpc.StatusCode.INVALID_ARGUMENT, "name the member to readmit (1 to 200 characters)")
    manager.readmit(name, actor)
    row = next(n for n in manager.state.nodes() if n.name == name)
    return node_info(manager, row, set(manager.online()), set(manager.expected_nodes()))


def list_rounds(
    manager: RoundManager, request: pb.ListRoundsRequest, actor: str = "admin"
) -> pb.ListRoundsReply:
    """One page, oldest first; ``next_before_round`` continues with older rounds."""
    with refusals_audited("list rounds", actor, limit=request.limit):
        if request.limit > MAX_PAGE:
            raise RoundError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"limit {request.limit} is above {MAX_PAGE}; page with before_round / next_before_round",
            )
    rows, next_before = manager.state.rounds_page(request.limit or DEFAULT_PAGE, request.before_round)
    if not rows:
        return pb.ListRoundsReply()
    first, last = rows[0].round, rows[-1].round
    subs = manager.state.submissions_between(first, last)
    outs = manager.state.outcomes_between(first, last)
    return pb.ListRoundsReply(
        rounds=[round_info(manager, r, True, subs.get(r.round, []), outs.get(r.round, [])) for r in rows],
        next_before_round=next_before,
    )


def get_round(manager: RoundManager, number: int) -> pb.RoundInfo:
    row = manager.state.round(number)
    if row is None:
        raise RoundError(grpc.StatusCode.NOT_FOUND, f"round {number} does not exist")
    return round_info(manager, row)


def start_round(manager: RoundManager, request: pb.StartRoundRequest, actor: str) -> pb.RoundInfo:
    with refusals_audited("round start", actor, force=request.force):
        if not 0 <= request.timeout_seconds <= 7 * 86400:
            raise RoundError(
                grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds must be 0 (configured) to 604800"
            )
        row = manager.start_round(request.timeout_seconds, actor=actor, force=request.force)
    return round_info(manager, row)


def close_round(manager: RoundManager, request: pb.CloseRoundRequest, actor: str) -> pb.RoundInfo:
    with refusals_audited("round close", actor, round=request.round):
        row = manager.close_round(request.round, "closed by operator", actor=actor)
    return round_info(manager, row)


def withdraw(manager: RoundManager, request: pb.WithdrawRoundRequest, actor: str) -> pb.RoundInfo:
    with refusals_audited("round withdrawal", actor, round=request.round):
        row = manager.withdraw_round(request.round, request.reason, actor=actor)
    return round_info(manager, row)


def set_layout(manager: RoundManager, request: pb.SetLayoutRequest, actor: str) -> pb.LayoutReply:
    with refusals_audited("layout pin", actor, replace=request.replace):
        if not request.HasField("layout"):
            raise RoundError(grpc.StatusCode.INVALID_ARGUMENT, "SetLayout needs a layout")
        layout = manager.set_layout(Layout.checked_from_proto(request.layout), request.replace, actor)
    return layout_reply(layout)


def reset_layout(manager: RoundManager, actor: str) -> pb.LayoutReply:
    with refusals_audited("layout reset", actor):
        manager.reset_layout(actor)
    return layout_reply(None)
