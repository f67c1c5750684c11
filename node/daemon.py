"""`cipherhive node`: follow the federation's rounds, train, encrypt, submit, apply sums.

The node dials out only. It joins (key fingerprint and model layout are
checked by the server), then follows the server's round events: it replays
every published sum it has not applied yet, in order, and takes part in the
open round once its model is the round's base. When the server goes away it
reconnects with exponential back-off and carries on.

A node never exits because of what arrives over the network: a sum that fails
its checks is rejected (:mod:`cipherhive.node.sums.receive`), a withdrawn round it
applied is rolled back to a kept checkpoint, a sum it cannot follow is skipped
with a warning. It exits (code 2) only for local problems (an unreadable secret
context, a checkpoint of another layout, a trainer that cannot load) and when
the server refuses it at Join with a status retrying cannot fix (wrong key,
revoked certificate, another model).

SIGTERM/Ctrl-C stops training (``RoundInfo.should_stop``) and nothing of that
round is submitted; a second signal exits at once (:mod:`cipherhive.node.stopping`).

Decrypted values never leave the node: only ciphertexts, an "applied" or
"rejected: reason" report per round and, if ``report_metrics`` is on, rounded
local metrics are sent.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from cipherhive import __version__
from cipherhive.ckks import codec, keys
from cipherhive.federation.layout import Layout
from cipherhive.node import metrics, stopping
from cipherhive.node.config import NodeConfig
from cipherhive.node.connect import Reconnects, check_handshake, refusal_with_fix
from cipherhive.node.crypto.federation_key import sender_note
from cipherhive.node.crypto.pool import DEFAULT_CODEC, CryptoPool
from cipherhive.node.errors import NodeError
from cipherhive.node.privacy.ledger import PrivacyLedgerError
from cipherhive.node.privacy.record_level import PrivacyGuard, ScheduleRefused
from cipherhive.node.secagg.crl_update import update_crl
from cipherhive.node.secagg.masked_round import (
    MaskedRoundDriver,
    load_chain,
    load_masking,
    open_ledger,
    remove_stale_files,
)
from cipherhive.node.session import RoundEvents, Services
from cipherhive.node.state.checkpoint import NodeState
from cipherhive.node.state.initial import initial_model_hash
from cipherhive.node.state.layout_file import member_fingerprint_key
from cipherhive.node.state.model_state import ModelState
from cipherhive.node.sums.optimizers import OptimizerError, OptimizerSpec, ServerOptimizer, adopt, restored
from cipherhive.node.sums.receive import BOOTSTRAP_HINT, TRANSIENT, SessionEnd, SumApplier
from cipherhive.node.sums.rollback import RollbackHandler
from cipherhive.node.trainer import (
    TrainerError,
    federated_tensors,
    load_trainer,
)
from cipherhive.node.training.local_round import LocalTraining
from cipherhive.node.training.update import (
    FlatParams,
    layout_of,
)
from cipherhive.runtime.errors import UserError
from cipherhive.runtime.logs import event
from cipherhive.runtime.transport import NODE_NAME_METADATA, ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.node")


@dataclass(frozen=True)
class CodecChoice:
    """Which encoding a node uses: the product's CKKS codec unless a benchmark says otherwise."""

    factory: str
    key: bytes
    fingerprint: str


