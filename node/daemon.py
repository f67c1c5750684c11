"""`cipherhive node`: follow the federation's rounds, train, encrypt, submit, apply sums.

The node dials out only. It joins (key fingerprint and model layout are
checked by the server), then follows the server's round events: it replays
every published sum it has not applied yet, in order, and takes part in the
open round once its model is the round's base. When the server goes away it
reconnects with exponential back-off and carries on; a refusal that retrying
cannot fix (wrong key, revoked certificate, another model) ends it with a
clear message and a non-zero exit.

Decrypted values never leave the node: only ciphertexts and rounded
metrics are sent.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tenseal as ts
import torch

from cipherhive import __version__, codec, failpoints, keys
from cipherhive.errors import UserError
from cipherhive.logs import event
from cipherhive.node import metrics
from cipherhive.node.checkpoint import Checkpoint, NodeState
from cipherhive.node.config import NodeConfig
from cipherhive.node.crypto_pool import DEFAULT_CODEC, CryptoPool
from cipherhive.node.fetch import fetch_sum
from cipherhive.node.trainer import (
    AppliedRound,
    RoundInfo,
    TrainerError,
    federated_tensors,
    load_trainer,
)
from cipherhive.node.update import (
    FlatParams,
    SumApplier,
    UpdateError,
    check_update,
    layout_of,
    sample_weight,
    split,
    weighted_blocks,
)
from cipherhive.node.upload import submit_requests
from cipherhive.progress import track
from cipherhive.transport import NODE_NAME_METADATA, ClientTLS, channel, describe_rpc_error
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.node")

_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


class NodeError(UserError, RuntimeError):
    """A problem retrying cannot fix; the daemon stops with this message."""


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics leave the node rounded to 4 significant digits (design.md: aggregates only)."""
    return {k: float(f"{float(v):.4g}") for k, v in metrics.items() if np.isfinite(v)}


@dataclass(frozen=True)
class CodecChoice:
    """Which encoding a node uses: the product's CKKS codec unless a benchmark says otherwise."""

    factory: str
    key: bytes
    fingerprint: str


