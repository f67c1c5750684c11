"""The node's half of a masked round (SecAgg, Bonawitz et al., CCS 2017, §4 and §6).

Specified in docs/spec/masked-round.md.

One :class:`Participation` per round this node takes part in, kept in memory
across reconnects (a server restart resumes the round where it was):

1. :meth:`Participation.enrol` — a fresh X25519 key, signed with the
   enrolment key over the round's binding (§4 round 0 with §6's signature);
2. :meth:`Participation.accept_roster` — every check of docs/spec/masked-round.md §2
   (:func:`cipherhive.secagg.roster.verify_roster`), against this node's own pinned
   membership, floor, CA and CRL; a refusal means nothing is uploaded;
3. :meth:`Participation.mask_plan` — pairwise keys and a fresh self-mask seed;
   the X25519 private key is dropped once the upload is acknowledged
   (:meth:`Participation.forget_key`; a re-formed roster before that is masked for again);
4. :meth:`Participation.write_upload` — the masked ciphertexts go to a 0600
   file, fsynced, *before* the first byte is sent, and only that file is ever
   sent (a reconnect resends it; nothing is masked twice);
5. :meth:`Participation.commit` — the signed commit, after the receipt;
6. :meth:`Participation.release` — the self-mask seed, only with every
   member's valid commit in hand and after the release ledger recorded it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cipherhive.ckks import codec
from cipherhive.node.secagg.release_ledger import ReleaseLedger
from cipherhive.pki import enrolment_certs
from cipherhive.runtime import records as record_file
from cipherhive.runtime.fsutil import atomic_write, fsync_dir
from cipherhive.secagg import masking
from cipherhive.secagg.commit import UploadDigests, make_commit, require_all_commits, self_mask_digest
from cipherhive.secagg.roster import (
    Enrolment,
    Roster,
    RosterError,
    RoundBinding,
    make_enrolment,
    pairwise_keys,
    verify_roster,
)
from cipherhive.secagg.withdrawal import make_withdrawal

__all__ = ["MaskingSetup", "Participation", "params_id"]

#: The file a participation is kept in between restarts (0600, next to its upload).
PART_FORMAT = "cipherhive/v1/participation"


def params_id() -> bytes:
    """The CKKS parameters every roster entry must share (the key fingerprint pins the rest)."""
    bits = "-".join(str(b) for b in codec.COEFF_MOD_BIT_SIZES)
    return f"ckks/{codec.POLY_MODULUS_DEGREE}/{bits}/{codec.SCALE_BITS}".encode()


@dataclass(frozen=True)
class MaskingSetup:
    """What this node checks rosters against: all from its own configuration, never the server."""

    members: tuple[str, ...]
    floor: int
    ca_cert: x509.Certificate
    crl_path: Path
    enrol_cert: bytes
    enrol_key: ec.EllipticCurvePrivateKey
    tls_fingerprint: bytes
    aggregator: str
    federation: bytes

    @classmethod
    def load(
        cls,
        *,
        members: Sequence[str],
        floor: int,
        tls_cert: Path,
        tls_ca: Path,
        enrol_cert: Path,
        enrol_key: Path,
        crl: Path,
        aggregator: str,
        federation_fingerprint: str,
    ) -> MaskingSetup:
        """Read the files; a missing or unusable one raises :class:`enrolment_certs.EnrolmentError`."""
        try:
            ca = x509.load_pem_x509_certificate(tls_ca.read_bytes())
            tls = x509.load_pem_x509_certificate(tls_cert.read_bytes())
            enrol_pem = enrol_cert.read_bytes()
        except (OSError, ValueError) as exc:
            raise enrolment_certs.EnrolmentError(
                f"cannot read a certificate for masked rounds: {exc}"
            ) from exc
        key = enrolment_certs.load_key(enrol_key)
        tls_fp = hashlib.sha256(tls.public_bytes(serialization.Encoding.DER)).digest()
        return cls(
            tuple(members),
            floor,
            ca,
            crl,
            enrol_pem,
            key,
            tls_fp,
            aggregator,
            bytes.fromhex(federation_fingerprint),
        )

    def revocations(self) -> x509.CertificateRevocationList:
        """The CRL, read now; fail closed: a missing or unreadable CRL refuses the roster."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise RosterError(
                f"cannot read the revocation list {self.crl_path} ({exc}); without it no roster member's "
                "certificate can be checked, so this node does not take part: copy crl.pem from the CA"
            ) from None
        return crl

    def binding(self, round_number: int, nonce: bytes, chain_hash: bytes, block_count: int) -> RoundBinding:
        return RoundBinding(
            self.federation, self.aggregator, round_number, nonce, chain_hash, params_id(), block_count
        )


@dataclass
class UploadFile:
    """The masked update on disk: sent as is, and what the commit is over."""

    path: Path
    count: int
    seeds_hash: bytes
    blocks_hash: bytes

    def blobs(self) -> Iterator[bytes]:
        yielded = 0
        try:
            for blob in itertools.islice(record_file.read_records(self.path), self.count):
                yielded += 1
                yield blob
        except record_file.RecordsError as exc:
            raise OSError(str(exc)) from None
        if yielded != self.count:
            raise OSError(f"{self.path} is truncated: {yielded} of {self.count} blocks")


