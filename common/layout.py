"""The layout of a federated update: which tensors, in which order, with which shapes.

Every member must flatten its update the same way, or the server would add
unrelated numbers together. The layout travels at join time; its hash travels
with every submission and is checked by the server.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from cipherhive.v1 import federation_pb2 as pb


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    tensors: tuple[TensorSpec, ...]
    base_model_hash: str = ""

    @property
    def num_params(self) -> int:
        return sum(t.size for t in self.tensors)

    @property
    def num_values(self) -> int:
        """Values in the encrypted vector: the parameters and the FedAvg weight."""
        return self.num_params + 1

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
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    def to_proto(self) -> pb.Layout:
        return pb.Layout(
            tensors=[pb.TensorSpec(name=t.name, shape=list(t.shape)) for t in self.tensors],
            num_params=self.num_params,
            base_model_hash=self.base_model_hash,
        )

    @classmethod
    def from_proto(cls, msg: pb.Layout) -> Layout:
        return cls(
            tuple(TensorSpec(t.name, tuple(int(d) for d in t.shape)) for t in msg.tensors),
            msg.base_model_hash,
        )

    @classmethod
    def from_canonical(cls, text: str) -> Layout:
        data = json.loads(text)
        return cls(tuple(TensorSpec(n, tuple(s)) for n, s in data["tensors"]), data["base_model_hash"])


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
    return (
        f"{len(theirs.tensors)} tensors sent but the federation has {len(ours.tensors)}"
        if len(ours.tensors) != len(theirs.tensors)
        else "layouts are equal"
    )
