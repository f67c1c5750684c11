"""The federation key reaches a new member as a signed, sealed grant (docs/spec/key-transfer.md).

The command-line round trip runs as an operator would: `cipherhive node key-request` on the new
member, `key-grant` on a member holding the key, `key-accept` back on the new member, which then
takes part in a real masked round with the key it received. The other tests play a hostile
member or a meddler on the way and check that every refusal names what failed and who signed it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import tenseal as ts
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import x25519

from cipherhive.ckks import codec, keys
from cipherhive.demo.federation import LocalFederation
from cipherhive.pki import certs, enrolment_certs, key_transfer
from cipherhive.pki.key_transfer import KeyGrant, KeyRequest, KeyTransferError
from cipherhive.v1 import federation_pb2 as pb
from tests.test_key_pair import forged_secret_context

pytestmark = pytest.mark.slow


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cipherhive", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    federation = LocalFederation(
        tmp_path_factory.mktemp("keys"),
        nodes=4,
        node_options={"epochs": 1},
        rounds={"max_rounds": 1, "min_participants": 4},
    )
    federation.setup()
    yield federation
    federation.stop_all()


class Member:
    """One member's files, as the protocol functions take them."""

    def __init__(self, fed: LocalFederation, index: int) -> None:
        name = fed.node_name(index)
        folder = fed.workdir / name
        self.name = name
        self.cert = enrolment_certs.load_certificate((folder / f"{name}.enrol.crt").read_bytes())
        self.key = enrolment_certs.load_key(folder / f"{name}.enrol.key")
        self.ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
        self.crl = x509.load_pem_x509_crl((fed.workdir / "ca" / certs.CRL).read_bytes())
        self.members = tuple(fed.node_name(i) for i in range(fed.nodes))


def _keys(fed: LocalFederation) -> tuple[bytes, bytes]:
    folder = fed.workdir / "keys"
    return (folder / keys.SECRET_FILE).read_bytes(), (folder / keys.PUBLIC_FILE).read_bytes()


def _ask(fed: LocalFederation, member: Member) -> tuple[KeyRequest, x25519.X25519PrivateKey]:
    return key_transfer.make_request(_keys(fed)[1], member.name, member.cert, member.key)


def _grant(
    fed: LocalFederation, request: KeyRequest, sender: Member, members: tuple[str, ...] | None = None
) -> KeyGrant:
    return key_transfer.make_grant(
        request,
        _keys(fed)[0],
        sender.name,
        sender.cert,
        sender.key,
        sender.ca,
        sender.crl,
        sender.members if members is None else members,
    )


def _accept(
    fed: LocalFederation, grant: KeyGrant, request: KeyRequest, private: x25519.X25519PrivateKey
) -> bytes:
    me = Member(fed, 3)
    return key_transfer.accept_grant(grant, request, private, _keys(fed)[1], me.ca, me.crl, me.members)


@pytest.mark.timeout(300)
def test_a_new_member_gets_the_key_by_request_grant_accept_and_takes_part_in_a_round(
    fed: LocalFederation,
) -> None:
    work = fed.workdir
    received = work / "node-4-secret.ctx"
    fed.node_settings = {"secret_context": str(received)}
    fed.write_node_config(3)
    fed.node_settings = {}
    public = str(work / "keys" / keys.PUBLIC_FILE)
    config = ["--config", str(work / "node-4.toml")]
    asked = _cli(["node", "key-request", *config, "--public-context", public, "--out", "request.json"], work)
    assert asked.returncode == 0, asked.stderr
    assert "'node-4' asks for the key of federation" in asked.stdout
    granted = _cli(["node", "key-grant", "--config", str(work / "node-1.toml"), "--request", "request.json",
                    "--out", "grant.json"], work)  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    assert keys.SECRET_FILE not in (work / "grant.json").read_text()
    accepted = _cli(
        ["node", "key-accept", *config, "--grant", "grant.json", "--public-context", public], work
    )
    assert accepted.returncode == 0, accepted.stderr
    assert "the federation key from 'node-1'" in accepted.stdout
    assert received.stat().st_mode & 0o777 == 0o600
    assert not (work / "node-4-state" / "key-request.x25519").exists()  # used once
    assert keys.verified_fingerprint(received.read_bytes()) == keys.fingerprint_of_file(Path(public))
    again = _cli(["node", "key-accept", *config, "--grant", "grant.json", "--public-context", public], work)
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr
    # With the key it received, node-4 takes part in a masked round and applies its sum.
    fed.start()
    info = fed.wait_round(1, 240)
    assert info.state == pb.ROUND_SUM_READY and info.participants == 4, fed.log("server")[-3000:]
    fed.wait_for(lambda: "applied round sum" in fed.log("node-4"), 60, "node-4 to apply round 1")
    codes = fed.stop_all()
    assert all(c in (0, None) for c in codes.values()), codes
    # Should that file later hold a wrong secret key, the node's start-up check names the sender.
    right = ts.context_from(received.read_bytes())
    received.write_bytes(forged_secret_context(right, codec.new_secret_context()))
    refused = _cli(["node", *config], work)
    assert refused.returncode == 2, refused.stderr
    assert "does not belong to its public key" in refused.stderr
    assert "received from member 'node-1' (signed key grant)" in refused.stderr, refused.stderr


