"""Issue 10, item 7 (the transport's share): smaller holes, each against a real server process.

* a certificate revoked while its upload is in flight gets nothing counted;
* an upload that trickles in below ``min_upload_bytes_per_second`` is cut and rolled back;
* a newline in a client-supplied string cannot forge a line of the readable log;
* a TLS private key readable by group or others is refused, by the server at start
  and by clients (`cipherhive ctl`);
* mutual TLS without a revocation list is a start-up error unless explicitly allowed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cipherhive.ckks import codec, keys
from cipherhive.demo.federation import LocalFederation
from cipherhive.pki import certs
from cipherhive.runtime import logs
from cipherhive.runtime.transport import ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc
from tests.test_hostile import LAYOUT, NUM_CTS, NUM_VALUES, _chunks

pytestmark = pytest.mark.slow
IDLE_SECONDS = 3.0


def _tls(fed: LocalFederation, name: str) -> ClientTLS:
    d = fed.workdir / name
    return ClientTLS(d / f"{name}.crt", d / f"{name}.key", d / "ca.crt", "localhost")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    workdir = tmp_path_factory.mktemp("holes")
    fed = LocalFederation(
        workdir, masked=False, nodes=3, rounds={"auto_start": False, "timeout_seconds": 600.0}, layout=LAYOUT
    )
    fed.setup()
    certs.issue(workdir / "ca", "node", "latecomer", workdir / "latecomer")
    with (workdir / "server.toml").open("a") as fh:
        fh.write(f"\n[limits]\nstream_idle_seconds = {IDLE_SECONDS}\n")
    fed.start_server()
    fed.wait_serving()
    try:
        yield fed
    finally:
        codes = fed.stop_all()
        assert codes["server"] == 0, fed.log("server")[-3000:]


def test_certificate_revoked_during_upload_counts_nothing(fed: LocalFederation) -> None:
    """The threaded server checked revocation only when a call began, so an upload whose
    certificate was revoked half-way was still accepted and added into the sum."""
    with channel(f"127.0.0.1:{fed.port}", _tls(fed, "latecomer")) as ch, fed.admin_channel() as admin_ch:
        stub = pb_grpc.AggregationStub(ch)
        admin = pb_grpc.AdminStub(admin_ch)
        header, chunks = _prepare_upload(fed, stub, admin, "latecomer-0001")
        number = header.round
        assert len(chunks) >= 2
        half_sent = threading.Event()
        go_on = threading.Event()

        def messages() -> Iterator[pb.SubmitRequest]:
            yield pb.SubmitRequest(header=header)
            yield chunks[0]
            half_sent.set()
            go_on.wait(30)
            yield from chunks[1:]

        result: dict[str, object] = {}

        def upload() -> None:
            try:
                result["receipt"] = stub.SubmitUpdate(messages(), timeout=60)
            except grpc.RpcError as exc:
                result["error"] = exc

        worker = threading.Thread(target=upload)
        worker.start()
        assert half_sent.wait(30)
        certs.revoke(fed.workdir / "ca", "latecomer")
        # The server re-reads crl.pem on its own (at most once a second): wait until it refuses a
        # new call from the same certificate as revoked, then send the rest of the upload.
        fed.wait_for(lambda: _refused_as_revoked(fed, "latecomer"), 60, "the server to load the new crl.pem")
        go_on.set()
        worker.join(60)
        error = result.get("error")
        assert isinstance(error, grpc.RpcError), result
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (error.details() or "")
        info = admin.GetRound(pb.GetRoundRequest(round=number), timeout=10)
        assert info.participants == 0 and not info.submissions


def _refused_as_revoked(fed: LocalFederation, name: str) -> bool:
    """True once the server refuses a call from ``name``'s certificate as revoked.

    GetStatus needs an admin certificate, so a member's call is refused either way; the
    revocation check comes first, so the reason says which list the server is using.
    """
    with channel(f"127.0.0.1:{fed.port}", _tls(fed, name)) as ch:
        try:
            pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10)
        except grpc.RpcError as exc:
            revoked = "has been revoked" in (exc.details() or "")
            return exc.code() == grpc.StatusCode.PERMISSION_DENIED and revoked
    return False


def test_trickling_upload_is_cut_and_rolled_back(fed: LocalFederation) -> None:
    """An upload that sends a ciphertext every few seconds, each gap under the idle deadline.

    The threaded server had no rate floor: such an upload held a transfer slot (and its
    part of the running sum) for as long as the member liked. Here, once the member has
    had ``stream_idle_seconds`` of the server's attention, an average below
    ``min_upload_bytes_per_second`` (32 KiB/s) cuts it with RESOURCE_EXHAUSTED, and
    nothing it sent stays in the round.
    """
    with channel(f"127.0.0.1:{fed.port}", _tls(fed, "node-2")) as ch, fed.admin_channel() as admin_ch:
        stub = pb_grpc.AggregationStub(ch)
        admin = pb_grpc.AdminStub(admin_ch)
        header, chunks = _prepare_upload(fed, stub, admin, "trickle-0001")
        number = header.round

        def messages() -> Iterator[pb.SubmitRequest]:
            yield pb.SubmitRequest(header=header)
            for chunk in chunks:
                # Not synchronisation: the scenario itself. The member trickles, pausing for most
                # of the idle deadline before each ciphertext, so that only the rate floor can cut it.
                time.sleep(IDLE_SECONDS * 0.8)
                yield chunk

        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitUpdate(messages(), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert "min_upload_bytes_per_second" in (err.value.details() or "")
        info = admin.GetRound(pb.GetRoundRequest(round=number), timeout=10)
        assert "node-2" not in {s.node_name for s in info.submissions}
    audit = (fed.workdir / "server.log").read_text()
    assert "stream cut" in audit and "actor=node-2" in audit


def test_newline_in_a_client_string_forges_no_log_line(fed: LocalFederation) -> None:
    """A version string with a newline used to start a line of its own in the readable
    log, one that looked exactly like the server's audit trail."""
    fingerprint = keys.fingerprint_of_file(fed.workdir / "keys" / keys.PUBLIC_FILE)
    forged = "1.0\nFORGED INFO cipherhive.audit: round"
    with channel(f"127.0.0.1:{fed.port}", _tls(fed, "node-1")) as ch:
        pb_grpc.AggregationStub(ch).Join(
            pb.JoinRequest(key_fingerprint=fingerprint, layout=LAYOUT.to_proto(), software_version=forged),
            timeout=30,
        )
    log = fed.log("server")
    assert "join" in log
    assert not any(line.startswith("FORGED") for line in log.splitlines()), log[-2000:]
    assert "1.0\\x0aFORGED" in log


