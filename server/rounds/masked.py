"""The server's half of a masked round (SecAgg, Bonawitz et al., CCS 2017, §4 and §6).

Specified in docs/spec/masked-round.md.

Phases of an open masked round (``rounds.phase``)::

    enrol    members send signed enrolments (a fresh X25519 key bound to this
             round's nonce); the roster is fixed when every expected member
             enrolled, or at the enrol deadline (fewer than the floor: the round
             fails and nothing was uploaded)            -> ROSTER event
    upload   roster members upload masked ciphertexts, then sign a commit to
             what they uploaded; the server checks each commit against its own
             spool (seeds, blocks) and the member's enrolment key
             every member committed                     -> COMMITS event
    release  members release their self-mask seeds (each checked against the
             commitment in the member's commit); with every seed the server
             subtracts Σ PRG(b_i) from the encrypted sum (§4 "unmasking", no
             key needed) and publishes it with every member's per-block seeds
                                                        -> SUM_READY

The server does not rely on what the members check among themselves (pinned
membership, chain hashes, parameters): a server that lies is refused by the
members. It forms the roster from the enrolments that agree with each other
(:func:`_agreeing`), so that one member with another history cannot make every
honest member refuse the round. What it checks besides is what keeps an honest
server from publishing a sum nobody can use: the
enrolment names the caller's own TLS certificate and is signed by its
certified enrolment key, the commit matches the spooled upload, and the
released seed matches its commitment.

Everything is durable (SQLite ``members``) before it is acknowledged, so a
restart resumes the phase it was in; a round that fails leaves the
self-masks on (nothing released can be differenced: see the node's ledger).
The in-memory records (``MaskState``, ``UploadDigests``) live in ``mask_state``.
A member that leaves (a signed withdrawal) may get the round re-formed without it
(§2.1, ``leaving``); the step deadlines are in ``deadlines`` and the members named for a
failure in ``culprits`` (§10).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cipherhive.ckks.c0_sum import seed_trailer_of
from cipherhive.pki import enrolment_certs
from cipherhive.runtime import failpoints
from cipherhive.runtime.logs import audit, event
from cipherhive.secagg import masking
from cipherhive.secagg.commit import Commit, self_mask_digest, upload_digests
from cipherhive.secagg.roster import Enrolment, RoundBinding, roster_hash
from cipherhive.secagg.wire import WireError, fields
from cipherhive.secagg.withdrawal import REPLACED_ROSTER
from cipherhive.server.ingest.running_sum import MaskedSum
from cipherhive.server.rounds import culprits
from cipherhive.server.rounds.context import OpenRound, RoundContext, Verdict
from cipherhive.server.rounds.errors import RoundError, refuse
from cipherhive.server.rounds.mask_state import Entry, MaskState
from cipherhive.server.storage.rows import RowConflict
from cipherhive.server.storage.spool import read_records
from cipherhive.v1 import federation_pb2 as pb

if TYPE_CHECKING:
    from cipherhive.server.api.identity import Caller
    from cipherhive.server.storage.rows import RoundRow

log = logging.getLogger("cipherhive.server.secagg")

NONCE_BYTES = 32
SEED_BYTES = masking.SEED_BYTES


class _NothingRevoked:
    """Revocation answer for a server started without a CRL (``allow_missing_crl``)."""

    def is_revoked(self, serial: int) -> bool:
        return False


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _check_entry(ctx: RoundContext, who: Caller, number: int, nonce: bytes, data: bytes) -> Entry:
    """An enrolment the caller may make for this round, or a refusal saying why."""
    try:
        entry = Enrolment.decode(data)
    except WireError as exc:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed enrolment ({exc})") from None
    b = entry.binding
    if b.round != number or b.nonce != nonce:
        raise refuse(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the enrolment was made for round {b.round} with another nonce, not round {number}: "
            "enrol again from the round's OPENED event",
        )
    if b.federation != bytes.fromhex(ctx.fingerprint):
        raise refuse(grpc.StatusCode.FAILED_PRECONDITION, "the enrolment is for another federation key")
    if b.block_count != len(ctx.open.running if ctx.open else ()):
        raise refuse(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the enrolment is for {b.block_count} blocks; this federation's layout has "
            f"{len(ctx.open.running if ctx.open else ())}",
        )
    if not who.tls_fingerprint or entry.cert_fingerprint != who.tls_fingerprint:
        raise refuse(
            grpc.StatusCode.PERMISSION_DENIED,
            "the enrolment names another TLS certificate than the one this call came with",
        )
    ca = ctx.ca_certificate()
    revocations = ctx.revocations or _NothingRevoked()
    try:
        ident = enrolment_certs.verify_certificate(entry.certificate, ca, revocations)
    except enrolment_certs.EnrolmentError as exc:
        raise refuse(grpc.StatusCode.PERMISSION_DENIED, f"enrolment certificate refused: {exc}") from None
    if ident.name != who.name or ident.tls_fingerprint != who.tls_fingerprint:
        raise refuse(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the enrolment certificate is {ident.name!r}'s, issued with another TLS certificate; "
            "sign with this member's own NAME.enrol.key",
        )
    if not enrolment_certs.verify_signature(ident.public_key, entry.signature, entry.signed_bytes()):
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, "the enrolment's signature does not verify")
    return Entry(who.name, data, entry.cert_fingerprint, ident.public_key)


def enrol(ctx: RoundContext, who: Caller, request: pb.EnrolRequest) -> pb.EnrolReply:
    """Enrol: record a member's signed enrolment for the open round (idempotent)."""
    with ctx.lock:
        current, mask = open_masked(ctx, request.round)
        if who.name not in ctx.joined:
            raise refuse(grpc.StatusCode.FAILED_PRECONDITION, "join the federation before enrolling")
        previous = mask.enrolled.get(who.name)
        if previous is not None:
            if previous.encoded == request.enrolment:
                return _enrol_reply(current, mask)
            raise refuse(
                grpc.StatusCode.ALREADY_EXISTS,
                f"{who.name!r} already enrolled in round {current.number} with another key; one "
                "enrolment per member per round (a node that lost its key sits this round out)",
            )
        if mask.phase != "enrol":
            raise refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the roster of round {current.number} is already fixed; take part in the next round",
            )
        excluded = culprits.exclusions(ctx, current.number).get(who.name)
        if excluded is not None:
            raise refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{who.name!r} is left out of rounds up to {excluded.excluded_until}: named in round "
                f"{excluded.round} at its {excluded.step} step ({excluded.reason}); the operator can lift "
                f"this with `cipherhive ctl nodes readmit {who.name}`",
            )
        try:
            entry = _check_entry(ctx, who, current.number, mask.nonce, request.enrolment)
        except RoundError as exc:
            if exc.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
                culprits.record(ctx, current.number, who.name, "enrol", exc.message)
            raise
        try:
            ctx.state.add_enrolment(current.number, who.name, request.enrolment)
        except RowConflict:
            raise refuse(grpc.StatusCode.ALREADY_EXISTS, "enrolment already recorded") from None
        mask.enrolled[who.name] = entry
        everyone = set(current.row.expected) <= set(mask.enrolled)
    audit("enrolled", who.name, round=current.number, enrolled=len(mask.enrolled))
    if everyone:
        ctx.wake()
    return _enrol_reply(current, mask)


