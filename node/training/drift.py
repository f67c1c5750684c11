"""Client-drift corrections a trainer applies to its gradients: FedProx and SCAFFOLD.

With label-skewed members, many local steps pull each member's model towards its own
optimum and the average drifts from the federation's (Li et al., "Federated Optimization in
Heterogeneous Networks", MLSys 2020, §3). FedProx adds ``μ/2 ‖w - w_global‖²`` to each member's
local objective; its gradient is ``μ (w - w_global)``, which :class:`ProximalTerm` adds to every
trainable parameter's ``.grad`` just before the optimizer steps. Adding it to ``.grad`` instead
of the loss is what makes it work under record-level DP-SGD too: Opacus rebuilds ``.grad`` from
the clipped, noised per-record gradients and would drop a loss term, so there the correction is
registered with :meth:`cipherhive.node.dp_sgd.PrivateTraining.add_gradient_correction` and runs
after clipping and noise. The term depends only on the public global model and the model's own
(already private) values, so it is post-processing and costs no privacy.

Any trainer uses it the same way::

    prox = ProximalTerm(trainable, mu)       # at the start of train(): snapshots w_global
    loss.backward(); prox.apply(); optimizer.step()
    # under DP-SGD: dp.add_gradient_correction(prox.apply), then dp.optimizer.step()

SCAFFOLD (Karimireddy et al., ICML 2020) corrects each step with control variates instead;
:class:`Scaffold` holds them and :class:`ScaffoldRound` applies them the same way (to ``.grad``,
after DP-SGD's noise), see its docstring for what is federated and what stays on the member.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from cipherhive.federation.layout import CONTROL_PREFIX
from cipherhive.node.trainer import TrainerError

__all__ = ["LOCAL_CONTROL_FILE", "ProximalTerm", "Scaffold", "ScaffoldRound", "check_mu", "scaffold_lr"]


def check_mu(mu: float) -> float:
    """``proximal_mu`` must be a finite number ≥ 0 (0: plain FedAvg local training)."""
    value = float(mu)
    if not (math.isfinite(value) and value >= 0):
        raise TrainerError(f"proximal_mu = {mu!r} must be a number >= 0 (0 turns FedProx off)")
    return value


class ProximalTerm:
    """FedProx's ``μ (w - w_global)`` added to each parameter's gradient (Li et al. 2020, §3, eq. 2).

    ``params`` are the trainable parameters, holding the global model when the object is made
    (their values then are the anchor ``w_global``). A parameter without a gradient in a step
    gets the term alone: the proximal objective still pulls it.
    """

    def __init__(self, params: Iterable[torch.Tensor], mu: float) -> None:
        self.mu = check_mu(mu)
        self.params = [p for p in params if p.requires_grad]
        self.anchors = [p.detach().clone() for p in self.params] if self.mu else []

    @property
    def active(self) -> bool:
        return self.mu > 0

    def apply(self) -> None:
        """Add ``μ (w - w_global)`` to every parameter's ``.grad`` (call just before ``step()``)."""
        if not self.mu:
            return
        with torch.no_grad():
            for p, anchor in zip(self.params, self.anchors, strict=True):
                pull = (p.detach() - anchor).mul_(self.mu)
                if p.grad is None:
                    p.grad = pull
                else:
                    p.grad.add_(pull)

    def penalty(self) -> float:
        """``μ/2 ‖w - w_global‖²`` (for metrics and tests)."""
        if not self.mu:
            return 0.0
        with torch.no_grad():
            total = sum(
                float((p.detach() - a).pow(2).sum()) for p, a in zip(self.params, self.anchors, strict=True)
            )
        return 0.5 * self.mu * total


# --------------------------------------------------------------------------- SCAFFOLD

#: The member's own control variate ``c_i`` in the node's state directory, and the one a round
#: staged until the federation applied that round's sum.
LOCAL_CONTROL_FILE = "scaffold-control.pt"
_STAGED = "scaffold-control.staged.pt"


