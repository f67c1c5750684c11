"""`cipherhive server`: wire the pieces together and run until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cipherhive.ckks import codec, keys
from cipherhive.pki import certs
from cipherhive.runtime import fsutil
from cipherhive.runtime.errors import UserError
from cipherhive.runtime.logs import event
from cipherhive.server import metrics
from cipherhive.server.api.guard import Guard, Runner
from cipherhive.server.api.identity import Authenticator
from cipherhive.server.api.limits import Admission, Transfers
from cipherhive.server.api.servicers import AdminService, AggregationService
from cipherhive.server.config import ServerConfig
from cipherhive.server.ingest.workers import IngestWorkers
from cipherhive.server.rounds.manager import RoundManager
from cipherhive.server.standby import LeaseKeeper, holder_id, wait_for_lease
from cipherhive.server.storage.backend import open_store
from cipherhive.server.storage.postgres import PostgresState
from cipherhive.server.storage.spool import Spool
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.server")
R = TypeVar("R")
#: The health service a standby reports SERVING (and every other NOT_SERVING) on ``health_listen``.
STANDBY_HEALTH = "cipherhive.standby"
#: SERVING while the process is alive, active or standby: what a liveness probe asks
#: (deploy/kubernetes-standby), where readiness asks "" (SERVING only while active).
LIVE_HEALTH = "cipherhive.live"


class StartupError(UserError, RuntimeError):
    """The server cannot start; the message says what to fix."""


class StoppedInStandby(Exception):
    """A stop signal ended the server while it waited as a standby: it held nothing (exit 0)."""


def _read(path: Path | None, what: str) -> bytes:
    assert path is not None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _bind(add_port: Callable[[], int], address: str, setting: str) -> int:
    """Bind a port; grpc reports failure by returning 0 or raising RuntimeError, by version."""
    try:
        port = add_port()
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {address} ([server] {setting}): address in use or not local")
    return port


class Server:
    """The aggregator: gRPC services (asyncio), round scheduler, health status.

    gRPC runs on an asyncio event loop in its own thread, so an open stream costs
    a task, not a thread; blocking work goes to a bounded pool (``Runner``). The
    round scheduler keeps its own thread. ``start()`` and ``stop()`` are plain
    blocking calls, as they were with the threaded server.
    """

    def __init__(
        self,
        config: ServerConfig,
        baseline: tuple[codec.ServerCodec, str] | None = None,
        stopped: threading.Event | None = None,
    ) -> None:
        """``baseline`` (codec, fingerprint) is for `cipherhive bench` only: it replaces the
        product's encoding with a benchmark baseline; no command of the product sets it.
        ``stopped``: set by a stop signal; it ends a standby's wait (:class:`StoppedInStandby`)."""
        self.config = config
        self._check_tls_files()
        self.codec: codec.ServerCodec
        if baseline is not None:
            self.codec, self.fingerprint = baseline
        else:
            try:
                public_bytes = keys.read_public_context(config.public_context)
                self.codec = codec.PublicCodec(public_bytes)
            except (OSError, codec.CodecError) as exc:
                raise StartupError(str(exc)) from exc
            self.fingerprint = keys.fingerprint_of_file(config.public_context)
        # Held for this process's life, before anything in the directory is touched: a second
        # server would otherwise recover and serve the same round. With PostgreSQL the lease in
        # the database takes its place (docs/how-to/operator.md#standby-server): an active
        # server and its standby share one state directory, and a paused former leader would
        # keep a flock for ever, where its lease expires and its writes are fenced.
        self._state_lock = None if config.database else fsutil.StateDirLock(config.state_dir, "server")
        self._done = threading.Event()
        self.fatal = ""
        self._lease: LeaseKeeper | None = None
        self._lease_gone = False
        self.state = open_store(config.state_dir, config.database, config.password_file)
        if isinstance(self.state, PostgresState):
            self._take_lease(self.state, stopped)
        try:
            stored = self.state.get_meta("key_fingerprint")
            if stored is not None and stored != self.fingerprint:
                raise StartupError(
                    f"{config.public_context} is not the key this state directory was created with "
                    f"(fingerprint {self.fingerprint[:16]}… vs {stored[:16]}…); its stored sums could "
                    "not be decrypted by the members. Use the original public.ctx or a new --state-dir."
                )
            self.state.set_meta("key_fingerprint", self.fingerprint)
            token = self.state.fencing_token if isinstance(self.state, PostgresState) else None
            self.spool = Spool(config.state_dir, token)
            self.rounds = RoundManager(config, self.state, self.spool, self.codec, self.fingerprint)
        except BaseException:
            self._close_store()  # gives the lease back: a standby need not wait for it
            raise
        workers = config.ingest_workers or len(os.sched_getaffinity(0))
        try:
            if workers > 1 and isinstance(self.codec, codec.PublicCodec):
                self.rounds.ingest = IngestWorkers(workers, self.codec.upload_parser(), self._ingest_lost)
            self.rounds.recover()
        except BaseException:
            # The ingest workers ignore stop signals (runtime.child_signals): a start-up that
            # fails or is interrupted here must end them itself, or exit would wait on them.
            self.rounds.close()
            self._close_store()
            raise
        self._stop = threading.Event()
        self._revocations: certs.RevocationList | None = None
        if not config.insecure and config.tls_crl is not None:
            assert config.tls_ca is not None
            self._revocations = certs.RevocationList(config.tls_crl, ca_cert=config.tls_ca)
        self.rounds.revocations = self._revocations
        self.run = Runner(config.max_workers)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

    def _take_lease(self, store: PostgresState, stopped: threading.Event | None) -> None:
        """Wait as a standby until this server holds the lease, then keep it renewed. A
        standby serves nothing but, on ``health_listen``, NOT_SERVING (so that a probe keeps
        it out of the Service), and the status ``cipherhive.standby`` SERVING."""
        try:
            standby_health = self._standby_health()
        except BaseException:
            store.close()
            raise
        try:
            taken = wait_for_lease(store, holder_id(), self.config.lease_seconds, stopped)
        except BaseException:
            store.close()
            raise
        finally:
            if standby_health is not None:
                standby_health.stop(0).wait()
        if not taken:
            store.close()
            raise StoppedInStandby()
        store.on_fenced = self._lease_lost
        self._lease = LeaseKeeper(store, self.config.lease_seconds, self._lease_lost)
        self._lease.start()

    def _standby_health(self) -> grpc.Server | None:
        if not self.config.health_listen:
            return None
        from concurrent import futures

        servicer = health.HealthServicer()
        for service in ("", "cipherhive.v1.Aggregation", "cipherhive.v1.Admin"):
            servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        servicer.set(STANDBY_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        servicer.set(LIVE_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), maximum_concurrent_rpcs=64)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        _bind(
            lambda: server.add_insecure_port(self.config.health_listen),
            self.config.health_listen,
            "health_listen",
        )
        server.start()
        return server

    def _lease_lost(self, why: str) -> None:
        """Another server holds the lease now: stop serving at once, loudly (exit 1); the
        store already refuses every write (``Fenced``)."""
        if not self.fatal:
            self.fatal = why
            log.critical("%s; stopping", why)
        self._lease_gone = True
        self._done.set()

    def _close_store(self) -> None:
        """Stop renewing and give the lease back (a standby takes over at once), then close."""
        if self._lease is not None:
            self._lease.stop()
            self._lease = None
        if isinstance(self.state, PostgresState):
            self.state.release_lease()
        self.state.close()
        if self._state_lock is not None:
            self._state_lock.release()

    def _ingest_lost(self, why: str) -> None:
        """An ingest worker died: the round's shared sum may be half-added, so stop loudly.

        The restarted server rebuilds the open round's sum from the acknowledged spool.
        """
        self.fatal = f"{why}; stopping so that a restart rebuilds the round's sum from the spool"
        log.critical(self.fatal)
        self._done.set()

    def _check_tls_files(self) -> None:
        """Refuse what would weaken mutual TLS: a readable private key, no revocation list."""
        cfg = self.config
        if cfg.insecure:
            return
        assert cfg.tls_key is not None
        try:
            fsutil.require_private_file(cfg.tls_key, "TLS private key")
        except fsutil.PrivateFileError as exc:
            raise StartupError(str(exc)) from exc
        if cfg.allow_missing_crl:
            return
        if cfg.tls_crl is None:
            raise StartupError(
                "mutual TLS without a revocation list would accept revoked certificates: set "
                "[tls] tls_crl to the CA's crl.pem (written by `cipherhive certs`), or "
                "allow_missing_crl = true to run without one"
            )
        if not cfg.tls_crl.is_file():
            raise StartupError(
                f"revocation list {cfg.tls_crl} does not exist: copy the CA's crl.pem there "
                "(`cipherhive certs` writes it), or set [tls] allow_missing_crl = true"
            )

    async def _build(self) -> None:
        """Create and bind the gRPC servers (on the event loop, which grpc.aio requires)."""
        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
            ("grpc.http2.bdp_probe", 0),
        ]
        auth = Authenticator(insecure=cfg.insecure, revocations=self._revocations)
        admission = Admission(
            cfg.requests_per_second,
            cfg.request_burst,
            cfg.max_streams_per_identity,
            cfg.max_concurrent_rpcs,
            cfg.admin_reserved_rpcs,
        )
        guard = Guard(auth, admission, idle=cfg.stream_idle_seconds, min_rate=cfg.min_upload_bytes_per_second)
        self.guard = guard
        # The guard enforces the precise caps (with the admin reserve); gRPC's own cap is
        # only a backstop above them.
        server = grpc.aio.server(
            interceptors=[guard],
            options=options,
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs + cfg.admin_reserved_rpcs + 64,
        )
        transfers = Transfers(cfg.max_concurrent_transfers)
        pb_grpc.add_AggregationServicer_to_server(
            AggregationService(
                self.rounds, self.run, transfers, auth, self._stop.is_set, cfg.stream_idle_seconds
            ),
            server,
        )
        pb_grpc.add_AdminServicer_to_server(
            AdminService(self.rounds, self.run, auth, time.time(), self._stop.is_set), server
        )
        self.health = health.aio.HealthServicer()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            pb.DESCRIPTOR.services_by_name["Aggregation"].full_name,
            pb.DESCRIPTOR.services_by_name["Admin"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        if cfg.insecure:
            log.warning(
                "INSECURE MODE: no TLS, node names are self-declared and traffic is readable on "
                "the network. Never use --insecure across machines."
            )
            port = _bind(lambda: server.add_insecure_port(cfg.listen), cfg.listen, "listen")
        else:
            creds = grpc.ssl_server_credentials(
                [(_read(cfg.tls_key, "TLS key"), _read(cfg.tls_cert, "TLS certificate"))],
                root_certificates=_read(cfg.tls_ca, "CA certificate"),
                require_client_auth=True,
            )
            port = _bind(lambda: server.add_secure_port(cfg.listen, creds), cfg.listen, "listen")
        self.port = port
        self.grpc_server = server
        self.health_server: grpc.aio.Server | None = None
        if cfg.health_listen:
            # Kubernetes' native gRPC probes cannot present a client certificate; health
            # status is all this plaintext port serves (no guard: there is no identity).
            self.health_server = grpc.aio.server(maximum_concurrent_rpcs=64)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            health_server = self.health_server
            _bind(
                lambda: health_server.add_insecure_port(cfg.health_listen), cfg.health_listen, "health_listen"
            )

    async def _set_health(self, status: int) -> None:
        for service in ("", "cipherhive.v1.Aggregation", "cipherhive.v1.Admin", LIVE_HEALTH):
            await self.health.set(service, status)

    def _on_loop(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run ``coro`` on the server's event loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _start_async(self) -> None:
        await self._build()
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()

    def start(self) -> None:
        if self.config.metrics_listen:
            metrics.serve(self.config.metrics_listen)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._loop_thread.start()
        try:
            self._on_loop(self._start_async())
        except BaseException:
            self._close_loop()
            raise
        self._scheduler = threading.Thread(
            target=self.rounds.run_scheduler, args=(self._stop,), name="scheduler", daemon=True
        )
        self._scheduler.start()
        self._on_loop(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        event(
            log,
            "server listening",
            address=self.config.listen,
            port=self.port,
            fingerprint=self.fingerprint[:16],
            min_participants=self.config.min_participants,
            tls=not self.config.insecure,
            worker_threads=self.config.max_workers,
        )

    async def _stop_async(self) -> None:
        """Tell every client first, then stop: each open stream to a client (round events,
        downloads, health watches) ends at once with UNAVAILABLE "the server is shutting down",
        which nodes take as a restart and reconnect to within seconds
        (docs/how-to/operator.md#restart-the-server). Only uploads keep ``grace_seconds`` to
        finish: one acknowledged in that time is durable, one cut after it is rolled back."""
        await self.health.enter_graceful_shutdown()
        self._stop.set()
        self.guard.end_streams()
        self.rounds.bus.close_all()
        # Fenced: no upload can be acknowledged any more, so none is waited for.
        await self.grpc_server.stop(0 if self._lease_gone else self.config.grace_seconds)
        if self.health_server is not None:
            await self.health_server.stop(0)

    def _close_loop(self) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def stop(self) -> None:
        """Graceful: NOT_SERVING, refuse new calls, let calls in flight finish within the grace period."""
        self._on_loop(self._stop_async())
        self._close_loop()
        self._scheduler.join(timeout=5)
        self.run.shutdown()
        self.rounds.close()
        self._close_store()
        event(log, "server stopped")

    def reload(self) -> bool:
        """SIGHUP: re-read the revocation list and re-check the public context file.

        A context file that now holds a secret key, or another federation's key,
        is refused: the running server keeps the context it has.
        """
        if self._revocations is not None:
            self._revocations.refresh()
        try:
            fresh = keys.read_public_context(self.config.public_context)
            codec.PublicCodec(fresh)
            fingerprint = keys.fingerprint_of_file(self.config.public_context)
        except (OSError, codec.CodecError) as exc:
            log.error("reload refused, keeping the loaded public context: %s", exc)
            return False
        if fingerprint != self.fingerprint:
            log.error(
                "reload refused: %s holds another federation's key (fingerprint %s…, serving %s…)",
                self.config.public_context,
                fingerprint[:16],
                self.fingerprint[:16],
            )
            return False
        event(log, "reloaded", fingerprint=fingerprint[:16])
        return True

    def abandon(self) -> None:
        """Close a server that was built but never started (stopped during start-up)."""
        self.run.shutdown()
        self.rounds.close()
        self._close_store()

    def serve_forever(self, stopped: threading.Event | None = None) -> int:
        """Serve until SIGTERM or SIGINT; ``stopped``: set by a stop signal during start-up."""
        done = self._done

        def on_signal(signum: int, _frame: object) -> None:
            event(log, "shutting down", signal=signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, lambda _s, _f: self.reload())
        if stopped is not None and stopped.is_set():
            event(log, "stopped during start-up, before serving")
            self.abandon()
            return 0
        self.start()
        done.wait()
        self.stop()
        return 1 if self.fatal else 0
