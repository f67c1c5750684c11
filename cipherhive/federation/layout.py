"""The layout of a federated update: which tensors, in which order, with which shapes.

Every member must flatten its update the same way, or the server would add
unrelated numbers together. The layout travels at join time; its hash travels
with every submission and is checked by the server.

A layout also carries the fingerprint of the initial model's values
(``initial_model_hash``, :mod:`cipherhive.node.state.initial`), so that every member
starts from the same model. It is pinned and checked beside the layout hash, not
folded into it: the hash ties sums, submissions and checkpoints to the shapes, and
federations pinned before the fingerprint existed keep their published sums and
their members' checkpoints.

**Control block (SCAFFOLD).** Tensors named with :data:`CONTROL_PREFIX` are SCAFFOLD's
control variates (Karimireddy et al., ICML 2020, Algorithm 1), one per trainable federated
parameter, after all model tensors. They are ordinary layout entries, so the layout hash
covers them (a member that disagrees on SCAFFOLD is refused at join like any other layout
mismatch) and a layout without them is byte for byte the layout of before. What differs is
how the vector carries them: the control block holds ``Δc`` unweighted, and a node divides
its sum by the number of contributors instead of ``Σw`` and applies it without the server-side
optimizer (:attr:`Layout.control_start`; docs/reference/client-drift.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipherhive.runtime.errors import UserError
from cipherhive.v1 import federation_pb2 as pb

#: Bounds on any layout the server accepts (SetLayout, Join, the layout file). A layout
#: is checked against them before anything is sized from it: a hostile "2^38 values"
#: must be refused, not allocated.
MAX_LAYOUT_VALUES = 2**31
MAX_TENSORS = 10_000
MAX_NAME_CHARS = 200
MAX_DIMENSIONS = 8
MAX_DIMENSION = 2**31
MAX_LAYOUT_FILE_BYTES = 4 * 1024 * 1024
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._\-/:\[\]]{1,200}$")
_BASE_HASH = re.compile(r"^([0-9a-f]{64})?$")

#: Values in front of the parameters in the encrypted vector ``[w, 1.0, e…, w·Δ…]``:
#: the FedAvg weight (slot 0), the check slot (slot 1, 1.0 from every member, so the sum
#: holds the number of contributors there; docs/spec/sum-checks.md §1) and the evaluation slots (§5):
#: for each metric of :data:`EVAL_METRICS` in turn, ``n/u`` and ``n/u · metric``, where n is
#: the member's validation examples and u the federation's weight unit. The sum then holds
#: ``Σn`` and ``Σn·metric``: the federation-wide validation of the round's *base* model
#: (:mod:`cipherhive.node.training.federated_eval`). A fixed set keeps the vector's length fixed.
WEIGHT_SLOT = 0
CHECK_SLOT = 1
EVAL_SLOT = 2
EVAL_METRICS = ("loss", "accuracy")
EVAL_VALUES = 2 * len(EVAL_METRICS)
LEADING_VALUES = EVAL_SLOT + EVAL_VALUES

#: Names of SCAFFOLD's control-variate tensors start with this (``control:`` + the parameter's
#: name); a ``:`` never appears in a PyTorch parameter name, so no model tensor can collide.
CONTROL_PREFIX = "control:"


class LayoutError(UserError, ValueError):
    """A layout that breaks one of the bounds; the message names the tensor and the rule."""


def _shown(name: str) -> str:
    return repr(name[:40] + ("…" if len(name) > 40 else ""))


def check_bounds(tensors: Sequence[tuple[str, Sequence[int]]], base_model_hash: str) -> int:
    """Check a layout's parts against the bounds; returns its number of values.

    Works on the raw parts (a proto's repeated fields, parsed JSON) so that nothing
    proportional to a claimed size is built before the claim is checked.
    """
    if not tensors:
        raise LayoutError("layout has no tensors")
    if len(tensors) > MAX_TENSORS:
        raise LayoutError(f"layout has more than {MAX_TENSORS} tensors (MAX_TENSORS)")
    if not isinstance(base_model_hash, str) or not _BASE_HASH.match(base_model_hash):
        raise LayoutError("base_model_hash must be empty or 64 lowercase hex characters (SHA-256)")
    total = 0
    seen: set[str] = set()
    for index, (name, shape) in enumerate(tensors):
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise LayoutError(
                f"tensor #{index} {_shown(str(name))}: a name must be 1-{MAX_NAME_CHARS} characters of "
                "letters, digits and . _ - / : [ ]"
            )
        if name in seen:
            raise LayoutError(f"tensor #{index} {_shown(name)}: the name appears twice")
        seen.add(name)
        if not 1 <= len(shape) <= MAX_DIMENSIONS:
            raise LayoutError(
                f"tensor {_shown(name)}: has {len(shape)} dimensions; 1 to {MAX_DIMENSIONS} are allowed"
            )
        size = 1
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= MAX_DIMENSION:
                raise LayoutError(
                    f"tensor {_shown(name)}: dimension {dim!r} must be an integer from 1 to {MAX_DIMENSION}"
                )
            size *= dim
            if size > MAX_LAYOUT_VALUES:
                break
        total += size
        if total > MAX_LAYOUT_VALUES:
            raise LayoutError(
                f"tensor {_shown(name)}: brings the layout past {MAX_LAYOUT_VALUES} values "
                "(MAX_LAYOUT_VALUES)"
            )
    return total


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def check_initial_hash(value: object) -> str:
    """``initial_model_hash`` must be empty (not pinned) or 64 lowercase hex characters."""
    if not isinstance(value, str) or not _BASE_HASH.match(value):
        raise LayoutError(
            "initial_model_hash must be empty or 64 lowercase hex characters (HMAC-SHA256); "
            "write the layout with `cipherhive node layout`"
        )
    return value


@dataclass(frozen=True)
class Layout:
    tensors: tuple[TensorSpec, ...]
    base_model_hash: str = ""
    #: Fingerprint of the initial model's values (:mod:`cipherhive.node.state.initial`); "": not pinned.
    initial_model_hash: str = ""

    @property
    def num_params(self) -> int:
        return sum(t.size for t in self.tensors)

    @property
    def control_values(self) -> int:
        """Values of the control block (SCAFFOLD's control variates); 0 without SCAFFOLD."""
        return sum(t.size for t in self.tensors if t.name.startswith(CONTROL_PREFIX))

    @property
    def control_start(self) -> int:
        """Index, among the parameters (after the leading values), where the control block
        starts: :attr:`num_params` when there is none. Control tensors must come last."""
        seen_control = False
        for t in self.tensors:
            control = t.name.startswith(CONTROL_PREFIX)
            if seen_control and not control:
                raise LayoutError(
                    f"tensor {_shown(t.name)} follows a control tensor; control tensors come last"
                )
            seen_control = seen_control or control
        return self.num_params - self.control_values

    @property
    def num_values(self) -> int:
        """Values in the encrypted vector ``[w, 1.0, e…, w·Δ…]``: the FedAvg weight, the check
        slot, the evaluation slots and the parameters. The one source of the vector's length:
        the server sizes rounds and checks submission headers from it."""
        return self.num_params + LEADING_VALUES

    def canonical(self) -> str:
        return json.dumps(
            {
                "tensors": [[t.name, list(t.shape)] for t in self.tensors],
                "base_model_hash": self.base_model_hash,
            },
            separators=(",", ":"),
        )

    @property
    def hash(self) -> str:
        """Identifies the shapes (and the base): what sums and checkpoints are tied to.
        The initial model's fingerprint is not part of it (see the module docstring)."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    def pinned_text(self) -> str:
        """What the server stores when it pins this layout: :meth:`canonical` plus the fingerprint."""
        if not self.initial_model_hash:
            return self.canonical()
        data = json.loads(self.canonical())
        data["initial_model_hash"] = self.initial_model_hash
        return json.dumps(data, separators=(",", ":"))

    def same_pin(self, other: Layout) -> bool:
        return self.hash == other.hash and self.initial_model_hash == other.initial_model_hash

    def to_proto(self) -> pb.Layout:
        return pb.Layout(
            tensors=[pb.TensorSpec(name=t.name, shape=list(t.shape)) for t in self.tensors],
            num_params=self.num_params,
            base_model_hash=self.base_model_hash,
            initial_model_hash=self.initial_model_hash,
        )

    @classmethod
    def from_proto(cls, msg: pb.Layout) -> Layout:
        return cls(
            tuple(TensorSpec(t.name, tuple(int(d) for d in t.shape)) for t in msg.tensors),
            msg.base_model_hash,
            msg.initial_model_hash,
        )

    @classmethod
    def from_canonical(cls, text: str) -> Layout:
        """Read :meth:`canonical` or :meth:`pinned_text` (a pin from before fingerprints has none)."""
        data = json.loads(text)
        return cls(
            tuple(TensorSpec(n, tuple(s)) for n, s in data["tensors"]),
            data["base_model_hash"],
            data.get("initial_model_hash", ""),
        )

    @classmethod
    def checked_from_proto(cls, msg: pb.Layout) -> Layout:
        """:meth:`from_proto` for a layout that comes from the network: bounds first."""
        parts = [(t.name, list(t.shape)) for t in _bounded(msg.tensors)]
        total = check_bounds(parts, msg.base_model_hash)
        check_initial_hash(msg.initial_model_hash)
        if msg.num_params != total:
            raise LayoutError(
                f"layout.num_params {msg.num_params} is not the sum of its tensors' sizes ({total})"
            )
        return cls.from_proto(msg)

    @classmethod
    def checked_from_json(cls, text: str | bytes, where: str = "layout") -> Layout:
        """A layout file (``cipherhive node layout``): bounded size, shape and values."""
        if len(text) > MAX_LAYOUT_FILE_BYTES:
            raise LayoutError(
                f"{where} is {len(text)} bytes; a layout file may have at most {MAX_LAYOUT_FILE_BYTES}"
            )
        try:
            data: Any = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LayoutError(f"{where} is not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("tensors"), list):
            raise LayoutError(f'{where} must be a JSON object with "tensors": [[name, [dims…]], …]')
        parts: list[tuple[str, list[int]]] = []
        for index, item in enumerate(_bounded(data["tensors"])):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
                raise LayoutError(f"{where}: tensor #{index} must be [name, [dims…]]")
            parts.append((item[0], item[1]))
        base = data.get("base_model_hash", "")
        check_bounds(parts, base)
        initial = check_initial_hash(data.get("initial_model_hash", ""))
        return cls(tuple(TensorSpec(n, tuple(s)) for n, s in parts), base, initial)

    @classmethod
    def read_file(cls, path: Path) -> Layout:
        try:
            size = path.stat().st_size
            if size > MAX_LAYOUT_FILE_BYTES:
                raise LayoutError(
                    f"{path} is {size} bytes; a layout file may have at most {MAX_LAYOUT_FILE_BYTES}"
                )
            return cls.checked_from_json(path.read_bytes(), str(path))
        except OSError as exc:
            raise LayoutError(f"cannot read the layout file {path}: {exc.strerror or exc}") from None

    def pretty(self) -> str:
        """The canonical content for people: one tensor a line (same data, same hash once read)."""
        rows = ",\n".join(f"    {json.dumps([t.name, list(t.shape)])}" for t in self.tensors)
        return (
            '{\n  "tensors": [\n' + rows + "\n  ],\n"
            f'  "base_model_hash": {json.dumps(self.base_model_hash)},\n'
            f'  "initial_model_hash": {json.dumps(self.initial_model_hash)}\n}}\n'
        )


def _bounded(items: Iterable[Any]) -> list[Any]:
    """The first MAX_TENSORS + 1 items: enough to tell a too-long list without copying all of it."""
    out = []
    for item in items:
        out.append(item)
        if len(out) > MAX_TENSORS:
            break
    return out


def describe_difference(ours: Layout, theirs: Layout) -> str:
    """A sentence saying where two layouts first differ, for error messages."""
    if ours.base_model_hash != theirs.base_model_hash:
        return (
            f"base model hash {theirs.base_model_hash[:12] or '(none)'} differs from the "
            f"federation's {ours.base_model_hash[:12] or '(none)'}"
        )
    for i, (a, b) in enumerate(zip(ours.tensors, theirs.tensors, strict=False)):
        if a != b:
            return f"tensor #{i} is {b.name}{list(b.shape)} but the federation has {a.name}{list(a.shape)}"
    if len(ours.tensors) != len(theirs.tensors):
        return f"{len(theirs.tensors)} tensors sent but the federation has {len(ours.tensors)}"
    if ours.initial_model_hash and theirs.initial_model_hash != ours.initial_model_hash:
        if not theirs.initial_model_hash:
            return (
                "this node sent no initial model fingerprint (its cipherhive predates them) but the "
                "federation pins one; upgrade cipherhive on this node"
            )
        return (
            "initial model differs from the federation's: same tensors and shapes, but other initial "
            f"values (fingerprint {theirs.initial_model_hash[:12]}… where the federation pinned "
            f"{ours.initial_model_hash[:12]}…); "
            "every member must start from the same model: build it with the same seed (torch.manual_seed "
            "before creating it) or load the same initial checkpoint file, with the same trainer options, "
            "then restart this node"
        )
    return "layouts are equal"
