"""Enrolments, roster checks, pairwise keys, commits and the chain hash (docs/spec/masked-round.md §1-§3, §5).

Every forged roster of the issue's "Must show" list is refused here with its
reason; the honest roster of five is accepted and its members agree on every
pairwise key. Test vectors pin the canonical encodings and the HKDF
derivation, so two implementations (or two releases) can never disagree.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cipherhive.pki import certs, enrolment_certs
from cipherhive.secagg.chain import ChainHash, sum_digest
from cipherhive.secagg.commit import (
    C0_LABEL,
    SEEDS_LABEL,
    Commit,
    blocks_digest,
    make_commit,
    require_all_commits,
    self_mask_digest,
)
from cipherhive.secagg.roster import (
    Enrolment,
    Member,
    Roster,
    RosterError,
    RoundBinding,
    make_enrolment,
    pair_info,
    pairwise_keys,
    roster_hash,
    verify_roster,
)
from cipherhive.secagg.wire import WireError

NAMES = ("acme", "globex", "initech", "umbrella", "hooli")
FED = hashlib.sha256(b"federation").digest()
LAYOUT = hashlib.sha256(b"layout").hexdigest()
N_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass
class Party:
    name: str
    tls_fp: bytes
    enrol_cert: bytes
    enrol_key: ec.EllipticCurvePrivateKey
    tls_cert: bytes
    tls_key: ec.EllipticCurvePrivateKey


@dataclass
class Fed:
    ca: Path
    ca_cert: x509.Certificate
    parties: dict[str, Party]

    def crl(self) -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl((self.ca / "crl.pem").read_bytes())


def _party(issued: certs.IssuedCert) -> Party:
    assert issued.enrolment is not None
    tls_pem = issued.cert_path.read_bytes()
    tls_key = serialization.load_pem_private_key(issued.key_path.read_bytes(), None)
    assert isinstance(tls_key, ec.EllipticCurvePrivateKey)
    return Party(
        name=issued.name,
        tls_fp=x509.load_pem_x509_certificate(tls_pem).fingerprint(hashes.SHA256()),
        enrol_cert=issued.enrolment.cert_path.read_bytes(),
        enrol_key=enrolment_certs.load_key(issued.enrolment.key_path),
        tls_cert=tls_pem,
        tls_key=tls_key,
    )


@pytest.fixture()
def fed(tmp_path: Path) -> Fed:
    ca = tmp_path / "ca"
    certs.create_ca(ca, name="fed-ca")
    parties = {n: _party(certs.issue(ca, "node", n, tmp_path / n)) for n in (*NAMES, "eve")}
    return Fed(ca, x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes()), parties)


def _binding(round_: int = 7, nonce: bytes = b"\x11" * 32, chain: bytes | None = None) -> RoundBinding:
    chain = chain or ChainHash.genesis(FED, LAYOUT).value
    return RoundBinding(FED, "agg", round_, nonce, chain, b"ckks-8192-60-60", 3)


def _enrol(p: Party, binding: RoundBinding, x: X25519PrivateKey | None = None) -> Enrolment:
    x = x or X25519PrivateKey.generate()
    return make_enrolment(
        binding=binding,
        cert_fingerprint=p.tls_fp,
        x25519_public=x.public_key(),
        certificate=p.enrol_cert,
        key=p.enrol_key,
    )


@dataclass
class Round:
    binding: RoundBinding
    entries: dict[str, Enrolment]
    secrets: dict[str, X25519PrivateKey]

    def wire(self, *names: str) -> list[bytes]:
        return [self.entries[n].encode() for n in (names or NAMES)]


def _round(fed: Fed, binding: RoundBinding | None = None) -> Round:
    binding = binding or _binding()
    secrets = {n: X25519PrivateKey.generate() for n in NAMES}
    return Round(binding, {n: _enrol(fed.parties[n], binding, secrets[n]) for n in NAMES}, secrets)


def _verify(fed: Fed, rnd: Round, entries: list[bytes], *, me: str = "acme", floor: int = 3) -> Roster:
    return verify_roster(
        entries,
        me=rnd.entries[me],
        ca_cert=fed.ca_cert,
        crl=fed.crl(),
        pinned_members=NAMES,
        floor=floor,
        expected=rnd.binding,
    )


# --------------------------------------------------------------------------- the honest round


def test_honest_roster_of_five_and_matching_pairwise_keys(fed: Fed) -> None:
    rnd = _round(fed)
    wire = rnd.wire()
    rosters = {n: _verify(fed, rnd, wire, me=n) for n in NAMES}
    hashes_ = {r.hash for r in rosters.values()}
    assert len(hashes_) == 1  # every member sees the same roster
    # The order the server sends does not change the roster hash.
    assert _verify(fed, rnd, wire[::-1]).hash in hashes_
    roster = rosters["acme"]
    assert sorted(roster.names) == sorted(NAMES)
    assert [m.cert_fingerprint for m in roster.members] == sorted(
        p.tls_fp for n, p in fed.parties.items() if n != "eve"
    )

    keys = {n: pairwise_keys(rosters[n], rnd.secrets[n], fed.parties[n].tls_fp) for n in NAMES}
    order = [m.name for m in roster.members]
    for i in NAMES:
        others = [j for j in order if j != i]
        assert len(keys[i]) == len(others) == 4
        for j, (key, sign) in zip(others, keys[i], strict=True):
            mirror = keys[j][[o for o in order if o != j].index(i)]
            assert key == mirror[0] and len(key) == 32  # both ends derive K_ij
            assert sign == -mirror[1]  # and the masks cancel
            assert sign == (1 if fed.parties[i].tls_fp > fed.parties[j].tls_fp else -1)
    assert len({k for ks in keys.values() for k, _ in ks}) == 10  # one key per pair


def test_pinning_by_enrolment_certificate_fingerprint(fed: Fed) -> None:
    rnd = _round(fed)
    fps = [
        x509.load_pem_x509_certificate(fed.parties[n].enrol_cert).fingerprint(hashes.SHA256()).hex()
        for n in NAMES
    ]
    pins = [":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper() for fp in fps[1:]]
    roster = verify_roster(
        rnd.wire(),
        me=rnd.entries["acme"],
        ca_cert=fed.ca_cert,
        crl=certs.RevocationList(fed.ca / "crl.pem", fed.ca / "ca.crt"),
        pinned_members=pins,
        floor=5,
        expected=rnd.binding,
    )
    assert len(roster.members) == 5


def test_pinning_by_tls_fingerprint_and_exact_names(fed: Fed) -> None:
    rnd = _round(fed)
    pins = [fed.parties[n].tls_fp.hex() for n in NAMES[1:]]

    def check(pinned: list[str]) -> Roster:
        return verify_roster(
            rnd.wire(),
            me=rnd.entries["acme"],
            ca_cert=fed.ca_cert,
            crl=fed.crl(),
            pinned_members=pinned,
            floor=5,
            expected=rnd.binding,
        )

    assert len(check(pins).members) == 5
    with pytest.raises(RosterError, match="'globex' is not in this node's pinned membership"):
        check(["GLOBEX", *NAMES[2:]])  # names are case-sensitive, like the certificates


def test_claiming_another_members_tls_certificate(fed: Fed) -> None:
    """The TLS fingerprint orders the pairs; a member cannot claim another's."""
    rnd = _round(fed)
    p = fed.parties["globex"]
    forged = make_enrolment(
        binding=rnd.binding,
        cert_fingerprint=fed.parties["initech"].tls_fp,
        x25519_public=X25519PrivateKey.generate().public_key(),
        certificate=p.enrol_cert,
        key=p.enrol_key,
    ).encode()
    with pytest.raises(RosterError, match="'globex' claims TLS certificate"):
        _verify(fed, rnd, [*rnd.wire("acme", "initech", "umbrella", "hooli"), forged])


