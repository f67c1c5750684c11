"""What a node checks before it applies a decrypted sum, and how it refuses one.

Everything a node decrypts came over the network: from the server, and through
it from every other member. A well-formed ciphertext of ``[-100, 0, …]`` from a
single hostile member, a ciphertext under another key, or a tiny weight carrying
a huge update are all valid CKKS ciphertexts; only their *decryption* shows that
the sum is not one honest members can have produced. So the node checks the sum
while it applies it into a scratch buffer (:class:`CheckedApplier`), and a sum
that fails is *rejected*: never applied, never a reason to exit.

The checks, and why each bound is what it is:

* **participants ≥ the node's own floor** (``[node] min_participants``). Checked
  before anything is downloaded, so a node never even decrypts a sum of fewer
  members than it accepts (a sum of one update *is* that update).
* **the check slot equals the announced participants**: every member encodes
  1.0 in slot 1 of its vector (docs/spec/sum-checks.md §1), so the decrypted sum holds the
  number of contributors there. A server that announces more participants than
  it summed (to pass the floor above) is caught: |slot - participants| must be
  below 1e-3, far above CKKS error (~1e-9) and far below one member.
* **total weight Σw**: finite, > 0, at least this node's own weight when it
  contributed (every other honest weight is positive), and at most
  ``participants x VALUE_RANGE / max_participants`` — the most that many honest
  members can encode (each checks ``|w| ≤ VALUE_RANGE / max_participants``
  before encrypting).
* **every decrypted value** finite and within that same range: a sum made under
  another key decrypts to values spread over the whole modulus (~2^19), far
  outside what honest members can send.
* **the mean update** ``|Σw·Δ / Σw| ≤ max_update_value`` for every value (an L∞
  bound). L∞ rather than L2 because it does not depend on the model's size (an
  L2 bound must grow with √n and be tuned per model) and because one wrecked
  value is enough to wreck a model; it is what stops a tiny weight carrying a
  huge update.
* **the evaluation slots** (docs/spec/sum-checks.md §5) are values like any other here (finite, in range);
  whether they make a plausible evaluation is checked when they are read
  (:func:`cipherhive.node.training.federated_eval.decode`), and an implausible one is only not
  shown: it says nothing about the update, so it is no reason to reject the sum.
* **member-level DP** (``grid_bits`` set): every decrypted value is rounded
  back to the grid 2^-grid_bits *before* it is checked, applied or shown, so
  the sum used is exactly the members' integer sum and CKKS error never acts
  as noise; a value more than a quarter step off the grid (CKKS error is
  ~1e-9, a step at least ~1e-6) means a contributor did not follow the grid
  (``off_grid``). The total weight, a count of contributors then, is rounded too.
* **SCAFFOLD's control block** (a layout with control tensors): divided by the
  participants (checked against the check slot) instead of ``Σw``, bounded by
  the same ``max_update_value``, and applied as the plain mean: the server-side
  optimizer steps the model only.
* **the stream**: the round and layout asked for, the number of blocks (see
  :mod:`cipherhive.node.transfer.fetch` for chunk order and counts).

Reasons are a small fixed set (they label a Prometheus counter) with a sentence
in words for the log and the server. Neither ever contains a decrypted value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cipherhive.ckks.codec import VALUE_RANGE
from cipherhive.federation.layout import CHECK_SLOT, LEADING_VALUES, WEIGHT_SLOT
from cipherhive.v1 import federation_pb2 as pb

#: Largest distance, in grid steps, a decrypted value may be from the member-level DP grid.
GRID_TOLERANCE = 0.25

#: The fixed reason labels of ``cipherhive_node_sums_rejected_total{reason}``.
REASONS = (
    "too_few_participants",
    "participants_mismatch",
    "bad_weight",
    "out_of_range",
    "update_too_large",
    "malformed",
    # Masked rounds (docs/spec/masked-round.md §8): refused before anything is decrypted.
    "unverifiable",
    "proof",
    "seeds",
    "seed_check",
    # Member-level DP (docs/spec/privacy.md §2): a decrypted value far from the announced grid.
    "off_grid",
)

#: Slack for CKKS decryption error (~1e-9 for honest sums) in weight comparisons.
_TOLERANCE = 1e-6
#: Largest distance between the decrypted check slot and the announced participants.
CHECK_SLOT_TOLERANCE = 1e-3


class SumRejected(Exception):
    """A sum this node will not apply: ``reason`` is a label of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SumLimits:
    """The bounds one sum is checked against.

    ``floor`` and ``max_update`` are the node's own settings; ``max_participants``
    comes from the server (a hostile server could only loosen the range check
    with it, never the floor or the update bound); ``own_weight`` is this node's
    weight in the round when it contributed, else 0.
    """

    floor: int
    max_update: float
    max_participants: int
    participants: int
    own_weight: float = 0.0
    #: Member-level DP: decrypted values are rounded to multiples of 2^-grid_bits (0: off).
    grid_bits: int = 0

    @property
    def value_limit(self) -> float:
        """Largest magnitude ``participants`` honest members can make a summed value reach."""
        share = VALUE_RANGE / max(1, self.max_participants)
        return max(1, self.participants) * share * (1 + 1e-6) + _TOLERANCE


