"""Taking part in a masked round: enrol, check the roster, train, mask, upload, commit, release.

The steps are those of :mod:`cipherhive.node.secagg.participation`, driven by the round's
events (OPENED, ROSTER, COMMITS). The round's :class:`Participation` stays in
memory across reconnects: after a server restart the node re-sends the same
enrolment and the same masked ciphertexts from disk, and carries on from the
step it had reached. It never trains or masks twice for one round. Once the
masked upload is on disk the participation is kept beside it too
(:meth:`Participation.save`), so a node that restarts finishes the round with
the same upload, commit and seed; one that restarts before masking sits the
round out.

Whatever goes wrong in a round (a roster this node refuses, a commit missing,
the server refusing a step) ends with this node not taking part: it is
logged with the reason and never ends the daemon.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from cipherhive.ckks import codec
from cipherhive.node import metrics
from cipherhive.node.config import NodeConfig
from cipherhive.node.errors import NodeError
from cipherhive.node.secagg.participation import MaskingSetup, Participation
from cipherhive.node.secagg.release_ledger import FILE_NAME as ledger_file
from cipherhive.node.secagg.release_ledger import LedgerError, ReleaseLedger
from cipherhive.node.session import Services
from cipherhive.node.state.checkpoint import Checkpoint
from cipherhive.node.state.model_state import ModelState
from cipherhive.node.sums.receive import TRANSIENT, SessionEnd
from cipherhive.node.training.local_round import LocalTraining
from cipherhive.node.training.update import rounded_metrics, weighted_blocks
from cipherhive.node.transfer.upload import submit_requests
from cipherhive.pki.enrolment_certs import EnrolmentError
from cipherhive.runtime import failpoints
from cipherhive.runtime.logs import event
from cipherhive.runtime.transport import describe_rpc_error
from cipherhive.secagg.chain import ChainHash
from cipherhive.secagg.roster import RosterError
from cipherhive.secagg.withdrawal import REPLACED_ROSTER
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.node")
Kind = pb.RoundEvent.Kind


# ------------------------------------------------------------ start-up


def load_chain(
    checkpoint: Checkpoint | None, config: NodeConfig, fingerprint: str, layout_hash: str
) -> ChainHash | None:
    """The chain hash of the model at start-up (None: this node cannot enrol in masked rounds)."""
    if checkpoint is None:
        try:
            return ChainHash.genesis(fingerprint, layout_hash)
        except ValueError:
            return None  # a benchmark's baseline codec (no SEAL key fingerprint): unmasked only
    if not checkpoint.chain_hash:
        return None  # from before masked rounds: it cannot enrol (logged when a round opens)
    try:
        return ChainHash.from_hex(checkpoint.chain_hash)
    except ValueError as exc:
        raise NodeError(f"the checkpoint in {config.state_dir} holds a damaged chain hash ({exc})") from exc


def open_ledger(config: NodeConfig, has_checkpoint: bool) -> ReleaseLedger:
    """The release ledger (fail closed): created only for a brand-new state directory."""
    path = config.state_dir / ledger_file
    try:
        if not path.exists() and not path.is_symlink() and not has_checkpoint:
            return ReleaseLedger.init(path)
        return ReleaseLedger(path)
    except (LedgerError, OSError) as exc:
        raise NodeError(str(exc)) from exc


def load_masking(cfg: NodeConfig, fingerprint: str) -> MaskingSetup | None:
    """This node's pinned membership and enrolment keys (None: masked rounds not configured)."""
    if cfg.insecure or not cfg.members:
        return None
    assert cfg.tls_cert is not None and cfg.tls_ca is not None
    cert, key, crl = cfg.enrolment_files()
    try:
        return MaskingSetup.load(
            members=cfg.members,
            floor=cfg.min_participants,
            tls_cert=cfg.tls_cert,
            tls_ca=cfg.tls_ca,
            enrol_cert=cert,
            enrol_key=key,
            crl=crl,
            aggregator=cfg.tls_server_name or cfg.server.rpartition(":")[0],
            federation_fingerprint=fingerprint,
        )
    except EnrolmentError as exc:
        raise NodeError(f"masked rounds: {exc}") from exc


def remove_stale_files(config: NodeConfig, applied_round: int) -> None:
    """A masked round's files from before a restart: kept while their round may still be open
    (the node resends that very upload), removed once the model is past it."""
    for stale in [*config.state_dir.glob("upload-*.ct"), *config.state_dir.glob("round-*.part.json")]:
        number = stale.name.split("-", 1)[1].split(".", 1)[0]
        if not number.isdigit() or int(number) <= applied_round:
            stale.unlink()