def test_a_wrong_key_from_a_member_is_refused_and_the_sender_named(fed: LocalFederation) -> None:
    request, private = _ask(fed, Member(fed, 3))
    sender = Member(fed, 1)
    right = ts.context_from(_keys(fed)[0])
    wrong_field = key_transfer.secret_key_field(
        forged_secret_context(codec.new_secret_context(), codec.new_secret_context())
    )
    # A hostile member seals some other secret key and signs it properly.
    honest = _grant(fed, request, sender)
    sealed = key_transfer.SUITE.encrypt(
        wrong_field, x25519.X25519PublicKey.from_public_bytes(request.x25519_public), info=honest.info()
    )
    hostile = replace(honest, sealed=sealed, signature=b"")
    hostile = replace(hostile, signature=enrolment_certs.sign(sender.key, hostile.signed_bytes()))
    with pytest.raises(KeyTransferError, match=r"the secret key sent by 'node-2' .*is not the federation's"):
        _accept(fed, hostile, request, private)
    assert right.has_secret_key()
    # The honest grant opens, and holds exactly the federation's key.
    secret = _accept(fed, honest, request, private)
    assert keys.verified_fingerprint(secret) == keys.fingerprint(right)


def test_a_meddled_grant_is_refused(fed: LocalFederation) -> None:
    request, private = _ask(fed, Member(fed, 3))
    sender = Member(fed, 0)
    grant = _grant(fed, request, sender)
    flipped = bytes([grant.sealed[0] ^ 1]) + grant.sealed[1:]
    with pytest.raises(KeyTransferError, match="not signed by its enrolment key"):
        _accept(fed, replace(grant, sealed=flipped), request, private)
    with pytest.raises(
        KeyTransferError, match="claims to be 'node-3' but its enrolment certificate names 'node-1'"
    ):
        _accept(fed, replace(grant, sender="node-3"), request, private)
    # Signed properly but sealed to someone else's key: it does not open, and says whose it was.
    other, _ = _ask(fed, Member(fed, 3))
    to_other = _grant(fed, other, sender)
    with pytest.raises(KeyTransferError, match="answers another request"):
        _accept(fed, to_other, request, private)
    resealed = replace(to_other, recipient_x25519=request.x25519_public, signature=b"")
    resealed = replace(resealed, signature=enrolment_certs.sign(sender.key, resealed.signed_bytes()))
    with pytest.raises(KeyTransferError, match="sealed by 'node-1' does not open"):
        _accept(fed, resealed, request, private)


def test_requests_from_strangers_or_for_another_federation_get_no_key(fed: LocalFederation) -> None:
    granter = Member(fed, 0)
    request, _ = _ask(fed, Member(fed, 3))
    # A member that has not pinned node-4 grants it nothing.
    with pytest.raises(KeyTransferError, match="'node-4' is not in this member's pinned membership"):
        _grant(fed, request, granter, members=("node-1", "node-2", "node-3"))
    with pytest.raises(KeyTransferError, match="claims to be 'node-3'"):
        _grant(fed, replace(request, member="node-3"), granter)
    forged_signature = enrolment_certs.sign(granter.key, request.signed_bytes())
    with pytest.raises(KeyTransferError, match="not signed by its enrolment key"):
        _grant(fed, replace(request, signature=forged_signature), granter)
    other_public = _public_of(codec.new_secret_context())
    elsewhere, _ = key_transfer.make_request(other_public, "node-4", Member(fed, 3).cert, Member(fed, 3).key)
    with pytest.raises(KeyTransferError, match="asks for the key of another federation"):
        _grant(fed, elsewhere, granter)


def _public_of(ctx: ts.Context) -> bytes:
    ctx.make_context_public()
    return ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


def test_the_secret_key_field_is_the_only_difference_from_public_ctx(fed: LocalFederation) -> None:
    secret, public = _keys(fed)
    field = key_transfer.secret_key_field(secret)
    rebuilt = key_transfer.join_secret_key(public, field)
    assert keys.verified_fingerprint(rebuilt) == keys.fingerprint_of_file(
        fed.workdir / "keys" / keys.PUBLIC_FILE
    )
    with pytest.raises(KeyTransferError, match="not one secret-key field"):
        key_transfer.join_secret_key(public, public)  # a sender cannot replace the public key
