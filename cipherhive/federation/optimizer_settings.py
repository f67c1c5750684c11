"""The federation's server-side optimizer settings: FedAvg, FedAvgM, FedAdam, FedYogi.

Configured per federation in server.toml (``[optimizer]``), validated here, pinned
by the server once a round is published and announced to every node in
``FederationSettings.optimizer``. The optimizers themselves run on the nodes
(:mod:`cipherhive.node.sums.optimizers`, which explains why): this module holds only
the settings, so the server does not import numpy or torch for them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from cipherhive.runtime.errors import UserError
from cipherhive.v1 import federation_pb2 as pb

NAMES = ("fedavg", "fedavgm", "fedadam", "fedyogi")
#: Server learning rate η when the configuration leaves it at 0. Adaptive steps are about
#: η per value (m/√v ≈ ±1), so they need a far smaller η than FedAvg's 1.
DEFAULT_LEARNING_RATE = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}
DEFAULT_BETA1 = 0.9
DEFAULT_BETA2 = 0.99
DEFAULT_TAU = 1e-3
#: Buffers of optimizer state (m, then v), each one float32 value per federated value.
_BUFFERS = {"fedavg": 0, "fedavgm": 1, "fedadam": 2, "fedyogi": 2}


class OptimizerError(UserError, ValueError):
    """Optimizer settings that are invalid, or state that does not fit them; says what to do."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer and its hyper-parameters; unused ones are 0 so equal specs compare equal."""

    name: str = "fedavg"
    learning_rate: float = 1.0
    beta1: float = 0.0
    beta2: float = 0.0
    tau: float = 0.0

    @classmethod
    def make(
        cls,
        name: str,
        learning_rate: float = 0.0,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        tau: float = DEFAULT_TAU,
        where: str = "[optimizer]",
    ) -> OptimizerSpec:
        """Validate; a learning rate of 0 is the optimizer's default. Settings it does not use are
        neither checked nor kept."""
        name = (name or "fedavg").strip().lower()
        if name not in NAMES:
            raise OptimizerError(
                f"{where} optimizer = {name!r} is not one of {', '.join(NAMES)}; "
                "fedavg applies the plain average"
            )
        lr = float(learning_rate) or DEFAULT_LEARNING_RATE[name]
        if not (math.isfinite(lr) and 0 < lr <= 100):
            raise OptimizerError(
                f"{where} learning_rate = {learning_rate!r} must be a number in (0, 100] (0: the default, "
                f"{DEFAULT_LEARNING_RATE[name]:g} for {name})"
            )
        if name == "fedavg":
            return cls(name, lr)
        if not (math.isfinite(beta1) and 0 <= beta1 < 1):
            raise OptimizerError(f"{where} beta1 = {beta1!r} must be in [0, 1), e.g. {DEFAULT_BETA1}")
        if name == "fedavgm":
            return cls(name, lr, float(beta1))
        if not (math.isfinite(beta2) and 0 <= beta2 < 1):
            raise OptimizerError(f"{where} beta2 = {beta2!r} must be in [0, 1), e.g. {DEFAULT_BETA2}")
        if not (math.isfinite(tau) and 0 < tau <= 1):
            raise OptimizerError(f"{where} tau = {tau!r} must be in (0, 1], e.g. {DEFAULT_TAU}")
        return cls(name, lr, float(beta1), float(beta2), float(tau))

    @classmethod
    def from_proto(cls, msg: pb.ServerOptimizer) -> OptimizerSpec:
        """What the server announced; an unset message is FedAvg (servers from before optimizers)."""
        if not msg.name:
            return cls()
        return cls.make(msg.name, msg.learning_rate, msg.beta1, msg.beta2, msg.tau, "the server's optimizer:")

    @classmethod
    def from_dict(cls, data: Any, where: str = "the checkpoint's optimizer:") -> OptimizerSpec:
        """Settings stored as :meth:`canonical` (checkpoints, the server's state), validated again."""
        keys = {"name", "learning_rate", "beta1", "beta2", "tau"}
        if not isinstance(data, dict) or set(data) != keys:
            raise OptimizerError(f"{where} settings {data!r} are not {', '.join(sorted(keys))}")
        try:
            lr, b1, b2, tau = (float(data[k]) for k in ("learning_rate", "beta1", "beta2", "tau"))
        except (TypeError, ValueError):
            raise OptimizerError(f"{where} settings {data!r} hold a value that is not a number") from None
        return cls.make(str(data["name"]), lr, b1, b2, tau, where=where)

    def to_proto(self) -> pb.ServerOptimizer:
        return pb.ServerOptimizer(**asdict(self))

    def canonical_dict(self) -> dict[str, Any]:
        return asdict(self)

    def canonical(self) -> str:
        """The settings as stable JSON (the server pins this text)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def buffers(self) -> int:
        return _BUFFERS[self.name]

    def describe(self) -> str:
        if self.name == "fedavg":
            return f"fedavg (η={self.learning_rate:g})"
        if self.name == "fedavgm":
            return f"fedavgm (η={self.learning_rate:g}, β1={self.beta1:g})"
        return f"{self.name} (η={self.learning_rate:g}, β1={self.beta1:g}, β2={self.beta2:g}, τ={self.tau:g})"


#: What every checkpoint made before optimizers existed was computed with.
PLAIN_FEDAVG = OptimizerSpec()