class MaskedRoundDriver:
    """Takes this node through a masked round's steps as the round's events arrive."""

    def __init__(self, services: Services, state: ModelState, training: LocalTraining) -> None:
        self._services = services
        self._state = state
        self._training = training
        #: The trained update (values, weight, evaluation) until its upload is acknowledged.
        self._unsent: tuple[Any, float, Any] | None = None

    # ------------------------------------------------------------ events

    def _await(self, number: int, kind: Kind) -> pb.RoundEvent | None:
        """Read events until round ``number``'s ``kind``; None if the round ends first.

        Anything else that matters (a withdrawal, the next round, the end of this one)
        is put back for the main loop; heartbeats are dropped.
        """
        while True:
            ev = self._services.events.next()
            if ev is None:
                raise SessionEnd("the event stream ended")
            if ev.kind == pb.RoundEvent.HEARTBEAT:
                continue
            if ev.round == number and ev.kind == kind:
                return ev
            if ev.round == number and ev.kind in (
                pb.RoundEvent.ROSTER,
                pb.RoundEvent.COMMITS,
                pb.RoundEvent.OPENED,
            ):
                continue  # an earlier step again (replayed after a reconnect)
            if ev.kind == pb.RoundEvent.CLOSED and ev.round == number:
                continue  # a masked round closes as it publishes: keep waiting
            self._services.events.put_back(ev)
            if ev.kind in (pb.RoundEvent.FAILED, pb.RoundEvent.SUM_READY, pb.RoundEvent.CLOSED) or (
                ev.kind == pb.RoundEvent.OPENED and ev.round > number
            ):
                return None
            if ev.kind == pb.RoundEvent.WITHDRAWN:
                return None

    # ------------------------------------------------------------ the round

    def _ledger_key(self, base_round: int) -> str:
        """The base-model version a release is recorded for (docs/spec/masked-round.md §6).

        The chain hash names the model's whole history; a later withdrawal of a round
        built on this base makes a new version of it (that round's sum was published,
        so the next round on this base reveals no more than a round with another roster).
        """
        assert self._state.chain is not None
        withdrawn_after = max((r for r in self._state.withdrawn if r > base_round), default=0)
        return f"{base_round}:{self._state.chain.hex()}:w{withdrawn_after}"

    def _refuse_round(self, ev: pb.RoundEvent, why: str, level: int = logging.WARNING) -> None:
        event(
            log, f"not taking part in round {ev.round}: {why}", level, node=self._state.name, round=ev.round
        )
        metrics.MASKED_REFUSALS.inc()

    def run(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent) -> None:
        """Take part in the masked round ``ev`` opened, from the step this node had reached."""
        setup, chain = self._state.masking, self._state.chain
        if setup is None or chain is None:
            why = (
                "list the federation's members in [masking] members to take part in masked rounds"
                if setup is None
                else "this node's checkpoint predates masked rounds (no chain hash); bootstrap it "
                "from a member's `cipherhive node export`"
            )
            self._refuse_round(ev, why, logging.ERROR)
            return
        part = self._state.part
        if part is None or part.round != ev.round or part.binding.nonce != ev.nonce:
            if part is not None:
                part.discard()
                self._state.part = part = None
            restored = Participation.restore(setup, self._services.config.state_dir, ev.round, ev.nonce)
            if restored is not None:
                event(
                    log,
                    "resuming round after a restart with the same upload",
                    node=self._state.name,
                    round=ev.round,
                )
                self._state.part = part = restored
            elif self._state.store.submitted_round() == ev.round:
                self._refuse_round(ev, "this node restarted after uploading to it and lost that upload")
                return
        if part is None or part.round != ev.round:
            key = self._ledger_key(ev.base_round)
            try:
                if not self._state.ledger.may_upload(key):
                    self._refuse_round(
                        ev,
                        f"this node already released a self-mask on base round {ev.base_round}; "
                        "uploading on it again would let its update be differenced",
                    )
                    return
            except LedgerError as exc:
                self._refuse_round(ev, str(exc), logging.ERROR)
                return
            blocks = codec.blocks_for(self._state.layout.num_values, self._services.pool.values_per_block)
            try:
                part = Participation.enrol(setup, ev.round, ev.base_round, ev.nonce, chain.value, blocks)
            except ValueError as exc:
                self._refuse_round(ev, f"cannot enrol ({exc})")
                return
            self._state.part = part
        refused = self._enrol(stub, part, ev)
        if refused is not None:
            if refused == grpc.StatusCode.ALREADY_EXISTS:
                # Enrolled before a restart with a key this node no longer has: say so at once, so
                # the round goes on without it instead of waiting for its upload (§2.1).
                self._withdraw(stub, part, "restarted after enrolling and lost this round's key")
            return
        failpoints.hit("node.enrolled")  # tests: a member lost right after enrolling
        roster_ev = self._await(ev.round, pb.RoundEvent.ROSTER)
        if roster_ev is None:
            return
        try:
            roster = part.accept_roster(list(roster_ev.roster))
        except RosterError as exc:
            self._refuse_round(ev, f"refused its roster: {exc}")
            self._withdraw(stub, part, f"refused the roster: {exc}")
            part.discard()
            self._state.part = None
            return
        event(log, "roster verified", node=self._state.name, round=ev.round, members=len(roster.members))
        started = time.perf_counter()
        if part.upload is None and not self._mask_update(stub, ev, part):
            return
        if not part.receipt:
            receipt = self._submit(stub, ev, part)
            if receipt is None:
                return
            part.receipt = receipt.receipt
            part.forget_key()
            self._unsent = None
            part.save(self._services.config.state_dir)
            failpoints.hit("node.submitted")
            self._state.store.mark_submitted(ev.round, receipt.submission_id, receipt.receipt, part.weight)
            metrics.ROUNDS_JOINED.inc()
            metrics.PHASE_SECONDS.labels("encrypt_upload").observe(
                time.perf_counter() - started - part.train_s
            )
            event(
                log,
                "update submitted",
                node=self._state.name,
                round=ev.round,
                samples=part.result.num_samples,
                train_s=round(part.train_s, 3),
                encrypt_upload_s=round(time.perf_counter() - started - part.train_s, 3),
                bytes=receipt.num_bytes,
                duplicate=receipt.duplicate,
                metrics=rounded_metrics(part.result.metrics),
                masked=True,
            )
        commit = part.commit()
        part.save(
            self._services.config.state_dir
        )  # a signature is randomized: only the kept commit is ever sent
        if not self._step(stub.SubmitCommit, pb.CommitRequest(round=ev.round, commit=commit), ev):
            return
        commits_ev = self._await(ev.round, pb.RoundEvent.COMMITS)
        if commits_ev is None:
            return
        try:
            if not part.releasing:
                part.releasing = True
                part.save(self._services.config.state_dir)
            seed = part.release(list(commits_ev.commits), self._state.ledger, self._ledger_key(ev.base_round))
            part.save(self._services.config.state_dir)
        except (RosterError, LedgerError) as exc:
            self._refuse_round(ev, f"not releasing the self-mask: {exc}")
            return
        failpoints.hit("node.released")
        if self._step(stub.ReleaseSeed, pb.ReleaseRequest(round=ev.round, seed=seed), ev):
            event(log, "self-mask released", node=self._state.name, round=ev.round)

    def _submit(
        self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent, part: Participation
    ) -> pb.SubmitReceipt | None:
        """Stream the masked upload from disk; None if the server refused it (logged).

        An upload masked for a roster the server re-formed meanwhile (§2.1) is refused without
        being added: this node takes the new roster, masks the same update again and sends that
        instead (once)."""
        for attempt in range(2):
            assert part.upload is not None and part.roster is not None
            part.save(self._services.config.state_dir)  # before the first byte is sent
            header = self._training.header(ev, part.result)
            header.roster_hash = part.roster.hash
            per_chunk = max(1, min(self._state.settings.max_ciphertexts_per_chunk, 16))
            try:
                receipt: pb.SubmitReceipt = stub.SubmitUpdate(
                    submit_requests(header, part.upload.blobs(), per_chunk),
                    metadata=self._services.metadata(),
                )
                return receipt
            except grpc.RpcError as exc:
                if exc.code() in TRANSIENT:
                    raise
                replaced = REPLACED_ROSTER in (exc.details() or "")
                if not (replaced and attempt == 0 and self._unsent is not None):
                    self._refuse_round(ev, f"the server refused the upload: {describe_rpc_error(exc)}")
                    return None
            roster_ev = self._await(ev.round, pb.RoundEvent.ROSTER)  # the re-formed one, on its way
            if roster_ev is None:
                return None
            self._services.events.put_back(roster_ev)
            if not self._mask(stub, ev, part):
                return None
        return None

    def _mask_update(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent, part: Participation) -> bool:
        """Train, take a roster re-formed meanwhile, then mask and encrypt to disk (fsynced)
        before anything is sent. A node that ends up with no update withdraws (§2.1)."""
        fields: dict[str, Any] = {"node": self._state.name, "round": ev.round}
        started = time.perf_counter()
        try:
            trained = self._training.train(ev, fields)
            if trained is None:
                self._withdraw(
                    stub,
                    part,
                    "this node is stopping"
                    if self._services.stop.is_set()
                    else "training produced no update (see the member's log)",
                )
                return False
            weight, result, local, evaluation = trained
            part.train_s = time.perf_counter() - started
            part.weight, part.result = weight, result
            # Kept until the upload is acknowledged: a re-formed roster means masking it again.
            self._unsent = (local, weight, evaluation)
            return self._mask(stub, ev, part)
        finally:
            self._training.restore_model()

    def _mask(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent, part: Participation) -> bool:
        """Mask the trained update for the roster in hand and write it to disk; a roster re-formed
        meanwhile (at most once) replaces the first and the update is masked again (§2.1)."""
        assert self._unsent is not None
        local, weight, evaluation = self._unsent
        if not self._take_reformed_roster(stub, ev, part):
            return False
        while part.upload is None:
            plan = part.mask_plan(self._services.pool.modulus)
            self._services.pool.set_mask_plan(plan)
            try:
                part.write_upload(
                    self._services.config.state_dir / f"upload-{ev.round}.ct",
                    self._services.pool.encrypt_masked(
                        weighted_blocks(
                            local,
                            self._state.global_values,
                            weight,
                            self._services.pool.values_per_block,
                            evaluation,
                        )
                    ),
                )
            finally:
                self._services.pool.clear_mask_plan()
            if not self._take_reformed_roster(stub, ev, part):
                return False
        return True

    def _take_reformed_roster(
        self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent, part: Participation
    ) -> bool:
        """A roster the server re-formed while this node trained replaces the first one before
        anything is masked (docs/spec/masked-round.md §2.1); False if this node refuses it."""
        for later in self._services.events.ready():
            if later.round != ev.round or later.kind != pb.RoundEvent.ROSTER:
                continue
            self._services.events.drop(later)
            try:
                roster = part.accept_roster(list(later.roster))
            except RosterError as exc:
                self._refuse_round(ev, f"refused its re-formed roster: {exc}")
                self._withdraw(stub, part, f"refused the re-formed roster: {exc}")
                return False
            event(
                log,
                "roster re-formed and verified",
                node=self._state.name,
                round=ev.round,
                members=len(roster.members),
            )
        return True

    def _enrol(
        self, stub: pb_grpc.AggregationStub, part: Participation, ev: pb.RoundEvent
    ) -> grpc.StatusCode | None:
        """Enrol; None when accepted, else the refusal's status (logged)."""
        request = pb.EnrolRequest(round=ev.round, enrolment=part.enrolment.encode())
        try:
            stub.Enrol(request, metadata=self._services.metadata(), timeout=60)
        except grpc.RpcError as exc:
            if exc.code() in TRANSIENT:
                raise
            self._refuse_round(ev, f"the server refused EnrolRequest: {describe_rpc_error(exc)}")
            code: grpc.StatusCode = exc.code()
            return code
        return None

    def _withdraw(self, stub: pb_grpc.AggregationStub, part: Participation, reason: str) -> None:
        """Tell the server, signed, that this member leaves the round (§2.1): best effort, since
        the round's step deadlines cover a withdrawal that never arrives."""
        request = pb.WithdrawRequest(round=part.round, withdrawal=part.withdrawal(reason))
        try:
            reply = stub.Withdraw(request, metadata=self._services.metadata(), timeout=10)
        except grpc.RpcError as exc:
            event(
                log,
                f"could not withdraw from round {part.round}: {describe_rpc_error(exc)}",
                logging.WARNING,
                node=self._state.name,
                round=part.round,
            )
            return
        event(
            log,
            "withdrew from round",
            node=self._state.name,
            round=part.round,
            reason=reason,
            round_continues=reply.round_continues,
        )

    def _step(self, call: Any, request: Any, ev: pb.RoundEvent) -> bool:
        """One unary step of the round; a refusal ends this node's part in it (logged)."""
        try:
            call(request, metadata=self._services.metadata(), timeout=60)
        except grpc.RpcError as exc:
            if exc.code() in TRANSIENT:
                raise
            self._refuse_round(ev, f"the server refused {type(request).__name__}: {describe_rpc_error(exc)}")
            return False
        return True

    def end_part(self, number: int) -> None:
        """Round ``number`` is over: drop its participation (keys, upload and participation files)."""
        part = self._state.part
        if part is not None and part.round <= number:
            part.discard()
            self._state.part = None
            self._unsent = None
        Participation.forget(self._services.config.state_dir, number)