def _enrol_reply(current: OpenRound, mask: MaskState) -> pb.EnrolReply:
    return pb.EnrolReply(enrolled=len(mask.enrolled), roster_deadline_unix=current.row.enrol_deadline)


def open_masked(ctx: RoundContext, number: int) -> tuple[OpenRound, MaskState]:
    """The open round if it is ``number`` and masked (caller holds the lock)."""
    current = ctx.open
    if current is None or current.closing or current.number != number:
        open_now = current.number if current is not None and not current.closing else 0
        raise refuse(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"round {number} is not open"
            + (f" (round {open_now} is)" if open_now else " (no round is open)"),
        )
    if current.mask is None:
        raise refuse(grpc.StatusCode.FAILED_PRECONDITION, f"round {number} is not a masked round")
    return current, current.mask


def roster_due(current: OpenRound, now: float) -> bool:
    """Fix the roster now: every expected member enrolled, or the enrol deadline passed."""
    mask = current.mask
    if mask is None or mask.phase != "enrol":
        return False
    if now >= current.row.enrol_deadline:
        return True
    waiting = set(current.row.expected) - mask.withdrawn
    # Everyone expected is in, and enough of them: a member that was reconnecting when the round
    # opened (so not expected) may still come within the enrol window to make up the floor.
    enough = len(mask.enrolled) >= max(current.row.min_participants, 2)
    return bool(waiting) and waiting <= set(mask.enrolled) and enough