class Scaffold:
    """A member's SCAFFOLD state (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging
    for Federated Learning", ICML 2020, Algorithm 1).

    * The **global control variate** ``c`` is federated: :meth:`control_tensors` gives one
      float32 tensor per trainable federated parameter, named ``control:<parameter>``, which
      the trainer appends to its ``federated_tensors``. The layout then ends with a control
      block (:attr:`cipherhive.federation.layout.Layout.control_start`), the node's checkpoint
      keeps ``c`` with the model, and every member applies the same decrypted sum to it, so it
      is the same on every member, bit for bit.
    * A member's **own control variate** ``c_i`` never leaves it: it lives in
      :data:`LOCAL_CONTROL_FILE` in the node's state directory (the node calls the trainer's
      ``attach_state_dir``), so a restart keeps it; without a directory, in memory.
    * Each local step uses ``g - c_i + c`` (line 10); after ``K`` steps of rate ``η`` the
      round computes option II, ``c_i+ = c_i - c + (x - y_i) / (K η)`` (line 12), and sends
      ``Δc_i = c_i+ - c_i`` in the control block of the same encrypted, masked sum as the
      model update, unweighted. The node divides its sum by the contributors and adds it:
      ``c <- c + mean Δc`` (line 17 with ``|S| = N``: the sum's contributors are the round's
      members; a member that sat a round out is not counted in N).
    * ``c_i+`` is staged when the round is trained and becomes ``c_i`` once a later round
      starts from a model that includes that round (``base_round >= round``), i.e. once the
      federation applied the sum that carried its ``Δc_i``.
    """

    def __init__(self, state_dir: str | Path | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._controls: list[tuple[str, torch.Tensor]] = []
        self._local: dict[str, torch.Tensor] | None = None
        self._staged: tuple[int, dict[str, torch.Tensor]] | None = None

    def attach_state_dir(self, state_dir: str | Path) -> None:
        """Keep ``c_i`` in ``state_dir`` (the node's state directory) from now on."""
        self.state_dir = Path(state_dir)
        self._local = None
        self._staged = None

    def control_tensors(self, params: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """The global control variates for ``params`` (zeros at first), to federate after them."""
        names = [CONTROL_PREFIX + name for name, _ in params]
        if not self._controls:
            self._controls = [
                (CONTROL_PREFIX + name, torch.zeros(tuple(p.shape), dtype=torch.float32))
                for name, p in params
            ]
        elif [n for n, _ in self._controls] != names:
            raise TrainerError(
                "SCAFFOLD: the federated parameters changed after the control variates were made"
            )
        return list(self._controls)

    def begin(
        self, params: Sequence[tuple[str, torch.Tensor]], round_number: int, base_round: int
    ) -> ScaffoldRound:
        """Start round ``round_number`` from the global model in ``params`` (named as in
        :meth:`control_tensors`)."""
        if [CONTROL_PREFIX + n for n, _ in params] != [n for n, _ in self._controls]:
            raise TrainerError("SCAFFOLD: call control_tensors (through federated_tensors) before training")
        self._settle(base_round)
        return ScaffoldRound(self, [p for _, p in params], round_number)

    # ------------------------------------------------------------ c_i, durably

    def local_controls(self) -> list[torch.Tensor]:
        """``c_i`` in parameter order (zeros until the first round was applied)."""
        if self._local is None:
            loaded = self._read(LOCAL_CONTROL_FILE)
            self._local = loaded[1] if loaded is not None else {}
        return [
            self._local.get(name, torch.zeros_like(c, dtype=torch.float64)).to(torch.float64)
            for name, c in self._controls
        ]

    def stage(self, round_number: int, controls: list[torch.Tensor]) -> None:
        """Keep ``c_i+`` of ``round_number`` until that round's sum is applied."""
        values = {
            name: c.detach().to(torch.float64).clone()
            for (name, _), c in zip(self._controls, controls, strict=True)
        }
        self._staged = (round_number, values)
        self._write(_STAGED, round_number, values)

    def _settle(self, base_round: int) -> None:
        staged = self._staged
        if staged is None and self.state_dir is not None:
            staged = self._read(_STAGED)
        if staged is None or staged[0] > base_round:
            return
        self._local = staged[1]
        self._write(LOCAL_CONTROL_FILE, staged[0], staged[1])
        self._staged = None
        if self.state_dir is not None:
            (self.state_dir / _STAGED).unlink(missing_ok=True)

    def _read(self, name: str) -> tuple[int, dict[str, torch.Tensor]] | None:
        if self.state_dir is None or not (self.state_dir / name).exists():
            return None
        data = torch.load(self.state_dir / name, weights_only=True)
        values = data["controls"]
        expected = {n: tuple(c.shape) for n, c in self._controls}
        if {n: tuple(v.shape) for n, v in values.items()} != expected:
            raise TrainerError(
                f"SCAFFOLD: {self.state_dir / name} holds control variates of another model; "
                "use a new state directory for this model"
            )
        return int(data["round"]), dict(values)

    def _write(self, name: str, round_number: int, values: dict[str, torch.Tensor]) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / (name + ".tmp")
        with open(tmp, "wb") as fh:
            torch.save({"round": round_number, "controls": values}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.state_dir / name)


class ScaffoldRound:
    """One round of SCAFFOLD's local training (Algorithm 1, lines 7-13), made by :meth:`Scaffold.begin`."""

    def __init__(self, scaffold: Scaffold, params: list[torch.Tensor], round_number: int) -> None:
        self.scaffold = scaffold
        self.round = round_number
        self.params = params
        self.start = [p.detach().to(torch.float64).clone() for p in params]  # x
        self.c = [c.detach().to(torch.float64).clone() for _, c in scaffold._controls]
        self.c_i = scaffold.local_controls()
        self.correction = [
            (c - ci).to(device=p.device, dtype=p.dtype)
            for c, ci, p in zip(self.c, self.c_i, params, strict=True)
        ]
        self.steps = 0

    def apply(self) -> None:
        """``g <- g - c_i + c`` on every parameter (line 10); call once per optimizer step, just
        before it (under DP-SGD through ``add_gradient_correction``, after clipping and noise)."""
        self.steps += 1
        with torch.no_grad():
            for p, corr in zip(self.params, self.correction, strict=True):
                if p.grad is None:
                    p.grad = corr.clone()
                else:
                    p.grad.add_(corr)

    def finish(self, lr: float) -> None:
        """Option II (line 12) after :attr:`steps` steps of rate ``lr``; writes ``c + Δc_i`` into
        the control tensors (the node sends their difference from ``c``) and stages ``c_i+``.

        ``lr`` is the effective step size: for SGD with momentum β, ``lr / (1 - β)`` (the
        steady-state step of heavy-ball momentum); Algorithm 1 assumes plain SGD."""
        if self.steps == 0 or not lr > 0:
            return
        scale = 1.0 / (self.steps * lr)
        new_local = []
        with torch.no_grad():
            for (_, control), x, p, c, ci in zip(
                self.scaffold._controls, self.start, self.params, self.c, self.c_i, strict=True
            ):
                ci_plus = ci - c + (x - p.detach().to(torch.float64)) * scale
                control.copy_((c + (ci_plus - ci)).to(control.dtype))
                new_local.append(ci_plus)
        self.scaffold.stage(self.round, new_local)


def scaffold_lr(optimizer: str, lr: float, momentum: float) -> float:
    """The step size option II divides by: SGD only, ``lr / (1 - momentum)`` with momentum."""
    if optimizer != "sgd":
        raise TrainerError(
            f"scaffold needs optimizer = 'sgd' (option II assumes SGD steps), not {optimizer!r}"
        )
    if not 0 <= momentum < 1:
        raise TrainerError(f"scaffold needs 0 <= momentum < 1, not {momentum!r}")
    return lr / (1.0 - momentum)
