"""Server-side optimizers run on the nodes: FedAvg, FedAvgM, FedAdam, FedYogi.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), treat the
average of the members' updates, Δ = Σw·Δᵢ / Σw, as a *pseudo-gradient* and
let the server apply it with an optimizer of its own (their Algorithm 2,
FedOpt). In cipherhive the server cannot compute on plaintext, but every node
decrypts the same Δ and starts from the same model, so each node runs the
same optimizer on it and ends the round with the same model, bit for bit, as
long as the arithmetic is the same everywhere. The server only announces
which optimizer (``FederationSettings.optimizer``, from ``[optimizer]`` in
server.toml) and pins it once a round is published.

The update rules (m(-1) = 0, v(-1) = τ², as in Algorithm 2; no bias correction):

* **fedavg**:   x ← x + η·Δ (η = 1 is plain FedAvg, the default).
* **fedavgm**:  m ← β₁·m + Δ;  x ← x + η·m (server momentum, Hsu et al. 2019,
  the FedAvgM baseline of Reddi et al.).
* **fedadam**:  m ← β₁·m + (1-β₁)·Δ;  v ← β₂·v + (1-β₂)·Δ²;  x ← x + η·m / (√v + τ).
* **fedyogi**:  m as fedadam;  v ← v - (1-β₂)·Δ²·sign(v - Δ²);  x ← x + η·m / (√v + τ).

**Why the nodes agree bit for bit.** Every operation is an element-wise numpy
ufunc on float64 (+, -, *, ÷, √, sign), applied in a fixed order, one ufunc at a
time: IEEE 754 rounds each of them correctly, so the result does not depend on
the CPU, SIMD width or BLAS (no transcendental functions, no reductions, no
fused multiply-add). The moments are kept as float32 (the model's precision,
half the memory of float64) and the float32 values are what the next round and
the checkpoint use, so a node that restarts or catches up from a checkpoint
computes exactly what the others computed.

**Why a rejected sum changes nothing.** :meth:`ServerOptimizer.step` writes the
new moments into scratch buffers; they become the state only in
:meth:`ServerOptimizer.commit`, after the checkpoint holding them (and the model)
is written. The state travels in the checkpoint (:meth:`record`), so rolling
back a withdrawn round restores the moments of the round it returns to.
Memory: FedAvgM keeps 2 float32 copies of the federated values, FedAdam and
FedYogi 4 (committed and scratch moments); FedAvg none.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from cipherhive.federation.optimizer_settings import PLAIN_FEDAVG, OptimizerError, OptimizerSpec

__all__ = ["OptimizerError", "OptimizerSpec", "ServerOptimizer", "adopt", "restored", "spec_of"]


class ServerOptimizer:
    """The optimizer state of one node: committed moments, and scratch ones for the round in progress."""

    def __init__(self, spec: OptimizerSpec, size: int) -> None:
        self.spec = spec
        self.size = size
        self.rounds = 0
        self.state: list[np.ndarray] = []
        self._next: list[np.ndarray] = []
        self.reset()

    def reset(self) -> None:
        """The state before the first round (m = 0, v = τ²)."""
        self.rounds = 0
        self.state = [np.zeros(self.size, dtype=np.float32) for _ in range(self.spec.buffers)]
        if self.spec.buffers == 2:
            self.state[1].fill(np.float32(self.spec.tau * self.spec.tau))
        self._next = []

    def step(self, lo: int, hi: int, delta: np.ndarray) -> np.ndarray:
        """The change to add to values ``lo:hi`` of the global model, given their mean update.

        ``delta`` is float64; the result is float64. New moments go to scratch buffers.
        """
        s = self.spec
        if s.name == "fedavg":
            return delta if s.learning_rate == 1.0 else delta * s.learning_rate
        if not self._next:
            self._next = [np.empty(self.size, dtype=np.float32) for _ in range(s.buffers)]
        m_old = self.state[0][lo:hi].astype(np.float64)
        if s.name == "fedavgm":
            m_old *= s.beta1
            m_old += delta
            m = self._store(0, lo, hi, m_old)
            return m * s.learning_rate
        m_old *= s.beta1
        m_old += (1.0 - s.beta1) * delta
        m = self._store(0, lo, hi, m_old)
        v = self.state[1][lo:hi].astype(np.float64)
        square = delta * delta
        if s.name == "fedadam":
            v *= s.beta2
            v += (1.0 - s.beta2) * square
        else:  # fedyogi
            v -= (1.0 - s.beta2) * square * np.sign(v - square)
        v = self._store(1, lo, hi, v)
        out = np.sqrt(v)
        out += s.tau
        np.divide(m, out, out=out)
        out *= s.learning_rate
        return out

    def _store(self, index: int, lo: int, hi: int, values: np.ndarray) -> np.ndarray:
        """Round the new moment to float32 (the state), and go on with exactly that value."""
        target = self._next[index][lo:hi]
        target[:] = values
        return target.astype(np.float64)

    def commit(self) -> None:
        """The scratch moments become the state (after the checkpoint holding them is written)."""
        if self._next:
            self.state, self._next = self._next, self.state
        self.rounds += 1

    # ------------------------------------------------------------ checkpoints

    def record(self, pending: bool = False) -> dict[str, Any]:
        """The state as stored in a checkpoint (``pending``: the moments of the round being applied)."""
        buffers = self._next if pending and self._next else self.state
        return {
            "spec": asdict(self.spec),
            "rounds": self.rounds + (1 if pending else 0),
            "buffers": [torch.from_numpy(b) for b in buffers],
        }

    def load(self, record: Any, where: str) -> None:
        """Take a checkpoint's state ``record``; OptimizerError saying what differs if it does not fit."""
        spec = spec_of(record)
        if spec != self.spec:
            raise OptimizerError(
                f"{where} was made with the optimizer {spec.describe()}, but the federation uses "
                f"{self.spec.describe()}"
            )
        if record is None:
            self.reset()
            return
        buffers = list(record.get("buffers", []))
        if len(buffers) != spec.buffers:
            raise OptimizerError(
                f"{where}: {len(buffers)} optimizer buffers; {spec.name} needs {spec.buffers}"
            )
        state = []
        for tensor in buffers:
            if (
                not isinstance(tensor, torch.Tensor)
                or tensor.dtype != torch.float32
                or tensor.numel() != self.size
            ):
                raise OptimizerError(f"{where}: an optimizer buffer is not {self.size} float32 values")
            values = tensor.detach().reshape(-1).numpy().copy()
            if not np.isfinite(values).all():
                raise OptimizerError(f"{where}: the optimizer state holds values that are not finite")
            state.append(values)
        self.state, self._next = state, []
        self.rounds = int(record.get("rounds", 0))