class Node:
    def __init__(self, config: NodeConfig, choice: CodecChoice | None = None) -> None:
        self.config = config
        try:
            if choice is None:
                secret = keys.read_secret_context(config.secret_context)
                choice = CodecChoice(DEFAULT_CODEC, secret, keys.fingerprint(ts.context_from(secret)))
            self.fingerprint = choice.fingerprint
            self.pool = CryptoPool(choice.key, config.workers, choice.factory)
        except codec.CodecError as exc:
            raise NodeError(f"{config.secret_context}: {exc}") from exc
        try:
            self.trainer = load_trainer(config.plugin, config.options)
            self.model = self.trainer.build_model()
        except TrainerError:
            self.pool.close()
            raise
        self.tensors = federated_tensors(self.trainer, self.model)
        base_hash_fn = getattr(self.trainer, "base_model_hash", None)
        self.layout = layout_of(self.tensors, base_hash_fn() if base_hash_fn else "")
        self.store = NodeState(config.state_dir)
        self.applied_round = 0
        checkpoint = self.store.load()
        if checkpoint is not None:
            if checkpoint.layout_hash != self.layout.hash:
                self.pool.close()
                raise NodeError(
                    f"the checkpoint in {config.state_dir} was made for another model layout; "
                    "use a new --state-dir for this model"
                )
            with torch.no_grad():
                for name, tensor in self.tensors:
                    tensor.copy_(checkpoint.tensors[name])
            self.applied_round = checkpoint.round
        # The model's federated values live in one float32 buffer; ``global_values`` is
        # the last applied global model (float32, the only other full-size copy).
        self.flat = FlatParams(self.tensors)
        self.global_values = self.flat.read().copy()
        self.name = config.name
        self.settings = pb.FederationSettings()
        self._stop = threading.Event()
        self._stream: Any = None
        self._rng = random.Random()

    # ------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def close(self) -> None:
        self.pool.close()

    def run(self) -> int:
        """Connect, follow rounds, reconnect on failure; 0 on a requested stop, 2 on a fatal error."""
        event(
            log,
            "node starting",
            params=self.layout.num_params,
            tensors=len(self.layout.tensors),
            applied_round=self.applied_round,
            workers=self.pool.workers,
            server=self.config.server,
        )
        if self.config.metrics_listen:
            metrics.serve(self.config.metrics_listen)
        metrics.APPLIED_ROUND.set(self.applied_round)
        backoff = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._session()
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    break
                if exc.code() not in _TRANSIENT:
                    log.error("server refused this node: %s", describe_rpc_error(exc))
                    return 2
                log.warning(
                    "connection to %s lost (%s); reconnecting in %.1fs",
                    self.config.server,
                    describe_rpc_error(exc),
                    backoff,
                )
            except NodeError as exc:
                log.error("%s", exc)
                return 2
            if time.monotonic() - started > 60:
                backoff = 1.0
            self._stop.wait(backoff * (0.5 + self._rng.random()))
            backoff = min(backoff * 2, self.config.max_backoff_seconds)
        event(log, "node stopped", applied_round=self.applied_round)
        return 0

    def serve_forever(self) -> int:
        def on_signal(signum: int, _frame: object) -> None:
            event(log, "shutting down", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            return self.run()
        finally:
            self.close()

    # ------------------------------------------------------------ session

    def _metadata(self) -> list[tuple[str, str]]:
        return [(NODE_NAME_METADATA, self.name)] if self.config.insecure else []

    def _session(self) -> None:
        cfg = self.config
        tls = None
        if not cfg.insecure:
            assert cfg.tls_cert and cfg.tls_key and cfg.tls_ca
            tls = ClientTLS(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.tls_server_name)
        with channel(cfg.server, tls) as ch:
            stub = pb_grpc.AggregationStub(ch)
            reply = stub.Join(
                pb.JoinRequest(
                    key_fingerprint=self.fingerprint,
                    layout=self.layout.to_proto(),
                    node_name=cfg.name,
                    software_version=__version__,
                ),
                metadata=self._metadata(),
                timeout=30,
                wait_for_ready=True,
            )
            self.name, self.settings = reply.node_name, reply.settings
            event(
                log,
                "joined federation",
                node=self.name,
                latest_sum_round=reply.latest_sum_round,
                applied_round=self.applied_round,
                min_participants=self.settings.min_participants,
            )
            stream = stub.WatchRounds(
                pb.WatchRequest(since_round=self.applied_round), metadata=self._metadata()
            )
            self._stream = stream
            try:
                for ev in stream:
                    if self._stop.is_set():
                        return
                    self._handle(stub, ev)
            finally:
                self._stream = None

    def _handle(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent) -> None:
        if ev.kind == pb.RoundEvent.SUM_READY:
            if ev.round > self.applied_round:
                self._apply_sum(stub, ev)
        elif ev.kind == pb.RoundEvent.OPENED:
            self._take_part(stub, ev)
        elif ev.kind == pb.RoundEvent.FAILED and not ev.replay:
            event(
                log,
                "round failed",
                logging.WARNING,
                node=self.name,
                round=ev.round,
                reason=ev.reason,
            )
        elif ev.kind == pb.RoundEvent.CLOSED:
            event(log, "round closed", node=self.name, round=ev.round, participants=ev.participants)

    # ------------------------------------------------------------ train → encrypt → upload

    def _take_part(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent) -> None:
        fields: dict[str, Any] = {"node": self.name, "round": ev.round}
        if ev.base_round != self.applied_round:
            event(
                log,
                "skipping round: model is not at its base",
                logging.WARNING,
                base_round=ev.base_round,
                applied_round=self.applied_round,
                **fields,
            )
            return
        if self.store.submitted_round() == ev.round:
            return  # already acknowledged (e.g. the open round replayed after a reconnect)
        try:
            self._train_and_submit(stub, ev, fields)
        finally:
            # Whatever happened, the model goes back to the global one: the trained values
            # were only ever an input to this round's update.
            self.flat.load(self.global_values)

    def _train_and_submit(
        self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent, fields: dict[str, Any]
    ) -> None:
        t0 = time.perf_counter()
        try:
            result = self.trainer.train(self.model, RoundInfo(ev.round, ev.base_round, self.name))
            weight = sample_weight(int(result.num_samples), self.settings.weight_unit)
            # The trained values are read in place (no copy) while they are encrypted.
            local = self.flat.read()
            check_update(local, self.global_values, weight, self.settings.max_participants)
        except UpdateError as exc:
            event(log, f"not submitting: {exc}", logging.ERROR, **fields)
            return
        except Exception:
            log.exception("trainer failed in round %d; not submitting", ev.round, extra={"fields": fields})
            return
        t_train = time.perf_counter() - t0
        metrics.PHASE_SECONDS.labels("train").observe(t_train)
        header = pb.SubmitHeader(
            round=ev.round,
            base_round=ev.base_round,
            submission_id=self.store.submission_id(ev.round),
            layout_hash=self.layout.hash,
            key_fingerprint=self.fingerprint,
            num_values=self.layout.num_values,
            num_ciphertexts=codec.blocks_for(self.layout.num_values, self.pool.values_per_block),
            metrics=_rounded(result.metrics),
        )
        t1 = time.perf_counter()
        per_chunk = max(1, min(self.settings.max_ciphertexts_per_chunk, 16))
        try:
            receipt = stub.SubmitUpdate(
                submit_requests(
                    header,
                    track(
                        self.pool.encrypt(
                            weighted_blocks(local, self.global_values, weight, self.pool.values_per_block)
                        ),
                        header.num_ciphertexts,
                        f"round {ev.round}: encrypt+upload",
                        node=self.name,
                        round=ev.round,
                    ),
                    per_chunk,
                ),
                metadata=self._metadata(),
            )
        except grpc.RpcError as exc:
            if exc.code() in _TRANSIENT:
                raise
            event(
                log,
                f"server refused the update: {describe_rpc_error(exc)}",
                logging.WARNING,
                **fields,
            )
            return
        self.store.mark_submitted(ev.round, header.submission_id, receipt.receipt)
        metrics.ROUNDS_JOINED.inc()
        metrics.PHASE_SECONDS.labels("encrypt_upload").observe(time.perf_counter() - t1)
        event(
            log,
            "update submitted",
            samples=result.num_samples,
            train_s=round(t_train, 3),
            encrypt_upload_s=round(time.perf_counter() - t1, 3),
            bytes=receipt.num_bytes,
            duplicate=receipt.duplicate,
            **fields,
        )

    # ------------------------------------------------------------ fetch → decrypt → apply

    def _apply_sum(self, stub: pb_grpc.AggregationStub, ev: pb.RoundEvent) -> None:
        if ev.base_round != self.applied_round:
            raise NodeError(
                f"round {ev.round}'s sum builds on round {ev.base_round} but this node is at round "
                f"{self.applied_round}; its state directory does not belong to this federation"
            )
        t0 = time.perf_counter()
        per_block = self.pool.values_per_block
        n_ct = codec.blocks_for(self.layout.num_values, per_block)
        hook = getattr(self.trainer, "after_round", None)
        # The float64 average is only kept for a trainer that asks to see it.
        wants_mean = hook is not None and getattr(self.trainer, "wants_mean_update", True)
        mean = np.empty(self.layout.num_params) if wants_mean else None
        applier = SumApplier(self.global_values, self.flat.read(), per_block, mean)
        participants = [0]

        def blobs() -> Any:
            for blob, count in fetch_sum(stub, ev.round, n_ct, self.layout.hash, self._metadata()):
                participants[0] = count
                yield blob

        decrypted = track(
            self.pool.decrypt(blobs()),
            n_ct,
            f"round {ev.round}: download+decrypt",
            node=self.name,
            round=ev.round,
        )
        try:
            for block in decrypted:
                failpoints.hit("node.download")
                applier.feed(block)
            if applier.blocks != n_ct:
                raise UpdateError(f"the sum arrived with {applier.blocks} of {n_ct} blocks")
        except UpdateError as exc:
            self.flat.load(self.global_values)
            raise NodeError(f"round {ev.round}: {exc}") from exc
        except BaseException:
            self.flat.load(self.global_values)  # a broken download leaves the global model as it was
            raise
        t_apply = time.perf_counter()
        metrics.PHASE_SECONDS.labels("download_decrypt").observe(t_apply - t0)
        self.flat.commit()
        failpoints.hit("node.applying")
        self.store.save(Checkpoint(ev.round, self.layout.hash, {n: t for n, t in self.tensors}))
        self.global_values[:] = self.flat.read()
        self.applied_round = ev.round
        metrics.APPLIED_ROUND.set(ev.round)
        metrics.PHASE_SECONDS.labels("apply").observe(time.perf_counter() - t_apply)
        event(
            log,
            "applied round sum",
            node=self.name,
            round=ev.round,
            participants=participants[0],
            fetch_decrypt_apply_s=round(time.perf_counter() - t0, 3),
        )
        if hook is not None:
            mean_update = split(self.tensors, mean) if mean is not None else {}
            try:
                hook(self.model, AppliedRound(ev.round, participants[0], mean_update))
            except Exception:
                log.exception("trainer after_round hook failed in round %d", ev.round)