class Node:
    """The daemon: joins, follows the round events and hands each to the collaborator for it.

    Its parts share one :class:`ModelState` and one :class:`Services` and are given each other
    where one needs another (the masked round trains through :class:`LocalTraining`).
    """

    def __init__(self, config: NodeConfig, choice: CodecChoice | None = None) -> None:
        try:
            if choice is None:
                secret = keys.read_secret_context(config.secret_context)
                choice = CodecChoice(DEFAULT_CODEC, secret, keys.verified_fingerprint(secret))
            pool = CryptoPool(choice.key, config.workers, choice.factory)
        except codec.CodecError as exc:
            raise NodeError(f"{config.secret_context}: {exc}{sender_note(config.secret_context)}") from exc
        try:
            trainer = load_trainer(config.plugin, config.options, config.python_path)
            attach = getattr(trainer, "attach_state_dir", None)
            if attach is not None:  # state a trainer keeps per member (SCAFFOLD's control variate)
                attach(str(config.state_dir))
            model = trainer.build_model()
        except TrainerError:
            pool.close()
            raise
        self._stop = threading.Event()
        self._stream: Any = None
        self._rng = random.Random()
        self._reconnects = Reconnects(config.server, config.max_backoff_seconds, self._rng)
        self.services = Services(
            config=config,
            fingerprint=choice.fingerprint,
            pool=pool,
            trainer=trainer,
            stop=self._stop,
            events=RoundEvents(),
            metadata=self._metadata,
        )
        try:
            self.privacy = PrivacyGuard(config, config.name or config.state_dir.name)
        except PrivacyLedgerError as exc:
            pool.close()
            raise NodeError(str(exc)) from exc
        try:
            self.state = self._load_state(model)
        except UserError:  # NodeError among them
            pool.close()
            raise
        self.training = LocalTraining(self.services, self.state, self.privacy)
        self.rollbacks = RollbackHandler(self.services, self.state)
        self.masked = MaskedRoundDriver(self.services, self.state, self.training)
        self.sums = SumApplier(self.services, self.state)
        remove_stale_files(config, self.state.applied_round)

    def _load_state(self, model: Any) -> ModelState:
        """The model as the state directory left it (NodeError: a state this node cannot use)."""
        config, trainer, fingerprint = self.services.config, self.services.trainer, self.services.fingerprint
        tensors = federated_tensors(trainer, model)
        base_hash_fn = getattr(trainer, "base_model_hash", None)
        # of the values build_model made, before any checkpoint is loaded into them
        initial = initial_model_hash(member_fingerprint_key(config), tensors)
        layout = layout_of(tensors, base_hash_fn() if base_hash_fn else "", initial)
        store = NodeState(config.state_dir, config.keep_checkpoints)
        applied_round = 0
        checkpoint = store.load()
        if checkpoint is not None:
            if checkpoint.layout_hash != layout.hash:
                raise NodeError(
                    f"the checkpoint in {config.state_dir} was made for another model layout; "
                    "use a new --state-dir for this model"
                )
            with torch.no_grad():
                for name, tensor in tensors:
                    tensor.copy_(checkpoint.tensors[name])
            applied_round = checkpoint.round
        try:
            optimizer = restored(
                checkpoint.optimizer if checkpoint else None,
                applied_round,
                layout.num_params,
                f"{config.state_dir}/checkpoint.pt",
            )
        except OptimizerError as exc:
            raise NodeError(str(exc)) from exc
        # The model's federated values live in one float32 buffer; ``global_values`` is
        # the last applied global model (float32, the only other full-size copy).
        flat = FlatParams(tensors)
        global_values = flat.read().copy()
        chain = load_chain(checkpoint, config, fingerprint, layout.hash)
        ledger = open_ledger(config, checkpoint is not None)
        masking = load_masking(config, fingerprint)
        return ModelState(
            name=config.name,
            settings=pb.FederationSettings(),
            model=model,
            tensors=tensors,
            layout=layout,
            flat=flat,
            global_values=global_values,
            store=store,
            applied_round=applied_round,
            optimizer=optimizer,
            chain=chain,
            ledger=ledger,
            masking=masking,
        )

    # ------------------------------------------------------------ the state, as tests and tools see it

    @property
    def config(self) -> NodeConfig:
        return self.services.config

    @property
    def applied_round(self) -> int:
        return self.state.applied_round

    @property
    def settings(self) -> pb.FederationSettings:
        return self.state.settings

    @settings.setter
    def settings(self, settings: pb.FederationSettings) -> None:
        self.state.settings = settings

    @property
    def optimizer(self) -> ServerOptimizer:
        return self.state.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: ServerOptimizer) -> None:
        self.state.optimizer = optimizer

    @property
    def layout(self) -> Layout:
        return self.state.layout

    @property
    def store(self) -> NodeState:
        return self.state.store

    @property
    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        return self.state.tensors

    @property
    def flat(self) -> FlatParams:
        return self.state.flat

    @property
    def global_values(self) -> np.ndarray:
        return self.state.global_values

    # ------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def close(self) -> None:
        self.services.pool.close()

    def run(self) -> int:
        """Connect, follow rounds, reconnect on failure; 0 on a requested stop, 2 on a fatal error."""
        event(
            log,
            "node starting",
            params=self.state.layout.num_params,
            tensors=len(self.state.layout.tensors),
            applied_round=self.state.applied_round,
            workers=self.services.pool.workers,
            server=self.services.config.server,
        )
        if self.services.config.metrics_listen:
            metrics.serve(self.services.config.metrics_listen)
        metrics.APPLIED_ROUND.set(self.state.applied_round)
        while not self._stop.is_set():
            started = time.monotonic()
            # When to try again and what to log: node/connect.py (a restarting server: every second).
            wait: float | None = None
            clean = False  # the session ended as the round-event stream did: with OK
            try:
                self._session()
                clean = True
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    break
                wait = self._reconnects.lost(exc, self.services.events.take_stream_error(), started)
            except NodeError as exc:
                log.error("%s", exc)
                return 2
            except SessionEnd:
                pass  # logged where it happened; reconnect after back-off
            except Exception:
                # Whatever else went wrong came from a session with the server: never a reason
                # to stop following the federation.
                log.exception(
                    "unexpected error in the session with %s; reconnecting", self.services.config.server
                )
            if self.state.resync and not self._stop.is_set():
                self.state.resync = False  # rolled back: follow the federation again at once
                continue
            if self._stop.is_set():
                break
            if wait is None:
                ended = self.services.events.take_stream_error()
                wait = self._reconnects.ended(ended, started, clean=clean)
            self._stop.wait(wait)
        event(log, "node stopped", applied_round=self.state.applied_round)
        return 0

    def serve_forever(self) -> int:
        stopping.install(self.stop)
        try:
            return self.run()
        finally:
            self.close()

    # ------------------------------------------------------------ session

    def _metadata(self) -> list[tuple[str, str]]:
        return [(NODE_NAME_METADATA, self.state.name)] if self.services.config.insecure else []

    def _session(self) -> None:
        cfg = self.services.config
        tls = None
        if not cfg.insecure:
            assert cfg.tls_cert and cfg.tls_key and cfg.tls_ca
            tls = ClientTLS(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.tls_server_name)
        with channel(cfg.server, tls) as ch:
            check_handshake(ch, cfg.server, tls, self._reconnects.quick())
            stub = pb_grpc.AggregationStub(ch)
            try:
                reply = stub.Join(
                    pb.JoinRequest(
                        key_fingerprint=self.services.fingerprint,
                        layout=self.state.layout.to_proto(),
                        node_name=cfg.name,
                        software_version=__version__,
                    ),
                    metadata=self._metadata(),
                    timeout=30,
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                if exc.code() in TRANSIENT or self._stop.is_set():
                    raise
                raise NodeError(f"server refused this node: {refusal_with_fix(exc)}") from exc
            self._reconnects.joined()
            update_crl(stub, cfg, reply.node_name)  # verified before use (node/secagg/crl_update.py)
            self.state.name, self.state.settings = reply.node_name, reply.settings
            try:
                self.privacy.accept(reply.settings, self.state.applied_round)
            except (ScheduleRefused, PrivacyLedgerError) as exc:
                raise NodeError(f"not joining: {exc}") from exc
            self.state.idle = None
            self._follow_optimizer(reply.settings.optimizer)
            if reply.settings.masked and self.state.masking is None and not cfg.insecure:
                raise NodeError(
                    "the federation runs masked rounds: list its members in [masking] members (names "
                    "or certificate fingerprints) in this node's configuration"
                )
            if not reply.settings.masked and self.state.masking is not None:
                self.state.idle = (
                    "this node is configured for masked rounds ([masking] members) but the server runs "
                    "unmasked ones; it follows the federation without submitting"
                )
                event(log, self.state.idle, logging.ERROR, node=self.state.name)
            event(
                log,
                "joined federation",
                node=self.state.name,
                latest_sum_round=reply.latest_sum_round,
                applied_round=self.state.applied_round,
                # This node's own floor ([node] min_participants), which it enforces on rounds and
                # rosters whatever the server says; the server's only beside it, and only if it differs.
                min_participants=cfg.min_participants,
                **(
                    {"server_min_participants": reply.settings.min_participants}
                    if reply.settings.min_participants not in (0, cfg.min_participants)
                    else {}
                ),
                optimizer=self.state.optimizer.spec.describe(),
            )
            self.state.withdrawn.update(reply.withdrawn_rounds)
            for number in sorted(reply.withdrawn_rounds):
                if self.rollbacks.roll_back(number, "listed as withdrawn at join"):
                    break
            self.state.resync = False  # rolled back before watching: the watch starts from there
            self._check_kept(reply.settings.oldest_kept_round)
            stream = stub.WatchRounds(
                pb.WatchRequest(since_round=self.state.applied_round), metadata=self._metadata()
            )
            self._stream = stream
            if self._stop.is_set():  # asked to stop before there was a stream to cancel
                stream.cancel()
            self.services.events.open(stream)
            try:
                while (ev := self.services.events.next()) is not None:
                    if self._stop.is_set():
                        return
                    self._handle(stub, ev)
                    if self.state.resync:
                        return
            finally:
                self._stream = None
                self.services.events.close()
                stream.cancel()

    def _follow_optimizer(self, announced: pb.ServerOptimizer) -> None:
        """Take the optimizer the server announced; one this node's state cannot follow stops it."""
        try:
            spec = OptimizerSpec.from_proto(announced)
        except OptimizerError as exc:
            message = f"the server announced an optimizer this node cannot run ({exc}); reconnecting later"
            event(log, message, logging.ERROR, node=self.state.name)
            raise SessionEnd(message) from exc
        try:
            self.state.optimizer = adopt(self.state.optimizer, spec, self.state.applied_round)
        except OptimizerError as exc:
            raise NodeError(str(exc)) from exc

    def _check_kept(self, oldest_kept: int) -> None:
        """A node whose next sum the server pruned cannot catch up by replay: say what to do.

        Only logged, not acted on: a failed round between the node's and the oldest kept
        one has no sum to prune, so the sums this node needs may all still be there. If one
        is not, the fetch (FAILED_PRECONDITION) or the replay (a base it cannot reach) says so.
        """
        self.state.oldest_kept = oldest_kept
        if self.state.pruned_behind():
            event(
                log,
                f"the server keeps sums from round {oldest_kept} on, but this node is at round "
                f"{self.state.applied_round}: the sums it needs were probably pruned; {BOOTSTRAP_HINT}",
                logging.ERROR,
                node=self.state.name,
                applied_round=self.state.applied_round,
            )

    def _handle(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent) -> None:
        if ev.kind == pb.RoundEvent.SUM_READY:
            if ev.round > self.state.applied_round:
                self.sums.on_sum(stub, ev)
            self.masked.end_part(ev.round)
        elif ev.kind == pb.RoundEvent.WITHDRAWN:
            self.rollbacks.on_withdrawn(ev)
        elif ev.kind == pb.RoundEvent.OPENED:
            if self.state.idle is not None:
                log.debug("not taking part in round %d: %s", ev.round, self.state.idle)
                return
            self._take_part(stub, ev)
        elif ev.kind == pb.RoundEvent.FAILED and ev.replay:
            self.masked.end_part(ev.round)
        elif ev.kind == pb.RoundEvent.FAILED:
            self.masked.end_part(ev.round)
            event(
                log,
                "round failed",
                logging.WARNING,
                node=self.state.name,
                round=ev.round,
                reason=ev.reason,
            )
        elif ev.kind == pb.RoundEvent.CLOSED:
            event(log, "round closed", node=self.state.name, round=ev.round, participants=ev.participants)

    # ------------------------------------------------------------ train → encrypt → upload

    def _take_part(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent) -> None:
        fields: dict[str, Any] = {"node": self.state.name, "round": ev.round}
        if ev.base_round != self.state.applied_round:
            event(
                log,
                "skipping round: model is not at its base",
                logging.WARNING,
                base_round=ev.base_round,
                applied_round=self.state.applied_round,
                **fields,
            )
            return
        if self.state.store.submitted_round() == ev.round and not ev.masked:
            return  # already acknowledged (e.g. the open round replayed after a reconnect)
        floor = ev.min_participants or self.state.settings.min_participants
        if floor < self.services.config.min_participants:
            event(
                log,
                f"not submitting: round {ev.round} opened with a floor of {floor} participants, "
                f"below this node's floor of {self.services.config.min_participants}",
                logging.WARNING,
                **fields,
            )
            return
        if ev.masked:
            update_crl(stub, self.services.config, self.state.name)  # before the roster is checked
            self.masked.run(stub, ev)
            return
        try:
            self.training.train_and_submit(stub, ev, fields)
        finally:
            self.training.restore_model()
