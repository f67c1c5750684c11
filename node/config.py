"""Settings of `cipherhive node` (TOML sections [node], [tls], [trainer], [privacy], [log])."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipherhive.node.training.plugin_paths import resolve_folders, resolve_options
from cipherhive.runtime.config import ConfigError, setting


@dataclass
class NodeConfig:
    server: str = setting("127.0.0.1:7443", "node", "aggregator address:port")
    secret_context: Path = setting(Path("secret.ctx"), "node", "the federation's SECRET context (mode 0600)")
    state_dir: Path = setting(Path("node-state"), "node", "directory for this node's checkpoint")
    workers: int = setting(0, "node", "processes for encryption and decryption (0: all cores)")
    name: str = setting(
        "", "node", "node name; only used with --insecure (TLS takes it from the certificate)"
    )
    insecure: bool = setting(False, "node", "connect without TLS (development only)")
    metrics_listen: str = setting(
        "", "node", "address:port for the Prometheus metrics endpoint (HTTP); empty: off"
    )
    max_backoff_seconds: float = setting(30.0, "node", "longest wait between reconnect attempts")
    min_participants: int = setting(
        3,
        "node",
        "this node's own participation floor (at least 2): it neither submits to a round opened "
        "with a lower floor nor applies a sum of fewer members; the server cannot lower it",
    )
    max_update_value: float = setting(
        10.0,
        "node",
        "largest |mean update| per value a sum may carry; a sum beyond it is rejected, not applied",
    )
    keep_checkpoints: int = setting(
        5, "node", "applied rounds whose checkpoints are kept for rolling back a withdrawn round"
    )
    report_metrics: bool = setting(
        False,
        "node",
        "send rounded local loss/accuracy with each update; DISCLOSURE: the server can infer "
        "sample counts from them (off: the server gets no plaintext metrics)",
    )
    tls_cert: Path | None = setting(
        None, "tls", "this node's certificate (PEM) from `cipherhive certs issue --role node`"
    )
    tls_key: Path | None = setting(None, "tls", "this node's private key (PEM)")
    tls_ca: Path | None = setting(None, "tls", "federation CA certificate (PEM)")
    tls_server_name: str = setting(
        "", "tls", "host name to expect in the server certificate, if not the address"
    )
    members: list[str] = setting(
        [],
        "masking",
        "the federation's members (names, or SHA-256 fingerprints of their TLS or enrolment "
        "certificates): this node takes part only in masked rounds whose roster is drawn from them",
    )
    enrol_cert: Path | None = setting(
        None, "masking", "enrolment certificate (default: NAME.enrol.crt next to tls_cert)"
    )
    enrol_key: Path | None = setting(
        None, "masking", "enrolment key (default: NAME.enrol.key next to tls_key)"
    )
    crl: Path | None = setting(
        None,
        "masking",
        "the federation CA's revocation list (PEM), checked for every roster member (default: "
        "crl.pem next to tls_ca); a masked round is refused while it is missing",
    )
    plugin: str = setting("", "trainer", "training plug-in as package.module:object")
    python_path: list[str] = setting(
        [],
        "trainer",
        "folders added to sys.path before the plug-in is imported (relative to the TOML file)",
        relative=resolve_folders,
    )
    options: dict[str, Any] = setting(
        {},
        "trainer",
        "keyword arguments for the plug-in factory (TOML table); relative paths in options named "
        "`path`, `dir`, `file` or `*_path`, `*_dir`, `*_file` are resolved against the TOML file's folder",
        relative=resolve_options,
    )
    max_epsilon: float = setting(
        0.0,
        "privacy",
        "this node's ε limit for its dataset, over every round it ever trains (record-level DP-SGD); "
        "0: no DP, and a federation that announces a DP schedule is refused",
    )
    delta: float = setting(
        1e-5, "privacy", "δ of the node's (ε, δ) guarantee; refused above 1/(10·N) for N training records"
    )
    dataset: str = setting(
        "", "privacy", "name of the training dataset the privacy ledger accounts for (required with DP)"
    )
    ledger_dir: Path = setting(
        Path("privacy-ledgers"),
        "privacy",
        "folder of the privacy ledgers, one per dataset (`cipherhive node privacy-init` creates one); "
        "keep it across state directories and back it up: a lost ledger stops DP training",
    )
    colluders: int = setting(
        0,
        "privacy",
        "member-level DP: colluding members this node tolerates (at most min_participants - 1); it "
        "refuses a schedule whose noise needs more honest members than min_participants - colluders",
    )
    insecure_seed: int | None = setting(
        None,
        "privacy",
        "FIXED seed for DP noise and sampling: INSECURE, for tests and reproducible tables only "
        "(unset: a fresh key from the operating system)",
    )
    log_level: str = setting("INFO", "log", "DEBUG, INFO, WARNING or ERROR")
    log_json: bool = setting(False, "log", "write JSON lines instead of readable lines")

    def enrolment_files(self) -> tuple[Path, Path, Path]:
        """(enrolment certificate, enrolment key, CRL), defaults next to the TLS files."""
        assert self.tls_cert is not None and self.tls_key is not None and self.tls_ca is not None
        cert = self.enrol_cert or self.tls_cert.with_name(self.tls_cert.stem + ".enrol.crt")
        key = self.enrol_key or self.tls_key.with_name(self.tls_key.stem + ".enrol.key")
        return cert, key, self.crl or self.tls_ca.with_name("crl.pem")

    def __post_init__(self) -> None:
        if not self.plugin:
            raise ConfigError("no trainer: set [trainer] plugin = 'package.module:object' or --plugin")
        if self.workers < 0:
            raise ConfigError("workers must be 0 (all cores) or more")
        if self.min_participants < 2:
            raise ConfigError(
                f"min_participants = {self.min_participants} would apply a single member's update "
                "as a sum; it must be at least 2"
            )
        if not 0 <= self.colluders <= self.min_participants - 1:
            raise ConfigError(
                f"colluders = {self.colluders} must be in [0, min_participants - 1]: with min_participants "
                "- 1 colluders masking can no longer hide a member, and noise cannot either"
            )
        if not self.max_update_value > 0:
            raise ConfigError("max_update_value must be a positive number")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be at least 1")
        if self.max_epsilon < 0 or not 0 < self.delta < 1:
            raise ConfigError("max_epsilon must be 0 (no DP) or positive, and delta in (0, 1)")
        if self.max_epsilon > 0:
            if not self.dataset:
                raise ConfigError("DP needs [privacy] dataset: the dataset's name, which keys its ledger")
            if self.report_metrics:
                raise ConfigError(
                    "report_metrics sends local metrics the privacy accountant does not cover; "
                    "it cannot be combined with DP (max_epsilon > 0)"
                )
        if self.insecure:
            if not self.name:
                raise ConfigError("--insecure needs a node --name (there is no certificate to take it from)")
        else:
            missing = [n for n in ("tls_cert", "tls_key", "tls_ca") if getattr(self, n) is None]
            if missing:
                raise ConfigError(
                    f"mutual TLS needs {', '.join('--' + m.replace('_', '-') for m in missing)} "
                    "(make them with `cipherhive certs`), or pass --insecure for a local test"
                )
