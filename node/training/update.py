"""Between the model and the encrypted vector: weight, check range, stream, divide, apply.

The vector a node encrypts is ``[w, 1.0, e…, w·Δ…]`` with Δ = local - global for
every federated tensor (flattened in layout order) and ``w = samples / weight_unit``;
``e…`` are the evaluation slots (zeros from a node that does not evaluate; see
:mod:`cipherhive.node.training.federated_eval`).
The server sums these; after decryption ``Σ w·Δ / Σ w`` is exactly the
FedAvg update, and no single member's sample count was ever visible. The 1.0
is the *check slot* (docs/spec/sum-checks.md §1): the sum holds the number of contributors there,
so a server that lies about a round's participants is caught after decryption
(:func:`cipherhive.node.sums.checks.check_participant_slot`).

With SCAFFOLD the layout ends with a control block
(:attr:`~cipherhive.federation.layout.Layout.control_start`) that carries each member's
``Δc`` *unweighted*, ``[w, 1.0, e…, w·Δ…, Δc…]``: its sum is divided by the number of
contributors (the check slot), not by ``Σw`` (SCAFFOLD averages control variates uniformly,
Karimireddy et al., ICML 2020, Algorithm 1 line 17). The node gets there without a second
code path: :func:`unweight_control` stores ``Δc / w`` in the values it hands over, and the
weighting below multiplies it back to ``Δc``.

The weight, the check slot and the evaluation slots come *first* so that a node can divide and apply
each decrypted block as it arrives, and the update is produced block by block from the
model's float32 values: neither side ever holds a float64 copy of the whole
update (a 100 M-parameter model costs its float32 size twice, not six times).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from cipherhive.ckks.codec import VALUE_RANGE
from cipherhive.federation.layout import (
    CHECK_SLOT,
    EVAL_SLOT,
    EVAL_VALUES,
    LEADING_VALUES,
    WEIGHT_SLOT,
    Layout,
    TensorSpec,
)

#: Elements per pass when scanning an update (bounds temporaries to a few MB).
_SCAN = 1 << 20


class UpdateError(ValueError):
    """An update that cannot be encoded faithfully (NaN, out of range, no samples)."""


def layout_of(
    tensors: list[tuple[str, torch.Tensor]], base_model_hash: str = "", initial_model_hash: str = ""
) -> Layout:
    return Layout(
        tuple(TensorSpec(n, tuple(t.shape)) for n, t in tensors), base_model_hash, initial_model_hash
    )


def flatten(tensors: list[tuple[str, torch.Tensor]]) -> np.ndarray:
    """Concatenate tensors into one float64 vector (float32 values convert exactly)."""
    parts = [t.detach().to("cpu", torch.float64).reshape(-1).numpy() for _, t in tensors]
    return np.concatenate(parts) if parts else np.zeros(0)


class FlatParams:
    """The federated tensors as one contiguous float32 buffer.

    When every federated tensor is a float32 CPU tensor, the tensors are
    re-pointed into the buffer (``tensor.data`` becomes a view), so reading the
    model as a vector and writing a new global model into it copy nothing.
    Otherwise values are gathered and scattered explicitly.
    """

    def __init__(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.tensors = tensors
        self.size = sum(t.numel() for _, t in tensors)
        self.buffer = torch.empty(self.size, dtype=torch.float32)
        self.views = all(t.dtype == torch.float32 and t.device.type == "cpu" for _, t in tensors)
        offset = 0
        with torch.no_grad():
            for _, tensor in tensors:
                n = tensor.numel()
                self.buffer[offset : offset + n] = tensor.detach().reshape(-1).to(torch.float32)
                if self.views:
                    tensor.data = self.buffer[offset : offset + n].view(tensor.shape)
                offset += n

    def read(self) -> np.ndarray:
        """The model's current values (a view of the buffer, float32)."""
        if not self.views:
            offset = 0
            with torch.no_grad():
                for _, tensor in self.tensors:
                    n = tensor.numel()
                    self.buffer[offset : offset + n] = tensor.detach().reshape(-1).to(torch.float32)
                    offset += n
        return self.buffer.numpy()

    def commit(self) -> None:
        """Push the buffer's values into the tensors (a no-op when they are views)."""
        if self.views:
            return
        offset = 0
        with torch.no_grad():
            for _, tensor in self.tensors:
                n = tensor.numel()
                tensor.copy_(self.buffer[offset : offset + n].view(tensor.shape).to(tensor.dtype))
                offset += n

    def load(self, values: np.ndarray) -> None:
        self.buffer.numpy()[:] = values
        self.commit()


def check_update(local: np.ndarray, global_: np.ndarray, weight: float, max_participants: int) -> float:
    """Refuse an update the encoding would corrupt; returns its largest weighted magnitude."""
    limit = VALUE_RANGE / max_participants
    peak = max(abs(weight), 1.0)  # the check slot's 1.0 counts too
    for start in range(0, local.shape[0], _SCAN):
        diff = local[start : start + _SCAN].astype(np.float64) - global_[start : start + _SCAN]
        if not np.isfinite(diff).all():
            raise UpdateError("update contains NaN or infinite values; training diverged, nothing was sent")
        if diff.size:
            peak = max(peak, float(np.abs(diff).max()) * weight)
    if peak > limit:
        raise UpdateError(
            f"weighted update reaches {peak:.3g}, beyond the {limit:.3g} that {max_participants} "
            "members can sum exactly; lower the learning rate, or raise the server's weight_unit"
        )
    return peak