def test_log_formats_escape_and_bound_fields() -> None:
    record = logging.LogRecord("cipherhive.audit", logging.INFO, __file__, 1, "join", None, None)
    record.fields = {"reason": "a\r\nb\x1b[2J\u2028" + "x" * 10_000}
    for as_json in (False, True):
        line = logs._Formatter(as_json).format(record)
        assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
        assert len(line) < logs.MAX_FIELD + 300


def _prepare_upload(
    fed: LocalFederation, stub: pb_grpc.AggregationStub, admin: pb_grpc.AdminStub, submission_id: str
) -> tuple[pb.SubmitHeader, list[pb.SubmitRequest]]:
    """Join, find (or open) the round, and make a valid upload for it: header and one-ciphertext chunks."""
    fingerprint = keys.fingerprint_of_file(fed.workdir / "keys" / keys.PUBLIC_FILE)
    secret = codec.SecretCodec((fed.workdir / "keys" / keys.SECRET_FILE).read_bytes())
    stub.Join(pb.JoinRequest(key_fingerprint=fingerprint, layout=LAYOUT.to_proto()), timeout=30)
    number = admin.GetStatus(pb.StatusRequest(), timeout=10).open_round
    if not number:
        number = admin.StartRound(pb.StartRoundRequest(force=True), timeout=30).round
    header = pb.SubmitHeader(
        round=number,
        submission_id=submission_id,
        layout_hash=LAYOUT.hash,
        key_fingerprint=fingerprint,
        num_values=NUM_VALUES,
        num_ciphertexts=NUM_CTS,
    )
    chunks = list(_chunks(list(secret.encrypt_all(np.full(NUM_VALUES, 0.5))), per=1))
    return header, chunks


def _server(fed: LocalFederation, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cipherhive", "server", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=fed.workdir,
    )


def test_readable_private_keys_are_refused(fed: LocalFederation, tmp_path: Path) -> None:
    """Server and ctl accepted TLS keys at mode 0644 (any local user could read them)."""
    key = fed.workdir / "server" / "server.key"
    config = tmp_path / "server.toml"
    config.write_text(
        (fed.workdir / "server.toml")
        .read_text()
        .replace(str(fed.workdir / "server-state"), str(tmp_path / "state"))
        .replace(f":{fed.port}", ":0")
    )
    os.chmod(key, 0o644)
    try:
        result = _server(fed, config)
    finally:
        os.chmod(key, 0o600)
    assert result.returncode == 2, result.stderr
    assert "chmod 600" in result.stderr and str(key) in result.stderr
    admin_key = fed.workdir / "admin" / "operator.key"
    os.chmod(admin_key, 0o640)
    try:
        d = fed.workdir / "admin"
        ctl = subprocess.run(
            [
                *(sys.executable, "-m", "cipherhive", "ctl", "--server", f"127.0.0.1:{fed.port}"),
                *("--cert", str(d / "operator.crt"), "--key", str(admin_key), "--ca", str(d / "ca.crt")),
                *("--server-name", "localhost", "status"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.chmod(admin_key, 0o600)
    assert ctl.returncode == 2, ctl.stderr
    assert "chmod 600" in ctl.stderr


def test_missing_revocation_list_is_a_startup_error(fed: LocalFederation, tmp_path: Path) -> None:
    """A missing crl.pem was only a warning, after which revoked certificates got in."""
    base = (
        (fed.workdir / "server.toml")
        .read_text()
        .replace(str(fed.workdir / "server-state"), str(tmp_path / "state"))
        .replace(f":{fed.port}", ":0")
    )
    crl_line = next(line for line in base.splitlines() if line.startswith("tls_crl"))
    cases = {
        "unset": base.replace(crl_line + "\n", ""),
        "missing": base.replace(crl_line, f'tls_crl = "{tmp_path / "nowhere.pem"}"'),
    }
    for what, text in cases.items():
        config = tmp_path / f"{what}.toml"
        config.write_text(text)
        result = _server(fed, config)
        assert result.returncode == 2, (what, result.stderr)
        assert "allow_missing_crl" in result.stderr, (what, result.stderr)
    # Allowed explicitly, it starts (and serves until told to stop).
    allowed = tmp_path / "allowed.toml"
    allowed.write_text(cases["missing"].replace("[tls]\n", "[tls]\nallow_missing_crl = true\n"))
    log_path = tmp_path / "allowed.log"
    with log_path.open("wb") as log_file:  # a file, not a pipe nobody reads once the server is up
        proc = subprocess.Popen(
            [sys.executable, "-m", "cipherhive", "server", "--config", str(allowed)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if "server listening" in log_path.read_text(errors="replace"):
                break
            time.sleep(0.1)
        assert "server listening" in log_path.read_text(errors="replace"), log_path.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(60)
            raise AssertionError(f"the server did not stop on SIGTERM:\n{log_path.read_text()}") from None
