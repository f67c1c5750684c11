"""A compromised server re-forming a round's roster (docs/spec/masked-round.md §2.1).

The node accepts one re-formed roster, and only a strict subset of the first one's signed
entries, before its upload was acknowledged. Everything else a server may send in its place is
refused: a superset, a swapped member, a member's entry carrying another key, a third roster, a
roster after the receipt or after the key is gone, one below the floor or without this node.
These tests play the server with real certificates and real signatures; the node side is the
real :class:`Participation`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cipherhive.node.secagg.participation import MaskingSetup, Participation
from cipherhive.pki import certs
from cipherhive.secagg.chain import ChainHash
from cipherhive.secagg.roster import Enrolment, RosterError, make_enrolment

pytestmark = pytest.mark.timeout(120)

NAMES = ("acme", "globex", "initech", "umbrella", "hooli")
FED = hashlib.sha256(b"federation").digest()
LAYOUT = hashlib.sha256(b"layout").hexdigest()
MODULUS = (1 << 59) - 55  # any odd modulus: the mask plan only reduces by it


@dataclass
class Party:
    tls_fp: bytes
    enrol_cert: bytes
    enrol_key: ec.EllipticCurvePrivateKey


@dataclass
class Server:
    """What a compromised server holds: every member's signed enrolment, nothing secret."""

    me: Participation
    entries: dict[str, Enrolment]
    parties: dict[str, Party]

    def roster(self, *names: str) -> list[bytes]:
        return [self.entries[n].encode() for n in names]

    def second_enrolment(self, name: str) -> Enrolment:
        """A valid entry of ``name`` for the same round with another key (it enrolled twice)."""
        p = self.parties[name]
        return make_enrolment(
            binding=self.me.binding,
            cert_fingerprint=p.tls_fp,
            x25519_public=X25519PrivateKey.generate().public_key(),
            certificate=p.enrol_cert,
            key=p.enrol_key,
        )


@pytest.fixture()
def server(tmp_path: Path) -> Server:
    ca = tmp_path / "ca"
    certs.create_ca(ca, name="fed-ca")
    parties: dict[str, Party] = {}
    for name in NAMES:
        issued = certs.issue(ca, "node", name, tmp_path / name)
        assert issued.enrolment is not None
        tls = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
        key = serialization.load_pem_private_key(issued.enrolment.key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        parties[name] = Party(
            hashlib.sha256(tls.public_bytes(serialization.Encoding.DER)).digest(),
            issued.enrolment.cert_path.read_bytes(),
            key,
        )
    mine = parties["acme"]
    setup = MaskingSetup(
        members=NAMES,
        floor=3,
        ca_cert=x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes()),
        crl_path=ca / "crl.pem",
        enrol_cert=mine.enrol_cert,
        enrol_key=mine.enrol_key,
        tls_fingerprint=mine.tls_fp,
        aggregator="agg",
        federation=FED,
    )
    me = Participation.enrol(setup, 7, 6, b"\x11" * 32, ChainHash.genesis(FED, LAYOUT).value, 3)
    entries = {"acme": me.enrolment}
    for name in NAMES[1:]:
        p = parties[name]
        entries[name] = make_enrolment(
            binding=me.binding,
            cert_fingerprint=p.tls_fp,
            x25519_public=X25519PrivateKey.generate().public_key(),
            certificate=p.enrol_cert,
            key=p.enrol_key,
        )
    return Server(me, entries, parties)


def test_the_same_roster_again_is_accepted(server: Server) -> None:
    first = server.me.accept_roster(server.roster(*NAMES))
    again = server.me.accept_roster(server.roster(*reversed(NAMES)))
    assert again.hash == first.hash
    assert not server.me.reformed


def test_one_strict_subset_is_accepted_and_masked_for_again(server: Server, tmp_path: Path) -> None:
    me = server.me
    me.accept_roster(server.roster(*NAMES))
    plan = me.mask_plan(MODULUS)
    upload = me.write_upload(tmp_path / "upload.bin", [b"masked for five"])
    second = me.accept_roster(server.roster("acme", "globex", "initech", "umbrella"))
    assert me.reformed
    assert "hooli" not in second.names
    # The update masked for the replaced roster is gone, unsent; the new plan has one pair less
    # and a fresh self-mask seed.
    assert me.upload is None and not upload.path.exists()
    new_plan = me.mask_plan(MODULUS)
    assert len(new_plan.pairs) == len(plan.pairs) - 1
    assert new_plan.self_seed != plan.self_seed


@pytest.mark.parametrize(
    ("first", "second", "why"),
    [
        (NAMES[:4], NAMES, "a superset: a member added after enrolment"),
        (NAMES[:4], ("acme", "globex", "initech", "hooli"), "one member swapped for another"),
    ],
)
def test_a_roster_that_is_not_a_strict_subset_is_refused(
    server: Server, first: tuple[str, ...], second: tuple[str, ...], why: str
) -> None:
    server.me.accept_roster(server.roster(*first))
    with pytest.raises(RosterError, match="not the first one without some of its members"):
        server.me.accept_roster(server.roster(*second))
    assert not server.me.reformed, why


def test_a_kept_member_with_another_key_is_refused(server: Server) -> None:
    server.me.accept_roster(server.roster(*NAMES))
    server.entries["globex"] = server.second_enrolment("globex")
    with pytest.raises(RosterError, match="not the first one without some of its members"):
        server.me.accept_roster(server.roster("acme", "globex", "initech", "umbrella"))


def test_a_third_roster_is_refused(server: Server) -> None:
    server.me.accept_roster(server.roster(*NAMES))
    server.me.accept_roster(server.roster(*NAMES[:4]))
    with pytest.raises(RosterError, match="not the first one without some of its members"):
        server.me.accept_roster(server.roster(*NAMES[:3]))
    # The second roster stays the one in force.
    assert server.me.roster is not None and "umbrella" in server.me.roster.names


def test_no_re_forming_after_the_receipt(server: Server, tmp_path: Path) -> None:
    me = server.me
    me.accept_roster(server.roster(*NAMES))
    me.mask_plan(MODULUS)
    upload = me.write_upload(tmp_path / "upload.bin", [b"masked for five"])
    me.receipt = "receipt-1"
    with pytest.raises(RosterError, match="after this node's upload was accepted"):
        me.accept_roster(server.roster(*NAMES[:4]))
    assert upload.path.exists(), "the acknowledged upload is kept for its commit"


def test_no_re_forming_after_the_key_is_gone(server: Server) -> None:
    server.me.accept_roster(server.roster(*NAMES))
    server.me.forget_key()
    with pytest.raises(RosterError, match="after this node's upload was accepted"):
        server.me.accept_roster(server.roster(*NAMES[:4]))


def test_a_subset_below_the_floor_is_refused(server: Server) -> None:
    server.me.accept_roster(server.roster(*NAMES))
    with pytest.raises(RosterError):
        server.me.accept_roster(server.roster("acme", "globex"))
    assert not server.me.reformed


def test_a_subset_without_this_node_is_refused(server: Server) -> None:
    server.me.accept_roster(server.roster(*NAMES))
    with pytest.raises(RosterError):
        server.me.accept_roster(server.roster("globex", "initech", "umbrella"))
    assert not server.me.reformed
