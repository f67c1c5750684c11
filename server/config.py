"""Settings of `cipherhive server` (TOML sections [server], [state], [tls], [rounds], [privacy],
[limits], [log])."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cipherhive.federation.optimizer_settings import (
    DEFAULT_BETA1,
    DEFAULT_BETA2,
    DEFAULT_TAU,
    OptimizerError,
    OptimizerSpec,
)
from cipherhive.privacy.schedule import MODES, PrivacySchedule, ScheduleError
from cipherhive.runtime.config import ConfigError, setting

#: The privacy floor: a sum of one update *is* that update.
MIN_PARTICIPANTS_FLOOR = 2


@dataclass
class ServerConfig:
    listen: str = setting("127.0.0.1:7443", "server", "address:port to serve gRPC on")
    state_dir: Path = setting(Path("server-state"), "server", "directory for the database, spool and sums")
    public_context: Path = setting(
        Path("public.ctx"), "server", "the federation's PUBLIC context from `cipherhive keygen`"
    )
    insecure: bool = setting(
        False, "server", "serve without TLS; node names are self-declared (development only)"
    )
    health_listen: str = setting(
        "", "server", "extra plaintext address serving only grpc.health.v1 (for probes); empty: off"
    )
    metrics_listen: str = setting(
        "", "server", "address:port for the Prometheus metrics endpoint (HTTP); empty: off"
    )
    grace_seconds: float = setting(
        10.0,
        "server",
        "how long shutdown waits for uploads in flight (other streams end at once, UNAVAILABLE)",
    )
    database: str = setting(
        "",
        "state",
        "PostgreSQL URL for the round state, postgresql://user@host:5432/dbname, without a password "
        "(empty: SQLite in state_dir); spool and sums stay in state_dir",
    )
    password_file: Path | None = setting(
        None, "state", "file (mode 0600) holding the database's password; unset: PGPASSWORD or ~/.pgpass"
    )
    lease_seconds: float = setting(
        5.0,
        "state",
        "with a database: how long the active server's lease lasts unrenewed (renewed every fifth of "
        "it); a standby server on the same database takes over once it expires",
    )
    tls_cert: Path | None = setting(
        None, "tls", "server certificate (PEM) from `cipherhive certs issue --role server`"
    )
    tls_key: Path | None = setting(None, "tls", "server private key (PEM)")
    tls_ca: Path | None = setting(
        None, "tls", "federation CA certificate (PEM); clients must present a certificate it signed"
    )
    tls_crl: Path | None = setting(None, "tls", "revocation list (PEM), reloaded when it changes")
    allow_missing_crl: bool = setting(
        False,
        "tls",
        "start without a revocation list (tls_crl unset or missing); revoked certificates are then accepted",
    )
    layout: Path | None = setting(
        None,
        "federation",
        "model layout (JSON from `cipherhive node layout`) to pin at start; otherwise pin it with "
        "`cipherhive ctl federation init`",
    )
    min_participants: int = setting(
        3, "rounds", "distinct nodes a round needs before its sum is released (at least 2)"
    )
    timeout_seconds: float = setting(
        600.0, "rounds", "a round closes this long after it opens, with whoever submitted"
    )
    auto_start: bool = setting(
        True, "rounds", "open a round by itself when at least min_participants nodes are online"
    )
    interval_seconds: float = setting(2.0, "rounds", "pause between a round closing and the next one opening")
    max_rounds: int = setting(0, "rounds", "stop opening rounds after this many published sums (0: never)")
    weight_unit: float = setting(
        1000.0, "rounds", "samples per unit of FedAvg weight (keeps encrypted values in range)"
    )
    max_participants: int = setting(64, "rounds", "most members one round may have (bounds encoded values)")
    missed_rounds_limit: int = setting(
        3, "rounds", "a node that missed this many rounds in a row is not expected until it submits again"
    )
    keep_sums: int = setting(
        0, "rounds", "published sums kept for nodes that catch up (0: all); older ones are deleted"
    )
    masked: bool = setting(
        True,
        "rounds",
        "mask every contribution inside its ciphertext (SecAgg double masking): members enrol, "
        "commit and release a self-mask seed before a sum is published; needs mutual TLS "
        "(off with --insecure)",
    )
    enrol_seconds: float = setting(
        30.0,
        "rounds",
        "masked rounds: the roster is fixed once every expected node enrolled, or after this (at most half "
        "the round's timeout)",
    )
    step_seconds: float = setting(
        30.0,
        "rounds",
        "masked rounds: each step after training has this long: a commit after its upload's receipt, "
        "every seed after the COMMITS event, and a roster member whose connection dropped to come back "
        "before the round goes on without it",
    )
    exclude_rounds: int = setting(
        2,
        "rounds",
        "a member named for a failed round (a missed or refused signed step) is left out of this many "
        "following rosters, doubled for each earlier offence in the last exclude_window rounds "
        "(0: never excluded); `cipherhive ctl nodes readmit NAME` lifts it",
    )
    exclude_window: int = setting(
        100, "rounds", "offences older than this many rounds no longer count, and no exclusion lasts longer"
    )
    withdraw_on_majority: bool = setting(
        True, "rounds", "withdraw a published round once most of its participants report rejecting it"
    )
    optimizer: str = setting(
        "fedavg",
        "optimizer",
        "what every node does with the decrypted average: fedavg, fedavgm, fedadam or fedyogi "
        "(Reddi et al., ICLR 2021); fixed once a round is published",
    )
    learning_rate: float = setting(
        0.0, "optimizer", "server learning rate η (0: 1 for fedavg and fedavgm, 0.01 for fedadam and fedyogi)"
    )
    beta1: float = setting(
        DEFAULT_BETA1, "optimizer", "momentum of fedavgm, first-moment decay of fedadam and fedyogi"
    )
    beta2: float = setting(DEFAULT_BETA2, "optimizer", "second-moment decay of fedadam and fedyogi")
    tau: float = setting(DEFAULT_TAU, "optimizer", "adaptivity τ of fedadam and fedyogi: η·m / (√v + τ)")
    dp_mode: str = setting(
        "off",
        "privacy",
        "differential privacy the federation announces: off, record (record-level DP-SGD on every "
        "member, each accounting its own ε; uniform FedAvg weights), or member (member-level "
        "distributed DP: each member clips its whole update and adds discrete Gaussian noise)",
    )
    dp_rounds: int = setting(
        0, "privacy", "rounds the DP schedule plans, which members budget for (0: max_rounds)"
    )
    dp_sample_rate: float = setting(
        0.0, "privacy", "probability that a record joins a local batch (Poisson sampling)"
    )
    dp_noise_multiplier: float = setting(0.0, "privacy", "noise standard deviation / clipping norm")
    dp_steps_per_round: int = setting(0, "privacy", "local DP-SGD steps per round (not epochs)")
    dp_max_grad_norm: float = setting(
        1.0, "privacy", "clipping norm: of each record's gradient (record), of each update (member)"
    )
    dp_min_members: int = setting(
        0, "privacy", "member: the floor k the noise is split over (0: min_participants)"
    )
    dp_colluders: int = setting(
        0, "privacy", "member: colluding members t tolerated, at most dp_min_members - 1"
    )
    dp_grid_bits: int = setting(16, "privacy", "member: updates are rounded to multiples of 2^-dp_grid_bits")
    max_workers: int = setting(
        8,
        "limits",
        "threads for ciphertext parsing and database work (open streams cost no thread; they wait on "
        "the event loop)",
    )
    ingest_workers: int = setting(
        0,
        "limits",
        "processes that check and add masked uploads, each owning a stripe of the sum's blocks "
        "(0: one per core; 1: in the server process)",
    )
    max_concurrent_rpcs: int = setting(
        2048,
        "limits",
        "calls in progress (streams included) beyond this are refused with RESOURCE_EXHAUSTED; admin "
        "certificates may use admin_reserved_rpcs more",
    )
    max_message_bytes: int = setting(4 * 1024 * 1024, "limits", "largest gRPC message accepted")
    max_ciphertexts_per_chunk: int = setting(16, "limits", "ciphertexts one upload chunk may carry")
    requests_per_second: float = setting(
        20.0, "limits", "new calls per second one identity may make (token bucket refill)"
    )
    request_burst: int = setting(60, "limits", "calls one identity may make in a burst")
    max_streams_per_identity: int = setting(
        8, "limits", "calls one identity may have in progress at once (watch, upload, download, ...)"
    )
    max_concurrent_transfers: int = setting(
        4,
        "limits",
        "uploads and downloads of ciphertexts served at once; more wait their turn (bounds memory by "
        "the model size, not the number of members)",
    )
    heartbeat_seconds: float = setting(10.0, "limits", "interval of heartbeat events on watch streams")
    stream_idle_seconds: float = setting(
        30.0,
        "limits",
        "an upload or other client stream that sends nothing for this long is cut (and rolled back)",
    )
    min_upload_bytes_per_second: float = setting(
        32768.0, "limits", "an upload slower than this on average is cut (and rolled back)"
    )
    admin_reserved_rpcs: int = setting(
        16, "limits", "calls kept free for admin certificates beyond max_concurrent_rpcs"
    )
    log_level: str = setting("INFO", "log", "DEBUG, INFO, WARNING or ERROR")
    log_json: bool = setting(False, "log", "write JSON lines instead of readable lines")
    audit_file: Path | None = setting(None, "log", "also append the audit trail (JSON lines) to this file")

    def optimizer_spec(self) -> OptimizerSpec:
        """The validated ``[optimizer]`` settings (what the server announces to every node)."""
        return OptimizerSpec.make(self.optimizer, self.learning_rate, self.beta1, self.beta2, self.tau)

    def __post_init__(self) -> None:
        try:
            self.optimizer_spec()
        except OptimizerError as exc:
            raise ConfigError(str(exc)) from None
        if self.min_participants < MIN_PARTICIPANTS_FLOOR:
            raise ConfigError(
                f"min_participants = {self.min_participants} would release a single member's "
                f"update; it must be at least {MIN_PARTICIPANTS_FLOOR}"
            )
        if self.database:
            from cipherhive.server.storage.postgres import check_url

            try:
                check_url(self.database)
            except ValueError as exc:
                raise ConfigError(f"[state] database: {exc}") from None
        if not 1.0 <= self.lease_seconds <= 600.0:
            raise ConfigError("[state] lease_seconds must be 1 to 600")
        if self.missed_rounds_limit < 1 or self.keep_sums < 0:
            raise ConfigError("missed_rounds_limit must be at least 1 and keep_sums at least 0")
        if self.ingest_workers < 0 or self.ingest_workers > 256:
            raise ConfigError("ingest_workers must be 0 (one per core) to 256")
        if self.max_workers < 1 or self.max_concurrent_rpcs < 1 or self.admin_reserved_rpcs < 0:
            raise ConfigError(
                "max_workers and max_concurrent_rpcs must be at least 1, admin_reserved_rpcs >= 0"
            )
        if self.stream_idle_seconds <= 0 or self.min_upload_bytes_per_second < 0:
            raise ConfigError("stream_idle_seconds must be positive and min_upload_bytes_per_second >= 0")
        if self.max_participants < self.min_participants:
            raise ConfigError("max_participants must be at least min_participants")
        if self.enrol_seconds <= 0 or self.step_seconds <= 0:
            raise ConfigError("enrol_seconds and step_seconds must be positive")
        if self.exclude_rounds < 0 or self.exclude_window < 1:
            raise ConfigError("exclude_rounds must be at least 0 and exclude_window at least 1")
        if self.timeout_seconds <= 0 or self.weight_unit <= 0:
            raise ConfigError("timeout_seconds and weight_unit must be positive")
        if not 1 <= self.max_ciphertexts_per_chunk <= 60:
            raise ConfigError("max_ciphertexts_per_chunk must be 1..60 (each is ~66 KB)")
        if self.max_message_bytes < 70_000 * self.max_ciphertexts_per_chunk:
            raise ConfigError("max_message_bytes is too small for max_ciphertexts_per_chunk")
        if self.dp_mode not in MODES:
            raise ConfigError(f"dp_mode must be one of {', '.join(MODES)}")
        if self.dp_mode != "off":
            self.dp_rounds = self.dp_rounds or self.max_rounds
            if self.max_rounds == 0:
                self.max_rounds = self.dp_rounds
            if self.max_rounds > self.dp_rounds:
                raise ConfigError("max_rounds must not exceed dp_rounds: members budget for dp_rounds")
        if self.dp_mode == "member" and self.dp_min_members > self.min_participants:
            raise ConfigError(
                f"dp_min_members = {self.dp_min_members} exceeds min_participants = {self.min_participants}: "
                "rounds smaller than the floor the noise is split over would carry too little noise"
            )
        try:
            self.privacy_schedule()
        except ScheduleError as exc:
            raise ConfigError(f"[privacy]: {exc}") from exc
        if not self.insecure:
            missing = [n for n in ("tls_cert", "tls_key", "tls_ca") if getattr(self, n) is None]
            if missing:
                raise ConfigError(
                    f"mutual TLS needs {', '.join('--' + m.replace('_', '-') for m in missing)} "
                    "(make them with `cipherhive certs`), or pass --insecure for a local test"
                )

    def privacy_schedule(self) -> PrivacySchedule:
        """The DP schedule announced to members in ``FederationSettings.privacy``."""
        if self.dp_mode == "off":
            return PrivacySchedule()
        return PrivacySchedule(
            self.dp_mode,
            self.dp_rounds,
            self.dp_sample_rate,
            self.dp_noise_multiplier,
            self.dp_steps_per_round,
            self.dp_max_grad_norm,
            *(
                (self.dp_min_members or self.min_participants, self.dp_colluders, self.dp_grid_bits)
                if self.dp_mode == "member"
                else ()
            ),
        )