def spec_of(record: Any) -> OptimizerSpec:
    """The optimizer a checkpoint's model was computed with (none recorded: plain FedAvg)."""
    if record is None:
        return PLAIN_FEDAVG
    if not isinstance(record, dict):
        raise OptimizerError("the checkpoint's optimizer record is not a table")
    return OptimizerSpec.from_dict(record.get("spec"))


def restored(record: Any, applied_round: int, size: int, where: str) -> ServerOptimizer:
    """The optimizer state a node's checkpoint holds (round 0: the state before any round)."""
    optimizer = ServerOptimizer(spec_of(record), size)
    if applied_round > 0:
        optimizer.load(record, where)
    return optimizer


def adopt(current: ServerOptimizer, spec: OptimizerSpec, applied_round: int) -> ServerOptimizer:
    """The optimizer a node follows the federation with, once the server has announced ``spec``.

    ``current`` is the state that goes with the node's model at ``applied_round``. A node
    at round 0 simply starts with ``spec``; one with applied rounds must have computed
    them with the same optimizer, or it could not compute what the other members compute.
    """
    if current.spec == spec:
        return current
    if applied_round == 0:
        return ServerOptimizer(spec, current.size)
    raise OptimizerError(
        f"this node's model at round {applied_round} was computed with the optimizer "
        f"{current.spec.describe()}, but the federation announces {spec.describe()}: it cannot "
        "compute what the other members computed. Start it with an empty state_dir (it then "
        "replays every kept sum from round 0), or bootstrap it from another member's "
        "`cipherhive node export`, which carries the optimizer state"
    )