def unweight_control(local: np.ndarray, global_: np.ndarray, weight: float, control_start: int) -> np.ndarray:
    """``local`` with its control block replaced by ``global + Δc / w`` (float64), so that
    :func:`weighted_blocks`, which multiplies every difference by ``w``, sends ``Δc`` itself.
    Returns ``local`` unchanged when the layout has no control block or ``w`` is 1; otherwise a
    float64 copy of the whole vector (SCAFFOLD's one exception to "no float64 copy")."""
    if control_start >= local.shape[0] or weight == 1.0:
        return local
    out = local.astype(np.float64)  # a copy: ``local`` may be a view of the model's buffer
    base = global_[control_start:].astype(np.float64)
    out[control_start:] = base + (out[control_start:] - base) / weight
    return out


def sample_weight(num_samples: int, weight_unit: float) -> float:
    if num_samples <= 0:
        raise UpdateError(f"trainer reported {num_samples} samples; an update needs at least one")
    return num_samples / weight_unit


def leading(weight: float, evaluation: np.ndarray | None = None) -> np.ndarray:
    """The values in front of ``w·Δ``: ``[w, 1.0, e…]`` (the evaluation slots zero when None)."""
    out = np.zeros(LEADING_VALUES)
    out[WEIGHT_SLOT] = weight
    out[CHECK_SLOT] = 1.0
    if evaluation is not None:
        if evaluation.shape != (EVAL_VALUES,):
            raise ValueError(f"the evaluation slots are {EVAL_VALUES} values, not {evaluation.shape}")
        out[EVAL_SLOT : EVAL_SLOT + EVAL_VALUES] = evaluation
    return out


def weighted_blocks(
    local: np.ndarray,
    global_: np.ndarray,
    weight: float,
    per_block: int,
    evaluation: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """The vector ``[w, 1.0, e…, w·Δ…]`` in blocks of ``per_block`` float64 values, made on demand.

    ``evaluation`` holds the :data:`~cipherhive.federation.layout.EVAL_VALUES` evaluation slots, already
    checked and scaled (:func:`cipherhive.node.training.federated_eval.encode`); None sends zeros.
    """
    if per_block < LEADING_VALUES:
        raise ValueError(f"blocks of {per_block} values cannot hold the leading values")
    head = leading(weight, evaluation)
    total = local.shape[0] + LEADING_VALUES
    for start in range(0, total, per_block):
        end = min(start + per_block, total)
        block = np.empty(end - start, dtype=np.float64)
        first = 0
        if start == 0:
            block[:LEADING_VALUES] = head
            first = LEADING_VALUES
        lo, hi = start + first - LEADING_VALUES, end - LEADING_VALUES  # parameters in this block
        np.subtract(local[lo:hi], global_[lo:hi], out=block[first:], dtype=np.float64)
        block[first:] *= weight
        yield block


def weighted_vector(
    local: np.ndarray,
    global_: np.ndarray,
    num_samples: int,
    weight_unit: float,
    max_participants: int,
    evaluation: np.ndarray | None = None,
    control_start: int | None = None,
) -> np.ndarray:
    """``[w, 1.0, e…, w·Δ…, Δc…]`` as one vector (for small updates and tests), after the same
    checks; values from ``control_start`` on are the unweighted control block (SCAFFOLD)."""
    if not np.isfinite(global_).all():
        raise UpdateError("update contains NaN or infinite values; training diverged, nothing was sent")
    weight = sample_weight(num_samples, weight_unit)
    if control_start is not None:
        local = unweight_control(local, global_, weight, control_start)
    check_update(local, global_, weight, max_participants)
    size = local.shape[0] + LEADING_VALUES
    return np.concatenate(list(weighted_blocks(local, global_, weight, size, evaluation)))


def mean_from_sum(summed: np.ndarray, num_params: int, control_start: int | None = None) -> np.ndarray:
    """Divide the decrypted ``Σ w·Δ`` by ``Σ w`` (the first value; the check and evaluation
    slots after it are skipped) and a control block ``Σ Δc`` by the contributors (the check
    slot); the daemon uses :class:`cipherhive.node.sums.checks.CheckedApplier`, which also
    checks the check slot and every value."""
    total_weight = _total_weight(float(summed[WEIGHT_SLOT]))
    out = summed[LEADING_VALUES : LEADING_VALUES + num_params] / total_weight
    if control_start is not None and control_start < num_params:
        count = float(round(float(summed[CHECK_SLOT])))
        out[control_start:] = summed[LEADING_VALUES + control_start : LEADING_VALUES + num_params] / count
    return out


def _total_weight(value: float) -> float:
    if not math.isfinite(value) or value <= 1e-9:
        raise UpdateError("decrypted total weight is not a positive number; the sum cannot be applied")
    return value


def apply_vector(tensors: list[tuple[str, torch.Tensor]], base: np.ndarray, delta: np.ndarray) -> None:
    """Set every federated tensor to base + delta (in float64, then cast)."""
    offset = 0
    with torch.no_grad():
        for _, tensor in tensors:
            n = tensor.numel()
            values = base[offset : offset + n] + delta[offset : offset + n]
            tensor.copy_(torch.from_numpy(values).reshape(tensor.shape).to(tensor.dtype))
            offset += n


def split(tensors: list[tuple[str, torch.Tensor]], vector: np.ndarray) -> dict[str, torch.Tensor]:
    out = {}
    offset = 0
    for name, tensor in tensors:
        n = tensor.numel()
        out[name] = torch.from_numpy(vector[offset : offset + n].copy()).reshape(tensor.shape)
        offset += n
    return out


def rounded_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics rounded to 4 significant digits (for the log, and the server only if opted in)."""
    return {k: float(f"{float(v):.4g}") for k, v in metrics.items() if np.isfinite(v)}