def member_grid_bits(schedule: pb.PrivacySchedule) -> int:
    """The grid a sum is rounded to: member-level DP's, else 0 (no rounding)."""
    return int(schedule.grid_bits) if schedule.mode == pb.PrivacySchedule.MEMBER else 0


def check_participants(participants: int, floor: int) -> None:
    if participants < floor:
        raise SumRejected(
            "too_few_participants",
            f"the sum has {participants} participants, below this node's floor of {floor}",
        )


def check_participant_slot(value: float, participants: int) -> None:
    """The check slot (Σ 1.0 over the contributors) must equal the announced participants."""
    if not math.isfinite(value) or abs(value - participants) >= CHECK_SLOT_TOLERANCE:
        raise SumRejected(
            "participants_mismatch",
            f"the sum's check slot does not count the {participants} participants the server announced",
        )


def check_total_weight(total: float, limits: SumLimits) -> None:
    """Σw must be what ``limits.participants`` honest members can have sent (no value in messages)."""
    if not math.isfinite(total) or total <= 1e-9:
        raise SumRejected("bad_weight", "the total weight is not a positive number")
    if limits.own_weight and total < limits.own_weight - _TOLERANCE:
        raise SumRejected("bad_weight", "the total weight is below this node's own weight in the round")
    if total > limits.value_limit:
        raise SumRejected(
            "bad_weight",
            f"the total weight exceeds what {limits.participants} members can encode",
        )


#: Turns the mean update of values ``lo:hi`` into the change added to the global model
#: (a server-side optimizer, :meth:`cipherhive.node.sums.optimizers.ServerOptimizer.step`).
Step = Callable[[int, int, np.ndarray], np.ndarray]