# --------------------------------------------------------------------------- forged rosters


def test_too_small(fed: Fed) -> None:
    rnd = _round(fed)
    with pytest.raises(RosterError, match="fewer than this node's floor of 3"):
        _verify(fed, rnd, rnd.wire("acme", "globex"))
    with pytest.raises(RosterError, match="fewer than this node's floor of 6"):
        _verify(fed, rnd, rnd.wire(), floor=6)


def test_name_outside_pinned_membership(fed: Fed) -> None:
    rnd = _round(fed)
    eve = _enrol(fed.parties["eve"], rnd.binding).encode()
    with pytest.raises(RosterError, match="'eve' is not in this node's pinned membership"):
        _verify(fed, rnd, [*rnd.wire(), eve])


def test_signature_by_a_key_another_ca_certified(fed: Fed, tmp_path: Path) -> None:
    rogue = tmp_path / "rogue"
    certs.create_ca(rogue, name="fed-ca")  # same name, other key
    fake = _party(certs.issue(rogue, "node", "globex", tmp_path / "fake"))
    rnd = _round(fed)
    forged = _enrol(fake, rnd.binding).encode()
    with pytest.raises(RosterError, match="not signed by the federation CA"):
        _verify(fed, rnd, [*rnd.wire("acme", "initech", "umbrella", "hooli"), forged])


