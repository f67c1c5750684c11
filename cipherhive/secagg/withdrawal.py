"""Signed withdrawals: a member's word that it leaves the masked round it enrolled in.

SecAgg (Bonawitz et al., CCS 2017, §4) lets a round lose members and still finish;
cipherhive's server instead re-forms a round that has not taken any upload yet
(docs/spec/masked-round.md §2.1). It may only do so on the member's own word, or a
hostile server could drop members at will and claim they left. So the member signs,
with its enrolment key,

    "cipherhive/v1/withdrawal" ‖ round ‖ round nonce ‖ TLS certificate fingerprint ‖ reason

The nonce ties it to one round (it cannot be replayed into another), the fingerprint
says whose it is, and the reason is the member's own words (why it refused the
roster, or that it is stopping), shown to the operator. Members never see another
member's withdrawal: a re-formed roster is checked like any roster (§2).

Wire form: the fields above, length-prefixed (:mod:`cipherhive.secagg.wire`), then the
signature (DER, low-``s``, ≤ 72 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from cipherhive.pki import enrolment_certs
from cipherhive.secagg.roster import HASH_BYTES, MAX_SIGNATURE
from cipherhive.secagg.wire import Reader, WireError, field, fields, read_u64, u64

__all__ = ["MAX_REASON_BYTES", "REPLACED_ROSTER", "WITHDRAWAL_LABEL", "Withdrawal", "make_withdrawal"]

WITHDRAWAL_LABEL = b"cipherhive/v1/withdrawal"
#: A reason is for a person to read: one line, not a document.
MAX_REASON_BYTES = 300
NONCE_BYTES = 32
#: How the server refuses an upload masked for a roster it re-formed since: the member masks
#: again for the new roster and sends that instead (docs/spec/masked-round.md §2.1).
REPLACED_ROSTER = "masked for a replaced roster"


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """One member's signed withdrawal from one round."""

    round: int
    nonce: bytes
    cert_fingerprint: bytes
    reason: str
    signature: bytes

    def signed_bytes(self) -> bytes:
        """The canonical bytes the enrolment key signs."""
        return fields(
            WITHDRAWAL_LABEL, u64(self.round), self.nonce, self.cert_fingerprint, self.reason.encode()
        )

    def encode(self) -> bytes:
        return self.signed_bytes() + field(self.signature)

    @classmethod
    def decode(cls, data: bytes) -> Withdrawal:
        """Parse wire bytes; refuses trailing bytes, wrong sizes and a reason that is not UTF-8."""
        r = Reader(data, "withdrawal")
        r.expect(WITHDRAWAL_LABEL)
        number = read_u64(r.take("round", 8, exact=8), "round")
        nonce = r.take("nonce", NONCE_BYTES, exact=NONCE_BYTES)
        fingerprint = r.take("certificate fingerprint", HASH_BYTES, exact=HASH_BYTES)
        raw = r.take("reason", MAX_REASON_BYTES)
        signature = r.take("signature", MAX_SIGNATURE)
        r.finish()
        try:
            reason = raw.decode()
        except UnicodeDecodeError:
            raise WireError("withdrawal: the reason is not UTF-8") from None
        return cls(number, nonce, fingerprint, reason, signature)

    def verify(self, key: ec.EllipticCurvePublicKey) -> bool:
        return enrolment_certs.verify_signature(key, self.signature, self.signed_bytes())


def make_withdrawal(
    *,
    round_number: int,
    nonce: bytes,
    cert_fingerprint: bytes,
    reason: str,
    key: ec.EllipticCurvePrivateKey,
) -> Withdrawal:
    """Sign a withdrawal; the reason is cut to :data:`MAX_REASON_BYTES` (whole characters)."""
    text = reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
    unsigned = Withdrawal(round_number, nonce, cert_fingerprint, text, b"")
    return Withdrawal(
        round_number, nonce, cert_fingerprint, text, enrolment_certs.sign(key, unsigned.signed_bytes())
    )
