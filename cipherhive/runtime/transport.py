"""Client channels to the server: mutual TLS by default, plaintext only when asked.

Shared by the node daemon, `cipherhive ctl` and the demo, so every client
uses the same keepalive, message-size and retry settings, and explains a
failed TLS handshake the same way (:func:`diagnose_tls`): gRPC itself only
reports a handshake failure as UNAVAILABLE, or as DEADLINE_EXCEEDED after a
call has waited for a connection that will never come up.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509

from cipherhive.runtime.fsutil import require_private_file

log = logging.getLogger("cipherhive.runtime.transport")

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


# ---------------------------------------------------------------- explaining a failed handshake

#: OpenSSL verify codes (X509_V_ERR_*) a client sees for the server's certificate.
_HOSTNAME_MISMATCH = 62
_IP_MISMATCH = 64
_EXPIRED = 10
_NOT_YET_VALID = 9
_UNKNOWN_ISSUER = (2, 18, 19, 20, 21)


@dataclass(frozen=True)
class TLSSettings:
    """What the person calls each TLS setting, so a fix names the setting they must change."""

    cert: str = "tls_cert"
    key: str = "tls_key"
    ca: str = "tls_ca"
    server_name: str = "tls_server_name"


@dataclass(frozen=True)
class Diagnosis:
    """Why the TLS handshake fails, and what to change."""

    cause: str
    fix: str

    def __str__(self) -> str:
        return f"{self.cause}; fix: {self.fix}"


def wait_connected(ch: grpc.Channel, seconds: float) -> bool:
    """True if ``ch`` connects within ``seconds`` (a failing handshake never does)."""
    future = grpc.channel_ready_future(ch)
    try:
        future.result(timeout=seconds)
        return True
    except grpc.FutureTimeoutError:
        future.cancel()
        return False


def diagnose_tls(
    address: str, tls: ClientTLS, names: TLSSettings | None = None, timeout: float = 5.0
) -> Diagnosis | None:
    """Find why mutual TLS with ``address`` fails, by doing the handshake gRPC does; None if it works.

    Checked in order: this client's own certificate (expired, not yet valid), the
    server's certificate (name, issuer, validity) and then whether the server accepts
    this client's certificate (it answers a refusal with a TLS alert: unknown CA,
    expired, revoked). A server that cannot be reached at all is not a TLS problem:
    None, and the caller reports it as before.
    """
    names = names or TLSSettings()
    own = _own_certificate(tls, names)
    if own is not None:
        return own
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        return None
    expected = tls.server_name or host
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        context.load_cert_chain(str(tls.cert), str(tls.key))
        context.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError) as exc:
        return Diagnosis(
            f"the TLS files cannot be used together ({exc})",
            f"{names.cert} and {names.key} must be one pair from `cipherhive certs issue`, "
            f"{names.ca} the federation's ca.crt",
        )
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            try:
                with context.wrap_socket(raw, server_hostname=expected) as conn:
                    return _server_verdict(conn, names)
            except ssl.SSLCertVerificationError as exc:
                return _server_certificate_problem(exc, address, expected, tls, names, timeout)
            except ssl.SSLError as exc:
                return _alert(exc, names)
    except OSError:
        return None  # not reachable (refused, timed out): not a handshake problem


def _own_certificate(tls: ClientTLS, names: TLSSettings) -> Diagnosis | None:
    try:
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    except (OSError, ValueError):
        return None  # reported when the channel is made
    now = datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        return Diagnosis(
            f"this certificate ({tls.cert}) expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            f"ask the federation's CA holder for a new one (`cipherhive certs issue`) and set {names.cert} "
            f"and {names.key} to it",
        )
    if cert.not_valid_before_utc > now:
        return Diagnosis(
            f"this certificate ({tls.cert}) is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            "check this machine's clock",
        )
    return None


def _server_names(address: str, timeout: float) -> list[str]:
    """The DNS names and addresses in the server's certificate (read without verifying it)."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
        if der is None:
            return []
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except (OSError, ValueError, ssl.SSLError, x509.ExtensionNotFound):
        return []
    dns = san.value.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)]
    return [*dns, *ips]


