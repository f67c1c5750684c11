"""A revocation reaching every member through the server, with real processes: the operator
revokes a member with `cipherhive certs revoke` while the server and the nodes run; the server
logs the reload, the other members' crl.pem files are replaced from the server (nobody copies
them) and `cipherhive ctl nodes` marks the revoked member (docs/how-to/operator.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from cipherhive.demo.federation import LocalFederation
from cipherhive.node.secagg.crl_update import held_number
from cipherhive.pki import certs
from cipherhive.runtime.transport import ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _wait(predicate: Callable[[], object], timeout: float, what: str, fed: LocalFederation) -> None:
    """Like ``LocalFederation.wait_for``, but a node the server refused may exit meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    logs = "\n".join(f"--- {k}\n{fed.log(k)[-2000:]}" for k in ("server", "node-1", "node-2", "node-3"))
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cipherhive", *argv], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_revocation_reaches_every_member_through_the_server(tmp_path: Path) -> None:
    fed = LocalFederation(
        tmp_path / "fed",
        nodes=3,
        node_options={"epochs": 1},
        rounds={"auto_start": False, "min_participants": 2},
    )
    fed.setup()
    ca = fed.workdir / "ca"
    # Each member holds its own copy of the CRL, as on separate machines.
    for i in range(fed.nodes):
        own = fed.workdir / fed.node_name(i) / certs.CRL
        shutil.copyfile(ca / certs.CRL, own)
        fed.masking_settings = {"crl": str(own)}
        fed.write_node_config(i)
    first = held_number(ca / certs.CRL)
    try:
        fed.start()
        _wait(
            lambda: all("joined federation" in fed.log(fed.node_name(i)) for i in range(fed.nodes)),
            60,
            "every node to join",
            fed,
        )
        revoked = _cli("certs", "revoke", "--ca", str(ca), "--name", "node-3")
        assert revoked.returncode == 0, revoked.stderr
        number = held_number(ca / certs.CRL)
        assert first is not None and number is not None and number > first

        with fed.admin_channel() as ch:
            admin = pb_grpc.AdminStub(ch)

            def reloaded() -> bool:
                admin.GetStatus(pb.StatusRequest(), timeout=10)  # any call lets the server look
                return "CRL reloaded" in fed.log("server")

            _wait(reloaded, 20, "the server to reload its CRL", fed)
            line = next(x for x in fed.log("server").splitlines() if "CRL reloaded" in x)
            assert f"path={ca / certs.CRL}" in line and f"number={number}" in line
            assert "revoked=2" in line and "new=2" in line  # TLS and enrolment certificates
            # Members only: an operator's certificate is refused.
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.AggregationStub(ch).GetRevocationList(pb.RevocationListRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        d = fed.workdir / "node-1"
        tls = ClientTLS(d / "node-1.crt", d / "node-1.key", d / "ca.crt", "localhost")
        with channel(f"127.0.0.1:{fed.port}", tls) as ch:
            served = pb_grpc.AggregationStub(ch).GetRevocationList(pb.RevocationListRequest(), timeout=10)
        assert served.crl_pem == (ca / certs.CRL).read_bytes()  # the exact bytes the server loaded
        with fed.admin_channel() as ch:
            # The next round: each member fetches the CRL before it checks the roster.
            pb_grpc.AdminStub(ch).StartRound(pb.StartRoundRequest(), timeout=10)

        members = [fed.workdir / f"node-{i}" / certs.CRL for i in (1, 2)]
        _wait(
            lambda: all(held_number(p) == number for p in members),
            30,
            "the members' CRLs to be updated from the server",
            fed,
        )
        for i in (1, 2):
            assert (fed.workdir / f"node-{i}" / certs.CRL).read_bytes() == (ca / certs.CRL).read_bytes()
            assert "CRL updated from the server" in fed.log(f"node-{i}")

        admin_dir = fed.workdir / "admin"
        listed = _cli(
            "ctl",
            "--json",
            "--server",
            f"127.0.0.1:{fed.port}",
            "--cert",
            str(admin_dir / "operator.crt"),
            "--key",
            str(admin_dir / "operator.key"),
            "--ca",
            str(admin_dir / "ca.crt"),
            "--server-name",
            "localhost",
            "nodes",
        )
        assert listed.returncode == 0, listed.stderr
        nodes = {n["name"]: n for n in json.loads(listed.stdout)["nodes"]}
        assert {name: n["revoked"] for name, n in nodes.items()} == {
            "node-1": False,
            "node-2": False,
            "node-3": True,
        }
        assert nodes["node-3"]["revoked_reason"].startswith("certificate ")
    finally:
        fed.stop_all()
