"""The fingerprint of the initial model: every member must start from the same values.

The layout hash pins the shapes, and ``base_model_hash`` a frozen base, but a
member whose trainer built its initial model with another seed (or from another
checkpoint file) used to join anyway: the federation then averaged updates taken
from different points, and that member's "global" model never matched the
others'. So the federation also pins a fingerprint of the initial values
(``Layout.initial_model_hash``, set by ``cipherhive node layout``), and the
server refuses at Join a node whose fingerprint differs.

**What it reveals.** It is an HMAC-SHA256 of the federated tensors' float32 values
(in layout order, each with its name and shape) under a key derived from the
federation's secret key (:func:`cipherhive.ckks.keys.members_key`). Members can compute
it; the server, which never holds the secret key, cannot, so it cannot test a
guessed seed, architecture or public checkpoint against it: to the server it is a
random-looking string that changes with the values, which is all it needs to
compare. Members learn nothing from it that they do not already share (the
initial model itself).

**Why float32 bytes.** The federated values travel and are applied as float32
(:class:`cipherhive.node.training.update.FlatParams`); hashing the exact float32 bit
patterns makes the fingerprint deterministic (no rounding to decide, no
tolerance) and as strict as the members' bit-identical models. Tensors held in
another dtype are converted to float32 first, exactly as the node does.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from pathlib import Path

import numpy as np
import torch

from cipherhive.ckks import keys

PURPOSE = "initial-model-fingerprint"
#: Values hashed per pass (bounds the float32 copy of a tensor in another dtype).
_CHUNK = 1 << 20


def fingerprint_key(secret_context: Path) -> bytes:
    """The HMAC key, from the federation's secret context file (read with the usual checks)."""
    return keys.members_key(keys.read_secret_context(secret_context), PURPOSE)


def initial_model_hash(key: bytes, tensors: list[tuple[str, torch.Tensor]]) -> str:
    """HMAC-SHA256 (hex) of the tensors' names, shapes and float32 values, in layout order."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(struct.pack("<Q", len(tensors)))
    for name, tensor in tensors:
        encoded = name.encode()
        mac.update(struct.pack("<QQ", len(encoded), tensor.dim()) + encoded)
        mac.update(struct.pack(f"<{tensor.dim()}Q", *tensor.shape))
        flat = tensor.detach().to("cpu").reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start : start + _CHUNK].to(torch.float32).numpy()
            mac.update(np.ascontiguousarray(part, dtype="<f4").tobytes())
    return mac.hexdigest()