def fix_roster(ctx: RoundContext, number: int) -> str:
    """Fix the open round's roster; returns "" or why the round must fail instead."""
    with ctx.lock:
        current, mask = open_masked(ctx, number)
        if mask.phase != "enrol":
            return ""
        floor = max(current.row.min_participants or ctx.config.min_participants, 2)
        if len(mask.enrolled) < floor:
            return (
                f"only {len(mask.enrolled)} member(s) enrolled by the enrol deadline and a masked round "
                f"needs {floor}; nothing was uploaded"
            )
        agreeing, left_out = _agreeing(mask.enrolled)
        for name, why in sorted(left_out.items()):
            audit("left out of the roster", name, round=number, reason=why)
        if len(agreeing) < floor:
            return (
                f"only {len(agreeing)} of the {len(mask.enrolled)} enrolled member(s) agree on the round's "
                f"history and parameters and a masked round needs {floor}; nothing was uploaded"
            )
        encoded = sorted(e.encoded for e in agreeing.values())
        digest = roster_hash(encoded, mask.nonce)
        ctx.state.fix_roster(number, sorted(agreeing), digest)
        failpoints.hit("server.roster")  # tests: a crash once the roster is durable, before any upload
        mask.roster = agreeing
        mask.roster_hash = digest
        mask.phase = "upload"
        row = ctx.state.round(number)
        assert row is not None
        current.row = row
    audit("roster fixed", "scheduler", round=number, members=sorted(mask.roster), hash=digest.hex()[:16])
    ctx.bus.publish(roster_event(ctx, current))
    return ""


def _agreeing(enrolled: dict[str, Entry]) -> tuple[dict[str, Entry], dict[str, str]]:
    """The largest set of enrolments that share one binding (chain hash, parameters, aggregator,
    block count), and why each other member is left out.

    Members refuse a roster whose entries disagree (§2); one member enrolling with another
    history (a member that missed a sum, or one that lies) would make every honest member
    refuse, and so fail the round. An honest server puts only the agreeing majority in the
    roster: the members still check everything themselves."""
    groups: dict[RoundBinding, dict[str, Entry]] = {}
    for name, entry in enrolled.items():
        groups.setdefault(Enrolment.decode(entry.encoded).binding, {})[name] = entry
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), sorted(kv[1])))
    binding, agreeing = ranked[0]
    left_out = {}
    for other, members in ranked[1:]:
        differs = [
            what
            for what, mine, theirs in (
                ("chain hash (applied sums)", binding.chain_hash, other.chain_hash),
                ("parameters", binding.params_id, other.params_id),
                ("aggregator name", binding.aggregator, other.aggregator),
                ("block count", binding.block_count, other.block_count),
            )
            if mine != theirs
        ]
        for name in members:
            left_out[name] = (
                f"its enrolment's {', '.join(differs) or 'binding'} differs from the other "
                f"{len(agreeing)} members': catch up, or check its configuration"
            )
    return agreeing, left_out


def roster_event(ctx: RoundContext, current: OpenRound) -> pb.RoundEvent:
    assert current.mask is not None
    ev = ctx.event(pb.RoundEvent.ROSTER, current.row)
    ev.roster.extend(e.encoded for e in current.mask.ordered())
    return ev


