"""Client channels to the server: mutual TLS by default, plaintext only when asked.

Shared by the node daemon, `cipherhive ctl` and the demo, so every client
uses the same keepalive, message-size and retry settings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from cipherhive.fsutil import require_private_file

log = logging.getLogger("cipherhive.transport")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Where an --insecure client declares its node name (no certificate to take it from).
NODE_NAME_METADATA = "x-cipherhive-node"

# Retry only what is safe to repeat: unary calls that change nothing, on UNAVAILABLE.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "cipherhive.v1.Aggregation", "method": "Join"},
                    {"service": "cipherhive.v1.Admin"},
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


@dataclass(frozen=True)
class ClientTLS:
    """A client's certificate, key and the federation CA (from `cipherhive certs`)."""

    cert: Path
    key: Path
    ca: Path
    server_name: str = ""  # override the host name checked in the server certificate


def channel(address: str, tls: ClientTLS | None) -> grpc.Channel:
    """A channel with keepalive and size limits; ``tls=None`` means plaintext.

    Raises FileNotFoundError for a TLS file it cannot read and ``PrivateFileError``
    (a PermissionError) for a private key the group or others may read.
    """
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
    ]
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    try:
        ca, key, cert = tls.ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(
            f"cannot read TLS file {exc.filename}: {exc.strerror} (make them with `cipherhive certs`)"
        ) from exc
    # A key other local users can read is a key they hold (PrivateFileError: a PermissionError).
    require_private_file(tls.key, "TLS private key")
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, creds, options=options)


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """``CODE: details`` for log lines and CLI errors."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'UNKNOWN'}: {details}"
