"""Between the model and the encrypted vector: flatten, weight, check range, apply.

The vector a node encrypts is ``[w·Δ, w]`` with Δ = local - global for every
federated tensor (flattened in layout order) and ``w = samples / weight_unit``.
The server sums these; after decryption ``Σ w·Δ / Σ w`` is exactly the
FedAvg update, and no single member's sample count was ever visible.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cipherhive.codec import VALUE_RANGE
from cipherhive.layout import Layout, TensorSpec


class UpdateError(ValueError):
    """An update that cannot be encoded faithfully (NaN, out of range, no samples)."""


def layout_of(tensors: list[tuple[str, torch.Tensor]], base_model_hash: str = "") -> Layout:
    return Layout(tuple(TensorSpec(n, tuple(t.shape)) for n, t in tensors), base_model_hash)


def flatten(tensors: list[tuple[str, torch.Tensor]]) -> np.ndarray:
    """Concatenate tensors into one float64 vector (float32 values convert exactly)."""
    parts = [t.detach().to("cpu", torch.float64).reshape(-1).numpy() for _, t in tensors]
    return np.concatenate(parts) if parts else np.zeros(0)


def weighted_vector(
    local: np.ndarray,
    global_: np.ndarray,
    num_samples: int,
    weight_unit: float,
    max_participants: int,
) -> np.ndarray:
    """``[w·Δ, w]`` ready to encrypt, refusing values the encoding would corrupt."""
    if num_samples <= 0:
        raise UpdateError(f"trainer reported {num_samples} samples; an update needs at least one")
    weight = num_samples / weight_unit
    out = np.empty(local.shape[0] + 1, dtype=np.float64)
    np.subtract(local, global_, out=out[:-1])
    out[:-1] *= weight
    out[-1] = weight
    if not np.isfinite(out).all():
        raise UpdateError("update contains NaN or infinite values; training diverged, nothing was sent")
    limit = VALUE_RANGE / max_participants
    peak = float(np.abs(out).max())
    if peak > limit:
        raise UpdateError(
            f"weighted update reaches {peak:.3g}, beyond the {limit:.3g} that {max_participants} "
            "members can sum exactly; lower the learning rate, or raise the server's weight_unit"
        )
    return out


def mean_from_sum(summed: np.ndarray, num_params: int) -> np.ndarray:
    """Divide the decrypted ``Σ w·Δ`` by ``Σ w`` (the last value)."""
    total_weight = float(summed[num_params])
    if not math.isfinite(total_weight) or total_weight <= 1e-9:
        raise UpdateError(
            f"decrypted total weight is {total_weight}; the sum was not made with this federation's key"
        )
    return summed[:num_params] / total_weight


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