def commits_event(ctx: RoundContext, current: OpenRound) -> pb.RoundEvent:
    assert current.mask is not None
    ev = ctx.event(pb.RoundEvent.COMMITS, current.row)
    ev.roster.extend(e.encoded for e in current.mask.ordered())
    ev.commits.extend(current.mask.commits[e.node].encode() for e in current.mask.ordered())
    return ev


def check_upload(current: OpenRound, node: str, header: pb.SubmitHeader) -> None:
    """A masked round takes uploads only from its roster, masked for its roster (caller holds the lock)."""
    mask = current.mask
    if mask is None:
        return
    if mask.phase == "enrol":
        raise refuse(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"round {current.number} is still enrolling; upload after its ROSTER event",
        )
    if node not in mask.roster:
        raise refuse(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{node!r} is not in the roster of round {current.number}; a masked round takes uploads "
            "only from the members it enrolled",
        )
    if mask.phase != "upload":
        raise refuse(grpc.StatusCode.FAILED_PRECONDITION, f"round {current.number} no longer takes uploads")
    if header.roster_hash in mask.superseded:
        # Masked before the member saw the re-formed roster: it still holds its key, so it masks
        # again for the new one (§2.1); nothing of this upload was added.
        raise refuse(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the update was {REPLACED_ROSTER}: round {current.number} was re-formed; take its new "
            "roster and mask again",
        )
    if header.roster_hash != mask.roster_hash:
        raise refuse(
            grpc.StatusCode.FAILED_PRECONDITION,
            "the update was masked for another roster than this round's; nothing was added",
        )


def submit_commit(ctx: RoundContext, who: Caller, request: pb.CommitRequest) -> pb.CommitReply:
    """SubmitCommit: check a member's signed commit against its spooled upload and record it.

    The last commit and the move to the release phase are one transaction, and a resent
    commit re-checks whether every member has committed, so no crash leaves a round holding
    every commit but never announcing COMMITS (README, "Masked rounds", step 5)."""
    with ctx.lock:
        current, mask = open_masked(ctx, request.round)
        entry = mask.roster.get(who.name)
        if entry is None:
            raise refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who.name!r} is not in the roster of round {current.number}",
            )
        previous = mask.commits.get(who.name)
        if previous is not None and previous.encode() != request.commit:
            raise refuse(
                grpc.StatusCode.ALREADY_EXISTS, "a different commit is already recorded for this member"
            )
        commit = previous
        if previous is None:
            sub = current.accepted.get(who.name)
            if sub is None or sub.spool_file is None:
                raise refuse(
                    grpc.StatusCode.FAILED_PRECONDITION, "commit after the upload's receipt, not before"
                )
            spool_file = sub.spool_file
            roster_digest = mask.roster_hash
            hashed = current.digests.get(who.name)
    if commit is None:
        try:
            commit = _checked_commit(ctx, request.commit, entry, roster_digest, hashed, spool_file)
        except RoundError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                culprits.record(ctx, current.number, who.name, "commit", exc.message)
            raise
    with ctx.lock:
        current, mask = open_masked(ctx, request.round)
        new = who.name not in mask.commits
        everyone = set(mask.roster) <= set(mask.commits) | {who.name} and mask.phase == "upload"
        if new:
            phase = "release" if everyone else None
            ctx.state.set_commit(current.number, who.name, request.commit, phase=phase)
            mask.commits[who.name] = commit
        elif everyone:
            ctx.state.set_phase(current.number, "release")
        if everyone:
            failpoints.hit("server.committed")  # tests: a crash once the release phase is durable
            mask.phase = "release"
            mask.release_started = time.time()
            row = ctx.state.round(current.number)
            assert row is not None
            current.row = row
        committed = len(mask.commits)
    if new:
        audit("commit accepted", who.name, round=current.number, committed=committed)
    if everyone:
        audit("every member committed", "scheduler", round=current.number, members=committed)
        ctx.bus.publish(commits_event(ctx, current))
    return pb.CommitReply(committed=committed)


