"""Round lifecycle: open, accept uploads into the running sum, close, publish or fail.

One lock (``self.context.lock``) guards the open round, its running sum and the set
of uploads in flight, so that closing a round and adding a block can never
interleave: a close rolls back every upload still in flight before the sum
is written, and an upload that finds its round closing stops.

The participation floor lives here: a sum is written and announced only when
at least the floor the round *opened with* (stored in its row, so a restart
with a lower setting cannot lower it) of distinct nodes' uploads were accepted;
otherwise the round fails and its spool is deleted unread.

A node is online, and expected in the next round, only after a successful
Join in this server's lifetime and while it keeps a watch stream open; one
that missed ``missed_rounds_limit`` rounds in a row is not expected until it
submits again, so an absent member cannot stretch every round to its timeout.
Withdrawal, outcome reports and pruning live in ``withdrawal``; the pinned
layout in ``pinning``. Those and the other satellite modules get this manager's
:class:`~cipherhive.server.rounds.context.RoundContext` (and the manager itself only
as a ``RoundControl``), so none of them imports this module.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509

from cipherhive.ckks import c0_sum, codec
from cipherhive.federation.layout import Layout
from cipherhive.pki import enrolment_certs
from cipherhive.runtime import failpoints
from cipherhive.runtime.logs import audit
from cipherhive.server import metrics as server_metrics
from cipherhive.server.config import ServerConfig
from cipherhive.server.ingest.running_sum import MaskedSum, RunningSum
from cipherhive.server.ingest.workers import (
    IngestWorkers,
    ShardedSum,
    WorkerLost,
    shared_memory_free,
)
from cipherhive.server.rounds import (
    culprits,
    leaving,
    masked,
    pinning,
    recovery,
    replay,
    scheduler,
    withdrawal,
)
from cipherhive.server.rounds.context import OpenRound, RoundContext, Upload, Verdict
from cipherhive.server.rounds.errors import RoundError
from cipherhive.server.rounds.events import EventBus
from cipherhive.server.rounds.mask_state import MaskState, UploadDigests
from cipherhive.server.storage.rows import OffenceRow, RoundRow, RowConflict, SubmissionRow
from cipherhive.server.storage.spool import Spool
from cipherhive.server.storage.store import RoundStore
from cipherhive.v1 import federation_pb2 as pb

if TYPE_CHECKING:
    from cipherhive.server.api.identity import Caller

log = logging.getLogger("cipherhive.server.rounds")

#: Chunks of one upload with the ingest workers at a time (each ~1 MB in the spool, not in memory).
CHUNKS_IN_FLIGHT = 4

STATE_NAMES = {
    "open": pb.ROUND_OPEN,
    "sum_ready": pb.ROUND_SUM_READY,
    "failed": pb.ROUND_FAILED,
    "withdrawn": pb.ROUND_WITHDRAWN,
}
# OpenRound and Upload live in ``context`` (the satellites need them without importing this
# module); they are re-exported here for the code that imported them from the manager.
__all__ = ["STATE_NAMES", "OpenRound", "RoundError", "RoundManager", "Upload"]


class RoundManager:
    def __init__(
        self,
        config: ServerConfig,
        state: RoundStore,
        spool: Spool,
        public: codec.ServerCodec,
        fingerprint: str,
    ) -> None:
        #: The round state this manager shares with its satellite modules (``context``); the
        #: stores and settings below are the context's, not copies.
        self.context = RoundContext(config, state, spool, public, fingerprint, EventBus())
        #: Worker processes that own stripes of a masked sum's blocks (None: add in-process).
        self.ingest: IngestWorkers | None = None
        self.parse_slots = threading.BoundedSemaphore(max(2, len(os.sched_getaffinity(0))))
        key = state.get_meta("receipt_key")
        if key is None:
            key = secrets.token_hex(32)
            state.set_meta("receipt_key", key)
        self._receipt_key = bytes.fromhex(key)
        pinning.pin_configured(self.context)
        self.optimizer = pinning.pin_optimizer(self.context)

    @property
    def config(self) -> ServerConfig:
        return self.context.config

    @property
    def state(self) -> RoundStore:
        return self.context.state

    @property
    def spool(self) -> Spool:
        return self.context.spool

    @property
    def codec(self) -> codec.ServerCodec:
        return self.context.codec

    @property
    def fingerprint(self) -> str:
        return self.context.fingerprint

    @property
    def bus(self) -> EventBus:
        return self.context.bus

    @property
    def revocations(self) -> enrolment_certs.RevocationCheck | None:
        """Revocations for enrolment certificates (set by the daemon; None: no CRL configured)."""
        return self.context.revocations

    @revocations.setter
    def revocations(self, check: enrolment_certs.RevocationCheck | None) -> None:
        self.context.revocations = check

    @property
    def _open(self) -> OpenRound | None:
        """The open round (tests read it to look at the running sum)."""
        return self.context.open

    @property
    def masked(self) -> bool:
        """Rounds are masked (docs/spec/masked-round.md): configured so, and certificates to enrol
        with exist."""
        return self.config.masked and not self.config.insecure

    def ca_certificate(self) -> x509.Certificate:
        """The federation CA (loaded once): enrolment certificates must chain to it."""
        return self.context.ca_certificate()

    # ------------------------------------------------------------ federation

    def new_sum(self, num_blocks: int, *, masked: bool) -> RunningSum | MaskedSum:
        """A round's empty running sum: Σ c0 without SEAL when masked (cipherhive.ckks.c0_sum)."""
        if masked:
            assert isinstance(self.codec, codec.PublicCodec), "masked rounds need the product's codec"
            if self.ingest is not None:
                need = num_blocks * c0_sum.RECORD_BYTES
                free = shared_memory_free()
                if free >= need + need // 16:
                    return self.ingest.attach(num_blocks)
                # Writing past a full /dev/shm would kill the server (SIGBUS), so add in-process.
                log.warning(
                    "the ingest workers' shared sum needs %d MB of /dev/shm and %d MB are free: adding "
                    "in the server process this round (give the server more shared memory, e.g. "
                    "compose shm_size or a memory emptyDir on /dev/shm)",
                    need >> 20,
                    free >> 20,
                )
            return MaskedSum(self.codec.upload_parser(), num_blocks)
        return RunningSum(self.codec, num_blocks)

    def layout(self) -> Layout | None:
        """The pinned layout (parsed once per change: it is read on every upload)."""
        return self.context.layout()

    def set_layout(self, layout: Layout, replace: bool = False, actor: str = "operator") -> Layout:
        return pinning.set_layout(self.context, layout, replace, actor)

    def reset_layout(self, actor: str = "operator") -> None:
        pinning.reset_layout(self.context, actor)

    def report_outcome(self, node: str, number: int, applied: bool, reason: str) -> bool:
        return withdrawal.report_outcome(self.context, self, node, number, applied, reason)

    def withdraw_round(self, number: int, reason: str, actor: str = "operator") -> RoundRow:
        return withdrawal.withdraw_round(self.context, self, number, reason, actor)

    def settings(self) -> pb.FederationSettings:
        layout = self.layout()
        return pb.FederationSettings(
            key_fingerprint=self.fingerprint,
            encoding=pb.EncodingParams(
                poly_modulus_degree=codec.POLY_MODULUS_DEGREE,
                coeff_mod_bit_sizes=list(codec.COEFF_MOD_BIT_SIZES),
                scale_bits=codec.SCALE_BITS,
                values_per_ciphertext=self.codec.values_per_block,
            ),
            min_participants=self.config.min_participants,
            round_timeout_seconds=self.config.timeout_seconds,
            weight_unit=self.config.weight_unit,
            max_ciphertexts_per_chunk=self.config.max_ciphertexts_per_chunk,
            layout_hash=layout.hash if layout else "",
            max_participants=self.config.max_participants,
            oldest_kept_round=self.state.oldest_kept_round(),
            optimizer=self.optimizer.to_proto(),
            privacy=self.config.privacy_schedule().for_layout(layout.num_params if layout else 0).to_proto(),
            masked=self.masked,
        )

    # ------------------------------------------------------------ masked rounds (``masked``)

    def enrol(self, who: Caller, request: pb.EnrolRequest) -> pb.EnrolReply:
        return masked.enrol(self.context, who, request)

    def submit_commit(self, who: Caller, request: pb.CommitRequest) -> pb.CommitReply:
        return masked.submit_commit(self.context, who, request)

    def release_seed(self, who: Caller, request: pb.ReleaseRequest) -> pb.ReleaseReply:
        return masked.release_seed(self.context, who, request)

    def withdraw(self, who: Caller, request: pb.WithdrawRequest) -> pb.WithdrawReply:
        return leaving.withdraw(self.context, who, request)

    def readmit(self, node: str, actor: str = "operator") -> None:
        culprits.readmit(self.context, node, actor)

    def standing(self, node: str) -> tuple[list[OffenceRow], OffenceRow | None]:
        """A member's offences that count for the next round, and the one excluding it."""
        return culprits.standing(self.context, node, self.state.latest_round() + 1)

    def round_proof(self, number: int) -> pb.RoundProof:
        return masked.proof(self.context, number)

    def masked_progress(self, row: RoundRow, info: pb.RoundInfo) -> None:
        """Fill ``info`` with how far a masked round got (counts only)."""
        masked.progress(self.context, row, info)

    def join(self, node: str, fingerprint: str, layout: Layout) -> None:
        """Admit a node whose key and layout match the federation's."""
        if fingerprint != self.fingerprint:
            raise RoundError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"key fingerprint {fingerprint[:16]}… does not match the federation's "
                f"{self.fingerprint[:16]}…: this node holds another federation's secret context",
            )
        if not layout.tensors or layout.num_params == 0:
            raise RoundError(grpc.StatusCode.INVALID_ARGUMENT, "layout has no tensors")
        with self.context.lock:
            current = self.layout()
            if current is None:
                # UNAVAILABLE, not FAILED_PRECONDITION: the node is right to keep trying, since
                # nodes are usually started before (or while) the operator pins the layout.
                raise RoundError(
                    grpc.StatusCode.UNAVAILABLE, pinning.NOT_PINNED + "; this node will retry until then"
                )
            pinning.check_joining(current, layout)
            self.context.joined.add(node)
            server_metrics.NODES_ONLINE.set(len(self.online()))
        self.state.touch_node(node)
        self.context.wake()

    # ------------------------------------------------------------ presence

    def watcher_enter(self, node: str) -> None:
        with self.context.lock:
            self.context.watchers[node] += 1
            server_metrics.NODES_ONLINE.set(len(self.online()))
        self.state.touch_node(node)
        self.context.wake()

    def watcher_exit(self, node: str) -> None:
        with self.context.lock:
            self.context.watchers[node] -= 1
            if self.context.watchers[node] <= 0:
                del self.context.watchers[node]
                self.context.absent_since[node] = time.time()
            server_metrics.NODES_ONLINE.set(len(self.online()))
        self.state.touch_node(node)

    def online(self) -> list[str]:
        """Joined and watching: a watch stream alone does not make a member online."""
        return self.context.online()

    def expected_nodes(self) -> list[str]:
        """Online nodes that have not missed ``missed_rounds_limit`` rounds in a row and are not
        excluded for an offence (docs/spec/masked-round.md §10)."""
        missed = self.state.missed_rounds()
        limit = self.config.missed_rounds_limit
        excluded = culprits.exclusions(self.context, self.state.latest_round() + 1)
        return [n for n in self.online() if missed.get(n, 0) < limit and n not in excluded]

    # ------------------------------------------------------------ rounds

    def open_round_number(self) -> int:
        with self.context.lock:
            return self.context.open.number if self.context.open else 0

    def open_row(self) -> RoundRow | None:
        """The open round's row, unless it is closing."""
        return self.context.open_row()

    def start_round(self, timeout: float = 0.0, actor: str = "scheduler", force: bool = False) -> RoundRow:
        """Open a round on the latest published, not withdrawn round.

        Refused with fewer online nodes than the floor unless ``force``: such a round
        could only fail, after holding every upload for its whole timeout.
        """
        layout = self.layout()
        if layout is None:
            raise RoundError(grpc.StatusCode.FAILED_PRECONDITION, pinning.NOT_PINNED)
        floor = self.config.min_participants
        with self.context.lock:
            if self.context.open is not None:
                raise RoundError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"round {self.context.open.number} is still open; close it first",
                )
            online = self.online()
            if len(online) < floor and not force:
                raise RoundError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"only {len(online)} node(s) are online (joined and watching) and a round needs "
                    f"{floor} to publish a sum; start more nodes, or pass --force to open it anyway",
                )
            now = time.time()
            duration = timeout or self.config.timeout_seconds
            deadline = now + duration
            nonce = masked.new_nonce() if self.masked else None
            row = self.state.open_round(
                self.state.latest_sum_round(),
                deadline,
                self.expected_nodes(),
                min_participants=floor,
                nonce=nonce,
                enrol_deadline=now + min(self.config.enrol_seconds, duration / 2),
            )
            self.context.open = OpenRound(
                row,
                self.new_sum(self.context.blocks(layout.num_values), masked=nonce is not None),
                layout.num_values,
                mask=MaskState(nonce, "enrol") if nonce is not None else None,
            )
        audit(
            "round opened",
            actor,
            round=row.round,
            base_round=row.base_round,
            expected=len(row.expected),
            min_participants=floor,
            forced=force,
            masked=nonce is not None,
            deadline=round(deadline, 3),
        )
        server_metrics.ROUNDS.labels("opened").inc()
        self.bus.publish(self.context.event(pb.RoundEvent.OPENED, row))
        return row

    def recover(self) -> None:
        """After a restart: drop unacknowledged uploads, rebuild the open round's sum."""
        opened = recovery.recover(self.context, self)
        if opened is not None:
            self.context.open = opened

    def close_round(
        self,
        number: int,
        reason: str,
        actor: str = "scheduler",
        *,
        fail_reason: str = "",
        verdict: Verdict | None = None,
    ) -> RoundRow:
        """Close the open round: publish its sum if enough nodes are in, else fail it.

        The floor is the one the round opened with. ``fail_reason`` fails the round
        whatever its participants (its base was withdrawn): its spool is deleted unread.
        A ``verdict`` (a step deadline, a withdrawal) fails it too, naming the step and the
        members it is charged to (docs/spec/masked-round.md §10).
        """
        with self.context.lock:
            current = self.context.open
            if current is None or current.number != number or current.closing:
                row = self.state.round(number)
                if row is None:
                    raise RoundError(grpc.StatusCode.NOT_FOUND, f"round {number} does not exist")
                raise RoundError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"round {number} is not open (it is {row.state})",
                )
            current.closing = True
            for upload in list(current.uploads.values()):
                self._rollback(current, upload, "the round closed before the upload finished")
                audit(
                    "submission refused",
                    upload.node,
                    round=number,
                    submission=upload.submission_id,
                    reason="the round closed before the upload finished",
                )
            rolled_back = list(current.uploads_aborted)
            current.uploads_aborted.clear()
        # Chunks still with the ingest workers are waited for, then taken off the sum.
        for upload in rolled_back:
            self._drain_quietly(current, upload)
        with self.context.lock:
            accepted = dict(current.accepted)
        participants = len(accepted)
        floor = max(current.row.min_participants or self.config.min_participants, 2)
        base = self.state.round(current.row.base_round) if current.row.base_round else None
        if not fail_reason and base is not None and base.state == "withdrawn":
            fail_reason = f"it builds on round {base.round}, which was withdrawn: {base.withdrawn_reason}"
        cut_short = bool(fail_reason)  # its base was withdrawn, or no roster formed: nobody's miss
        if verdict is not None and not fail_reason:
            fail_reason = verdict.reason
        publish = participants >= floor and not fail_reason
        if current.mask is not None and not fail_reason:
            # A masked sum is usable only with every roster member's upload and seed in it.
            publish = masked.complete(current)
            if not publish:
                verdict = masked.failure(current)
                fail_reason = verdict.reason
            participants = len(current.mask.roster) if publish else participants
        self.bus.publish(
            self.context.event(pb.RoundEvent.CLOSED, current.row, reason=reason, participants=participants)
        )
        if publish:

            def blocks() -> Iterator[bytes]:
                for blob in current.running.serialized():
                    yield blob
                    failpoints.hit("server.publishing")

            try:
                if current.mask is not None:
                    if not current.unmasked:
                        masked.unmask(current)
                        current.unmasked = True
                    self.spool.write_seeds(number, masked.seed_records(self.context, current))
                sum_file, size = self.spool.write_sum(number, blocks())
            except BaseException:
                with self.context.lock:
                    current.closing = False  # the scheduler retries the close
                raise
            failpoints.hit("server.published")
            self.state.finish_round(
                number,
                state="sum_ready",
                reason=reason,
                participants=participants,
                sum_file=sum_file,
                num_ciphertexts=len(current.running),
                num_values=current.num_values,
            )
            audit(
                "round closed",
                actor,
                round=number,
                participants=participants,
                reason=reason,
                sum_bytes=size,
            )
            kind = pb.RoundEvent.SUM_READY
            server_metrics.ROUNDS.labels("published").inc()
        else:
            reason = fail_reason or (
                f"only {participants} of the required {floor} nodes submitted ({reason}); no sum is released"
            )
            named = verdict.culprits if verdict is not None else ()
            step = verdict.step if verdict is not None else ""
            # A member already named in this round (a refused step, a withdrawal) keeps that offence,
            # which says why; the round's record names it all the same.
            already = {o.node for o in self.state.offences(since_round=number - 1) if o.round == number}
            fresh = [n for n in named if n not in already]
            offences = culprits.offence_rows(self.context, number, fresh, step, reason) if fresh else []
            self.state.finish_round(
                number,
                state="failed",
                reason=reason,
                participants=participants,
                failed_step=step,
                culprits=named,
                offences=offences,
            )
            audit(
                "round failed",
                actor,
                round=number,
                participants=participants,
                reason=reason,
                step=step,
                culprits=",".join(named),
            )
            for offence in offences:
                culprits.announce(offence)
            kind = pb.RoundEvent.FAILED
            server_metrics.ROUNDS.labels("failed").inc()
        server_metrics.ROUND_SECONDS.observe(max(0.0, time.time() - current.row.opened))
        self.spool.drop_round(number)
        if current.mask is not None:
            self.state.forget_members(number, keep_proof=kind == pb.RoundEvent.SUM_READY)
        if not cut_short:
            self.state.record_missed(number, current.row.expected, set(accepted))
        with self.context.lock:
            self.context.open = None
            self.context.last_closed = time.time()
        if isinstance(current.running, ShardedSum):
            current.running.release()
        row = self.state.round(number)
        assert row is not None
        self.bus.publish(self.context.event(kind, row))
        if kind == pb.RoundEvent.SUM_READY:
            withdrawal.prune_sums(self.context)
        self.context.wake()
        return row

    # ------------------------------------------------------------ uploads

    def begin_upload(self, node: str, header: pb.SubmitHeader) -> tuple[OpenRound, Upload] | pb.SubmitReceipt:
        """Check a header against the open round; a retry gets its first receipt back."""
        layout = self.layout()
        with self.context.lock:
            current = self.context.open
            previous = self.state.submission(header.round, node)
            if previous is not None:
                if previous.submission_id == header.submission_id:
                    server_metrics.SUBMISSIONS.labels("duplicate").inc()
                    return self._receipt(previous, duplicate=True)
                raise RoundError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"node {node!r} already submitted to round {header.round} "
                    f"(submission {previous.submission_id}); one update per node per round",
                )
            if current is None or current.closing or current.number != header.round:
                open_now = current.number if current and not current.closing else 0
                raise RoundError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"round {header.round} is not open for submissions "
                    + (f"(round {open_now} is)" if open_now else "(no round is open)"),
                )
            if header.base_round != current.row.base_round:
                raise RoundError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"update starts from round {header.base_round} but round {current.number} "
                    f"builds on round {current.row.base_round}: catch up before submitting",
                )
            if header.key_fingerprint != self.fingerprint:
                raise RoundError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "key fingerprint differs from the federation's; nothing was added",
                )
            if layout is None or header.layout_hash != layout.hash:
                raise RoundError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "layout hash differs from the federation's; join again with the federation's model",
                )
            masked.check_upload(current, node, header)
            expected_cts = len(current.running)
            if header.num_values != current.num_values or header.num_ciphertexts != expected_cts:
                raise RoundError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"header announces {header.num_values} values in {header.num_ciphertexts} "
                    f"ciphertexts; the layout needs {current.num_values} in {expected_cts}",
                )
            if node in current.uploads:
                raise RoundError(
                    grpc.StatusCode.ABORTED,
                    f"another upload from {node!r} to round {current.number} is in progress; "
                    "retry with the same submission id once it ends",
                )
            upload = Upload(node, header.submission_id, self.spool.writer(current.number, node))
            if current.mask is not None:
                upload.digests = UploadDigests()
            current.uploads[node] = upload
            return current, upload

    def add_block(self, current: OpenRound, upload: Upload, blob: bytes, ct: Any) -> None:
        """Spool and add one validated ciphertext of an upload."""
        with self.context.lock:
            if upload.aborted is not None:
                raise RoundError(grpc.StatusCode.ABORTED, upload.aborted)
            upload.writer.append(blob)
            current.running.add(upload.added, ct)
            upload.added += 1
        failpoints.hit("server.upload")

    def add_spooled(self, current: OpenRound, upload: Upload, blobs: Sequence[bytes], first: int) -> float:
        """Spool one chunk and send its blocks to the ingest workers that own them.

        The chunk is not waited for: at most :data:`CHUNKS_IN_FLIGHT` chunks of an upload
        are with the workers, and :meth:`finish_upload` waits for the rest before anything
        is acknowledged. A block a worker refused fails the upload at its next chunk or
        at its end. The workers' CPU seconds add up in ``upload.busy``.
        """
        running = current.running
        assert isinstance(running, ShardedSum)
        with self.context.lock:
            if upload.aborted is not None:
                raise RoundError(grpc.StatusCode.ABORTED, upload.aborted)
            items = [(first + i, *upload.writer.append(blob)) for i, blob in enumerate(blobs)]
            upload.spooled.extend((offset, length) for _, offset, length in items)
            upload.writer.flush()
            upload.pending.append(
                running.submit("add", upload.key(current.number), str(upload.writer.partial), items)
            )
        if upload.digests is not None:
            for blob in blobs:
                upload.digests.update(blob)  # the seeds; the workers hash the blocks
        self._drain(current, upload, keep=CHUNKS_IN_FLIGHT)
        if upload.failed:
            raise RoundError(grpc.StatusCode.INVALID_ARGUMENT, upload.failed)
        failpoints.hit("server.upload")
        return 0.0

    def _drain(self, current: OpenRound, upload: Upload, keep: int = 0) -> None:
        """Wait for an upload's oldest chunks until ``keep`` are left with the workers, and record
        what they added; the last one of an aborted upload also undoes it. Any thread may call it."""
        while True:
            with upload.settling:
                if len(upload.pending) <= keep:
                    return
                futures = upload.pending[0]
                try:
                    outcomes = [f.result() for f in futures]
                except WorkerLost as exc:
                    raise RoundError(
                        grpc.StatusCode.UNAVAILABLE, f"{exc}; the server is restarting, send the upload again"
                    ) from None
                with self.context.lock:
                    upload.pending.popleft()
                    for outcome in outcomes:
                        upload.busy += outcome.busy
                        upload.added_blocks.extend(outcome.done)
                        if upload.digests is not None:
                            upload.digests.blocks.update(zip(outcome.done, outcome.digests, strict=True))
                        upload.failed = upload.failed or outcome.error
                    upload.added = len(upload.added_blocks)
                    if upload.aborted is not None and not upload.pending and not upload.accepted:
                        self._undo(current, upload)  # rolled back while the workers had its chunks

    def _drain_quietly(self, current: OpenRound, upload: Upload) -> None:
        try:
            self._drain(current, upload)
        except RoundError as exc:
            log.warning("upload of %s not rolled back: %s", upload.node, exc.message)

    def finish_upload(
        self, current: OpenRound, upload: Upload, metrics: dict[str, float]
    ) -> pb.SubmitReceipt:
        """Make the upload durable, then count it: only now is it acknowledged."""
        if upload.pending:
            self._drain(current, upload)  # every block added (or refused) before anything else
        if upload.failed:
            raise RoundError(grpc.StatusCode.INVALID_ARGUMENT, upload.failed)
        spool_file = upload.writer.commit()
        now = time.time()
        row = SubmissionRow(
            round=current.number,
            node=upload.node,
            submission_id=upload.submission_id,
            receipt=self._receipt_token(current.number, upload.node, upload.submission_id),
            accepted=now,
            num_bytes=upload.writer.num_bytes,
            spool_file=spool_file,
            metrics=metrics,
        )
        with self.context.lock:
            if upload.aborted is not None:
                raise RoundError(grpc.StatusCode.ABORTED, upload.aborted)
            try:
                self.state.accept_submission(row)
            except RowConflict as exc:
                raise RoundError(grpc.StatusCode.ALREADY_EXISTS, "submission already recorded") from exc
            current.accepted[upload.node] = row
            final = upload.digests.final(upload.added) if upload.digests is not None else None
            if final is not None:
                current.digests[upload.node] = final
            upload.accepted = True
            del current.uploads[upload.node]
            failpoints.hit("server.acknowledged")
            everyone_in = set(current.row.expected) <= set(current.accepted)
        if isinstance(current.running, ShardedSum):
            current.running.forget(upload.key(current.number))
        audit(
            "submission accepted",
            upload.node,
            round=current.number,
            submission=upload.submission_id,
            bytes=row.num_bytes,
        )
        server_metrics.SUBMISSIONS.labels("accepted").inc()
        server_metrics.BYTES_RECEIVED.inc(row.num_bytes)
        if everyone_in:
            self.context.wake()
        return self._receipt(row, duplicate=False)

    def abort_upload(self, current: OpenRound, upload: Upload, reason: str) -> None:
        with self.context.lock:
            self._rollback(current, upload, reason)
        self._drain_quietly(current, upload)  # chunks still with the workers, then the undo

    def _rollback(self, current: OpenRound, upload: Upload, reason: str) -> None:
        """Subtract what an unfinished upload added and forget it (caller holds the lock)."""
        if upload.accepted:
            return  # durable and counted: an error after acceptance must not un-count it
        if upload.aborted is None:
            upload.aborted = reason
            current.uploads.pop(upload.node, None)
            if upload.pending:
                current.uploads_aborted.append(upload)  # undone by whoever drains its last chunk
            else:
                self._undo(current, upload)

    def _undo(self, current: OpenRound, upload: Upload) -> None:
        """Subtract what an aborted upload added and delete its spool file (caller holds the lock)."""
        running = current.running
        if isinstance(running, ShardedSum):
            key = upload.key(current.number)
            try:
                if upload.added_blocks:
                    upload.writer.flush()
                    items = [(i, *upload.spooled[i]) for i in upload.added_blocks]
                    running.subtract_spooled(key, str(upload.writer.partial), items)
                    upload.added_blocks.clear()
                running.forget(key)
            except WorkerLost as exc:
                # The server is stopping (IngestWorkers.on_lost); its restart rebuilds the sum.
                log.warning("could not roll back the upload of %s: %s", upload.node, exc)
        elif upload.added:
            blobs = upload.writer.written()
            running.subtract(next(blobs) for _ in range(upload.added))
        upload.added = 0
        upload.writer.discard()

    def _receipt_token(self, number: int, node: str, submission_id: str) -> str:
        msg = f"{number}\0{node}\0{submission_id}".encode()
        return hmac.new(self._receipt_key, msg, hashlib.sha256).hexdigest()[:32]

    def _receipt(self, row: SubmissionRow, duplicate: bool) -> pb.SubmitReceipt:
        layout = self.layout()
        return pb.SubmitReceipt(
            round=row.round,
            submission_id=row.submission_id,
            receipt=row.receipt,
            duplicate=duplicate,
            num_bytes=row.num_bytes,
            accepted_unix=row.accepted,
            num_ciphertexts=self.context.blocks(layout.num_values) if layout else 0,
        )

    # ------------------------------------------------------------ events and scheduler

    def history(self, since_round: int) -> list[pb.RoundEvent]:
        """Events a node that last saw ``since_round`` needs to catch up, oldest first."""
        return replay.history(self.context, since_round)

    def close(self) -> None:
        """Server shutdown: free the open round's shared sum and stop the ingest workers."""
        with self.context.lock:
            current = self.context.open
        if current is not None and isinstance(current.running, ShardedSum):
            current.running.release()
        if self.ingest is not None:
            self.ingest.close()

    def run_scheduler(self, stop: threading.Event) -> None:
        """Close rounds at their deadline or when all are in; open rounds when due."""
        scheduler.run(self.context, self, stop)