def test_tls_certificate_used_as_enrolment_certificate(fed: Fed) -> None:
    rnd = _round(fed)
    p = fed.parties["globex"]
    forged = make_enrolment(
        binding=rnd.binding,
        cert_fingerprint=p.tls_fp,
        x25519_public=X25519PrivateKey.generate().public_key(),
        certificate=p.tls_cert,
        key=p.tls_key,
    ).encode()
    with pytest.raises(RosterError, match="not an enrolment certificate"):
        _verify(fed, rnd, [*rnd.wire("acme", "initech", "umbrella", "hooli"), forged])


def test_revoked_enrolment_certificate(fed: Fed) -> None:
    rnd = _round(fed)
    _verify(fed, rnd, rnd.wire())
    certs.revoke(fed.ca, "umbrella")  # the member's TLS and enrolment certificates
    with pytest.raises(
        RosterError, match=r"enrolment certificate of 'umbrella' \(serial [0-9a-f]+\) is revoked"
    ):
        _verify(fed, rnd, rnd.wire())
    live = certs.RevocationList(fed.ca / "crl.pem", fed.ca / "ca.crt")
    with pytest.raises(RosterError, match="revoked"):
        verify_roster(
            rnd.wire(),
            me=rnd.entries["acme"],
            ca_cert=fed.ca_cert,
            crl=live,
            pinned_members=NAMES,
            floor=3,
            expected=rnd.binding,
        )


def test_crl_of_another_ca_is_refused(fed: Fed, tmp_path: Path) -> None:
    rogue = tmp_path / "rogue"
    certs.create_ca(rogue, name="fed-ca")
    rnd = _round(fed)
    crl = x509.load_pem_x509_crl((rogue / "crl.pem").read_bytes())
    with pytest.raises(RosterError, match="CRL is not signed by the federation CA"):
        verify_roster(
            rnd.wire(),
            me=rnd.entries["acme"],
            ca_cert=fed.ca_cert,
            crl=crl,
            pinned_members=NAMES,
            floor=3,
            expected=rnd.binding,
        )


@pytest.mark.parametrize("field_", ["round", "nonce"])
def test_replayed_old_entry(fed: Fed, field_: str) -> None:
    rnd = _round(fed)
    old = _binding(round_=6) if field_ == "round" else _binding(nonce=b"\x22" * 32)
    replayed = _enrol(fed.parties["globex"], old).encode()
    with pytest.raises(RosterError, match="a replayed old entry"):
        _verify(fed, rnd, [*rnd.wire("acme", "initech", "umbrella", "hooli"), replayed])


def test_duplicate(fed: Fed) -> None:
    rnd = _round(fed)
    with pytest.raises(RosterError, match="'globex' twice"):
        _verify(fed, rnd, [*rnd.wire(), rnd.entries["globex"].encode()])
    again = _enrol(fed.parties["globex"], rnd.binding).encode()  # enrolled twice, another key
    with pytest.raises(RosterError, match="duplicate name"):
        _verify(fed, rnd, [*rnd.wire(), again])
    with pytest.raises(RosterError, match="more than once"):
        _verify(fed, rnd, [*rnd.wire(), rnd.entries["acme"].encode()])


def test_missing_self(fed: Fed) -> None:
    rnd = _round(fed)
    with pytest.raises(RosterError, match="this node is missing from the roster"):
        _verify(fed, rnd, rnd.wire("globex", "initech", "umbrella", "hooli"))


def test_changed_own_entry(fed: Fed) -> None:
    rnd = _round(fed)
    stale = _enrol(fed.parties["acme"], rnd.binding).encode()  # a valid, signed, but older enrolment
    with pytest.raises(RosterError, match="own entry in the roster is not the enrolment it sent"):
        _verify(fed, rnd, [stale, *rnd.wire("globex", "initech", "umbrella", "hooli")])


