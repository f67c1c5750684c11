"""Fetch → decrypt → check → apply a round's sum, or reject it; report the outcome.

The node half of "a node never exits because of what arrives over the network"
(docs/spec/sum-checks.md §4): every way a sum can be wrong ends in :meth:`SumApplier._reject` —
logged with its reason (never a decrypted value), counted in
``cipherhive_node_sums_rejected_total{reason}``, remembered in the state
directory so a restart does not check it again, and reported to the server with
``ReportOutcome``. The model stays at its base and the node takes part in the
next round built on it.

A stream that is cut is resumed (:func:`cipherhive.node.transfer.fetch.fetch_sum`); one
that is malformed (wrong round, layout or count, chunks out of order, bytes SEAL
cannot load, an early end) is downloaded again up to :data:`ATTEMPTS` times, then
rejected.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cipherhive.ckks import c0_sum, codec
from cipherhive.node import metrics
from cipherhive.node.config import NodeConfig
from cipherhive.node.secagg.sum_proof import check_seed_hashes, verify_proof
from cipherhive.node.session import Services
from cipherhive.node.state import round_history
from cipherhive.node.state.checkpoint import Checkpoint
from cipherhive.node.state.model_state import ModelState
from cipherhive.node.sums.checks import (
    CheckedApplier,
    SumLimits,
    SumRejected,
    check_participants,
    member_grid_bits,
)
from cipherhive.node.trainer import AppliedRound
from cipherhive.node.training import federated_eval
from cipherhive.node.training.update import split
from cipherhive.node.transfer.fetch import FetchError, fetch_sum
from cipherhive.runtime import failpoints
from cipherhive.runtime import records as record_file
from cipherhive.runtime.logs import event
from cipherhive.runtime.progress import track
from cipherhive.runtime.transport import describe_rpc_error
from cipherhive.secagg.chain import ChainHash, SumDigest
from cipherhive.secagg.masking import SeedCheckFailed
from cipherhive.secagg.roster import RosterError
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.node")

#: Downloads of one sum before a malformed stream is rejected.
ATTEMPTS = 3
#: The server accepts at most this many characters of reason.
MAX_REASON = 200
#: Replayed sums fetched per second at most while catching up. Each costs two calls (the round's
#: proof and its sum), so a catch-up of any length stays at half the server's default per-member
#: call rate (``[limits] requests_per_second`` = 20) instead of draining its burst: a small model
#: decrypts in milliseconds (docs/explanation/reliability.md, "Dropouts").
CATCH_UP_SUMS_PER_SECOND = 5.0

TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}

BOOTSTRAP_HINT = (
    "stop this node and run `cipherhive node bootstrap --config node.toml --from FILE` with the "
    "checkpoint.pt of another member's `cipherhive node export` (or a kept checkpoint) at a recent round"
)


class SessionEnd(Exception):
    """End the current session and reconnect (after back-off), without exiting."""


def checks_key(config: NodeConfig) -> str:
    """Identifies the node's check settings: a sum rejected under other settings is checked again."""
    text = f"{config.min_participants}:{config.max_update_value!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SumApplier:
    """Follows published sums: skips what the model cannot take, fetches, checks and applies or
    rejects the rest, and reports each outcome to the server."""

    def __init__(self, services: Services, state: ModelState) -> None:
        self._services = services
        self._state = state
        #: The server does not take outcome reports (asked once, then not sent again).
        self.outcome_unimplemented = False
        #: When the next replayed sum may be fetched (time.monotonic), see CATCH_UP_SUMS_PER_SECOND.
        self._next_replay = 0.0

    def on_sum(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent) -> None:
        """A published sum beyond the applied round: skipped, rejected before, or applied."""
        state = self._state
        fields: dict[str, Any] = {"node": state.name, "round": ev.round}
        if ev.round in state.withdrawn:
            event(log, f"skipping round {ev.round}: it was withdrawn", **fields)
        elif state.idle is not None:
            log.debug("not applying round %d: %s", ev.round, state.idle)
        elif ev.base_round != state.applied_round:
            pruned = ev.base_round > state.applied_round and state.pruned_behind()
            event(
                log,
                f"skipping round {ev.round}: its sum builds on round {ev.base_round} but this node "
                f"is at round {state.applied_round}" + (f"; {BOOTSTRAP_HINT}" if pruned else ""),
                logging.ERROR if pruned else logging.WARNING,
                **fields,
            )
        elif not self._rejected_before(stub, ev):
            if ev.replay:
                self._pace_catch_up()
            self._apply_sum(stub, ev)

    def _pace_catch_up(self) -> None:
        """Space replayed sums (CATCH_UP_SUMS_PER_SECOND); live ones come at the rounds' own pace."""
        now = time.monotonic()
        if self._next_replay > now:
            time.sleep(self._next_replay - now)
        self._next_replay = max(now, self._next_replay) + 1.0 / CATCH_UP_SUMS_PER_SECOND

    # ------------------------------------------------------------ reporting

    def _report(
        self, stub: pb_grpc.AggregationStub, round_number: int, applied: bool, reason: str = ""
    ) -> bool:
        """Best effort: tell the server whether this node applied the round's sum.

        Only a round's participants report on its sum (docs/spec/sum-checks.md §4): a member
        that catches up on rounds it did not take part in sends nothing, since the server would
        refuse it, and would count it against this node's call rate. True once nothing is left to
        report (the server heard, or there was nothing to tell it).
        """
        if self._state.store.submitted_round() != round_number:
            log.debug("not reporting on round %d: this node did not take part in it", round_number)
            return True
        if self.outcome_unimplemented:
            return False
        try:
            stub.ReportOutcome(
                pb.OutcomeReport(round=round_number, applied=applied, reason=reason[:MAX_REASON]),
                metadata=self._services.metadata(),
                timeout=10,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.outcome_unimplemented = True
                log.debug("the server does not take outcome reports (UNIMPLEMENTED); not sending them")
            else:
                event(
                    log,
                    f"could not report the outcome of round {round_number}: {describe_rpc_error(exc)}",
                    logging.WARNING,
                    node=self._state.name,
                    round=round_number,
                )
            return False
        return True

    def _reject(self, stub: pb_grpc.AggregationStub, round_number: int, exc: SumRejected) -> None:
        self._state.flat.load(self._state.global_values)
        metrics.SUMS_REJECTED.labels(exc.reason).inc()
        event(
            log,
            f"rejected the sum of round {round_number}: {exc.message}; the model stays at round "
            f"{self._state.applied_round}",
            logging.WARNING,
            node=self._state.name,
            round=round_number,
            reason=exc.reason,
        )
        self._state.store.remember_rejection(
            round_number, exc.reason, exc.message, checks_key(self._services.config)
        )
        round_history.record_outcome(
            self._services.config.state_dir,
            round_number,
            round_history.REJECTED,
            uploaded=self._state.store.own_weight(round_number) > 0,
            reason=f"{exc.reason}: {exc.message}",
        )
        if self._report(stub, round_number, False, f"round {round_number} rejected: {exc.message}"):
            self._state.store.mark_reported(round_number)

    def _rejected_before(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent) -> bool:
        """A sum rejected earlier under the same settings is not fetched again (only re-reported)."""
        record = self._state.store.rejections().get(ev.round)
        if record is None or record.get("checks") != checks_key(self._services.config):
            return False
        event(
            log,
            f"skipping round {ev.round}: this node rejected its sum before ({record.get('reason')})",
            node=self._state.name,
            round=ev.round,
        )
        if not record.get("reported"):
            message = f"round {ev.round} rejected: {record.get('message', '')}"
            if self._report(stub, ev.round, False, message):
                self._state.store.mark_reported(ev.round)
        return True

    # ------------------------------------------------------------ fetch → decrypt → check → apply

    def _apply_sum(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent) -> None:
        t0 = time.perf_counter()
        try:
            check_participants(ev.participants, self._services.config.min_participants)
            applier = self._download(stub, ev)
        except SumRejected as exc:
            self._reject(stub, ev.round, exc)
            return
        except grpc.RpcError as exc:
            self._state.flat.load(self._state.global_values)
            if exc.code() in TRANSIENT:
                raise
            self._fetch_refused(ev, exc)
        except BaseException:
            self._state.flat.load(
                self._state.global_values
            )  # a broken download leaves the global model as it was
            raise
        t_apply = time.perf_counter()
        metrics.PHASE_SECONDS.labels("download_decrypt").observe(t_apply - t0)
        self._state.flat.commit()
        failpoints.hit("node.applying")
        next_chain = None
        if self._state.chain is not None:  # advanced only once the checkpoint that records it is written
            next_chain = ChainHash(self._state.chain.value)
            next_chain.apply(applier.sum_digest)
        record = self._state.optimizer.record(pending=True)
        self._state.store.save(
            Checkpoint(
                ev.round,
                self._state.layout.hash,
                {n: t for n, t in self._state.tensors},
                record,
                next_chain.hex() if next_chain is not None else "",
            )
        )
        self._state.optimizer.commit()  # the moments are the state only once the checkpoint holds them
        if next_chain is not None:
            self._state.chain = next_chain
        self._state.global_values[:] = self._state.flat.read()
        self._state.applied_round = ev.round
        metrics.APPLIED_ROUND.set(ev.round)
        metrics.PHASE_SECONDS.labels("apply").observe(time.perf_counter() - t_apply)
        fields: dict[str, Any] = {
            "node": self._state.name,
            "round": ev.round,
            "participants": ev.participants,
        }
        # The federated evaluation of the round's base (docs/spec/sum-checks.md §5), rounded;
        # nothing goes to the server.
        evaluation = federated_eval.show(
            applier.leading, self._state.settings.weight_unit, ev.base_round, fields
        )
        round_history.record_outcome(  # for `cipherhive node report`: the figures as logged
            self._services.config.state_dir,
            ev.round,
            round_history.APPLIED,
            participants=ev.participants,
            uploaded=self._state.store.own_weight(ev.round) > 0,
            evaluation=evaluation,
            of_round=ev.base_round,
        )
        event(log, "applied round sum", **fields, fetch_decrypt_apply_s=round(time.perf_counter() - t0, 3))
        self._report(stub, ev.round, True)
        hook = getattr(self._services.trainer, "after_round", None)
        if hook is not None:
            # float32, like checkpoints and exports: a full-precision decrypted value next to its
            # ciphertext gives away the shared key (docs/spec/sum-checks.md §7).
            mean = applier.mean.astype(np.float32) if applier.mean is not None else None
            mean_update = split(self._state.tensors, mean) if mean is not None else {}
            try:
                hook(self._state.model, AppliedRound(ev.round, ev.participants, mean_update, evaluation))
            except Exception:
                log.exception("trainer after_round hook failed in round %d", ev.round)

    def _fetch_refused(self, ev: pb.RoundEvent, exc: grpc.RpcError) -> None:
        """The server will not serve a sum it announced: pruned (or withdrawn meanwhile)."""
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            message = (
                f"the server no longer serves the sum of round {ev.round} ({exc.details()}); this "
                f"node, at round {self._state.applied_round}, cannot catch up by replay: {BOOTSTRAP_HINT}"
            )
        else:
            message = f"the server refused the sum of round {ev.round}: {describe_rpc_error(exc)}"
        event(log, message, logging.ERROR, node=self._state.name, round=ev.round)
        raise SessionEnd(message) from exc

    def _download(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent) -> CheckedApplier:
        per_block = self._services.pool.values_per_block
        n_ct = codec.blocks_for(self._state.layout.num_values, per_block)
        hook = getattr(self._services.trainer, "after_round", None)
        # The float64 average is only kept for a trainer that asks to see it.
        wants_mean = hook is not None and getattr(self._services.trainer, "wants_mean_update", True)
        limits = SumLimits(
            floor=self._services.config.min_participants,
            max_update=self._services.config.max_update_value,
            max_participants=self._state.settings.max_participants,
            participants=ev.participants,
            own_weight=self._state.store.own_weight(ev.round),
            grid_bits=member_grid_bits(self._state.settings.privacy),
        )
        last = ""
        for attempt in range(1, ATTEMPTS + 1):
            mean = np.empty(self._state.layout.num_params) if wants_mean else None
            applier = CheckedApplier(
                self._state.global_values,
                self._state.flat.read(),
                per_block,
                limits,
                mean,
                self._state.optimizer.step,
                self._state.layout.control_start,
            )
            digest = SumDigest()
            try:
                blocks = (
                    self._masked(stub, ev, n_ct, digest)
                    if ev.masked
                    else self._decrypted(stub, ev, n_ct, digest)
                )
                for block in blocks:
                    failpoints.hit("node.download")
                    applier.feed(block)
                applier.finish(n_ct)
                applier.sum_digest = digest.digest()
                return applier
            except (FetchError, codec.CodecError, ValueError) as exc:
                applier.restore()
                last = str(exc)[:120]
                event(
                    log,
                    f"sum of round {ev.round} arrived malformed ({last}); attempt {attempt} of {ATTEMPTS}",
                    logging.WARNING,
                    node=self._state.name,
                    round=ev.round,
                )
        raise SumRejected("malformed", f"the sum stream was malformed {ATTEMPTS} times ({last})")

    def _fetch(
        self,
        stub: pb_grpc.AggregationStub,
        ev: pb.RoundEvent,
        n_ct: int,
        seeds_out: list[list[bytes]] | None = None,
    ) -> Iterator[tuple[bytes, int]]:
        """Round ``ev.round``'s sum as this node's layout and the announced participants expect it."""
        return fetch_sum(
            stub,
            ev.round,
            n_ct,
            self._state.layout.hash,
            self._services.metadata(),
            num_values=self._state.layout.num_values,
            participants=ev.participants,
            seeds_out=seeds_out,
        )

    def _decrypted(
        self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent, n_ct: int, digest: SumDigest
    ) -> Iterator[np.ndarray]:
        def blobs() -> Iterator[bytes]:
            for blob, _count in self._fetch(stub, ev, n_ct):
                digest.update(blob)
                yield blob

        return track(
            self._services.pool.decrypt(blobs()),
            n_ct,
            f"round {ev.round}: download+decrypt",
            node=self._state.name,
            round=ev.round,
        )

    def _masked(
        self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent, n_ct: int, digest: SumDigest
    ) -> Iterator[np.ndarray]:
        """A masked round's sum: proof, download to disk, every check, and only then decryption."""
        setup, chain = self._state.masking, self._state.chain
        if setup is None or chain is None:
            raise SumRejected(
                "unverifiable",
                "a masked sum needs [masking] members and a chain hash to be checked before decryption",
            )
        proof = stub.GetRoundProof(
            pb.ProofRequest(round=ev.round), metadata=self._services.metadata(), timeout=60
        )
        part = (
            self._state.part if self._state.part is not None and self._state.part.round == ev.round else None
        )
        try:
            proven = verify_proof(
                setup,
                proof,
                round_number=ev.round,
                chain_hash=chain.value,
                block_count=n_ct,
                me=part.enrolment if part is not None and part.commit_bytes else None,
                my_commit=part.commit_bytes if part is not None else b"",
            )
        except RosterError as exc:
            raise SumRejected("proof", f"its roster or commits do not verify: {exc}") from None
        if ev.participants != proven.size:
            raise SumRejected(
                "participants_mismatch",
                f"the server announced {ev.participants} participants for a roster of {proven.size}",
            )
        path = self._services.config.state_dir / f"sum-{ev.round}.download"
        seeds: list[list[bytes]] = []
        fetched = self._fetch(stub, ev, n_ct, seeds_out=seeds)
        c0_only = write_records(path, (blob for blob, _ in fetched), digest)
        try:
            check_seed_hashes(proven, seeds)
            if not c0_only:  # a full-ciphertext sum (published before sums were c0 alone)
                self._services.pool.check_seeds(read_records(path), seeds, n_ct)
        except RosterError as exc:
            path.unlink(missing_ok=True)
            raise SumRejected("seeds", str(exc)) from None
        except SeedCheckFailed as exc:
            path.unlink(missing_ok=True)
            raise SumRejected("seed_check", f"nothing was decrypted: {exc.message}") from None

        def decrypted() -> Iterator[np.ndarray]:
            try:
                failpoints.hit("node.decrypt")  # tests: prove nothing was decrypted before the checks
                if c0_only:
                    # c1 is rebuilt from the checked seeds: nothing in it is the server's choice.
                    yield from self._services.pool.decrypt_c0_sum(read_records(path), seeds)
                else:
                    yield from self._services.pool.decrypt(read_records(path))
            except SeedCheckFailed as exc:
                raise SumRejected("seed_check", exc.message) from None
            finally:
                path.unlink(missing_ok=True)

        return track(decrypted(), n_ct, f"round {ev.round}: decrypt", node=self._state.name, round=ev.round)


def write_records(path: Path, blobs: Iterator[bytes], digest: SumDigest) -> bool:
    """A downloaded sum on disk (0600), so that it is checked in full before any decryption.

    Returns whether every block is Σ c0 alone (cipherhive.ckks.c0_sum); a sum must not mix both forms.
    """
    sizes: set[bool] = set()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(record_file.MAGIC)
        for blob in blobs:
            digest.update(blob)
            sizes.add(len(blob) == c0_sum.RECORD_BYTES)
            record_file.write_record(fh, blob)
    if len(sizes) > 1:
        path.unlink(missing_ok=True)
        raise FetchError("the sum mixes Σ c0 records with full ciphertexts")
    return sizes == {True}


def read_records(path: Path) -> Iterator[bytes]:
    """The downloaded sum's records (the one ciphertext file format, runtime.records)."""
    try:
        yield from record_file.read_records(path)
    except record_file.RecordsError as exc:
        raise FetchError(str(exc)) from None