def _checked_commit(
    ctx: RoundContext,
    raw: bytes,
    entry: Entry,
    roster_digest: bytes,
    hashed: tuple[bytes, bytes] | None,
    spool_file: str,
) -> Commit:
    """Decode a member's commit and check it against its roster entry and acknowledged upload."""
    try:
        commit = Commit.decode(raw)
    except WireError as exc:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed commit ({exc})") from None
    if commit.roster_hash != roster_digest or commit.cert_fingerprint != entry.cert_fingerprint:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, "the commit is for another roster or another member")
    if not enrolment_certs.verify_signature(entry.enrol_key, commit.signature, commit.signed_bytes()):
        raise refuse(
            grpc.StatusCode.INVALID_ARGUMENT, "the commit is not signed by this member's enrolment key"
        )
    try:
        seeds_hash, blocks_hash = hashed or upload_digests(read_records(ctx.spool.path(spool_file)))
    except (masking.MaskError, ValueError) as exc:
        raise refuse(
            grpc.StatusCode.FAILED_PRECONDITION, f"the spooled upload cannot be read: {exc}"
        ) from None
    if (commit.seeds_hash, commit.c0_hash) != (seeds_hash, blocks_hash):
        raise refuse(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the commit does not match the upload this server acknowledged (seeds or blocks differ)",
        )
    return commit


def release_seed(ctx: RoundContext, who: Caller, request: pb.ReleaseRequest) -> pb.ReleaseReply:
    """ReleaseSeed: record a member's self-mask seed once it matches its commitment."""
    with ctx.lock:
        current, mask = open_masked(ctx, request.round)
        if who.name not in mask.roster:
            raise refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who.name!r} is not in the roster of round {current.number}",
            )
        previous = mask.seeds.get(who.name)
        if previous is not None:
            if previous == request.seed:
                return pb.ReleaseReply(released=len(mask.seeds))
            raise refuse(
                grpc.StatusCode.ALREADY_EXISTS, "a different seed is already recorded for this member"
            )
        if mask.phase != "release":
            raise refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {current.number} is not releasing yet: not every member has committed",
            )
        if (
            len(request.seed) != SEED_BYTES
            or self_mask_digest(request.seed) != mask.commits[who.name].self_mask_hash
        ):
            why = "the seed does not match the self-mask commitment in this member's commit"
            culprits.record(ctx, current.number, who.name, "release", why)
            raise refuse(grpc.StatusCode.INVALID_ARGUMENT, why)
        ctx.state.set_seed(current.number, who.name, request.seed)
        failpoints.hit("server.released")  # tests: a crash once a self-mask seed is durable
        mask.seeds[who.name] = request.seed
        released = len(mask.seeds)
        everyone = set(mask.roster) <= set(mask.seeds)
    audit("self-mask released", who.name, round=current.number, released=released)
    if everyone:
        ctx.wake()
    return pb.ReleaseReply(released=released)


def complete(current: OpenRound) -> bool:
    """Every roster member released its seed: the sum can be unmasked and published."""
    mask = current.mask
    return mask is not None and mask.phase == "release" and set(mask.roster) <= set(mask.seeds)


def failure(current: OpenRound) -> Verdict:
    """Why an incomplete masked round fails at its deadline: the step it stopped at and who
    had not done it (docs/spec/masked-round.md §10)."""
    mask = current.mask
    assert mask is not None
    if mask.phase == "enrol":
        return Verdict("enrol", f"the roster was never fixed ({len(mask.enrolled)} enrolled)")
    if mask.phase == "upload":
        missing = mask.missing(set(current.accepted))
        if missing:
            return Verdict(
                "upload",
                f"{', '.join(missing)} did not upload by the round's deadline; no self-mask was released",
                tuple(missing),
            )
        late = mask.missing(mask.commits)
        return Verdict("commit", f"{', '.join(late)} did not commit; no self-mask was released", tuple(late))
    missing = mask.missing(mask.seeds)
    return Verdict(
        "release", f"{', '.join(missing)} withheld the self-mask seed; the sum stays masked", tuple(missing)
    )