def test_another_chain_hash_split_view(fed: Fed) -> None:
    """Members shown different sums in an earlier round can never share a roster again."""
    shown_a, shown_b = ChainHash.genesis(FED, LAYOUT), ChainHash.genesis(FED, LAYOUT)
    shown_a.apply(sum_digest([b"sum shown to most"]))
    shown_b.apply(sum_digest([b"sum shown to hooli"]))
    rnd = _round(fed, _binding(chain=shown_a.value))
    split = _enrol(fed.parties["hooli"], _binding(chain=shown_b.value)).encode()
    with pytest.raises(RosterError, match="different history of sums"):
        _verify(fed, rnd, [*rnd.wire("acme", "globex", "initech", "umbrella"), split])


def test_other_parameters_aggregator_or_federation(fed: Fed) -> None:
    rnd = _round(fed)
    for other, reason in (
        (replace(rnd.binding, block_count=4), "other CKKS parameters or block count"),
        (replace(rnd.binding, params_id=b"ckks-other"), "other CKKS parameters"),
        (replace(rnd.binding, aggregator="agg2"), "for aggregator 'agg2'"),
        (replace(rnd.binding, federation=bytes(32)), "another federation key"),
    ):
        entry = _enrol(fed.parties["globex"], other).encode()
        with pytest.raises(RosterError, match=reason):
            _verify(fed, rnd, [*rnd.wire("acme", "initech", "umbrella", "hooli"), entry])


def test_bad_signatures(fed: Fed) -> None:
    rnd = _round(fed)
    good = rnd.entries["globex"]
    # A changed X25519 key under the member's signature.
    swapped = replace(good, x25519_public=X25519PrivateKey.generate().public_key().public_bytes_raw())
    # The same signature in its other (high-s) form: valid ECDSA, but not the canonical bytes.
    r, s = decode_dss_signature(good.signature)
    malleated = replace(good, signature=encode_dss_signature(r, N_ORDER - s))
    # Signed by a key the CA certified for someone else (eve's), under globex's certificate.
    unsigned = replace(good, signature=b"")
    other_key = replace(
        good, signature=enrolment_certs.sign(fed.parties["eve"].enrol_key, unsigned.signed_bytes())
    )
    for forged in (swapped, malleated, other_key):
        with pytest.raises(RosterError, match="signature on the entry of 'globex' does not verify"):
            _verify(fed, rnd, [*rnd.wire("acme", "initech", "umbrella", "hooli"), forged.encode()])


def test_malformed_entries(fed: Fed) -> None:
    rnd = _round(fed)
    good = rnd.entries["globex"].encode()
    for bad in (good + b"\0", good[:-1], b"", b"\x00\x00\x00\x05hello" + good[24:]):
        with pytest.raises(RosterError, match="malformed"):
            _verify(fed, rnd, [*rnd.wire("acme", "initech", "umbrella", "hooli"), bad])


def test_own_enrolment_for_another_round_is_a_caller_bug(fed: Fed) -> None:
    rnd = _round(fed)
    with pytest.raises(RosterError, match="own enrolment is not for the round"):
        verify_roster(
            rnd.wire(),
            me=rnd.entries["acme"],
            ca_cert=fed.ca_cert,
            crl=fed.crl(),
            pinned_members=NAMES,
            floor=3,
            expected=_binding(round_=8),
        )
    with pytest.raises(ValueError, match="floor below 2"):
        _verify(fed, rnd, rnd.wire(), floor=1)


# --------------------------------------------------------------------------- enrolment encoding


def test_enrolment_round_trip_and_canonical_decode(fed: Fed) -> None:
    rnd = _round(fed)
    entry = rnd.entries["acme"]
    raw = entry.encode()
    assert Enrolment.decode(raw) == entry
    assert raw.startswith(b"\x00\x00\x00\x13cipherhive/v1/enrol\x00\x00\x00\x20" + FED)
    with pytest.raises(WireError, match="trailing"):
        Enrolment.decode(raw + b"x")
    with pytest.raises(WireError, match="not a cipherhive/v1/enrol message"):
        Enrolment.decode(b"\x00\x00\x00\x13cipherhive/v1/comm" + raw[23:])
    oversize = raw[:23] + b"\x00\x00\x10\x00" + b"\0" * 4096
    with pytest.raises(WireError, match="more than the 32 allowed"):
        Enrolment.decode(oversize)
    huge_cert = replace(entry, certificate=b"\0" * 4097).encode()
    with pytest.raises(WireError, match="enrolment certificate is 4097 bytes"):
        Enrolment.decode(huge_cert)
    with pytest.raises(enrolment_certs.EnrolmentError, match="does not belong"):
        make_enrolment(
            binding=rnd.binding,
            cert_fingerprint=fed.parties["acme"].tls_fp,
            x25519_public=bytes(32),
            certificate=fed.parties["acme"].enrol_cert,
            key=fed.parties["globex"].enrol_key,
        )