@dataclass
class Participation:
    """This node's state in one masked round, kept across reconnects."""

    setup: MaskingSetup
    binding: RoundBinding
    base_round: int
    enrolment: Enrolment
    _x25519: X25519PrivateKey | None
    roster: Roster | None = None
    plan: masking.MaskPlan | None = None
    upload: UploadFile | None = None
    receipt: str = ""
    commit_bytes: bytes = b""
    released: bool = False
    #: The FedAvg weight and the trainer's result of the update (for the upload header).
    weight: float = 0.0
    result: Any = None
    train_s: float = 0.0
    #: The release was about to be recorded (a crash may fall between the ledger and the send).
    releasing: bool = False
    #: The roster was re-formed once (docs/spec/masked-round.md §2.1); a second one is refused.
    reformed: bool = False

    @property
    def round(self) -> int:
        return self.binding.round

    @classmethod
    def enrol(
        cls,
        setup: MaskingSetup,
        round_number: int,
        base_round: int,
        nonce: bytes,
        chain_hash: bytes,
        blocks: int,
    ) -> Participation:
        """A fresh X25519 key and the signed enrolment for this round (never reused)."""
        binding = setup.binding(round_number, nonce, chain_hash, blocks)
        private = X25519PrivateKey.generate()
        entry = make_enrolment(
            binding=binding,
            cert_fingerprint=setup.tls_fingerprint,
            x25519_public=private.public_key(),
            certificate=setup.enrol_cert,
            key=setup.enrol_key,
        )
        return cls(setup, binding, base_round, entry, private)

    def accept_roster(self, entries: Sequence[bytes]) -> Roster:
        """Verify the roster (docs/spec/masked-round.md §2); the same roster again is accepted,
        another refused."""
        roster = verify_roster(
            entries,
            me=self.enrolment,
            ca_cert=self.setup.ca_cert,
            crl=self.setup.revocations(),
            pinned_members=self.setup.members,
            floor=self.setup.floor,
            expected=self.binding,
        )
        previous = self.roster
        if previous is not None and roster.hash != previous.hash:
            # docs/spec/masked-round.md §2.1: one re-forming, to a strict subset, before the upload
            # was acknowledged; an update masked for the first roster is masked again.
            # Whole signed entries, not fingerprints: a member kept must keep the key it enrolled.
            kept = {m.encoded for m in previous.members}
            mine = {m.encoded for m in roster.members}
            if self.receipt or self._x25519 is None:
                raise RosterError("the server re-formed the roster after this node's upload was accepted")
            if self.reformed or not mine < kept:
                raise RosterError(
                    "the server sent a different roster for the same round that is not the first one "
                    "without some of its members; abandoning it"
                )
            self.reformed = True
            self.plan = None  # masked for the replaced roster: never sent, masked again
            if self.upload is not None:
                self.upload.path.unlink(missing_ok=True)
                self.upload = None
        self.roster = roster
        return roster

    def withdrawal(self, reason: str) -> bytes:
        """This member's signed withdrawal from the round (docs/spec/masked-round.md §2.1)."""
        return make_withdrawal(
            round_number=self.round,
            nonce=self.binding.nonce,
            cert_fingerprint=self.setup.tls_fingerprint,
            reason=reason,
            key=self.setup.enrol_key,
        ).encode()

    def mask_plan(self, modulus: int) -> masking.MaskPlan:
        """Pairwise keys and a fresh self-mask seed for the current roster."""
        if self.plan is not None:
            return self.plan
        if self.roster is None or self._x25519 is None:
            raise RosterError("no verified roster (or the key was already used): cannot mask")
        pairs = pairwise_keys(self.roster, self._x25519, self.setup.tls_fingerprint)
        self.plan = masking.MaskPlan.fresh(pairs, modulus)
        return self.plan

    def forget_key(self) -> None:
        """The upload was acknowledged: the X25519 private key is erased (docs/spec/masked-round.md
        §3). It is kept until then only so that a roster re-formed while this node masked can be
        masked for again (§2.1)."""
        self._x25519 = None

    def write_upload(self, path: Path, blobs: Iterable[bytes]) -> UploadFile:
        """Write the masked ciphertexts (0600), fsync, and hash them as the commit will say."""
        digests = UploadDigests()
        tmp = path.with_suffix(".partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        count = 0
        with os.fdopen(fd, "wb") as fh:
            fh.write(record_file.MAGIC)
            for blob in blobs:
                record_file.write_record(fh, blob)
                digests.add(count, blob)
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        final = digests.final(count)
        assert final is not None
        upload = UploadFile(path, count, *final)
        self.upload = upload
        return upload

    def commit(self) -> bytes:
        """The signed commit (docs/spec/masked-round.md §5), once the upload has its receipt."""
        if self.commit_bytes:
            return self.commit_bytes
        assert self.roster is not None and self.upload is not None and self.plan is not None
        self.commit_bytes = make_commit(
            roster=self.roster,
            cert_fingerprint=self.setup.tls_fingerprint,
            seeds_hash=self.upload.seeds_hash,
            c0_hash=self.upload.blocks_hash,
            self_mask_hash=self_mask_digest(self.plan.self_seed),
            key=self.setup.enrol_key,
        ).encode()
        return self.commit_bytes

    def release(self, commits: Sequence[bytes], ledger: ReleaseLedger, base_key: str) -> bytes:
        """The self-mask seed, only with every member's valid commit and the ledger's record first."""
        assert self.roster is not None and self.plan is not None
        got = require_all_commits(self.roster, commits)
        mine = got[self.setup.tls_fingerprint]
        if mine.encode() != self.commit_bytes:
            raise RosterError("the server forwarded another commit in this node's name; not releasing")
        if not self.released:
            if not (self.releasing and base_key in ledger.released()):
                # A crash after the record and before the send leaves releasing set and the base
                # recorded: the same seed of the same round goes again, which is no new release.
                ledger.record_release(base_key)  # raises if a release on this base was recorded before
            self.released = True
        return self.plan.self_seed

    def discard(self) -> None:
        """The round is over: its upload file goes, and no key of it stays in memory."""
        self._x25519 = None
        self.plan = None
        if self.upload is not None:
            self.upload.path.unlink(missing_ok=True)
            part_path(self.upload.path.parent, self.round).unlink(missing_ok=True)

    # ------------------------------------------------------------ across a restart

    def save(self, state_dir: Path) -> None:
        """Keep what a restarted node needs to finish this round with the *same* upload.

        Written (0600, atomically) once the masked upload is on disk and again at every later
        step, always before that step's message is sent. It holds the self-mask seed (this
        node's own secret, like ``secret.ctx`` beside it) and never the X25519 key, which is
        gone by then: a restarted node resends, commits and releases, but never masks again.
        """
        assert self.upload is not None and self.plan is not None
        result = self.result
        doc = {
            "format": PART_FORMAT,
            "round": self.round,
            "base_round": self.base_round,
            "enrolment": self.enrolment.encode().hex(),
            "self_seed": self.plan.self_seed.hex(),
            "modulus": self.plan.modulus,
            "upload": {
                "file": self.upload.path.name,
                "count": self.upload.count,
                "seeds_hash": self.upload.seeds_hash.hex(),
                "blocks_hash": self.upload.blocks_hash.hex(),
            },
            "receipt": self.receipt,
            "commit": self.commit_bytes.hex(),
            "releasing": self.releasing,
            "released": self.released,
            "weight": self.weight,
            "samples": int(getattr(result, "num_samples", 0)),
            "metrics": dict(getattr(result, "metrics", {}) or {}),
        }
        atomic_write(part_path(state_dir, self.round), json.dumps(doc).encode(), mode=0o600)

    @classmethod
    def restore(
        cls, setup: MaskingSetup, state_dir: Path, round_number: int, nonce: bytes
    ) -> Participation | None:
        """This node's participation in round ``round_number`` from before a restart, if any."""
        path = part_path(state_dir, round_number)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != PART_FORMAT or doc["round"] != round_number:
                return None
            entry = Enrolment.decode(bytes.fromhex(doc["enrolment"]))
            up = doc["upload"]
            upload = UploadFile(
                state_dir / Path(up["file"]).name,
                int(up["count"]),
                bytes.fromhex(up["seeds_hash"]),
                bytes.fromhex(up["blocks_hash"]),
            )
            plan = masking.MaskPlan(bytes.fromhex(doc["self_seed"]), (), int(doc["modulus"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if entry.binding.nonce != nonce or entry.cert_fingerprint != setup.tls_fingerprint:
            return None  # another round's file, or another identity's: never resent
        if not upload.path.exists():
            return None
        from cipherhive.node.trainer import TrainResult

        part = cls(setup, entry.binding, int(doc["base_round"]), entry, None, plan=plan, upload=upload)
        part.receipt = str(doc.get("receipt", ""))
        part.commit_bytes = bytes.fromhex(doc.get("commit", ""))
        part.releasing = bool(doc.get("releasing"))
        part.released = bool(doc.get("released"))
        part.weight = float(doc.get("weight", 0.0))
        part.result = TrainResult(
            num_samples=int(doc.get("samples", 0)), metrics=dict(doc.get("metrics", {}))
        )
        return part

    @staticmethod
    def forget(state_dir: Path, round_number: int) -> None:
        """Remove a finished round's upload and participation files (not loaded, or loaded)."""
        part_path(state_dir, round_number).unlink(missing_ok=True)
        (state_dir / f"upload-{round_number}.ct").unlink(missing_ok=True)


def part_path(state_dir: Path, round_number: int) -> Path:
    return state_dir / f"round-{round_number}.part.json"