def unmask(current: OpenRound) -> None:
    """Subtract Σ PRG(b_i) from every block of the running sum (SecAgg §4, unmasking)."""
    mask = current.mask
    assert mask is not None
    assert isinstance(current.running, MaskedSum), "a masked round sums c0 alone"
    current.running.remove_self_masks([mask.seeds[e.node] for e in mask.ordered()])


def seed_records(ctx: RoundContext, current: OpenRound) -> Iterator[bytes]:
    """Per block, every member's upload seed in pair order: what nodes check c1 against."""
    mask = current.mask
    assert mask is not None
    streams = []
    for e in mask.ordered():
        sub = current.accepted[e.node]
        assert sub.spool_file is not None
        streams.append(read_records(ctx.spool.path(sub.spool_file)))
    for blobs in zip(*streams, strict=True):
        yield fields(*(seed_trailer_of(b) for b in blobs))


def restore(ctx: RoundContext, current: OpenRound) -> None:
    """After a restart: the open masked round's members, commits and seeds, from the database."""
    row = current.row
    assert row.nonce is not None
    mask = MaskState(row.nonce, row.phase or "enrol", roster_hash=row.roster_hash or b"")
    for member in ctx.state.members(row.round):
        entry = Enrolment.decode(member.enrolment)
        # Verified when it enrolled; only the key is needed again (to check its commit).
        key = x509.load_der_x509_certificate(entry.certificate).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        kept = Entry(member.node, member.enrolment, entry.cert_fingerprint, key)
        mask.enrolled[member.node] = kept
        if member.in_roster:
            mask.roster[member.node] = kept
        if member.commit is not None:
            mask.commits[member.node] = Commit.decode(member.commit)
        if member.seed is not None:
            mask.seeds[member.node] = member.seed
    mask.reformed = bool(row.reformed)
    if mask.phase == "release":
        mask.release_started = ctx.started
    current.mask = mask
    event(log, "resumed masked round", round=row.round, phase=mask.phase, enrolled=len(mask.enrolled))


def proof(ctx: RoundContext, number: int) -> pb.RoundProof:
    """GetRoundProof: the roster and commits of a published masked round."""
    row = ctx.state.round(number)
    if row is None:
        raise refuse(grpc.StatusCode.NOT_FOUND, f"round {number} does not exist")
    if not row.masked or row.nonce is None:
        raise refuse(grpc.StatusCode.FAILED_PRECONDITION, f"round {number} was not masked")
    if row.state not in ("sum_ready", "withdrawn"):
        raise refuse(
            grpc.StatusCode.FAILED_PRECONDITION, f"round {number} has no published sum ({row.state})"
        )
    members = ctx.state.members(number, roster_only=True)
    ordered = sorted(members, key=lambda r: Enrolment.decode(r.enrolment).cert_fingerprint)
    return pb.RoundProof(
        round=number,
        nonce=row.nonce,
        roster=[r.enrolment for r in ordered],
        commits=[r.commit for r in ordered if r.commit is not None],
    )


def progress(ctx: RoundContext, row: RoundRow, info: pb.RoundInfo) -> None:
    """How far a masked round got, for the operator: counts only, never what was sent."""
    with ctx.lock:
        current = ctx.open if ctx.open is not None and ctx.open.number == row.round else None
        if current is not None and current.mask is not None:
            mask = current.mask
            info.enrolled, info.committed, info.released = (
                len(mask.enrolled),
                len(mask.commits),
                len(mask.seeds),
            )
            return
    members = ctx.state.members(row.round, roster_only=row.state != "open")
    info.enrolled = len(members)
    info.committed = sum(r.commit is not None for r in members)
    info.released = len(members) if row.state in ("sum_ready", "withdrawn") else 0