def _fixed_entry(fp: bytes, x: bytes) -> Enrolment:
    binding = RoundBinding(bytes(range(32)), "agg", 7, b"\x11" * 32, b"\x22" * 32, b"ckks", 3)
    return Enrolment(binding, fp, x, b"\x30\x00", b"\x30\x06\x02\x01\x01\x02\x01\x01")


def test_vector_enrolment_encoding() -> None:
    entry = _fixed_entry(b"\xaa" * 32, b"\xbb" * 32)
    assert entry.signed_bytes().hex() == (
        "00000013"
        + b"cipherhive/v1/enrol".hex()
        + "00000020"
        + bytes(range(32)).hex()
        + "00000003"
        + b"agg".hex()
        + "00000008"
        + "0000000000000007"
        + "00000020"
        + "11" * 32
        + "00000020"
        + "22" * 32
        + "00000004"
        + b"ckks".hex()
        + "00000008"
        + "0000000000000003"
        + "00000020"
        + "aa" * 32
        + "00000020"
        + "bb" * 32
        + "00000002"
        + "3000"
    )
    assert entry.encode() == entry.signed_bytes() + bytes.fromhex("000000083006020101020101")
    assert Enrolment.decode(entry.encode()) == entry
    assert hashlib.sha256(entry.encode()).hexdigest() == (
        "44a47e2a41e3fc4f896fca522ce25a8555a1f3ac4c1e6d8a7b55fdb218946cb4"
    )


def _vector_roster() -> tuple[Roster, X25519PrivateKey, X25519PrivateKey]:
    xa = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    xb = X25519PrivateKey.from_private_bytes(bytes(range(33, 65)))
    dummy = ec.derive_private_key(1, ec.SECP256R1()).public_key()
    ea = _fixed_entry(b"\x01" * 32, xa.public_key().public_bytes_raw())
    eb = _fixed_entry(b"\x02" * 32, xb.public_key().public_bytes_raw())
    members = tuple(
        Member(n, e, e.encode(), hashlib.sha256(n.encode()).digest(), dummy)
        for n, e in (("a", ea), ("b", eb))
    )
    return Roster(ea.binding, members, roster_hash([ea.encode(), eb.encode()], ea.binding.nonce)), xa, xb


def test_vector_roster_hash_and_pairwise_key() -> None:
    roster, xa, xb = _vector_roster()
    assert roster_hash([b"b", b"a"], bytes(32)) == roster_hash([b"a", b"b"], bytes(32))
    assert (
        roster_hash([b"a", b"b"], bytes(32))
        == hashlib.sha256(
            bytes.fromhex("00000014")
            + b"cipherhive/v1/roster"
            + (2).to_bytes(8, "big")
            + b"\0\0\0\x01a"
            + b"\0\0\0\x01b"
            + b"\0\0\0\x20"
            + bytes(32)
        ).digest()
    )
    assert roster.hash.hex() == "1f23855ed4887d464f3cee1900bd6cef6d0b40af0635b94c0c5033f0358e8bab"

    [(key_a, sign_a)] = pairwise_keys(roster, xa, b"\x01" * 32)
    [(key_b, sign_b)] = pairwise_keys(roster, xb, b"\x02" * 32)
    assert key_a == key_b and (sign_a, sign_b) == (-1, 1)  # "b" has the higher fingerprint
    # The derivation, spelled out from the issue's definition.
    info = (
        b"\0\0\0\x16cipherhive/v1/pairmask"
        + b"\0\0\0\x20"
        + b"\x01" * 32
        + b"\0\0\0\x20"
        + b"\x02" * 32
        + b"\0\0\0\x20"
        + xa.public_key().public_bytes_raw()
        + b"\0\0\0\x20"
        + xb.public_key().public_bytes_raw()
    )
    assert pair_info(roster.members[0], roster.members[1]) == info
    shared = xa.exchange(xb.public_key())
    assert key_a == HKDF(hashes.SHA256(), 32, salt=roster.hash, info=info).derive(shared)
    assert key_a.hex() == "d5c011325107cfbdf054d245613175c30695892f03eba8c57aa397de4139a45f"


