"""What a node checks before it decrypts a masked round's sum (docs/spec/masked-round.md §8).

A hostile server that could make a node decrypt a ciphertext of its choosing
would learn about the shared secret key (a key-recovery attack on CKKS: Li and
Micciancio, EUROCRYPT 2021). A masked sum is only decrypted once

1. its roster verifies as at enrolment (:func:`cipherhive.secagg.roster.verify_roster`:
   this node's pinned membership, floor, CA and CRL, the round's nonce and this
   node's own chain hash, so a node shown another history refuses the sum);
2. every roster member's signed commit verifies
   (:func:`cipherhive.secagg.commit.require_all_commits`, SecAgg §6's consistency check);
3. each member's per-block seeds hash to what that member committed to; and
4. c1 is what the members' own encryptions produced: a sum published as Σ c0
   (:mod:`cipherhive.ckks.c0_sum`) gets its c1 rebuilt here from those seeds
   (:meth:`cipherhive.ckks.codec.SecretCodec.decrypt_c0_sum`), so the server chooses
   nothing in it; a sum published as full ciphertexts must have c1 = Σ expand(seed)
   on every block (:meth:`cipherhive.node.crypto.pool.CryptoPool.check_seeds`).

Nothing about a decryption is observable before all four pass: the sum is
downloaded to disk first, checked in full, and only then decrypted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cipherhive.node.secagg.participation import MaskingSetup
from cipherhive.secagg.commit import SEEDS_LABEL, blocks_digest, require_all_commits
from cipherhive.secagg.roster import Enrolment, Roster, RosterError, verify_roster
from cipherhive.v1 import federation_pb2 as pb

__all__ = ["ProvenRoster", "check_seed_hashes", "verify_proof"]


@dataclass(frozen=True)
class ProvenRoster:
    """A masked round's verified roster and, in pair order, what each member committed its seeds to."""

    roster: Roster
    seeds_hashes: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return len(self.roster.members)


def verify_proof(
    setup: MaskingSetup,
    proof: pb.RoundProof,
    *,
    round_number: int,
    chain_hash: bytes,
    block_count: int,
    me: Enrolment | None = None,
    my_commit: bytes = b"",
) -> ProvenRoster:
    """Steps 1 and 2 above; raises :class:`RosterError` with the reason."""
    if proof.round != round_number:
        raise RosterError(f"the proof is for round {proof.round}, not round {round_number}")
    try:
        binding = setup.binding(round_number, proof.nonce, chain_hash, block_count)
    except ValueError as exc:
        raise RosterError(f"the proof's nonce is unusable ({exc})") from None
    roster = verify_roster(
        list(proof.roster),
        me=me,
        ca_cert=setup.ca_cert,
        crl=setup.revocations(),
        pinned_members=setup.members,
        floor=setup.floor,
        expected=binding,
    )
    commits = require_all_commits(roster, proof.commits)
    if my_commit and commits[setup.tls_fingerprint].encode() != my_commit:
        raise RosterError("the proof carries another commit in this node's name")
    return ProvenRoster(roster, tuple(commits[m.cert_fingerprint].seeds_hash for m in roster.members))


def check_seed_hashes(proven: ProvenRoster, block_seeds: Sequence[Sequence[bytes]]) -> None:
    """Step 3: member k's seeds over all blocks hash to its commit's seeds hash."""
    for index, seeds in enumerate(block_seeds):
        if len(seeds) != proven.size:
            raise RosterError(
                f"block {index} of the sum carries {len(seeds)} seeds for {proven.size} members"
            )
    for k, member in enumerate(proven.roster.members):
        got = blocks_digest(SEEDS_LABEL, (seeds[k] for seeds in block_seeds))
        if got != proven.seeds_hashes[k]:
            raise RosterError(f"the seeds published for {member.name!r} are not the ones it committed to")