def _server_certificate_problem(
    exc: ssl.SSLCertVerificationError,
    address: str,
    expected: str,
    tls: ClientTLS,
    names: TLSSettings,
    timeout: float,
) -> Diagnosis:
    code = exc.verify_code
    if code == _IP_MISMATCH:
        return _ip_mismatch(expected, _server_names(address, timeout), names)
    if code == _HOSTNAME_MISMATCH:
        found = _server_names(address, timeout)
        listed = f" (it names: {', '.join(found)})" if found else ""
        return Diagnosis(
            f"wrong server name: the server's certificate is not valid for {expected!r}{listed}",
            f"set {names.server_name} to a name in the server's certificate"
            + (f", e.g. {found[0]!r}" if found else "")
            + ", or connect to the server by that name",
        )
    if code in _UNKNOWN_ISSUER:
        return Diagnosis(
            f"unknown CA: the server's certificate was not issued by the CA in {names.ca} ({tls.ca})",
            f"set {names.ca} to the federation's ca.crt (the CA that issued the server's certificate), "
            "and check that the address is the federation's server",
        )
    if code == _EXPIRED:
        return Diagnosis(
            "the server's certificate has expired",
            "the server's operator must issue a new one (`cipherhive certs issue --role server`) and "
            "restart the server; nothing to change on this side",
        )
    if code == _NOT_YET_VALID:
        return Diagnosis("the server's certificate is not valid yet", "check the clocks of both machines")
    return Diagnosis(
        f"the server's certificate does not verify: {exc.verify_message}",
        f"check {names.ca} and {names.server_name}",
    )


def _ip_mismatch(expected: str, found: list[str], names: TLSSettings) -> Diagnosis:
    """Connected by an IP address the server's certificate does not hold: name what it holds.

    A certificate issued for a DNS name and reached through the machine's address is the common
    case (docs/troubleshooting.md, "TLS: the server name"); the address can stay if the client
    expects one of the certificate's names instead.
    """
    listed = f"it names: {', '.join(found)}" if found else "no name in it could be read"
    example = f" such as {found[0]!r}" if found else ""
    return Diagnosis(
        f"wrong server address: the server's certificate is not valid for the IP address {expected!r} "
        f"({listed})",
        f"connect to the server by a name in its certificate{example}, or keep the address and set "
        f"{names.server_name} to that name, or have the server's operator reissue its certificate with "
        f"this address too (`cipherhive certs issue --role server --replace --host {expected}`, one "
        "--host per name and address it is reached by)",
    )


def _alert(exc: ssl.SSLError, names: TLSSettings) -> Diagnosis | None:
    """The server refused this client's certificate with a TLS alert: say which."""
    reason = (exc.reason or str(exc)).upper()
    if "REVOKED" in reason:
        return Diagnosis(
            "the server refused this certificate: it has been revoked",
            "ask the federation's CA holder for a new certificate; a revoked one is never accepted again",
        )
    if "EXPIRED" in reason:
        return Diagnosis(
            "the server refused this certificate as expired",
            f"ask the federation's CA holder for a new one and set {names.cert} and {names.key} to it "
            "(or check this machine's clock)",
        )
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
        return Diagnosis(
            f"the server refused this certificate ({exc.reason}): it was not issued by the federation's CA",
            f"set {names.cert} and {names.key} to the pair `cipherhive certs issue` made with the "
            "federation's CA",
        )
    if "ALERT" in reason:
        return Diagnosis(f"the server ended the TLS handshake ({exc.reason})", f"check {names.cert}")
    return None


def _server_verdict(conn: ssl.SSLSocket, names: TLSSettings) -> Diagnosis | None:
    """With TLS 1.3 the server's verdict on this client's certificate arrives after the handshake."""
    conn.settimeout(2.0)
    try:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        first = conn.recv(1)
    except ssl.SSLError as exc:
        return _alert(exc, names)
    except OSError:
        return None
    if first:
        return None  # the server's HTTP/2 settings: it accepted this certificate
    # gRPC's server hangs up without an alert when it refuses the client's certificate.
    return Diagnosis(
        "the server hangs up right after the TLS handshake: it does not accept this certificate "
        "(not issued by the federation's CA, or expired)",
        f"set {names.cert} and {names.key} to the pair `cipherhive certs issue` made with the federation's "
        "CA for this member",
    )