def test_pairwise_refuses_zero_agreement_and_foreign_key() -> None:
    roster, xa, _ = _vector_roster()
    low = roster.members[1]
    zeroed = replace(low, entry=replace(low.entry, x25519_public=bytes(32)))
    bad = replace(roster, members=(roster.members[0], zeroed))
    with pytest.raises(RosterError, match="all-zero shared secret"):
        pairwise_keys(bad, xa, b"\x01" * 32)
    with pytest.raises(RosterError, match="not the one this node enrolled with"):
        pairwise_keys(roster, X25519PrivateKey.generate(), b"\x01" * 32)
    with pytest.raises(RosterError, match="no member with certificate fingerprint"):
        pairwise_keys(roster, xa, b"\x03" * 32)


# --------------------------------------------------------------------------- commits


def test_commits(fed: Fed) -> None:
    rnd = _round(fed)
    wire = rnd.wire()
    roster = _verify(fed, rnd, wire)
    seeds = blocks_digest(SEEDS_LABEL, [b"seed0", b"seed1", b"seed2"])
    c0 = blocks_digest(C0_LABEL, [b"c0-0", b"c0-1", b"c0-2"])
    commits = {
        n: make_commit(
            roster=roster,
            cert_fingerprint=fed.parties[n].tls_fp,
            seeds_hash=seeds,
            c0_hash=c0,
            self_mask_hash=self_mask_digest(b"b" * 32),
            key=fed.parties[n].enrol_key,
        ).encode()
        for n in NAMES
    }
    got = require_all_commits(roster, commits.values())
    assert set(got) == {fed.parties[n].tls_fp for n in NAMES}
    assert Commit.decode(commits["acme"]).roster_hash == roster.hash

    with pytest.raises(RosterError, match=r"no valid commit yet from .*hooli"):
        require_all_commits(roster, [c for n, c in commits.items() if n != "hooli"])
    # Signed by another member's enrolment key.
    forged = make_commit(
        roster=roster,
        cert_fingerprint=fed.parties["hooli"].tls_fp,
        seeds_hash=seeds,
        c0_hash=c0,
        self_mask_hash=self_mask_digest(b"b" * 32),
        key=fed.parties["acme"].enrol_key,
    ).encode()
    with pytest.raises(RosterError, match="not signed by its enrolment key"):
        require_all_commits(roster, [forged])
    # A commit for another roster (another member's view).
    wrong = Commit(b"\x99" * 32, fed.parties["hooli"].tls_fp, seeds, c0, bytes(32), b"").encode()
    with pytest.raises(RosterError, match="another roster"):
        require_all_commits(roster, [wrong])
    with pytest.raises(RosterError, match="malformed commit"):
        require_all_commits(roster, [commits["acme"] + b"\0"])
    # The same member signing two different commits is refused.
    twice = make_commit(
        roster=roster,
        cert_fingerprint=fed.parties["acme"].tls_fp,
        seeds_hash=seeds,
        c0_hash=bytes(32),
        self_mask_hash=self_mask_digest(b"b" * 32),
        key=fed.parties["acme"].enrol_key,
    ).encode()
    with pytest.raises(RosterError, match="two different commits"):
        require_all_commits(roster, [*commits.values(), twice])


def test_vector_commit_and_blocks_digest() -> None:
    commit = Commit(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, b"\x04" * 32, b"\x05" * 32, b"")
    assert commit.signed_bytes() == b"\0\0\0\x14cipherhive/v1/commit" + b"".join(
        b"\0\0\0\x20" + bytes([i]) * 32 for i in (1, 2, 3, 4, 5)
    )
    assert Commit.decode(commit.encode()) == commit
    assert blocks_digest(SEEDS_LABEL, [b"a"]).hex() == (
        "690e78062f69f4324a3db2e8387fa3d00b328b9ddcf245bf7c15032aef860b61"
    )
    assert blocks_digest(SEEDS_LABEL, [b"a"]) != blocks_digest(C0_LABEL, [b"a"])