class CheckedApplier:
    """Check and apply a decrypted sum block by block: ``out = float32(global + step(Σw·Δ / Σw))``.

    ``out`` is written, ``global_`` only read. A block is checked before any of
    it is written; when a check fails, what earlier blocks wrote into ``out`` is
    restored from ``global_`` before :class:`SumRejected` is raised, so ``out``
    equals the global model again. ``mean`` (optional) receives the float64 average.
    ``step`` (default: the average itself, FedAvg) is the server-side optimizer; the
    checks bound the average the members sent, not the optimizer's step.
    """

    def __init__(
        self,
        global_: np.ndarray,
        out: np.ndarray,
        per_block: int,
        limits: SumLimits,
        mean: np.ndarray | None = None,
        step: Step | None = None,
        control_start: int | None = None,
    ) -> None:
        self.global_ = global_
        #: Where SCAFFOLD's control block starts among the values (none: the end).
        self.control_start = global_.shape[0] if control_start is None else control_start
        self.step = step
        self.out = out
        self.per_block = per_block
        self.limits = limits
        self.mean = mean
        self.total_weight = 0.0
        self.blocks = 0
        self._written = 0  # out[:_written] may differ from global_
        #: :func:`cipherhive.secagg.chain.sum_digest` of the sum as received (set once it is checked).
        self.sum_digest = b""
        #: The decrypted leading values (weight, check slot, evaluation slots), once the first
        #: block passed its checks.
        self.leading = np.zeros(LEADING_VALUES)

    def feed(self, block: np.ndarray) -> None:
        try:
            self._feed(block)
        except SumRejected:
            self.restore()
            raise

    def finish(self, expected_blocks: int) -> None:
        """After the last block: the sum must have had exactly ``expected_blocks``."""
        if self.blocks != expected_blocks:
            self.restore()
            raise SumRejected("malformed", f"the sum arrived with {self.blocks} of {expected_blocks} blocks")

    def restore(self) -> None:
        """Put the global model back into whatever part of ``out`` was written."""
        if self._written:
            self.out[: self._written] = self.global_[: self._written]
            self._written = 0

    def _to_grid(self, values: np.ndarray) -> np.ndarray:
        steps = np.ldexp(values, self.limits.grid_bits)
        rounded = np.rint(steps)
        if steps.size and float(np.abs(steps - rounded).max()) > GRID_TOLERANCE:
            raise SumRejected(
                "off_grid", "the sum holds values off the member-level DP grid (a contributor ignored it)"
            )
        out: np.ndarray = np.ldexp(rounded, -self.limits.grid_bits)
        return out

    def _feed(self, block: np.ndarray) -> None:
        limits = self.limits
        if self.blocks * self.per_block >= self.global_.shape[0] + LEADING_VALUES:
            raise SumRejected("malformed", "the sum has more blocks than this node's layout")
        start = self.blocks * self.per_block
        first = 0
        if start == 0:
            if block.shape[0] < LEADING_VALUES:
                raise SumRejected("malformed", "the sum's first block cannot hold the weight and check slot")
            check_participant_slot(float(block[CHECK_SLOT]), limits.participants)
            weight = float(block[WEIGHT_SLOT])
            if limits.grid_bits and math.isfinite(weight):
                weight = float(round(weight))  # uniform weights: a count of contributors
            check_total_weight(weight, limits)
            self.total_weight = weight
            first = LEADING_VALUES
        if not np.isfinite(block).all():
            raise SumRejected("out_of_range", "the sum holds values that are not finite numbers")
        if block.size and float(np.abs(block).max()) > limits.value_limit:
            raise SumRejected(
                "out_of_range",
                "the sum holds values beyond what honest members can encode "
                "(made under another key, or corrupted)",
            )
        if start == 0:
            self.leading = block[:LEADING_VALUES].copy()
        lo = start + first - LEADING_VALUES
        hi = min(start + block.shape[0] - LEADING_VALUES, self.global_.shape[0])
        if hi > lo:
            values = block[first : first + hi - lo]
            if limits.grid_bits:
                values = self._to_grid(values)
            split = min(max(self.control_start, lo), hi)  # model values lo:split, control split:hi
            part = np.empty(hi - lo)
            part[: split - lo] = values[: split - lo] / self.total_weight
            part[split - lo :] = values[split - lo :] / max(1, limits.participants)
            if part.size and float(np.abs(part).max()) > limits.max_update:
                raise SumRejected(
                    "update_too_large",
                    f"the mean update exceeds this node's bound of {limits.max_update:g} per value",
                )
            if self.mean is not None:
                self.mean[lo:hi] = part
            change = part
            if self.step is not None and split == hi:  # no control value in this block
                change = self.step(lo, hi, part)
            elif self.step is not None and split > lo:
                change = part.copy()
                change[: split - lo] = self.step(lo, split, part[: split - lo])
            self.out[lo:hi] = self.global_[lo:hi] + change
            self._written = hi
        self.blocks += 1
