"""What `cipherhive.simulate` returns: per-round records, the final global model, where the files are.

Kept apart from the run itself so that the records can be read, printed
and serialised (``--json``) without starting anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cipherhive.runtime.errors import UserError


@dataclass(frozen=True)
class NodeRound:
    """What one node did in one round, as it logged it locally (never sent to the server)."""

    #: It trained, encrypted and uploaded an update the server accepted.
    submitted: bool
    #: Its sample count (the FedAvg weight; encrypted on the wire).
    samples: int | None = None
    #: The trainer's own metrics of local training, rounded to 4 significant digits.
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float | None = None
    encrypt_upload_seconds: float | None = None
    upload_bytes: int | None = None
    #: It decrypted, checked and applied the round's sum.
    applied: bool = False
    #: Download, decryption, checks and apply.
    apply_seconds: float | None = None
    #: The federated evaluation this node decrypted with the round's sum (every node the same),
    #: rounded to 4 significant digits: ``examples``, ``loss``, ``accuracy`` and ``of_round``
    #: (the global model it evaluates: the round's base). Empty when no member evaluates.
    federated_eval: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundRecord:
    round: int
    #: Names of the nodes whose update is in the sum.
    participants: list[str]
    #: Wall-clock time from the end of the previous round (or the start) until every node applied it.
    seconds: float
    #: The server's view: from opening the round to publishing its encrypted sum.
    aggregation_seconds: float
    nodes: dict[str, NodeRound]

    @property
    def federated_eval(self) -> dict[str, float]:
        """The federation-wide validation carried by this round's sum (see ``NodeRound``)."""
        for node in self.nodes.values():
            if node.federated_eval:
                return node.federated_eval
        return {}


@dataclass
class SimulationResult:
    #: The ``package.module:object`` the nodes imported.
    plugin: str
    #: Node names, ``node-1`` … ``node-N`` (node i got ``node_options[i - 1]``).
    nodes: list[str]
    rounds: list[RoundRecord]
    #: The final global model's ``state_dict`` (every node holds the same model), as written by
    #: ``cipherhive node export``: ``model.load_state_dict(result.state_dict)``. Empty if the run failed.
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: The round the final model is at (0: no round was applied).
    model_round: int = 0
    seconds: float = 0.0
    #: Kept only when a ``workdir`` was given (or the run failed): keys, certificates, configs,
    #: each party's state and log, and ``model/`` (the export).
    workdir: Path | None = None

    @property
    def model_dir(self) -> Path | None:
        """The export folder (``cipherhive.node.export.load_export`` reads it), if kept."""
        folder = self.workdir / "model" if self.workdir else None
        return folder if folder is not None and folder.is_dir() else None

    @property
    def logs(self) -> dict[str, Path]:
        """``server`` and every node's log file, if kept."""
        if self.workdir is None:
            return {}
        return {name: self.workdir / f"{name}.log" for name in ["server", *self.nodes]}

    def to_dict(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-ready values."""
        return {
            "plugin": self.plugin,
            "nodes": self.nodes,
            "rounds": [{**asdict(r), "federated_eval": r.federated_eval} for r in self.rounds],
            "model_round": self.model_round,
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "seconds": self.seconds,
            "workdir": str(self.workdir) if self.workdir else None,
            "logs": {k: str(v) for k, v in self.logs.items()},
        }


class SimulationError(UserError, RuntimeError):
    """A simulation could not start or did not finish; the message names the plug-in or node and its log.

    ``result`` holds the rounds that did finish; ``log`` is the log to read first; ``started`` is False
    when nothing ran (bad arguments, a plug-in that cannot be imported or created).
    """

    def __init__(
        self,
        message: str,
        *,
        log: Path | None = None,
        result: SimulationResult | None = None,
        started: bool = True,
    ) -> None:
        super().__init__(message)
        self.log, self.result, self.started = log, result, started