# --------------------------------------------------------------------------- chain hash


def test_vector_chain_hash(tmp_path: Path) -> None:
    chain = ChainHash.genesis(bytes(32), "11" * 32)
    assert (
        chain.value
        == hashlib.sha256(
            b"\0\0\0\x13cipherhive/v1/chain" + b"\0\0\0\x20" + bytes(32) + b"\0\0\0\x20" + b"\x11" * 32
        ).digest()
    )
    assert chain.hex() == "7bffbea38d0775e512ea5bdfa33c7b707ecf73cda758b84b23d42446eb2df3ef"
    digest = sum_digest([b"block0", b"block1"])
    assert (
        digest
        == hashlib.sha256(
            b"\0\0\0\x11cipherhive/v1/sum"
            + b"\0\0\0\x06block0"
            + b"\0\0\0\x06block1"
            + b"\0\0\0\x08"
            + (2).to_bytes(8, "big")
        ).digest()
    )
    before = chain.value
    after = chain.apply(digest)
    assert (
        after
        == hashlib.sha256(
            b"\0\0\0\x18cipherhive/v1/chain/step" + b"\0\0\0\x20" + before + b"\0\0\0\x20" + digest
        ).digest()
    )
    assert chain.hex() == "bf7c26010e42c6dafd37ac3a696be1fe255b5a6d9e18ebac4421719cf1529b56"

    path = tmp_path / "chain"
    chain.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert ChainHash.load(path) == chain
    path.write_text("not hex\n")
    with pytest.raises(ValueError, match="restore it from a backup"):
        ChainHash.load(path)
    with pytest.raises(ValueError, match="32 bytes"):
        ChainHash.genesis(b"short", "11" * 32)


def test_enrolment_certificate_outside_its_validity(fed: Fed) -> None:
    cert = x509.load_pem_x509_certificate(fed.parties["acme"].enrol_cert)
    later = cert.not_valid_after_utc + timedelta(days=1)
    with pytest.raises(enrolment_certs.EnrolmentError, match="outside its validity"):
        enrolment_certs.verify_certificate(cert, fed.ca_cert, fed.crl(), now=later)
    assert enrolment_certs.verify_certificate(cert, fed.ca_cert, fed.crl()).name == "acme"


def test_withdrawals(fed: Fed) -> None:
    """A signed withdrawal (docs/spec/masked-round.md §2.1): canonical, bound to one round, one
    member and its reason; another key's signature or any changed byte does not verify."""
    from cipherhive.secagg.withdrawal import MAX_REASON_BYTES, Withdrawal, make_withdrawal

    acme, eve = fed.parties["acme"], fed.parties["eve"]
    acme_key = acme.enrol_key.public_key()
    w = make_withdrawal(
        round_number=7,
        nonce=b"\x11" * 32,
        cert_fingerprint=acme.tls_fp,
        reason="refused the roster",
        key=acme.enrol_key,
    )
    data = w.encode()
    assert Withdrawal.decode(data) == w and w.verify(acme_key)
    assert not w.verify(eve.enrol_key.public_key())
    forged = make_withdrawal(
        round_number=7, nonce=b"\x11" * 32, cert_fingerprint=acme.tls_fp, reason="x", key=eve.enrol_key
    )
    assert not forged.verify(acme_key)
    for changed in (
        Withdrawal(8, w.nonce, w.cert_fingerprint, w.reason, w.signature),
        Withdrawal(7, b"\x12" * 32, w.cert_fingerprint, w.reason, w.signature),
        Withdrawal(7, w.nonce, eve.tls_fp, w.reason, w.signature),
        Withdrawal(7, w.nonce, w.cert_fingerprint, "stopping", w.signature),
    ):
        assert not changed.verify(acme_key), changed
    with pytest.raises(WireError):
        Withdrawal.decode(data + b"\x00")
    with pytest.raises(WireError):
        Withdrawal.decode(data[:-3])
    long = make_withdrawal(
        round_number=7, nonce=b"\x11" * 32, cert_fingerprint=acme.tls_fp, reason="é" * 400, key=acme.enrol_key
    )
    assert len(long.reason.encode()) <= MAX_REASON_BYTES and long.reason == "é" * (MAX_REASON_BYTES // 2)
    assert Withdrawal.decode(long.encode()).verify(acme_key)
